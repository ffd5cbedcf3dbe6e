"""The records of a realtime request (§5): its row's creation and its outcome, two facts the
projector applies in either order and more than once.

Recording never holds up an answer: both facts are published by a background task per request
that retries until the broker takes them, creation first so that the outcome follows it on
their shared partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from cannonade.config import Config
from projections.api.auth import Principal
from projections.api.publisher import Publisher
from schemas import bodies, ids, topics
from schemas.errors import ApiError
from schemas.events import (
    BatchlessFacts,
    RealtimeCompletionReported,
    RequestCreated,
    RequestEvent,
    RequestTransitions,
)
from streams.execution.failure import NonRetriableHttpStatus

log = logging.getLogger(__name__)

_RETRY_FIRST_S, _RETRY_MAX_S = 0.5, 10.0
_SHUTDOWN_GRACE_S = 10.0


def facts(config: Config, who: Principal, path: str, background: bool = False) -> BatchlessFacts:
    """A realtime row's facts: tier `priority`, whose window (or the default) sets the deadline."""
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


@dataclass(frozen=True)
class RealtimeRequest:
    """What is recorded of a realtime request."""

    request_id: str
    model: str
    facts: BatchlessFacts
    body: bytes  # stored as tpl:<request_id>


class Recording:
    def __init__(self, request: RealtimeRequest) -> None:
        self.request = request
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


def _transitions(request: RealtimeRequest, kind: str, event: RequestEvent) -> RequestTransitions:
    return RequestTransitions(
        event_id=ids.event_id("realtime", kind, request.request_id),
        occurred_at=event.occurred_at,
        model=request.model,
        events=[event],
    )


class Recorder:
    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._tasks: set[asyncio.Task[None]] = set()

    def begin(self, request: RealtimeRequest) -> Recording:
        """Records the row's creation in the background, then its outcome once completed."""
        recording = Recording(request)
        self._spawn(self._record(recording, created=False))
        return recording

    async def begin_now(self, request: RealtimeRequest) -> Recording:
        """As `begin`, with the creation published before returning (503 when it cannot be)."""
        recording = Recording(request)
        await self._create(request)
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

    async def _create(self, request: RealtimeRequest) -> None:
        created = RequestCreated(
            event_id=ids.event_id("realtime-created", request.request_id),
            occurred_at=request.facts.created_at,
            request_id=request.request_id,
            model=request.model,
            state="processing",
            facts=request.facts,
        )
        await asyncio.gather(
            self._body(request, bodies.TEMPLATE, request.body),
            self._publisher.transitions([_transitions(request, "created", created)]),
        )

    async def _body(self, request: RealtimeRequest, kind: str, body: bytes) -> None:
        partition = bodies.partition_for(request.request_id, topics.BODIES.partitions)
        await self._publisher.bodies([(bodies.key(kind, request.request_id), body, partition)])

    async def _record(self, recording: Recording, *, created: bool) -> None:
        request = recording.request
        if not created:
            await _retrying(lambda: self._create(request), f"the creation of {request.request_id}")
        status, body, at = await recording.outcome()
        if 200 <= status < 300:
            kind, payload = bodies.RESULT, body
        else:
            kind = bodies.ERROR
            text = body.decode("utf-8", "replace")
            payload = NonRetriableHttpStatus(status=status, body=text).to_json().encode()
        completed = RealtimeCompletionReported(
            event_id=ids.event_id("realtime-completed", request.request_id),
            occurred_at=at,
            request_id=request.request_id,
            model=request.model,
            status=status,
            size=len(payload),
            facts=request.facts,
        )
        what = f"the outcome of {request.request_id}"
        # The body first: a reader that sees the row ended should find its body too.
        await _retrying(lambda: self._body(request, kind, payload), what)
        await _retrying(
            lambda: self._publisher.transitions([_transitions(request, "completed", completed)]),
            what,
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
