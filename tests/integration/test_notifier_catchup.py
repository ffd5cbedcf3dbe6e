"""The notifier names ended batches only once the projector has applied what the batches and
requests topics already hold: a read model being rebuilt from the log shows a batch that was
deleted while it ran as ended and not deleted, until its deletion is projected, and a
notification made then would join the log for good."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from cannonade.config import WebhooksConfig
from compose import stack
from projections import catchup, notifier
from projections.notifier import Notifier
from projections.projector import CONSUMER
from projections.webhook_signing import SecretBox, new_key
from schemas import codec, topics
from schemas.events import BatchRejected
from tests.integration.conftest import own_database, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dsn(stack_info: stack.StackInfo) -> Iterator[str]:
    yield from own_database(stack_info, "notifier_catchup")


class Stamper:
    """Publishes as the projector would apply: the batch's notification stamped at once."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool, self.sent = pool, list[str]()

    async def events(self, topic: topics.Topic, records: Sequence[tuple[str, msgspec.Struct]]) -> None:  # fmt: skip
        for key, _ in records:
            self.sent.append(key)
            await self.pool.execute("UPDATE batches SET notification_sent_at = now() WHERE id = $1", key)  # fmt: skip


async def _notified(dsn: str, bootstrap: str) -> tuple[int, int]:
    """How many batches the notifier names with the projector behind the log, then caught up."""
    now = datetime.now(UTC)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    # A record the projector of this database has not applied: an event of the batches topic
    # like any other (the session's other tests read that topic back, and their projector
    # applies it: a verdict on a batch nobody has).
    rejected = BatchRejected(
        event_id=str(uuid.uuid4()), occurred_at=now, batch_id=str(uuid.uuid4()),
        owner="notifier-catchup", status=400, message="a record for the notifier to wait on",
    )  # fmt: skip
    try:
        await producer.send_and_wait(topics.BATCHES.name, codec.encode(rejected), key=rejected.batch_id.encode())  # fmt: skip
    finally:
        await producer.stop()
    async with asyncpg.create_pool(dsn, min_size=1, max_size=2) as pool:
        await pool.execute(
            "INSERT INTO batches (id, owner, endpoint, completion_window, input_file_id,"
            " created_at, expires_at, requests_started_at, total_requests, completed_at,"
            " finalizing_at, counts_frozen_at, completed_requests, failed_requests,"
            " canceled_requests) VALUES ($1, 'u', '/v1/chat/completions', '24h', $2, $3, $4,"
            " $3, 1, $3, $3, $3, 1, 0, 0)",
            uuid.uuid4(), uuid.uuid4(), now - timedelta(minutes=1), now + timedelta(hours=1),
        )  # fmt: skip
        stamper = Stamper(pool)
        watcher = Notifier(WebhooksConfig(), pool, stamper, bootstrap, SecretBox([new_key()]))  # type: ignore[arg-type]  # fmt: skip
        reader = catchup.offsets_reader(bootstrap)
        await watcher._offsets.start()
        await reader.start()
        try:
            behind = await watcher.notify()
            ends = await catchup.end_offsets(reader, [topics.BATCHES, topics.REQUESTS])
            await pool.executemany(
                "INSERT INTO projection_offsets (consumer, topic, partition, next_offset)"
                " VALUES ($1, $2, $3, $4)",
                [(CONSUMER, topic, partition, end) for (topic, partition), end in ends.items()],
            )
            return behind, await watcher.notify()
        finally:
            await watcher._offsets.stop()
            await reader.stop()


def test_no_batch_is_notified_while_the_projector_is_behind_the_log(
    dsn: str, stack_info: stack.StackInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notifier, "_PROJECTION_WAIT_S", 0.5)
    assert run(_notified(dsn, stack_info.kafka_bootstrap)) == (0, 1)
