"""The Responses event stream of a streamed single-step response (§7.8), checked against the
`openai` SDK's own event types."""

from __future__ import annotations

from typing import Any

import msgspec
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from projections.api.response_stream import ResponsesStream
from streams.execution.client import reassemble
from streams.responses.translate import chat_to_responses

RESPONSE_ID = "resp_3c9a4f1e-7b2d-4e8a-9c6f-1d2e3f4a5b6c"
REQUEST = {"model": "m", "input": "hi", "instructions": "be brief"}
_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_717_000_000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_717_000_000,
         "model": "m", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3,
                                                "total_tokens": 5}}  # fmt: skip


def run(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every event of a stream of `chunks`, ending with the translation of their reassembly."""
    stream = ResponsesStream(REQUEST, RESPONSE_ID, created_at=1_717_000_000)
    events = stream.opening()
    for c in chunks:
        events += stream.chunk(c)
    chat = msgspec.json.decode(reassemble([msgspec.json.encode(c).decode() for c in chunks]) or "")
    final = chat_to_responses(chat, REQUEST, created_at=1_717_000_000) | {"id": RESPONSE_ID}
    events += stream.finished(stream.arranged(final))
    for event in events:
        _EVENT.validate_python(event)  # every event is what the SDK expects, strictly
    return events


def test_text_streams_as_it_comes_and_the_final_object_names_the_same_item() -> None:
    events = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk({}, "stop"),
            USAGE,
        ]
    )
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert {e["response"]["id"] for e in events if "response" in e} == {RESPONSE_ID}
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["instructions"] == "be brief"
    final = events[-1]["response"]
    [item] = final["output"]
    # Deltas, done events and the final object all name one item, at one index.
    assert {e["item_id"] for e in events if "item_id" in e} == {item["id"]}
    assert {e["output_index"] for e in events if "output_index" in e} == {0}
    assert "".join(e["delta"] for e in events if "delta" in e) == "Hello"
    assert events[-4]["text"] == "Hello" and final["usage"]["total_tokens"] == 5


def test_a_reasoning_item_comes_first() -> None:
    events = run(
        [
            chunk({"role": "assistant", "reasoning_content": "think"}),
            chunk({"content": "answer"}),
            chunk({}, "stop"),
        ]
    )
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert (delta["output_index"], delta["item_id"]) == (1, final["output"][1]["id"])
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert sorted(added) == [0, 1]


def test_items_without_text_are_added_and_done_at_the_end() -> None:
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": '{"a":1}'}}  # fmt: skip
    # (A `tool_calls` finish reads `requires_action`, which the SDK's types do not list.)
    events = run([chunk({"role": "assistant", "tool_calls": [call]}), chunk({}, "stop")])
    kinds = [e["type"] for e in events]
    assert kinds[2:] == [
        "response.output_item.added",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[3]["item"]["call_id"] == "call_1"


@pytest.mark.parametrize(("finish", "terminal"), [("length", "response.incomplete")])
def test_the_terminal_event_follows_the_status(finish: str, terminal: str) -> None:
    events = run([chunk({"content": "cut"}), chunk({}, finish)])
    assert events[-1]["type"] == terminal


def test_a_failure_ends_the_stream_with_the_error() -> None:
    stream = ResponsesStream(REQUEST, RESPONSE_ID, created_at=1)
    error = {"type": "server_error", "code": 503, "message": "down"}
    [event] = stream.failed(error)
    assert event["type"] == "response.failed" and event["sequence_number"] == 0
    assert event["response"]["status"] == "failed" and event["response"]["error"] == error
    assert stream.chunk("[DONE]") == [] and stream.chunk({"choices": None}) == []


def test_a_refusal_streams_in_a_part_of_its_own() -> None:
    events = run(
        [
            chunk({"role": "assistant", "refusal": "No."}),
            chunk({"content": "Hi"}),
            chunk({}, "stop"),
        ]
    )
    assert [(e["type"], e.get("content_index")) for e in events[2:]] == [
        ("response.output_item.added", None),
        ("response.content_part.added", 0),
        ("response.refusal.delta", 0),
        ("response.content_part.added", 1),
        ("response.output_text.delta", 1),
        ("response.refusal.done", 0),
        ("response.content_part.done", 0),
        ("response.output_text.done", 1),
        ("response.content_part.done", 1),
        ("response.output_item.done", None),
        ("response.completed", None),
    ]
    assert events[-1]["response"]["output"][0]["content"] == [
        {"type": "refusal", "refusal": "No."},
        {"type": "output_text", "text": "Hi", "annotations": []},
    ]
