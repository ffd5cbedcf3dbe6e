"""A streamed single-step response (§7.8, `stream: true`): the upstream's chat-completion
chunks as the Responses event stream the `openai` SDK reads.

Text and refusal deltas are sent as they come, each in a content part of the one message;
every item's final form, and the terminal event, follow once the reassembled chat completion is
translated. The message item streamed live has the id the translation derives for it (from the
chat id and its output index), so the live deltas and the final object name the same item;
should the translation place it or its parts elsewhere (reasoning that came after the text, a
refusal before it), the final object keeps them where and as the stream announced them.
"""

from __future__ import annotations

from typing import Any

from streams.responses.translate import chat_to_responses, item_id, message_item

Event = dict[str, Any]
_TERMINAL = {"incomplete": "response.incomplete", "failed": "response.failed"}


class ResponsesStream:
    def __init__(self, request: dict[str, Any], response_id: str, created_at: int) -> None:
        self._request = request
        self._id = response_id
        self._created_at = created_at
        self._sequence = 0
        self._seed: str | None = None  # the chat id, as the reassembled completion keeps it
        self._reasoning = False
        self._message: tuple[int, str] | None = None  # (output index, item id) once it opened
        # The message's content parts as they opened (their content index) → text so far.
        self._parts: dict[str, str] = {}

    def opening(self) -> list[Event]:
        snapshot = self._snapshot("in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def chunk(self, chunk: Any) -> list[Event]:
        """The events for one chat chunk: text and refusal of the first choice, as they come."""
        if not isinstance(chunk, dict):
            return []
        if self._seed is None and isinstance(chunk.get("id"), str) and chunk["id"]:
            self._seed = chunk["id"]  # a blank one opens some streams (Azure's metadata)
        events: list[Event] = []
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict) or choice.get("index", 0) != 0:
                continue
            if any(_is_text(delta.get(key)) for key in ("reasoning_content", "reasoning")):
                self._reasoning = True  # text, as the translation counts it
            for kind, key in (("output_text", "content"), ("refusal", "refusal")):
                if _is_text(delta.get(key)):
                    events += self._delta(kind, delta[key])
        return events

    def arranged(self, response: dict[str, Any]) -> dict[str, Any]:
        """The translated response with the streamed message as the stream announced it: at
        its index, with its id and its parts in the order they opened, the other items around
        it in their order (the translation puts a reasoning item first even when the
        reasoning came after the text, and the text before the refusal)."""
        output = response.get("output")
        if self._message is None or not isinstance(output, list):
            return response
        at, message_id = self._message
        found = next((k for k, item in enumerate(output) if item.get("type") == "message"), None)
        if found is None:
            return response
        opened = list(self._parts)
        content = sorted(
            output[found]["content"],
            key=lambda part: opened.index(part["type"]) if part["type"] in opened else len(opened),
        )
        message = output[found] | {"id": message_id, "content": content}
        rest = output[:found] + output[found + 1 :]
        return response | {"output": rest[:at] + [message] + rest[at:]}

    def finished(self, response: dict[str, Any]) -> list[Event]:
        """The final items and the terminal event, from the translated response as
        `arranged`."""
        events: list[Event] = []
        output = response.get("output")
        for index, item in enumerate(output if isinstance(output, list) else []):
            if self._message == (index, item.get("id")):
                events += self._parts_done(index, item)
            else:
                events.append(self._event("response.output_item.added", output_index=index, item=item))  # fmt: skip
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        kind = _TERMINAL.get(response.get("status", ""), "response.completed")
        events.append(self._event(kind, response=response))
        return events

    def failed(self, error: dict[str, Any]) -> list[Event]:
        """The failure, with what streamed before it: the SDK keeps a failed response's
        `output` as sent."""
        response = self._snapshot("failed") | {"error": error, "output": self._streamed()}
        return [self._event("response.failed", response=response)]

    def _streamed(self) -> list[dict[str, Any]]:
        if self._message is None:
            return []
        content = [_part(kind, text) for kind, text in self._parts.items()]
        return [message_item("", self._message[1], status="incomplete") | {"content": content}]

    def _delta(self, kind: str, text: str) -> list[Event]:
        """A piece of the message's text or refusal; the message and the part open first."""
        events: list[Event] = []
        if self._message is None:
            # A reasoning item, when there is one, comes first in the translation.
            index = 1 if self._reasoning else 0
            self._message = (index, item_id("msg", self._seed or "", index))
            item = message_item("", self._message[1], status="in_progress") | {"content": []}
            events.append(self._event("response.output_item.added", output_index=index, item=item))  # fmt: skip
        index, message_id = self._message
        opened = kind in self._parts
        self._parts[kind] = self._parts.get(kind, "") + text
        at = {"item_id": message_id, "output_index": index,
              "content_index": list(self._parts).index(kind)}  # fmt: skip
        if not opened:
            events.append(self._event("response.content_part.added", **at, part=_part(kind, "")))
        if kind == "refusal":
            events.append(self._event("response.refusal.delta", **at, delta=text))
        else:
            events.append(self._event("response.output_text.delta", **at, delta=text, logprobs=[]))  # fmt: skip
        return events

    def _parts_done(self, index: int, item: dict[str, Any]) -> list[Event]:
        """The done events of the streamed message's parts, final text in hand."""
        events: list[Event] = []
        for content_index, part in enumerate(item["content"]):
            at = {"item_id": item["id"], "output_index": index, "content_index": content_index}
            if part["type"] not in self._parts:
                continue  # never opened: the item's own done event carries it
            if part["type"] == "refusal":
                events.append(self._event("response.refusal.done", **at, refusal=part["refusal"]))  # fmt: skip
            else:
                events.append(self._event("response.output_text.done", **at, text=part["text"], logprobs=[]))  # fmt: skip
            events.append(self._event("response.content_part.done", **at, part=part))
        return events

    def _snapshot(self, status: str) -> dict[str, Any]:
        """The response before its outcome: the request's echoed fields, nothing produced."""
        empty = chat_to_responses({}, self._request, created_at=self._created_at)
        return empty | {"id": self._id, "status": status, "completed_at": None, "usage": None}

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": []}
