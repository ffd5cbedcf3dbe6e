"""A user's erasure (core §5.3, later rule): their prompt and completion text leaves the read
model and every Kafka topic.

What the user owns is read from the read model once the projector has applied everything
already on its topics; then:

1. their batches are soft-deleted with ``DeleteBatch(erase=True)`` (running ones are
   cancelled and their calls aborted; metadata is cleared), their uploaded files with
   ``DeleteFile``, their batchless rows erased — flex rows with ``DeleteRequest`` (the engine
   forgets and aborts them), realtime rows and chain sub-requests, which no engine record
   holds, with a ``RequestErased`` on the lifecycle topic as the API records them;
2. once that is projected and nothing of theirs runs any more, every body record of their
   content still in the read model is tombstoned on the bodies topic: the chunks of their
   uploads (``tplc:``, partitioned by file), their requests' bodies, results and errors
   (``tpl:``/``res:``/``err:``, by request) and their chains' step payloads
   (``sreq:``/``sres:``/``serr:``, by step); the projector deletes its copies, and the
   topic's compaction removes the records for good (a tombstone masks the record in a replay
   until then);
3. it waits until the read model shows all of it, and reports what it did.

It is idempotent: a second run finds nothing left to do and reports 0. Work that was still
ending when the first run looked (a late result) is what a second run catches, hence "repeat
until 0". Rows under the deleted batches and templates of the deleted files hold no text after
this; the purge reaps them (:mod:`projections.purge`).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from datetime import UTC, datetime

import asyncpg
import msgspec

from projections import catchup, tombstones
from projections.api.publisher import Publisher
from projections.projector import TOPICS as PROJECTED
from schemas import bodies, ids
from schemas.commands import DeleteBatch, DeleteFile, DeleteRequest
from schemas.events import RequestErased, RequestTransitions

_IN_FLIGHT = ("pending", "claimed", "processing")
_STEP_KINDS = [bodies.STEP_REQUEST, bodies.STEP_RESULT, bodies.STEP_ERROR]
_REQUEST_KINDS = [bodies.TEMPLATE, bodies.RESULT, bodies.ERROR]


class ErasureError(Exception):
    """The read model could not be brought up to date, or did not show the erasure in time."""


class Report(msgspec.Struct):
    batches: int = 0  # soft-deleted now (cancelled if they ran, metadata cleared)
    files: int = 0  # uploaded files soft-deleted now
    requests: int = 0  # requests without a batch erased now
    bodies: int = 0  # body records with content tombstoned now
    still_running: int = 0  # rows that had not ended when it looked: run it again

    @property
    def total(self) -> int:
        """What was done now plus what was found still running: 0 means nothing is left."""
        return self.batches + self.files + self.requests + self.bodies + self.still_running

    def summary(self, user: str) -> str:
        text = (
            f"erased {user}: {self.batches} batches deleted, {self.files} files deleted, "
            f"{self.requests} requests erased, {self.bodies} bodies tombstoned "
            f"(total {self.total})"
        )
        if self.still_running:
            text += f"; {self.still_running} rows were still running: run it again"
        return text


# -- what the user owns -------------------------------------------------------------------


async def _batches_to_erase(conn: asyncpg.Connection, user: str) -> list[str]:
    """Their batches to delete, and those deleted already that still hold their metadata."""
    rows = await conn.fetch(
        "SELECT id::text AS id FROM batches WHERE owner = $1"
        " AND (deleted_at IS NULL OR metadata IS NOT NULL) ORDER BY id",
        user,
    )
    return [r["id"] for r in rows]


async def _live_files(conn: asyncpg.Connection, user: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT id::text AS id FROM files WHERE owner = $1 AND deleted_at IS NULL"
        " AND batch_id IS NULL ORDER BY id",
        user,
    )
    return [r["id"] for r in rows]


async def _batchless(conn: asyncpg.Connection, user: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "SELECT id::text AS id, model, service_tier, state FROM requests"
            " WHERE owner = $1 AND batch_id IS NULL ORDER BY id",
            user,
        )
    )


def _erasable(row: asyncpg.Record) -> bool:
    """Flex rows go whatever their state (the engine aborts a running one). A realtime row or
    chain sub-request still running is left for the next run: its outcome, recorded by whoever
    runs it, would create it again."""
    return row["service_tier"] == "flex" or row["state"] not in _IN_FLIGHT


async def content_keys(conn: asyncpg.Connection, user: str) -> list[str]:
    """Keys of the body records holding the user's content that the read model still has
    (it copies every body record, so these are the ones still on the topic)."""
    chunks = await conn.fetch(
        "SELECT c.body_key FROM template_chunks c JOIN files f"
        " ON f.id::text = split_part(c.body_key, ':', 2) WHERE f.owner = $1",
        user,
    )
    single = await conn.fetch(
        "SELECT b.kind || ':' || b.ref::text AS key FROM bodies b JOIN requests r ON r.id = b.ref"
        " WHERE r.owner = $1 AND b.kind = ANY($2::text[])",
        user,
        _REQUEST_KINDS,
    )
    # Steps of the user's chains: the head (= the response id) and every step under it, and
    # any step whose model call is one of the user's rows.
    steps = await conn.fetch(
        """
        WITH mine AS (
            SELECT s.id FROM response_steps s JOIN response_chains c
                ON s.id = c.id OR s.parent_step_id = c.id WHERE c.owner = $1
            UNION
            SELECT s.id FROM response_steps s JOIN requests r ON r.id = s.request_id
            WHERE r.owner = $1
        )
        SELECT b.kind || ':' || b.ref::text AS key FROM bodies b JOIN mine ON mine.id = b.ref
        WHERE b.kind = ANY($2::text[])
        UNION
        SELECT k.kind || ':' || s.id::text FROM response_steps s JOIN mine ON mine.id = s.id
        CROSS JOIN LATERAL (VALUES ('sreq', s.request_payload IS NOT NULL),
                                   ('sres', s.response_payload IS NOT NULL)) AS k(kind, held)
        WHERE k.held
        """,
        user,
        _STEP_KINDS,
    )
    keys = [r["body_key"] for r in chunks] + [r["key"] for r in single] + [r["key"] for r in steps]
    return sorted(set(keys))


async def _shown(conn: asyncpg.Connection, query: str, *args: object) -> bool:
    return bool(await conn.fetchval(query, *args))


async def _until(check: object, what: str, deadline: float) -> None:
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise ErasureError(f"timed out waiting for {what} to be projected")
        await asyncio.sleep(0.1)


async def _caught_up(conn: asyncpg.Connection, bootstrap: str, deadline: float) -> None:
    reader = catchup.offsets_reader(bootstrap)
    await reader.start()
    try:
        ends = await catchup.end_offsets(reader, PROJECTED)
    finally:
        await reader.stop()
    if not await catchup.until_projected(conn, ends, max(0.0, deadline - time.monotonic())):
        raise ErasureError("the projector did not catch up with the log in time")


# -- the erasure --------------------------------------------------------------------------


async def erase(
    conn: asyncpg.Connection,
    publisher: Publisher,
    bootstrap: str,
    user: str,
    *,
    timeout_s: float = 300.0,
) -> Report:
    """Erase ``user``'s content (see the module docstring); returns what this run did."""
    deadline = time.monotonic() + timeout_s
    report = Report()
    now = datetime.now(UTC)
    await _caught_up(conn, bootstrap, deadline)

    # 1. Delete what they own; batchless rows go with their bodies (the read model forgets a
    #    row's bodies with the row, so their keys are taken now).
    batch_ids, file_ids, batchless = (
        await _batches_to_erase(conn, user), await _live_files(conn, user), await _batchless(conn, user),
    )  # fmt: skip
    rows = [r for r in batchless if _erasable(r)]
    report.still_running = len(batchless) - len(rows)
    row_keys = [bodies.key(kind, r["id"]) for r in rows for kind in _REQUEST_KINDS]
    held = {
        r["key"]
        for r in await conn.fetch(
            "SELECT kind || ':' || ref::text AS key FROM bodies"
            " WHERE ref = ANY($1::uuid[]) AND kind = ANY($2::text[])",
            [r["id"] for r in rows],
            _REQUEST_KINDS,
        )
    }
    commands: list[DeleteBatch | DeleteFile | DeleteRequest] = [
        DeleteBatch(command_id=ids.new_id(), issued_at=now, batch_id=b, erase=True)
        for b in batch_ids
    ]
    commands += [DeleteFile(command_id=ids.new_id(), issued_at=now, file_id=f) for f in file_ids]
    direct: dict[str, list[RequestErased]] = defaultdict(list)
    for r in rows:
        if r["service_tier"] == "flex":  # the engine holds these: it forgets and aborts them
            commands.append(DeleteRequest(command_id=ids.new_id(), issued_at=now, request_id=r["id"]))  # fmt: skip
        else:  # realtime rows and chain sub-requests: recorded by the API and the chain agent
            direct[r["model"]].append(
                RequestErased(
                    event_id=ids.event_id("erased", r["id"]), occurred_at=now,
                    request_id=r["id"], batch_id=None, model=r["model"],
                )
            )  # fmt: skip
    if commands:
        await publisher.commands(commands)
    if direct:
        await publisher.transitions(
            [
                RequestTransitions(
                    event_id=ids.event_id("erasure", user, model, events[0].request_id),
                    occurred_at=now,
                    model=model,
                    events=list(events),
                )  # fmt: skip
                for model, events in direct.items()
            ]
        )
    await tombstones.send(publisher, row_keys)
    report.batches, report.files, report.requests = len(batch_ids), len(file_ids), len(rows)
    report.bodies = len(held)

    await _until(
        lambda: _shown(
            conn,
            "SELECT NOT EXISTS (SELECT 1 FROM batches WHERE id = ANY($1::uuid[])"
            " AND (deleted_at IS NULL OR metadata IS NOT NULL))"
            " AND NOT EXISTS (SELECT 1 FROM files WHERE id = ANY($2::uuid[]) AND deleted_at IS NULL)"
            " AND NOT EXISTS (SELECT 1 FROM requests WHERE id = ANY($3::uuid[]))",
            batch_ids, file_ids, [r["id"] for r in rows],
        ),
        "the deletions",
        deadline,
    )  # fmt: skip

    # 2. Nothing of theirs runs any more (deleted batches end their rows: unsent ones at once,
    #    running calls aborted), then their content as the read model has it now.
    async def settled() -> bool:
        return not await conn.fetchval(
            "SELECT count(*) FROM requests r JOIN batches b ON b.id = r.batch_id"
            " WHERE b.owner = $1 AND r.state = ANY($2::text[])",
            user,
            list(_IN_FLIGHT),
        )

    try:
        await _until(settled, "the user's running rows to end", min(deadline, time.monotonic() + timeout_s / 3))  # fmt: skip
    except ErasureError:
        report.still_running += int(
            await conn.fetchval(
                "SELECT count(*) FROM requests r JOIN batches b ON b.id = r.batch_id"
                " WHERE b.owner = $1 AND r.state = ANY($2::text[])",
                user,
                list(_IN_FLIGHT),
            )
        )
    await _caught_up(conn, bootstrap, deadline)
    keys = [k for k in await content_keys(conn, user) if k not in held]
    await tombstones.send(publisher, keys)
    report.bodies += len(keys)

    # 3. The read model shows it: no body of theirs is left.
    async def clean() -> bool:
        return not await content_keys(conn, user)

    await _until(clean, "the tombstones", deadline)
    return report
