"""Single-step Responses ↔ Chat Completions translation (§7.8) and the Responses wire shapes
the chain assembly shares with it: output items, usage and the echoed request fields.

Beyond the spec's fields, objects carry what the `openai` SDK's types require (item `id` and
`status`, `annotations`, `tools`/`tool_choice`/`parallel_tool_calls`, usage details), so SDK
clients can validate them. Item ids are derived, never random: a replayed translation or
assembly must produce the same bytes. The §8.8 id override is
`streams.execution.outcome.override_response_id`.
"""

from __future__ import annotations

import uuid
from typing import Any, TypeGuard

from streams.responses.inputs import compact_json, initial_messages, normalize_tools

# uuid5(schemas.ids.NAMESPACE, "responses/output-item"); fixed so item ids survive replays.
NS_ITEM = uuid.UUID("e5a29a23-791d-521d-9d0a-47d80c55561a")

_FINISH_STATUS = {
    "stop": "completed",
    "length": "incomplete",
    "tool_calls": "requires_action",
    "content_filter": "failed",
}
_FORWARDED = ("temperature", "top_p", "stream", "stop")


def item_id(prefix: str, seed: str, index: int) -> str:
    return f"{prefix}_{uuid.uuid5(NS_ITEM, f'{seed}:{index}').hex}"


# --- output items ----------------------------------------------------------------------------


def message_item(
    text: str,
    id: str,
    role: str = "assistant",
    status: str = "completed",
    refusal: str | None = None,
) -> dict[str, Any]:
    """A message output item: its text, and the model's refusal when it refused."""
    content: list[dict[str, Any]] = []
    if text or not refusal:
        content.append({"type": "output_text", "text": text, "annotations": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"type": "message", "id": id, "status": status, "role": role, "content": content}


def function_call_item(call: dict[str, Any], id: str) -> dict[str, Any]:
    """A chat `tool_calls[]` entry as a Responses `function_call` item (§3)."""
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    call_id = call.get("id")
    name = function.get("name")
    arguments = function.get("arguments")
    return {
        "type": "function_call",
        "id": id,
        "status": "completed",
        "call_id": call_id if isinstance(call_id, str) else "call_unknown",
        "name": name if isinstance(name, str) else "",
        # Absent arguments read as no arguments, as in §2.4 and §2.7.
        "arguments": "{}"
        if arguments is None
        else arguments
        if isinstance(arguments, str)
        else compact_json(arguments),
    }


def unique_call(call: dict[str, Any], name: str, taken: set[str]) -> dict[str, Any]:
    """A chat `tool_calls[]` entry with its own id, or named `name` (`name_`, … while taken)
    when it has none or one an earlier call of the answer took (upstreams that count from
    `call_0` every round). The `openai` SDK refuses a response naming two calls alike, and a
    call named `call_unknown` could not be told from another. `taken` gains the id."""
    call_id = call.get("id")
    if not isinstance(call_id, str) or call_id in taken:
        while name in taken:
            name += "_"
        call, call_id = call | {"id": name}, name
    taken.add(call_id)
    return call


def reasoning_item(text: str, id: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _reasoning_text(message: dict[str, Any]) -> str | None:
    # vLLM/DeepSeek-style servers call it `reasoning_content`, newer ones `reasoning`.
    for key in ("reasoning_content", "reasoning"):
        text = message.get(key)
        if isinstance(text, str) and text:
            return text
    return None


# --- usage -----------------------------------------------------------------------------------


def responses_usage(usage: Any) -> dict[str, Any] | None:
    """Chat-style (`prompt_tokens`…) or Responses-style usage as Responses-style usage."""
    if not isinstance(usage, dict):
        return None
    input_tokens = _count(usage, "input_tokens", "prompt_tokens")
    output_tokens = _count(usage, "output_tokens", "completion_tokens")
    total = usage.get("total_tokens")
    input_details = _details(usage, "input_tokens_details", "prompt_tokens_details")
    output_details = _details(usage, "output_tokens_details", "completion_tokens_details")
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": total if is_int(total) else input_tokens + output_tokens,
        "input_tokens_details": {
            "cached_tokens": _count(input_details, "cached_tokens"),
            "cache_write_tokens": _count(input_details, "cache_write_tokens"),
        },
        "output_tokens_details": {"reasoning_tokens": _count(output_details, "reasoning_tokens")},
    }


def is_int(value: Any) -> TypeGuard[int]:
    """A JSON integer: `bool` is an `int` subclass in Python but not a count."""
    return isinstance(value, int) and not isinstance(value, bool)


def _count(source: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = source.get(key)
        if is_int(value):
            return value
    return 0


def _details(usage: dict[str, Any], *keys: str) -> dict[str, Any]:
    for key in keys:
        value = usage.get(key)
        if isinstance(value, dict):
            return value
    return {}


# --- echoed request fields -------------------------------------------------------------------


def responses_tools(tools: Any) -> list[Any]:
    """Tools as a Responses object lists them: function tools flat, whichever shape was sent."""
    if not isinstance(tools, list):
        return []
    return [_responses_tool(tool) for tool in normalize_tools(tools)]


def _responses_tool(tool: Any) -> Any:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict):
        return tool
    name = function.get("name")
    return {
        "type": "function",
        "name": name if isinstance(name, str) else "",
        "description": function.get("description"),
        "parameters": function.get("parameters"),
        "strict": function.get("strict"),
    }


def responses_tool_choice(choice: Any) -> Any:
    """Chat-style `{"type":"function","function":{"name"}}` reads as the flat Responses form."""
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "function", "name": choice["function"].get("name")}
    return "auto" if choice is None else choice


