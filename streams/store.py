"""What the write path reads from the projected store.

Population needs a file's template manifest and executors need a template's body: both were
published long before and are read from PostgreSQL instead of being carried again on Kafka.
Reads that may race their projection wait for it, with a bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import asyncpg
import msgspec

from streams.population import ManifestRow

FileState = Literal["missing", "deleted", "wrong_purpose", "ok"]


class Template(msgspec.Struct, frozen=True):
    method: str
    path: str
    body: str


class ProjectedClaim(msgspec.Struct, frozen=True):
    """What the read model says of a request's current claim (it may trail the log)."""

    state: str
    attempt: int
    claim_id: str | None

    def supersedes(self, claim_id: str, attempt: int) -> bool:
        """Whether the dispatch (claim, attempt) must not be sent: the request ended, was
        reclaimed or retried since, another claim is current, or this very claim already
        started (a dispatch re-read after a crash or rebalance). A dispatch the projection has
        not caught up with yet is never skipped."""
        if self.state in ("completed", "failed", "canceled") or self.attempt > attempt:
            return True
        if self.state == "processing" and self.claim_id == claim_id:
            return True
        # Every new claim of a request follows a reclaim or a retry, which raise the attempt:
        # another claim at the same attempt is a newer one; at a lower attempt the projection
        # simply has not caught up with this dispatch yet.
        return self.attempt == attempt and self.claim_id not in (None, claim_id)


class Store:
    def __init__(self, dsn: str, projection_wait_s: float = 30.0) -> None:
        self.dsn = dsn
        self.projection_wait_s = projection_wait_s
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=8)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def file_manifest(self, file_id: str, owner: str) -> tuple[FileState, list[ManifestRow]]:
        """The file's templates in line order, once its projection has arrived."""
        pool = await self.pool()
        deadline = time.monotonic() + self.projection_wait_s
        while True:
            row = await pool.fetchrow(
                "SELECT purpose, deleted_at FROM files WHERE id = $1 AND owner = $2",
                file_id,
                owner,
            )
            if row is not None or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        if row is None:
            return "missing", []
        if row["deleted_at"] is not None:
            return "deleted", []
        if row["purpose"] != "batch":
            return "wrong_purpose", []
        records = await pool.fetch(
            "SELECT id::text, line_number, custom_id, model FROM request_templates"
            " WHERE file_id = $1 ORDER BY line_number",
            file_id,
        )
        return "ok", [ManifestRow(r[0], r[1], r[2], r[3]) for r in records]

    async def live_batches_using(self, file_id: str) -> list[str]:
        pool = await self.pool()
        rows = await pool.fetch(
            "SELECT id::text FROM batches WHERE input_file_id = $1 AND deleted_at IS NULL"
            " AND completed_at IS NULL AND failed_at IS NULL AND cancelled_at IS NULL",
            file_id,
        )
        return [r[0] for r in rows]

    async def template(self, template_id: str) -> Template | None:
        """The template with its body, waiting for the body's projection if need be."""
        pool = await self.pool()
        deadline = time.monotonic() + self.projection_wait_s
        while True:
            row = await pool.fetchrow(
                "SELECT t.method, t.path, b.body FROM request_templates t"
                " JOIN bodies b ON b.ref = t.id AND b.kind = 'tpl' WHERE t.id = $1",
                template_id,
            )
            if row is not None:
                return Template(row[0], row[1], row[2])
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.05)

    async def projected_claim(self, request_id: str) -> ProjectedClaim | None:
        pool = await self.pool()
        row = await pool.fetchrow(
            "SELECT state, retry_attempt, claim_id::text FROM requests WHERE id = $1", request_id
        )
        return None if row is None else ProjectedClaim(row[0], row[1], row[2])
