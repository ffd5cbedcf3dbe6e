"""``/v1/requests``: the caller's requests without a batch — flex and realtime rows (core §2.4).

List (filters, offset pages, `total_count`), detail, cancel, retry and delete (right to
erasure). Batch rows are never visible here. Flex rows are the engine's: cancel, retry and
erasure are commands, answered once the projection shows their effect. Realtime rows are run
by the API itself, which also records their lifecycle: it cannot cancel or rerun one, and it
erases an ended one itself (its bodies tombstoned, a `RequestErased` fact like the engine's).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web

from projections import queries, tombstones
from projections.api.app import Context, context, json_response, principal
from projections.api.batches import parse_time
from projections.api.files import query_text
from projections.rules.requests import (
    TERMINAL,
    ListFilter,
    check_state,
    check_tiers,
    detail,
    parse_bool,
    parse_limit,
    parse_list,
    parse_skip,
    summary,
)
from schemas import bodies, ids
from schemas.api_requests import RequestDetails, RequestList
from schemas.commands import CancelRequest, DeleteRequest, RetryRequest
from schemas.errors import ApiError, invalid_request, not_found
from schemas.events import RequestErased, RequestTransitions
from streams import validation
from streams.responses.steps import parse_response_id

_FLEX = "flex"  # the engine's rows; every other batchless row is run by the API (realtime)


def routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/requests", list_requests)
    router.add_get("/v1/requests/{id}", get_request)
    router.add_post("/v1/requests/{id}/cancel", cancel)
    router.add_post("/v1/requests/{id}/retry", retry)
    router.add_delete("/v1/requests/{id}", delete)


async def list_requests(request: web.Request) -> web.Response:
    ctx, q = context(request), request.query
    status = query_text(q, "status")
    f = ListFilter(
        status=None if status is None else check_state(status),
        models=_list_param(q, "models"),
        service_tiers=check_tiers(_list_param(q, "service_tiers")),
        created_after=parse_time(query_text(q, "created_after"), "created_after"),
        created_before=parse_time(query_text(q, "created_before"), "created_before"),
        active_first=parse_bool(query_text(q, "active_first"), "active_first"),
        skip=parse_skip(q.get("skip")),
        limit=parse_limit(q.get("limit")),
    )
    owner = principal(request).user
    if f.models == [] or f.service_tiers == []:  # an empty list matches nothing
        rows, total = [], 0
    else:
        rows = await queries.list_requests(ctx.pool, owner, f)
        total = await queries.count_requests(ctx.pool, owner, f)
    return json_response(
        RequestList(
            object="list",
            data=[summary(r) for r in rows[: f.limit]],
            has_more=len(rows) > f.limit,
            total_count=total,
        )
    )


def _list_param(q: Any, name: str) -> list[str] | None:
    values: list[str] = q.getall(name, [])
    for value in values:
        validation.check_storable(value, name)
    return parse_list(values)


def _request_id(request: web.Request) -> str:
    """The row's uuid; the `resp_<uuid>` a completion or response answered with names it too."""
    found = parse_response_id(request.match_info["id"])
    if found is None:
        raise invalid_request("Invalid request ID format")
    return found


async def _owned(ctx: Context, request: web.Request) -> asyncpg.Record:
    request_id = _request_id(request)
    row = await queries.batchless_request(ctx.pool, request_id, principal(request).user)
    if row is None:
        raise not_found("Request", request_id)
    return row


async def _detail(ctx: Context, request_id: str, owner: str) -> RequestDetails:
    row = await queries.batchless_request(ctx.pool, request_id, owner)
    if row is None:  # erased meanwhile
        raise not_found("Request", request_id)
    return detail(row)


async def get_request(request: web.Request) -> web.Response:
    return json_response(detail(await _owned(context(request), request)))


async def cancel(request: web.Request) -> web.Response:
    """Pending, claimed or processing → canceled (an upstream call in flight is aborted; a
    genuine result that beats the abort still counts); answered once the row has ended."""
    ctx = context(request)
    row = await _owned(ctx, request)
    request_id, state = row["id"], row["state"]
    if state in TERMINAL:
        raise ApiError(409, f"Cannot cancel a request with status '{state}'", code="invalid_state")
    if row["service_tier"] != _FLEX:
        raise ApiError(
            409,
            f"Request {request_id} is a realtime request: it ends with its caller's call",
            code="invalid_state",
        )
    await ctx.publisher.commands(
        [CancelRequest(command_id=ids.new_id(), issued_at=datetime.now(UTC), request_id=request_id)]
    )
    await ctx.wait_for(lambda: queries.request_settled(ctx.pool, request_id), "the cancellation")
    return json_response(await _detail(ctx, request_id, row["owner"]))


async def retry(request: web.Request) -> web.Response:
    """A failed flex request runs again (attempt 0, its result fields cleared); answered once
    the projection shows it pending again (or further on)."""
    ctx = context(request)
    row = await _owned(ctx, request)
    request_id = row["id"]
    if row["state"] != "failed":
        raise invalid_request(f"Request {request_id} is not in a failed state")
    if row["service_tier"] != _FLEX:
        raise invalid_request(f"Request {request_id} is a realtime request and cannot be retried")
    await ctx.publisher.commands(
        [RetryRequest(command_id=ids.new_id(), issued_at=datetime.now(UTC), request_id=request_id)]
    )
    offset: int = row["last_offset"]
    await ctx.wait_for(lambda: queries.request_moved(ctx.pool, request_id, offset), "the retry")
    return json_response(await _detail(ctx, request_id, row["owner"]))


async def delete(request: web.Request) -> web.Response:
    """Right to erasure: the row and its bodies go, whatever its state (a flex call in flight
    is aborted); 204 once the row is gone from the read model."""
    ctx = context(request)
    row = await _owned(ctx, request)
    request_id = row["id"]
    if row["service_tier"] == _FLEX:
        await ctx.publisher.commands(
            [
                DeleteRequest(
                    command_id=ids.new_id(), issued_at=datetime.now(UTC), request_id=request_id
                )
            ]
        )
    else:
        await _erase_realtime(ctx, row)
    await ctx.wait_for(lambda: _gone(ctx, request_id), "the erasure")
    return web.Response(status=204)


async def _erase_realtime(ctx: Context, row: asyncpg.Record) -> None:
    """A realtime row's lifecycle is the API's to record: its bodies are tombstoned, then its
    erasure is recorded after its creation and outcome (same key: the model). A row still
    running would be recreated by its outcome, so it must have ended first."""
    request_id = row["id"]
    if row["state"] not in TERMINAL:
        raise ApiError(
            409,
            f"Request {request_id} is still running; delete it once it has ended",
            code="invalid_state",
        )
    kinds = (bodies.TEMPLATE, bodies.RESULT, bodies.ERROR)
    await tombstones.send(ctx.publisher, [bodies.key(kind, request_id) for kind in kinds])
    now = datetime.now(UTC)
    erased = RequestErased(
        event_id=ids.event_id("erased", request_id),
        occurred_at=now,
        request_id=request_id,
        batch_id=None,
        model=row["model"],
    )
    await ctx.publisher.transitions(
        [
            RequestTransitions(
                event_id=ids.event_id("realtime", "erased", request_id),
                occurred_at=now,
                model=row["model"],
                events=[erased],
            )
        ]
    )


async def _gone(ctx: Context, request_id: str) -> bool:
    return not await queries.request_exists(ctx.pool, request_id)
