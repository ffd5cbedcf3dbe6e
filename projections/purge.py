"""The purge (core §2.9, §4.9): reaps read-model rows under soft-deleted batches and files in
bounded chunks, tombstones the content they held on the bodies topic, and trims the
model-filters log.

- :meth:`Purger.orphaned_rows` takes at most ``n`` rows of deleted batches (with the chains
  they headed and their result bodies), then at most ``n`` templates of deleted files, then
  at most ``n`` chunk records of those files once none of their templates is left, then at
  most ``n`` chunk records of uploads that stopped part-way (older than ``stale_upload``, of
  a file that was never created: their API died before creating it or abandoning them),
  whose uploads it abandons (the agent forgets them; the projector deletes their template
  rows). Rows without a batch are never purged here, but for the model-call rows of a purged
  row's chain; rows not ended yet wait for their end.
- :meth:`Purger.model_filter_events` deletes at most ``n`` events, oldest ids first, that are
  both outside the newest ``max(keep, 1)`` of their model and older than the retention: the
  latest event of each model always survives (core §6 inv. 10).
- :meth:`Purger.webhook_history` deletes at most ``n`` webhook deliveries that have ended
  (delivered or given up), with their attempts, once they are older than the retention, or at
  once when their endpoint is deleted (nobody can list them then); one still open stays.

Each pass runs in one transaction that locks what it takes with ``FOR UPDATE SKIP LOCKED``,
so concurrent purgers take disjoint rows, and sends the tombstones (acknowledged) before it
commits the deletes: a crash in between leaves rows the next pass tombstones again, never
content the read model has forgotten. Only rows under deleted parents, or of files that never
existed, are touched (core §6 inv. 11).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec

from cannonade import health
from cannonade.config import Config, PurgeConfig
from projections import metrics
from schemas import bodies

log = logging.getLogger(__name__)

#: Tombstones the given body keys and returns once the broker has them.
Tombstoner = Callable[[Sequence[str]], Awaitable[None]]
#: Sends ``AbandonUpload`` for the given (file id, upload id) pairs, acknowledged.
Abandoner = Callable[[Sequence[tuple[str, str]]], Awaitable[None]]

# Only ended rows: the deletion cancelled the rest, and the projector, which applies their ends,
# must not wait on this pass's locks (held while the broker acknowledges its tombstones); a row
# still in flight ends later, and a result that came back after its row was gone would be kept
# by nothing.
_DELETED_ROWS = """
SELECT r.id FROM requests r JOIN batches b ON b.id = r.batch_id
WHERE b.deleted_at IS NOT NULL AND r.state IN ('completed', 'failed', 'canceled')
LIMIT $1
FOR UPDATE OF r SKIP LOCKED
"""
# The rows of the model calls of the chains the taken rows headed (a batch line with tools):
# rows of their own, without a batch.
_CHAIN_ROWS = """
SELECT request_id AS id FROM response_steps
WHERE parent_step_id = ANY($1::uuid[]) AND request_id IS NOT NULL
  AND NOT request_id = ANY($1::uuid[])
"""
# The steps of the chains the taken rows headed (each a bitmap OR of two index probes).
_CHAIN_STEPS = """
SELECT id FROM response_steps WHERE id = ANY($1::uuid[]) OR parent_step_id = ANY($1::uuid[])
"""
# Body keys of the taken rows and of their chains' steps ($1: rows and steps, $2: steps). Each
# arm probes a primary key: an `IN (subquery)` inside an OR read the whole bodies table.
_ROW_KEYS = """
SELECT kind || ':' || ref::text AS key FROM bodies WHERE ref = ANY($1::uuid[])
UNION SELECT 'sreq:' || id::text FROM response_steps
    WHERE id = ANY($2::uuid[]) AND request_payload IS NOT NULL
UNION SELECT 'sres:' || id::text FROM response_steps
    WHERE id = ANY($2::uuid[]) AND response_payload IS NOT NULL
"""
_DELETED_TEMPLATES = """
SELECT t.file_id, t.line_number FROM request_templates t JOIN files f ON f.id = t.file_id
WHERE f.deleted_at IS NOT NULL
LIMIT $1
FOR UPDATE OF t SKIP LOCKED
"""
_DELETED_CHUNKS = """
SELECT c.body_key FROM template_chunks c JOIN files f ON f.id::text = split_part(c.body_key, ':', 2)
WHERE f.deleted_at IS NOT NULL AND c.body_key LIKE 'tplc:%'
  AND NOT EXISTS (SELECT 1 FROM request_templates t WHERE t.file_id = f.id)
