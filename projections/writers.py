"""What each topic's records write to the read models: set-based SQL per poll.

:func:`apply` writes one poll's records inside the caller's transaction and returns the
records it could not apply (undecodable, or an event the state machine refuses) with the
reason; the projector dead-letters those and goes on.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import asyncpg
import msgspec
from aiokafka import ConsumerRecord

from projections.fold import COLUMN_TYPES, COLUMNS, Fold, RowWrite, rebuilt, settled
from projections.rules.content import virtual_file_names
from schemas import bodies, codec, ids, topics
from schemas.events import (
    ApiKey,
    BatchCancelRequested,
    BatchCreated,
    BatchDeleted,
    BatchNotified,
    BatchPopulated,
    BatchPopulationFailed,
    BatchRejected,
    BatchRetried,
    ChainAborted,
    ChainStarted,
    FileDeleted,
    FileUploaded,
    ResponseFinalized,
    StepCompleted,
    StepRecorded,
    StepStarted,
    TemplatesAppended,
    UploadAbandoned,
    WorkerHeartbeat,
    WorkerStarted,
    WorkerStopped,
)
from schemas.excluded import Decoder
from streams.lifecycle import next_state

Rejected = list[tuple[ConsumerRecord, str]]


class Applied(msgspec.Struct):
    """What one poll's records did: those refused (to dead-letter) and the requests without a
    batch that ended (to wake the API calls waiting for them)."""

    rejected: Rejected = msgspec.field(default_factory=list)
    settled: set[str] = msgspec.field(default_factory=set)
    # Bodies to tombstone again, (key, partition): content of erased requests met again.
    tombstones: list[tuple[bytes, int]] = msgspec.field(default_factory=list)


def position(offset: int, index: int) -> int:
    """An event's place in its partition: several events share a record (and an offset), and
    a row's ``last_offset`` must tell them apart."""
    return (offset << 20) | index


# A row born processing (realtime, a step sub-request) is held by no worker: the all-zero
# daemon id, claimed and started at creation (core §2.6 create_realtime).
_NO_DAEMON = "00000000-0000-0000-0000-000000000000"
_NEW_ROW_FIELDS = (
    "id", "batch_id", "file_id", "line_number", "model", "owner", "state", "deadline",
    "created_at", "service_tier", "offset", "path", "background", "api_key_id",
)  # fmt: skip
_INSERT_ROWS = f"""
WITH ins AS (
    INSERT INTO requests (id, batch_id, file_id, line_number, model, owner, state, deadline,
                          created_at, service_tier, last_offset, path, background, api_key_id,
                          daemon_id, claimed_at, started_at)
    SELECT u.id, u.batch_id, u.file_id, u.line_number, u.model, u.owner, u.state, u.deadline,
           u.created_at, u.service_tier, u.off, u.path, u.background, u.api_key_id,
           CASE WHEN u.state = 'processing' THEN '{_NO_DAEMON}' END,
           CASE WHEN u.state = 'processing' THEN u.created_at END,
           CASE WHEN u.state = 'processing' THEN u.created_at END
    FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int[], $5::text[], $6::text[],
                $7::text[], $8::timestamptz[], $9::timestamptz[], $10::text[], $11::bigint[],
                $12::text[], $13::bool[], $14::uuid[])
         AS u(id, batch_id, file_id, line_number, model, owner, state, deadline, created_at,
              service_tier, off, path, background, api_key_id)
    ON CONFLICT (id) DO NOTHING
    RETURNING batch_id
)
INSERT INTO batch_counts (batch_id, pending)
SELECT batch_id, count(*) FROM ins WHERE batch_id IS NOT NULL GROUP BY batch_id
ON CONFLICT (batch_id) DO UPDATE SET pending = batch_counts.pending + EXCLUDED.pending
"""

_COUNTERS = ("pending", "in_progress", "completed", "failed", "canceled")
_COUNTER_STATES = {
    "pending": "('pending')",
    "in_progress": "('claimed', 'processing')",
    "completed": "('completed')",
    "failed": "('failed')",
    "canceled": "('canceled')",
}
# One statement per poll: every changed row written once, only past its last applied offset
# and only from the state its first event left (a transition the gate published twice after a
# crash applies once), and the batch counters moved from that state to the row's last state.
# It answers each batch touched, each batch reopened, and each write that found its row
# elsewhere (``missed``: see :func:`projections.fold.rebuilt`).
_UPDATE_ROWS = f"""
WITH u AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
        $6::int[], $7::int[], {", ".join(f"${i + 8}::{COLUMN_TYPES[c]}[]" for i, c in enumerate(COLUMNS))})
    AS u(id, first_off, last_off, from_state, state, mask, retried_version, {", ".join(COLUMNS)})
),
upd AS (
    UPDATE requests r SET state = u.state, last_offset = u.last_off,
        projected_at = clock_timestamp(),
        {", ".join(f"{c} = CASE WHEN u.mask & {1 << i} <> 0 THEN u.{c} ELSE r.{c} END" for i, c in enumerate(COLUMNS))}
    FROM u, requests o
    WHERE r.id = u.id AND o.id = u.id AND r.last_offset < u.first_off AND r.state = u.from_state
    RETURNING r.id, r.batch_id, u.from_state, u.state, u.retried_version,
              o.response_size AS old_size,
              r.response_size AS new_size,
              COALESCE(r.completed_at, r.failed_at, r.canceled_at) AS ended_at
), counted AS (
INSERT INTO batch_counts (batch_id, {", ".join(_COUNTERS)}, response_bytes, error_bytes,
                          last_terminal_at, reopened_version)
SELECT batch_id,
    {", ".join(f"sum((state IN {_COUNTER_STATES[c]})::int - (from_state IN {_COUNTER_STATES[c]})::int)" for c in _COUNTERS)},
    sum(CASE WHEN state = 'completed' THEN new_size ELSE 0 END
        - CASE WHEN from_state = 'completed' THEN old_size ELSE 0 END),
    sum(CASE WHEN state = 'failed' THEN new_size ELSE 0 END
        - CASE WHEN from_state = 'failed' THEN old_size ELSE 0 END),
    max(ended_at) FILTER (WHERE state IN ('completed', 'failed', 'canceled')),
    max(retried_version)
FROM upd WHERE batch_id IS NOT NULL GROUP BY batch_id
ON CONFLICT (batch_id) DO UPDATE SET
    {", ".join(f"{c} = batch_counts.{c} + EXCLUDED.{c}" for c in (*_COUNTERS, "response_bytes", "error_bytes"))},
    last_terminal_at = GREATEST(batch_counts.last_terminal_at, EXCLUDED.last_terminal_at),
    reopened_version = GREATEST(batch_counts.reopened_version, EXCLUDED.reopened_version)
RETURNING batch_id
)
SELECT batch_id, NULL::int AS reopened, NULL::uuid AS missed FROM counted
UNION ALL SELECT batch_id, max(retried_version), NULL FROM upd
    WHERE batch_id IS NOT NULL AND retried_version IS NOT NULL GROUP BY batch_id
UNION ALL SELECT NULL, NULL, u.id FROM u WHERE u.id NOT IN (SELECT id FROM upd)
"""  # noqa: E501
# A batch one of whose rows was retried is live again: its terminal stamps and frozen counts
# go, in the transaction that re-pends the row (finalisation, later in the same poll, stamps it
# again if every row has ended again meanwhile). Its notification goes unless it is already
# that of the retry's version: replaying the log may meet the batches topic's notification of
# the retried run before the requests topic's retry.
_REOPEN = """
UPDATE batches b SET completed_at = NULL, failed_at = NULL, finalizing_at = NULL,
    completed_requests = NULL, failed_requests = NULL, canceled_requests = NULL,
    counts_frozen_at = NULL,
    notification_sent_at = CASE WHEN b.notified_version >= v.version
                                THEN b.notification_sent_at END
FROM unnest($1::uuid[], $2::int[]) AS v(id, version)
WHERE b.id = v.id
"""

