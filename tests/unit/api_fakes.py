"""The realtime `/v1/responses` and `/v1/chat/completions` handlers served on loopback, with the
error middleware but the read model and the broker faked, for tests that call them with the
`openai` SDK as a user would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import asyncpg
import msgspec
import openai
from aiohttp import web

from cannonade.config import ApiConfig, Config, ModelConfig, ResponsesConfig
from cannonade.testing.fake_upstream import LoopbackServer
from projections.api import app as api
from projections.api import chat, proxy, responses
from projections.api.auth import Principal
from projections.api.publisher import Publisher
from projections.api.wakeups import Wakeups
from schemas.bodies import BodyRef
from schemas.commands import AnyCommand
from schemas.events import ChainEvent, RequestTransitions
from streams.execution.failure import NonRetriableHttpStatus


class FakePool:
    """The read model: `head` is every row read (a chain's head, ended or not), `steps` every
    list of rows (a chain's steps), `projected` whether a created row shows; the projector
    never advances."""

    def __init__(self) -> None:
        self.head: dict[str, Any] | None = None
        self.steps: list[dict[str, Any]] = []
        self.projected = False

    def chain_failed(self, payload: dict[str, Any]) -> None:
        """The head row as a chain's finalisation fails it with `payload` (§2.11)."""
        body = msgspec.json.encode(payload).decode()
        failure = NonRetriableHttpStatus(status=500, body=body).to_json().encode()
        self.head = {"state": "failed", "body": failure}

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any] | None:
        return self.head

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return self.steps

    async def fetchval(self, query: str, *args: Any) -> Any:
        if "projection_offsets" in query:
            return 0
        return True if self.projected else None


class FakePublisher:
    """The broker, keeping the chains started, the lifecycle records and the bodies."""

    def __init__(self) -> None:
        self.chains: list[str] = []
        self.records: list[RequestTransitions] = []
        self.stored: dict[str, bytes | None] = {}
        self._sent = asyncio.Condition()

    async def bodies(self, records: Sequence[tuple[str, bytes | None, int]]) -> list[BodyRef]:
        async with self._sent:
            self.stored |= {key: value for key, value, _ in records}
            self._sent.notify_all()
        return [BodyRef(0, offset) for offset in range(len(records))]

    async def body(self, key: str) -> bytes | None:
        """The body recorded under `key`, once the recorder (running on after the answer)
        sent it."""
        async with asyncio.timeout(5), self._sent:
            await self._sent.wait_for(lambda: key in self.stored)
        return self.stored[key]

    async def transitions(self, records: Sequence[RequestTransitions]) -> None:
        self.records += records

    async def chain(self, response_id: str, event: ChainEvent) -> None:
        self.chains.append(response_id)

    async def commands(self, commands: Sequence[AnyCommand]) -> None:
        pass  # a flex request's row is what the test's read model shows


#: An upstream reply: the data of each server-sent event (objects sent as JSON), or a JSON
#: answer as (status, body).
Reply = list[Any] | tuple[int, Any]


class ScriptedUpstream(LoopbackServer):
    """A chat-completions upstream answering each call with the next of its replies."""

    def __init__(self, *replies: Reply) -> None:
        super().__init__(web.Application())
        self.app.router.add_post("/v1/chat/completions", self._answer)
        self.replies = list(replies)
        self.received: list[Any] = []

    async def __aenter__(self) -> ScriptedUpstream:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.received.append(await request.json())
        reply = self.replies.pop(0)
        if isinstance(reply, tuple):
            status, body = reply
            return web.json_response(body, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for data in reply:
            text = data if isinstance(data, str) else msgspec.json.encode(data).decode()
            await response.write(f"data: {text}\n\n".encode())
        await response.write_eof()
        return response


@web.middleware
async def _as_ana(request: web.Request, handler: api.Handler) -> web.StreamResponse:
    request[api.PRINCIPAL] = Principal("ana", "key-1")
    return await handler(request)


@contextlib.asynccontextmanager
async def serve(
    upstream: str,
    pool: FakePool,
    publisher: FakePublisher,
    *,
    wait_s: float = 5.0,
    max_retries: int = 0,
) -> AsyncIterator[openai.AsyncOpenAI]:
    """An SDK client of the handlers, whose model `m` is answered by `upstream`; a wait on the
    read model gives up after `wait_s`."""
    config = Config(
        models={"m": ModelConfig(upstream=upstream)},
        api=ApiConfig(projection_stall_s=wait_s),
        responses=ResponsesConfig(poll_timeout_s=wait_s),
    )
    app = web.Application(middlewares=[api.errors, _as_ana])
    database = cast(asyncpg.Pool, pool)
    app[api.CONTEXT] = api.Context(config, database, cast(Publisher, publisher), Wakeups(""))
    proxy.setup(app)
    responses.routes(app.router)
    chat.routes(app.router)
    server = LoopbackServer(app)
    await server.start()
    client = openai.AsyncOpenAI(api_key="k", base_url=f"{server.url}/v1", max_retries=max_retries)
    try:
        yield client
    finally:
        await client.close()
        await server.close()
