"""Keeps an agent from skipping an input record that Faust dropped.

Faust could drop a fetched record around a rebalance, never handing it to the agent, and then
commit past it (seen in a fault drill: a gate partition kept across a rebalance lost one
executor report, and the row that report ended stayed ``processing`` until the processing
timeout). :mod:`streams.offset_guard` closes the paths found; this is the backstop for any
other: every agent reads its input through :meth:`Gapless.events`. Per partition, the offsets an
agent takes must follow on from the one it took last or, first after an assignment, from the
committed offset the assignment sought to. Records missing in between are read again from the
broker and handed over first, in order, and acknowledged as Faust would have (a record that
arrives again after that is handed over again: taking an input twice is what every agent
already survives, skipping one is not). A drop is noticed when the next record of its
partition arrives; until then :mod:`streams.offset_guard` keeps the commit from passing it.
Compacted topics are not checked: holes in their offsets are by design. Nor is a partition's
first record when the group has no committed offset for it yet (a new deployment).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.types import TP
from faust.types.tuples import ack_lock

from schemas import topics
from streams import metrics

log = logging.getLogger(__name__)

#: Topics whose offsets follow on without holes (no compaction, no transactions).
CONTIGUOUS = frozenset(t.name for t in topics.ALL if not t.compacted)
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 10.0


class Record(msgspec.Struct, frozen=True):
    """A record read again, with what agents and dead letters read of a Faust message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


Fetch = Callable[[TP, int, int], Awaitable[list[Record]]]  # partition, from, to (excluded)


class Refetched:
    """A dropped record read again, shaped like the Faust event an agent takes."""

    __slots__ = ("message", "key", "value", "_gapless", "_generation")

    def __init__(self, record: Record, gapless: Gapless, generation: int) -> None:
        self.message = record
        self.key, self.value = record.key, record.value
        self._gapless, self._generation = gapless, generation

    def ack(self) -> None:
        self._gapless.acknowledge(self.message, self._generation)


class Gapless:
    def __init__(
        self,
        consumer: Any,
        generation: Callable[[], int],
        fetch: Fetch,
        contiguous: frozenset[str] = CONTIGUOUS,
    ) -> None:
        self._consumer = consumer  # Faust's: committed offsets and acknowledgements
        self._generation = generation  # the consumer group generation now
        self._fetch = fetch
        self._contiguous = contiguous
        self._next: dict[TP, tuple[int, int]] = {}  # partition -> (generation, next offset)

    async def events(self, events: AsyncIterator[Any], *, acks: bool = True) -> AsyncIterator[Any]:  # fmt: skip
        """``events`` (a Faust stream's), with what it dropped read again and handed over in
        its place. ``acks``: Faust acknowledges each event as the agent moves on (else the
        agent acknowledges by hand, records read again included)."""
        async for event in events:
            message = event.message
            if message.topic not in self._contiguous:
                yield event
                continue
            expected = self._expected(message)
            if message.offset > expected:
                # The event held here is not acknowledged yet, so no rebalance can finish
                # (Faust waits for it) while the missing records are read and handed over.
                for record in await self._read(message.tp, expected, message.offset):
                    again = Refetched(record, self, message.generation_id)
                    yield again
                    if acks:
                        again.ack()
            self._next[message.tp] = (message.generation_id, max(expected, message.offset + 1))
            yield event

    def acknowledge(self, record: Record, generation: int) -> None:
        """As Faust acknowledges a message it handed over, so that commits move past it (not
        after the partition was reassigned: the new assignment starts from its commit)."""
        consumer, tp = self._consumer, record.tp
        if self._generation() != generation:
            return
        with ack_lock:
            committed = consumer._committed_offset[tp]
            if committed is None or record.offset >= committed:
                index = consumer._acked_index[tp]
                if record.offset not in index:
                    index.add(record.offset)
                    bisect.insort(consumer._acked[tp], record.offset)

    def _expected(self, message: Any) -> int:
        seen = self._next.get(message.tp)
        if seen is not None and seen[0] == message.generation_id:
            return seen[1]
        # First since an assignment: Faust sought the partition to its committed offset.
        committed = self._consumer._committed_offset.get(message.tp)
        return message.offset if committed is None or committed > message.offset else int(committed)  # fmt: skip

    async def _read(self, tp: TP, start: int, end: int) -> list[Record]:
        log.warning(
            "the consumer dropped %s[%s] offsets %s..%s: reading them again",
            tp.topic, tp.partition, start, end - 1,
        )  # fmt: skip
        backoff = _BACKOFF_FIRST_S
        while True:
            try:
                records = await self._fetch(tp, start, end)
                break
            except (KafkaError, OSError, TimeoutError) as exc:  # the broker away: wait, never skip
                log.warning("could not read %s[%s] again: %r; retrying in %.1fs", tp.topic, tp.partition, exc, backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        metrics.REFETCHED.labels(tp.topic).inc(len(records))
        return records


def broker_fetch(bootstrap: str) -> Fetch:
    """Reads a partition's records in [start, end) with a consumer of its own (no group)."""

    async def fetch(tp: TP, start: int, end: int) -> list[Record]:
        if start >= end:
            return []
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            # Offsets below the log's start were deleted: read from what is left.
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=topics.MAX_MESSAGE_BYTES,
        )
        try:
            await consumer.start()
            part = TopicPartition(tp.topic, tp.partition)
            consumer.assign([part])
            consumer.seek(part, start)
            # Not past the log's end: a log cut short (lost with a broker) must not hold the
            # agent for good.
            stop = min(end, (await consumer.end_offsets([part]))[part])
            records: list[Record] = []
            while await consumer.position(part) < stop:
                for batch in (await consumer.getmany(part, timeout_ms=1000)).values():
                    records += [
                        Record(r.topic, r.partition, r.offset, r.key, r.value)
                        for r in batch
                        if start <= r.offset < end
                    ]
            return records
        finally:
            await _stopped(consumer)

    return fetch


async def _stopped(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        # aiokafka's stop can re-raise the cancellation of its own tasks (one cancelled before
        # it ever ran); a cancellation of this task goes on.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
