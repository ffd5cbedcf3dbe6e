"""Template bodies, read by offset from the compacted bodies topic.

A dispatch names its body by :class:`schemas.bodies.BodyRef`; the executor fetches that record
(and, while it is at it, the records after it: the next chunks of the same file, which the
next dispatches will want) and keeps decoded chunks in a bounded cache. The write path thus
never waits on the read model, and erased content (a tombstoned, compacted record) reads as
gone rather than stale.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Protocol

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from schemas import bodies, topics
from schemas.bodies import BodyRef, TemplateChunk
from streams.paused_reader import PausedReader


class Template(msgspec.Struct, frozen=True):
    custom_id: str | None
    body: bytes


class BodyGone(Exception):
    """The body's record is not on the topic any more (erased), or never was (a bad ref)."""


class BodyUnavailable(TimeoutError):
    """The broker did not hand the body's record over in time, though the topic has it: a
    broker away for a while, not a bad ref."""


class BodySource(Protocol):
    async def template(self, ref: BodyRef) -> Template: ...


_Decoded = TemplateChunk | bytes
# Read whole: batchless request bodies, and the chain steps' payloads (step executors and the
# chain agent read those by ref too).
_RAW_KINDS = frozenset(
    {bodies.TEMPLATE, bodies.STEP_REQUEST, bodies.STEP_RESULT, bodies.STEP_ERROR}
)


class BodyReader(PausedReader):
    """Random access to template bodies, decoded chunks kept in a bounded cache."""

    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str = topics.BODIES.name,
        partitions: int = topics.BODIES.partitions,
        cache_bytes: int = 64 * 1024 * 1024,
        fetch_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(bootstrap, topic, partitions)
        # (partition, offset) -> (decoded record, its size on the topic)
        self._cache: OrderedDict[tuple[int, int], tuple[_Decoded, int]] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._fetch_timeout_s = fetch_timeout_s

    async def template(self, ref: BodyRef) -> Template:
        cached = self._cache.get((ref.partition, ref.offset))
        if cached is None:
            record = await self._fetch(ref.partition, ref.offset)
        else:
            record = cached[0]
            self._cache.move_to_end((ref.partition, ref.offset))
        if isinstance(record, bytes):
            return Template(None, record)
        if not 0 <= ref.index < len(record.lines):
            raise BodyGone(f"line {ref.index} is not in the chunk at {ref.partition}@{ref.offset}")
        line = record.lines[ref.index]
        return Template(line.custom_id, bytes(line.body))

    async def _fetch(self, partition: int, offset: int) -> _Decoded:
        async with self._holding(partition) as (consumer, tp):
            found = self._cache.get((partition, offset))
            if found is not None:
                return found[0]
            try:
                with self._resumed(consumer, tp, offset):
                    async with asyncio.timeout(self._fetch_timeout_s):
                        while True:
                            batch = await consumer.getmany(tp, timeout_ms=1000)
                            records = batch.get(tp, [])
                            if records:
                                break
            except TimeoutError:
                if await self._beyond_end(consumer, tp, offset):
                    raise BodyGone(f"no record at {partition}@{offset}") from None
                raise BodyUnavailable(
                    f"the broker did not hand over {partition}@{offset} within"
                    f" {self._fetch_timeout_s:g} s"
                ) from None
            for record in records:
                self._remember(partition, record.offset, record.key, record.value)
            found = self._cache.get((partition, offset))
            if found is None:
                # Offsets survive compaction: a missing one was tombstoned and cleaned away.
                raise BodyGone(f"the body at {partition}@{offset} was erased")
            return found[0]

    async def _beyond_end(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> bool:  # fmt: skip
        """Whether the partition ends at or before ``offset`` (so it never held the record);
        False when the broker does not say."""
        try:
            async with asyncio.timeout(self._fetch_timeout_s):
                end = (await consumer.end_offsets([tp]))[tp]
        except (TimeoutError, KafkaError):
            return False
        return bool(offset >= end)

    def _remember(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:  # fmt: skip
        if key is None or value is None or (partition, offset) in self._cache:
            return
        kind = key.split(b":", 1)[0].decode("ascii", "replace")
        if kind == bodies.CHUNK:
            decoded: _Decoded = bodies.chunk_decoder.decode(value)
        elif kind in _RAW_KINDS:
            decoded = value
        else:
            return  # results share the partitions; executors never read them
        self._cache[(partition, offset)] = (decoded, len(value))
        self._cached += len(value)
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, (_, size) = self._cache.popitem(last=False)
            self._cached -= size
