"""Realtime answers (§7.2, §7.8) to upstreams that stream in their own way, read by the
`openai` SDK as a user would."""

from __future__ import annotations

from typing import Any

import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseOutputMessage,
    ResponseOutputText,
)

from schemas import bodies
from streams.responses.steps import parse_response_id
from tests.unit.api_fakes import FakePool, FakePublisher, ScriptedUpstream, serve
from tests.unit.test_api_response_stream import USAGE, chunk
from tests.unit.test_responses_translate import chat

# Azure OpenAI opens a stream with the prompt's filter results, every other field blank.
AZURE_OPENING = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
                 "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}  # fmt: skip
HELLO: list[Any] = [
    AZURE_OPENING,
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
    chunk({}, "stop"),
    USAGE,
    "[DONE]",
]


async def _stored(publisher: FakePublisher, response_id: str) -> Any:
    request_id = parse_response_id(response_id)
    assert request_id is not None
    body = await publisher.body(bodies.key(bodies.RESULT, request_id))
    assert body is not None
    return msgspec.json.decode(body)


async def _streamed(chunks: list[Any]) -> tuple[Response, FakePublisher]:
    """A /v1/responses stream of ``chunks`` read by the SDK: its final response, and where
    the result was stored."""
    publisher = FakePublisher()
    async with (
        ScriptedUpstream(chunks) as upstream,
        serve(upstream.url, FakePool(), publisher) as sdk,
    ):
        async with sdk.responses.stream(model="m", input="hi") as stream:
            return await stream.get_final_response(), publisher


async def test_a_responses_stream_opened_by_a_metadata_chunk_completes() -> None:
    final, publisher = await _streamed(HELLO)
    assert (final.status, final.output_text) == ("completed", "Hello")
    assert final.usage is not None and final.usage.total_tokens == 5
    retrieved = Response.model_validate(await _stored(publisher, final.id))  # what GET reads
    assert (retrieved.status, retrieved.output_text) == ("completed", "Hello")


async def test_a_chat_stream_opened_by_a_metadata_chunk_is_stored_as_a_completion() -> None:
    publisher = FakePublisher()
    async with (
        ScriptedUpstream(HELLO) as upstream,
        serve(upstream.url, FakePool(), publisher) as sdk,
    ):
        chunks = await sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        [chat_id] = {c.id async for c in chunks}
    stored = ChatCompletion.model_validate(await _stored(publisher, chat_id))
    assert stored.choices[0].message.content == "Hello" and stored.model == "m"


async def test_a_responses_stream_answered_whole_upstream_still_streams() -> None:
    rate_limited = (429, {"error": {"message": "slow down", "type": "rate_limit_error"}})
    async with ScriptedUpstream((200, chat()), rate_limited) as upstream:
        async with serve(upstream.url, FakePool(), FakePublisher()) as sdk:
            async with sdk.responses.stream(model="m", input="hi") as stream:
                kinds = [event.type async for event in stream]
                final = await stream.get_final_response()
            # An error answers with its status, streamed or not (as OpenAI's own API does).
            with pytest.raises(openai.RateLimitError):
                await sdk.responses.create(model="m", input="hi", stream=True)
    assert kinds[-1] == "response.completed"
    assert (final.status, final.output_text) == ("completed", "Hello!")
    assert final.usage is not None and final.usage.total_tokens == 16


async def test_a_chat_stream_answered_whole_upstream_still_streams() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    async with ScriptedUpstream((200, chat("Let me see", "tool_calls", [call]))) as upstream:
        async with serve(upstream.url, FakePool(), FakePublisher()) as sdk:
            async with sdk.chat.completions.stream(
                model="m", messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                final = await stream.get_final_completion()
    [choice] = final.choices
    assert final.id.startswith("resp_") and choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me see"
    [made] = choice.message.tool_calls or []
    assert (made.id, made.function.arguments) == ("call_1", '{"a":1}')
    assert final.usage is not None and final.usage.total_tokens == 16


@pytest.mark.parametrize(("status", "code"), [(503, "server_error"), (429, "rate_limit_exceeded")])
async def test_a_stream_failing_half_way_keeps_what_streamed(status: int, code: str) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error", "code": status}}
    failing = [chunk({"role": "assistant", "content": "Hel"}), chunk({"content": "lo"}), error]
    async with ScriptedUpstream(failing) as upstream:
        async with serve(upstream.url, FakePool(), FakePublisher()) as sdk:
            async with sdk.responses.stream(model="m", input="hi") as stream:
                events = [event async for event in stream]
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.output_text == "Hello"
    assert failed.response.error is not None
    assert (failed.response.error.code, failed.response.error.message) == (code, "overloaded")


TEXT, STOP = chunk({"role": "assistant", "content": "Hi"}), chunk({}, "stop")


@pytest.mark.parametrize(
    ("chunks", "kinds"),
    [
        ([TEXT, chunk({"reasoning_content": "hmm"}), STOP], ["message", "reasoning"]),
        ([chunk({"reasoning": {"summary": "hmm"}}), TEXT, STOP], ["message"]),  # not text
    ],
)
async def test_reasoning_streams_wherever_it_comes_and_is_stored_in_stream_order(
    chunks: list[Any], kinds: list[str]
) -> None:
    final, publisher = await _streamed(chunks)
    assert [item.type for item in final.output] == kinds and final.output_text == "Hi"
    retrieved = Response.model_validate(await _stored(publisher, final.id))
    assert [(item.type, getattr(item, "id", None)) for item in retrieved.output] == [
        (item.type, getattr(item, "id", None)) for item in final.output
    ]


@pytest.mark.parametrize(
    ("deltas", "content"),
    [
        ([{"refusal": "I can't"}, {"refusal": " help"}], [("refusal", "I can't help")]),
        ([{"refusal": "No."}, {"content": "Hi"}], [("refusal", "No."), ("output_text", "Hi")]),
    ],
)
async def test_a_refusal_streams_as_it_comes(
    deltas: list[dict[str, Any]], content: list[tuple[str, str]]
) -> None:
    chunks = [chunk(delta) for delta in deltas] + [STOP]
    publisher = FakePublisher()
    async with ScriptedUpstream(chunks, chunks) as upstream:
        async with serve(upstream.url, FakePool(), publisher) as sdk:
            async with await sdk.responses.create(model="m", input="hi", stream=True) as raw:
                events = [event async for event in raw]
            async with sdk.responses.stream(model="m", input="hi") as stream:
                final = await stream.get_final_response()
    deltas_of = {kind: "" for kind, _ in content}
    for event in events:
        if event.type in ("response.output_text.delta", "response.refusal.delta"):
            kind = event.type.split(".")[1]
            assert content[event.content_index][0] == kind
            deltas_of[kind] += event.delta
    assert list(deltas_of.items()) == content
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    retrieved = Response.model_validate(await _stored(publisher, final.id))
    for response in (completed.response, final, retrieved):
        assert _message_parts(response) == content


def _message_parts(response: Response) -> list[tuple[str, str]]:
    """(type, text) of each content part of a response's one message."""
    [message] = response.output
    assert isinstance(message, ResponseOutputMessage)
    return [
        (part.type, part.text if isinstance(part, ResponseOutputText) else part.refusal)
        for part in message.content
    ]
