"""`POST /v1/responses` (§7.1–§7.6, §8.6) and `GET /v1/responses/{id}` (§4).

A realtime body with tools after injection (§2.2) is a multi-step chain, run by
`projections.api.chains`; everything else is one upstream chat completion, translated (§7.8).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from projections import queries
from projections.api import chains, flex, intake, proxy, realtime, stored
from projections.api.app import SUBMITTED, context, json_response, principal
from projections.api.chat import CHAT
from projections.api.response_stream import Event, ResponsesStream
from projections.rules.responses import (
    RequestDetail,
    backing_request_id,
    openai_message,
    response_object,
    status_error_code,
    status_error_type,
)
from schemas.errors import ApiError, not_found
from streams.responses.inputs import InputError, parse_parent
from streams.responses.steps import (
    Step,
    StepKind,
    StepState,
    parse_response_id,
    response_id,
)
from streams.responses.tools import inject_tools, resolve_tools
from streams.responses.translate import chat_to_responses, responses_to_chat

PATH = "/v1/responses"


def routes(router: web.UrlDispatcher) -> None:
    router.add_post(PATH, create)
    router.add_get(PATH + "/{id}", retrieve)


async def create(request: web.Request) -> web.StreamResponse:
    ctx, who = context(request), principal(request)
    raw, body = await intake.read_object(request, ctx.config)
    try:
        parse_parent(body)  # §2.3/§2.4 errors are answered at intake (§8.6)
    except InputError as exc:
        raise exc.api_error() from None
    name: str = body["model"]
    model = intake.usable_model(ctx.config, name, who.user, PATH)
    resolved = resolve_tools(ctx.config.tools, name, who.user)
    body = inject_tools(body, resolved)
    request_id = str(uuid.uuid4())
    background = body.get("background") is True
    if intake.is_flex(body):
        return await _flex(request, request_id, name, body, background)
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        # §7.4: a multi-step chain, run inline.
        return await chains.respond(request, ctx, who, request_id, body, frozenset(resolved))
    facts = realtime.facts(ctx.config, who, PATH, background)
    created_at = int(facts.created_at.timestamp())
    chat = responses_to_chat(body)
    if background:  # answered 202 and polled: nothing streams
        chat.pop("stream", None)
        chat.pop("stream_options", None)
    relay = None if background else ResponsesRelay(body, response_id(request_id), created_at)
    translation = _translation(request_id, body, created_at, background)
    job = proxy.Job(
        request_id=request_id,
        model=name,
        config=model,
        facts=facts,
        body=raw,
        upstream_path=CHAT,
        upstream_body=msgspec.json.encode(chat),
        success=translation if relay is None else relay.arranging(translation),
        relay=relay,
        stream=chat.get("stream") is True,
    )
    if not background:
        return await proxy.answer(request, job)
    await proxy.start_background(request, job)
    detail = RequestDetail(
        id=request_id, state="processing", model=name, created_at=facts.created_at,
        body=raw.decode("utf-8", "replace"),
    )  # fmt: skip
    return json_response(response_object(detail), 202)


def _translation(
    request_id: str, body: dict[str, Any], created_at: int, background: bool
) -> Callable[[bytes], bytes]:
    def translate(upstream: bytes) -> bytes:
        try:
            chat = msgspec.json.decode(upstream)
        except (msgspec.DecodeError, RecursionError):
            chat = None
        if not isinstance(chat, dict):
            raise ApiError(502, "Empty or invalid response from upstream")
        response = chat_to_responses(chat, body, created_at=created_at)
        # Set, not overridden (§8.8): an upstream id that already reads resp_… is not ours.
        response |= {"id": response_id(request_id), "background": background}
        return msgspec.json.encode(response)

    return translate


async def _flex(
    request: web.Request, request_id: str, model: str, body: dict[str, Any], background: bool
) -> web.Response:
    """§7.5 (blocking) and §7.6 (background)."""
    ctx, who = context(request), principal(request)
    created_at = await flex.submit(ctx, who, request_id, model, PATH, body, background=background)
    request[SUBMITTED] = True
    if background:
        await stored.until_recorded(ctx, request_id)
        detail = RequestDetail(
            id=request_id, state="pending", model=model, created_at=created_at,
            body=msgspec.json.encode(body).decode(),
        )  # fmt: skip
        return json_response(response_object(detail) | {"service_tier": "flex"}, 202)
    found = await stored.until_settled(ctx, request_id, who.user, code=None)
    response = found.response()
    error = response.get("error") or {}
    # 200 once the model answered, whatever its answer's status (as the realtime call does).
    answered = found.detail.state == "completed" and "error" not in response
    status = 200 if answered else error.get("code") or 500
    return json_response(response, status)


async def retrieve(request: web.Request) -> web.Response:
    """§4.1: a head step answers through its request row, any other step is not a response;
    otherwise the id is a row's own. Another user's response is a missing one."""
    ctx, who = context(request), principal(request)
    given = request.match_info["id"]
    response_uuid = parse_response_id(given)
    if response_uuid is None:
        raise not_found("response", given)
    row = await queries.response_step(ctx.pool, response_uuid)
    step = None if row is None else _step(row)
    backing = backing_request_id(response_uuid, step)
    found = None if backing is None else await stored.load(ctx, backing, who.user)
    if found is None:
        raise not_found("response", given)
    return json_response(found.response(head_id=None if step is None else response_uuid))


def _step(row: Any) -> Step:
    return Step(
        id=row["id"],
        request_id=row["request_id"],
        prev_step_id=row["prev_step_id"],
        parent_step_id=row["parent_step_id"],
        step_kind=StepKind(row["step_kind"]),
        step_sequence=row["step_sequence"],
        request_payload=None,  # not needed to find the backing row
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        state=StepState(row["state"]),
    )


class ResponsesRelay:
    """The upstream's chat stream as Responses events (§7.8, streamed)."""

    def __init__(self, request: dict[str, Any], response_id: str, created_at: int) -> None:
        self._stream = ResponsesStream(request, response_id, created_at)

    def opening(self) -> bytes:
        return _sse(self._stream.opening())

    def arranging(self, translation: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        """`translation`, with the items in the order they streamed: the caller's GET then
        lists them as the stream did."""

        def arranged(upstream: bytes) -> bytes:
            response = msgspec.json.decode(translation(upstream))
            return msgspec.json.encode(self._stream.arranged(response))

        return arranged

    def forward(self, data: str) -> tuple[str, bytes]:
        try:
            chunk = msgspec.json.decode(data)
        except (msgspec.DecodeError, RecursionError):
            chunk = None  # `[DONE]`
        return data, _sse(self._stream.chunk(chunk))

    def closing(self, status: int, body: bytes) -> bytes:
        if 200 <= status < 300:
            return _sse(self._stream.finished(msgspec.json.decode(body)))
        text = body.decode("utf-8", "replace")
        message = openai_message(text) or text
        code = status_error_code(status)
        error = {"type": status_error_type(status), "code": code, "message": message}
        return _sse(self._stream.failed(error))

    def broken(self, error: ApiError) -> bytes:
        code = status_error_code(error.status)
        failure = {"type": error.type, "code": code, "message": error.message}
        return _sse(self._stream.failed(failure))


def _sse(events: list[Event]) -> bytes:
    return b"".join(proxy.sse(msgspec.json.encode(e), e["type"]) for e in events)
