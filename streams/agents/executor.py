"""The executor agent: runs dispatched claims against their model's upstream.

Each dispatch starts its own task (bounded by ``max_in_flight``) so that one slow upstream call
never holds up the partition. The task reports to the gate — started, then finished with the
outcome and, for a retriable failure, the next attempt's ``not_before`` — and publishes the
response or error body on the bodies topic *before* the report, so a terminal row in the read
model is never older than its body. The gate fences every report by claim id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from faust.types import StreamT

from cannonade import __version__
from cannonade.config import Config
from schemas import codec, ids, topics
from schemas.events import (
    AbortDispatch,
    Body,
    Dispatch,
    ExecutionFinished,
    ExecutionStarted,
    WorkerHeartbeat,
    WorkerStarted,
    WorkerStopped,
)
from streams.app import Streams, decode_or_none, utcnow
from streams.emit import Out
from streams.execution.client import AiohttpTransport, Timeouts, UpstreamCall, UpstreamClient
from streams.execution.failure import FailureReason, RequestBuilderError, TaskTerminated
from streams.execution.outcome import Failure, override_response_id
from streams.execution.retry import BackoffPolicy, GiveUp, decide
from streams.store import Store

log = logging.getLogger(__name__)


class Executor:
    def __init__(
        self, streams: Streams, store: Store, client: UpstreamClient, config: Config
    ) -> None:
        self.streams = streams
        self.store = store
        self.client = client
        self.config = config
        self.worker_id = f"executor:{socket.gethostname()}:{os.getpid()}:{ids.new_id()[:8]}"
        self.slots = asyncio.Semaphore(config.executor.max_in_flight)
        self.running: dict[str, asyncio.Task[None]] = {}  # claim id -> execution
        self.processed = 0
        self.failed = 0
        e = config.executor
        self.backoff = BackoffPolicy(
            backoff_ms=e.backoff_ms,
            backoff_factor=int(e.backoff_factor),
            max_backoff_ms=e.max_backoff_ms,
            max_retries=e.max_retries,
            stop_before_deadline_ms=e.stop_before_deadline_ms,
        )

    async def accept(self, d: Dispatch) -> None:
        await self.slots.acquire()
        task = asyncio.create_task(self._run(d))
        self.running[d.claim_id] = task
        task.add_done_callback(lambda t: self._done(d.claim_id, t))

    def abort(self, claim_id: str) -> bool:
        """Cancel a running claim; its task reports it canceled."""
        task = self.running.get(claim_id)
        if task is None:
            return False
        task.cancel()
        return True

    def _done(self, claim_id: str, task: asyncio.Task[None]) -> None:
        self.running.pop(claim_id, None)
        self.slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("execution task failed", exc_info=task.exception())

    async def _run(self, d: Dispatch) -> None:
        projected = await self.store.projected_claim(d.request_id)
        if projected is not None and projected.supersedes(d.claim_id, d.attempt):
            # A dispatch left behind on a dead executor's partition and re-read after the
            # rebalance: the gate took the claim back and sent it again, so calling upstream
            # now would send the request twice and exceed the model's capacity.
            log.info("skipping stale claim %s of %s", d.claim_id, d.request_id)
            return
        await self.streams.publish(
            [Out("gate", d.model, ExecutionStarted(event_id=ids.event_id("exec-started", d.claim_id),
                                                    occurred_at=utcnow(), request_id=d.request_id,
                                                    model=d.model, claim_id=d.claim_id,
                                                    worker_id=self.worker_id))],
            wait=True,
        )  # fmt: skip
        try:
            outs = await self._execute(d)
        except asyncio.CancelledError:
            # Aborted because the batch was cancelled: the HTTP call is gone; say so.
            outs = [self._finished(d, "canceled")]
        except Exception:
            # A bug or an unexpected store failure must not strand the claim: report the
            # attempt as terminated, which the retry policy treats like any retriable reason.
            log.exception("execution of %s failed", d.request_id)
            outs = self._decide(d, TaskTerminated())
        self.processed += 1
        self.failed += any(
            isinstance(o.value, ExecutionFinished) and o.value.result == "failed" for o in outs
        )
        await self.streams.publish(outs, wait=True)

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

    async def _execute(self, d: Dispatch) -> list[Out]:
        model = self.config.model(d.model)
        template = await self.store.template(d.template_id)
        if model is None or template is None:
            what = (
                f"model '{d.model}' is not configured"
                if model is None
                else "template body not found"
            )
            return self._failed(d, RequestBuilderError(error=what))
        call = UpstreamCall(
            request_id=d.request_id,
            custom_id=d.custom_id,
            endpoint=model.upstream,
            path=template.path,
            method=template.method,
            body=template.body,
            api_key=model.api_key,
            stream=template.path in self.config.executor.streamable_endpoints,
        )
        outcome = await self.client.execute(call)
        if isinstance(outcome, Failure):
            return self._decide(d, outcome.reason)
        body = override_response_id(outcome.body, d.request_id, template.path)
        return [
            Out("bodies", f"res:{d.request_id}", Body(kind="res", ref=d.request_id, text=body)),
            self._finished(
                d, "completed", status=outcome.status, size=len(body.encode()), routed_model=d.model
            ),
        ]

    def _decide(self, d: Dispatch, reason: FailureReason) -> list[Out]:
        decision = decide(reason, d.attempt, utcnow(), d.deadline, self.backoff)
        if isinstance(decision, GiveUp):
            return self._failed(d, reason, status=_status_of(reason))
        return [self._finished(d, "retry", not_before=decision.not_before)]

    def _failed(self, d: Dispatch, reason: FailureReason, status: int | None = None) -> list[Out]:
        envelope = reason.to_json()
        return [
            Out("bodies", f"err:{d.request_id}", Body(kind="err", ref=d.request_id, text=envelope)),
            self._finished(d, "failed", status=status, size=len(envelope.encode()),
                           error_type=type(reason).__name__),
        ]  # fmt: skip

    def _finished(self, d: Dispatch, result: str, **fields: object) -> Out:
        report = ExecutionFinished(
            event_id=ids.event_id("exec-finished", d.claim_id),
            occurred_at=utcnow(),
            request_id=d.request_id,
            model=d.model,
            claim_id=d.claim_id,
            worker_id=self.worker_id,
            result=result,  # type: ignore[arg-type]
            attempt=d.attempt,
            **fields,  # type: ignore[arg-type]
        )
        return Out("gate", d.model, report)


def _status_of(reason: FailureReason) -> int | None:
    status = getattr(reason, "status", None)
    return status if isinstance(status, int) else None


def register(streams: Streams, store: Store) -> Executor:
    e = streams.config.executor
    client = UpstreamClient(
        AiohttpTransport(),
        timeouts=Timeouts(
            first_chunk_ms=e.first_chunk_timeout_ms,
            chunk_ms=e.chunk_timeout_ms,
            body_ms=e.body_timeout_ms,
        ),
    )
    executor = Executor(streams, store, client, streams.config)
    app = streams.app

    @app.agent(streams.topics["dispatch"], name="executor")
    async def execute(stream: StreamT) -> None:
        async for event in stream.events():
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
        await streams.publish([executor.started(), *executor.heartbeat()], wait=True)

    @app.timer(interval=e.heartbeat_interval_ms / 1000)
    async def heartbeat() -> None:
        await streams.publish(executor.heartbeat())

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def stopping(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Running calls are abandoned without a result (core §4.1); saying so lets the gate
        # take their claims back at once instead of after the stale threshold.
        await streams.publish(executor.heartbeat(stopped=True), wait=True)

    return executor