LIMIT $1
FOR UPDATE OF c SKIP LOCKED
"""
# Chunks of uploads that never became a file and stopped arriving long ago.
_STALE_CHUNKS = """
SELECT c.body_key FROM template_chunks c
WHERE c.body_key LIKE 'tplc:%' AND c.projected_at < $2
  AND NOT EXISTS (SELECT 1 FROM files f WHERE f.id::text = split_part(c.body_key, ':', 2))
LIMIT $1
FOR UPDATE OF c SKIP LOCKED
"""
# Ended deliveries past the retention or of deleted endpoints. The notifier holds an open
# delivery's row while it sends; open ones are never taken, and SKIP LOCKED passes it by.
_OLD_DELIVERIES = """
SELECT d.id FROM webhook_deliveries d
WHERE (d.created_at < $2 OR d.webhook_id IN (SELECT id FROM webhooks WHERE deleted_at IS NOT NULL))
  AND NOT EXISTS (SELECT 1 FROM webhook_open o WHERE o.delivery_id = d.id)
LIMIT $1
FOR UPDATE OF d SKIP LOCKED
"""
_MODEL_FILTER_EVENTS = """
DELETE FROM model_filters WHERE id IN (
    SELECT m.id FROM model_filters m
    JOIN (SELECT id, row_number() OVER (PARTITION BY model ORDER BY created_at DESC, id DESC) AS rank
          FROM model_filters) r ON r.id = m.id
    WHERE r.rank > $2 AND m.created_at < $3
    ORDER BY m.id
    LIMIT $1
    FOR UPDATE OF m SKIP LOCKED
)
RETURNING id
"""


class Reaped(msgspec.Struct):
    rows: int = 0
    templates: int = 0
    chunks: int = 0  # of deleted files
    stale_chunks: int = 0  # of uploads that stopped part-way
    tombstones: int = 0

    @property
    def total(self) -> int:
        return self.rows + self.templates + self.chunks + self.stale_chunks


class Round(msgspec.Struct, frozen=True):
    """What one purge round reaped."""

    rows: int = 0  # rows, templates and chunks
    model_filter_events: int = 0
    webhook_deliveries: int = 0


class Purger:
    def __init__(
        self,
        pool: asyncpg.Pool,
        tombstone: Tombstoner,
        abandon: Abandoner,
        stale_upload: timedelta,
    ) -> None:
        self.pool = pool
        self.tombstone = tombstone
        self.abandon = abandon
        self.stale_upload = stale_upload

    async def orphaned_rows(self, n: int) -> Reaped:
        """One bounded pass over what lies under deleted parents and what stopped uploads
        left (see the module docstring)."""
        reaped = Reaped()
        async with self.pool.acquire() as conn, conn.transaction():
            ids = [r["id"] for r in await conn.fetch(_DELETED_ROWS, n)]
            if ids:
                ids += [r["id"] for r in await conn.fetch(_CHAIN_ROWS, ids)]
                steps = [r["id"] for r in await conn.fetch(_CHAIN_STEPS, ids)]
                keys = [r["key"] for r in await conn.fetch(_ROW_KEYS, ids + steps, steps)]
                await self.tombstone(keys)
                await conn.execute("DELETE FROM bodies WHERE ref = ANY($1::uuid[])", ids + steps)
                await conn.execute("DELETE FROM response_steps WHERE id = ANY($1::uuid[])", steps)
                await conn.execute("DELETE FROM response_chains WHERE id = ANY($1::uuid[])", ids)
                await conn.execute("DELETE FROM requests WHERE id = ANY($1::uuid[])", ids)
                # A body of theirs projected later is dropped and tombstoned again.
                await conn.execute(
                    "INSERT INTO erased_requests (id) SELECT unnest($1::uuid[])"
                    " ON CONFLICT DO NOTHING",
                    ids,
                )
                reaped.rows, reaped.tombstones = len(ids), len(keys)
        async with self.pool.acquire() as conn, conn.transaction():
            lines = await conn.fetch(_DELETED_TEMPLATES, n)
            if lines:
                await conn.execute(
                    "DELETE FROM request_templates t USING unnest($1::uuid[], $2::int[])"
                    " AS u(file_id, line) WHERE t.file_id = u.file_id AND t.line_number = u.line",
                    [r["file_id"] for r in lines],
                    [r["line_number"] for r in lines],
                )
                reaped.templates = len(lines)
        async with self.pool.acquire() as conn, conn.transaction():
            chunks = [r["body_key"] for r in await conn.fetch(_DELETED_CHUNKS, n)]
            if chunks:
                await self.tombstone(chunks)
                await conn.execute(
                    "DELETE FROM template_chunks WHERE body_key = ANY($1::text[])", chunks
                )
                reaped.chunks = len(chunks)
                reaped.tombstones += len(chunks)
        async with self.pool.acquire() as conn, conn.transaction():
            cutoff = datetime.now(UTC) - self.stale_upload
            stale = [r["body_key"] for r in await conn.fetch(_STALE_CHUNKS, n, cutoff)]
            if stale:
                # The agent forgets each upload and the projector deletes its template rows;
                # the chunks go here (a key of no upload's shape only goes).
                uploads = {u for key in stale if (u := bodies.chunk_upload(key)) is not None}
                if uploads:
                    await self.abandon(sorted(uploads))
                await self.tombstone(stale)
                await conn.execute(
                    "DELETE FROM template_chunks WHERE body_key = ANY($1::text[])", stale
                )
                reaped.stale_chunks = len(stale)
                reaped.tombstones += len(stale)
        return reaped

    async def model_filter_events(self, n: int, keep: int, retention: timedelta) -> int:
        cutoff = datetime.now(UTC) - retention
        async with self.pool.acquire() as conn, conn.transaction():
            return len(await conn.fetch(_MODEL_FILTER_EVENTS, n, max(keep, 1), cutoff))

    async def webhook_history(self, n: int, retention: timedelta) -> int:
        cutoff = datetime.now(UTC) - retention
        async with self.pool.acquire() as conn, conn.transaction():
            ids = [r["id"] for r in await conn.fetch(_OLD_DELIVERIES, n, cutoff)]
            if ids:
                await conn.execute(
                    "DELETE FROM webhook_attempts WHERE delivery_id = ANY($1::uuid[])", ids
                )
                await conn.execute("DELETE FROM webhook_deliveries WHERE id = ANY($1::uuid[])", ids)
            return len(ids)


async def run_once(purger: Purger, config: PurgeConfig, stop: asyncio.Event | None = None) -> Round:  # fmt: skip
    """One purge round (core §4.9): passes until one reaps nothing, pausing ``throttle_ms``
    after each pass that reaped something; then the same for model-filter events, and for
    webhook history unless its retention is 0."""
    stop = stop or asyncio.Event()
    pause = config.throttle_ms / 1000

    async def drain(one_pass: Callable[[], Awaitable[int]]) -> int:
        total = 0
        while not stop.is_set():
            found = await one_pass()
            total += found
            if not found or await _stopped(stop, pause):
                break
        return total

    async def rows() -> int:
        return (await purger.orphaned_rows(config.batch_size)).total

    n, keep = config.batch_size, config.model_filters_keep_per_model
    filters = timedelta(milliseconds=config.model_filters_retention_ms)
    history = timedelta(milliseconds=config.webhook_history_retention_ms)
    return Round(
        rows=await drain(rows),
        model_filter_events=await drain(lambda: purger.model_filter_events(n, keep, filters)),
        webhook_deliveries=(
            await drain(lambda: purger.webhook_history(n, history)) if history else 0
        ),
    )


async def run_forever(purger: Purger, config: PurgeConfig, stop: asyncio.Event) -> None:
    """The purge worker: a round after every interval until ``stop``; 0 disables it."""
    if config.interval_ms <= 0:
        log.info("purge disabled (purge.interval_ms = 0)")
        await stop.wait()
        return
    log.info("purge every %d ms", config.interval_ms)
    while not await _stopped(stop, config.interval_ms / 1000):
        try:
            reaped = await run_once(purger, config, stop)
            metrics.purged(reaped)
            if reaped != Round():
                log.info("purged %s", describe(reaped))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("purge round failed (%r); next round after the interval", exc)
        except Exception:
            log.exception("purge round failed; next round after the interval")


def describe(reaped: Round) -> str:
    return (
        f"{reaped.rows} rows, templates and chunks; {reaped.model_filter_events} model-filter"
        f" events; {reaped.webhook_deliveries} webhook deliveries"
    )


async def serve(purger: Purger, config: Config, stop: asyncio.Event) -> None:
    """The purge worker process: :func:`run_forever` with health and metrics on
    ``observability.metrics_port`` (ready: PostgreSQL and Kafka answer)."""
    obs = config.observability
    readiness = health.Readiness()
    postgres, kafka = health.PostgresCheck(config.database_url), health.KafkaCheck(config.kafka)
    readiness.add("postgres", postgres, postgres.close)
    readiness.add("kafka", kafka, kafka.close)
    async with health.serving(obs.metrics_host, obs.port_for("purge"), readiness):
        await run_forever(purger, config.purge, stop)


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Pause ``seconds``; True as soon as ``stop`` is set (shutdown interrupts any pause)."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
