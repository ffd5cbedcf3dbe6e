"""Read-model queries used by the HTTP API. Every query is scoped to the caller (owner), so
another user's resource is indistinguishable from a missing one.

Downloads read in pages (keyset pagination), each page on a connection taken from the pool
and given back at once: a client that reads slowly holds no database connection.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from projections.rules.requests import ListFilter

# With the batch's counters, from which its virtual output/error files are sized (core §1.3.4,
# projections.rules.content.file_bytes).
_FILE_COLUMNS = """
    f.id::text AS id, f.owner, f.filename, f.purpose, f.status, f.created_at, f.expires_at,
    f.batch_id::text AS batch_id, f.bytes, COALESCE(c.completed, 0) AS completed,
    COALESCE(c.response_bytes, 0) AS response_bytes, COALESCE(c.failed, 0) AS failed,
    COALESCE(c.error_bytes, 0) AS error_bytes
"""
_FILE_FROM = "FROM files f LEFT JOIN batch_counts c ON c.batch_id = f.batch_id"
# A file is visible until deleted; a batch's output and error files also vanish with their
# batch (README decisions: deleting a batch hides its files at once).
_VISIBLE = (
    "f.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM batches vb WHERE vb.id = f.batch_id"
    " AND vb.deleted_at IS NOT NULL)"
)


def like_pattern(text: str) -> str:
    """A substring match for ILIKE in which ``%``, ``_`` and ``\\`` mean themselves."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def get_file(pool: asyncpg.Pool, file_id: str, owner: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f"SELECT {_FILE_COLUMNS} {_FILE_FROM} WHERE f.id = $1 AND f.owner = $2 AND {_VISIBLE}",
        file_id,
        owner,
    )


async def file_exists(pool: asyncpg.Pool, file_id: str) -> bool:
    """Whether the projection has the file, deleted or not (read-your-writes waits)."""
    return bool(await pool.fetchval("SELECT true FROM files WHERE id = $1", file_id))


async def file_deleted(pool: asyncpg.Pool, file_id: str) -> bool:
    return bool(
        await pool.fetchval("SELECT deleted_at IS NOT NULL FROM files WHERE id = $1", file_id)
    )


async def list_files(
    pool: asyncpg.Pool,
    owner: str,
    *,
    after: str | None,
    limit: int,
    ascending: bool,
    purpose: str | None,
    search: str | None = None,
) -> list[asyncpg.Record]:
    op, direction = (">", "ASC") if ascending else ("<", "DESC")
    args: list[Any] = [owner, limit]
    where = f"f.owner = $1 AND {_VISIBLE}"
    if purpose is not None:
        args.append(purpose)
        where += f" AND f.purpose = ${len(args)}"
    if search is not None:
        args.append(like_pattern(search))
        where += f" AND f.filename ILIKE ${len(args)}"
    if after is not None:
        # A cursor deleted since its page was served still marks the place, so that a client
        # deleting what it lists, page by page, goes on to the next page.
        cursor = await pool.fetchrow(
            "SELECT f.created_at, f.id FROM files f WHERE f.id = $1 AND f.owner = $2",
            after,
            owner,
        )
        if cursor is None:
            return []  # an unknown or foreign cursor gives an empty page
        args += [cursor["created_at"], cursor["id"]]
        where += f" AND (f.created_at, f.id) {op} (${len(args) - 1}, ${len(args)})"
    return list(
        await pool.fetch(
            f"SELECT {_FILE_COLUMNS} {_FILE_FROM} WHERE {where}"
            f" ORDER BY f.created_at {direction}, f.id {direction} LIMIT $2",
            *args,
        )
    )