# Outcomes of rows never claimed (responses §5): a processing realtime row ends; an ended row
# stays; a missing row is created in its final state from the create context.
_REALTIME_OUTCOMES = f"""
INSERT INTO requests (id, model, owner, state, deadline, created_at, service_tier, path,
                      background, api_key_id, daemon_id, claimed_at, started_at,
                      response_status, response_size, error_type, completed_at, failed_at,
                      last_offset)
SELECT u.id, u.model, u.owner, u.state, u.deadline, u.created_at, u.service_tier, u.path,
       u.background, u.api_key_id, '{_NO_DAEMON}', u.created_at, u.created_at, u.status,
       u.size, CASE WHEN u.state = 'failed' THEN 'NonRetriableHttpStatus' END,
       CASE WHEN u.state = 'completed' THEN u.at END, CASE WHEN u.state = 'failed' THEN u.at END,
       u.off
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
            $6::timestamptz[], $7::text[], $8::text[], $9::bool[], $10::uuid[], $11::int[],
            $12::int[], $13::timestamptz[], $14::bigint[])
     AS u(id, model, owner, state, deadline, created_at, service_tier, path, background,
          api_key_id, status, size, at, off)
ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state,
    response_status = EXCLUDED.response_status, response_size = EXCLUDED.response_size,
    error_type = EXCLUDED.error_type, completed_at = EXCLUDED.completed_at,
    failed_at = EXCLUDED.failed_at, last_offset = EXCLUDED.last_offset,
    projected_at = clock_timestamp()
WHERE requests.state = 'processing' AND requests.batch_id IS NULL
  AND requests.service_tier = 'priority' AND requests.last_offset < EXCLUDED.last_offset
"""

