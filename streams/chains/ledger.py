"""What the chain log says of a step: read from ``cannonade.responses.v1`` by offset range.

The step executor keeps no table: before it runs a step it reads the chain log's partition
of that step (the work topic is co-partitioned with it: same key, same partition count) from
a little before the work item's time to the current end, and looks for the step's start and
end and for its chain's finalisation. Whatever was acknowledged on the log before the read
began is seen, so a step some worker started before dying is never fired again.

One consumer with manual assignment serves every partition; what it read is kept per
partition and extended on the next question, so steady work costs one short fetch.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import codec, topics
from schemas.events import ResponseFinalized, StepCompleted, StepFailed, StepStarted
from streams.chains.runner import StepStatus
from streams.paused_reader import PausedReader

log = logging.getLogger(__name__)

_MAX_REMEMBERED = 200_000  # facts per partition before the window restarts


class _Window:
    """What one partition said from ``start`` up to ``end`` (exclusive)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.end = start
        self.started: set[str] = set()
        self.finished: set[str] = set()
        self.over: set[str] = set()

    def size(self) -> int:
        return len(self.started) + len(self.finished) + len(self.over)


class KafkaLedger(PausedReader):
    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str = topics.RESPONSES.name,
        partitions: int = topics.RESPONSES.partitions,
        fetch_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(bootstrap, topic, partitions)
        self._windows: dict[int, _Window] = {}
        self._fetch_timeout_s = fetch_timeout_s

    async def status(
        self, partition: int, response_id: str, step_id: str, since: datetime
    ) -> StepStatus:
        async with self._holding(partition) as (consumer, tp):
            found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000)})
            end = (await consumer.end_offsets([tp]))[tp]
            start = end if found.get(tp) is None else found[tp].offset
            window = self._windows.get(partition)
            if window is None or start < window.start or window.size() > _MAX_REMEMBERED:
                window = self._windows[partition] = _Window(start)
            await self._extend(consumer, tp, window, end)
        if response_id in window.over or step_id in window.finished:
            return StepStatus.CHAIN_OVER if response_id in window.over else StepStatus.FINISHED
        if step_id in window.started:
            return StepStatus.STARTED
        return StepStatus.UNSEEN

    async def _extend(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, window: _Window, end: int
    ) -> None:
        if window.end >= end:
            return
        with self._resumed(consumer, tp, window.end):
            async with asyncio.timeout(self._fetch_timeout_s):
                while window.end < end:
                    batch = await consumer.getmany(tp, timeout_ms=500)
                    for record in batch.get(tp, []):
                        _fold(window, record.value)
                        window.end = record.offset + 1
                    # Compaction or aborted transactions can leave gaps: trust the position.
                    window.end = max(window.end, await consumer.position(tp))


def _fold(window: _Window, value: bytes | None) -> None:
    if value is None:
        return
    try:
        event = codec.chain_events.decode(value)
    except codec.DecodeErrors:
        return  # the chain agent dead-letters it; it says nothing about steps
    if isinstance(event, StepStarted):
        window.started.add(event.step_id)
    elif isinstance(event, StepCompleted | StepFailed):
        window.finished.add(event.step_id)
    elif isinstance(event, ResponseFinalized):
        window.over.add(event.response_id)