async def _chunks_of(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> dict[str, bytes]:
    """The template chunks holding the bodies of ``rows`` (each row names its ``body_key``)."""
    keys = sorted({r["body_key"] for r in rows})
    chunks = await conn.fetch(
        "SELECT body_key, body FROM template_chunks WHERE body_key = ANY($1)", keys
    )
    return {r["body_key"]: bytes(r["body"]) for r in chunks}


async def input_page(
    pool: asyncpg.Pool,
    file_id: str,
    *,
    after_line: int | None,
    skip: int,
    limit: int,
    search: str | None,
) -> tuple[list[asyncpg.Record], dict[str, bytes]]:
    """A page of an input file's lines in line order (after ``after_line``, else from the
    ``skip``-th match) and the chunk records holding their bodies."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT line_number, custom_id, method, path, body_key FROM request_templates"
            " WHERE file_id = $1 AND ($2::text IS NULL OR custom_id ILIKE $2)"
            " AND line_number > COALESCE($3::int, -1)"  # a range the index seeks to
            " ORDER BY line_number OFFSET $4 LIMIT $5",
            file_id,
            None if search is None else like_pattern(search),
            after_line,
            skip,
            limit,
        )
        return rows, await _chunks_of(conn, rows)


_BODY = "(SELECT b.body FROM bodies b WHERE b.ref = r.id AND b.kind = '{kind}')"
#: A failed row's error envelope (over requests ``r``): the engine's own, kept on the row, else
#: the upstream's from the bodies topic (``body``; also where envelopes projected before
#: migration 018 stay).
ERROR_ENVELOPE = "COALESCE(r.error_envelope, {body})"


def _result_query(state: str) -> str:
    at = "completed_at" if state == "completed" else "failed_at"
    kind = "res" if state == "completed" else "err"
    body = "b.body" if state == "completed" else f"{ERROR_ENVELOPE.format(body='b.body')} AS body"
    return (
        f"SELECT r.id::text AS id, t.custom_id, r.response_status, r.{at} AS at, {body}"
        " FROM requests r"
        " LEFT JOIN request_templates t ON t.file_id = r.file_id AND t.line_number = r.line_number"
        f" LEFT JOIN bodies b ON b.ref = r.id AND b.kind = '{kind}'"
        f" WHERE r.batch_id = $1 AND r.state = '{state}'"
        " AND ($2::text IS NULL OR t.custom_id ILIKE $2)"
        f" AND ($3::timestamptz IS NULL OR (r.{at}, r.id) > ($3, $4::uuid))"
        f" ORDER BY r.{at}, r.id OFFSET $5 LIMIT $6"
    )


async def result_page(
    pool: asyncpg.Pool,
    batch_id: str,
    state: str,
    *,
    after: tuple[datetime, str] | None,
    skip: int,
    limit: int,
    search: str | None,
) -> list[asyncpg.Record]:
    """A page of a batch's output (completed) or error (failed) lines, in the order new ones
    only append to: (completed_at | failed_at, id)."""
    return list(
        await pool.fetch(
            _result_query(state),
            batch_id,
            None if search is None else like_pattern(search),
            None if after is None else after[0],
            None if after is None else after[1],
            skip,
            limit,
        )
    )


async def results_missing_bodies(pool: asyncpg.Pool, batch_id: str, state: str) -> int:
    """Terminal rows whose body has not been projected yet (bodies travel on their own topic)."""
    kind = "res" if state == "completed" else "err"
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM requests r WHERE r.batch_id = $1 AND r.state = $2"
            " AND r.error_envelope IS NULL"
            f" AND NOT EXISTS (SELECT 1 FROM bodies b WHERE b.ref = r.id AND b.kind = '{kind}')",
            batch_id,
            state,
        )
    )


_BATCH_COLUMNS = """
    b.id::text AS id, b.owner, b.endpoint, b.input_file_id::text AS input_file_id,
    b.completion_window, b.metadata, b.output_file_id::text AS output_file_id,
    b.error_file_id::text AS error_file_id, b.created_at, b.expires_at,
    b.requests_started_at, b.cancelling_at, b.cancelled_at, b.finalizing_at, b.completed_at,
    b.failed_at, b.errors_message, b.total_requests AS total,
    COALESCE(c.pending, 0) AS pending, COALESCE(c.in_progress, 0) AS in_progress,
    COALESCE(c.completed, 0) AS completed, COALESCE(c.failed, 0) AS failed,
    COALESCE(c.canceled, 0) AS canceled, b.retry_version, b.counts_frozen_at,
    b.completed_requests, b.failed_requests, b.canceled_requests
"""
_BATCH_FROM = "FROM batches b LEFT JOIN batch_counts c ON c.batch_id = b.id"

# Listing filter (core §1.3.3), with `expired` meaning the `expired` status (README decisions;
# the same rule as projections.api.batches.expired_at).
_EXPIRED = (
    "(now() > b.expires_at AND b.requests_started_at IS NOT NULL AND b.cancelling_at IS NULL"
    " AND NOT COALESCE(b.completed_at <= b.expires_at OR b.failed_at <= b.expires_at"
    " OR b.cancelled_at <= b.expires_at, false))"
)
STATUS_FILTERS = {
    "in_progress": "b.completed_at IS NULL AND b.failed_at IS NULL AND b.cancelled_at IS NULL"
    f" AND b.cancelling_at IS NULL AND NOT {_EXPIRED}",
    "completed": f"b.completed_at IS NOT NULL AND NOT {_EXPIRED}",
    "failed": f"b.failed_at IS NOT NULL AND b.completed_at IS NULL AND NOT {_EXPIRED}",
    "cancelled": "(b.cancelled_at IS NOT NULL OR b.cancelling_at IS NOT NULL)",
    "expired": _EXPIRED,
}


async def get_batch(pool: asyncpg.Pool, batch_id: str, owner: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f"SELECT {_BATCH_COLUMNS} {_BATCH_FROM}"
        " WHERE b.id = $1 AND b.owner = $2 AND b.deleted_at IS NULL",
        batch_id,
        owner,
    )


async def batch_by_result_file(pool: asyncpg.Pool, file_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        f"SELECT {_BATCH_COLUMNS} {_BATCH_FROM} WHERE $1 IN (b.output_file_id, b.error_file_id)",
        file_id,
    )


# list_batches' groups with `active_first` (core §2.3): active batches (no terminal or cancel
# stamp) before the rest.
_GROUP = (
    "(CASE WHEN b.completed_at IS NULL AND b.failed_at IS NULL AND b.cancelled_at IS NULL"
    " AND b.cancelling_at IS NULL THEN 0 ELSE 1 END)"
)


async def list_batches(
    pool: asyncpg.Pool,
    owner: str,
    *,
    after: str | None,
    limit: int,
    status: str | None,
    windows: list[str] | None,
    created_after: datetime | None,
    created_before: datetime | None,
    active_first: bool = False,
) -> list[asyncpg.Record]:
    args: list[Any] = [owner, limit]
    where = ["b.owner = $1", "b.deleted_at IS NULL"]
    if status is not None:
        where.append(STATUS_FILTERS[status])
    if windows is not None:
        args.append(windows)
        where.append(f"b.completion_window = ANY(${len(args)}::text[])")
    if created_after is not None:
        args.append(created_after)
        where.append(f"b.created_at >= ${len(args)}")
    if created_before is not None:
        args.append(created_before)
        where.append(f"b.created_at <= ${len(args)}")
    order = f"{_GROUP}, " if active_first else ""
    if after is not None:
        cursor = await pool.fetchrow(
            f"SELECT {_GROUP} AS grp, b.created_at, b.id FROM batches b"
            " WHERE b.id = $1 AND b.owner = $2",  # deleted since, it still marks the place
            after,
            owner,
        )
        if cursor is None:
            return []  # an unknown or foreign cursor gives an empty page (§8.3, as files)
        args += [cursor["created_at"], cursor["id"]]
        beyond = f"(b.created_at, b.id) < (${len(args) - 1}, ${len(args)})"
        if active_first:  # strictly after the cursor's (group, created_at, id)
            args.append(cursor["grp"])
            beyond = f"({_GROUP} > ${len(args)} OR ({_GROUP} = ${len(args)} AND {beyond}))"
        where.append(beyond)
    return list(
        await pool.fetch(
            f"SELECT {_BATCH_COLUMNS} {_BATCH_FROM} WHERE {' AND '.join(where)}"
            f" ORDER BY {order}b.created_at DESC, b.id DESC LIMIT $2",
            *args,
        )
    )


async def batch_exists(pool: asyncpg.Pool, batch_id: str) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT true FROM batches WHERE id = $1 AND owner IS NOT NULL", batch_id
        )
    )


async def batch_rejection(pool: asyncpg.Pool, batch_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM batch_rejections WHERE batch_id = $1", batch_id)


async def batch_cancelling_or_ended(pool: asyncpg.Pool, batch_id: str) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT cancelling_at IS NOT NULL OR completed_at IS NOT NULL"
            " OR failed_at IS NOT NULL FROM batches WHERE id = $1",
            batch_id,
        )
    )


async def line_urls(pool: asyncpg.Pool, file_id: str) -> dict[str, int]:
    """The first (0-based) line of each distinct url in a file, for the endpoint check."""
    rows = await pool.fetch(
        "SELECT path, min(line_number) AS line FROM request_templates WHERE file_id = $1"
        " GROUP BY path",
        file_id,
    )
    return {r["path"]: r["line"] for r in rows}


async def projector_position(pool: asyncpg.Pool) -> int:
    """How far the projector has got, summed over partitions: grows while it makes progress."""
    return int(await pool.fetchval("SELECT COALESCE(sum(next_offset), 0) FROM projection_offsets"))


# -- requests without a batch (responses-and-api §4, §6) ----------------------------------


async def batchless_request(
    pool: asyncpg.Pool, request_id: str, owner: str
) -> asyncpg.Record | None:
    """A request without a batch with its stored bodies: the request (`body`), the response
    (`response_body`) and the error envelope (`error`). Batch rows are never visible here."""
    return await pool.fetchrow(
        "SELECT r.id::text AS id, r.state, r.model, r.owner, r.created_at, r.completed_at,"
        " r.failed_at, r.response_status, r.background, r.started_at, r.service_tier,"
        " r.last_offset,"
        f" {_BODY.format(kind='tpl')} AS body, {_BODY.format(kind='res')} AS response_body,"
        f" {ERROR_ENVELOPE.format(body=_BODY.format(kind='err'))} AS error"
        " FROM requests r WHERE r.id = $1 AND r.owner = $2 AND r.batch_id IS NULL",
        request_id,
        owner,
    )


async def request_exists(pool: asyncpg.Pool, request_id: str) -> bool:
    return bool(await pool.fetchval("SELECT true FROM requests WHERE id = $1", request_id))


async def request_settled(pool: asyncpg.Pool, request_id: str) -> bool:
    """Whether a request has ended and the body of its outcome (which travels on its own topic
    and may trail the row) has been projected too."""
    return bool(
        await pool.fetchval(
            "SELECT r.state IN ('completed', 'failed', 'canceled') AND (r.state = 'canceled'"
            " OR r.response_size = 0 OR (r.state = 'failed' AND r.error_envelope IS NOT NULL)"
            " OR EXISTS (SELECT 1 FROM bodies b WHERE b.ref = r.id"
            " AND b.kind = CASE r.state WHEN 'completed' THEN 'res' ELSE 'err' END))"
            " FROM requests r WHERE r.id = $1",
            request_id,
        )
    )


async def response_step(pool: asyncpg.Pool, step_id: str) -> asyncpg.Record | None:
    """A step of a multi-step response, without its payloads (§4.1 needs only its linkage)."""
    return await pool.fetchrow(
        "SELECT id::text AS id, request_id::text AS request_id, prev_step_id::text AS"
        " prev_step_id, parent_step_id::text AS parent_step_id, step_kind, step_sequence, state,"
        " created_at, updated_at FROM response_steps WHERE id = $1",
        step_id,
    )


# -- retry, deletion and results of a batch (core §2.3) ------------------------------------

_ROW = "id::text AS id, model, line_number, state, last_offset"


async def batch_rows_in(pool: asyncpg.Pool, batch_id: str, states: list[str]) -> list[asyncpg.Record]:  # fmt: skip
    """A batch's rows in ``states``, with where each one's last applied event was."""
    return list(
        await pool.fetch(
            f"SELECT {_ROW} FROM requests WHERE batch_id = $1 AND state = ANY($2::text[])",
            batch_id,
            states,
        )
    )


async def batch_rows_by_id(pool: asyncpg.Pool, batch_id: str, request_ids: list[str]) -> list[asyncpg.Record]:  # fmt: skip
    return list(
        await pool.fetch(
            f"SELECT {_ROW} FROM requests WHERE batch_id = $1 AND id = ANY($2::uuid[])",
            batch_id,
            request_ids,
        )
    )


async def batch_retry_version(pool: asyncpg.Pool, batch_id: str) -> int | None:
    version = await pool.fetchval("SELECT retry_version FROM batches WHERE id = $1", batch_id)
    return None if version is None else int(version)


async def rows_not_moved(pool: asyncpg.Pool, request_ids: list[str], offsets: list[int]) -> int:
    """How many of these rows still have no event applied past the given positions (rows
    that are gone have moved)."""
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM requests r JOIN unnest($1::uuid[], $2::bigint[]) AS u(id, off)"
            " ON r.id = u.id WHERE r.last_offset <= u.off",
            request_ids,
            offsets,
        )
    )


async def batch_deleted_and_quiet(pool: asyncpg.Pool, batch_id: str) -> bool:
    """Deleted, and every row it was populated with is known and terminal: nothing of it can
    be claimed or sent any more."""
    return bool(
        await pool.fetchval(
            "SELECT b.deleted_at IS NOT NULL AND (b.requests_started_at IS NULL OR"
            " (COALESCE(c.pending, 0) = 0 AND COALESCE(c.in_progress, 0) = 0 AND"
            " COALESCE(c.completed + c.failed + c.canceled, 0) >= b.total_requests))"
            f" {_BATCH_FROM} WHERE b.id = $1",
            batch_id,
        )
    )


async def results_page(
    pool: asyncpg.Pool,
    batch_id: str,
    *,
    states: list[str] | None,
    search: str | None,
    after_line: int | None,
    skip: int,
    limit: int,
) -> tuple[list[asyncpg.Record], dict[str, bytes]]:
    """A page of a batch's rows in line order with their custom ids, results and errors, and
    the chunk records holding their input bodies."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT r.id::text AS id, r.line_number, r.model, r.state, t.custom_id, t.body_key,"
            " CASE WHEN r.state = 'completed' THEN (SELECT b.body FROM bodies b"
            "   WHERE b.ref = r.id AND b.kind = 'res') END AS response_body,"
            " CASE WHEN r.state = 'failed' THEN"
            f" {ERROR_ENVELOPE.format(body=_BODY.format(kind='err'))} END AS error"
            " FROM requests r JOIN request_templates t"
            "   ON t.file_id = r.file_id AND t.line_number = r.line_number"
            " WHERE r.batch_id = $1 AND ($2::text[] IS NULL OR r.state = ANY($2::text[]))"
            " AND ($3::text IS NULL OR t.custom_id ILIKE $3)"
            " AND r.line_number > COALESCE($4::int, -1)"  # a range requests_batch_line seeks to
            " ORDER BY r.line_number OFFSET $5 LIMIT $6",
            batch_id,
            states,
            None if search is None else like_pattern(search),
            after_line,
            skip,
            limit,
        )
        return rows, await _chunks_of(conn, rows)


