"""`/v1/chat/completions` and `/v1/embeddings` (§7.1, §7.2, §7.7, §8.7): proxied in realtime,
or, for `service_tier: "flex"` chat completions, run by the engine and answered once ended."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
from aiohttp import web

from projections.api import flex, intake, proxy, realtime, stored
from projections.api.app import SUBMITTED, context, json_response, principal
from projections.rules.responses import chat_completion_result
from schemas.errors import ApiError
from streams.execution.outcome import override_response_id

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


def routes(router: web.UrlDispatcher) -> None:
    router.add_post(CHAT, chat_completions)
    router.add_post(EMBEDDINGS, embeddings)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _create(request, CHAT)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _create(request, EMBEDDINGS)


async def _create(request: web.Request, path: str) -> web.StreamResponse:
    ctx, who = context(request), principal(request)
    raw, body = await intake.read_object(request, ctx.config)
    name = intake.requested_model(body)
    model = intake.usable_model(ctx.config, name, who.user, path)
    request_id = str(uuid.uuid4())
    if intake.is_flex(body):
        if path == CHAT:
            await flex.submit(ctx, who, request_id, name, path, body)
            request[SUBMITTED] = True
            found = await stored.until_settled(ctx, request_id, who.user, code=504)
            status, answer = chat_completion_result(found.detail)
            return json_response(answer, status)
        log.info("flex embeddings %s run in realtime", request_id)

    def success(upstream: bytes) -> bytes:
        return override_response_id(upstream.decode("utf-8", "replace"), request_id, path).encode()

    job = proxy.Job(
        request_id=request_id,
        model=name,
        config=model,
        facts=realtime.facts(ctx.config, who, path),
        body=raw,
        upstream_path=path,
        upstream_body=raw,
        success=success,
        relay=ChatRelay(request_id) if path == CHAT else None,
        stream=body.get("stream") is True,
    )
    return await proxy.answer(request, job)


class ChatRelay:
    """Chat chunks pass through as they come, each carrying the response id (§8.8)."""

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id
        self._streamed = False

    def opening(self) -> bytes:
        return b""

    def forward(self, data: str) -> tuple[str, bytes]:
        self._streamed = True
        data = override_response_id(data, self._request_id, CHAT)
        return data, proxy.sse(data)

    def closing(self, status: int, body: bytes) -> bytes:
        if self._streamed:
            return b""  # `[DONE]`, or the upstream's error event, came with the stream
        # The upstream answered whole: its completion as the one chunk that streams it.
        try:
            completion = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):
            completion = None
        data = body if not isinstance(completion, dict) else msgspec.json.encode(_chunk(completion))
        return proxy.sse(data) + proxy.sse("[DONE]")

    def broken(self, error: ApiError) -> bytes:
        return proxy.sse(msgspec.json.encode(error.envelope()))


def _chunk(completion: dict[str, Any]) -> dict[str, Any]:
    choices = completion.get("choices")
    return completion | {
        "object": "chat.completion.chunk",
        "choices": [
            _delta_choice(choice) if isinstance(choice, dict) else choice
            for choice in (choices if isinstance(choices, list) else [])
        ],
    }


def _delta_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A choice's message as one delta; a delta's tool calls carry their index."""
    delta = choice.get("message")
    delta = dict(delta) if isinstance(delta, dict) else {}
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        delta["tool_calls"] = [
            {"index": index, **call} if isinstance(call, dict) else call
            for index, call in enumerate(calls)
        ]
    rest = {key: value for key, value in choice.items() if key != "message"}
    return rest | {"delta": delta}
