"""Reading a topic by offset through one consumer with manual assignment.

Every partition stays paused except while a read holds it, and one partition's reads go one
at a time (a seek must not move under another read); reads of different partitions
interleave. The executor's body reader and the step executors' chain ledger are built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import topics


class PausedReader:
    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._bootstrap = bootstrap
        self._partitions = [TopicPartition(topic, p) for p in range(partitions)]
        self._locks = [asyncio.Lock() for _ in range(partitions)]
        self._consumer: AIOKafkaConsumer | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            # One fetch brings the asked record and enough of the ones after it to read ahead.
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_bytes=topics.MAX_MESSAGE_BYTES,
            fetch_max_wait_ms=5,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        consumer.assign(self._partitions)
        consumer.pause(*self._partitions)
        self._consumer = consumer
        self._ready.set()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    @contextlib.asynccontextmanager
    async def _holding(self, partition: int) -> AsyncIterator[tuple[AIOKafkaConsumer, TopicPartition]]:  # fmt: skip
        """The consumer and ``partition``, this read's alone (still paused) until it ends."""
        await self._ready.wait()
        async with self._locks[partition]:
            assert self._consumer is not None
            yield self._consumer, self._partitions[partition]

    @staticmethod
    @contextlib.contextmanager
    def _resumed(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> Iterator[None]:
        """Fetching ``tp`` from ``offset`` while the block runs; paused again after it."""
        consumer.seek(tp, offset)
        consumer.resume(tp)
        try:
            yield
        finally:
            consumer.pause(tp)
