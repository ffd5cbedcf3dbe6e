"""The purge (core §2.9, §4.9) against a real PostgreSQL, on a database of its own with rows
written by hand: it reaps only under soft-deleted parents, in bounded chunks, tombstones what
those rows held, two purgers take disjoint rows, and the latest model-filter event of each
model survives."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest

from cannonade.config import PurgeConfig
from compose import postgres, stack
from projections.purge import Purger, Round, run_once

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


@pytest.fixture
async def pool(stack_info: stack.StackInfo) -> AsyncIterator[asyncpg.Pool]:
    name = f"purge_{uuid.uuid4().hex[:8]}"
    dsn = await postgres.create_database(stack_info.admin_database_url, name)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=6)
    try:
        yield pool
    finally:
        await pool.close()
        await postgres.drop_database(stack_info.admin_database_url, name)


class Tombstones:
    """Collects what a purger tombstones; optionally waits on a barrier while it holds its
    locks (so two purgers are provably inside their passes at the same time)."""

    def __init__(self, barrier: asyncio.Barrier | None = None) -> None:
        self.keys: list[str] = []
        self.uploads: list[tuple[str, str]] = []  # abandoned (file id, upload id)
        self.barrier = barrier

    async def __call__(self, keys: Sequence[str]) -> None:
        if self.barrier is not None:
            await asyncio.wait_for(self.barrier.wait(), 30)
            self.barrier = None
        self.keys += keys

    async def abandon(self, uploads: Sequence[tuple[str, str]]) -> None:
        self.uploads += uploads


def _purger(pool: asyncpg.Pool, sink: Tombstones) -> Purger:
    return Purger(pool, sink, sink.abandon, timedelta(milliseconds=PurgeConfig().stale_upload_ms))


async def _batch(conn: asyncpg.Connection, *, deleted: bool, rows: int) -> list[str]:
    batch_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO batches (id, owner, created_at, expires_at, deleted_at)"
        " VALUES ($1, 'u', $2, $2, $3)",
        batch_id, NOW, NOW if deleted else None,
    )  # fmt: skip
    ids = [str(uuid.uuid4()) for _ in range(rows)]
    await conn.executemany(
        "INSERT INTO requests (id, batch_id, model, owner, state, deadline, created_at, last_offset,"
        " response_size) VALUES ($1, $2, 'm', 'u', 'completed', $3, $3, 0, 2)",
        [(i, batch_id, NOW) for i in ids],
    )
    await conn.executemany(
        "INSERT INTO bodies (ref, kind, body) VALUES ($1, 'res', 'ok')", [(i,) for i in ids]
    )
    return ids


async def _file(conn: asyncpg.Connection, *, deleted: bool, lines: int) -> tuple[str, str]:
    file_id = str(uuid.uuid4())
    chunk = f"tplc:{file_id}:{uuid.uuid4()}:0"
    await conn.execute(
        "INSERT INTO files (id, owner, filename, purpose, created_at, deleted_at)"
        " VALUES ($1, 'u', 'f', 'batch', $2, $3)",
        file_id, NOW, NOW if deleted else None,
    )  # fmt: skip
    await conn.executemany(
        "INSERT INTO request_templates (file_id, line_number, method, path, model, body_size,"
        " body_key) VALUES ($1, $2, 'POST', '/v1/chat/completions', 'm', 2, $3)",
        [(file_id, n, chunk) for n in range(lines)],
    )
    await conn.execute("INSERT INTO template_chunks (body_key, body) VALUES ($1, 'x')", chunk)
    return file_id, chunk


async def _count(conn: asyncpg.Connection, query: str, *args: object) -> int:
    return int(await conn.fetchval(query, *args))


async def test_purge_reaps_only_under_deleted_parents_in_bounded_chunks(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        dead_rows = await _batch(conn, deleted=True, rows=5)
        live_rows = await _batch(conn, deleted=False, rows=3)
        await conn.execute(  # a row without a batch is never purged here
            "INSERT INTO requests (id, model, owner, state, deadline, created_at, last_offset)"
            " VALUES ($1, 'm', 'u', 'completed', $2, $2, 0)",
            str(uuid.uuid4()), NOW,
        )  # fmt: skip
        dead_file, dead_chunk = await _file(conn, deleted=True, lines=5)
        live_file, live_chunk = await _file(conn, deleted=False, lines=2)

    sink = Tombstones()
    purger = _purger(pool, sink)
    passes = []
    while (reaped := await purger.orphaned_rows(2)).total:
        assert reaped.rows <= 2 and reaped.templates <= 2 and reaped.chunks <= 2
        assert reaped.stale_chunks == 0  # every chunk here is of a file
        passes.append(reaped)
    assert len(passes) == 3  # 5 rows and 5 templates by 2, then the freed chunk
    assert sum(p.rows for p in passes) == 5 and sum(p.templates for p in passes) == 5
    assert sum(p.chunks for p in passes) == 1

    async with pool.acquire() as conn:
        assert await _count(conn, "SELECT count(*) FROM requests WHERE id = ANY($1::uuid[])", dead_rows) == 0  # fmt: skip
        assert await _count(conn, "SELECT count(*) FROM requests WHERE id = ANY($1::uuid[])", live_rows) == 3  # fmt: skip
        assert await _count(conn, "SELECT count(*) FROM requests WHERE batch_id IS NULL") == 1
        assert await _count(conn, "SELECT count(*) FROM bodies WHERE ref = ANY($1::uuid[])", live_rows) == 3  # fmt: skip
        assert await _count(conn, "SELECT count(*) FROM bodies WHERE ref = ANY($1::uuid[])", dead_rows) == 0  # fmt: skip
        assert await _count(conn, "SELECT count(*) FROM request_templates WHERE file_id = $1", dead_file) == 0  # fmt: skip
        assert await _count(conn, "SELECT count(*) FROM request_templates WHERE file_id = $1", live_file) == 2  # fmt: skip
        assert await _count(conn, "SELECT count(*) FROM template_chunks WHERE body_key = $1", live_chunk) == 1  # fmt: skip
        # The parents themselves stay (soft-deleted), as core §2.9 has it.
        assert await _count(conn, "SELECT count(*) FROM files WHERE id = $1", dead_file) == 1
    assert sorted(sink.keys) == sorted([f"res:{r}" for r in dead_rows] + [dead_chunk])


async def test_two_purgers_take_disjoint_rows(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        rows = await _batch(conn, deleted=True, rows=120)
    # Both hold their first pass's locks at the barrier: neither waits for the other's rows.
    barrier = asyncio.Barrier(2)
    sinks = [Tombstones(barrier), Tombstones(barrier)]
    purgers = [_purger(pool, sink) for sink in sinks]

    async def drain(purger: Purger) -> int:
        total = 0
        while reaped := (await purger.orphaned_rows(40)).rows:
            total += reaped
        return total

    counts = await asyncio.wait_for(asyncio.gather(*map(drain, purgers)), 60)
    first, second = ({k.removeprefix("res:") for k in sink.keys} for sink in sinks)
    assert first and second and not first & second
    assert first | second == set(rows) and sum(counts) == 120


async def _filter(conn: asyncpg.Connection, model: str, state: str, at: datetime) -> int:
    return int(
        await conn.fetchval(
            "INSERT INTO model_filters (event_id, model, state, created_at)"
            " VALUES ($1, $2, $3, $4) RETURNING id",
            str(uuid.uuid4()),
            model,
            state,
            at,
        )  # fmt: skip
    )


async def test_model_filter_retention_keeps_the_newest_and_always_the_latest(pool: asyncpg.Pool) -> None:  # fmt: skip
    old = NOW - timedelta(days=10)
    async with pool.acquire() as conn:
        a = [await _filter(conn, "a", s, old + timedelta(minutes=i)) for i, s in enumerate(["live", "coming", "live", "absent", "live"])]  # fmt: skip
        b = [await _filter(conn, "b", "live", old)]
        recent = [await _filter(conn, "c", s, NOW - timedelta(minutes=5 - i)) for i, s in enumerate(["live", "coming", "live"])]  # fmt: skip
    purger = _purger(pool, Tombstones())
    retention = timedelta(days=7)
    # keep 2: model a loses its three oldest, two per pass, oldest ids first.
    assert await purger.model_filter_events(2, 2, retention) == 2
    assert await purger.model_filter_events(2, 2, retention) == 1
    assert await purger.model_filter_events(2, 2, retention) == 0
    async with pool.acquire() as conn:
        left = [r["id"] for r in await conn.fetch("SELECT id FROM model_filters ORDER BY id")]
    assert left == a[3:] + b + recent
    # keep 0 still keeps the latest event of every model; recent events stay whatever keep.
    assert await purger.model_filter_events(100, 0, retention) == 1
    async with pool.acquire() as conn:
        left = [r["id"] for r in await conn.fetch("SELECT id FROM model_filters ORDER BY id")]
    assert left == a[4:] + b + recent


async def test_a_purge_round_drains_everything_and_stops_on_request(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await _batch(conn, deleted=True, rows=7)
        await _file(conn, deleted=True, lines=3)
    config = PurgeConfig(batch_size=3, throttle_ms=1)
    assert await run_once(_purger(pool, Tombstones()), config) == Round(rows=7 + 3 + 1)
    stop = asyncio.Event()
    stop.set()
    assert await run_once(_purger(pool, Tombstones()), config, stop) == Round()


async def _endpoint(conn: asyncpg.Connection, *, deleted: bool) -> str:
    return str(
        await conn.fetchval(
            "INSERT INTO webhooks (id, owner, url, name, event_types, secret_hint, created_at,"
            " deleted_at) VALUES ($1, 'u', 'https://example.com/hook', 'h', '{}', 'whsec_…',"
            " $2, $3) RETURNING id",
            uuid.uuid4(),
            NOW - timedelta(days=90),
            NOW if deleted else None,
        )  # fmt: skip
    )


async def _delivery(conn: asyncpg.Connection, endpoint: str, at: datetime, *, ended: bool) -> str:
    """A delivery made at ``at`` with one attempt: delivered if ``ended``, else due again."""
    delivery = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO webhook_deliveries (id, webhook_id, batch_id, owner, event_type,"
        " notification_id, terminal_at, created_at)"
        " VALUES ($1, $2, $3, 'u', 'batch.completed', 'n', $4, $4)",
        delivery, endpoint, uuid.uuid4(), at,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO webhook_attempts (delivery_id, attempt, webhook_id, attempted_at, outcome)"
        " VALUES ($1, 1, $2, $3, $4)",
        delivery, endpoint, at, "delivered" if ended else "retry",
    )  # fmt: skip
    if not ended:
        await conn.execute(
            "INSERT INTO webhook_open (delivery_id, attempts, due_at) VALUES ($1, 1, $2)",
            delivery, NOW,
        )  # fmt: skip
    return delivery


async def test_webhook_history_goes_after_its_retention_or_with_its_endpoint(pool: asyncpg.Pool) -> None:  # fmt: skip
    old, recent = NOW - timedelta(days=31), NOW - timedelta(days=1)
    async with pool.acquire() as conn:
        live, gone = await _endpoint(conn, deleted=False), await _endpoint(conn, deleted=True)
        kept = [
            await _delivery(conn, live, recent, ended=True),
            await _delivery(conn, live, old, ended=False),  # still being delivered
        ]
        # Past the retention, or of a deleted endpoint: these go.
        for endpoint, at in ((live, old), (live, old - timedelta(days=1)), (gone, recent)):
            await _delivery(conn, endpoint, at, ended=True)
    config = PurgeConfig(batch_size=2, throttle_ms=1)
    # Retention 0 keeps the history for good.
    assert await run_once(_purger(pool, Tombstones()), msgspec.structs.replace(config, webhook_history_retention_ms=0)) == Round()  # fmt: skip
    assert await run_once(_purger(pool, Tombstones()), config) == Round(webhook_deliveries=3)
    async with pool.acquire() as conn:
        deliveries = {str(r["id"]) for r in await conn.fetch("SELECT id FROM webhook_deliveries")}
        attempts = {str(r["delivery_id"]) for r in await conn.fetch("SELECT delivery_id FROM webhook_attempts")}  # fmt: skip
    assert deliveries == attempts == set(kept)


async def test_an_upload_that_stopped_part_way_is_abandoned_and_its_chunks_reaped(pool: asyncpg.Pool) -> None:  # fmt: skip
    # Its API died between the parts and the file: no file row, chunks a day old. A younger
    # upload may still be arriving, and an old chunk of a file that exists is the file's.
    stale_file, stale_upload = str(uuid.uuid4()), str(uuid.uuid4())
    stale = [f"tplc:{stale_file}:{stale_upload}:{line}" for line in (0, 2900)]
    young = f"tplc:{uuid.uuid4()}:{uuid.uuid4()}:0"
    day_old = NOW - timedelta(days=1, minutes=1)
    async with pool.acquire() as conn:
        _, kept = await _file(conn, deleted=False, lines=2)
        await conn.executemany(
            "INSERT INTO template_chunks (body_key, body, projected_at) VALUES ($1, 'x', $2)",
            [(key, day_old) for key in stale] + [(young, NOW)],
        )
        await conn.execute("UPDATE template_chunks SET projected_at = $1 WHERE body_key = $2", day_old, kept)  # fmt: skip
    sink = Tombstones()
    reaped = await _purger(pool, sink).orphaned_rows(10)
    assert (reaped.chunks, reaped.stale_chunks, reaped.tombstones) == (0, 2, 2)
    assert sink.uploads == [(stale_file, stale_upload)]
    assert sorted(sink.keys) == sorted(stale)
    async with pool.acquire() as conn:
        left = {r["body_key"] for r in await conn.fetch("SELECT body_key FROM template_chunks")}
    assert left == {young, kept}
    assert not (await _purger(pool, sink).orphaned_rows(10)).total


async def test_a_stale_chunk_of_no_uploads_shape_is_reaped_without_an_abandon(pool: asyncpg.Pool) -> None:  # fmt: skip
    # A producer may write any chunk key straight to the bodies topic; one that names no
    # upload must not stop the pass (it would, every round, and nothing stale would go).
    key = "tplc:not-an-upload"
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO template_chunks (body_key, body, projected_at) VALUES ($1, 'x', $2)",
            key, NOW - timedelta(days=2),
        )  # fmt: skip
    sink = Tombstones()
    reaped = await _purger(pool, sink).orphaned_rows(10)
    assert (reaped.stale_chunks, sink.keys, sink.uploads) == (1, [key], [])


async def test_a_deleted_batch_s_row_in_flight_waits_and_a_chain_s_rows_go_with_their_head(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        head, running = await _batch(conn, deleted=True, rows=2)
        await conn.execute("UPDATE requests SET state = 'processing' WHERE id = $1", running)
        # The head ran a chain: its second model call has a row (and a result) of its own.
        call, call_row = str(uuid.uuid4()), str(uuid.uuid4())
        await conn.executemany(
            "INSERT INTO response_steps (id, request_id, parent_step_id, step_kind, step_sequence,"
            " state, created_at, updated_at, last_offset)"
            " VALUES ($1, $2, $3, 'model_call', $4, 'pending', $5, $5, 0)",
            [(head, head, None, 1, NOW), (call, call_row, head, 3, NOW)],
        )
        await conn.execute(
            "INSERT INTO requests (id, model, owner, state, deadline, created_at, last_offset)"
            " VALUES ($1, 'm', 'u', 'completed', $2, $2, 0)",
            call_row, NOW,
        )  # fmt: skip
        await conn.execute("INSERT INTO bodies (ref, kind, body) VALUES ($1, 'res', 'text')", call_row)  # fmt: skip

    sink = Tombstones()
    while (await _purger(pool, sink).orphaned_rows(10)).total:
        pass
    assert sorted(sink.keys) == sorted([f"res:{head}", f"res:{call_row}"])
    async with pool.acquire() as conn:
        left = await conn.fetch("SELECT id::text FROM requests WHERE id = ANY($1::uuid[])", [head, running, call_row])  # fmt: skip
        assert [r["id"] for r in left] == [running]  # in flight: it waits for its end
        erased = await conn.fetch("SELECT id::text FROM erased_requests WHERE id = ANY($1::uuid[])", [head, running, call_row])  # fmt: skip
        assert sorted(r["id"] for r in erased) == sorted([head, call_row])