# Lazy finalisation (core §5.2.5), done here deterministically from event times: a populated
# batch whose rows are all terminal gets its terminal stamps once.
#
# A cancel that reached the batch after every one of its rows had ended (a deletion of a
# finished batch, or of its input file, cancels it too) does not make it cancelled: live, the
# projector sees the batch finished first and ignores the cancel; in a replay it may project
# the cancel before the rows' ends, and this rule, on event times, gives the same outcome.
_ENDED_BEFORE_CANCEL = (
    "(b.cancelling_at IS NOT NULL AND c.canceled = 0 AND c.last_terminal_at < b.cancelling_at)"
)
_CANCELLED = f"(b.cancelling_at IS NOT NULL AND NOT {_ENDED_BEFORE_CANCEL})"
_FINALIZE = f"""
UPDATE batches b SET
    cancelling_at = CASE WHEN {_ENDED_BEFORE_CANCEL} THEN NULL ELSE b.cancelling_at END,
    cancelled_at = CASE WHEN {_ENDED_BEFORE_CANCEL} THEN NULL ELSE b.cancelled_at END,
    finalizing_at = CASE WHEN NOT {_CANCELLED} THEN c.last_terminal_at END,
    completed_at = CASE WHEN NOT {_CANCELLED} AND c.completed > 0 THEN c.last_terminal_at END,
    failed_at = CASE WHEN NOT {_CANCELLED} AND c.completed = 0 THEN c.last_terminal_at END,
    completed_requests = c.completed, failed_requests = c.failed,
    canceled_requests = c.canceled, counts_frozen_at = c.last_terminal_at
FROM batch_counts c
WHERE c.batch_id = b.id AND b.id = ANY($1::uuid[])
  AND b.requests_started_at IS NOT NULL AND b.counts_frozen_at IS NULL
  AND c.pending = 0 AND c.in_progress = 0
  AND c.completed + c.failed + c.canceled = b.total_requests
  AND (b.total_requests > 0 OR b.cancelling_at IS NOT NULL)
  AND b.completed_at IS NULL AND b.failed_at IS NULL
"""
# A cancel. A batch that already ended keeps its outcome (a deleted input file cancels only
# the batches still running from it) unless the cancel came first by event time: a replay may
# finalise the batch from the rows' cancellations before it meets the cancel, and must end
# where the live run did (the rule of _FINALIZE). A cancel from before the latest retry was
# the earlier run's (a replay over the tables meets it again), and so is a finished run the
# rows reached by a retry the batches topic has not shown yet (the requests topic read ahead).
_CANCEL = """
INSERT INTO batches (id, cancelling_at, cancelled_at) VALUES ($1, $2, $2)
ON CONFLICT (id) DO UPDATE SET
    cancelling_at = COALESCE(batches.cancelling_at, $2),
    cancelled_at = COALESCE(batches.cancelled_at, $2),
    finalizing_at = NULL, completed_at = NULL, failed_at = NULL
WHERE $2 >= COALESCE(batches.retried_at, '-infinity')
  AND ((batches.completed_at IS NULL AND batches.failed_at IS NULL)
       OR (batches.counts_frozen_at IS NOT NULL
           AND COALESCE((SELECT c.reopened_version FROM batch_counts c
                         WHERE c.batch_id = batches.id), 0) <= batches.retry_version
           AND (batches.canceled_requests > 0 OR batches.counts_frozen_at >= $2)))
"""
# A retry: the version moves on and a cancel is lifted (cancel then retry is pause and resume);
# the stamps go with the rows' own RequestRetried (see _REOPEN), so the outcome does not depend
# on which topic a poll read first. When those came first (the requests topic read ahead), an
# outcome frozen since stood under the cancel lifted here: it goes, and the poll's _FINALIZE
# makes it again without the cancel.
_RETRIED = """
UPDATE batches b SET retry_version = $2, expires_at = $3, cancelling_at = NULL,
    cancelled_at = NULL, retried_at = $4,
    finalizing_at = CASE WHEN v.stale THEN NULL ELSE b.finalizing_at END,
    completed_at = CASE WHEN v.stale THEN NULL ELSE b.completed_at END,
    failed_at = CASE WHEN v.stale THEN NULL ELSE b.failed_at END,
    completed_requests = CASE WHEN v.stale THEN NULL ELSE b.completed_requests END,
    failed_requests = CASE WHEN v.stale THEN NULL ELSE b.failed_requests END,
    canceled_requests = CASE WHEN v.stale THEN NULL ELSE b.canceled_requests END,
    counts_frozen_at = CASE WHEN v.stale THEN NULL ELSE b.counts_frozen_at END
FROM (SELECT b.cancelling_at IS NOT NULL AND COALESCE(
        (SELECT c.reopened_version FROM batch_counts c WHERE c.batch_id = $1), 0) >= $2 AS stale
      FROM batches b WHERE b.id = $1) v
WHERE b.id = $1 AND b.retry_version < $2
"""
# Erasure: the rows go, and leave their batches' counters and totals, so a batch can finish.
_ERASE_ROWS = """
WITH gone AS (
    DELETE FROM requests WHERE id = ANY($1::uuid[])
    RETURNING batch_id, state, response_size
), per AS (
    SELECT batch_id, count(*) AS n,
        sum((state = 'pending')::int) AS p,
        sum((state IN ('claimed', 'processing'))::int) AS i,
        sum((state = 'completed')::int) AS c,
        sum((state = 'failed')::int) AS f,
        sum((state = 'canceled')::int) AS x,
        sum(CASE WHEN state = 'completed' THEN response_size ELSE 0 END) AS rb,
        sum(CASE WHEN state = 'failed' THEN response_size ELSE 0 END) AS eb
    FROM gone WHERE batch_id IS NOT NULL GROUP BY batch_id
), counted AS (
    UPDATE batch_counts k SET pending = k.pending - per.p, in_progress = k.in_progress - per.i,
        completed = k.completed - per.c, failed = k.failed - per.f, canceled = k.canceled - per.x,
        response_bytes = k.response_bytes - per.rb, error_bytes = k.error_bytes - per.eb
    FROM per WHERE k.batch_id = per.batch_id
)
UPDATE batches b SET total_requests = b.total_requests - per.n
FROM per WHERE b.id = per.batch_id
RETURNING b.id
"""


async def apply(conn: asyncpg.Connection, records: Iterable[ConsumerRecord]) -> Applied:
    by_topic: dict[str, list[ConsumerRecord]] = defaultdict(list)
    for record in records:
        by_topic[record.topic].append(record)
    applied = Applied()
    rejected = applied.rejected
    await _files(conn, by_topic[topics.FILES.name], rejected)
    stored = await _bodies(conn, by_topic[topics.BODIES.name], rejected)
    touched = await _batches(conn, by_topic[topics.BATCHES.name], rejected)
    touched |= await _requests(conn, by_topic[topics.REQUESTS.name], applied, stored)
    await _model_filters(conn, by_topic[topics.MODEL_FILTERS.name], rejected)
    await _workers(conn, by_topic[topics.WORKERS.name], rejected)
    await _keys(conn, by_topic[topics.KEYS.name], rejected)
    await _responses(conn, by_topic[topics.RESPONSES.name], by_topic[topics.BODIES.name], rejected)
    await _webhooks(conn, by_topic[topics.WEBHOOKS.name], rejected)
    await _webhook_attempts(conn, by_topic[topics.WEBHOOK_DELIVERIES.name], rejected)
    await _erased_bodies(conn, stored, applied)
    if touched:
        await conn.execute(_FINALIZE, list(touched))
    return applied


def _decode(decoder: Decoder[Any], record: ConsumerRecord, rejected: Rejected) -> Any:
    try:
        return decoder.decode(record.value)
    except codec.DecodeErrors as exc:
        rejected.append((record, f"invalid message: {exc}"))
    except TypeError:  # a null value on a topic that has no tombstones
        rejected.append((record, "empty payload"))
    return None


# -- files ---------------------------------------------------------------------------------


_TEMPLATE_COLUMNS = (
    "file_id", "line_number", "custom_id", "method", "path", "model", "body_size", "body_key",
)  # fmt: skip
_UPSERT_TEMPLATES = (
    "INSERT INTO request_templates (file_id, line_number, custom_id, method, path, model,"
    " body_size, body_key) SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[],"
    " $4::text[], $5::text[], $6::text[], $7::int[], $8::text[])"
    " ON CONFLICT (file_id, line_number) DO UPDATE SET custom_id = EXCLUDED.custom_id,"
    " method = EXCLUDED.method, path = EXCLUDED.path, model = EXCLUDED.model,"
    " body_size = EXCLUDED.body_size, body_key = EXCLUDED.body_key"
)