def chat_tool_choice(choice: Any) -> Any:
    """The Responses flat function choice in the nested form chat upstreams accept."""
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def tool_fields(request: dict[str, Any]) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls`: required by the SDK's Response type."""
    parallel = request.get("parallel_tool_calls")
    return {
        "tools": responses_tools(request.get("tools")),
        "tool_choice": responses_tool_choice(request.get("tool_choice")),
        "parallel_tool_calls": parallel if isinstance(parallel, bool) else True,
    }


def echoed_fields(request: dict[str, Any]) -> dict[str, Any]:
    metadata = request.get("metadata")
    return {
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "temperature": request.get("temperature"),
        "top_p": request.get("top_p"),
        "user": request.get("user"),
        "metadata": metadata if isinstance(metadata, dict) else {},
        **tool_fields(request),
    }


# --- translation -----------------------------------------------------------------------------


def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A single-step `/v1/responses` body as the chat-completions body sent upstream.

    Raises `InputError` for an unusable `input` (the intake already answered those with 400).
    """
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    messages += initial_messages(body)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    for key in _FORWARDED:
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("stream") is True:
        # Without it a streamed chat reply carries no usage, and the response needs one.
        chat["stream_options"] = {"include_usage": True}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("user") is not None:
        chat["user"] = body["user"]
    if body.get("tools") is not None:
        chat["tools"] = normalize_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = chat_tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    return chat


def status_from_choices(choices: Any) -> str:
    if not isinstance(choices, list) or not choices:
        return "failed"
    first = choices[0]
    reason = first.get("finish_reason") if isinstance(first, dict) else None
    return _FINISH_STATUS.get(reason, "completed") if isinstance(reason, str) else "completed"


def chat_to_responses(
    chat: dict[str, Any], request: dict[str, Any], *, created_at: int = 0
) -> dict[str, Any]:
    """An upstream chat completion as the Responses object answering `request`.

    `id` is the chat id (the caller overrides it per §8.8); `created_at` is the fallback for
    a chat body without `created`.
    """
    chat_id = chat.get("id")
    seed = chat_id if isinstance(chat_id, str) else ""
    choices = chat.get("choices")
    status = status_from_choices(choices)
    output: list[dict[str, Any]] = []
    calls: set[str] = set()
    for number, choice in enumerate(choices if isinstance(choices, list) else []):
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            output += _message_items(message, seed, len(output), status, number, calls)
    created = chat.get("created")
    created = created if is_int(created) else created_at
    tier = chat.get("service_tier")
    return {
        "id": seed,
        "object": "response",
        "created_at": created,
        "status": status,
        "completed_at": created if status == "completed" else None,
        "model": request.get("model"),
        "output": output,
        "usage": responses_usage(chat.get("usage")),
        "background": False,
        "service_tier": tier if isinstance(tier, str) else "default",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        **echoed_fields(request),
    }


def _message_items(
    message: dict[str, Any], seed: str, start: int, status: str, number: int, taken: set[str]
) -> list[dict[str, Any]]:
    """``number``: the choice's; ``taken``: the call ids the answer's items have taken."""
    items: list[dict[str, Any]] = []
    reasoning = _reasoning_text(message)
    if reasoning is not None:
        items.append(reasoning_item(reasoning, item_id("rs", seed, start + len(items))))
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    refusal = message.get("refusal")
    refusal = refusal if isinstance(refusal, str) and refusal else None
    if text or refusal:
        role = message.get("role")
        items.append(
            message_item(
                text,
                item_id("msg", seed, start + len(items)),
                role=role if isinstance(role, str) else "assistant",
                status="incomplete" if status == "incomplete" else "completed",
                refusal=refusal,
            )
        )
    tool_calls = message.get("tool_calls")
    for index, call in enumerate(tool_calls if isinstance(tool_calls, list) else []):
        if isinstance(call, dict):
            call = unique_call(call, f"call_{number}_{index}", taken)
            items.append(function_call_item(call, item_id("fc", seed, start + len(items))))
    return items
