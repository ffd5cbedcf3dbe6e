"""The executor agent: runs dispatched claims against their model's upstream.

Each claim runs as its own task so that one slow upstream call never holds up the partition;
at most ``max_in_flight`` of them call upstreams at once, and a claim with a lane waits for
the calls ahead of it in its lane first (a claim queued there holds no slot). Every claim it
receives ends with exactly one finished report, whatever moment an abort lands: the task
reports from a ``finally`` and an abort that arrives before its dispatch is remembered.
Reports and result bodies go through a :class:`~streams.execution.reporter.Reporter`; the
gate fences every report by claim id.

A dispatch older than half the stale-worker threshold is not run but handed back
(``not_sent``): it is one re-read after a crash or rebalance, and the gate may already have
given its claim to someone else.

A ``/v1/responses`` request is translated to a chat completion and back (responses §7.8); one
that has tools (its own, or server-side tools resolved for its owner) is handed to the chain
agent with its claim, and the chain's finalisation ends the claim (§7.9).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import msgspec
from faust.types import StreamT

from cannonade import __version__, logs
from cannonade.config import Config
from schemas import bodies, codec, ids, topics
from schemas.bodies import BodyRef
from schemas.events import (
    AbortDispatch,
    BatchlessFacts,
    ChainHead,
    ChainStarted,
    DispatchBatch,
    DispatchItem,
    FinishedItem,
    StartedItem,
    WorkerHeartbeat,
    WorkerStarted,
    WorkerStopped,
)
from streams.app import Streams, decode_or_none, utcnow
from streams.emit import Out
from streams.execution.bodies import BodyGone, BodyReader, BodySource, BodyUnavailable
from streams.execution.client import AiohttpTransport, Timeouts, UpstreamCall, UpstreamClient
from streams.execution.failure import (
    FailureReason,
    NetworkError,
    NonRetriableHttpStatus,
    RequestBuilderError,
    TaskTerminated,
)
from streams.execution.lanes import Lane
from streams.execution.outcome import (
    Failure,
    escalate,
    inject_deadline_priority,
    override_response_id,
)
from streams.execution.reporter import FINISHED_DELAY_S, QUEUED_FINISHED_DELAY_S, Reporter
from streams.execution.retry import BackoffPolicy, GiveUp, decide
from streams.metrics import Hooks
from streams.responses.inputs import decode_body
from streams.responses.steps import RESPONSES_PATH
from streams.responses.tools import inject_tools, resolve_tools
from streams.responses.translate import chat_to_responses, responses_to_chat

CHAT_PATH = "/v1/chat/completions"
_ERROR_BODY_CHARS = 1024 * 1024  # of an upstream error body kept in the error envelope

log = logging.getLogger(__name__)

_REMEMBERED_ABORTS = 10_000
# Enough for every claim of the last minutes at full speed: a re-dispatch comes soon after.
_REMEMBERED_OUTCOMES = 100_000


class Executor:
    def __init__(
        self,
        reporter: Reporter,
        body_source: BodySource,
        client: UpstreamClient,
        config: Config,
        worker_id: str,
        publish: Callable[[Sequence[Out]], Awaitable[None]],
        write_bodies: Callable[[Sequence[tuple[str, bytes, int]]], Awaitable[list[BodyRef]]],
        hooks: Hooks,
    ) -> None:
        self.reporter = reporter
        self.hooks = hooks
        self.publish = publish
        self.write_bodies = write_bodies
        self.bodies = body_source
        self.client = client
        self.config = config
        self.worker_id = worker_id
        self.slots = asyncio.Semaphore(config.executor.max_in_flight)
        self.lanes: dict[tuple[str, int], Lane] = {}  # a lane's claims in turn
        self.running: dict[str, asyncio.Task[None]] = {}  # claim id -> execution
        self.aborted: OrderedDict[str, None] = OrderedDict()  # aborts that beat their claim
        self.outcomes: OrderedDict[str, FinishedItem] = OrderedDict()  # recent claims' ends
        self.cancelled: set[str] = set()  # claims whose abort reached their task
        self.processed = 0
        self.failed = 0
        e = config.executor
        self.backoff = BackoffPolicy(
            backoff_ms=e.backoff_ms,
            backoff_factor=e.backoff_factor,
            max_backoff_ms=e.max_backoff_ms,
            max_retries=e.max_retries,
            stop_before_deadline_ms=e.stop_before_deadline_ms,
        )
        # Past this age a dispatch may already have been reclaimed by the gate.
        self.max_age = timedelta(milliseconds=config.liveness.stale_daemon_threshold_ms / 2)
        # A claim queued in its lane may wait for the calls ahead of it, but not so long that
        # the gate takes it back as never started (its claim timeout).
        self.max_queued = timedelta(milliseconds=config.liveness.claim_timeout_ms / 2)

    async def accept(self, batch: DispatchBatch) -> None:
        for item in batch.items:
            if item.claim_id in self.running:
                continue  # the same claim re-read while it runs here
            done = self.outcomes.get(item.claim_id)
            if done is not None:
                # Dispatched again (a gate re-made the decision after a crash): say again how
                # it ended rather than call the upstream twice.
                self.reporter.finished(item.model, done)
                continue
            if item.claim_id in self.aborted:
                del self.aborted[item.claim_id]
                self._report(item, FinishedItem(request_id=item.request_id, claim_id=item.claim_id, result="canceled"))  # fmt: skip
                continue
            headers = batch.batch_headers.get(item.batch_id or "", {})
            task = asyncio.create_task(self._run(item, headers))
            self.running[item.claim_id] = task
            task.add_done_callback(functools.partial(self._done, item))

    def abort(self, claim_id: str) -> None:
        """Cancel a running claim; its task reports it canceled. An abort that arrives before
        its claim is remembered, so the claim is reported canceled without running."""
        task = self.running.get(claim_id)
        if task is None:
            self.aborted[claim_id] = None
            while len(self.aborted) > _REMEMBERED_ABORTS:
                self.aborted.popitem(last=False)
            return
        self.cancelled.add(claim_id)
        task.cancel()

    async def stop_running(self) -> None:
        """Shutting down: every claim here stops unreported (the gate takes them back when
        the worker says it stopped), and none queued in a lane starts its call meanwhile."""
        running = list(self.running.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _done(self, item: DispatchItem, task: asyncio.Task[None]) -> None:
        claim_id = item.claim_id
        self.running.pop(claim_id, None)
        aborted = claim_id in self.cancelled
        self.cancelled.discard(claim_id)
        if task.cancelled() and aborted and claim_id not in self.outcomes:
            # Aborted before its first step: its own handler never ran to report it.
            self._report(item, FinishedItem(request_id=item.request_id, claim_id=claim_id, result="canceled"))  # fmt: skip
        elif not task.cancelled() and task.exception() is not None:
            log.error("execution task failed", exc_info=task.exception())

    def _report(self, item: DispatchItem, finished: FinishedItem, outs: list[Out] | None = None) -> None:  # fmt: skip
        self.outcomes[item.claim_id] = finished
        while len(self.outcomes) > _REMEMBERED_OUTCOMES:
            self.outcomes.popitem(last=False)
        self.processed += 1
        self.failed += finished.result == "failed"
        # Nothing else running (the claim's own task may still be listed): no other call will
        # end soon to share the report.
        last = len(self.running) - (item.claim_id in self.running) == 0
        self.reporter.finished(item.model, finished, outs or [], last=last)

    async def _run(self, item: DispatchItem, headers: dict[str, str]) -> None:
        finished: FinishedItem | None = None
        outs: list[Out] = []
        # This task's own context: every line it logs names the claim.
        logs.bind(request_id=item.request_id, batch_id=item.batch_id, claim_id=item.claim_id)
        try:
            if utcnow() - item.claimed_at > self.max_age:
                finished = self._hand_back(item)
                return
            async with self._lane(item), self.slots:
                waited = utcnow() - item.claimed_at
                if waited > self.max_queued:
                    finished = self._hand_back(item)
                    return
                self.hooks.claim_started(item.model, waited)
                self.reporter.started(item.model, StartedItem(item.request_id, item.claim_id))
                finished, outs = await self._execute(item, headers)
            if finished is None:
                # Handed to the chain agent, which reports the claim from now on.
                self.reporter.handed_off(item.claim_id)
        except asyncio.CancelledError:
            if item.claim_id not in self.cancelled:
                raise  # shutting down: the gate takes the claim back when we say we stopped
            finished = FinishedItem(request_id=item.request_id, claim_id=item.claim_id, result="canceled")  # fmt: skip
        except Exception:
            # A bug or an unexpected failure must not strand the claim: report the attempt
            # as terminated, which the retry policy treats like any retriable reason.
            log.exception("execution of %s failed", item.request_id)
            finished, outs = self._decide(item, TaskTerminated())
        finally:
            if finished is not None:
                self._report(item, finished, outs)

    def _hand_back(self, item: DispatchItem) -> FinishedItem:
        log.info("handing back stale claim %s of %s", item.claim_id, item.request_id)
        return FinishedItem(request_id=item.request_id, claim_id=item.claim_id, result="not_sent")

    def _lane(self, item: DispatchItem) -> contextlib.AbstractAsyncContextManager[Any]:
        if item.lane < 0:
            return contextlib.nullcontext()
        key = (item.model, item.lane)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane(functools.partial(self.hooks.lane_released, item.model))
        return lane

    async def _execute(
        self, item: DispatchItem, headers: dict[str, str]
    ) -> tuple[FinishedItem | None, list[Out]]:
        """The claim's outcome and the bodies to publish with it; no outcome when the claim
        was handed to the chain agent."""
        model = self.config.model(item.model)
        if model is None:
            return self._failed(item, RequestBuilderError(error=f"model '{item.model}' is not configured"))  # fmt: skip
        try:
            template = await self.bodies.template(item.body)
        except BodyGone as exc:
            return self._failed(item, RequestBuilderError(error=f"request body unavailable: {exc}"))  # fmt: skip
        except BodyUnavailable as exc:  # the broker away: an attempt like any network failure
            return self._decide(item, NetworkError.of(f"request body unavailable: {exc}"))
        e = self.config.executor
        now = utcnow()
        routed, body = escalate(item.model, template.body, item.deadline, now, e.model_escalations)
        if e.inject_deadline_priority:
            body = inject_deadline_priority(body, item.deadline)
        path, request = item.path, None
        if item.path == RESPONSES_PATH:
            try:
                request = decode_body(body)
                if not isinstance(request, dict):
                    raise ValueError("the body is not a JSON object")
                resolved = resolve_tools(self.config.tools, item.model, item.owner)
                request = inject_tools(request, resolved)
                if request.get("tools"):
                    await self._hand_to_chain(item, request, sorted(resolved), template.body)
                    return None, []
                body, path = msgspec.json.encode(responses_to_chat(request)), CHAT_PATH
            except ValueError as exc:  # InputError included: the intake checks the same rules
                return self._failed(item, RequestBuilderError(error=str(exc)))
        target = self.config.model(routed) or model
        call = UpstreamCall(
            request_id=item.request_id,
            custom_id=template.custom_id,
            endpoint=target.upstream,
            path=path,
            method="POST",
            body=body,
            api_key=target.api_key,
            stream=path in e.streamable_endpoints,
            batch_headers=headers,
        )
        sent = time.perf_counter()
        outcome = await self.client.execute(call)
        self.hooks.upstream_called(routed, outcome, time.perf_counter() - sent)
        if isinstance(outcome, Failure):
            return self._decide(item, outcome.reason)
        text = outcome.body
        if request is not None:
            text = _as_response(text, request, now)
        text = override_response_id(text, item.request_id, item.path)
        raw = text.encode()
        if len(raw) > bodies.MAX_BODY_BYTES:
            # No record may carry it (a send of it would fail every report queued behind it).
            too_large = f"the upstream answered {len(raw)} bytes; a result holds at most {bodies.MAX_BODY_BYTES}"  # fmt: skip
            return self._failed(item, NonRetriableHttpStatus(status=502, body=too_large))
        body_out = Out(
            "bodies",
            bodies.key(bodies.RESULT, item.request_id),
            raw,
            partition=bodies.partition_for(item.request_id, topics.BODIES.partitions),
        )
        finished = FinishedItem(
            request_id=item.request_id, claim_id=item.claim_id, result="completed",
            status=outcome.status, size=len(raw), routed_model=routed,
        )  # fmt: skip
        return finished, [body_out]

    async def _hand_to_chain(
        self, item: DispatchItem, request: dict[str, Any], resolved: list[str], stored: bytes
    ) -> None:
        """Start the multi-step chain headed by this claimed row (§7.9). A body that changed
        here from the one ``stored`` (escalated, given a deadline priority, or server-side
        tools) is written again, so the chain reads what it runs."""
        parent = item.body
        encoded = msgspec.json.encode(request)
        if encoded != stored:
            key = bodies.key(bodies.TEMPLATE, item.request_id)
            partition = bodies.partition_for(item.request_id, topics.BODIES.partitions)
            [parent] = await self.write_bodies([(key, encoded, partition)])
        now = utcnow()
        started = ChainStarted(
            event_id=ids.event_id("chain-started", item.claim_id),
            occurred_at=now,
            response_id=item.request_id,
            model=item.model,
            parent=parent,
            resolved_tool_names=resolved,
            facts=BatchlessFacts(
                owner=item.owner,
                path=item.path,
                service_tier="flex" if item.batch_id is None else None,
                created_at=now,
                deadline=item.deadline,
                background=bool(request.get("background")),
            ),  # fmt: skip
            head=ChainHead(item.claim_id, item.model, item.batch_id),
            max_iterations=self.config.responses.max_iterations,
        )
        await self.publish([Out("responses", item.request_id, started)])

    def _decide(self, item: DispatchItem, reason: FailureReason) -> tuple[FinishedItem, list[Out]]:
        decision = decide(reason, item.attempt, utcnow(), item.deadline, self.backoff)
        if isinstance(decision, GiveUp):
            return self._failed(item, reason)
        log.info(
            "attempt %d on %s failed (%s); retrying from %s",
            item.attempt, item.model, type(reason).__name__, decision.not_before.isoformat(),
        )  # fmt: skip
        retry = FinishedItem(
            request_id=item.request_id, claim_id=item.claim_id, result="retry",
            not_before=decision.not_before,
        )  # fmt: skip
        return retry, []

    def _failed(self, item: DispatchItem, reason: FailureReason) -> tuple[FinishedItem, list[Out]]:
        body = getattr(reason, "body", None)
        if isinstance(body, str) and len(body) > _ERROR_BODY_CHARS:
            # An upstream error page too large for a record: its head is what tells.
            reason = msgspec.structs.replace(reason, body=body[:_ERROR_BODY_CHARS])
        raw = reason.to_json().encode()
        status = getattr(reason, "status", None)
        log.info("attempt %d on %s failed for good (%s)", item.attempt, item.model, type(reason).__name__)  # fmt: skip
        body_out = Out(
            "bodies",
            bodies.key(bodies.ERROR, item.request_id),
            raw,
            partition=bodies.partition_for(item.request_id, topics.BODIES.partitions),
        )
        finished = FinishedItem(
            request_id=item.request_id, claim_id=item.claim_id, result="failed",
            status=status if isinstance(status, int) else None, size=len(raw),
            error_type=type(reason).__name__,
        )  # fmt: skip
        return finished, [body_out]

    def heartbeat(self, stopped: bool = False) -> list[Out]:
        """The worker's daemon record, and a liveness signal to every gate partition (the gate
        takes back the claims of an executor that stops beating)."""
        kind = WorkerStopped if stopped else WorkerHeartbeat
        beat = kind(
            event_id=ids.new_id(),
            occurred_at=utcnow(),
            worker_id=self.worker_id,
            role="executor",
            requests_processed=self.processed,
            requests_failed=self.failed,
            requests_in_flight=len(self.running),
        )
        return [Out("workers", self.worker_id, beat)] + [
            Out("gate", self.worker_id, beat, partition=p) for p in range(topics.GATE.partitions)
        ]

    def started(self) -> Out:
        return Out(
            "workers",
            self.worker_id,
            WorkerStarted(
                event_id=ids.new_id(),
                occurred_at=utcnow(),
                worker_id=self.worker_id,
                role="executor",
                hostname=socket.gethostname(),
                pid=os.getpid(),
                version=__version__,
                config_snapshot={"max_in_flight": self.config.executor.max_in_flight},
            ),
        )


def _as_response(chat_text: str, request: dict[str, Any], now: Any) -> str:
    """An upstream chat completion as the Responses object the caller asked for (§7.8);
    an unreadable body is kept as it came."""
    try:
        chat = msgspec.json.decode(chat_text)
    except (msgspec.DecodeError, RecursionError):
        return chat_text
    if not isinstance(chat, dict):
        return chat_text
    translated = chat_to_responses(chat, request, created_at=int(now.timestamp()))
    return msgspec.json.encode(translated).decode()


def register(streams: Streams) -> Executor:
    config = streams.config
    e = config.executor
    client = UpstreamClient(
        AiohttpTransport(),
        timeouts=Timeouts(
            first_chunk_ms=e.first_chunk_timeout_ms,
            chunk_ms=e.chunk_timeout_ms,
            body_ms=e.body_timeout_ms,
        ),
    )
    worker_id = f"executor:{socket.gethostname()}:{os.getpid()}:{ids.new_id()[:8]}"
    reporter = Reporter(
        lambda outs: streams.publish(outs, wait=True),
        worker_id,
        finished_delay_s=QUEUED_FINISHED_DELAY_S if config.gate.prefetch else FINISHED_DELAY_S,
    )
    reader = BodyReader(config.kafka)
    executor = Executor(
        reporter,
        reader,
        client,
        config,
        worker_id,
        lambda outs: streams.publish(outs, wait=True),
        streams.write_bodies,
        streams.metrics,
    )
    streams.metrics.running(lambda: len(executor.running))
    # Bound before any task starts, so every line of this process names the worker.
    logs.bind(worker=worker_id)
    app = streams.app
    source = streams.bind(topics.DISPATCH)
    watch = streams.watch_stalls(source)

    @app.agent(source, name="executor")
    async def execute(stream: StreamT[Any]) -> None:
        async for event in streams.events(stream.events()):
            watch.took(event.message.tp, event.message.offset)
            work, reason = decode_or_none(codec.dispatches, event.value)
            if work is None:
                await streams.dead_letter(event, reason or "undecodable")
                continue
            if isinstance(work, AbortDispatch):
                executor.abort(work.claim_id)
                continue
            await executor.accept(work)

    @app.task
    async def announce() -> None:
        await reader.start()
        reporter.start()
        await streams.publish([executor.started(), *executor.heartbeat()], wait=True)

    @app.timer(interval=e.heartbeat_interval_ms / 1000)
    async def heartbeat() -> None:
        await streams.publish(executor.heartbeat())

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stopping(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Running calls are abandoned without a result (core §4.1); saying so lets the gate
        # take their claims back at once instead of after the stale threshold. They stop
        # first, so that no claim queued in a lane starts a call after that.
        await executor.stop_running()
        await reporter.stop()
        await streams.publish(executor.heartbeat(stopped=True), wait=True)
        await reader.stop()

    return executor