async def _files(conn: asyncpg.Connection, records: list[ConsumerRecord], rejected: Rejected) -> None:  # fmt: skip
    templates = _Templates(conn)
    for record in records:
        event = _decode(codec.file_events, record, rejected)
        if isinstance(event, TemplatesAppended):
            await templates.add(event)
        elif isinstance(event, FileUploaded):
            await templates.flush()
            await conn.execute(
                "INSERT INTO files (id, owner, filename, purpose, bytes, template_count, api_key_id,"
                " created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " ON CONFLICT (id) DO NOTHING",
                event.file_id, event.owner, event.filename, event.purpose, event.bytes,
                event.template_count, event.api_key_id, event.created_at, event.expires_at,
            )  # fmt: skip
            # Lines an abandoned earlier attempt of the same upload left beyond the file's end.
            await conn.execute(
                "DELETE FROM request_templates WHERE file_id = $1 AND line_number >= $2",
                event.file_id,
                event.template_count,
            )
            await _apply_deletions(conn, [event.file_id])
        elif isinstance(event, UploadAbandoned):
            await templates.flush()
            # Only the abandoned upload's lines: another upload of the file (a retry under
            # the same Idempotency-Key) may have written the rest.
            await conn.execute(
                "DELETE FROM request_templates WHERE file_id = $1 AND starts_with(body_key, $2)",
                event.file_id,
                bodies.upload_chunks(event.file_id, event.upload_id),
            )
        elif isinstance(event, FileDeleted):
            await templates.flush()
            await conn.execute(
                "INSERT INTO file_deletions (file_id, deleted_at) VALUES ($1, $2)"
                " ON CONFLICT (file_id) DO NOTHING",
                event.file_id, event.occurred_at,
            )  # fmt: skip
            await _apply_deletions(conn, [event.file_id])
    await templates.flush()


class _Templates:
    """A poll's template rows, written together; a line meets at most once in one write."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.rows: list[tuple[Any, ...]] = []
        self.ends: dict[str, int] = {}  # per file, the end of its lines in `rows`

    async def add(self, event: TemplatesAppended) -> None:
        if event.first_line < self.ends.get(event.file_id, 0):
            # A line met again in this poll (another upload of the file): one COPY or upsert
            # must not hold a line twice.
            await self.flush()
        self.ends[event.file_id] = event.first_line + len(event.templates)
        self.rows += [
            (event.file_id, event.first_line + i, t.custom_id, t.method, t.path, t.model,
             t.body_size, event.body_key)
            for i, t in enumerate(event.templates)
        ]  # fmt: skip

    async def flush(self) -> None:
        rows, self.rows, self.ends = self.rows, [], {}
        if not rows:
            return
        try:
            # A new upload's lines are new rows, and COPY writes them in half the time of the
            # upsert, which only a replay or a retried upload needs (and gets on a conflict).
            async with self.conn.transaction():
                await self.conn.copy_records_to_table(
                    "request_templates", records=rows, columns=_TEMPLATE_COLUMNS
                )
        except asyncpg.UniqueViolationError:
            await self.conn.execute(_UPSERT_TEMPLATES, *zip(*rows, strict=True))


async def _apply_deletions(conn: asyncpg.Connection, file_ids: list[str]) -> None:
    """Apply the recorded deletions among ``file_ids`` to the rows that exist now.

    Called after a deletion and after every insert that may reference a deleted file, so the
    outcome does not depend on which topic's events were projected first."""
    deleted = await conn.fetch(
        "SELECT file_id FROM file_deletions WHERE file_id = ANY($1::uuid[])", file_ids
    )
    if not deleted:
        return
    found = [r["file_id"] for r in deleted]
    await conn.execute(
        "UPDATE files f SET status = 'deleted', deleted_at = d.deleted_at FROM file_deletions d"
        " WHERE d.file_id = f.id AND f.id = ANY($1::uuid[]) AND f.deleted_at IS NULL",
        found,
    )
    await conn.execute(
        "UPDATE batches SET"
        " input_file_id = CASE WHEN input_file_id = ANY($1::uuid[]) THEN NULL ELSE input_file_id END,"
        " output_file_id = CASE WHEN output_file_id = ANY($1::uuid[]) THEN NULL ELSE output_file_id END,"
        " error_file_id = CASE WHEN error_file_id = ANY($1::uuid[]) THEN NULL ELSE error_file_id END"
        " WHERE input_file_id = ANY($1::uuid[]) OR output_file_id = ANY($1::uuid[])"
        " OR error_file_id = ANY($1::uuid[])",
        found,
    )


# -- bodies --------------------------------------------------------------------------------


# Bodies kept whole, keyed by the id after the kind: a batchless request's body, results and
# errors, and chain steps' payloads (projected into their steps by _responses as well).
_REQUEST_BODY_KINDS = (bodies.TEMPLATE, bodies.RESULT, bodies.ERROR)
_SINGLE_BODY_KINDS = (
    *_REQUEST_BODY_KINDS, bodies.STEP_REQUEST, bodies.STEP_RESULT, bodies.STEP_ERROR,
)  # fmt: skip


async def _bodies(conn: asyncpg.Connection, records: list[ConsumerRecord], rejected: Rejected) -> dict[str, list[ConsumerRecord]]:  # fmt: skip
    """Apply a poll's body records; returns the requests' bodies it stored, by request id."""
    latest: dict[bytes, ConsumerRecord] = {}
    for record in records:
        if record.key is None:
            rejected.append((record, "a body record needs a key"))
            continue
        latest[record.key] = record  # compaction semantics: the last record of a key wins
    chunks: list[tuple[str, bytes]] = []
    single: list[tuple[str, str, bytes]] = []
    erased_chunks: list[str] = []
    erased: list[tuple[str, str]] = []
    stored: dict[str, list[ConsumerRecord]] = {}
    for raw_key, record in latest.items():
        key = raw_key.decode("utf-8", "replace")
        kind, _, ref = key.partition(":")
        if kind == bodies.CHUNK:
            if record.value is None:
                erased_chunks.append(key)
            else:
                chunks.append((key, record.value))
            continue
        if kind not in _SINGLE_BODY_KINDS or not _is_uuid(ref):
            rejected.append((record, f"unknown body key '{key[:100]}'"))
            continue
        if record.value is None:
            erased.append((ref, kind))
        else:
            single.append((ref, kind, record.value))
            if kind in _REQUEST_BODY_KINDS:
                stored.setdefault(ref, []).append(record)
    if chunks:
        await conn.executemany(
            "INSERT INTO template_chunks (body_key, body) VALUES ($1, $2)"
            " ON CONFLICT (body_key) DO UPDATE SET body = EXCLUDED.body",
            chunks,
        )
    if single:
        await conn.executemany(
            "INSERT INTO bodies (ref, kind, body) VALUES ($1, $2, $3)"
            " ON CONFLICT (ref, kind) DO UPDATE SET body = EXCLUDED.body",
            single,
        )
    if erased_chunks:
        await conn.execute("DELETE FROM template_chunks WHERE body_key = ANY($1)", erased_chunks)
    if erased:
        await conn.executemany("DELETE FROM bodies WHERE ref = $1 AND kind = $2", erased)
    return stored


