"""The projector: Kafka topics → PostgreSQL read models.

One consumer reads every projected topic. Each poll becomes one transaction that writes every
row it touches in set-based statements (:mod:`projections.writers`) and the next offsets of
every partition it read, so a restarted projector resumes exactly where the last commit ended,
and a replay from offset zero rebuilds the same tables.

Nothing stops it for good:

- a record it cannot apply (undecodable, refused by the state machine, or refused by
  PostgreSQL) is dead-lettered with the reason, and the rest of the poll is applied — a poll
  that fails is retried record by record, each in its own savepoint, to find the culprit;
- when PostgreSQL or Kafka goes away it reconnects with backoff and resumes from the offsets
  stored with the data.

It is ready (:meth:`Projector.check`) while its session runs, the broker has answered a fetch
lately, and it trails its topics by at most ``observability.ready_max_lag`` records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from cannonade import health, heap
from cannonade import metrics as shared_metrics
from cannonade.config import Config
from projections import metrics, writers
from projections.fetch_pacing import FetchPacing, set_fetch_min_bytes
from schemas import codec, ids, topics
from schemas.events import DeadLetter

log = logging.getLogger(__name__)

CONSUMER = "projector"
TOPICS = (
    topics.FILES, topics.BODIES, topics.BATCHES, topics.REQUESTS, topics.MODEL_FILTERS,
    topics.WORKERS, topics.KEYS, topics.RESPONSES, topics.WEBHOOKS, topics.WEBHOOK_DELIVERIES,
)  # fmt: skip
MAX_RECORDS = 5000
LAG_INTERVAL_S = 1.0  # between lag measurements
# No fetch answered for this long: the broker is away (fetches return every 20 ms otherwise).
FETCH_STALE_S = 10.0
_PAYLOAD_HEAD = 64 * 1024
# Errors that mean "the database is not there right now", as opposed to "this record is bad".
_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
)


class Projector:
    def __init__(
        self, dsn: str, bootstrap: str, consumer_name: str = CONSUMER, *, max_lag: int = 10_000
    ) -> None:
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.name = consumer_name
        self.max_lag = max_lag
        self._stop = asyncio.Event()
        # Records behind per topic, and when a fetch last answered (epoch s); None while no
        # session runs or before its first measurement.
        self.lag: dict[str, int] | None = None
        self.fetched_at = 0.0
        self._stored: dict[TopicPartition, int] = {}  # next offsets saved with the data

    async def check(self) -> str | None:
        """Readiness: None when caught up enough to serve, else why not."""
        if self.lag is None:
            return "not connected to Kafka and PostgreSQL yet"
        if time.time() - self.fetched_at > FETCH_STALE_S:
            return f"no answer from Kafka for {time.time() - self.fetched_at:.0f}s"
        behind = sum(self.lag.values())
        if behind > self.max_lag:
            return f"{behind} records behind (ready at {self.max_lag} or fewer)"
        return None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Project until stopped, reconnecting with backoff whenever a dependency fails."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                await self._session()
                backoff = 0.5
            except _CONNECTION_ERRORS as exc:
                log.warning("projector lost a connection (%r); retrying in %.1fs", exc, backoff)
            except Exception:
                log.exception("projector failed; retrying in %.1fs", backoff)
            if self._stop.is_set():
                return
            try:
                await asyncio.wait_for(self._stop.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, 10.0)

    async def _session(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            max_partition_fetch_bytes=topics.MAX_MESSAGE_BYTES,
            fetch_max_bytes=64 * 1024 * 1024,
            fetch_max_wait_ms=20,  # how long a fetch may wait for its minimum (FetchPacing)
            # A fetch offset out of range (a partition truncated or recreated) resumes from the
            # oldest record there is, never from the end: skipping is the one thing a
            # projector must not do, and re-reading is idempotent.
            auto_offset_reset="earliest",
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            max_request_size=topics.MAX_MESSAGE_BYTES,
        )
        try:
            await consumer.start()
            await producer.start()
            partitions = await self._assign(consumer, conn)
            log.info("projector resumed")
            measured = 0.0
            pacing = FetchPacing(time.monotonic())
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=MAX_RECORDS)
                count = sum(len(part) for part in batch.values())
                set_fetch_min_bytes(consumer, pacing.observed(count, time.monotonic()))
                if batch:
                    await self._apply(conn, producer, batch)
                if time.monotonic() - measured >= LAG_INTERVAL_S:
                    positions = {tp: await consumer.position(tp) for tp in partitions}
                    if not batch:
                        await self._pass_gaps(conn, positions)
                    self._measure_lag(consumer, positions)
                    measured = time.monotonic()
        finally:
            self.lag = None
            await _quietly(consumer.stop())
            await _quietly(producer.stop())
            await _quietly(conn.close())

    async def _assign(
        self, consumer: AIOKafkaConsumer, conn: asyncpg.Connection
    ) -> list[TopicPartition]:
        """Own every partition; resume each from the offset stored with the data."""
        partitions = [TopicPartition(t.name, p) for t in TOPICS for p in range(t.partitions)]
        consumer.assign(partitions)
        stored = {
            (r["topic"], r["partition"]): r["next_offset"]
            for r in await conn.fetch(
                "SELECT topic, partition, next_offset FROM projection_offsets WHERE consumer = $1",
                self.name,
            )
        }
        self._stored = {}
        for tp in partitions:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
                self._stored[tp] = offset
        return partitions

    async def _pass_gaps(self, conn: asyncpg.Connection, positions: dict[TopicPartition, int]) -> None:  # fmt: skip
        """On an idle poll, store positions that moved past offsets with no record left
        (compacted or expired away): nothing there is applied, so the stored offset would never
        reach the end, and waits on the projection (erasure, the notifier) and the lag would
        wait on records that do not exist."""
        ahead = [(tp, at) for tp, at in positions.items() if at > self._stored.get(tp, 0)]
        if ahead:
            await self._store(conn, ahead)

    def _measure_lag(self, consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int]) -> None:  # fmt: skip
        """Records behind per topic, from the high watermarks the fetches bring; unknown until
        every partition has been fetched once."""
        lag = dict.fromkeys((t.name for t in TOPICS), 0)
        fetched_ms = 0
        for tp, position in positions.items():
            high, at = consumer.highwater(tp), consumer.last_poll_timestamp(tp)
            if high is None or at is None:
                return
            lag[tp.topic] += max(0, high - position)
            fetched_ms = max(fetched_ms, at)
        self.lag, self.fetched_at = lag, fetched_ms / 1000
        metrics.projector_lag(lag)

    async def _apply(
        self,
        conn: asyncpg.Connection,
        producer: AIOKafkaProducer,
        batch: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        records = [r for rs in batch.values() for r in rs]
        started = time.perf_counter()
        counts = Counter[str]()
        for tp, rs in batch.items():
            counts[tp.topic] += len(rs)
        try:
            async with conn.transaction():
                applied = await writers.apply(conn, records)
                await self._dead_letter(producer, applied.rejected)
                await _tombstone(producer, applied.tombstones)
                await self._save_offsets(conn, batch)
                await notify_waiters(conn, applied.settled)
            metrics.projector_applied(counts, time.perf_counter() - started)
            return
        except _CONNECTION_ERRORS:
            raise
        except asyncpg.PostgresError as exc:
            log.warning(
                "a poll of %d records failed (%r); isolating the culprit", len(records), exc
            )
        # Record by record, each in a savepoint: the good ones apply, the bad one is named.
        async with conn.transaction():
            rejected: writers.Rejected = []
            settled: set[str] = set()
            tombstones: list[tuple[bytes, int]] = []
            for record in records:
                try:
                    async with conn.transaction():
                        applied = await writers.apply(conn, [record])
                        rejected += applied.rejected
                        settled |= applied.settled
                        tombstones += applied.tombstones
                except _CONNECTION_ERRORS:
                    raise
                except asyncpg.PostgresError as exc:
                    rejected.append((record, f"the read model refused it: {exc}"))
            await self._dead_letter(producer, rejected)
            await _tombstone(producer, tombstones)
            await self._save_offsets(conn, batch)
            await notify_waiters(conn, settled)
        metrics.projector_applied(counts, time.perf_counter() - started)

    async def _save_offsets(
        self, conn: asyncpg.Connection, batch: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        await self._store(conn, [(tp, rs[-1].offset + 1) for tp, rs in batch.items()])

    async def _store(self, conn: asyncpg.Connection, offsets: list[tuple[TopicPartition, int]]) -> None:  # fmt: skip
        await conn.executemany(
            "INSERT INTO projection_offsets (consumer, topic, partition, next_offset)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, topic, partition)"
            " DO UPDATE SET next_offset = EXCLUDED.next_offset",
            [(self.name, tp.topic, tp.partition, offset) for tp, offset in offsets],
        )
        self._stored.update(offsets)

    async def _dead_letter(
        self, producer: AIOKafkaProducer, rejected: Sequence[tuple[ConsumerRecord, str]]
    ) -> None:
        """Publish (and wait for) the dead letters before the offsets that skip their records
        commit, so a skipped record is never lost."""
        futures = []
        for record, reason in rejected:
            log.warning("dead letter from %s[%s]@%s: %s", record.topic, record.partition, record.offset, reason)  # fmt: skip
            value = b"" if record.topic == topics.BODIES.name else (record.value or b"")
            letter = DeadLetter(
                # Several events of one record may be refused, each for its own reason.
                event_id=ids.event_id(
                    "dead-letter", record.topic, record.partition, record.offset, reason
                ),
                occurred_at=datetime.now(UTC),
                source_topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=None if record.key is None else record.key.decode("utf-8", "replace"),
                reason=f"projector: {reason}",
                payload=value[:_PAYLOAD_HEAD].decode("utf-8", "replace"),
            )
            futures.append(
                await producer.send(topics.DEADLETTER.name, codec.encode(letter), key=record.key)
            )
        if futures:
            await asyncio.gather(*futures)
            for record, reason in rejected:
                shared_metrics.dead_letter(record.topic, reason)


async def _tombstone(producer: AIOKafkaProducer, keys: Sequence[tuple[bytes, int]]) -> None:
    """Tombstone bodies again (acknowledged before the offsets that passed them commit)."""
    sends = [
        await producer.send(topics.BODIES.name, None, key=key, partition=partition)
        for key, partition in keys
    ]
    if sends:
        await asyncio.gather(*sends)


# Told to the API's waiters, delivered when the transaction commits: that the projection
# moved (every commit), and which requests ended.
PROJECTED_CHANNEL = "cannonade_projected"
SETTLED_CHANNEL = "cannonade_settled"
_IDS_PER_NOTIFY = 200  # a notification's payload must stay under 8000 bytes


async def notify_waiters(conn: asyncpg.Connection, settled: set[str]) -> None:
    """Every notification of the transaction in one statement: one round trip per commit."""
    ordered = sorted(settled)
    payloads = [
        ",".join(ordered[start : start + _IDS_PER_NOTIFY])
        for start in range(0, len(ordered), _IDS_PER_NOTIFY)
    ]
    await conn.execute(
        "SELECT pg_notify(n.channel, n.payload) FROM unnest($1::text[], $2::text[])"
        " AS n(channel, payload)",
        [PROJECTED_CHANNEL] + [SETTLED_CHANNEL] * len(payloads),
        [""] + payloads,
    )


async def _quietly(aw: object) -> None:
    try:
        await aw  # type: ignore[misc]
    except Exception as exc:  # closing after a failure: the cause was logged already
        log.debug("while closing: %r", exc)


async def serve(config: Config) -> None:
    """The projector process: project until killed, with health and metrics on
    ``observability.metrics_port`` (ready: see :meth:`Projector.check`)."""
    obs = config.observability
    projector = Projector(config.database_url, config.kafka, max_lag=obs.ready_max_lag)
    readiness = health.Readiness()
    postgres = health.PostgresCheck(config.database_url)
    readiness.add("postgres", postgres, postgres.close)
    readiness.add("projection", projector.check)
    async with health.serving(obs.metrics_host, obs.port_for("projector"), readiness):
        heap.freeze_startup()
        await projector.run()
