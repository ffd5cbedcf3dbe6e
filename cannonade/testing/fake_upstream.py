"""An OpenAI-compatible fake upstream on loopback, for tests, the demo and benchmarks.

Every endpoint answers like the OpenAI API (the official SDK parses the bodies). A request can
steer its own answer with a top-level `"x_fake"` object in its JSON body:

- `latency_ms`: wait before answering (defaults to the server-wide value);
- `status` (>= 400): answer this status with an OpenAI error envelope;
- `fail_times` + `fail_status` (default 500): fail the first N attempts carrying the same
  `X-Fusillade-Request-Id`, then answer normally;
- `tool_calls`: `[{"name", "arguments"}]` returned as assistant tool calls;
- `hang`: never answer (for timeout and cancellation tests);
- `stream_error`: when streaming, answer 200 and send an `{"error": {..., "code": N}}` event;
- `chunk_delay_ms`: when streaming, pause between events.

Streaming (SSE) happens when the body has `"stream": true` or the request carries
`X-Fusillade-Stream: true`. `GET /_stats` reports per-model calls, in-flight, max in-flight and
status counts plus every call (request id, model, time); `POST /_reset` clears them.

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
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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


class ToolCallSpec(msgspec.Struct, frozen=True):
    name: str
    arguments: str | dict[str, Any] = "{}"

    def arguments_text(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return msgspec.json.encode(self.arguments).decode()


class FakeControls(msgspec.Struct, frozen=True):
    latency_ms: float | None = None  # None: the server-wide latency
    status: int | None = None
    fail_times: int = 0
    fail_status: int = 500
    tool_calls: list[ToolCallSpec] = []
    hang: bool = False
    stream_error: int | None = None
    chunk_delay_ms: float = 0


class ModelStats(msgspec.Struct):
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    statuses: dict[int, int] = {}


class CallRecord(msgspec.Struct, frozen=True):
    request_id: str | None
    model: str
    path: str
    at: float  # Unix seconds at arrival, so tests can measure backoff spacing


class FakeStats(msgspec.Struct):
    models: dict[str, ModelStats] = {}
    calls: list[CallRecord] = []
    in_flight: int = 0
    max_in_flight: int = 0


class _Answer(Exception):
    """Ends a request early with an OpenAI error envelope."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[web.Request, dict[str, Any], FakeControls], Awaitable[web.StreamResponse]]


