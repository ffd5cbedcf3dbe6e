"""The upstream HTTP client (core §4.4): builds the call, sends it through a transport and
classifies what came back.

`Transport` is the seam (in the style of httpx transports): tests plug in an in-memory one,
production uses `AiohttpTransport`, one shared connection pool for every execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import msgspec
import yarl

from streams.execution.failure import NetworkError, RequestBuilderError, Timeout
from streams.execution.outcome import DEFAULT_RETRY_POLICY, Failure, Outcome, RetryPolicy, classify

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE"})
# RFC 9110 token characters: what header names and methods may contain.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What reqwest accepts in a value: no control characters except tab (so no header injection).
_HEADER_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")
_KNOWN_BATCH_FIELDS = frozenset(
    {
        "id",
        "file_id",
        "endpoint",
        "completion_window",
        "metadata",
        "output_file_id",
        "error_file_id",
        "created_by",
        "created_at",
        "expires_at",
        "cancelling_at",
        "errors",
        "total_requests",
    }
)


class Timeouts(msgspec.Struct, frozen=True):
    first_chunk_ms: int = 540_000
    chunk_ms: int = 540_000
    body_ms: int = 60_000


DEFAULT_TIMEOUTS = Timeouts()


class UpstreamCall(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one upstream attempt needs; `batch_headers` maps batch field → header text."""

    request_id: str
    custom_id: str | None = None
    endpoint: str
    path: str
    method: str
    body: bytes
    api_key: str
    stream: bool = False
    batch_headers: dict[str, str] = {}


class UpstreamRequest(msgspec.Struct, frozen=True):
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    stream: bool


class UpstreamResponse(msgspec.Struct, frozen=True):
    status: int
    body: str


class TransportTimeout(Exception):
    """A first-chunk, inter-chunk, body or overall limit ran out."""


