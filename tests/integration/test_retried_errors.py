"""A retried request's error is its last failure's, in whatever order the projector meets the
requests and bodies topics: an upstream failure's envelope travels on the bodies topic, an
engine-made one inside its `RequestFailed`, and a replay may read either topic ahead of the
other (replaying the log must rebuild the same read model)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from compose import stack
from projections import queries
from schemas import bodies, topics
from schemas.events import (
    RequestClaimed,
    RequestEvent,
    RequestFailed,
    RequestRetried,
    RequestStarted,
)
from tests.integration.conftest import (
    apply_polls,
    consumer_record,
    flex_created,
    own_database,
    requests_record,
    run,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)
UPSTREAM = b'{"error":{"message":"upstream said no"}}'
ENGINE = '{"error":{"message":"the engine could not build the request"}}'


@pytest.fixture(scope="module")
def dsn(stack_info: stack.StackInfo) -> Iterator[str]:
    yield from own_database(stack_info, "retried_errors")


class Flex:
    """One flex request's records: two runs, the second after an explicit retry."""

    def __init__(self) -> None:
        self.id = str(uuid.uuid4())
        self.offset = 0

    def events(self, *events: RequestEvent) -> ConsumerRecord:
        self.offset += 1
        return requests_record(self.offset, b"m", *events)

    def created(self) -> ConsumerRecord:
        return self.events(flex_created(self.id, T0))

    def run(self, *, engine_error: str | None, after_retry: bool) -> ConsumerRecord:
        """Claimed, started and failed: upstream (its envelope on the bodies topic) or by
        the engine (the envelope in the event)."""
        common: dict[str, Any] = {
            "occurred_at": T0,
            "request_id": self.id,
            "batch_id": None,
            "model": "m",
        }
        claim = str(uuid.uuid4())
        events: list[RequestEvent] = []
        if after_retry:
            events.append(RequestRetried(event_id=f"r{self.offset}", from_state="failed", **common))  # fmt: skip
        events += [
            RequestClaimed(event_id=f"c{self.offset}", from_state="pending", claim_id=claim, worker_id="g", attempt=0, **common),  # fmt: skip
            RequestStarted(event_id=f"s{self.offset}", from_state="claimed", claim_id=claim, worker_id="x", **common),  # fmt: skip
            RequestFailed(
                event_id=f"f{self.offset}", from_state="processing", claim_id=claim,
                error_type="RequestBuilderError" if engine_error else "NonRetriableHttpStatus",
                status=None if engine_error else 500,
                size=len(engine_error or UPSTREAM), attempt=0, error=engine_error, **common,
            ),
        ]  # fmt: skip
        return self.events(*events)

    def upstream_body(self) -> ConsumerRecord:
        return consumer_record(topics.BODIES.name, 0, bodies.key(bodies.ERROR, self.id).encode(), UPSTREAM)  # fmt: skip


async def _error(dsn: str, flex: Flex, *polls: list[ConsumerRecord]) -> bytes | None:
    """The error the API shows for the request once the polls are applied."""
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
        async with pool.acquire() as conn:
            await apply_polls(conn, *polls)
        row = await queries.batchless_request(pool, flex.id, "u")
    assert row is not None and row["state"] == "failed"
    return None if row["error"] is None else bytes(row["error"])


@pytest.mark.parametrize("order", ["as it happened", "bodies read last", "bodies read first"])
@pytest.mark.parametrize(
    ("first_engine", "second_engine", "shown"),
    [
        (None, ENGINE, ENGINE.encode()),  # an engine failure after an upstream one
        (ENGINE, None, UPSTREAM),  # an upstream failure after an engine one
    ],
)
def test_a_retried_request_shows_its_last_failure_s_envelope(
    dsn: str, order: str, first_engine: str | None, second_engine: str | None, shown: bytes
) -> None:
    flex = Flex()
    created, first = flex.created(), flex.run(engine_error=first_engine, after_retry=False)
    second, body = flex.run(engine_error=second_engine, after_retry=True), flex.upstream_body()
    # as it happened, the upstream body lands right after the run that failed upstream
    happened = [[created, first], [body], [second]] if first_engine is None else [[created, first], [second], [body]]  # fmt: skip
    polls = {
        "as it happened": happened,
        "bodies read last": [[created, first, second], [body]],
        "bodies read first": [[body], [created, first, second]],
    }[order]
    assert run(_error(dsn, flex, *polls)) == shown
