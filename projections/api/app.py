"""The aiohttp application: authentication, the error envelope, and shared resources."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from cannonade import health, heap
from cannonade.config import Config
from projections import queries
from projections.api import health as api_health
from projections.api.auth import Principal, authenticate
from projections.api.openapi import PATH as OPENAPI_PATH
from projections.api.publisher import Publisher
from projections.api.wakeups import Wakeups
from projections.metrics import http_metrics
from schemas import topics
from schemas.errors import ApiError, invalid_api_key

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What a body record adds to the body itself on the topic (key, headers, batch framing).
_RECORD_OVERHEAD = 64 * 1024


class Context:
    """What every handler needs, stored once on the application."""

    def __init__(
        self, config: Config, pool: asyncpg.Pool, publisher: Publisher, wakeups: Wakeups
    ) -> None:
        self.config = config
        self.pool = pool
        self.publisher = publisher
        self.wakeups = wakeups
        self.downloads: dict[str, int] = {}  # user -> downloads in progress

    async def wait_for(
        self, check: Callable[[], Awaitable[bool]], what: str, *, within: float | None = None
    ) -> bool:
        """Read-your-writes: wait until the projection shows an accepted write.

        The wait is bounded by progress rather than a guess at how long a write takes: it
        lasts as long as the projector keeps advancing, and gives up (503) once it has not
        advanced for ``projection_stall_s`` — or after ``projection_wait_s`` in any case.

        With ``within``, a write that may have been refused downstream (the commands agent
        dead-letters what breaks its rules) is waited for that long at most while the
        projector advances: False then means "not shown", for the caller to decide."""
        api = self.config.api
        start = time.monotonic()
        position, moved_at = await queries.projector_position(self.pool), start
        delay = 0.005
        while True:
            projected = self.wakeups.projected()
            if await check():
                return True
            now = time.monotonic()
            if now - moved_at > api.projection_stall_s or now - start > api.projection_wait_s:
                raise ApiError(
                    503,
                    f"Timed out waiting for {what} to be recorded (the projection is not "
                    "advancing); it was accepted and will appear, retry the read",
                    code="projection_lag",
                )
            if within is not None and now - start > within:
                return False
            try:
                await asyncio.wait_for(projected.wait(), delay)
                moved_at = time.monotonic()  # woken by a commit
            except TimeoutError:  # the poll, should a NOTIFY be missed
                latest = await queries.projector_position(self.pool)
                if latest != position:
                    position, moved_at = latest, time.monotonic()
            delay = min(delay * 2, 0.1)


CONTEXT: web.AppKey[Context] = web.AppKey("context", Context)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
#: Set once a handler has handed the request to the engine (flex, a chain, a background
#: call): see :func:`errors`.
SUBMITTED: web.RequestKey[bool] = web.RequestKey("submitted", bool)


def context(request: web.Request) -> Context:
    return request.app[CONTEXT]


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await _answer(request, handler)
    if request.get(SUBMITTED) and not response.prepared:
        # The SDK retries a 429, a 5xx or a timeout by sending the request again, which here
        # would hand the engine the same work a second time.
        response.headers["x-should-retry"] = "false"
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.envelope(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = "file_too_large" if exc.status == 413 else None
        return json_response(ApiError(exc.status, exc.reason, code=code).envelope(), exc.status)
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
        log.warning("database unavailable on %s %s: %r", request.method, request.path, exc)
        error = ApiError(503, "The database is unavailable; try again", code="unavailable")
        return json_response(error.envelope(), 503)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(ApiError(500, "Internal server error").envelope(), 500)


@web.middleware
async def authentication(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == OPENAPI_PATH:  # the document holds no user's data
        return await handler(request)
    # The dashboard's page and files need no key: the page asks for one and sends it.
    if request.path in ("/healthz", "/dashboard") or request.path.startswith("/dashboard/"):
        return await handler(request)
    if request.path in health.PATHS:  # probes and Prometheus carry no key
        return await handler(request)
    header = request.headers.get("Authorization")
    found = await authenticate(context(request).pool, header)
    if found is None:
        raise invalid_api_key(given=bool(header))
    request[PRINCIPAL] = found
    return await handler(request)


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def check_limits(config: Config) -> None:
    """Every body the API accepts must fit in one record on the bodies topic."""
    needed = config.api.max_request_body_size + _RECORD_OVERHEAD
    if needed > topics.BODIES.max_message_bytes:
        raise SystemExit(
            f"api.max_request_body_size ({config.api.max_request_body_size}) does not fit the "
            f"bodies topic's message limit ({topics.BODIES.max_message_bytes} bytes)"
        )


def create_app(config: Config) -> web.Application:
    from projections.api import (
        batch_control,
        batches,
        chat,
        files,
        openapi,
        proxy,
        requests,
        responses,
        results,
    )

    check_limits(config)
    app = web.Application(
        middlewares=[http_metrics, errors, authentication],
        client_max_size=config.api.max_file_size + 10 * 1024,
    )

    async def resources(app: web.Application) -> Any:
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=20)
        publisher = Publisher(config.kafka)
        wakeups = Wakeups(config.database_url)
        wakeups.start()
        app[CONTEXT] = Context(config, pool, publisher, wakeups)
        yield
        await wakeups.stop()
        await publisher.stop()
        await pool.close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", healthz)
    api_health.setup(app, config)
    files.routes(app.router)
    batches.routes(app.router)
    batch_control.routes(app.router)
    results.routes(app.router)
    requests.routes(app.router)
    proxy.setup(app)
    chat.routes(app.router)
    responses.routes(app.router)
    openapi.routes(app.router)
    from projections.api import dashboard, keys, webhooks

    webhooks.setup(app)
    keys.routes(app.router)
    dashboard.setup(app.router)
    return app


def run(config: Config) -> None:
    app = create_app(config)

    async def started(app: web.Application) -> None:
        heap.freeze_startup()

    app.on_startup.append(started)
    web.run_app(app, host=config.api.host, port=config.api.port, print=None)
