"""The pure parts of the realtime proxy (§7.2, §8.8): how an upstream error answers, how chat
and Responses streams are relayed, and that a realtime request has one outcome."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec

from cannonade.config import ModelConfig
from projections.api.chat import ChatRelay
from projections.api.proxy import Job, upstream_error
from projections.api.realtime import Recording
from projections.api.responses import ResponsesRelay
from schemas.errors import ApiError
from schemas.events import BatchlessFacts

REQUEST_ID = "3c9a4f1e-7b2d-4e8a-9c6f-1d2e3f4a5b6c"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
JOB = Job(
    request_id=REQUEST_ID,
    model="m",
    config=ModelConfig(),
    facts=BatchlessFacts(
        owner="u",
        path="/v1/chat/completions",
        service_tier="priority",
        created_at=NOW,
        deadline=NOW,
    ),  # fmt: skip
    body=b"{}",
    upstream_path="/v1/chat/completions",
    upstream_body=b"{}",
    success=lambda body: body,
)


def test_an_upstream_envelope_passes_through_as_it_is() -> None:
    envelope = b'{"error":{"message":"no","type":"invalid_request_error","param":"x","code":"bad"}}'
    answer = upstream_error(JOB, 400, envelope)
    assert (answer.status, answer.body) == (400, envelope)


def test_anything_else_is_wrapped_in_the_chat_error_envelope() -> None:
    answer = upstream_error(JOB, 502, b"<html>bad gateway</html>")
    assert answer.status == 502 and isinstance(answer.body, bytes)
    assert msgspec.json.decode(answer.body) == {
        "error": {
            "message": "<html>bad gateway</html>",
            "type": "server_error",
            "param": None,
            "code": 502,
        }
    }
    empty = upstream_error(JOB, 429, b"")
    assert msgspec.json.decode(empty.body)["error"] == {  # type: ignore[arg-type]
        "message": "Upstream returned 429", "type": "rate_limit_error", "param": None, "code": 429,
    }  # fmt: skip


def test_chat_chunks_carry_the_response_id() -> None:
    relay = ChatRelay(REQUEST_ID)
    kept, sent = relay.forward('{"id":"chatcmpl-1","object":"chat.completion.chunk"}')
    assert msgspec.json.decode(kept)["id"] == f"resp_{REQUEST_ID}"
    assert sent == f"data: {kept}\n\n".encode()
    assert relay.forward("[DONE]") == ("[DONE]", b"data: [DONE]\n\n")
    assert relay.opening() == b"" and relay.closing(200, b"{}") == b""
    broken = relay.broken(ApiError(502, "gone"))
    assert msgspec.json.decode(broken.removeprefix(b"data: "))["error"]["message"] == "gone"


def test_a_failed_response_stream_ends_with_response_failed() -> None:
    relay = ResponsesRelay({"model": "m", "input": "x"}, f"resp_{REQUEST_ID}", 0)
    opening = relay.opening()
    assert opening.startswith(b"event: response.created\ndata: ")
    closing = relay.closing(503, b'{"error":{"message":"down","type":"server_error"}}')
    head, _, data = closing.partition(b"\ndata: ")
    assert head == b"event: response.failed"
    event = msgspec.json.decode(data)
    assert event["sequence_number"] == 2  # after created and in_progress
    error = {"type": "server_error", "code": "server_error", "message": "down"}
    assert event["response"]["error"] == error


async def test_the_first_outcome_wins() -> None:
    recording = Recording(JOB)
    recording.complete(499, b"gone")
    recording.complete(200, b"late")
    status, body, _ = await asyncio.wait_for(recording.outcome(), 1)
    assert (status, body) == (499, b"gone")
