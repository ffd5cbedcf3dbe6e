"""The projector: Kafka lifecycle topics → PostgreSQL read models.

One consumer reads files, batches, requests and bodies. Each poll becomes one transaction that
writes every row it touches in set-based statements (unnest) and the next offsets of every
partition it read, so a restarted projector resumes exactly where the last commit ended, and
a replay from offset zero rebuilds the same tables.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from projections.fold import COLUMNS, COUNTERS, Fold, RequestRow
from schemas import codec, topics
from schemas.events import (
    BatchCancelRequested,
    BatchCreated,
    BatchPopulated,
    BatchPopulationFailed,
    FileDeleted,
    FileUploaded,
    TemplatesAppended,
    WorkerHeartbeat,
    WorkerStarted,
    WorkerStopped,
)
from schemas.ids import error_file_id, output_file_id

log = logging.getLogger(__name__)

CONSUMER = "projector"
TOPICS = (
    topics.FILES, topics.BODIES, topics.BATCHES, topics.REQUESTS, topics.MODEL_FILTERS, topics.WORKERS,
)  # fmt: skip
MAX_RECORDS = 5000

_COLUMN_TYPES = {
    "id": "uuid", "batch_id": "uuid", "template_id": "uuid", "line_number": "int",
    "custom_id": "text", "model": "text", "owner": "text", "state": "text",
    "deadline": "timestamptz", "created_at": "timestamptz", "last_offset": "bigint",
    "service_tier": "text", "retry_attempt": "int", "not_before": "timestamptz",
    "claim_id": "uuid", "daemon_id": "text", "claimed_at": "timestamptz",
    "started_at": "timestamptz", "response_status": "int", "response_size": "int",
    "error_type": "text", "routed_model": "text", "completed_at": "timestamptz",
    "failed_at": "timestamptz", "canceled_at": "timestamptz",
}  # fmt: skip
_UPSERT_REQUESTS = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i + 1}::{_COLUMN_TYPES[c]}[]" for i, c in enumerate(COLUMNS))
    + ") ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "id")
    + ", projected_at = clock_timestamp()"
)
_UPSERT_COUNTS = (
    f"INSERT INTO batch_counts (batch_id, {', '.join(COUNTERS)}, last_terminal_at)"
    " SELECT * FROM unnest($1::uuid[], "
    + ", ".join(f"${i + 2}::bigint[]" for i in range(len(COUNTERS)))
    + f", ${len(COUNTERS) + 2}::timestamptz[]) ON CONFLICT (batch_id) DO UPDATE SET "
    + ", ".join(f"{c} = batch_counts.{c} + EXCLUDED.{c}" for c in COUNTERS)
    + ", last_terminal_at = GREATEST(batch_counts.last_terminal_at, EXCLUDED.last_terminal_at)"
)
# Lazy finalisation (core §5.2.5), done here deterministically from event times: a populated
# batch whose rows are all terminal gets its terminal stamps once.
_FINALIZE = """
UPDATE batches b SET
    finalizing_at = c.last_terminal_at,
    completed_at = CASE WHEN c.completed > 0 THEN c.last_terminal_at END,
    failed_at = CASE WHEN c.completed = 0 THEN c.last_terminal_at END
FROM batch_counts c
WHERE c.batch_id = b.id AND b.id = ANY($1::uuid[])
  AND b.total_requests > 0 AND b.requests_started_at IS NOT NULL
  AND c.pending = 0 AND c.in_progress = 0
  AND c.completed + c.failed + c.canceled = b.total_requests
  AND b.completed_at IS NULL AND b.failed_at IS NULL AND b.cancelling_at IS NULL
