"""``GET /v1/batches/{id}/results`` (core §2.3 get_batch_results_stream, responses-and-api §8.4):
every row of a batch in line order with its input, its result or error and its status, while
the batch runs and after. `status` and `search` filter, `skip` and `limit` page as file content
does (same validation, `X-Incomplete` and `X-Last-Line`), read page by page."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from projections import queries
from projections.api.app import Context, context, principal
from projections.api.files import (
    Window,
    chunk_line_body,
    parse_uuid,
    query_int,
    query_text,
    serve_jsonl,
)
from projections.rules.results import more_to_come, result_line, states_for
from schemas import bodies
from schemas.errors import ApiError, not_found


def routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/batches/{id}/results", results)


async def results(request: web.Request) -> web.StreamResponse:
    ctx, q = context(request), request.query
    batch_id = parse_uuid(request.match_info["id"], "Invalid batch ID format")
    states = states_for(query_text(q, "status"))
    search = query_text(q, "search") or None
    skip = query_int(q, "skip", 0)
    limit = None if q.get("limit") is None else query_int(q, "limit", 0)
    batch = await queries.get_batch(ctx.pool, batch_id, principal(request).user)
    if batch is None:
        raise not_found("Batch", batch_id)
    if batch["input_file_id"] is None and batch["requests_started_at"] is not None:
        raise ApiError(
            404,
            f"The input file of batch {batch_id} was deleted; its results cannot be listed",
            code="not_found",
        )
    # A result's body travels on its own topic and may trail its row by a poll.
    await ctx.wait_for(lambda: _bodies_projected(ctx, batch_id, states), "result bodies")
    lines = _lines(ctx, batch_id, states, search, skip, limit)
    return await serve_jsonl(request, lines, skip=skip, limit=limit, incomplete=more_to_come(batch))


async def _bodies_projected(ctx: Context, batch_id: str, states: list[str] | None) -> bool:
    for state in ("completed", "failed"):
        if states is None or state in states:
            if await queries.results_missing_bodies(ctx.pool, batch_id, state):
                return False
    return True


async def _lines(
    ctx: Context,
    batch_id: str,
    states: list[str] | None,
    search: str | None,
    skip: int,
    limit: int | None,
) -> AsyncIterator[bytes]:
    after: int | None = None
    window = Window(limit)
    while True:
        size = window.size()
        rows, chunk_bodies = await queries.results_page(
            ctx.pool, batch_id, states=states, search=search, after_line=after,
            skip=skip if after is None else 0, limit=size,
        )  # fmt: skip
        decoded = {k: bodies.chunk_decoder.decode(v) for k, v in chunk_bodies.items()}
        for r in rows:
            yield result_line(
                request_id=r["id"],
                custom_id=r["custom_id"],
                model=r["model"],
                state=r["state"],
                input_body=chunk_line_body(decoded, r["body_key"], r["line_number"]),
                response_body=_text(r["response_body"]),
                error=_text(r["error"]),
            )
        if not window.more(len(rows), size):
            return
        after = rows[-1]["line_number"]


def _text(value: bytes | None) -> str | None:
    return None if value is None else bytes(value).decode("utf-8", "replace")