async def _erased_bodies(conn: asyncpg.Connection, met: dict[str, list[ConsumerRecord]], applied: Applied) -> None:  # fmt: skip
    """Bodies of erased requests (``met``: the poll's, by request id), met after their erasure
    (a result that raced it, or a replay that reads the bodies topic first): gone from the read
    model, and tombstoned again, since such a record on the compacted topic is newer than the
    erasure's tombstones (the latest record of each key: a tombstone hides every earlier one)."""
    if not met:
        return
    erased = [
        str(r["id"])
        for r in await conn.fetch(
            "SELECT id FROM erased_requests WHERE id = ANY($1::uuid[])", list(met)
        )
    ]
    if erased:
        await conn.execute("DELETE FROM bodies WHERE ref = ANY($1::uuid[])", erased)
        applied.tombstones += [(r.key, r.partition) for ref in erased for r in met[ref]]


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


# -- batches -------------------------------------------------------------------------------


async def _batches(conn: asyncpg.Connection, records: list[ConsumerRecord], rejected: Rejected) -> set[str]:  # fmt: skip
    touched: set[str] = set()
    for record in records:
        event = _decode(codec.batch_events, record, rejected)
        if event is None:
            continue
        touched.add(event.batch_id)
        if isinstance(event, BatchCreated):
            await _batch_created(conn, event)
        elif isinstance(event, BatchPopulated):
            await conn.execute(
                "INSERT INTO batches (id, total_requests, models, requests_started_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO UPDATE SET"
                " total_requests = EXCLUDED.total_requests, models = EXCLUDED.models,"
                " requests_started_at = COALESCE(batches.requests_started_at, EXCLUDED.requests_started_at)",
                event.batch_id, event.total, msgspec.json.encode(event.models).decode(),
                event.occurred_at,
            )  # fmt: skip
        elif isinstance(event, BatchPopulationFailed):
            await conn.execute(
                "INSERT INTO batches (id, failed_at, errors_message) VALUES ($1, $2, $3)"
                " ON CONFLICT (id) DO UPDATE SET failed_at = COALESCE(batches.failed_at, $2),"
                " errors_message = COALESCE(batches.errors_message, $3)",
                event.batch_id, event.occurred_at, event.message,
            )  # fmt: skip
        elif isinstance(event, BatchCancelRequested):
            await conn.execute(_CANCEL, event.batch_id, event.occurred_at)
        elif isinstance(event, BatchRejected):
            await conn.execute(
                "INSERT INTO batch_rejections (batch_id, owner, status, message, code, param)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (batch_id) DO NOTHING",
                event.batch_id, event.owner, event.status, event.message, event.code, event.param,
            )  # fmt: skip
        elif isinstance(event, BatchRetried):
            await conn.execute(_RETRIED, event.batch_id, event.retry_version, event.expires_at, event.occurred_at)  # fmt: skip
        elif isinstance(event, BatchDeleted):
            await conn.execute(
                "INSERT INTO batches (id, deleted_at) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE"
                " SET deleted_at = COALESCE(batches.deleted_at, $2),"
                " metadata = CASE WHEN $3 THEN NULL ELSE batches.metadata END",
                event.batch_id, event.occurred_at, event.erase,
            )  # fmt: skip
        elif isinstance(event, BatchNotified):
            await _batch_notified(conn, event)
    return touched


async def _batch_created(conn: asyncpg.Connection, event: BatchCreated) -> None:
    metadata = None if event.metadata is None else msgspec.json.encode(event.metadata).decode()
    await conn.execute(
        "INSERT INTO batches (id, owner, input_file_id, endpoint, completion_window, metadata,"
        " output_file_id, error_file_id, api_key_id, created_at, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        " ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner,"
        " input_file_id = EXCLUDED.input_file_id, endpoint = EXCLUDED.endpoint,"
        " completion_window = EXCLUDED.completion_window, metadata = EXCLUDED.metadata,"
        " output_file_id = EXCLUDED.output_file_id, error_file_id = EXCLUDED.error_file_id,"
        " api_key_id = EXCLUDED.api_key_id, created_at = EXCLUDED.created_at,"
        " expires_at = EXCLUDED.expires_at WHERE batches.owner IS NULL",
        event.batch_id, event.owner, event.input_file_id, event.endpoint,
        event.completion_window, metadata, event.output_file_id, event.error_file_id,
        event.api_key_id, event.created_at, event.expires_at,
    )  # fmt: skip
    output_name, error_name = virtual_file_names(event.batch_id)
    await conn.executemany(
        "INSERT INTO files (id, owner, filename, purpose, size_finalized, batch_id, created_at)"
        " VALUES ($1, $2, $3, $4, false, $5, $6) ON CONFLICT (id) DO NOTHING",
        [
            (ids.output_file_id(event.batch_id), event.owner, output_name, "batch_output",
             event.batch_id, event.created_at),
            (ids.error_file_id(event.batch_id), event.owner, error_name, "batch_error",
             event.batch_id, event.created_at),
        ],
    )  # fmt: skip
    await _apply_deletions(conn, [event.input_file_id, event.output_file_id, event.error_file_id])


# -- requests ------------------------------------------------------------------------------


async def _write_rows(conn: asyncpg.Connection, writes: list[RowWrite], touched: set[str]) -> list[str]:  # fmt: skip
    """Apply ``writes``; adds the batches they touched and returns the ids of those whose row
    was not where their first event left it."""
    if not writes:
        return []
    found = await conn.fetch(
        _UPDATE_ROWS,
        [w.id for w in writes],
        [w.first_offset for w in writes],
        [w.last_offset for w in writes],
        [w.from_state for w in writes],
        [w.state for w in writes],
        [w.mask for w in writes],
        [w.retried_version for w in writes],
        *[[w.values.get(c) for w in writes] for c in COLUMNS],
    )
    touched |= {str(r["batch_id"]) for r in found if r["missed"] is None}
    reopened = [(r["batch_id"], r["reopened"]) for r in found if r["reopened"] is not None]
    if reopened:
        await conn.execute(_REOPEN, *zip(*reopened, strict=True))
    return [str(r["missed"]) for r in found if r["missed"] is not None]


