"""An OpenAI-compatible fake upstream on loopback, for tests, the demo and benchmarks.

Every endpoint answers like the OpenAI API (the official SDK parses the bodies). A request can
steer its own answer with a top-level `"x_fake"` object in its JSON body:

- `latency_ms`: wait before answering (defaults to the server-wide value);
- `status` (>= 400): answer this status with an OpenAI error envelope (`message` sets its text);
- `fail_times` + `fail_status` (default 500): fail the first N attempts carrying the same
  `X-Fusillade-Request-Id`, then answer normally;
- `tool_calls`: `[{"name", "arguments", "id"?}]` returned as assistant tool calls;
- `content`, `finish_reason`, `usage` (`{"prompt_tokens", "completion_tokens"}`): replace the
  echoed text, the finish reason and the token counts;
- `hang`: never answer (for timeout and cancellation tests);
- `stream` (default true): false answers JSON even when the request streams;
- `stream_error`: when streaming, answer 200 and send an `{"error": {..., "code": N}}` event;
- `chunk_delay_ms`: when streaming, pause between events.

Requests that cannot carry `x_fake` (a step chain forwards only model, messages, stream and
tools) are steered by scripts instead: `POST /_script` with
`{"replies": [<reply>...], "model"?, "marker"?, "path"?, "repeat"?}` queues replies (the fields
above except `fail_times`/`fail_status`) for requests whose model equals `model`, whose raw body
contains the substring `marker` and whose path equals `path` (each filter optional). Scripts are
tried in registration order; each matching request takes the next reply, and a script is dropped
once used up, unless `repeat` keeps answering with its last reply. A scripted reply replaces the
request's `x_fake`. The answer is `{"id": "script-N"}`.

`GET /_received[?model=&marker=&path=]` lists the requests received while recording (path,
headers with lowercased names, JSON body, arrival time, answering script and status), oldest
first, at most the latest 10 000. Recording is off by default so benchmarks stay flat in memory; `POST /_script` turns it
on and `POST /_record` `{"enabled": bool}` sets it.

Streaming (SSE) happens when the body has `"stream": true` or the request carries
`X-Fusillade-Stream: true`: chat completions stream content and tool-call deltas (the usage chunk
follows when `stream_options.include_usage` is set or the engine's header is present), and
`/v1/responses` streams the Responses events from `response.created` to `response.completed`.
`GET /_stats` reports per-model calls, in-flight, max in-flight and status counts plus every call
(request id, model, time), and for the whole and each model `seconds_at`: the seconds spent with
each number of requests in flight, from the first request to the last change (whether a client
kept the upstream full); `POST /_reset` clears stats, scripts and recorded requests and turns
recording off.

`FakeUpstreamControl(url)` drives these endpoints from synchronous tests.

Run: `python -m cannonade.testing.fake_upstream --port 8089 [--latency-ms 50]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import signal
import struct
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import msgspec
from aiohttp import web

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_EMBEDDING_DIMENSIONS = 8
_STREAM_PIECES = 3
_RECORD_LIMIT = 10_000


class ToolCallSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    arguments: str | dict[str, Any] = "{}"
    id: str | None = None  # None: a fresh `call_…` id

    def arguments_text(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return msgspec.json.encode(self.arguments).decode()


class UsageSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prompt_tokens: int
    completion_tokens: int


class FakeReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to answer one request; unknown fields are rejected so that typos in scripts fail."""

    content: str | None = None  # None: echo the last user text (or nothing with tool calls)
    tool_calls: list[ToolCallSpec] = []
    status: int | None = None
    message: str | None = None
    latency_ms: float | None = None  # None: the server-wide latency
    finish_reason: str | None = None  # None: "tool_calls" with tool calls, else "stop"
    usage: UsageSpec | None = None  # None: counted from the texts
    hang: bool = False
    stream: bool = True
    stream_error: int | None = None
    chunk_delay_ms: float = 0


class FakeControls(FakeReply, frozen=True, forbid_unknown_fields=False):
    """The `x_fake` object: a reply plus per-request-id failures; unknown keys are ignored."""

    fail_times: int = 0
    fail_status: int = 500


