"""The dashboard: a static page (``GET /dashboard``, vanilla JS, no build step) that signs in
with an API key kept in the browser's sessionStorage and polls the API as that key. Its JSON
endpoints: who the key is (``/v1/dashboard/me``), the caller's queue depth per model
(``/v1/dashboard/queues``) and, for the users named in ``api.operators``, the engine's
throughput and latency over the last hour (``/v1/dashboard/throughput``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from projections.api.app import context, json_response, principal
from projections.api.dashboard import stats
from schemas.api_dashboard import DashboardUser, QueueDepths, Throughput
from schemas.errors import ApiError

STATIC = Path(__file__).with_name("static")
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
# The page loads only its own files and talks only to this API: no inline code, no CDN.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def setup(router: web.UrlDispatcher) -> None:
    assets = {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in _TYPES}  # fmt: skip

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        if name not in assets:
            raise ApiError(404, f"No dashboard file {name}", code="not_found")
        body, content_type = assets[name]
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=_PAGE_HEADERS
        )

    router.add_get("/dashboard", asset)
    router.add_get("/dashboard/", asset)
    router.add_get("/dashboard/{name}", asset)
    router.add_get("/v1/dashboard/me", me)
    router.add_get("/v1/dashboard/queues", queues)
    router.add_get("/v1/dashboard/throughput", throughput)


def is_operator(request: web.Request) -> bool:
    return principal(request).user in context(request).config.api.operators


async def me(request: web.Request) -> web.Response:
    who = principal(request)
    return json_response(
        DashboardUser(
            object="dashboard.user", user=who.user, key_id=who.key_id,
            operator=is_operator(request),
        )
    )  # fmt: skip


async def queues(request: web.Request) -> web.Response:
    depths = await stats.queue_depths(context(request).pool, principal(request).user)
    return json_response(QueueDepths(object="dashboard.queues", data=depths))


async def throughput(request: web.Request) -> web.Response:
    if not is_operator(request):
        raise ApiError(403, "Only operators see the engine's throughput", code="insufficient_permissions")  # fmt: skip
    points = await stats.throughput(context(request).pool, datetime.now(UTC))
    return json_response(
        Throughput(object="dashboard.throughput", bucket_s=stats.BUCKET_S, data=points)
    )
