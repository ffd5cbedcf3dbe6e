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

from cannonade.config import Config
from projections.api.auth import Principal, authenticate
from projections.api.publisher import CommandPublisher
from schemas.errors import ApiError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Context:
    """What every handler needs, stored once on the application."""

    def __init__(self, config: Config, pool: asyncpg.Pool, publisher: CommandPublisher) -> None:
        self.config = config
        self.pool = pool
        self.publisher = publisher

    async def wait_for(self, check: Callable[[], Awaitable[bool]], what: str) -> None:
        """Read-your-writes: wait (bounded) until the projection shows the accepted write."""
        deadline = time.monotonic() + self.config.api.projection_wait_s
        delay = 0.005
        while not await check():
            if time.monotonic() >= deadline:
                raise ApiError(503, f"Timed out waiting for {what} to be recorded; retry the read")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


CONTEXT: web.AppKey[Context] = web.AppKey("context", Context)
PRINCIPAL = "principal"


def context(request: web.Request) -> Context:
    return request.app[CONTEXT]


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]  # type: ignore[no-any-return]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_response(exc.envelope(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_response(ApiError(exc.status, exc.reason).envelope(), exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(ApiError(500, "Internal server error").envelope(), 500)


@web.middleware
async def authentication(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/healthz":
        return await handler(request)
    found = await authenticate(context(request).pool, request.headers.get("Authorization"))
    if found is None:
        raise ApiError(401, "Invalid API key", code="invalid_api_key")
    request[PRINCIPAL] = found
    return await handler(request)


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def create_app(config: Config) -> web.Application:
    from projections.api import batches, files

    app = web.Application(
        middlewares=[errors, authentication],
        client_max_size=config.api.max_file_size + 10 * 1024,
    )

    async def resources(app: web.Application) -> Any:
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=10)
        publisher = CommandPublisher(config.kafka)
        await publisher.start()
        app[CONTEXT] = Context(config, pool, publisher)
        yield
        await publisher.stop()
        await pool.close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", healthz)
    files.routes(app.router)
    batches.routes(app.router)
    return app


def run(config: Config) -> None:
    web.run_app(create_app(config), host=config.api.host, port=config.api.port, print=None)
