"""The Faust application of one worker role, and the publishing helpers every agent shares.

Each role (``commands``, ``gate``, ``executor``) is its own Faust app id, hence its own consumer
group and table namespace, so the roles deploy and scale independently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import faust
import mode
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.types import EventT

from cannonade import metrics
from cannonade.config import Config
from schemas import codec, ids, topics
from schemas.bodies import BodyRef
from schemas.events import DeadLetter
from schemas.excluded import Decoder
from schemas.topics import Topic
from streams import fetch_guard, fetch_wait, offset_guard, stop_commit, thread_loop
from streams.emit import Out, TopicRole
from streams.gapless import Gapless, broker_fetch
from streams.metrics import Hooks
from streams.stall_watch import StallWatchdog
from streams.tables import Change, Utf8Keys

log = logging.getLogger(__name__)
T = TypeVar("T")

# A dead letter keeps the head of what it rejected: enough to see what went wrong.
_DEAD_LETTER_PAYLOAD = 64 * 1024
#: What an agent meets when the broker is away rather than when its input is bad: it tries the
#: input again instead of dead-lettering it (Faust wraps a send's KafkaError).
BROKER_AWAY = (KafkaError, ProducerSendError, TimeoutError, OSError)

_ROLE_TOPICS: dict[TopicRole, Topic] = {
    "commands": topics.COMMANDS,
    "files": topics.FILES,
    "batches": topics.BATCHES,
    "requests": topics.REQUESTS,
    "gate": topics.GATE,
    "dispatch": topics.DISPATCH,
    "bodies": topics.BODIES,
    "workers": topics.WORKERS,
    "model_filters": topics.MODEL_FILTERS,
    "responses": topics.RESPONSES,
    "step_work": topics.STEP_WORK,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class App(faust.App):
    """Faust's app, running its ``stopping`` hooks as a stop begins: before Faust waits for
    every input its agents took to be acknowledged, which work acknowledged late (a running
    chain step) would otherwise hold."""

    def __init__(self, *args: Any, stopping: list[Callable[[], None]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stopping = stopping

    async def on_stop(self) -> None:
        for hook in self._stopping:
            hook()
        await super().on_stop()


class Streams:
    """A Faust app, and how its agents bind catalog topics and publish."""

    def __init__(self, role: str, config: Config) -> None:
        fetch_wait.install()
        fetch_guard.install()
        offset_guard.install()
        stop_commit.install()
        thread_loop.install()
        self.config = config
        #: Called as the worker begins to stop, before Faust waits for acknowledgements.
        self.stopping: list[Callable[[], None]] = []
        self.app = App(
            f"cannonade-{role}",
            stopping=self.stopping,
            broker=f"kafka://{config.kafka}",
            processing_guarantee="at_least_once",
            key_serializer="raw",
            value_serializer="raw",
            web_enabled=False,
            datadir=str(Path(config.data_dir) / role),
            store="memory://",
            topic_partitions=topics.GATE_PARTITIONS,
            producer_max_request_size=topics.MAX_MESSAGE_BYTES,
            consumer_max_fetch_size=topics.MAX_MESSAGE_BYTES,
            consumer_auto_offset_reset="earliest",
            # Records produced within a millisecond share one request to the broker.
            producer_linger_ms=1,
            # aiokafka keeps one produce request in flight per broker; while it is, a send to a
            # partition whose batch is full waits for that batch to go (16 KiB by default). Under
            # load an executor's report waited so behind its result bodies (bench.claim_gate:
            # report built -> appended p99 28-44 ms; 14-34 ms with 1 MiB batches).
            producer_max_batch_size=1024 * 1024,
            # No warm copies of other workers' tables: a new owner recovers from the
            # changelog, which holds live work only. Reading standby changelogs cost CPU and,
            # measured under saturation, stalled a worker's lone busy partition ~3 s at a time.
            table_standby_replicas=0,
            broker_commit_interval=1.0,
            # A dead worker's partitions move after this long; Faust's default is 60 s.
            broker_session_timeout=10.0,
            broker_heartbeat_interval=1.0,
        )
        self.metrics = Hooks(config.models)
        # Services the agents need beside them in the worker (their stall watchdogs).
        self.services: list[mode.ServiceT] = []
        self._gapless: Gapless | None = None

    def events(self, events: AsyncIterator[Any], *, acks: bool = True) -> AsyncIterator[Any]:
        """An agent's stream events (``stream.events()``), none of them skipped: what the
        consumer dropped is read again (:mod:`streams.gapless`). ``acks``: False for a
        ``noack`` stream, whose agent acknowledges by hand."""
        if self._gapless is None:
            app = self.app
            self._gapless = Gapless(
                app.consumer, lambda: app.consumer_generation_id, broker_fetch(self.config.kafka)
            )
        return self._gapless.events(events, acks=acks)

    def bind(self, topic: Topic) -> faust.TopicT:
        return self.app.topic(
            topic.name,
            key_type=bytes,
            value_type=bytes,
            partitions=topic.partitions,
            internal=False,
        )

    def watch_stalls(self, source: faust.TopicT) -> StallWatchdog:
        """A watchdog that ends the worker if its agent over ``source`` stops taking what
        arrives; the agent reports each record it takes to the watchdog's ``took``."""
        watch = StallWatchdog(self.app, source.topics)
        self.services.append(watch)
        return watch

    async def publish(self, outs: Sequence[Out], *, wait: bool = False) -> None:
        """Send in order; with ``wait``, also wait for every acknowledgement.

        Inside an agent there is no need to wait: Faust flushes its producer before it commits
        the source offset, so an event is never committed ahead of what it published (at least
        once). Work that runs outside the stream (executor tasks) waits."""
        futures = await self.send(outs)
        if wait:
            await asyncio.gather(*futures)

    async def send(self, outs: Sequence[Out]) -> list[Awaitable[Any]]:
        """Hand ``outs`` to the producer in order; each future resolves when the broker has
        its record. Records go straight to the app's producer: a Faust ``Topic.send`` would
        hold them until the source offset commits (a commit interval on every hop) unless
        forced, and costs more CPU per record than the rest of a gate decision."""
        send = self.app.producer.send
        return [
            await send(_ROLE_TOPICS[o.topic].name, o.key.encode(), _value(o), o.partition, None, None)
            for o in outs
        ]  # fmt: skip

    async def write_bodies(self, records: Sequence[tuple[str, bytes, int]]) -> list[BodyRef]:
        """Write (key, value, partition) records to the bodies topic and return where each
        landed, once acknowledged: events refer to bodies by these refs."""
        send, name = self.app.producer.send, topics.BODIES.name
        futures = [
            await send(name, key.encode(), value, partition, None, None)
            for key, value, partition in records
        ]
        landed = await asyncio.gather(*futures)
        return [BodyRef(m.partition, m.offset) for m in landed]

    async def send_changelog(self, partition: int, *tables: Utf8Keys) -> None:
        """Send the changelog records the tables' writes queued, to the partition of the event
        that made them, as Faust's own path would; an agent calls it once per event."""
        for keys in tables:
            await self.send_changes(keys, partition, keys.changes)
            keys.changes = []  # only once all went: after a failed send they go again

    async def send_changes(self, keys: Utf8Keys, partition: int, changes: list[Change]) -> None:
        """Send changelog records ``keys`` queued earlier (:meth:`Utf8Keys.take`)."""
        if changes:
            send, topic = self.app.producer.send, keys.table.changelog_topic.get_topic_name()
            for key, value in changes:
                await send(topic, key, value, partition, None, None)
            keys.sent(partition, changes)

    async def dead_letter(self, event: EventT[Any], reason: str, kind: str | None = None) -> None:
        """Record a message the agent cannot apply, with the reason, and go on. User content
        stays off the dead-letter topic: a body record is named by its key only. ``kind``
        classes the reason for metrics where its text cannot."""
        message = event.message
        key = message.key.decode("utf-8", "replace") if isinstance(message.key, bytes) else None
        value = message.value if isinstance(message.value, bytes) else b""
        payload = b"" if message.topic == topics.BODIES.name else value[:_DEAD_LETTER_PAYLOAD]
        letter = DeadLetter(
            event_id=ids.event_id("dead-letter", message.topic, message.partition, message.offset),
            occurred_at=utcnow(),
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=key,
            reason=reason,
            payload=bytes(payload).decode("utf-8", "replace"),
        )
        log.warning(
            "dead letter from %s[%s]@%s: %s",
            message.topic,
            message.partition,
            message.offset,
            reason,
        )
        await self.app.producer.send(topics.DEADLETTER.name, message.key, codec.encode(letter), None, None, None)  # fmt: skip
        metrics.dead_letter(message.topic, reason, kind)


def _value(out: Out) -> bytes | None:
    value = out.value
    return value if value is None or isinstance(value, bytes) else codec.encode(value)


def decode_or_none(decoder: Decoder[T], raw: object) -> tuple[T, None] | tuple[None, str]:
    """Decode a Kafka value; returns ``(value, None)`` or ``(None, reason)``."""
    if not isinstance(raw, bytes):
        return None, "empty or non-bytes payload"
    try:
        return decoder.decode(raw), None
    except codec.DecodeErrors as exc:
        return None, f"invalid message: {exc}"
