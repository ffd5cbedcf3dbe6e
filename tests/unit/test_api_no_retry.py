"""Once a request's work has started (a tool chain, a background call), an error answer says
`x-should-retry: false`: the `openai` SDK retries a 5xx by sending the request again, which
would run the work again under a new id."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from schemas.events import RequestCreated
from tests.unit.api_fakes import FakePool, FakePublisher, serve

TOOLS: Any = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
TIMED_OUT = {"type": "executor_error", "message": "executor error: tool 'get_weather' timed out"}


@pytest.mark.parametrize(
    ("failed", "background", "status"),
    [
        (True, False, 502),  # the chain failed
        (False, False, 504),  # the chain outlasted the wait
        (False, True, 503),  # the head row was not projected in time
    ],
)
async def test_a_tool_chain_that_failed_is_not_started_again(
    failed: bool, background: bool, status: int
) -> None:
    pool, publisher = FakePool(), FakePublisher()
    if failed:
        pool.chain_failed(TIMED_OUT)
    async with serve("http://127.0.0.1:9", pool, publisher, wait_s=0.05, max_retries=1) as sdk:
        with pytest.raises(openai.APIStatusError) as raised:
            await sdk.responses.create(
                model="m", input="weather?", tools=TOOLS, background=background
            )
    assert raised.value.status_code == status
    assert len(publisher.chains) == 1


async def test_a_background_call_whose_row_is_late_is_not_sent_again() -> None:
    pool, publisher = FakePool(), FakePublisher()
    async with serve("http://127.0.0.1:9", pool, publisher, wait_s=0.05, max_retries=1) as sdk:
        with pytest.raises(openai.APIStatusError) as raised:
            await sdk.responses.create(model="m", input="hi", background=True)
    assert raised.value.status_code == 503
    created = [e for r in publisher.records for e in r.events if isinstance(e, RequestCreated)]
    assert len(created) == 1
