"""A batch's outcome on a database of its own, fed records by hand in the orders a live run and
a replay may meet them: the batches topic and the requests topic are read independently, so a
cancel and the rows' ends it caused can arrive either way round and must end the same."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from compose import stack
from projections import queries
from schemas import codec, topics
from schemas.events import (
    BatchCancelRequested,
    BatchCreated,
    BatchPopulated,
    BatchRetried,
    PendingItem,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestRetried,
    RequestsPending,
    RequestStarted,
)
from tests.integration.conftest import (
    apply_polls,
    consumer_record,
    own_database,
    requests_record,
    run,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def dsn(stack_info: stack.StackInfo) -> Iterator[str]:
    yield from own_database(stack_info, "batch_projection")


class Batch:
    """Two requests of one batch: the first completes at +2 s; the events a test orders."""

    def __init__(self) -> None:
        self.id = str(uuid.uuid4())
        self.rows = [str(uuid.uuid4()), str(uuid.uuid4())]
        self.offsets: dict[str, int] = {}

    def _record(self, topic: topics.Topic, event: Any) -> ConsumerRecord:
        offset = self.offsets.get(topic.name, 0)
        self.offsets[topic.name] = offset + 1
        if topic is topics.REQUESTS:
            return requests_record(offset, self.id.encode(), event)
        return consumer_record(topic.name, offset, self.id.encode(), codec.encode(event))

    def created(self) -> list[ConsumerRecord]:
        file_id = str(uuid.uuid4())
        made = BatchCreated(
            event_id="c", occurred_at=T0, batch_id=self.id, owner="u", input_file_id=file_id,
            endpoint="/v1/chat/completions", completion_window="24h", metadata=None,
            created_at=T0, expires_at=T0 + timedelta(days=1), output_file_id=str(uuid.uuid4()),
            error_file_id=str(uuid.uuid4()),
        )  # fmt: skip
        pending = RequestsPending(
            event_id="p", occurred_at=T0, batch_id=self.id, file_id=file_id, model="m",
            owner="u", created_at=T0, deadline=T0 + timedelta(days=1), window_class="24h",
            service_tier=None, items=[PendingItem(r, i) for i, r in enumerate(self.rows)],
        )  # fmt: skip
        populated = BatchPopulated(event_id="n", occurred_at=T0, batch_id=self.id, total=2, models={"m": 2})  # fmt: skip
        return [
            self._record(topics.BATCHES, made),
            self._record(topics.REQUESTS, pending),
            self._record(topics.BATCHES, populated),
        ]

    def retried(self, seconds: int) -> list[ConsumerRecord]:
        """Retry the cancelled row (version 1)."""
        at = T0 + timedelta(seconds=seconds)
        batch = BatchRetried(
            event_id="r", occurred_at=at, batch_id=self.id, retry_version=1, scope="batch",
            rows=1, expires_at=at + timedelta(days=1),
        )  # fmt: skip
        row = RequestRetried(
            event_id="q", occurred_at=at, request_id=self.rows[1], batch_id=self.id, model="m",
            from_state="canceled", retry_version=1,
        )  # fmt: skip
        return [self._record(topics.BATCHES, batch), self._record(topics.REQUESTS, row)]

    def completed(self, index: int, seconds: int) -> ConsumerRecord:
        done = RequestCompleted(
            event_id=f"d{index}", occurred_at=T0 + timedelta(seconds=seconds),
            request_id=self.rows[index], batch_id=self.id, model="m", from_state="pending",
            claim_id=None, status=200, size=10, routed_model="m", attempt=1,
        )  # fmt: skip
        return self._record(topics.REQUESTS, done)

    def run_of(self, index: int) -> list[ConsumerRecord]:
        """The row claimed, started and completed: three gate decisions."""
        at, claim = T0 + timedelta(seconds=1), str(uuid.uuid4())
        common: dict[str, Any] = {"request_id": self.rows[index], "batch_id": self.id, "model": "m"}
        return [
            self._record(topics.REQUESTS, RequestClaimed(
                event_id=f"c{index}", occurred_at=at, from_state="pending", claim_id=claim,
                worker_id="gate", attempt=0, **common,
            )),
            self._record(topics.REQUESTS, RequestStarted(
                event_id=f"s{index}", occurred_at=at, from_state="claimed", claim_id=claim,
                worker_id="executor", **common,
            )),
            self._record(topics.REQUESTS, RequestCompleted(
                event_id=f"d{index}", occurred_at=at + timedelta(seconds=1),
                from_state="processing", claim_id=claim, status=200, size=10, routed_model="m",
                attempt=0, **common,
            )),
        ]  # fmt: skip

    def again(self, record: ConsumerRecord) -> ConsumerRecord:
        """The same decision published once more, at the topic's next offset."""
        offset = self.offsets[record.topic]
        self.offsets[record.topic] = offset + 1
        return consumer_record(record.topic, offset, record.key, record.value)

    def cancel(self, seconds: int) -> ConsumerRecord:
        at = T0 + timedelta(seconds=seconds)
        return self._record(topics.BATCHES, BatchCancelRequested(event_id="x", occurred_at=at, batch_id=self.id))  # fmt: skip

    def row_canceled(self, seconds: int) -> ConsumerRecord:
        gone = RequestCanceled(
            event_id="y", occurred_at=T0 + timedelta(seconds=seconds), request_id=self.rows[1],
            batch_id=self.id, model="m", from_state="pending",
        )  # fmt: skip
        return self._record(topics.REQUESTS, gone)