async def _requests(conn: asyncpg.Connection, records: list[ConsumerRecord], applied: Applied, stored: dict[str, list[ConsumerRecord]]) -> set[str]:  # fmt: skip
    rejected = applied.rejected
    fold = Fold()
    origin: dict[int, ConsumerRecord] = {}
    for record in records:
        batch = _decode(codec.lifecycle, record, rejected)
        if batch is None:
            continue
        for index, event in enumerate(batch.events):
            origin[id(event)] = record
            fold.apply(event, position(record.offset, index))
    for event, reason in fold.rejected:
        request = getattr(event, "request_id", "?")
        rejected.append((origin[id(event)], f"{reason} (request {request})"))
    touched: set[str] = set()
    if fold.new_rows:
        rows = list(fold.new_rows.values())
        await conn.execute(_INSERT_ROWS, *[[getattr(r, f) for r in rows] for f in _NEW_ROW_FIELDS])
        touched |= {r.batch_id for r in rows if r.batch_id is not None}
    if fold.writes:
        missed = await _write_rows(conn, list(fold.writes.values()), touched)
        if missed:
            # Rows past their write's first event: their events again from where each row is.
            found = await conn.fetch(
                "SELECT id, state, last_offset FROM requests WHERE id = ANY($1::uuid[])", missed
            )
            again = [rebuilt(fold.steps[str(r["id"])], r["state"], r["last_offset"]) for r in found]
            await _write_rows(conn, [w for w in again if w is not None], touched)
    if fold.realtime:
        outcomes = [(e, off, next_state(None, e)) for e, off in fold.realtime.values()]
        await conn.execute(
            _REALTIME_OUTCOMES,
            *zip(
                *[
                    (e.request_id, e.model, e.facts.owner, state, e.facts.deadline,
                     e.facts.created_at, e.facts.service_tier, e.facts.path, e.facts.background,
                     e.facts.api_key_id, e.status, e.size, e.occurred_at, off)
                    for e, off, state in outcomes
                ],
                strict=True,
            ),
        )  # fmt: skip
    if fold.erased:
        erased = list(fold.erased)
        touched |= {str(r["id"]) for r in await conn.fetch(_ERASE_ROWS, erased)}
        # A body stored before the erasure may be newer on the topic than the commands agent's
        # tombstones (a result that raced the erasure): tombstoned again, or compaction keeps
        # it. This poll's own bodies are _erased_bodies' (it knows their partitions).
        gone = await conn.fetch(
            "DELETE FROM bodies WHERE ref = ANY($1::uuid[]) RETURNING kind, ref::text AS ref",
            erased,
        )
        applied.tombstones += [
            (
                bodies.key(r["kind"], r["ref"]).encode(),
                bodies.partition_for(r["ref"], topics.BODIES.partitions),
            )  # fmt: skip
            for r in gone
            if r["ref"] not in stored
        ]
        await conn.execute(
            "INSERT INTO erased_requests (id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING",
            erased,
        )
    applied.settled |= settled(fold)
    return touched


# -- model filters, workers, keys ----------------------------------------------------------


async def _model_filters(conn: asyncpg.Connection, records: list[ConsumerRecord], rejected: Rejected) -> None:  # fmt: skip
    events = [e for e in (_decode(codec.model_filters, r, rejected) for r in records) if e]
    if events:
        await conn.executemany(
            "INSERT INTO model_filters (event_id, model, state, expected_ready_at, created_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
            [(e.event_id, e.model, e.state, e.expected_ready_at, e.occurred_at) for e in events],
        )


async def _workers(conn: asyncpg.Connection, records: list[ConsumerRecord], rejected: Rejected) -> None:  # fmt: skip
    """Daemon records (core §1.5); a heartbeat never revives a worker recorded dead."""
    for record in records:
        event = _decode(codec.worker_events, record, rejected)
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


async def _keys(conn: asyncpg.Connection, records: list[ConsumerRecord], rejected: Rejected) -> None:  # fmt: skip
    for record in records:
        if record.value is None:
            continue  # compaction tombstone of a key record: nothing was ever deleted this way
        event = _decode(codec.api_keys, record, rejected)
        if not isinstance(event, ApiKey):
            continue
        try:
            digest = bytes.fromhex(event.key_hash)
        except ValueError:
            rejected.append((record, "key_hash must be hex"))
            continue
        await conn.execute("INSERT INTO users (id) VALUES ($1) ON CONFLICT DO NOTHING", event.user)
        await conn.execute(
            "INSERT INTO api_keys (id, user_id, key_hash, created_at, revoked_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET"
            " revoked_at = COALESCE(api_keys.revoked_at, EXCLUDED.revoked_at)",
            event.key_id, event.user, digest, event.created_at, event.revoked_at,
        )  # fmt: skip


# -- responses (multi-step chains) ---------------------------------------------------------

