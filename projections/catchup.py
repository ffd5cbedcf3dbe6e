"""Whether the projector has applied everything already on some topics: taken as the topics'
end offsets now, compared with the offsets the projector stores with its rows.

Erasure reads what a user owns only once everything published before it began is projected;
the notifier claims deliveries only once every attempt already recorded is projected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from projections.projector import CONSUMER
from schemas.topics import Topic

Ends = dict[tuple[str, int], int]


def offsets_reader(bootstrap: str) -> AIOKafkaConsumer:
    """A consumer that only asks for end offsets (no group, nothing assigned); start it."""
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)


async def end_offsets(reader: AIOKafkaConsumer, topics: Sequence[Topic]) -> Ends:
    ends = await reader.end_offsets(
        [TopicPartition(t.name, p) for t in topics for p in range(t.partitions)]
    )
    return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}


async def until_projected(
    db: asyncpg.Pool | asyncpg.Connection, ends: Ends, timeout_s: float, consumer: str = CONSUMER
) -> bool:
    """Wait (at most ``timeout_s``) until the projector has passed ``ends``; False if it has
    not by then."""
    ends = {k: v for k, v in ends.items() if v > 0}
    names = sorted({topic for topic, _ in ends})
    deadline = time.monotonic() + timeout_s
    while True:
        stored = {
            (r["topic"], r["partition"]): r["next_offset"]
            for r in await db.fetch(
                "SELECT topic, partition, next_offset FROM projection_offsets"
                " WHERE consumer = $1 AND topic = ANY($2::text[])",
                consumer,
                names,
            )
        }
        if all(stored.get(k, 0) >= end for k, end in ends.items()):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