async def _outcome(dsn: str, batch: Batch, *polls: list[ConsumerRecord]) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_polls(conn, *polls)
        row = await conn.fetchrow(
            "SELECT cancelling_at, cancelled_at, finalizing_at, completed_at, failed_at,"
            " completed_requests, canceled_requests, counts_frozen_at FROM batches WHERE id = $1",
            uuid.UUID(batch.id),
        )
        assert row is not None
        return dict(row)
    finally:
        await conn.close()


def test_a_decision_published_again_after_a_gate_crash_holds_no_row_back(dsn: str) -> None:
    """After a crash the gate publishes again a decision whose first copy a poll has already
    applied; however the polls fall around the copy, the row moves on to its end."""
    outcomes = []
    for split in ("copy with the next event", "copy alone"):
        batch = Batch()
        created = batch.created()
        claimed, started, completed = batch.run_of(0)
        copy = batch.again(claimed)
        polls = [[claimed], [copy, started], [completed]]
        if split == "copy alone":
            polls = [[claimed], [copy], [started, completed]]
        outcomes.append(run(_outcome(dsn, batch, created, *polls, [batch.completed(1, 3)])))
    assert outcomes[0]["completed_requests"] == 2
    assert outcomes[0]["completed_at"] == T0 + timedelta(seconds=3)
    assert outcomes[0] == outcomes[1]


def test_a_cancel_met_after_the_rows_it_canceled_still_cancels_the_batch(dsn: str) -> None:
    live, replay = Batch(), Batch()
    in_order = run(_outcome(dsn, live, live.created(), [live.completed(0, 2)], [live.cancel(3)], [live.row_canceled(4)]))  # fmt: skip
    # A replay reads the requests topic to its end first: the batch is finished before the
    # cancel that finished it is met.
    rows_first = run(_outcome(dsn, replay, replay.created(), [replay.completed(0, 2), replay.row_canceled(4)], [replay.cancel(3)]))  # fmt: skip
    assert in_order["cancelled_at"] == T0 + timedelta(seconds=3)
    assert (in_order["completed_at"], in_order["finalizing_at"]) == (None, None)
    assert (in_order["completed_requests"], in_order["canceled_requests"]) == (1, 1)
    assert rows_first == in_order


def test_a_cancel_after_every_row_ended_leaves_the_batch_completed(dsn: str) -> None:
    """Deleting a finished batch (or its input file) cancels nothing, met in either order."""
    live, replay = Batch(), Batch()
    in_order = run(_outcome(dsn, live, live.created(), [live.completed(0, 2), live.completed(1, 3)], [live.cancel(5)]))  # fmt: skip
    cancel_first = run(_outcome(dsn, replay, replay.created(), [replay.cancel(5)], [replay.completed(0, 2), replay.completed(1, 3)]))  # fmt: skip
    assert in_order["completed_at"] == T0 + timedelta(seconds=3)
    assert (in_order["cancelling_at"], in_order["cancelled_at"]) == (None, None)
    assert cancel_first == in_order


