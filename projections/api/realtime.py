"""Realtime requests (§5, §7.2, §7.3): proxied to the model's upstream at once and recorded as
two facts, the row's creation and its outcome, which the projector applies in either order.

Recording never holds up an answer: both facts are published by a background task per request
that retries until the broker takes them, creation first so that the outcome follows it on
their shared partition. A caller that disconnects before the upstream answered aborts the
upstream call and leaves the row ended with 499.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import msgspec
from aiohttp import web

from cannonade.config import Config, ModelConfig
from projections.api import stored
from projections.api.app import CONTEXT, Context, context
from projections.api.auth import Principal
from projections.api.publisher import Publisher
from projections.api.upstream import Reply, Upstream
from projections.rules.responses import RequestDetail, chat_completion_result, openai_message
from schemas import bodies, ids, topics
from schemas.errors import ApiError
from schemas.events import (
    BatchlessFacts,
    RealtimeCompletionReported,
    RequestCreated,
    RequestEvent,
    RequestTransitions,
)
from streams.execution.client import stream_outcome
from streams.execution.failure import NonRetriableHttpStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

# §5: what a row whose caller went away before the upstream answered ends with.
CLIENT_DISCONNECTED = b'{"error":{"type":"client_disconnected","message":"client cancelled request before upstream response","code":499}}'  # fmt: skip
_STOPPED = ApiError(503, "Cannonade stopped before the upstream answered", code="unavailable")
_INTERNAL = ApiError(500, "Internal server error")
_WATCH_S = 0.2  # how often a waiting handler looks for its caller's disconnection
_RETRY_FIRST_S, _RETRY_MAX_S = 0.5, 10.0
_SHUTDOWN_GRACE_S = 10.0


def facts(config: Config, who: Principal, path: str, background: bool = False) -> BatchlessFacts:
    created_at = datetime.now(UTC)
    window = config.gate.window_for_tier("priority")
    return BatchlessFacts(
        owner=who.user,
        path=path,
        service_tier="priority",
        created_at=created_at,
        deadline=created_at + timedelta(seconds=window),
        background=background,
        api_key_id=who.key_id,
    )


class Relay(Protocol):
    """How an upstream's SSE answer reaches the caller."""

    def opening(self) -> bytes:
        """Sent before the first upstream event."""
        ...

    def forward(self, data: str) -> tuple[str, bytes]:
        """(the event data kept for reassembly, what the caller is sent) for one event."""
        ...

    def closing(self, status: int, body: bytes) -> bytes:
        """Sent once the stream ended; `body` is what was recorded for `status`."""
        ...

    def broken(self, error: ApiError) -> bytes:
        """Sent when the upstream failed half-way."""
        ...


@dataclass(frozen=True)
class Job:
    """One realtime request: what is recorded and what is sent upstream."""

    request_id: str
    model: str
    config: ModelConfig
    facts: BatchlessFacts
    body: bytes  # stored as tpl:<request_id>
    upstream_path: str
    upstream_body: bytes
    # A 2xx upstream body → what the caller gets and what is stored (§8.8, §7.8).
    success: Callable[[bytes], bytes]
    relay: Relay | None = None  # None: an SSE answer is read whole


# -- recording -----------------------------------------------------------------------------


class Recording:
    def __init__(self, job: Job) -> None:
        self.job = job
        self._outcome: asyncio.Future[tuple[int, bytes, datetime]] = (
            asyncio.get_running_loop().create_future()
        )

    def complete(self, status: int, body: bytes) -> None:
        """The first outcome wins: an answer that lands after a disconnect changes nothing."""
        if not self._outcome.done():
            self._outcome.set_result((status, body, datetime.now(UTC)))

    def complete_with(self, error: ApiError) -> None:
        self.complete(error.status, msgspec.json.encode(error.envelope()))

    async def outcome(self) -> tuple[int, bytes, datetime]:
        return await self._outcome


def _record(job: Job, kind: str, event: RequestEvent) -> RequestTransitions:
    return RequestTransitions(
        event_id=ids.event_id("realtime", kind, job.request_id),
        occurred_at=event.occurred_at,
        model=job.model,
        events=[event],
    )


class Recorder:
    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._tasks: set[asyncio.Task[None]] = set()

    def begin(self, job: Job) -> Recording:
        """Records the row's creation in the background, then its outcome once completed."""
        recording = Recording(job)
        self._spawn(self._record(recording, created=False))
        return recording

    async def begin_now(self, job: Job) -> Recording:
        """As `begin`, with the creation published before returning (503 when it cannot be)."""
        recording = Recording(job)
        await self._create(job)
        self._spawn(self._record(recording, created=True))
        return recording

    async def close(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=_SHUTDOWN_GRACE_S)
        for task in pending:
            task.cancel()
        if pending:
            log.error("%d realtime outcomes were not recorded before shutdown", len(pending))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _create(self, job: Job) -> None:
        created = RequestCreated(
            event_id=ids.event_id("realtime-created", job.request_id),
            occurred_at=job.facts.created_at,
            request_id=job.request_id,
            model=job.model,
            state="processing",
            facts=job.facts,
        )
        await asyncio.gather(
            self._body(job, bodies.TEMPLATE, job.body),
            self._publisher.transitions([_record(job, "created", created)]),
        )

    async def _body(self, job: Job, kind: str, body: bytes) -> None:
        partition = bodies.partition_for(job.request_id, topics.BODIES.partitions)
        await self._publisher.bodies([(bodies.key(kind, job.request_id), body, partition)])

    async def _record(self, recording: Recording, *, created: bool) -> None:
        job = recording.job
        if not created:
            await _retrying(lambda: self._create(job), f"the creation of {job.request_id}")
        status, body, at = await recording.outcome()
        if 200 <= status < 300:
            kind, payload = bodies.RESULT, body
        else:
            kind = bodies.ERROR
            text = body.decode("utf-8", "replace")
            payload = NonRetriableHttpStatus(status=status, body=text).to_json().encode()
        completed = RealtimeCompletionReported(
            event_id=ids.event_id("realtime-completed", job.request_id),
            occurred_at=at,
            request_id=job.request_id,
            model=job.model,
            status=status,
            size=len(payload),
            facts=job.facts,
        )
        what = f"the outcome of {job.request_id}"
        # The body first: a reader that sees the row ended should find its body too.
        await _retrying(lambda: self._body(job, kind, payload), what)
        await _retrying(
            lambda: self._publisher.transitions([_record(job, "completed", completed)]), what
        )


