"""A single-step response reads with one status however it is asked for: the realtime POST
(§7.8's status from the finish reason), `GET /v1/responses/{id}` (§4.3) and a flex POST
(§7.5), each read by the `openai` SDK."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from projections.api.stored import Stored
from schemas import bodies
from streams.responses.steps import parse_response_id
from tests.unit.api_fakes import FakePool, FakePublisher, ScriptedUpstream, serve
from tests.unit.test_responses_retrieval import sdk_parse
from tests.unit.test_responses_translate import chat

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _row(request_id: str, request: dict[str, Any], response_body: bytes) -> dict[str, Any]:
    """The request's row as the read model shows it once the upstream answered."""
    return {
        "id": request_id, "state": "completed", "model": "m", "created_at": NOW,
        "completed_at": NOW, "failed_at": None, "response_status": 200,
        "response_body": response_body, "error": None, "background": False,
        "body": msgspec.json.encode(request),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("finish", "status"),
    [
        ("stop", "completed"),
        ("length", "incomplete"),
        ("content_filter", "failed"),
        ("tool_calls", "requires_action"),
    ],
)
async def test_get_and_a_flex_post_answer_the_status_the_realtime_post_did(
    finish: str, status: str
) -> None:
    answer = chat("x", finish, [CALL] if finish == "tool_calls" else None)
    pool, publisher = FakePool(), FakePublisher()
    async with ScriptedUpstream((200, answer)) as upstream:
        async with serve(upstream.url, pool, publisher) as sdk:
            posted = await sdk.responses.create(model="m", input="hi")
            request_id = parse_response_id(posted.id)
            assert request_id is not None
            stored = await publisher.body(bodies.key(bodies.RESULT, request_id))
            assert stored is not None
            row = _row(request_id, {"model": "m", "input": "hi"}, stored)
            retrieved = sdk_parse(Stored(row).response())
            pool.head, pool.projected = row, True
            flex = await sdk.responses.create(model="m", input="hi", service_tier="flex")
    assert posted.status == status
    assert (retrieved.status, flex.status) == (status, status)
    assert retrieved.output_text == flex.output_text == posted.output_text