class TransportError(Exception):
    """The exchange failed below HTTP (connect, reset, protocol); `sources` is the cause chain."""

    def __init__(self, message: str, sources: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.sources = tuple(sources)


class RequestBuildError(ValueError):
    """The call cannot be expressed as an HTTP request; retrying will not help."""


class Transport(Protocol):
    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        """Raise TransportTimeout or TransportError instead of returning when no answer came."""
        ...


class UpstreamClient:
    def __init__(
        self,
        transport: Transport,
        policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self._transport = transport
        self._policy = policy
        self._timeouts = timeouts

    async def execute(self, call: UpstreamCall) -> Outcome:
        """One attempt. Cancelling the awaiting task aborts the HTTP call."""
        try:
            request = build_request(call)
        except RequestBuildError as exc:
            return Failure(RequestBuilderError(error=str(exc)))
        try:
            response = await self._transport.send(request, self._timeouts)
        except TransportTimeout as exc:
            return Failure(Timeout(error=str(exc)))
        except TransportError as exc:
            return Failure(NetworkError.of(exc.message, exc.sources))
        return classify(response.status, response.body, self._policy)


def build_request(call: UpstreamCall) -> UpstreamRequest:
    url = call.endpoint + call.path
    try:
        parsed = yarl.URL(url)
    except ValueError as exc:
        raise RequestBuildError(f"invalid URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise RequestBuildError(f"invalid URL {url!r}: needs an http(s) scheme and a host")
    if not _is_token(call.method):
        raise RequestBuildError(f"invalid HTTP method {call.method!r}")

    headers: dict[str, str] = {}
    if call.api_key:
        headers["Authorization"] = f"Bearer {call.api_key}"
    headers["X-Fusillade-Request-Id"] = call.request_id
    for field, value in call.batch_headers.items():
        headers[f"x-fusillade-batch-{field.replace('_', '-')}"] = value
    if call.custom_id is not None:
        headers["X-Fusillade-Custom-Id"] = call.custom_id
    body: bytes | None = None
    if call.method.upper() not in _BODYLESS_METHODS and call.body:
        headers["Content-Type"] = "application/json"
        body = call.body
    if call.stream:
        headers["X-Fusillade-Stream"] = "true"
    for name, value in headers.items():
        if not _is_token(name) or not _is_header_value(value):
            raise RequestBuildError(f"invalid header {name}: {value!r}")
    return UpstreamRequest(call.method, url, headers, body, call.stream)


def format_timestamp(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ`, the reference's header and listing format."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def batch_header_values(
    fields: Sequence[str],
    batch: Mapping[str, str | int | datetime | Mapping[str, Any] | None],
    metadata: Mapping[str, Any],
) -> dict[str, str]:
    """The `batch_headers` of a batch row: each configured field that has a value.

    Known batch fields are read from `batch`; other names (and known ones without a value) are
    looked up as string values in the batch metadata. Batchless rows send none: pass no fields.
    """
    values: dict[str, str] = {}
    for field in fields:
        value = _field_text(batch.get(field)) if field in _KNOWN_BATCH_FIELDS else None
        if value is None and isinstance(metadata.get(field), str):
            value = metadata[field]
        if value is not None:
            values[field] = value
    return values


def _field_text(value: str | int | datetime | Mapping[str, Any] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, int):
        return str(value)
    return msgspec.json.encode(value).decode()


def _is_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def _is_header_value(text: str) -> bool:
    return _HEADER_VALUE.fullmatch(text) is not None


class AiohttpTransport:
    """One `aiohttp.ClientSession` for every call, created on first use inside the loop."""

    def __init__(self, *, max_connections: int = 10_000, keepalive_s: float = 30.0) -> None:
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AiohttpTransport:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        try:
            if request.stream:
                return await self._send_streaming(request, timeouts)
            return await self._send_whole(request, timeouts)
        except aiohttp.ClientError as exc:
            raise TransportError(_describe(exc), _causes(exc)) from exc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_s,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Our own limits apply (see Timeouts); aiohttp's defaults would cut them short.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
                # Requests of many users share the session: never carry cookies between them.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _open(
        self, request: UpstreamRequest
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self._client().request(
            request.method, request.url, headers=request.headers, data=request.body
        )

    async def _send_whole(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        limit_ms = timeouts.first_chunk_ms + timeouts.body_ms
        try:
            async with asyncio.timeout(limit_ms / 1000), self._open(request) as response:
                raw = await response.read()
        except TimeoutError as exc:
            raise TransportTimeout(f"no response from {request.url} within {limit_ms}ms") from exc
        return UpstreamResponse(response.status, _decode(raw, response.charset))

    async def _send_streaming(
        self, request: UpstreamRequest, timeouts: Timeouts
    ) -> UpstreamResponse:
        url = request.url
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(timeouts.first_chunk_ms / 1000):
                    response = await stack.enter_async_context(self._open(request))
                    sse = response.content_type == "text/event-stream"
                    events = _sse_data(response.content)
                    first = await anext(events, None) if sse else None
            except TimeoutError as exc:
                raise TransportTimeout(
                    f"no first event from {url} within {timeouts.first_chunk_ms}ms"
                ) from exc
            try:
                async with asyncio.timeout(timeouts.body_ms / 1000):
                    if not sse:
                        # Not SSE (typically a JSON error sent before streaming began): keep it.
                        raw = await response.read()
                        return UpstreamResponse(response.status, _decode(raw, response.charset))
                    collected = await _collect(events, first, timeouts.chunk_ms, url)
            except TimeoutError as exc:
                raise TransportTimeout(
                    f"body from {url} took longer than {timeouts.body_ms}ms"
                ) from exc
        status, body = stream_outcome(response.status, collected)
        return UpstreamResponse(status, body)


async def _collect(
    events: AsyncIterator[str], first: str | None, chunk_ms: int, url: str
) -> list[str]:
    """Every event after the first, each within `chunk_ms` of the one before."""
    collected: list[str] = []
    event = first
    while event is not None:
        collected.append(event)
        try:
            async with asyncio.timeout(chunk_ms / 1000):
                event = await anext(events, None)
        except TimeoutError as exc:
            raise TransportTimeout(
                f"stream from {url} stalled for {chunk_ms}ms after {len(collected)} events"
            ) from exc
    return collected


def _decode(raw: bytes, charset: str | None) -> str:
    try:
        return raw.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return raw.decode("utf-8", errors="replace")


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _causes(exc: BaseException) -> list[str]:
    causes: list[str] = []
    seen = {id(exc)}
    current = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        causes.append(_describe(current))
        current = current.__cause__ or current.__context__
    return causes


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The data of each server-sent event, in order.

    Lines are split by hand rather than with `readline`, whose size cap a single large event
    (a whole `response.completed` object) can exceed.
    """
    data: list[str] = []
    partial = bytearray()
    async for chunk in content.iter_any():
        start = 0
        while (end := chunk.find(b"\n", start)) != -1:
            partial += chunk[start:end]
            event = _sse_line(partial.rstrip(b"\r").decode("utf-8", errors="replace"), data)
            partial.clear()
            start = end + 1
            if event is not None:
                yield event
        partial += chunk[start:]
    # Be lenient with a stream that ends without the final blank line.
    if partial:
        _sse_line(partial.rstrip(b"\r").decode("utf-8", errors="replace"), data)
    if data:
        yield "\n".join(data)


def _sse_line(line: str, data: list[str]) -> str | None:
    """Apply one SSE line; return the event's data when the line completes an event."""
    if not line:
        if not data:
            return None
        event = "\n".join(data)
        data.clear()
        return event
    if line.startswith(":"):
        return None
    field, _, value = line.partition(":")
    if field == "data":
        data.append(value.removeprefix(" "))
    return None


def stream_outcome(status: int, events: Sequence[str]) -> tuple[int, str]:
    """(status, body) of a streamed response from its event data (core §4.4)."""
    embedded = next((data for data in events if data.startswith('{"error"')), None)
    if embedded is not None:
        embedded_status = _embedded_error_status(embedded)
        if embedded_status is not None:
            # Providers that fail mid-stream still answer 200; the event tells the truth.
            return embedded_status, embedded
    payloads = [data for data in events if data and data != "[DONE]"]
    if status < 400:
        assembled = reassemble(payloads)
        if assembled is not None:
            return status, assembled
    return status, "\n".join(payloads)


def _embedded_error_status(data: str) -> int | None:
    try:
        document = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    return 500


def reassemble(payloads: Sequence[str]) -> str | None:
    """The non-streaming JSON body equivalent to a stream of OpenAI chunks.

    Chat completion and completion chunks are merged; a Responses stream yields the object of
    its `response.completed` event. Anything else gives None (the caller keeps the raw data).
    """
    try:
        chunks = [msgspec.json.decode(payload) for payload in payloads]
    except (msgspec.DecodeError, RecursionError):
        return None
    if not chunks or not all(isinstance(chunk, dict) for chunk in chunks):
        return None
    for chunk in chunks:
        if chunk.get("type") == "response.completed" and isinstance(chunk.get("response"), dict):
            return msgspec.json.encode(chunk["response"]).decode()
    kind = _first(chunks, "object")
    if kind == "chat.completion.chunk":
        return msgspec.json.encode(_merge_chunks(chunks, "chat.completion")).decode()
    if kind == "text_completion":
        return msgspec.json.encode(_merge_chunks(chunks, "text_completion")).decode()
    return None


def _first(chunks: list[dict[str, Any]], key: str) -> Any:
    """`key` of the first chunk where it is set: some upstreams open with a metadata chunk
    whose fields are blank (Azure OpenAI's `prompt_filter_results`, with `"object": ""`)."""
    return next((chunk[key] for chunk in chunks if chunk.get(key)), chunks[0].get(key))


def _merge_chunks(chunks: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    choices: dict[int, _ChoiceAccumulator] = {}
    usage: Any = None
    fingerprint: Any = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        fingerprint = chunk.get("system_fingerprint") or fingerprint
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            choices.setdefault(index, _ChoiceAccumulator(index, chat=kind == "chat.completion"))
            choices[index].add(choice)
    merged: dict[str, Any] = {
        "id": _first(chunks, "id"),
        "object": kind,
        "created": _first(chunks, "created"),
        "model": _first(chunks, "model"),
        "choices": [choices[index].result() for index in sorted(choices)],
        "usage": usage,
    }
    if fingerprint is not None:
        merged["system_fingerprint"] = fingerprint
    return merged


class _ChoiceAccumulator:
    """One choice across chunks: text fields concatenated, tool calls merged by index."""

    def __init__(self, index: int, *, chat: bool) -> None:
        self._index = index
        self._chat = chat
        self._message: dict[str, Any] = {"role": "assistant", "content": None}
        self._text = ""
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self._logprobs: dict[str, Any] | None = None
        self._finish_reason: Any = None

    def add(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason") is not None:
            self._finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            self._add_logprobs(logprobs)
        if not self._chat:
            self._text += choice.get("text") or ""
            return
        for key, value in (choice.get("delta") or {}).items():
            if key == "tool_calls":
                for call in value or ():
                    self._add_tool_call(call)
            elif key == "role":
                self._message["role"] = value or self._message["role"]
            elif isinstance(value, str):
                self._message[key] = (self._message.get(key) or "") + value
            elif value is not None:
                self._message[key] = value

    def _add_tool_call(self, delta: dict[str, Any]) -> None:
        call = self._tool_calls.setdefault(
            delta.get("index", len(self._tool_calls)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        call["id"] = delta.get("id") or call["id"]
        call["type"] = delta.get("type") or call["type"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def _add_logprobs(self, logprobs: dict[str, Any]) -> None:
        if self._logprobs is None:
            self._logprobs = {}
        for key, value in logprobs.items():
            if isinstance(value, list):
                self._logprobs[key] = (self._logprobs.get(key) or []) + value
            else:
                self._logprobs[key] = value

    def result(self) -> dict[str, Any]:
        merged: dict[str, Any] = {"index": self._index}
        if self._chat:
            message = dict(self._message)
            if self._tool_calls:
                message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
            merged["message"] = message
        else:
            merged["text"] = self._text
        merged["logprobs"] = self._logprobs
        merged["finish_reason"] = self._finish_reason
        return merged