class UpstreamScript(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    replies: list[FakeReply]
    model: str | None = None
    marker: str | None = None
    path: str | None = None
    repeat: bool = False


class Gauge(msgspec.Struct, dict=True):
    """Calls in flight: now, at most, and the seconds spent with each number in flight from the
    first call on (up to the last change): whether a client kept the upstream full, not only
    that it once was. The last change's time is an attribute, not a field (``dict=True``): a
    reading of this process's monotonic clock means nothing in ``/_stats``."""

    in_flight: int = 0
    max_in_flight: int = 0
    seconds_at: dict[int, float] = {}

    def __post_init__(self) -> None:
        self._changed_at: float | None = None  # monotonic; None before the first call

    def move(self, by: int, now: float) -> None:
        """Change the level, first adding the time spent at the level it leaves."""
        if self._changed_at is not None:
            level = self.in_flight
            self.seconds_at[level] = self.seconds_at.get(level, 0.0) + now - self._changed_at
        self._changed_at = now
        self.in_flight += by
        self.max_in_flight = max(self.max_in_flight, self.in_flight)


class CallStats(Gauge):
    calls: int = 0
    statuses: dict[int, int] = {}

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


class CallRecord(msgspec.Struct, frozen=True):
    request_id: str | None
    model: str
    path: str
    at: float  # Unix seconds at arrival, so tests can measure backoff spacing


class FakeStats(Gauge):
    models: dict[str, CallStats] = {}
    calls: list[CallRecord] = []


class ReceivedRequest(msgspec.Struct):
    path: str
    headers: dict[str, str]  # names lowercased
    body: Any  # the parsed JSON, or the text when it is not JSON
    at: float  # Unix seconds at arrival
    script: str | None = None  # the script whose reply answered it
    status: int | None = None  # None until answered (or forever, for a hang)


# Scripting, recording, counting and serving, shared with the fake tool server.

ReplyT = TypeVar("ReplyT")


class _Script(Generic[ReplyT]):
    __slots__ = ("id", "key", "marker", "path", "replies", "repeat")

    def __init__(
        self,
        script_id: str,
        key: str | None,
        marker: str | None,
        path: str | None,
        replies: Sequence[ReplyT],
        repeat: bool,
    ) -> None:
        self.id = script_id
        self.key = key
        self.marker = None if marker is None else marker.encode()
        self.path = path
        self.replies = deque(replies)
        self.repeat = repeat

    def matches(self, key: str, path: str, raw: bytes) -> bool:
        return (
            (self.key is None or self.key == key)
            and (self.path is None or self.path == path)
            and (self.marker is None or self.marker in raw)
        )


class ScriptBook(Generic[ReplyT]):
    """Queues of scripted replies, matched in registration order to arriving requests.

    `key` is what a script may name (the model, or the tool); the marker is searched in the raw
    body, so it should be a plain token that JSON leaves unescaped.
    """

    def __init__(self) -> None:
        self._scripts: list[_Script[ReplyT]] = []
        self._added = 0

    def __bool__(self) -> bool:
        return bool(self._scripts)

    def add(
        self,
        replies: Sequence[ReplyT],
        *,
        key: str | None = None,
        marker: str | None = None,
        path: str | None = None,
        repeat: bool = False,
    ) -> str:
        if not replies:
            raise ValueError("a script needs at least one reply")
        self._added += 1
        script = _Script(f"script-{self._added}", key, marker, path, replies, repeat)
        self._scripts.append(script)
        return script.id

    def take(self, key: str, path: str, raw: bytes) -> tuple[str, ReplyT] | None:
        """The next reply for this request, consumed; None when no script matches."""
        for script in self._scripts:
            if script.matches(key, path, raw):
                reply = script.replies[0]
                if len(script.replies) > 1 or not script.repeat:
                    script.replies.popleft()
                if not script.replies:
                    self._scripts.remove(script)
                return script.id, reply
        return None

    def clear(self) -> None:
        self._scripts.clear()


class Recorder:
    """The requests received while enabled, bounded so that long runs stay flat in memory."""

    def __init__(self, *, enabled: bool, limit: int = _RECORD_LIMIT) -> None:
        self.default = enabled
        self.enabled = enabled
        self._records: deque[ReceivedRequest] = deque(maxlen=limit)

    def add(self, request: web.Request, body: Any, script: str | None) -> ReceivedRequest:
        headers = {name.lower(): value for name, value in request.headers.items()}
        record = ReceivedRequest(request.path, headers, body, time.time(), script)
        self._records.append(record)
        return record

    def select(self, keep: Callable[[ReceivedRequest], bool]) -> list[ReceivedRequest]:
        # Copies: a caller's list must not change when a pending answer lands.
        return [msgspec.structs.replace(record) for record in self._records if keep(record)]

    def reset(self) -> None:
        self._records.clear()
        self.enabled = self.default


@contextlib.contextmanager
def in_flight(*gauges: Gauge) -> Iterator[None]:
    """Counts a call as in flight on every gauge until it ends, however it ends."""
    now = time.monotonic()  # one clock reading: every gauge changes at the same instant
    for gauge in gauges:
        gauge.move(1, now)
    try:
        yield
    finally:
        now = time.monotonic()
        for gauge in gauges:
            gauge.move(-1, now)


def body_contains(record: ReceivedRequest, marker: str | None) -> bool:
    if marker is None:
        return True
    if isinstance(record.body, str):
        return marker in record.body
    return marker.encode() in msgspec.json.encode(record.body)


class LoopbackServer:
    """An aiohttp app served on a (by default ephemeral) loopback port."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # Cancel handlers whose client went away, so in-flight counts see aborted calls.
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=4096)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self.url = f"http://{host}:{bound_port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve_until_signalled(server: LoopbackServer, host: str, port: int) -> None:
    await server.start(host, port)
    print(f"listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


class _Answer(Exception):
    """Ends a request early with an OpenAI error envelope."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[web.Request, dict[str, Any], FakeReply], Awaitable[web.StreamResponse]]


class FakeUpstream(LoopbackServer):
    def __init__(self, *, latency_ms: float = 0) -> None:
        super().__init__(web.Application(client_max_size=64 * 1024 * 1024))
        self.latency_ms = latency_ms
        self._stats = FakeStats()
        self._attempts: Counter[str | None] = Counter()
        self._scripts: ScriptBook[FakeReply] = ScriptBook()
        self._recorder = Recorder(enabled=False)
        routes: dict[str, Handler] = {
            "/v1/chat/completions": self._chat_completion,
            "/v1/completions": self._completion,
            "/v1/embeddings": self._embeddings,
            "/v1/responses": self._response,
        }
        for path, handler in routes.items():
            self.app.router.add_post(path, self._endpoint(handler))
        self.app.router.add_get("/_stats", self._get_stats)
        self.app.router.add_post("/_reset", self._post_reset)
        self.app.router.add_post("/_script", self._post_script)
        self.app.router.add_post("/_record", self._post_record)
        self.app.router.add_get("/_received", self._get_received)

    def stats(self) -> FakeStats:
        """A snapshot, safe to keep while calls continue."""
        return msgspec.convert(msgspec.to_builtins(self._stats), FakeStats)

    def reset(self) -> None:
        self._stats = FakeStats()
        self._attempts.clear()
        self._scripts.clear()
        self._recorder.reset()

    def script(
        self,
        *replies: FakeReply,
        model: str | None = None,
        marker: str | None = None,
        path: str | None = None,
        repeat: bool = False,
    ) -> str:
        """Queues replies for matching requests (see the module docstring); returns the id."""
        script_id = self._scripts.add(replies, key=model, marker=marker, path=path, repeat=repeat)
        self._recorder.enabled = True
        return script_id

    def record(self, enabled: bool = True) -> None:
        self._recorder.enabled = enabled

    def received(
        self, *, model: str | None = None, marker: str | None = None, path: str | None = None
    ) -> list[ReceivedRequest]:
        def keep(record: ReceivedRequest) -> bool:
            return (
                (model is None or _model(record.body) == model)
                and (path is None or record.path == path)
                and body_contains(record, marker)
            )

        return self._recorder.select(keep)

    async def _get_stats(self, _: web.Request) -> web.Response:
        return json_response(200, self._stats)

    async def _post_reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)

    async def _post_script(self, request: web.Request) -> web.Response:
        try:
            script = msgspec.json.decode(await request.read(), type=UpstreamScript)
            script_id = self.script(
                *script.replies,
                model=script.model,
                marker=script.marker,
                path=script.path,
                repeat=script.repeat,
            )
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return _error(400, f"invalid script: {exc}")
        return json_response(201, {"id": script_id})

    async def _post_record(self, request: web.Request) -> web.Response:
        return await post_record(request, self._recorder)

    async def _get_received(self, request: web.Request) -> web.Response:
        query = request.query
        received = self.received(
            model=query.get("model"), marker=query.get("marker"), path=query.get("path")
        )
        return json_response(200, received)

    def _endpoint(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            try:
                body = msgspec.json.decode(raw)
                if not isinstance(body, dict):
                    raise _Answer(400, "the request body must be a JSON object")
                controls = msgspec.convert(body.get("x_fake") or {}, FakeControls)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return _error(400, f"invalid request body: {exc}")
            except _Answer as answer:
                return _error(answer.status, answer.message)
            model = _model(body)
            request_id = request.headers.get("X-Fusillade-Request-Id")
            # Both checks are one truth test when nothing is scripted or recorded (benchmarks).
            scripted = self._scripts.take(model, request.path, raw) if self._scripts else None
            reply: FakeReply = controls
            script_id = failure = None
            if scripted is None:
                self._attempts[request_id] += 1
                attempt = self._attempts[request_id]
                if attempt <= controls.fail_times:
                    failure = _Answer(
                        controls.fail_status, f"injected failure on attempt {attempt}"
                    )
            else:
                script_id, reply = scripted
            record = None
            if self._recorder.enabled:
                record = self._recorder.add(request, body, script_id)
            with self._in_flight(model, request_id, request.path) as per_model:
                response = await self._answer(request, body, reply, handler, failure)
                per_model.count(response.status)
                if record is not None:
                    record.status = response.status
                return response

        return serve

    async def _answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        reply: FakeReply,
        handler: Handler,
        failure: _Answer | None,
    ) -> web.StreamResponse:
        if reply.hang:
            await asyncio.Event().wait()
        latency = self.latency_ms if reply.latency_ms is None else reply.latency_ms
        if latency:
            await asyncio.sleep(latency / 1000)
        if failure is not None:
            return _error(failure.status, failure.message)
        if reply.status is not None and reply.status >= 400:
            return _error(reply.status, reply.message or f"injected status {reply.status}")
        try:
            return await handler(request, body, reply)
        except _Answer as answer:
            return _error(answer.status, answer.message)

    @contextlib.contextmanager
    def _in_flight(self, model: str, request_id: str | None, path: str) -> Iterator[CallStats]:
        stats = self._stats
        per_model = stats.models.setdefault(model, CallStats())
        stats.calls.append(CallRecord(request_id, model, path, time.time()))
        per_model.calls += 1
        with in_flight(per_model, stats):
            yield per_model

    async def _chat_completion(
        self, request: web.Request, body: dict[str, Any], reply: FakeReply
    ) -> web.StreamResponse:
        model = _model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Answer(400, "'messages' must be a non-empty array")
        content = _content(reply, _last_text(messages))
        calls = _tool_calls(reply)
        prompt_tokens = sum(_count_tokens(_text_of(m)) for m in messages)
        usage = _usage(reply, prompt_tokens, content, calls)
        finish_reason = reply.finish_reason or ("tool_calls" if calls else "stop")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if _wants_stream(request, body) and reply.stream:
            # Split like OpenAI: a call's id and name first, then its arguments in pieces.
            deltas: list[dict[str, Any]] = [
                {"role": "assistant", "content": None if content is None else ""}
            ]
            deltas += [{"content": piece} for piece in _pieces(content or "")]
            for index, call in enumerate(calls):
                function = call["function"]
                opening = {"name": function["name"], "arguments": ""}
                deltas.append(
                    {"tool_calls": [call | {"index": index, "function": opening}]},
                )
                deltas += [
                    {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                    for piece in _pieces(function["arguments"])
                ]
            chunk_head = head | {"object": "chat.completion.chunk"}
            chunks = [
                chunk_head | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                for delta in deltas
            ]
            chunks.append(
                chunk_head
                | {"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]}
            )
            # Streams driven by the engine's header get usage too: results must keep it.
            if _fusillade_stream(request) or (body.get("stream_options") or {}).get(
                "include_usage"
            ):
                chunks.append(chunk_head | {"choices": [], "usage": usage})
            return await _stream(request, chunks, reply)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return json_response(
            200, head | {"object": "chat.completion", "choices": [choice], "usage": usage}
        )

    async def _completion(
        self, request: web.Request, body: dict[str, Any], reply: FakeReply
    ) -> web.StreamResponse:
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
        completion = reply.content if reply.content is not None else _echo(text)
        finish_reason = reply.finish_reason or "stop"
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": _model(body),
        }
        usage = _usage(reply, _count_tokens(text), completion, [])
        if _wants_stream(request, body) and reply.stream:
            chunks = [
                head
                | {
                    "choices": [
                        {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
                    ]
                }
                for piece in _pieces(completion)
            ]
            last = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
            chunks.append(head | {"choices": [last]})
            return await _stream(request, chunks, reply)
        choice = {"index": 0, "text": completion, "logprobs": None, "finish_reason": finish_reason}
        return json_response(200, head | {"choices": [choice], "usage": usage})

    async def _embeddings(
        self, request: web.Request, body: dict[str, Any], reply: FakeReply
    ) -> web.StreamResponse:
        inputs = _embedding_inputs(body.get("input"))
        dimensions = body.get("dimensions") or _EMBEDDING_DIMENSIONS
        if not isinstance(dimensions, int) or dimensions < 1:
            raise _Answer(400, "'dimensions' must be a positive integer")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _vector(str(item), dimensions)
            encoded: Any = vector
            if as_base64:
                # The SDK asks for base64 by default: little-endian float32s.
                encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(_count_tokens(str(item)) for item in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return json_response(
            200, {"object": "list", "data": data, "model": _model(body), "usage": usage}
        )

    async def _response(
        self, request: web.Request, body: dict[str, Any], reply: FakeReply
    ) -> web.StreamResponse:
        raw_input = body.get("input")
        text = raw_input if isinstance(raw_input, str) else _last_text(raw_input or [])
        content = _content(reply, text)
        calls = _tool_calls(reply)
        output: list[dict[str, Any]] = []
        if content is not None:
            part = {"type": "output_text", "text": content, "annotations": []}
            output.append(
                {
                    "type": "message",
                    "id": f"msg_{uuid.uuid4().hex}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [part],
                }
            )
        output += [
            {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
            for call in calls
        ]
        chat_usage = _usage(reply, _count_tokens(text), content, calls)
        incomplete = reply.finish_reason == "length"
        document = {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete" if incomplete else "completed",
            "model": _model(body),
            "output": output,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata") or {},
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "tool_choice": "auto",
            "tools": body.get("tools") or [],
            "usage": {
                "input_tokens": chat_usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": chat_usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": chat_usage["total_tokens"],
            },
        }
        if _wants_stream(request, body) and reply.stream:
            return await _stream(request, _response_events(document), reply, named=True)
        return json_response(200, document)


async def start_fake_upstream(
    host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0
) -> FakeUpstream:
    upstream = FakeUpstream(latency_ms=latency_ms)
    await upstream.start(host, port)
    return upstream


async def post_record(request: web.Request, recorder: Recorder) -> web.Response:
    """`POST /_record` `{"enabled": bool}`, shared by the fakes."""
    try:
        document = msgspec.json.decode(await request.read(), type=dict[str, bool])
        recorder.enabled = document["enabled"]
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
        return _error(400, f"expected {{'enabled': bool}}: {exc}")
    return web.Response(status=204)


def _model(body: Any) -> str:
    return str(body.get("model") or "fake-model") if isinstance(body, dict) else ""


def _wants_stream(request: web.Request, body: dict[str, Any]) -> bool:
    return body.get("stream") is True or _fusillade_stream(request)


def _fusillade_stream(request: web.Request) -> bool:
    return request.headers.get("X-Fusillade-Stream") == "true"


def _response_events(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The Responses stream of a finished response: lifecycle, then each output item's parts."""
    pending = document | {"status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
    ]
    for index, item in enumerate(document["output"]):
        at = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            text = item["content"][0]["text"]
            empty_part = {"type": "output_text", "text": "", "annotations": []}
            at_part = at | {"content_index": 0}
            events += [
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": item | {"status": "in_progress", "content": []},
                },
                {"type": "response.content_part.added", "part": empty_part} | at_part,
                *(
                    {"type": "response.output_text.delta", "delta": piece, "logprobs": []} | at_part
                    for piece in _pieces(text)
                ),
                {"type": "response.output_text.done", "text": text, "logprobs": []} | at_part,
                {"type": "response.content_part.done", "part": item["content"][0]} | at_part,
            ]
        else:
            arguments = item["arguments"]
            events += [
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": item | {"status": "in_progress", "arguments": ""},
                },
                *(
                    {"type": "response.function_call_arguments.delta", "delta": piece} | at
                    for piece in _pieces(arguments)
                ),
                {"type": "response.function_call_arguments.done", "arguments": arguments} | at,
            ]
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    terminal = "response.completed" if document["status"] == "completed" else "response.incomplete"
    events.append({"type": terminal, "response": document})
    return [event | {"sequence_number": number} for number, event in enumerate(events)]


async def _stream(
    request: web.Request, events: list[dict[str, Any]], reply: FakeReply, *, named: bool = False
) -> web.StreamResponse:
    """SSE: chat and completion chunks end with `[DONE]`; named (Responses) events carry their
    type in the `event:` line and end without it, as OpenAI does."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if reply.stream_error is not None:
        # The `{"error": …}` shape for every endpoint: the engine and the SDK look for it.
        error = {"message": "injected stream error", "type": "server_error"}
        events = [events[0], {"error": error | {"code": reply.stream_error}}]
    for index, event in enumerate(events):
        if index and reply.chunk_delay_ms:
            await asyncio.sleep(reply.chunk_delay_ms / 1000)
        if named:
            await response.write(f"event: {event.get('type', 'error')}\n".encode())
        await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
    if not named:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def json_response(status: int, document: Any) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(document), content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    error_type = _ERROR_TYPES.get(status, "server_error")
    envelope = {"message": message, "type": error_type, "param": None, "code": error_type}
    return json_response(status, {"error": envelope})


def _content(reply: FakeReply, user_text: str) -> str | None:
    if reply.content is not None:
        return reply.content
    return None if reply.tool_calls else _echo(user_text)


def _tool_calls(reply: FakeReply) -> list[dict[str, Any]]:
    return [
        {
            "id": spec.id or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": spec.name, "arguments": spec.arguments_text()},
        }
        for spec in reply.tool_calls
    ]


def _embedding_inputs(raw: Any) -> list[Any]:
    """The items to embed: one string, one token array, or an array of either."""
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(token, int) for token in raw)
    ):
        return [raw]
    if isinstance(raw, list) and raw:
        return raw
    raise _Answer(400, "'input' must be a string or a non-empty array")


def _text_of(item: Any) -> str:
    """The text of a chat message or Responses input item (string or content parts)."""
    if not isinstance(item, dict):
        return ""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and "text" in part
        )
    return ""


def _last_text(items: list[Any]) -> str:
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role", "user") == "user":
            return _text_of(item)
    return ""


def _echo(text: str) -> str:
    return f"echo: {text}" if text else "Hello from the fake upstream."


def _pieces(text: str) -> list[str]:
    size = max(1, -(-len(text) // _STREAM_PIECES))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _count_tokens(text: str) -> int:
    return len(text.split())


def _usage(
    reply: FakeReply, prompt_tokens: int, content: str | None, calls: list[dict[str, Any]]
) -> dict[str, int]:
    if reply.usage is not None:
        prompt_tokens = reply.usage.prompt_tokens
        completion_tokens = reply.usage.completion_tokens
    else:
        texts = [content or ""] + [call["function"]["arguments"] for call in calls]
        completion_tokens = sum(map(_count_tokens, texts))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _vector(text: str, dimensions: int) -> list[float]:
    """Deterministic per input, so repeated embeddings compare equal."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dimensions)]


class ControlClient:
    """Blocking calls to a fake's control endpoints: urllib, so synchronous tests can use it
    (from async code, run it in a thread: the fake may share the event loop)."""

    def __init__(self, url: str, *, timeout_s: float = 10) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def record(self, enabled: bool = True) -> None:
        self._call("POST", "/_record", {"enabled": enabled})

    def _script(self, document: Mapping[str, Any]) -> str:
        answer = msgspec.json.decode(self._call("POST", "/_script", document))
        return str(answer["id"])

    def _received(self, query: Mapping[str, str | None]) -> list[ReceivedRequest]:
        given = {name: value for name, value in query.items() if value is not None}
        path = "/_received" + (f"?{urllib.parse.urlencode(given)}" if given else "")
        return msgspec.json.decode(self._call("GET", path), type=list[ReceivedRequest])

    def _call(self, method: str, path: str, document: Any = None) -> bytes:
        data = None if document is None else msgspec.json.encode(document)
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            body: bytes = response.read()
            return body


class FakeUpstreamControl(ControlClient):
    def script(
        self,
        *replies: FakeReply | Mapping[str, Any],
        model: str | None = None,
        marker: str | None = None,
        path: str | None = None,
        repeat: bool = False,
    ) -> str:
        document = {"replies": list(replies), "repeat": repeat}
        filters = {"model": model, "marker": marker, "path": path}
        return self._script(document | {k: v for k, v in filters.items() if v is not None})

    def received(
        self, *, model: str | None = None, marker: str | None = None, path: str | None = None
    ) -> list[ReceivedRequest]:
        return self._received({"model": model, "marker": marker, "path": path})

    def stats(self) -> FakeStats:
        return msgspec.json.decode(self._call("GET", "/_stats"), type=FakeStats)


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible fake upstream on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args()
    upstream = FakeUpstream(latency_ms=args.latency_ms)
    asyncio.run(serve_until_signalled(upstream, args.host, args.port))


if __name__ == "__main__":
    main()
