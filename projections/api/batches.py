"""``/v1/batches``: create, list, get, cancel."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from projections import queries
from projections.api.app import context, json_response, principal
from projections.api.files import list_limit, list_page, optional_uuid, parse_uuid, query_text
from projections.api.intake import read_body
from projections.rules.batches import (
    BatchFacts,
    Counts,
    batch_object,
    check_status_filter,
    derive_status,
    shown_counts,
    validate_create_batch,
)
from projections.rules.requests import parse_bool
from schemas import ids
from schemas.api import BatchList, BatchObject
from schemas.commands import CancelBatch, CreateBatch
from schemas.errors import ApiError, not_found
from streams.validation import check_lines_match_endpoint


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/batches", create)
    router.add_get("/v1/batches", list_batches)
    router.add_get("/v1/batches/{id}", get)
    router.add_post("/v1/batches/{id}/cancel", cancel)


_COUNTS = Counts._fields
_PROJECTED = [
    f for f in BatchFacts.__struct_fields__ if f not in ("metadata", "expired_at", *_COUNTS)
]


def facts(row: Any) -> BatchFacts:
    """The rules' view of a batch row (the query names its columns after the fields)."""
    metadata = row["metadata"]
    frozen = None
    if row["counts_frozen_at"] is not None:
        frozen = (row["completed_requests"], row["failed_requests"], row["canceled_requests"])
    counts = shown_counts(Counts(*(row[f] for f in _COUNTS)), frozen)
    return BatchFacts(
        **{f: row[f] for f in _PROJECTED},
        **counts._asdict(),
        metadata=None if metadata is None else msgspec.json.decode(metadata),
        expired_at=expired_at(row, datetime.now(UTC)),
    )


def expired_at(row: Any, now: datetime) -> datetime | None:
    """Expiry (README decisions): a started batch that had not ended by its deadline shows
    ``expired`` once the deadline has passed (its unsent rows fail ``BatchTerminated``)."""
    deadline = row["expires_at"]
    ended = (row["completed_at"], row["failed_at"], row["cancelled_at"])
    if row["requests_started_at"] is None or now <= deadline:
        return None
    return None if any(at is not None and at <= deadline for at in ended) else deadline


async def create(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    body = validate_create_batch(
        await read_body(request, ctx.config.api.max_request_body_size),
        ctx.config.api.allowed_completion_windows,
        ctx.config.api.allowed_url_paths,
    )
    file = await queries.get_file(ctx.pool, body.input_file_id, who.user)
    if file is None:
        raise not_found("File", body.input_file_id)
    if file["purpose"] != "batch":
        raise ApiError(
            400,
            f"File with ID {body.input_file_id} does not have purpose 'batch'",
            code="invalid_file",
        )
    check_lines_match_endpoint(await queries.line_urls(ctx.pool, body.input_file_id), body.endpoint)
    batch_id = str(uuid.uuid4())
    await ctx.publisher.commands(
        [
            CreateBatch(
                command_id=ids.new_id(),
                issued_at=datetime.now(UTC),
                batch_id=batch_id,
                owner=who.user,
                input_file_id=body.input_file_id,
                endpoint=body.endpoint,
                completion_window=body.completion_window,
                metadata=body.metadata,
                api_key_id=who.key_id,
            )
        ]
    )
    await ctx.wait_for(lambda: _decided(ctx, batch_id), "the batch")
    rejection = await queries.batch_rejection(ctx.pool, batch_id)
    if rejection is not None:  # the commands agent's rules are the last word
        raise ApiError(
            rejection["status"], rejection["message"], code=rejection["code"],
            param=rejection["param"],
        )  # fmt: skip
    return json_response(await _batch_json(request, batch_id), 201)


async def _decided(ctx: Any, batch_id: str) -> bool:
    return await queries.batch_exists(ctx.pool, batch_id) or (
        await queries.batch_rejection(ctx.pool, batch_id) is not None
    )


async def _batch_json(request: web.Request, batch_id: str) -> BatchObject:
    row = await queries.get_batch(context(request).pool, batch_id, principal(request).user)
    if row is None:
        raise not_found("Batch", batch_id)
    return batch_object(facts(row))


async def get(request: web.Request) -> web.Response:
    batch_id = parse_uuid(request.match_info["id"], "Invalid batch ID format")
    return json_response(await _batch_json(request, batch_id))


async def list_batches(request: web.Request) -> web.Response:
    ctx, who, q = context(request), principal(request), request.query
    status = query_text(q, "status")
    if status is not None:
        check_status_filter(status)
    windows = query_text(q, "completion_window")
    limit = list_limit(q, default=20)
    rows = await queries.list_batches(
        ctx.pool,
        who.user,
        after=optional_uuid(q.get("after")),
        limit=limit + 1,
        status=status,
        windows=None if windows is None else [w.strip() for w in windows.split(",") if w.strip()],
        created_after=parse_time(query_text(q, "created_after"), "created_after"),
        created_before=parse_time(query_text(q, "created_before"), "created_before"),
        active_first=parse_bool(query_text(q, "active_first"), "active_first"),
    )
    return json_response(list_page(BatchList, [batch_object(facts(r)) for r in rows], limit))


def parse_time(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    try:
        at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        # In UTC now: a time at the calendar's edge that UTC cannot hold is the caller's error.
        return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise ApiError(
            400, f"{name} must be an RFC 3339 timestamp", code="invalid_request", param=name
        ) from None


async def cancel(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    batch_id = parse_uuid(request.match_info["id"], "Invalid batch ID format")
    row = await queries.get_batch(ctx.pool, batch_id, who.user)
    if row is None:
        raise not_found("Batch", batch_id)
    _check_cancellable(row)
    if row["cancelling_at"] is None:
        await ctx.publisher.commands(
            [CancelBatch(command_id=ids.new_id(), issued_at=datetime.now(UTC), batch_id=batch_id)]
        )
        # The batch may end before the cancel reaches it, and then the cancel does nothing.
        await ctx.wait_for(
            lambda: queries.batch_cancelling_or_ended(ctx.pool, batch_id), "the cancellation"
        )
        row = await queries.get_batch(ctx.pool, batch_id, who.user)
        if row is None:
            raise not_found("Batch", batch_id)
        _check_cancellable(row)
    return json_response(batch_object(facts(row)))


def _check_cancellable(row: Any) -> None:
    status = derive_status(facts(row))
    if status in ("completed", "failed", "expired"):
        raise ApiError(409, f"Cannot cancel a batch with status '{status}'", code="invalid_state")