"""


class Projector:
    def __init__(self, dsn: str, bootstrap: str, consumer_name: str = CONSUMER) -> None:
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.name = consumer_name
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            max_partition_fetch_bytes=topics.BODIES.max_message_bytes,
            fetch_max_bytes=64 * 1024 * 1024,
            fetch_max_wait_ms=50,
        )
        await consumer.start()
        try:
            await self._assign(consumer, pool)
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=MAX_RECORDS)
                if batch:
                    async with pool.acquire() as conn, conn.transaction():
                        await self.apply(conn, batch)
        finally:
            await consumer.stop()
            await pool.close()

    async def _assign(self, consumer: AIOKafkaConsumer, pool: asyncpg.Pool) -> None:
        """Own every partition; resume each from the offset stored with the data."""
        partitions = [TopicPartition(t.name, p) for t in TOPICS for p in range(t.partitions)]
        consumer.assign(partitions)
        stored = {
            (r["topic"], r["partition"]): r["next_offset"]
            for r in await pool.fetch(
                "SELECT topic, partition, next_offset FROM projection_offsets WHERE consumer = $1",
                self.name,
            )
        }
        for tp in partitions:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)

    async def apply(
        self, conn: asyncpg.Connection, batch: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        by_topic: dict[str, list[ConsumerRecord]] = defaultdict(list)
        for tp, records in batch.items():
            by_topic[tp.topic].extend(records)
        await self._files(conn, by_topic[topics.FILES.name])
        await self._bodies(conn, by_topic[topics.BODIES.name])
        touched = await self._batches(conn, by_topic[topics.BATCHES.name])
        touched |= await self._requests(conn, by_topic[topics.REQUESTS.name])
        await self._model_filters(conn, by_topic[topics.MODEL_FILTERS.name])
        await self._workers(conn, by_topic[topics.WORKERS.name])
        if touched:
            await conn.execute(_FINALIZE, list(touched))
        await conn.executemany(
            "INSERT INTO projection_offsets (consumer, topic, partition, next_offset)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, topic, partition)"
            " DO UPDATE SET next_offset = EXCLUDED.next_offset",
            [
                (self.name, tp.topic, tp.partition, records[-1].offset + 1)
                for tp, records in batch.items()
            ],
        )

    # Undecodable records are skipped with a log line: the writers validated them, and a
    # projector that stops on one bad record would stall every read model behind it.
    @staticmethod
    def _decode(decoder: msgspec.json.Decoder, record: ConsumerRecord) -> Any:
        try:
            return decoder.decode(record.value)
        except codec.DecodeErrors as exc:
            log.error("skipping %s[%s]@%s: %s", record.topic, record.partition, record.offset, exc)
            return None

    async def _files(self, conn: asyncpg.Connection, records: list[ConsumerRecord]) -> None:
        templates: list[tuple[Any, ...]] = []
        for record in records:
            event = self._decode(codec.file_events, record)
            if isinstance(event, TemplatesAppended):
                templates += [
                    (
                        t.template_id,
                        event.file_id,
                        t.line_number,
                        t.custom_id,
                        t.method,
                        t.path,
                        t.model,
                        t.body_size,
                    )
                    for t in event.templates
                ]
            elif isinstance(event, FileUploaded):
                await self._flush_templates(conn, templates)
                await conn.execute(
                    "INSERT INTO files (id, owner, filename, purpose, bytes, template_count, api_key_id,"
                    " created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                    " ON CONFLICT (id) DO NOTHING",
                    event.file_id, event.owner, event.filename, event.purpose, event.bytes,
                    event.template_count, event.api_key_id, event.created_at, event.expires_at,
                )  # fmt: skip
                await self._apply_deletions(conn, [event.file_id])
            elif isinstance(event, FileDeleted):
                await self._flush_templates(conn, templates)
                await conn.execute(
                    "INSERT INTO file_deletions (file_id, deleted_at) VALUES ($1, $2)"
                    " ON CONFLICT (file_id) DO NOTHING",
                    event.file_id, event.occurred_at,
                )  # fmt: skip
                await self._apply_deletions(conn, [event.file_id])
        await self._flush_templates(conn, templates)

    @staticmethod
    async def _apply_deletions(conn: asyncpg.Connection, file_ids: list[str]) -> None:
        """Apply the recorded deletions among ``file_ids`` to the rows that exist now.

        Called after a deletion and after every insert that may reference a deleted file, so
        the outcome does not depend on which topic's events were projected first."""
        deleted = await conn.fetch(
            "SELECT file_id FROM file_deletions WHERE file_id = ANY($1::uuid[])", file_ids
        )
        if not deleted:
            return
        ids = [r["file_id"] for r in deleted]
        await conn.execute(
            "UPDATE files f SET status = 'deleted', deleted_at = d.deleted_at FROM file_deletions d"
            " WHERE d.file_id = f.id AND f.id = ANY($1::uuid[]) AND f.deleted_at IS NULL",
            ids,
        )
        await conn.execute(
            "UPDATE batches SET"
            " input_file_id = CASE WHEN input_file_id = ANY($1::uuid[]) THEN NULL ELSE input_file_id END,"
            " output_file_id = CASE WHEN output_file_id = ANY($1::uuid[]) THEN NULL ELSE output_file_id END,"
            " error_file_id = CASE WHEN error_file_id = ANY($1::uuid[]) THEN NULL ELSE error_file_id END"
            " WHERE input_file_id = ANY($1::uuid[]) OR output_file_id = ANY($1::uuid[])"
            " OR error_file_id = ANY($1::uuid[])",
            ids,
        )

    @staticmethod
    async def _flush_templates(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        columns = list(zip(*rows, strict=True))
        await conn.execute(
            "INSERT INTO request_templates (id, file_id, line_number, custom_id, method, path, model, body_size)"
            " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[],"
            " $6::text[], $7::text[], $8::int[]) ON CONFLICT (id) DO NOTHING",
            *columns,
        )
        rows.clear()

    async def _bodies(self, conn: asyncpg.Connection, records: list[ConsumerRecord]) -> None:
        latest: dict[bytes, Any] = {}
        for record in records:
            latest[record.key] = (
                None if record.value is None else self._decode(codec.bodies, record)
            )
        upserts = [(b.ref, b.kind, b.text) for b in latest.values() if b is not None]
        erased = [k.decode().split(":", 1) for k, b in latest.items() if b is None and k]
        if upserts:
            await conn.executemany(
                "INSERT INTO bodies (ref, kind, body) VALUES ($1, $2, $3)"
                " ON CONFLICT (ref, kind) DO UPDATE SET body = EXCLUDED.body",
                upserts,
            )
        if erased:
            await conn.executemany("DELETE FROM bodies WHERE kind = $1 AND ref = $2", erased)

    async def _batches(self, conn: asyncpg.Connection, records: list[ConsumerRecord]) -> set[str]:
        touched: set[str] = set()
        for record in records:
            event = self._decode(codec.batch_events, record)
            if event is None:
                continue
            touched.add(event.batch_id)
            if isinstance(event, BatchCreated):
                await self._batch_created(conn, event)
            elif isinstance(event, BatchPopulated):
                await conn.execute(
                    "UPDATE batches SET total_requests = $2, models = $3,"
                    " requests_started_at = COALESCE(requests_started_at, $4) WHERE id = $1",
                    event.batch_id, event.total, msgspec.json.encode(event.models).decode(), event.occurred_at,
                )  # fmt: skip
            elif isinstance(event, BatchPopulationFailed):
                await conn.execute(
                    "UPDATE batches SET failed_at = COALESCE(failed_at, $2),"
                    " errors_message = COALESCE(errors_message, $3) WHERE id = $1",
                    event.batch_id, event.occurred_at, event.message,
                )  # fmt: skip
            elif isinstance(event, BatchCancelRequested):
                await conn.execute(
                    "UPDATE batches SET cancelling_at = COALESCE(cancelling_at, $2),"
                    " cancelled_at = COALESCE(cancelled_at, $2) WHERE id = $1",
                    event.batch_id, event.occurred_at,
                )  # fmt: skip
        return touched

    @staticmethod
    async def _batch_created(conn: asyncpg.Connection, event: BatchCreated) -> None:
        metadata = None if event.metadata is None else msgspec.json.encode(event.metadata).decode()
        inserted = await conn.fetchval(
            "INSERT INTO batches (id, owner, input_file_id, endpoint, completion_window, metadata,"
            " output_file_id, error_file_id, api_key_id, created_at, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            " ON CONFLICT (id) DO NOTHING RETURNING true",
            event.batch_id, event.owner, event.input_file_id, event.endpoint,
            event.completion_window, metadata, event.output_file_id, event.error_file_id,
            event.api_key_id, event.created_at, event.expires_at,
        )  # fmt: skip
        if not inserted:
            return
        await conn.executemany(
            "INSERT INTO files (id, owner, filename, purpose, size_finalized, batch_id, created_at)"
            " VALUES ($1, $2, $3, $4, false, $5, $6) ON CONFLICT (id) DO NOTHING",
            [
                (output_file_id(event.batch_id), event.owner or None, f"batch-{event.batch_id}-output.jsonl",
                 "batch_output", event.batch_id, event.created_at),
                (error_file_id(event.batch_id), event.owner or None, f"batch-{event.batch_id}-error.jsonl",
                 "batch_error", event.batch_id, event.created_at),
            ],
        )  # fmt: skip
        await Projector._apply_deletions(
            conn, [event.input_file_id, event.output_file_id, event.error_file_id]
        )

    async def _requests(self, conn: asyncpg.Connection, records: list[ConsumerRecord]) -> set[str]:
        decoded = [(r.offset, self._decode(codec.request_events, r)) for r in records]
        events = [(o, e) for o, e in decoded if e is not None]
        if not events:
            return set()
        wanted = {i.request_id for _, e in events for i in getattr(e, "items", ())}
        wanted |= {e.request_id for _, e in events if hasattr(e, "request_id")}
        existing = await conn.fetch(
            f"SELECT {', '.join(COLUMNS)} FROM requests WHERE id = ANY($1::uuid[])", list(wanted)
        )
        fold = Fold({str(r["id"]): _row(r) for r in existing})
        for offset, event in events:
            fold.apply(event, offset)
        if fold.changed:
            rows = [fold.rows[i] for i in fold.changed]
            await conn.execute(
                _UPSERT_REQUESTS, *[[getattr(row, c) for row in rows] for c in COLUMNS]
            )
        deltas = [(b, d) for b, d in fold.deltas.items()]
        if deltas:
            await conn.execute(
                _UPSERT_COUNTS,
                [b for b, _ in deltas],
                *[[d.counts[c] for _, d in deltas] for c in COUNTERS],
                [d.last_terminal_at for _, d in deltas],
            )
        return set(fold.deltas)

    async def _model_filters(self, conn: asyncpg.Connection, records: list[ConsumerRecord]) -> None:
        events = [
            e for e in (self._decode(codec.model_filters, r) for r in records) if e is not None
        ]
        if events:
            await conn.executemany(
                "INSERT INTO model_filters (event_id, model, state, expected_ready_at, created_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
                [
                    (e.event_id, e.model, e.state, e.expected_ready_at, e.occurred_at)
                    for e in events
                ],
            )

    async def _workers(self, conn: asyncpg.Connection, records: list[ConsumerRecord]) -> None:
        """Daemon records (core §1.5); a heartbeat never revives a worker recorded dead."""
        for record in records:
            event = self._decode(codec.worker_events, record)
            if isinstance(event, WorkerStarted):
                await conn.execute(
                    "INSERT INTO daemons (id, role, status, hostname, pid, version, config_snapshot,"
                    " started_at, last_heartbeat, created_at) VALUES ($1, $2, 'running', $3, $4, $5, $6, $7, $7, $7)"
                    " ON CONFLICT (id) DO NOTHING",
                    event.worker_id, event.role, event.hostname, event.pid, event.version,
                    msgspec.json.encode(event.config_snapshot).decode(), event.occurred_at,
                )  # fmt: skip
            elif isinstance(event, WorkerHeartbeat | WorkerStopped):
                stopped = isinstance(event, WorkerStopped)
                await conn.execute(
                    "INSERT INTO daemons (id, role, status, last_heartbeat, stopped_at, requests_processed,"
                    " requests_failed, requests_in_flight, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $4)"
                    " ON CONFLICT (id) DO UPDATE SET"
                    " status = CASE WHEN daemons.status = 'dead' THEN 'dead' ELSE EXCLUDED.status END,"
                    " last_heartbeat = GREATEST(daemons.last_heartbeat, EXCLUDED.last_heartbeat),"
                    " stopped_at = COALESCE(daemons.stopped_at, EXCLUDED.stopped_at),"
                    " requests_processed = EXCLUDED.requests_processed,"
                    " requests_failed = EXCLUDED.requests_failed,"
                    " requests_in_flight = EXCLUDED.requests_in_flight",
                    event.worker_id, event.role, "dead" if stopped else "running", event.occurred_at,
                    event.occurred_at if stopped else None, event.requests_processed,
                    event.requests_failed, event.requests_in_flight,
                )  # fmt: skip


def _row(record: asyncpg.Record) -> RequestRow:
    values: dict[str, Any] = dict(record)
    for key in ("id", "batch_id", "template_id", "claim_id"):
        if values[key] is not None:
            values[key] = str(values[key])
    return RequestRow(**values)


async def run_forever(dsn: str, bootstrap: str) -> None:
    projector = Projector(dsn, bootstrap)
    await projector.run()
