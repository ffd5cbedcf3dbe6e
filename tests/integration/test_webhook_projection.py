"""Webhook deliveries on a database of their own, fed records by hand in the orders a replay may
meet them: the compacted webhooks topic holds a deleted endpoint's last record only, and a
replay that reads it before the batches topic must not open the endpoint's deliveries, which
nothing would send or purge."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from compose import stack
from schemas import codec, topics
from schemas.events import BatchNotified, NotifiedDelivery, WebhookEndpoint
from tests.integration.conftest import apply_polls, consumer_record, own_database, run
from tests.integration.test_batch_projection import T0, Batch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dsn(stack_info: stack.StackInfo) -> Iterator[str]:
    yield from own_database(stack_info, "webhook_projection")


def _endpoint(deleted: bool) -> WebhookEndpoint:
    return WebhookEndpoint(
        event_id=str(uuid.uuid4()), occurred_at=T0, webhook_id=str(uuid.uuid4()), owner="u",
        url="https://hooks.example.com/x", name="", event_types=["batch.completed"],
        created_at=T0 - timedelta(days=1), secret=None, secret_hint="whsec_…",
        deleted_at=T0 if deleted else None,
    )  # fmt: skip


async def _open_after(dsn: str, *polls: list[ConsumerRecord]) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_polls(conn, *polls)
        return {str(r["webhook_id"]) for r in await conn.fetch(
            "SELECT d.webhook_id FROM webhook_open o JOIN webhook_deliveries d ON d.id = o.delivery_id"
        )}  # fmt: skip
    finally:
        await conn.close()


def test_a_replay_opens_no_delivery_to_an_endpoint_already_deleted(dsn: str) -> None:
    batch = Batch()
    live, gone = _endpoint(deleted=False), _endpoint(deleted=True)
    endpoints = [
        consumer_record(topics.WEBHOOKS.name, i, e.webhook_id.encode(), codec.encode(e))
        for i, e in enumerate((live, gone))
    ]
    notified = BatchNotified(
        event_id="notified", occurred_at=T0 + timedelta(seconds=4), batch_id=batch.id, owner="u",
        retry_version=0, event_type="batch.completed", notification_id="evt_1",
        terminal_at=T0 + timedelta(seconds=3),
        deliveries=[NotifiedDelivery(str(uuid.uuid4()), e.webhook_id) for e in (live, gone)],
    )  # fmt: skip
    record = consumer_record(topics.BATCHES.name, 99, batch.id.encode(), codec.encode(notified))
    done = [batch.completed(0, 2), batch.completed(1, 3)]
    assert run(_open_after(dsn, endpoints, batch.created(), done, [record])) == {live.webhook_id}