class FakeUpstream:
    def __init__(self, *, latency_ms: float = 0) -> None:
        self.latency_ms = latency_ms
        self._stats = FakeStats()
        self._attempts: Counter[str | None] = Counter()
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
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

    def stats(self) -> FakeStats:
        """A snapshot, safe to keep while calls continue."""
        return msgspec.convert(msgspec.to_builtins(self._stats), FakeStats)

    def reset(self) -> None:
        self._stats = FakeStats()
        self._attempts.clear()

    async def _get_stats(self, _: web.Request) -> web.Response:
        return _json(200, self._stats)

    async def _post_reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)

    def _endpoint(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve(request: web.Request) -> web.StreamResponse:
            try:
                body = msgspec.json.decode(await request.read())
                if not isinstance(body, dict):
                    raise _Answer(400, "the request body must be a JSON object")
                controls = msgspec.convert(body.pop("x_fake", None) or {}, FakeControls)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                return _error(400, f"invalid request body: {exc}")
            except _Answer as answer:
                return _error(answer.status, answer.message)
            model = str(body.get("model") or "fake-model")
            request_id = request.headers.get("X-Fusillade-Request-Id")
            async with self._in_flight(model, request_id, request.path) as record_status:
                response = await self._answer(request, body, controls, handler, request_id)
                record_status(response.status)
                return response

        return serve

    async def _answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        controls: FakeControls,
        handler: Handler,
        request_id: str | None,
    ) -> web.StreamResponse:
        self._attempts[request_id] += 1
        attempt = self._attempts[request_id]
        if controls.hang:
            await asyncio.Event().wait()
        latency = self.latency_ms if controls.latency_ms is None else controls.latency_ms
        if latency:
            await asyncio.sleep(latency / 1000)
        if attempt <= controls.fail_times:
            return _error(controls.fail_status, f"injected failure on attempt {attempt}")
        if controls.status is not None and controls.status >= 400:
            return _error(controls.status, f"injected status {controls.status}")
        try:
            return await handler(request, body, controls)
        except _Answer as answer:
            return _error(answer.status, answer.message)

    @contextlib.asynccontextmanager
    async def _in_flight(
        self, model: str, request_id: str | None, path: str
    ) -> AsyncIterator[Callable[[int], None]]:
        stats = self._stats
        per_model = stats.models.setdefault(model, ModelStats())
        stats.calls.append(CallRecord(request_id, model, path, time.time()))
        per_model.calls += 1
        per_model.in_flight += 1
        per_model.max_in_flight = max(per_model.max_in_flight, per_model.in_flight)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)

        def record_status(status: int) -> None:
            per_model.statuses[status] = per_model.statuses.get(status, 0) + 1

        try:
            yield record_status
        finally:
            per_model.in_flight -= 1
            stats.in_flight -= 1

    async def _chat_completion(
        self, request: web.Request, body: dict[str, Any], controls: FakeControls
    ) -> web.StreamResponse:
        model = str(body.get("model") or "fake-model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Answer(400, "'messages' must be a non-empty array")
        reply = _echo(_last_text(messages))
        prompt_tokens = sum(_count_tokens(_text_of(m)) for m in messages)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        finish_reason = "stop"
        if controls.tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": _tool_calls(controls)}
            finish_reason = "tool_calls"
        usage = _usage(prompt_tokens, _count_tokens(reply))
        if _wants_stream(request, body):
            head = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
            opening = {"role": "assistant", "content": None if controls.tool_calls else ""}
            deltas: list[dict[str, Any]] = [opening]
            if controls.tool_calls:
                deltas += [
                    {"tool_calls": [dict(call, index=i)]}
                    for i, call in enumerate(message["tool_calls"])
                ]
            else:
                deltas += [{"content": piece} for piece in _pieces(reply)]
            chunks = [
                head | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                for delta in deltas
            ]
            chunks.append(
                head | {"choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]}
            )
            # Streams driven by the engine's header get usage too: results must keep it.
            if _fusillade_stream(request) or (body.get("stream_options") or {}).get(
                "include_usage"
            ):
                chunks.append(head | {"choices": [], "usage": usage})
            return await _stream(request, chunks, controls)
        return _json(
            200,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": usage,
            },
        )

    async def _completion(
        self, request: web.Request, body: dict[str, Any], controls: FakeControls
    ) -> web.StreamResponse:
        model = str(body.get("model") or "fake-model")
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
        reply = _echo(text)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        usage = _usage(_count_tokens(text), _count_tokens(reply))
        if _wants_stream(request, body):
            chunks = [
                head
                | {
                    "choices": [
                        {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
                    ]
                }
                for piece in _pieces(reply)
            ]
            chunks.append(
                head
                | {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}
            )
            return await _stream(request, chunks, controls)
        choice = {"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}
        return _json(200, head | {"choices": [choice], "usage": usage})

    async def _embeddings(
        self, request: web.Request, body: dict[str, Any], controls: FakeControls
    ) -> web.StreamResponse:
        model = str(body.get("model") or "fake-model")
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
        return _json(200, {"object": "list", "data": data, "model": model, "usage": usage})

    async def _response(
        self, request: web.Request, body: dict[str, Any], controls: FakeControls
    ) -> web.StreamResponse:
        model = str(body.get("model") or "fake-model")
        raw_input = body.get("input")
        text = raw_input if isinstance(raw_input, str) else _last_text(raw_input or [])
        reply = _echo(text)
        output: list[dict[str, Any]]
        if controls.tool_calls:
            output = [
                {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex}",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
                for call in _tool_calls(controls)
            ]
        else:
            output = [
                {
                    "type": "message",
                    "id": f"msg_{uuid.uuid4().hex}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": reply, "annotations": []}],
                }
            ]
        input_tokens, output_tokens = _count_tokens(text), _count_tokens(reply)
        return _json(
            200,
            {
                "id": f"resp_{uuid.uuid4().hex}",
                "object": "response",
                "created_at": int(time.time()),
                "status": "completed",
                "model": model,
                "output": output,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "metadata": body.get("metadata") or {},
                "parallel_tool_calls": True,
                "temperature": 1.0,
                "top_p": 1.0,
                "tool_choice": "auto",
                "tools": body.get("tools") or [],
                "usage": {
                    "input_tokens": input_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": output_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": input_tokens + output_tokens,
                },
            },
        )


async def start_fake_upstream(
    host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0
) -> FakeUpstream:
    upstream = FakeUpstream(latency_ms=latency_ms)
    await upstream.start(host, port)
    return upstream


def _wants_stream(request: web.Request, body: dict[str, Any]) -> bool:
    return body.get("stream") is True or _fusillade_stream(request)


def _fusillade_stream(request: web.Request) -> bool:
    return request.headers.get("X-Fusillade-Stream") == "true"


async def _stream(
    request: web.Request, chunks: list[dict[str, Any]], controls: FakeControls
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    events: list[Any] = chunks
    if controls.stream_error is not None:
        error = {"message": "injected stream error", "type": "server_error"}
        events = [chunks[0], {"error": error | {"code": controls.stream_error}}]
    for index, event in enumerate(events):
        if index and controls.chunk_delay_ms:
            await asyncio.sleep(controls.chunk_delay_ms / 1000)
        await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _json(status: int, document: Any) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(document), content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    error_type = _ERROR_TYPES.get(status, "server_error")
    envelope = {"message": message, "type": error_type, "param": None, "code": error_type}
    return _json(status, {"error": envelope})


def _tool_calls(controls: FakeControls) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": spec.name, "arguments": spec.arguments_text()},
        }
        for spec in controls.tool_calls
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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _vector(text: str, dimensions: int) -> list[float]:
    """Deterministic per input, so repeated embeddings compare equal."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dimensions)]


async def _serve(host: str, port: int, latency_ms: float) -> None:
    upstream = await start_fake_upstream(host, port, latency_ms)
    print(f"listening on {upstream.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await upstream.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible fake upstream on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port, args.latency_ms))


if __name__ == "__main__":
    main()