def test_a_cancel_the_batch_ended_before_ends_the_cancel_s_wait(dsn: str) -> None:
    """POST .../cancel waits to see its cancel; one that the batch's end beat never shows, and
    the API must see the end instead (it waited its full five minutes, then answered 503)."""

    async def settled(batch: Batch, *polls: list[ConsumerRecord]) -> bool:
        async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool:
            async with pool.acquire() as conn:
                await apply_polls(conn, *polls)
            return await queries.batch_cancelling_or_ended(pool, batch.id)

    ended, running = Batch(), Batch()
    assert run(settled(ended, ended.created(), [ended.completed(0, 2), ended.completed(1, 3)], [ended.cancel(5)]))  # fmt: skip
    assert run(_outcome(dsn, ended))["cancelling_at"] is None  # the cancel did nothing
    assert not run(settled(running, running.created(), [running.completed(0, 2)]))
    assert run(settled(running, [running.cancel(5)]))


def test_replaying_a_cancelled_then_retried_batch_over_its_tables_changes_nothing(dsn: str) -> None:
    """Cancel then retry is pause and resume; the cancel, met again by a replay over the
    tables, belongs to the earlier run and leaves the finished retry completed."""
    batch = Batch()
    log = [*batch.created(), batch.completed(0, 2), batch.cancel(3), batch.row_canceled(4), *batch.retried(5), batch.completed(1, 6)]  # fmt: skip
    once = run(_outcome(dsn, batch, *([record] for record in log)))
    assert (once["completed_at"], once["cancelled_at"]) == (T0 + timedelta(seconds=6), None)
    assert (once["completed_requests"], once["canceled_requests"]) == (2, 0)
    assert run(_outcome(dsn, batch, log)) == once


def test_a_retried_run_finished_before_the_replay_meets_the_cancel_stays_completed(
    dsn: str,
) -> None:
    """A replay that reads the requests topic to its end first finishes the retried run
    before it meets the earlier run's cancel and the retry: the outcome is the live one."""
    live, replay = Batch(), Batch()

    def log(batch: Batch) -> list[ConsumerRecord]:
        return [*batch.created(), batch.completed(0, 2), batch.cancel(3), batch.row_canceled(4), *batch.retried(5), batch.completed(1, 6)]  # fmt: skip

    in_order = run(_outcome(dsn, live, *([record] for record in log(live))))
    records = log(replay)
    created, rest = records[:3], records[3:]
    requests_first = [r for r in rest if r.topic == topics.REQUESTS.name]
    batches_after = [r for r in rest if r.topic == topics.BATCHES.name]
    rebuilt = run(_outcome(dsn, replay, created, requests_first, batches_after))
    assert in_order["completed_at"] == T0 + timedelta(seconds=6)
    assert rebuilt == in_order


def test_every_interleaving_of_a_cancelled_then_resumed_batch_ends_as_the_live_run(dsn: str) -> None:  # fmt: skip
    """The projector reads the batches and the requests topics independently: a replay may meet
    the two in any interleaving of their own orders, and must end where the live run did."""

    def log(batch: Batch) -> list[ConsumerRecord]:
        return [*batch.created(), batch.completed(0, 2), batch.cancel(3), batch.row_canceled(4), *batch.retried(5), batch.completed(1, 6)]  # fmt: skip

    live = Batch()
    in_order = run(_outcome(dsn, live, *([record] for record in log(live))))
    assert in_order["completed_at"] == T0 + timedelta(seconds=6)
    shape = log(Batch())
    positions = [i for i, r in enumerate(shape) if r.topic == topics.BATCHES.name]
    differ = []
    for chosen in itertools.combinations(range(len(shape)), len(positions)):
        replay = Batch()
        records = log(replay)
        own = iter([r for r in records if r.topic == topics.BATCHES.name])
        others = iter([r for r in records if r.topic != topics.BATCHES.name])
        order = [next(own) if i in chosen else next(others) for i in range(len(records))]
        rebuilt = run(_outcome(dsn, replay, *([record] for record in order)))
        if rebuilt != in_order:
            differ.append(([r.topic.split(".")[1][0] for r in order], rebuilt))
    assert differ == []