# Chain events fold per step within a poll: the first start, the first terminal fact (later
# ones are redeliveries or a late result of an abandoned step: the first one won at the agent
# too), the last event's time and position. SQL then moves each row only forward from the
# state it has, so a replayed poll changes nothing.
_INSERT_STEPS = """
INSERT INTO response_steps (id, request_id, prev_step_id, parent_step_id, step_kind,
                            step_sequence, tool, request_payload, state, created_at, updated_at,
                            last_offset)
SELECT u.id, u.request_id, u.prev_step_id, u.parent_step_id, u.kind, u.seq, u.tool, b.body,
       'pending', u.at, u.at, u.off
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::bigint[],
            $7::text[], $8::timestamptz[], $9::bigint[])
     AS u(id, request_id, prev_step_id, parent_step_id, kind, seq, tool, at, off)
LEFT JOIN bodies b ON b.ref = u.id AND b.kind = 'sreq'
ON CONFLICT (id) DO NOTHING
"""
_LIVE = "s.state IN ('pending', 'processing')"
# Until its serr body is projected, a failed step's error says only that it failed: §1.2 wants
# one, and the body (acknowledged before the event) is normally there already.
_ERROR_UNKNOWN = b'{"type":"step_failed"}'
_MOVE_STEPS = f"""
UPDATE response_steps s SET
    state = CASE WHEN u.terminal IS NOT NULL AND {_LIVE} THEN u.terminal
                 WHEN u.started IS NOT NULL AND s.state = 'pending' THEN 'processing'
                 ELSE s.state END,
    started_at = CASE WHEN s.state <> 'pending' THEN s.started_at
                      WHEN u.terminal = 'completed' THEN COALESCE(u.started, u.ended)
                      ELSE u.started END,
    completed_at = CASE WHEN u.terminal = 'completed' AND {_LIVE} THEN u.ended
                        ELSE s.completed_at END,
    failed_at = CASE WHEN u.terminal = 'failed' AND {_LIVE} THEN u.ended ELSE s.failed_at END,
    response_payload = CASE WHEN u.terminal = 'completed' AND {_LIVE}
        THEN (SELECT b.body FROM bodies b WHERE b.ref = s.id AND b.kind = 'sres')
        ELSE s.response_payload END,
    error = CASE WHEN u.terminal = 'failed' AND {_LIVE}
        THEN COALESCE((SELECT b.body FROM bodies b WHERE b.ref = s.id AND b.kind = 'serr'), $6)
        ELSE s.error END,
    updated_at = u.at,
    last_offset = u.off
FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::timestamptz[],
            $5::timestamptz[], $7::bigint[]) AS u(id, started, terminal, ended, at, off)
WHERE s.id = u.id AND s.last_offset < u.off
"""
# A step payload projected after its step's event (the topics are read independently).
_FILL_STEPS = """
UPDATE response_steps s SET
    request_payload = COALESCE(q.body, s.request_payload),
    response_payload = CASE WHEN s.state = 'completed' THEN COALESCE(r.body, s.response_payload)
                            ELSE s.response_payload END,
    error = CASE WHEN s.state = 'failed' THEN COALESCE(e.body, s.error) ELSE s.error END
FROM unnest($1::uuid[]) AS t(id)
LEFT JOIN bodies q ON q.ref = t.id AND q.kind = 'sreq'
LEFT JOIN bodies r ON r.ref = t.id AND r.kind = 'sres'
LEFT JOIN bodies e ON e.ref = t.id AND e.kind = 'serr'
WHERE s.id = t.id
"""
# Erasure: a tombstoned payload leaves its step's copy too (an erased error reads as unknown).
# One row per step: an UPDATE applies only one of several joined rows to a target.
_ERASE_STEPS = """
UPDATE response_steps s SET
    request_payload = CASE WHEN t.request THEN NULL ELSE s.request_payload END,
    response_payload = CASE WHEN t.response THEN NULL ELSE s.response_payload END,
    error = CASE WHEN t.error AND s.error IS NOT NULL THEN $4 ELSE s.error END
FROM unnest($1::uuid[], $2::bool[], $3::bool[], $5::bool[]) AS t(id, request, response, error)
WHERE s.id = t.id
"""
_STEP_BODY_KINDS = (bodies.STEP_REQUEST, bodies.STEP_RESULT, bodies.STEP_ERROR)


class _StepMove(msgspec.Struct):
    at: Any
    off: int
    started: Any = None
    terminal: str | None = None
    ended: Any = None


async def _responses(
    conn: asyncpg.Connection,
    records: list[ConsumerRecord],
    body_records: list[ConsumerRecord],
    rejected: Rejected,
) -> None:
    chains: dict[str, tuple[ChainStarted, int]] = {}
    recorded: dict[str, tuple[StepRecorded, int]] = {}
    moves: dict[str, _StepMove] = {}
    finalized: dict[str, tuple[ResponseFinalized, int]] = {}
    for record in records:
        event = _decode(codec.chain_events, record, rejected)
        if event is None:
            continue
        off = position(record.offset, 0)
        if isinstance(event, ChainStarted):
            chains.setdefault(event.response_id, (event, off))
        elif isinstance(event, StepRecorded):
            recorded.setdefault(event.step_id, (event, off))
        elif isinstance(event, ResponseFinalized):
            finalized.setdefault(event.response_id, (event, off))
        elif isinstance(event, ChainAborted):
            continue  # the gate's word to the chain agent; its ResponseFinalized follows
        else:
            move = moves.setdefault(event.step_id, _StepMove(event.occurred_at, off))
            move.at, move.off = event.occurred_at, off
            if isinstance(event, StepStarted):
                move.started = move.started or event.occurred_at
            elif move.terminal is None:
                move.terminal = "completed" if isinstance(event, StepCompleted) else "failed"
                move.ended = event.occurred_at
    if chains:
        await conn.executemany(
            "INSERT INTO response_chains (id, owner, model, background, created_at, last_offset)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
            [
                (e.response_id, e.facts.owner, e.model, e.facts.background, e.facts.created_at, off)
                for e, off in chains.values()
            ],
        )
    if recorded:
        rows = [
            (e.step_id, e.request_id, e.prev_step_id, e.parent_step_id, e.kind, e.sequence,
             e.tool, e.occurred_at, off)
            for e, off in recorded.values()
        ]  # fmt: skip
        await conn.execute(_INSERT_STEPS, *[list(c) for c in zip(*rows, strict=True)])
    if moves:
        await conn.execute(
            _MOVE_STEPS,
            list(moves),
            [m.started for m in moves.values()],
            [m.terminal for m in moves.values()],
            [m.ended for m in moves.values()],
            [m.at for m in moves.values()],
            _ERROR_UNKNOWN,
            [m.off for m in moves.values()],
        )
    if finalized:
        await conn.executemany(
            "UPDATE response_chains SET finalized_at = $2, final_status = $3, last_offset = $4"
            " WHERE id = $1 AND finalized_at IS NULL AND last_offset < $4",
            [(e.response_id, e.occurred_at, e.status, off) for e, off in finalized.values()],
        )
    await _step_bodies(conn, body_records)


async def _step_bodies(conn: asyncpg.Connection, records: list[ConsumerRecord]) -> None:
    """Copy the step payloads of this poll into steps that were projected before them."""
    latest: dict[tuple[str, str], bool] = {}  # (step id, kind) -> erased
    for record in records:
        if record.key is None:
            continue
        kind, _, ref = record.key.decode("utf-8", "replace").partition(":")
        if kind in _STEP_BODY_KINDS and _is_uuid(ref):
            latest[(ref, kind)] = record.value is None
    filled = sorted({ref for (ref, _), erased in latest.items() if not erased})
    if filled:
        await conn.execute(_FILL_STEPS, filled)
    erased: dict[str, set[str]] = {}
    for (ref, kind), gone in latest.items():
        if gone:
            erased.setdefault(ref, set()).add(kind)
    if erased:
        kinds = list(erased.values())
        await conn.execute(
            _ERASE_STEPS,
            list(erased),
            [bodies.STEP_REQUEST in k for k in kinds],
            [bodies.STEP_RESULT in k for k in kinds],
            _ERROR_UNKNOWN,
            [bodies.STEP_ERROR in k for k in kinds],
        )