async def _retrying(send: Callable[[], Awaitable[None]], what: str) -> None:
    """Until the broker takes it: a redelivered fact is applied once by the projector."""
    delay = _RETRY_FIRST_S
    while True:
        try:
            await send()
            return
        except ApiError:  # the publisher's "could not record"
            log.warning("recording %s failed; retrying in %.1fs", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)


# -- shared resources ----------------------------------------------------------------------


class Realtime:
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


REALTIME: web.AppKey[Realtime] = web.AppKey("realtime", Realtime)


def setup(app: web.Application) -> None:
    """The upstream session and the recorder, for the application's lifetime (after the
    context they use is created, closed before it is)."""

    async def resources(app: web.Application) -> AsyncIterator[None]:
        realtime = app[REALTIME] = Realtime(app[CONTEXT])
        yield
        await realtime.close()

    app.cleanup_ctx.append(resources)


# -- flows ---------------------------------------------------------------------------------


class ClientGone(Exception):
    """The caller disconnected before its answer was complete."""


async def answer(request: web.Request, job: Job) -> web.StreamResponse:
    """§7.2: the upstream's answer, while the row is recorded in the background."""
    realtime = request.app[REALTIME]
    recording = realtime.recorder.begin(job)
    try:
        return await _unless_client_gone(request, _exchange(realtime, job, recording, request))
    except ClientGone:
        recording.complete(499, CLIENT_DISCONNECTED)
        return web.Response(status=499)  # nobody is listening
    except asyncio.CancelledError:  # the server stopping, or a cancelled handler
        recording.complete(499, CLIENT_DISCONNECTED)
        raise


async def start_background(request: web.Request, job: Job) -> None:
    """§7.3: the row is created (and projected) before the caller hears 202, then the upstream
    call runs detached from the caller."""
    ctx, realtime = context(request), request.app[REALTIME]
    recording = await realtime.recorder.begin_now(job)
    realtime.detach(_detached(realtime, job, recording))
    await stored.until_recorded(ctx, job.request_id)


async def _detached(realtime: Realtime, job: Job, recording: Recording) -> None:
    try:
        await _exchange(realtime, job, recording, None)
    except ApiError:
        pass  # recorded as the outcome
    except asyncio.CancelledError:
        recording.complete_with(_STOPPED)
        raise
    except Exception:
        log.exception("background request %s failed", job.request_id)


async def _exchange(
    realtime: Realtime, job: Job, recording: Recording, request: web.Request | None
) -> web.StreamResponse:
    """One upstream call and its outcome recorded; `request` None: nobody to stream to."""
    try:
        reply = await realtime.upstream.send(
            job.model, job.config, job.upstream_path, job.upstream_body, job.request_id
        )
        async with reply:
            if request is not None and job.relay is not None and reply.streamed:
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
    """An upstream error passes through with its status: its own OpenAI envelope as it is
    (type, param and code kept), anything else in the §4.6 envelope."""
    text = raw.decode("utf-8", "replace")
    if openai_message(text) is None:
        detail = RequestDetail(
            id=job.request_id,
            state="completed",
            model=job.model,
            created_at=job.facts.created_at,
            response_status=status,
            response_body=text or None,
        )
        status, envelope = chat_completion_result(detail)
        raw = msgspec.json.encode(envelope)
    return web.Response(body=raw, status=status, content_type="application/json")


async def _relay(
    request: web.Request, job: Job, relay: Relay, reply: Reply, recording: Recording
) -> web.StreamResponse:
    """Streams the upstream's events to the caller as they come, and records their reassembly
    (a mid-stream upstream failure ends the stream with an error event)."""
    response = web.StreamResponse(
        status=reply.status,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    await _write(request, response, relay.opening())
    kept: list[str] = []
    try:
        async for data in reply.events():
            keep, send = relay.forward(data)
            kept.append(keep)
            await _write(request, response, send)
        status, outcome = stream_outcome(reply.status, kept)
        body = job.success(outcome.encode()) if 200 <= status < 300 else outcome.encode()
        recording.complete(status, body)
        ending = relay.closing(status, body)
    except ApiError as exc:
        recording.complete_with(exc)
        ending = relay.broken(exc)
    await _write(request, response, ending)
    await response.write_eof()
    return response


async def _write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    try:
        if not response.prepared:
            await response.prepare(request)
        if data:
            await response.write(data)
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
