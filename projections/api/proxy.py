"""The realtime proxy (§7.2, §7.3): a request goes to its model's upstream at once, the
upstream's answer comes back with the §8.8 id, and the request is recorded on the side
(`projections.api.realtime`). A caller that disconnects before the upstream answered aborts the
upstream call and leaves the row ended with 499 (§5).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
from aiohttp import web

from cannonade.config import ModelConfig
from projections.api import stored
from projections.api.app import CONTEXT, SUBMITTED, Context, context
from projections.api.realtime import RealtimeRequest, Recorder, Recording
from projections.api.upstream import Reply, Upstream
from projections.rules.responses import RequestDetail, chat_completion_result, openai_envelope
from schemas.errors import ApiError
from streams.execution.client import stream_outcome

log = logging.getLogger(__name__)

T = TypeVar("T")

# §5: what a row whose caller went away before the upstream answered ends with.
CLIENT_DISCONNECTED = b'{"error":{"type":"client_disconnected","message":"client cancelled request before upstream response","code":499}}'  # fmt: skip
_STOPPED = ApiError(503, "Cannonade stopped before the upstream answered", code="unavailable")
_INTERNAL = ApiError(500, "Internal server error")
_WATCH_S = 0.2  # how often a waiting handler looks for its caller's disconnection


class Relay(Protocol):
    """How an upstream's SSE answer reaches the caller."""

    def opening(self) -> bytes:
        """Sent before the first upstream event."""
        ...

    def forward(self, data: str) -> tuple[str, bytes]:
        """(the event data kept for reassembly, what the caller is sent) for one event."""
        ...

    def closing(self, status: int, body: bytes) -> bytes:
        """Sent once the stream ended, or after the opening when the upstream answered a
        streaming caller whole; `body` is what was recorded for `status`."""
        ...

    def broken(self, error: ApiError) -> bytes:
        """Sent when the upstream failed half-way."""
        ...


@dataclass(frozen=True)
class Job(RealtimeRequest):
    """One realtime request: what is recorded, and what is sent upstream."""

    config: ModelConfig
    upstream_path: str
    upstream_body: bytes
    # A 2xx upstream body → what the caller gets and what is stored (§8.8, §7.8).
    success: Callable[[bytes], bytes]
    relay: Relay | None = None  # None: an SSE answer is read whole
    stream: bool = False  # the caller asked for server-sent events


# -- shared resources ----------------------------------------------------------------------


