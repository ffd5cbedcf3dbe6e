"""Realtime `/v1/responses` with tools: the warm path (responses §7.4).

`respond` records the head row (`processing`, path `/v1/responses`, tier `priority`) and the
parent body, then starts the chain (`ChainStarted` without a head claim): the chain agent runs
it and its finalisation ends the head row. The caller then gets, depending on the body:

- blocking: the outcome once the head row has ended in the read model — 200 and the assembled
  Responses object, or 502 `{"error": <failure payload>}`;
- `background: true`: 202 `in_progress` at once (the chain runs detached);
- `stream: true`: server-sent events driven by the projected steps as they land (each delta
  is a step's whole text), then `response.completed` or `response.failed`.

Nothing here runs the chain: a caller that goes away leaves it running, and
`GET /v1/responses/{id}` reads the same rows.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from projections import queries
from projections.api.app import SUBMITTED, Context, json_response
from projections.api.auth import Principal
from schemas import bodies, ids, topics
from schemas.errors import ApiError
from schemas.events import BatchlessFacts, ChainStarted, RequestCreated, RequestTransitions
from streams.responses.chain import with_unique_call_ids
from streams.responses.inputs import compact_json
from streams.responses.steps import response_id
from streams.responses.translate import function_call_item, item_id, message_item, tool_fields

PATH = "/v1/responses"
TIER = "priority"
_FIRST_POLL_S, _MAX_POLL_S = 0.02, 0.25
_TERMINAL = ("completed", "failed", "canceled")

_HEAD = f"""
SELECT r.state,
       CASE WHEN r.state = 'failed' THEN {queries.ERROR_ENVELOPE.format(body="b.body")}
            ELSE b.body END AS body
FROM requests r
LEFT JOIN bodies b ON b.ref = r.id
     AND b.kind = CASE WHEN r.state = 'completed' THEN 'res' ELSE 'err' END
