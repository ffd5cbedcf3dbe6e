"""``GET /v1/openapi.json``: the API's OpenAPI document (:mod:`schemas.openapi`), the same bytes
``python -m schemas.export`` writes to ``schemas/openapi.json``. It needs no API key: it holds
no user's data, and a client generator must be able to read it first."""

from __future__ import annotations

from aiohttp import web

from schemas import openapi

PATH = "/v1/openapi.json"


def routes(router: web.UrlDispatcher) -> None:
    document = openapi.render()

    async def serve(_: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    router.add_get(PATH, serve)
