"""The step executor's rules (responses §2.9, §9.3): run a chain step once, report it.

A work item is a step to run. Before it runs, the executor asks the chain log what it says of
that step (:class:`Ledger`): a step that finished, or whose chain ended, is skipped; a step
that some worker started and never finished (it died, and Kafka redelivered its work) is
failed ``step_abandoned`` instead of being fired again, because it may have had effects. Only
a step the log has never seen starts: ``StepStarted`` is acknowledged before the call goes
out. The outcome's payload is written to the bodies topic first, then ``StepCompleted`` or
``StepFailed`` and, for a non-head model call, its row's ``RealtimeCompletionReported``.

A work item is acknowledged (its offset may commit) only once its outcome is on Kafka, so a
worker that dies mid-step leaves its work to be redelivered, and the ledger turns it into
``step_abandoned``. Steps run as their own tasks, so the tool calls of one round run
concurrently.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, NamedTuple, Protocol

import aiohttp
import msgspec

from cannonade.config import Config
from schemas import bodies, ids
from schemas.bodies import BodyRef
from schemas.events import (
    BatchlessFacts,
    RealtimeCompletionReported,
    StepCompleted,
    StepFailed,
    StepStarted,
    StepWork,
)
from streams.chains.core import (
    BodyRecord,
    PayloadUnavailable,
    body_record,
    sub_request_facts,
    transitions,
)
from streams.emit import Out
from streams.execution.client import (
    RequestBuildError,
    Timeouts,
    Transport,
    TransportError,
    TransportTimeout,
    UpstreamCall,
    build_request,
)
from streams.execution.failure import NetworkError, NonRetriableHttpStatus
from streams.execution.outcome import Failure, Outcome, Success
from streams.responses.chain import (
    STEP_ABANDONED,
    ModelCallOutcome,
    StepErrored,
    StepResult,
    StepSucceeded,
    executor_error,
    model_call_result,
    model_call_transport_error,
    tool_call_result,
    tool_not_found,
    tool_timeout,
    tool_transport_error,
)
from streams.responses.steps import SUB_REQUEST_PATH
from streams.responses.tools import ToolHttpRequest, tool_call_request

log = logging.getLogger(__name__)

# How far before a work item's time the ledger looks for its step's start: the item's time
# is its chain's triggering event's, earlier than any start of the step, give or take the
# clock skew between hosts.
LOOKBACK = timedelta(seconds=60)
_REMEMBERED = 50_000
# Failures of a row never claimed carry an HTTP status; a call that got none reads as 502.
_NO_STATUS = 502


class StepStatus(Enum):
    UNSEEN = "unseen"
    STARTED = "started"  # started, never finished
    FINISHED = "finished"
    CHAIN_OVER = "chain_over"


class Ledger(Protocol):
    async def status(
        self, partition: int, response_id: str, step_id: str, since: datetime
    ) -> StepStatus:
        """What the chain log says of the step, from ``since`` to its current end."""
        ...


class StepIO(Protocol):
    async def read_body(self, ref: BodyRef) -> bytes: ...

    async def write_bodies(self, records: Sequence[BodyRecord]) -> list[BodyRef]: ...

    async def publish(self, outs: Sequence[Out]) -> None:
        """Send in order and wait for every acknowledgement."""
        ...


class ToolTransport(Protocol):
    async def post(self, request: ToolHttpRequest) -> tuple[int, str]:
        """(status, body); raise TimeoutError past the tool's timeout, ToolTransportError
        when no HTTP answer came."""
        ...


class ToolTransportError(Exception):
    pass


Ack = Callable[[], object]

#: How long running steps may go on finishing once their worker is stopping: within the
#: supervisors' stop timeouts (Docker's 10 s, the local stack's 15 s), so that the steps it
#: abandons are still reported before the worker is killed.
SHUTDOWN_GRACE_S = 5.0


class _Running(NamedTuple):
    task: asyncio.Task[None]
    ack: Ack
    work: StepWork


class StepRunner:
    def __init__(
        self,
        io: StepIO,
        ledger: Ledger,
        models: Transport,
        tools: ToolTransport,
        config: Config,
        *,
        timeouts: Timeouts,
        max_in_flight: int = 512,
        retry_s: float = 0.5,
    ) -> None:
        self.io = io
        self.ledger = ledger
        self.models = models
        self.tools = tools
        self.config = config
        self.timeouts = timeouts
        self.slots = asyncio.Semaphore(max_in_flight)
        self.retry_s = retry_s
        self.running: dict[str, _Running] = {}
        self._reporting: set[str] = set()  # running steps whose outcome is being reported
        self.done: OrderedDict[str, None] = OrderedDict()  # steps ended here (recently)
        self.processed = 0
        self.failed = 0

    async def accept(self, work: StepWork, partition: int, ack: Ack) -> None:
        """Handle one work item; ``ack`` lets its offset commit, once it may."""
        if work.step_id in self.running or work.step_id in self.done:
            ack()  # the same step handed out again (the chain agent re-decided after a crash)
            return
        status = await self.ledger.status(
            partition, work.response_id, work.step_id, work.occurred_at - LOOKBACK
        )
        if status in (StepStatus.FINISHED, StepStatus.CHAIN_OVER):
            self._remember(work.step_id)
            ack()
            return
        if status is StepStatus.STARTED:
            log.warning("step %s was started and never finished: abandoned", work.step_id)
            await self._abandon(work)
            self._remember(work.step_id)
            ack()
            return
        await self.slots.acquire()
        try:
            started = StepStarted(
                event_id=ids.event_id("step-started", work.step_id), occurred_at=_now(),
                response_id=work.response_id, step_id=work.step_id,
            )  # fmt: skip
            await self.io.publish([Out("responses", work.response_id, started)])
        except BaseException:
            self.slots.release()
            raise
        task = asyncio.create_task(self._run(work))
        self.running[work.step_id] = _Running(task, ack, work)
        task.add_done_callback(lambda _: self._ended(work.step_id))

    def release(self) -> None:
        """Let the offsets of running steps commit (a rebalance must not wait for slow
        calls): they still finish and report here."""
        for entry in self.running.values():
            entry.ack()

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Shutting down: give running steps ``grace_s`` to finish, then end the rest
        ``step_abandoned`` from here. Faust waited for the steps whose work was not let go;
        the ones let go at a rebalance would come back to no one, and their chains would wait
        for good."""
        running = [entry.task for entry in self.running.values()]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        left, reporting = list(self.running.values()), set(self._reporting)
        for entry in left:
            entry.task.cancel()
        await asyncio.gather(*(entry.task for entry in left), return_exceptions=True)
        # Not one that ended as the grace did, nor one whose report had begun: that may have
        # landed, and if not, the chain agent hands the work out again after its deadline.
        for entry in (e for e in left if e.task.cancelled() and e.work.step_id not in reporting):
            log.warning("step %s still running at shutdown: abandoned", entry.work.step_id)
            try:
                await self._abandon(entry.work)
            except Exception:
                log.exception("could not report step %s abandoned", entry.work.step_id)

    async def _abandon(self, work: StepWork) -> None:
        row = Failure(NonRetriableHttpStatus(status=500, body=_text(STEP_ABANDONED)))
        await self._report(work, StepErrored(dict(STEP_ABANDONED)), row)

    def _ended(self, step_id: str) -> None:
        entry = self.running.pop(step_id, None)
        self._reporting.discard(step_id)
        self.slots.release()
        self._remember(step_id)
        if entry is None:
            return
        task, ack, _ = entry
        if task.cancelled():
            return  # shutting down: reported abandoned, or found so when its work comes back
        if task.exception() is not None:
            log.error("step task failed", exc_info=task.exception())
            return
        ack()

    def _remember(self, step_id: str) -> None:
        self.done[step_id] = None
        while len(self.done) > _REMEMBERED:
            self.done.popitem(last=False)

    async def _run(self, work: StepWork) -> None:
        try:
            result, row = await self._execute(work)
        except PayloadUnavailable as exc:
            result, row = executor_error(f"step payload unavailable: {exc}"), None
        except Exception as exc:  # a defect must not leave the step in flight for ever
            log.exception("step %s failed unexpectedly", work.step_id)
            result, row = executor_error(repr(exc)), None
        result, row = _bounded(result, row)
        if row is None and _is_sub_request(work):
            assert isinstance(result, StepErrored)
            row = Failure(NetworkError.of(result.error.get("message", "")))
        delay = self.retry_s
        self._reporting.add(work.step_id)
        while True:
            try:
                await self._report(work, result, row)
                return
            except Exception:
                # The broker is away: the outcome is all that is left of the call; keep it.
                log.exception("could not report step %s; retrying in %.1fs", work.step_id, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- execution (§2.9) -----------------------------------------------------------------

    async def _execute(self, work: StepWork) -> tuple[StepResult, Outcome | None]:
        payload = _decode(await self._read(work.payload))
        if work.kind == "model_call":
            outcome = await self._model_call(work, payload)
            return outcome.step, outcome.row if _is_sub_request(work) else None
        return await self._tool_call(payload), None

    async def _read(self, ref: BodyRef) -> bytes:
        """The step's payload; a broker slow to hand it over is waited out (the step has
        started: failing it now would fail its chain for a broker's pause)."""
        delay = self.retry_s
        while True:
            try:
                return await self.io.read_body(ref)
            except TimeoutError as exc:  # BodyUnavailable: the record is there
                log.warning("step payload %s: %s; retrying in %.1fs", ref, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _model_call(self, work: StepWork, payload: Any) -> ModelCallOutcome:
        model = self.config.model(work.model)
        if model is None:
            return model_call_transport_error(f"model '{work.model}' is not configured")
        stream = isinstance(payload, dict) and payload.get("stream") is True
        call = UpstreamCall(
            request_id=work.request_id or work.step_id,
            endpoint=model.upstream,
            path=SUB_REQUEST_PATH,
            method="POST",
            body=msgspec.json.encode(payload),
            api_key=model.api_key,
            stream=stream,
        )
        try:
            response = await self.models.send(build_request(call), self.timeouts)
        except (TransportTimeout, TransportError, RequestBuildError) as exc:
            return model_call_transport_error(getattr(exc, "message", None) or str(exc))
        return model_call_result(response.status, response.body)

    async def _tool_call(self, payload: Any) -> StepResult:
        call = payload if isinstance(payload, dict) else {}
        name = call.get("name")
        tool = self.config.tools.get(name) if isinstance(name, str) else None
        if tool is None:
            return tool_not_found(name if isinstance(name, str) else "")
        assert isinstance(name, str)
        try:
            status, body = await self.tools.post(tool_call_request(tool, call.get("args", {})))
        except TimeoutError:
            return tool_timeout(name, tool.timeout_secs)
        except ToolTransportError as exc:
            return tool_transport_error(str(exc))
        return tool_call_result(status, body)

    # -- reporting ------------------------------------------------------------------------

    async def _report(self, work: StepWork, result: StepResult, row: Outcome | None) -> None:
        """Payloads first (acknowledged), then the facts that refer to them."""
        now = _now()
        if isinstance(result, StepSucceeded):
            records = [body_record(bodies.STEP_RESULT, work.step_id, _bytes(result.payload))]
        else:
            records = [body_record(bodies.STEP_ERROR, work.step_id, _bytes(result.error))]
        sub = _is_sub_request(work) and row is not None
        status = size = 0
        if sub and row is not None and work.request_id is not None:
            status, row_record = _row_outcome(work.request_id, row)
            size = len(row_record.value)
            records.append(row_record)
        refs = await self.io.write_bodies(records)
        outs: list[Out] = []
        if isinstance(result, StepSucceeded):
            self.processed += 1
            completed = StepCompleted(
                event_id=ids.event_id("step-completed", work.step_id), occurred_at=now,
                response_id=work.response_id, step_id=work.step_id, payload=refs[0],
            )  # fmt: skip
            outs.append(Out("responses", work.response_id, completed))
        else:
            self.failed += 1
            failed = StepFailed(
                event_id=ids.event_id("step-failed", work.step_id), occurred_at=now,
                response_id=work.response_id, step_id=work.step_id, error=refs[0],
            )  # fmt: skip
            outs.append(Out("responses", work.response_id, failed))
        if sub and work.request_id is not None:
            reported = RealtimeCompletionReported(
                event_id=ids.event_id("sub-request-outcome", work.request_id), occurred_at=now,
                request_id=work.request_id, model=work.model, status=status, size=size,
                facts=_row_facts(work),
            )  # fmt: skip
            outs.append(Out("requests", work.model, transitions(work.model, [reported], now)))
        await self.io.publish(outs)


def _bounded(result: StepResult, row: Outcome | None) -> tuple[StepResult, Outcome | None]:
    """A result no record can carry fails the step instead: its send would fail every time,
    and the step would hold its slot, and its chain wait, for good."""
    held = result.payload if isinstance(result, StepSucceeded) else result.error
    size = max(len(_bytes(held)), len(row.body.encode()) if isinstance(row, Success) else 0)
    if size <= bodies.MAX_BODY_BYTES:
        return result, row
    message = f"the step's result of {size} bytes exceeds the {bodies.MAX_BODY_BYTES} a record holds"  # fmt: skip
    return executor_error(message), None


def _is_sub_request(work: StepWork) -> bool:
    """A model call other than the head: it has a row of its own to end (§2.9)."""
    return (
        work.kind == "model_call"
        and work.request_id is not None
        and work.request_id != work.response_id
    )


def _row_outcome(request_id: str, row: Outcome) -> tuple[int, BodyRecord]:
    if isinstance(row, Success):
        return row.status, body_record(bodies.RESULT, request_id, row.body.encode())
    status = getattr(row.reason, "status", None)
    code = status if isinstance(status, int) and not 200 <= status < 300 else _NO_STATUS
    return code, body_record(bodies.ERROR, request_id, row.reason.to_json().encode())


def _row_facts(work: StepWork) -> BatchlessFacts:
    """The create context of the row (responses §5), as the chain agent created it."""
    facts = BatchlessFacts(
        owner=work.owner, path=SUB_REQUEST_PATH, service_tier="priority",
        created_at=work.occurred_at, deadline=work.occurred_at,
    )  # fmt: skip
    return sub_request_facts(facts, work.occurred_at)


def _decode(raw: bytes) -> Any:
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise PayloadUnavailable(f"step payload is not JSON: {exc}") from exc


def _bytes(value: Any) -> bytes:
    return msgspec.json.encode(value)


def _text(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _now() -> datetime:
    return datetime.now(UTC)


class AiohttpTools:
    """Tool calls over one shared aiohttp session (§2.9: POST the args, Bearer key, timeout)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, request: ToolHttpRequest) -> tuple[int, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            async with asyncio.timeout(request.timeout_secs):
                async with self._session.post(
                    request.url, data=request.body, headers=request.headers
                ) as response:
                    raw = await response.read()
                    return response.status, raw.decode(response.charset or "utf-8", "replace")
        except aiohttp.ClientError as exc:
            raise ToolTransportError(str(exc) or type(exc).__name__) from exc