# -- webhooks (batch notifications, core §4.9) ----------------------------------------------

# A delivery is open until an attempt delivers it or gives up; an attempt projected before its
# notification (the topics are read independently) is taken into account when it arrives, and
# so is its endpoint's deletion (a replay may read the compacted webhooks topic, which holds the
# deleted record only, first: the delivery would stay open, never sent and never purged).
_OPEN_DELIVERIES = """
INSERT INTO webhook_open (delivery_id, attempts, due_at)
SELECT u.id, COALESCE(a.attempt, 0), COALESCE(a.next_attempt_at, $2)
FROM unnest($1::uuid[], $3::uuid[]) AS u(id, webhook_id)
LEFT JOIN LATERAL (
    SELECT attempt, outcome, next_attempt_at FROM webhook_attempts w
    WHERE w.delivery_id = u.id ORDER BY attempt DESC LIMIT 1
) a ON true
WHERE (a.outcome IS NULL OR a.outcome = 'retry')
  AND NOT EXISTS (SELECT 1 FROM webhooks e WHERE e.id = u.webhook_id AND e.deleted_at IS NOT NULL)
ON CONFLICT (delivery_id) DO NOTHING
"""


async def _batch_notified(conn: asyncpg.Connection, event: BatchNotified) -> None:
    """The first notification of a batch's ``retry_version`` stamps it and opens its
    deliveries; a later one (a replica that raced, a replay) changes nothing. A stamp of an
    earlier version may still be there in a replay (see _REOPEN): it is replaced."""
    hit = await conn.fetchval(
        "UPDATE batches SET notification_sent_at = $2, notified_version = $3 WHERE id = $1"
        " AND retry_version = $3"
        " AND (notification_sent_at IS NULL OR notified_version < $3) RETURNING true",
        event.batch_id, event.occurred_at, event.retry_version,
    )  # fmt: skip
    if not hit or not event.deliveries:
        return
    await conn.executemany(
        "INSERT INTO webhook_deliveries (id, webhook_id, batch_id, owner, event_type,"
        " notification_id, terminal_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (id) DO NOTHING",
        [
            (d.delivery_id, d.webhook_id, event.batch_id, event.owner, event.event_type,
             event.notification_id, event.terminal_at, event.occurred_at)
            for d in event.deliveries
        ],
    )  # fmt: skip
    await conn.execute(
        _OPEN_DELIVERIES,
        [d.delivery_id for d in event.deliveries],
        event.occurred_at,
        [d.webhook_id for d in event.deliveries],
    )


async def _webhooks(conn: asyncpg.Connection, records: list[ConsumerRecord], rejected: Rejected) -> None:  # fmt: skip
    """Endpoint registrations; a deleted endpoint stays deleted and loses its secret."""
    for record in records:
        if record.value is None:
            continue  # compaction tombstone: endpoints are deleted by a record, not this way
        event = _decode(codec.webhooks, record, rejected)
        if event is None:
            continue
        secret = event.secret
        await conn.execute(
            "INSERT INTO webhooks (id, owner, url, name, event_types, secret_key_id,"
            " secret_sealed, secret_hint, created_at, deleted_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO UPDATE SET"
            " deleted_at = COALESCE(webhooks.deleted_at, EXCLUDED.deleted_at),"
            " secret_key_id = CASE WHEN EXCLUDED.deleted_at IS NULL AND webhooks.deleted_at IS NULL"
            "   THEN EXCLUDED.secret_key_id END,"
            " secret_sealed = CASE WHEN EXCLUDED.deleted_at IS NULL AND webhooks.deleted_at IS NULL"
            "   THEN EXCLUDED.secret_sealed END",
            event.webhook_id, event.owner, event.url, event.name, event.event_types,
            None if secret is None else secret.key_id, None if secret is None else secret.sealed,
            event.secret_hint, event.created_at, event.deleted_at,
        )  # fmt: skip
        if event.deleted_at is not None:
            await conn.execute(
                "DELETE FROM webhook_open o USING webhook_deliveries d"
                " WHERE d.id = o.delivery_id AND d.webhook_id = $1",
                event.webhook_id,
            )


async def _webhook_attempts(conn: asyncpg.Connection, records: list[ConsumerRecord], rejected: Rejected) -> None:  # fmt: skip
    attempts = [e for e in (_decode(codec.webhook_attempts, r, rejected) for r in records) if e]
    if not attempts:
        return
    await conn.executemany(
        "INSERT INTO webhook_attempts (delivery_id, attempt, webhook_id, attempted_at, outcome,"
        " status_code, error, duration_ms, next_attempt_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        [
            (e.delivery_id, e.attempt, e.webhook_id, e.attempted_at, e.outcome, e.status_code,
             e.error, e.duration_ms, e.next_attempt_at)
            for e in attempts
        ],
    )  # fmt: skip
    # The latest attempt of each delivery decides: closed, or due again at its next time.
    latest: dict[str, Any] = {}
    for e in attempts:
        if e.delivery_id not in latest or e.attempt > latest[e.delivery_id].attempt:
            latest[e.delivery_id] = e
    ended = [e.delivery_id for e in latest.values() if e.outcome != "retry"]
    again = [e for e in latest.values() if e.outcome == "retry"]
    if ended:
        await conn.execute("DELETE FROM webhook_open WHERE delivery_id = ANY($1::uuid[])", ended)
    if again:
        await conn.execute(
            "UPDATE webhook_open o SET attempts = u.attempt, due_at = u.due"
            " FROM unnest($1::uuid[], $2::int[], $3::timestamptz[]) AS u(id, attempt, due)"
            " WHERE o.delivery_id = u.id AND o.attempts < u.attempt",
            [e.delivery_id for e in again],
            [e.attempt for e in again],
            [e.next_attempt_at or e.attempted_at for e in again],
        )