class Proxy:
    def __init__(self, ctx: Context) -> None:
        self.upstream = Upstream(ctx.config.executor.first_chunk_timeout_ms / 1000)
        self.recorder = Recorder(ctx.publisher)
        self._detached: set[asyncio.Task[None]] = set()

    def detach(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def close(self) -> None:
        for task in self._detached:
            task.cancel()
        await asyncio.gather(*self._detached, return_exceptions=True)
        await self.recorder.close()
        await self.upstream.close()


PROXY: web.AppKey[Proxy] = web.AppKey("proxy", Proxy)


def setup(app: web.Application) -> None:
    """The upstream session and the recorder, for the application's lifetime (after the
    context they use is created, closed before it is)."""

    async def resources(app: web.Application) -> AsyncIterator[None]:
        proxy = app[PROXY] = Proxy(app[CONTEXT])
        yield
        await proxy.close()

    app.cleanup_ctx.append(resources)


# -- flows ---------------------------------------------------------------------------------


class ClientGone(Exception):
    """The caller disconnected before its answer was complete."""


async def answer(request: web.Request, job: Job) -> web.StreamResponse:
    """§7.2: the upstream's answer, while the row is recorded in the background."""
    proxy = request.app[PROXY]
    recording = proxy.recorder.begin(job)
    try:
        return await _unless_client_gone(request, _exchange(proxy, job, recording, request))
    except ClientGone:
        recording.complete(499, CLIENT_DISCONNECTED)
        return web.Response(status=499)  # nobody is listening
    except asyncio.CancelledError:  # the server stopping, or a cancelled handler
        recording.complete(499, CLIENT_DISCONNECTED)
        raise


async def start_background(request: web.Request, job: Job) -> None:
    """§7.3: the row is created (and projected) before the caller hears 202, then the upstream
    call runs detached from the caller."""
    ctx, proxy = context(request), request.app[PROXY]
    recording = await proxy.recorder.begin_now(job)
    proxy.detach(_detached(proxy, job, recording))
    request[SUBMITTED] = True  # the upstream call runs whatever the caller hears next
    await stored.until_recorded(ctx, job.request_id)


async def _detached(proxy: Proxy, job: Job, recording: Recording) -> None:
    try:
        await _exchange(proxy, job, recording, None)
    except ApiError:
        pass  # recorded as the outcome
    except asyncio.CancelledError:
        recording.complete_with(_STOPPED)
        raise
    except Exception:
        log.exception("background request %s failed", job.request_id)


async def _exchange(
    proxy: Proxy, job: Job, recording: Recording, request: web.Request | None
) -> web.StreamResponse:
    """One upstream call and its outcome recorded; `request` None: nobody to stream to."""
    try:
        reply = await proxy.upstream.send(
            job.model, job.config, job.upstream_path, job.upstream_body, job.request_id
        )
        async with reply:
            # A streaming caller gets events even from an upstream that answered it whole; an
            # error answers with its status, as OpenAI's own does.
            whole = job.stream and 200 <= reply.status < 300
            if request is not None and job.relay is not None and (reply.streamed or whole):
                return await _relay(request, job, job.relay, reply, recording)
            raw = await reply.read()
        if 200 <= reply.status < 300:
            body = job.success(raw)
            recording.complete(reply.status, body)
            return web.Response(body=body, status=reply.status, content_type="application/json")
        recording.complete(reply.status, raw)
        return upstream_error(job, reply.status, raw)
    except ClientGone:
        raise
    except ApiError as exc:
        recording.complete_with(exc)
        raise
    except Exception:
        recording.complete_with(_INTERNAL)
        raise


def upstream_error(job: Job, status: int, raw: bytes) -> web.Response:
    """An upstream error passes through with its status: its own OpenAI envelope with its
    message, type, param and code (a missing or malformed one filled in, anything else left
    out, so every error reads as the envelope), anything else in the §4.6 envelope."""
    text = raw.decode("utf-8", "replace")
    envelope = openai_envelope(text, status)
    if envelope is not None:
        raw = msgspec.json.encode(envelope)
    else:
        detail = RequestDetail(
            id=job.request_id,
            state="completed",
            model=job.model,
            created_at=job.facts.created_at,
            response_status=status,
            response_body=text or None,
        )
        status, wrapped = chat_completion_result(detail)
        raw = msgspec.json.encode(wrapped)
    return web.Response(body=raw, status=status, content_type="application/json")


async def _relay(
    request: web.Request, job: Job, relay: Relay, reply: Reply, recording: Recording
) -> web.StreamResponse:
    """Streams the upstream's events to the caller as they come, and records their reassembly
    (a mid-stream upstream failure ends the stream with an error event); a whole answer is
    recorded as it is, and streamed by the relay's closing."""
    response = web.StreamResponse(
        status=reply.status,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    await _write(request, response, relay.opening())
    try:
        if reply.streamed:
            kept: list[str] = []
            async for data in reply.events():
                keep, send = relay.forward(data)
                kept.append(keep)
                await _write(request, response, send)
            status, outcome = stream_outcome(reply.status, kept)
            raw = outcome.encode()
        else:
            status, raw = reply.status, await reply.read()
        body = job.success(raw) if 200 <= status < 300 else raw
        recording.complete(status, body)
        ending = relay.closing(status, body)
    except ApiError as exc:
        recording.complete_with(exc)
        ending = relay.broken(exc)
    await _write(request, response, ending, last=True)
    return response


async def _write(
    request: web.Request, response: web.StreamResponse, data: bytes, *, last: bool = False
) -> None:
    try:
        if not response.prepared:
            await response.prepare(request)
        if data:
            await response.write(data)
        if last:
            await response.write_eof()
    except ConnectionResetError as exc:
        raise ClientGone from exc


def sse(data: str | bytes, event: str | None = None) -> bytes:
    text = data if isinstance(data, bytes) else data.encode()
    head = b"" if event is None else f"event: {event}\n".encode()
    return head + b"data: " + text + b"\n\n"


async def _unless_client_gone(request: web.Request, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, or ClientGone (with `work` cancelled) once the caller disconnects.

    aiohttp does not cancel a handler whose client went away, so the connection is watched."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone


async def _client_gone(request: web.Request) -> None:
    # Polled: the connection's loss sets no event a handler could await.
    while (transport := request.transport) is not None and not transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(_WATCH_S)
