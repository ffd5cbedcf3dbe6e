"""Liveness, readiness and metrics over HTTP, for every process.

- ``GET /livez``: 200 while the event loop answers at all (a wedged process stops answering).
- ``GET /readyz``: 200 when every readiness check passes, else 503; the body names each
  check's verdict. A process is ready when it reaches what it uses (PostgreSQL, Kafka) and has
  caught up enough to serve — what that means per role is in the checks each one registers.
- ``GET /metrics``: the Prometheus exposition of this process's registry.

The API adds these routes to its own application (:func:`add_routes`); the workers, the
projector and the purge worker run them on a port of their own (:func:`serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import asyncpg
import msgspec
from aiohttp import web
from aiokafka.client import AIOKafkaClient
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger(__name__)

# A check answers None when all is well, else why not. It must not raise (see Readiness).
Check = Callable[[], Awaitable[str | None]]
CHECK_TIMEOUT_S = 3.0
PATHS = frozenset({"/livez", "/readyz", "/metrics"})


class Readiness:
    """Named checks, run together on every ``/readyz``; one evaluation at a time, so that
    checks holding a connection are never run concurrently with themselves."""

    def __init__(self, checks: Mapping[str, Check] | None = None) -> None:
        self.checks: dict[str, Check] = dict(checks or {})
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._lock = asyncio.Lock()

    def add(self, name: str, check: Check, close: Callable[[], Awaitable[None]] | None = None) -> None:  # fmt: skip
        self.checks[name] = check
        if close is not None:
            self._closers.append(close)

    async def evaluate(self) -> dict[str, str]:
        """Each check's verdict: ``ok`` or the reason it failed."""
        async with self._lock:
            names = list(self.checks)
            results = await asyncio.gather(*(self._run(self.checks[n]) for n in names))
        return {name: result or "ok" for name, result in zip(names, results, strict=True)}

    async def _run(self, check: Check) -> str | None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                return await check()
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_S:.0f}s"
        except Exception as exc:  # a check that raises is a failed check, not a 500
            return f"{type(exc).__name__}: {exc}"

    async def close(self) -> None:
        for close in self._closers:
            try:
                await close()
            except Exception as exc:  # closing at shutdown: nothing left to save
                log.debug("closing a readiness check: %r", exc)


class PostgresCheck:
    """PostgreSQL answers ``SELECT 1`` on a connection of the check's own (never one the
    process is busy with), opened again after any failure."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def __call__(self) -> str | None:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self.dsn, timeout=CHECK_TIMEOUT_S)
            await self._conn.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S)
            return None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            await self.close()
            return f"PostgreSQL unreachable: {type(exc).__name__}: {exc}"

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


class KafkaCheck:
    """The broker answers a metadata request, on a client of the check's own."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._client: AIOKafkaClient | None = None

    async def __call__(self) -> str | None:
        try:
            if self._client is None:
                client = AIOKafkaClient(
                    bootstrap_servers=self.bootstrap,
                    request_timeout_ms=int(CHECK_TIMEOUT_S * 1000),
                )
                self._client = client
                await client.bootstrap()
            await self._client.fetch_all_metadata()
            return None
        except Exception as exc:  # aiokafka raises its own errors and OSError alike
            await self.close()
            return f"Kafka unreachable: {type(exc).__name__}: {exc}"

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


async def livez(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})  # fmt: skip


def add_routes(router: web.UrlDispatcher, readiness: Readiness, *, public: bool = False) -> None:
    """The health routes; ``public`` (the API's own port, open to its callers) names a failed
    check without its reason, which holds internal addresses, and logs the reason instead."""

    async def readyz(_: web.Request) -> web.Response:
        verdicts = await readiness.evaluate()
        ready = all(v == "ok" for v in verdicts.values())
        if public and not ready:
            for name, verdict in verdicts.items():
                if verdict != "ok":
                    log.warning("not ready: %s: %s", name, verdict)
            verdicts = {name: "ok" if v == "ok" else "unavailable" for name, v in verdicts.items()}
        body = {"status": "ready" if ready else "not ready", "checks": verdicts}
        return web.Response(
            body=msgspec.json.encode(body),
            status=200 if ready else 503,
            content_type="application/json",
        )

    router.add_get("/livez", livez)
    router.add_get("/readyz", readyz)
    router.add_get("/metrics", metrics)


async def serve(host: str, port: int, readiness: Readiness) -> web.AppRunner:
    """Start the health and metrics server in the running loop; ``runner.cleanup()`` stops it."""
    app = web.Application()
    add_routes(app.router, readiness)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("health and metrics on http://%s:%d (/livez, /readyz, /metrics)", host, port)
    return runner


@contextlib.asynccontextmanager
async def serving(host: str, port: int, readiness: Readiness) -> AsyncIterator[None]:
    """Serve health and metrics while the block runs (not at all on port 0)."""
    runner = await serve(host, port, readiness) if port else None
    try:
        yield
    finally:
        if runner is not None:
            await runner.cleanup()
        await readiness.close()
