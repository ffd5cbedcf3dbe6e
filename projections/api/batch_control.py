"""``/v1/batches/{id}``: retry (all failed and cancelled rows), retry-requests (chosen failed
rows) and delete (core §2.3, responses-and-api §8.4 extensions).

A retry names the rows as the read model shows them, under the batch's ``retry_version``; the
commands agent refuses a retry made against another version (it dead-letters it), which shows
here as a wait that does not complete. The API then reads the batch again and tries once more
before answering 409.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Literal

import asyncpg
import msgspec
from aiohttp import web

from projections import queries
from projections.api.app import Context, context, json_response, principal
from projections.api.batches import facts
from projections.api.files import parse_uuid
from projections.api.intake import read_body
from projections.rules.batches import batch_object
from projections.rules.retry import parse_request_ids, row_ranges
from schemas import ids
from schemas.api import BatchObject
from schemas.commands import DeleteBatch, RetryBatch
from schemas.errors import ApiError, input_file_deleted, invalid_request, not_found

Scope = Literal["batch", "requests"]
# The rows a retry names, read again on each attempt (the argument: is it the first?).
Picker = Callable[[bool], Awaitable[Sequence[asyncpg.Record]]]
_ATTEMPTS = 2


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/batches/{id}/retry", retry)
    router.add_post("/v1/batches/{id}/retry-requests", retry_requests)
    router.add_delete("/v1/batches/{id}", delete)


def _batch_id(request: web.Request) -> str:
    return parse_uuid(request.match_info["id"], "Invalid batch ID format")


async def retry(request: web.Request) -> web.Response:
    """Every failed and cancelled row runs again; the batch is in progress again."""
    ctx, batch_id = context(request), _batch_id(request)

    async def pick(first: bool) -> Sequence[asyncpg.Record]:
        rows = await queries.batch_rows_in(ctx.pool, batch_id, ["failed", "canceled"])
        if not rows and first:
            raise invalid_request("No failed requests to retry in this batch")
        return rows

    return json_response(await _retry(request, batch_id, "batch", pick))


async def retry_requests(request: web.Request) -> web.Response:
    """The named rows, which must be failed, run again."""
    ctx, batch_id = context(request), _batch_id(request)
    try:
        body = msgspec.json.decode(await read_body(request, ctx.config.api.max_request_body_size))
    except (msgspec.DecodeError, RecursionError) as exc:
        raise invalid_request(f"Invalid JSON body: {exc}") from None
    wanted = parse_request_ids(body)

    async def pick(first: bool) -> Sequence[asyncpg.Record]:
        found = {r["id"]: r for r in await queries.batch_rows_by_id(ctx.pool, batch_id, wanted)}
        if not first:  # rows a concurrent retry already took have moved on
            return [r for r in found.values() if r["state"] == "failed"]
        for request_id in wanted:
            row = found.get(request_id)
            if row is None:
                raise not_found("Request", request_id)
            if row["state"] != "failed":
                raise invalid_request(f"Request {request_id} is not in a failed state")
        return list(found.values())

    return json_response(await _retry(request, batch_id, "requests", pick))


async def _retry(request: web.Request, batch_id: str, scope: Scope, pick: Picker) -> BatchObject:  # fmt: skip
    ctx, owner = context(request), principal(request).user
    for attempt in range(_ATTEMPTS):
        batch = await queries.get_batch(ctx.pool, batch_id, owner)
        if batch is None:
            raise not_found("Batch", batch_id)
        if batch["input_file_id"] is None:
            raise input_file_deleted(batch_id)
        rows = await pick(attempt == 0)
        if not rows:  # a concurrent retry ran them all
            return batch_object(facts(batch))
        version: int = batch["retry_version"]
        await ctx.publisher.commands(
            [
                RetryBatch(
                    command_id=ids.new_id(),
                    issued_at=datetime.now(UTC),
                    batch_id=batch_id,
                    retry_version=version,
                    scope=scope,
                    failed=row_ranges(
                        (r["model"], r["line_number"]) for r in rows if r["state"] == "failed"
                    ),
                    canceled=row_ranges(
                        (r["model"], r["line_number"]) for r in rows if r["state"] == "canceled"
                    ),
                )
            ]
        )
        retried = partial(_retried, ctx, batch_id, version, rows)
        if await ctx.wait_for(retried, "the retry", within=ctx.config.api.projection_stall_s):
            return await _batch_json(ctx, batch_id, owner)
    raise ApiError(
        409,
        f"Batch {batch_id} changed while it was being retried; read it again and retry",
        code="invalid_state",
    )


async def _retried(ctx: Context, batch_id: str, seen: int, rows: Sequence[asyncpg.Record]) -> bool:  # fmt: skip
    """The batch has moved past the version the retry was made against, and every row it
    named has moved past where it was (back to pending, or on since)."""
    version = await queries.batch_retry_version(ctx.pool, batch_id)
    if version is None or version <= seen:
        return False
    left = await queries.rows_not_moved(
        ctx.pool, [r["id"] for r in rows], [r["last_offset"] for r in rows]
    )
    return left == 0


async def _batch_json(ctx: Context, batch_id: str, owner: str) -> BatchObject:
    row = await queries.get_batch(ctx.pool, batch_id, owner)
    if row is None:  # deleted meanwhile
        raise not_found("Batch", batch_id)
    return batch_object(facts(row))


async def delete(request: web.Request) -> web.Response:
    """Soft delete: a running batch is cancelled (its calls in flight aborted), and the batch
    and its output and error files are gone at once. Answered once nothing of it can be sent
    any more: the projection shows it deleted and none of its rows pending or in flight."""
    ctx, batch_id = context(request), _batch_id(request)
    if await queries.get_batch(ctx.pool, batch_id, principal(request).user) is None:
        raise not_found("Batch", batch_id)
    await ctx.publisher.commands(
        [DeleteBatch(command_id=ids.new_id(), issued_at=datetime.now(UTC), batch_id=batch_id)]
    )
    await ctx.wait_for(
        lambda: queries.batch_deleted_and_quiet(ctx.pool, batch_id), "the batch's deletion"
    )
    return web.Response(status=204)