WHERE r.id = $1
"""
_STEPS = """
SELECT id::text AS id, step_kind, step_sequence, state, request_payload, response_payload
FROM response_steps WHERE (id = $1 OR parent_step_id = $1) AND step_sequence >= $2
ORDER BY step_sequence
"""


async def respond(
    request: web.Request,
    ctx: Context,
    who: Principal,
    request_id: str,
    body: dict[str, Any],
    resolved_tool_names: frozenset[str],
) -> web.StreamResponse:
    model: str = body["model"]
    background = body.get("background") is True
    facts = _facts(ctx, who, background)
    await _start(ctx, request_id, model, body, resolved_tool_names, facts)
    request[SUBMITTED] = True  # the chain runs whatever the caller hears next
    if background:
        await ctx.wait_for(lambda: _head_exists(ctx.pool, request_id), "the response")
        return json_response(_in_progress(request_id, body, facts, background=True), 202)
    if body.get("stream") is True:
        return await _stream(request, ctx, request_id, body, facts)
    return await _blocking(ctx, request_id)


def _facts(ctx: Context, who: Principal, background: bool) -> BatchlessFacts:
    now = datetime.now(UTC)
    window = ctx.config.gate.window_for_tier(TIER)
    return BatchlessFacts(
        owner=who.user, path=PATH, service_tier=TIER, created_at=now,
        deadline=now + timedelta(seconds=window), background=background,
        api_key_id=who.key_id,
    )  # fmt: skip


async def _start(
    ctx: Context,
    request_id: str,
    model: str,
    body: dict[str, Any],
    resolved_tool_names: frozenset[str],
    facts: BatchlessFacts,
) -> None:
    """The head row and the parent body (acknowledged), then the chain."""
    now = facts.created_at
    created = RequestCreated(
        event_id=ids.event_id("chain-head-created", request_id), occurred_at=now,
        request_id=request_id, model=model, state="processing", facts=facts,
    )  # fmt: skip
    record = RequestTransitions(
        event_id=ids.event_id("transitions", created.event_id, 1), occurred_at=now,
        model=model, events=[created],
    )  # fmt: skip
    partition = bodies.partition_for(request_id, topics.BODIES.partitions)
    parent_key = bodies.key(bodies.TEMPLATE, request_id)
    refs, _ = await asyncio.gather(
        ctx.publisher.bodies([(parent_key, msgspec.json.encode(body), partition)]),
        ctx.publisher.transitions([record]),
    )
    started = ChainStarted(
        event_id=ids.event_id("chain-started", request_id), occurred_at=now,
        response_id=request_id, model=model, parent=refs[0],
        resolved_tool_names=sorted(resolved_tool_names), facts=facts,
        max_iterations=ctx.config.responses.max_iterations,
    )  # fmt: skip
    await ctx.publisher.chain(request_id, started)


async def _head_exists(pool: asyncpg.Pool, request_id: str) -> bool:
    return await pool.fetchval("SELECT 1 FROM requests WHERE id = $1", request_id) is not None


def _in_progress(
    request_id: str, body: dict[str, Any], facts: BatchlessFacts, *, background: bool
) -> dict[str, Any]:
    return {
        "id": response_id(request_id),
        "object": "response",
        "created_at": int(facts.created_at.timestamp()),
        "status": "in_progress",
        "model": body["model"],
        "background": background,
        "output": [],
        **tool_fields(body),
    }


# -- waiting on the read model ------------------------------------------------------------


class Ended(msgspec.Struct, frozen=True):
    state: str
    body: bytes | None

    def outcome(self) -> tuple[int, Any]:
        """(HTTP status, body) for the caller: 200 and the assembled response, or 502 and
        the failure payload (§7.4)."""
        if self.state == "completed" and self.body is not None:
            return 200, msgspec.json.decode(self.body)
        return 502, {"error": failure_payload(self.state, self.body)}


def failure_payload(state: str, error: bytes | None) -> Any:
    """The chain's failure as the finalisation stored it: the body inside the head row's
    NonRetriableHttpStatus envelope (§2.11)."""
    if state == "canceled":
        return {"type": "request_canceled", "message": "Request was canceled"}
    text = b"" if error is None else error
    try:
        envelope = msgspec.json.decode(text)
        return msgspec.json.decode(envelope["details"]["body"])
    except (msgspec.DecodeError, RecursionError, KeyError, TypeError):
        message = text.decode("utf-8", "replace") or "the response failed"
        return {"type": "server_error", "message": message}


async def _ended(pool: asyncpg.Pool, request_id: str) -> Ended | None:
    row = await pool.fetchrow(_HEAD, request_id)
    if row is None or row["state"] not in _TERMINAL:
        return None
    if row["state"] != "canceled" and row["body"] is None:
        return None  # the body is on its way (another topic)
    return Ended(row["state"], None if row["body"] is None else bytes(row["body"]))


class _Poll:
    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.delay = _FIRST_POLL_S

    async def wait(self, request_id: str) -> None:
        if time.monotonic() > self.deadline:
            raise ApiError(504, f"Request timed out: response {response_id(request_id)} has not finished")  # fmt: skip
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, _MAX_POLL_S)


async def _blocking(ctx: Context, request_id: str) -> web.Response:
    poll = _Poll(ctx.config.responses.poll_timeout_s)
    while (ended := await _ended(ctx.pool, request_id)) is None:
        await poll.wait(request_id)
    status, answer = ended.outcome()
    return json_response(answer, status)


# -- streaming (§7.4) ---------------------------------------------------------------------


class ChainEvents:
    """The SSE events of one chain from its projected steps, in step order: the text and
    the tool calls of each model call, each tool call's output, then the outcome. Every
    event's data carries `type` and `sequence_number`, as the `openai` SDK reads them."""

    def __init__(self, head: str, base: dict[str, Any]) -> None:
        self.head = head
        self.base = base
        self.next_step = 1  # the first step not yet streamed
        self.output_index = 0
        self.count = 0
        self.output: list[dict[str, Any]] = []  # the items streamed whole so far
        self.call_ids: set[str] = set()  # the tool calls' ids so far (assembly's names)

    def created(self) -> bytes:
        response = {**self.base, "status": "in_progress"}
        summary = {"id": response["id"], "object": "response", "status": "in_progress"}
        return self._event(0, "response.created", {**summary, "response": response}) + self._event(
            0, "response.in_progress", {"response": response}
        )

    def steps(self, rows: list[Any], *, final: bool) -> bytes:
        """Events for the finished steps at the front of ``rows``, stopping at the first one
        still in flight (parallel siblings are streamed in order). With ``final`` the chain
        has ended: what is not complete is skipped."""
        out = b""
        for row in rows:
            if row["step_sequence"] != self.next_step:
                break
            state = row["state"]
            if state == "completed" and row["response_payload"] is not None:
                out += self._step(row)
            elif state not in ("completed", "failed", "canceled") and not final:
                break
            elif state == "completed" and not final:
                break  # its payload is on its way
            self.next_step += 1
        return out

    def _step(self, row: Any) -> bytes:
        """A step's output items, framed as the SDK's stream helper accumulates them (added,
        deltas, done); item ids are the assembled response's (§3)."""
        sequence, step = row["step_sequence"], row["id"]
        payload = _json(row["response_payload"])
        if row["step_kind"] == "tool_call":
            request = _json(row["request_payload"])
            call_id = request.get("call_id") if isinstance(request, dict) else None
            item = {
                "type": "function_call_output",
                "id": item_id("fco", step, 0),
                "status": "completed",
                "call_id": call_id if isinstance(call_id, str) else f"call_step_{sequence}",
                "output": compact_json(payload),
            }
            index = self._index()
            return self._added(sequence, index, item) + self._done(sequence, index, item)
        out = b""
        message = _message(with_unique_call_ids(payload, sequence, self.call_ids))
        content = message.get("content")
        if isinstance(content, str) and content:
            out += self._text(sequence, message_item(content, item_id("msg", step, 0)))
        calls = message.get("tool_calls")
        for index, call in enumerate(calls if isinstance(calls, list) else []):
            if isinstance(call, dict):
                out += self._call(sequence, function_call_item(call, item_id("fc", step, index + 1)))  # fmt: skip
        return out

    def _text(self, sequence: int, item: dict[str, Any]) -> bytes:
        index, part = self._index(), item["content"][0]
        at = {"item_id": item["id"], "output_index": index, "content_index": 0}
        empty = {**part, "text": ""}
        return b"".join([
            self._added(sequence, index, {**item, "content": []}),
            self._event(sequence, "response.content_part.added", {**at, "part": empty}),
            self._event(sequence, "response.output_text.delta", {**at, "delta": part["text"], "logprobs": []}),
            self._event(sequence, "response.output_text.done", {**at, "text": part["text"], "logprobs": []}),
            self._event(sequence, "response.content_part.done", {**at, "part": part}),
            self._done(sequence, index, item),
        ])  # fmt: skip

    def _call(self, sequence: int, item: dict[str, Any]) -> bytes:
        index = self._index()
        at = {"item_id": item["id"], "output_index": index}
        arguments = item["arguments"]
        return b"".join([
            self._added(sequence, index, {**item, "arguments": ""}),
            self._event(sequence, "response.function_call_arguments.delta", {**at, "call_id": item["call_id"], "delta": arguments}),
            self._event(sequence, "response.function_call_arguments.done", {**at, "name": item["name"], "arguments": arguments}),
            self._done(sequence, index, item),
        ])  # fmt: skip

    def _added(self, sequence: int, index: int, item: dict[str, Any]) -> bytes:
        added = {**item, "status": "in_progress"}
        return self._event(sequence, "response.output_item.added", {"output_index": index, "item": added})  # fmt: skip

    def _done(self, sequence: int, index: int, item: dict[str, Any]) -> bytes:
        self.output.append(item)
        return self._event(sequence, "response.output_item.done", {"output_index": index, "item": item})  # fmt: skip

    def _index(self) -> int:
        self.output_index += 1
        return self.output_index - 1

    def ended(self, ended: Ended) -> bytes:
        status, answer = ended.outcome()
        if status == 200:
            return self._event(self.next_step, "response.completed", {"response": answer})
        error = answer["error"]
        if isinstance(error, dict):
            return self.failed(error.get("type", "server_error"), error.get("message", ""))
        return self.failed("server_error", str(error))

    def failed(self, kind: str, message: str) -> bytes:
        """`response.failed` with what streamed before it (the SDK keeps a failed response's
        `output` as sent) and a `code` the SDK's `ResponseError` names."""
        failure = {"type": kind, "code": "server_error", "message": message}
        response = {**self.base, "status": "failed", "output": self.output, "error": failure}
        return self._event(self.next_step, "response.failed", {"response": response})

    def _event(self, sse_id: int, kind: str, data: dict[str, Any]) -> bytes:
        document = {"type": kind, "sequence_number": self.count, **data}
        self.count += 1
        return (
            f"id: {sse_id}\nevent: {kind}\ndata: ".encode()
            + msgspec.json.encode(document)
            + b"\n\n"
        )


def _json(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def _message(payload: Any) -> dict[str, Any]:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    return message if isinstance(message, dict) else {}


async def _stream(
    request: web.Request,
    ctx: Context,
    request_id: str,
    body: dict[str, Any],
    facts: BatchlessFacts,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    events = ChainEvents(request_id, _in_progress(request_id, body, facts, background=False))
    await response.write(events.created())
    poll = _Poll(ctx.config.responses.poll_timeout_s)
    try:
        while True:
            ended = await _ended(ctx.pool, request_id)
            rows = await ctx.pool.fetch(_STEPS, request_id, events.next_step)
            chunk = events.steps(list(rows), final=ended is not None)
            if chunk:
                await response.write(chunk)
            if ended is not None:
                await response.write(events.ended(ended))
                break
            await poll.wait(request_id)
    except ApiError as exc:  # the poll's timeout, after the headers went out
        await response.write(events.failed("server_error", exc.message))
    except ConnectionResetError:
        return response  # the caller went away; the chain runs on
    await response.write_eof()
    return response
