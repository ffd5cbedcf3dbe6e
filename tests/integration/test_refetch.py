"""Reading dropped input records again from the real broker (streams.gapless.broker_fetch)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer
from faust.types import TP

from compose import stack
from schemas import codec, ids, topics
from schemas.events import WorkerHeartbeat
from streams.gapless import broker_fetch

pytestmark = pytest.mark.integration


async def test_a_range_of_a_partition_is_read_again_exactly(stack_info: stack.StackInfo) -> None:
    # Heartbeats of a worker no one runs: well-formed records the gates read and forget.
    sent = [
        codec.encode(
            WorkerHeartbeat(
                event_id=ids.new_id(),
                occurred_at=datetime.now(UTC),
                worker_id=f"refetch-probe-{n}",
                role="executor",
            )
        )  # fmt: skip
        for n in range(4)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=stack_info.kafka_bootstrap)
    await producer.start()
    try:
        # One record batch, so the four land side by side whoever else writes to the partition
        # (the services of the shared stack do).
        batch = producer.create_batch()
        for value in sent:
            assert batch.append(key=b"refetch", value=value, timestamp=None) is not None
        landed = await (await producer.send_batch(batch, topics.GATE.name, partition=1))
    finally:
        await producer.stop()
    first = landed.offset

    fetch = broker_fetch(stack_info.kafka_bootstrap)
    # The middle two: the bounds of the range are kept exactly, whatever lies beside it.
    records = await fetch(TP(topics.GATE.name, 1), first + 1, first + 3)
    assert [(r.offset, r.key, r.value) for r in records] == [
        (first + 1, b"refetch", sent[1]),
        (first + 2, b"refetch", sent[2]),
    ]
    assert await fetch(TP(topics.GATE.name, 1), first + 4, first + 4) == []
    # A range reaching past the log's end reads what is there and returns (a log cut short
    # must not hold an agent for good); the gates' own records may follow ours.
    tail = await fetch(TP(topics.GATE.name, 1), first + 2, first + 10_000)
    assert [(r.offset, r.value) for r in tail[:2]] == [(first + 2, sent[2]), (first + 3, sent[3])]
    assert [r.offset for r in tail] == list(range(first + 2, first + 2 + len(tail)))
