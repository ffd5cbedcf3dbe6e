"""``/v1/webhooks``: a user's webhook endpoints and their deliveries; and the notifier, which
every API process runs when webhooks are enabled (:mod:`projections.notifier`).

- ``POST /v1/webhooks`` ``{"url", "name"?, "event_types"?, "signing_secret"?}`` → the
  endpoint with its ``signing_secret`` (``whsec_…``; shown this once);
- ``GET /v1/webhooks``, ``GET /v1/webhooks/{id}``, ``DELETE /v1/webhooks/{id}``;
- ``GET /v1/webhooks/{id}/deliveries`` (``limit``, ``after``): each notification sent to the
  endpoint, newest first, with its status and every attempt (time, HTTP status or error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from projections import webhooks
from projections.api.app import CONTEXT, context, json_response, principal
from projections.api.files import list_limit, list_page
from projections.api.intake import read_body
from projections.notifier import Notifier
from projections.webhook_signing import SecretBox
from schemas.api_webhooks import (
    DeletedWebhookEndpoint,
    WebhookDeliveryList,
    WebhookEndpointList,
    WebhookRegistration,
)
from schemas.errors import ApiError, invalid_request

log = logging.getLogger(__name__)

BOX: web.AppKey[SecretBox] = web.AppKey("webhook_box", SecretBox)
_decode = msgspec.json.Decoder(WebhookRegistration).decode


def setup(app: web.Application) -> None:
    """Routes, and the notifier running beside them for the application's lifetime."""
    app.router.add_post("/v1/webhooks", create)
    app.router.add_get("/v1/webhooks", list_endpoints)
    app.router.add_get("/v1/webhooks/{id}", get)
    app.router.add_delete("/v1/webhooks/{id}", delete)
    app.router.add_get("/v1/webhooks/{id}/deliveries", deliveries)
    app.cleanup_ctx.append(_notifier)


async def _notifier(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    box = app[BOX] = SecretBox(ctx.config.webhooks.secret_keys)
    if not box.enabled:
        log.info("webhooks are off: no webhooks.secret_keys configured")
        yield
        return
    notifier = Notifier(ctx.config.webhooks, ctx.pool, ctx.publisher, ctx.config.kafka, box)
    task = asyncio.create_task(notifier.run())
    yield
    notifier.stop()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _webhook_id(request: web.Request) -> str:
    found = webhooks.delivery_id_of(request.match_info["id"])  # a bare uuid parses the same
    if found is None:
        raise ApiError(404, f"Webhook endpoint {request.match_info['id']} not found", code="not_found")  # fmt: skip
    return found


async def create(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    try:
        registration = _decode(await read_body(request, ctx.config.api.max_request_body_size))
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise invalid_request(f"Invalid request body: {exc}") from None
    endpoint = await webhooks.register(
        ctx.publisher, ctx.pool, request.app[BOX], who.user, registration,
        timeout_s=ctx.config.api.projection_wait_s,
    )  # fmt: skip
    return json_response(endpoint, 201)


async def list_endpoints(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    endpoints = await webhooks.list_endpoints(ctx.pool, who.user)
    return json_response(list_page(WebhookEndpointList, endpoints, len(endpoints)))


async def get(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    webhook_id = _webhook_id(request)
    endpoint = await webhooks.get_endpoint(ctx.pool, who.user, webhook_id)
    if endpoint is None:
        raise ApiError(404, f"Webhook endpoint {webhook_id} not found", code="not_found")
    return json_response(endpoint)


async def delete(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    webhook_id = _webhook_id(request)
    if not await webhooks.delete(
        ctx.publisher, ctx.pool, who.user, webhook_id, timeout_s=ctx.config.api.projection_wait_s
    ):
        raise ApiError(404, f"Webhook endpoint {webhook_id} not found", code="not_found")
    return json_response(
        DeletedWebhookEndpoint(id=webhook_id, object="webhook_endpoint.deleted", deleted=True)
    )


async def deliveries(request: web.Request) -> web.Response:
    ctx, who = context(request), principal(request)
    webhook_id = _webhook_id(request)
    if await webhooks.get_endpoint(ctx.pool, who.user, webhook_id) is None:
        raise ApiError(404, f"Webhook endpoint {webhook_id} not found", code="not_found")
    limit = list_limit(request.query, 20)
    after = request.query.get("after")
    items = await webhooks.deliveries(
        ctx.pool, who.user, webhook_id, limit=limit + 1,
        after=None if after is None else webhooks.delivery_id_of(after),
    )  # fmt: skip
    return json_response(list_page(WebhookDeliveryList, items, limit))