# -- requests without a batch: listing (core §2.4) -----------------------------------------

# active_first: processing, claimed, pending, then the rest.
_ACTIVE_RANK = (
    "CASE r.state WHEN 'processing' THEN 0 WHEN 'claimed' THEN 1 WHEN 'pending' THEN 2 ELSE 3 END"
)
# total_count is exact when it is cheap (the reference's budget), else the planner's estimate.
COUNT_BUDGET_MS = 100


def _requests_where(owner: str, f: ListFilter) -> tuple[str, list[Any]]:
    args: list[Any] = [owner]
    where = ["r.owner = $1", "r.batch_id IS NULL"]
    if f.status is not None:
        args.append(f.status)
        where.append(f"r.state = ${len(args)}")
    if f.models is not None:
        args.append(f.models)
        where.append(f"r.model = ANY(${len(args)}::text[])")
    if f.service_tiers is not None:
        args.append(f.service_tiers)
        where.append(f"r.service_tier = ANY(${len(args)}::text[])")
    if f.created_after is not None:
        args.append(f.created_after)
        where.append(f"r.created_at >= ${len(args)}")
    if f.created_before is not None:
        args.append(f.created_before)
        where.append(f"r.created_at <= ${len(args)}")
    return " AND ".join(where), args


async def list_requests(pool: asyncpg.Pool, owner: str, f: ListFilter) -> list[asyncpg.Record]:
    """One page (``limit`` + 1 rows, so the caller knows whether more follow)."""
    where, args = _requests_where(owner, f)
    order = f"{_ACTIVE_RANK}, " if f.active_first else ""
    args += [f.skip, f.limit + 1]
    return list(
        await pool.fetch(
            "SELECT r.id::text AS id, r.model, r.state, r.created_at, r.completed_at, r.failed_at,"
            " r.started_at, r.response_status, r.service_tier FROM requests r"
            f" WHERE {where} ORDER BY {order}r.created_at DESC, r.id DESC"
            f" OFFSET ${len(args) - 1} LIMIT ${len(args)}",
            *args,
        )
    )


async def count_requests(pool: asyncpg.Pool, owner: str, f: ListFilter) -> int:
    where, args = _requests_where(owner, f)
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL statement_timeout = {COUNT_BUDGET_MS}")
                return int(
                    await conn.fetchval(f"SELECT count(*) FROM requests r WHERE {where}", *args)
                )
        except asyncpg.QueryCanceledError:
            plan = await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) SELECT 1 FROM requests r WHERE {where}", *args
            )
    return int(msgspec.json.decode(plan)[0]["Plan"]["Plan Rows"])


async def request_moved(pool: asyncpg.Pool, request_id: str, offset: int) -> bool:
    """Whether an event past ``offset`` has been applied to the row (or the row is gone)."""
    moved = await pool.fetchval(
        "SELECT last_offset > $2 FROM requests WHERE id = $1", request_id, offset
    )
    return moved is None or bool(moved)
