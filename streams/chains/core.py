"""The step-chain agent's rules (responses §2, §9.3), driven one event at a time.

:class:`ChainCore` folds the events of ``cannonade.responses.v1`` into each chain's state (a
mutable mapping: the agent's table through a write-behind buffer) and answers with what to
publish. Payloads never pass through the table: the core writes them to the bodies topic
through :class:`ChainIO` (acknowledged, so every event that refers to a body is published
after it) and reads them back by ref when it evaluates.

Rules:

1. ``ChainStarted`` for an unknown id creates the chain and evaluates it; for a known id it
   is a redelivery, unless it carries a head claim not seen before: the gate re-dispatched
   the head, so the chain adopts that claim (and, if it already ended, reports its outcome
   again for it, so the head is never stranded).
2. An evaluation that appends steps writes their payloads, then emits ``StepRecorded`` per
   step, ``RequestCreated`` (processing) for each non-head model call's row and a
   ``StepWork`` per step. One that ends the chain writes the head's result or error body,
   emits ``ResponseFinalized`` and the head row's terminal transition: a
   ``RealtimeCompletionReported`` for a realtime head, a finished item fenced by the head's
   claim for a claimed one (never a retry: §2.11).
3. Step facts apply if legal (§1.4) and are dropped otherwise; when the latest round has
   settled, the chain is evaluated again.
4. Events for a chain that ended are dropped.
5. ``ChainAborted`` for the claim that holds a live chain's head ends the chain: the rows of
   model calls not started yet are canceled (a started one's step executor ends its row), the
   head's claim is reported canceled, and nothing more is evaluated; an erased chain reports
   nothing (the gate has forgotten the row).
6. A live chain with steps in flight that heard nothing for a step deadline has their work
   handed out again, each with its first time (:meth:`ChainCore.overdue`): the worker that
   ran one may have let its work go at a rebalance and died, and no one would ever end it.
   A step executor running it ignores the copy; any other finds it started and never
   finished in the chain log and fails it ``step_abandoned``; one never started runs.

Outputs are a function of (state, event): times are the triggering event's, ids derived, so
a re-handled event publishes the same facts again (§9.4). Only the reports to the gate carry
the wall clock, which the gate reads as a sign of life.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import msgspec

from schemas import bodies, ids, topics
from schemas.bodies import BodyRef
from schemas.events import (
    BatchlessFacts,
    ChainAborted,
    ChainEvent,
    ChainHead,
    ChainStarted,
    ExecutionReport,
    FinishedItem,
    RealtimeCompletionReported,
    RequestCanceled,
    RequestCreated,
    RequestTransitions,
    ResponseFinalized,
    StartedItem,
    StepCompleted,
    StepFailed,
    StepRecorded,
    StepStarted,
    StepWork,
)
from schemas.events import StepKind as EventStepKind
from streams.chains.state import ChainState, FinalOutcome, StepEntry
from streams.chains.state import decode as decode_state
from streams.chains.state import encode as encode_state
from streams.emit import Out
from streams.responses.chain import (
    AppendSteps,
    Complete,
    Fail,
    HeadCompleted,
    HeadFinalization,
    LoopError,
    conclude,
    evaluate,
    finalize,
    loop_error_payload,
    round_settled,
)
from streams.responses.inputs import InputError, ParentRequest, parse_parent
from streams.responses.steps import (
    IN_FLIGHT_STEP_STATES,
    SUB_REQUEST_PATH,
    Step,
    StepFact,
    StepKind,
    StepState,
    record_round,
    step_after,
    sub_request_row,
)

log = logging.getLogger(__name__)

REALTIME_TIER = "priority"
#: As long as the claim gate gives a `processing` row (the reference's processing timeout).
DEFAULT_STEP_DEADLINE = timedelta(minutes=10)


class BodyRecord(msgspec.Struct, frozen=True):
    key: str
    value: bytes
    partition: int


def body_record(kind: str, ref_id: str, value: bytes) -> BodyRecord:
    """A body keyed ``<kind>:<id>``, on the partition of that id (where a tombstone lands)."""
    partition = bodies.partition_for(ref_id, topics.BODIES.partitions)
    return BodyRecord(bodies.key(kind, ref_id), value, partition)


class PayloadUnavailable(Exception):
    """A body the chain needs is not on the bodies topic (erased, or a bad ref)."""


class ChainIO(Protocol):
    async def write_bodies(self, records: Sequence[BodyRecord]) -> list[BodyRef]:
        """Write and wait for every acknowledgement; returns where each record landed."""
        ...

    async def read_body(self, ref: BodyRef) -> bytes:
        """Raise :class:`PayloadUnavailable` when the record is gone."""
        ...


def _oversized(records: Sequence[BodyRecord], what: str) -> str | None:
    """Why ``records`` cannot be written (one is larger than a record holds), or None."""
    size = max((len(r.value) for r in records), default=0)
    if size <= bodies.MAX_BODY_BYTES:
        return None
    return f"{what} of {size} bytes exceeds the {bodies.MAX_BODY_BYTES} a record holds"


def unix(moment: datetime) -> int:
    return int(moment.timestamp())


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)


class ChainCore:
    def __init__(
        self,
        state: MutableMapping[str, bytes],
        io: ChainIO,
        worker_id: str,
        *,
        clock: Callable[[], datetime],
        step_deadline: timedelta = DEFAULT_STEP_DEADLINE,
    ) -> None:
        self.state = state
        self.io = io
        self.worker_id = worker_id
        self.clock = clock
        self.step_deadline = step_deadline
        # Live chains of this worker's partitions with steps in flight: since when each has
        # been quiet, by this worker's clock (in memory, like `held`: rebuilt by adopt() after
        # a rebalance; the events' own times would make every step late after a lag).
        self.waiting: dict[str, datetime] = {}
        # The live claimed heads this worker holds, by response (in memory: after a restart or
        # a rebalance the new holder takes them over again, see adopt()).
        self.held: dict[str, ChainHead] = {}

    # -- table ----------------------------------------------------------------------------

    def load(self, response_id: str) -> ChainState | None:
        raw = self.state.get(response_id)
        return None if raw is None else decode_state(raw)

    def _save(self, chain: ChainState) -> None:
        self.state[chain.response_id] = encode_state(chain)
        self._watch(chain)

    def _watch(self, chain: ChainState) -> None:
        if _reissuable(chain):
            self.waiting[chain.response_id] = self.clock()
        else:
            self.waiting.pop(chain.response_id, None)

    async def overdue(self) -> list[Out]:
        """The work of the steps in flight of every chain quiet for a step deadline, handed
        out again (rule 6); the chain is then quiet again from now."""
        now = self.clock()
        outs: list[Out] = []
        for response_id, quiet_since in list(self.waiting.items()):
            if quiet_since + self.step_deadline > now:
                continue
            chain = self.load(response_id)
            late = [] if chain is None else _reissuable(chain)
            if chain is None or not late:
                self.waiting.pop(response_id, None)
                continue
            try:  # only the late steps' requests: their model goes with their work
                payloads = [await self._read_json(entry.payload) for entry, _ in late]
            except Exception as exc:  # a payload the broker does not hand over: next beat
                log.warning("chain %s: overdue steps not handed out again: %r", response_id, exc)
                continue
            self.waiting[response_id] = now
            for (entry, first), payload in zip(late, payloads, strict=True):
                log.warning("step %s of chain %s overdue: its work goes out again", entry.id, response_id)  # fmt: skip
                work = self._work(chain, entry, payload, first)
                outs.append(Out("step_work", chain.response_id, work))
        return outs

    # -- events ---------------------------------------------------------------------------

    async def handle(self, event: ChainEvent, partition: int = -1) -> list[Out]:
        match event:
            case ChainStarted():
                return await self._started(event, partition)
            case StepStarted() | StepCompleted() | StepFailed():
                return await self._step_fact(event)
            case ChainAborted():
                return await self._aborted(event)
        # StepRecorded and ResponseFinalized are this agent's own decisions read back: the
        # state already holds them.
        return []

    async def _started(self, event: ChainStarted, partition: int) -> list[Out]:
        chain = self.load(event.response_id)
        if chain is None:
            chain = ChainState(
                response_id=event.response_id,
                model=event.model,
                parent=event.parent,
                tools=sorted(set(event.resolved_tool_names)),
                facts=event.facts,
                head=event.head,
                claims=[] if event.head is None else [event.head.claim_id],
                max_iterations=event.max_iterations,
                partition=partition,
            )
            outs = self._take_over(chain)
            outs += await self._evaluate(chain, event.occurred_at)
            self._save(chain)
            return outs
        if event.head is None or event.head.claim_id in chain.claims:
            log.debug("chain %s already started; ChainStarted ignored", chain.response_id)
            return []
        # The gate took the head back (it judged its holder stale) and dispatched it again.
        chain.claims.append(event.head.claim_id)
        chain.head = event.head
        if chain.terminal:
            assert chain.final is not None
            outs = [self._head_finished(chain, chain.final)]
        else:
            outs = self._take_over(chain)
        self._save(chain)
        return outs

    async def _step_fact(self, event: StepStarted | StepCompleted | StepFailed) -> list[Out]:
        chain = self.load(event.response_id)
        if chain is None:
            log.warning("%s for unknown chain %s dropped", type(event).__name__, event.response_id)
            return []
        if chain.terminal:
            log.info("%s for ended chain %s dropped", type(event).__name__, chain.response_id)
            return []
        step = chain.step(event.step_id)
        if step is None:
            log.warning("%s for unknown step %s dropped", type(event).__name__, event.step_id)
            return []
        if not _apply(step, event):
            log.debug("%s does not apply to %s step %s", type(event).__name__, step.state, step.id)
            return []
        outs = self._take_over(chain)
        if round_settled(chain.steps):
            outs += await self._evaluate(chain, event.occurred_at)
        self._save(chain)
        return outs

    # -- evaluation (§2.8, §2.10) ---------------------------------------------------------

    async def _evaluate(self, chain: ChainState, now: datetime) -> list[Out]:
        try:
            parent = parse_parent(await self.io.read_body(chain.parent))
            steps = await self._steps(chain, now)
        except PayloadUnavailable as exc:
            return await self._finish(chain, LoopError(f"chain payload unavailable: {exc}"), now)
        except InputError as exc:  # intake validates bodies; a batch line may still be odd
            return await self._finish(chain, LoopError(str(exc)), now)
        evaluation = evaluate(
            parent, steps, frozenset(chain.tools), chain.evaluations, chain.max_iterations
        )
        chain.evaluations = evaluation.evaluations
        outcome = evaluation.outcome
        if isinstance(outcome, AppendSteps):
            recorded = record_round(steps, chain.response_id, outcome.descriptors, now)
            return await self._append(chain, recorded, now)
        return await self._finish(chain, outcome, now, parent, steps)

    async def _steps(self, chain: ChainState, now: datetime) -> list[Step]:
        """The chain as the pure rules see it, payloads read back from the bodies topic."""
        steps = []
        for entry in chain.steps:
            request_payload = await self._read_json(entry.payload)
            result: Any = msgspec.UNSET
            if entry.result is not None:
                result = await self._read_json(entry.result)
            completed = entry.state is StepState.COMPLETED
            steps.append(
                Step(
                    id=entry.id,
                    request_id=entry.request_id,
                    prev_step_id=entry.prev,
                    parent_step_id=None if entry.step_sequence == 1 else chain.response_id,
                    step_kind=entry.step_kind,
                    step_sequence=entry.step_sequence,
                    request_payload=request_payload,
                    created_at=now,
                    updated_at=now,
                    state=entry.state,
                    response_payload=result if completed else msgspec.UNSET,
                    error=None if completed or result is msgspec.UNSET else result,
                )
            )
        return steps

    async def _read_json(self, ref: BodyRef) -> Any:
        raw = await self.io.read_body(ref)
        try:
            return msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise PayloadUnavailable(f"the body at {ref.partition}@{ref.offset}: {exc}") from exc

    async def _append(self, chain: ChainState, recorded: list[Step], now: datetime) -> list[Out]:
        records = [body_record(bodies.STEP_REQUEST, s.id, _json(s.request_payload)) for s in recorded]  # fmt: skip
        if (too_large := _oversized(records, "the next step's request")) is not None:
            # Each tool output fits a record, but a follow-up carries all of them: no record
            # could hold this one, and its send would fail for good.
            return await self._finish(chain, LoopError(too_large), now)
        refs = await self.io.write_bodies(records)
        entries = [
            StepEntry(
                id=s.id,
                step_kind=s.step_kind,
                step_sequence=s.step_sequence,
                state=StepState.PENDING,
                prev=s.prev_step_id,
                request_id=s.request_id,
                tool=_tool_name(s),
                payload=ref,
                row_model=_row_model(chain, s),
                recorded_at=now,
            )
            for s, ref in zip(recorded, refs, strict=True)
        ]
        chain.steps.extend(entries)
        outs: list[Out] = [
            Out("responses", chain.response_id, self._recorded(chain, s, e, now))
            for s, e in zip(recorded, entries, strict=True)
        ]
        outs += self._sub_requests(chain, recorded, now)
        outs += [
            Out("step_work", chain.response_id, self._work(chain, e, s.request_payload, now))
            for s, e in zip(recorded, entries, strict=True)
        ]
        return outs

    def _recorded(self, chain: ChainState, step: Step, entry: StepEntry, now: datetime) -> StepRecorded:  # fmt: skip
        return StepRecorded(
            event_id=ids.event_id("step-recorded", step.id), occurred_at=now,
            response_id=chain.response_id, step_id=step.id, request_id=step.request_id,
            prev_step_id=step.prev_step_id, parent_step_id=step.parent_step_id,
            kind=_kind(step.step_kind), sequence=step.step_sequence, payload=entry.payload,
            tool=entry.tool,
        )  # fmt: skip

    def _work(self, chain: ChainState, entry: StepEntry, request: Any, now: datetime) -> StepWork:
        """``request``: the step's request payload, which ``entry.payload`` holds."""
        return StepWork(
            event_id=ids.event_id("step-work", entry.id), occurred_at=now,
            response_id=chain.response_id, step_id=entry.id, sequence=entry.step_sequence,
            kind=_kind(entry.step_kind), payload=entry.payload, model=_step_model(chain, request),
            owner=chain.facts.owner, request_id=entry.request_id, tool=entry.tool,
        )  # fmt: skip

    def _sub_requests(self, chain: ChainState, recorded: Iterable[Step], now: datetime) -> list[Out]:  # fmt: skip
        """The `processing` rows of non-head model calls (§1.3), one record per model."""
        by_model: dict[str, list[RequestCreated]] = {}
        for step in recorded:
            row, model = sub_request_row(step), _row_model(chain, step)
            if row is None or model is None:
                continue
            by_model.setdefault(model, []).append(
                RequestCreated(
                    event_id=ids.event_id("sub-request-created", row.id), occurred_at=now,
                    request_id=row.id, model=model, state="processing",
                    facts=sub_request_facts(chain.facts, now),
                )
            )  # fmt: skip
        return [
            Out("requests", model, transitions(model, created, now))
            for model, created in by_model.items()
        ]

    # -- termination (§2.11) --------------------------------------------------------------

    async def _aborted(self, event: ChainAborted) -> list[Out]:
        chain = self.load(event.response_id)
        if chain is None or chain.terminal or chain.head is None:
            return []  # no chain (a response without tools), or one that has ended
        if chain.head.claim_id != event.claim_id:
            return []  # the abort of an older claim: the head runs under another now
        now = event.occurred_at
        outs = self._cancel_unstarted(chain, now)
        final = FinalOutcome(499, 0)
        chain.terminal, chain.final = True, final
        chain.steps = []
        if not event.erased:
            finalized = ResponseFinalized(
                event_id=ids.event_id("response-finalized", chain.response_id),
                occurred_at=now, response_id=chain.response_id, status=final.status, body=None,
            )  # fmt: skip
            outs.append(Out("responses", chain.response_id, finalized))
            outs.append(self._head_finished(chain, final, result="canceled"))
        self.held.pop(chain.response_id, None)
        self._save(chain)
        return outs

    def _cancel_unstarted(self, chain: ChainState, now: datetime) -> list[Out]:
        """The `processing` rows of the chain's model calls that no step executor started."""
        by_model: dict[str, list[RequestCanceled]] = {}
        for step in chain.steps:
            row, model = step.request_id, step.row_model
            if step.state is not StepState.PENDING or row is None or model is None:
                continue
            by_model.setdefault(model, []).append(
                RequestCanceled(
                    event_id=ids.event_id("sub-request-canceled", row), occurred_at=now,
                    request_id=row, batch_id=None, model=model, from_state="processing",
                )
            )  # fmt: skip
        return [
            Out("requests", model, transitions(model, canceled, now))
            for model, canceled in by_model.items()
        ]

    async def _finish(
        self,
        chain: ChainState,
        outcome: Complete | Fail | LoopError,
        now: datetime,
        parent: ParentRequest | None = None,
        steps: Sequence[Step] = (),
    ) -> list[Out]:
        head = chain.response_id
        finalization: HeadFinalization
        if isinstance(outcome, Complete):
            assert parent is not None  # a Complete comes only from an evaluation that parsed it
            finalization = conclude(
                outcome, head, steps, parent,
                created_at=unix(chain.facts.created_at), completed_at=unix(now),
            )  # fmt: skip
        elif isinstance(outcome, Fail):
            finalization = finalize(500, outcome.error)
        else:
            finalization = finalize(500, loop_error_payload(outcome.message))
        if isinstance(finalization, HeadCompleted):
            record = body_record(bodies.RESULT, head, finalization.body.encode())
        else:
            record = body_record(bodies.ERROR, head, finalization.error.encode())
        if (too_large := _oversized([record], "the chain's response")) is not None:
            failed = finalize(500, loop_error_payload(too_large))
            assert not isinstance(failed, HeadCompleted)
            finalization, record = failed, body_record(bodies.ERROR, head, failed.error.encode())
        (ref,) = await self.io.write_bodies([record])
        final = FinalOutcome(finalization.status, len(record.value))
        chain.terminal, chain.final = True, final
        chain.steps = []  # what an ended chain keeps: its claims and its outcome
        finalized = ResponseFinalized(
            event_id=ids.event_id("response-finalized", head), occurred_at=now,
            response_id=head, status=final.status, body=ref,
        )  # fmt: skip
        outs = [Out("responses", head, finalized)]
        if chain.head is None:
            outs.append(Out("requests", chain.model, self._realtime_outcome(chain, final, now)))
        else:
            outs.append(self._head_finished(chain, final))
        return outs

    def _realtime_outcome(self, chain: ChainState, final: FinalOutcome, now: datetime) -> RequestTransitions:  # fmt: skip
        reported = RealtimeCompletionReported(
            event_id=ids.event_id("chain-head-outcome", chain.response_id), occurred_at=now,
            request_id=chain.response_id, model=chain.model, status=final.status,
            size=final.size, facts=chain.facts,
        )  # fmt: skip
        return transitions(chain.model, [reported], now)

    # -- the claimed head (flex, batch lines) ---------------------------------------------

    def _head_finished(
        self, chain: ChainState, final: FinalOutcome, result: str | None = None
    ) -> Out:
        """The claim's one finished item: completed, or failed NonRetriableHttpStatus, which
        the gate ends at once (a finalised chain is never retried), or canceled when the
        gate aborted it (a later claim of the same head is told it failed: the chain does
        not run again)."""
        head = chain.head
        assert head is not None
        if result == "canceled":
            item = FinishedItem(
                request_id=chain.response_id, claim_id=head.claim_id, result="canceled"
            )
        elif 200 <= final.status < 300:
            item = FinishedItem(
                request_id=chain.response_id, claim_id=head.claim_id, result="completed",
                status=final.status, size=final.size, routed_model=head.model,
            )  # fmt: skip
        else:
            item = FinishedItem(
                request_id=chain.response_id, claim_id=head.claim_id, result="failed",
                status=final.status, size=final.size, error_type="NonRetriableHttpStatus",
            )  # fmt: skip
        report = ExecutionReport(
            event_id=ids.event_id("chain-head-finished", chain.response_id, head.claim_id),
            occurred_at=self.clock(), worker_id=self.worker_id, model=head.model,
            finished=[item],
        )  # fmt: skip
        self.held.pop(chain.response_id, None)
        return Out("gate", head.model, report)

    def _take_over(self, chain: ChainState) -> list[Out]:
        """Tell the gate this worker holds the head's claim (once per claim and process; see
        also holding()), so it judges the claim by this worker's heartbeats."""
        head = chain.head
        if head is None or chain.terminal or self.held.get(chain.response_id) == head:
            return []
        self.held[chain.response_id] = head
        return [self._started_report(head.model, [StartedItem(chain.response_id, head.claim_id)])]

    def _started_report(self, model: str, items: list[StartedItem]) -> Out:
        report = ExecutionReport(
            event_id=ids.new_id(), occurred_at=self.clock(), worker_id=self.worker_id,
            model=model, started=items,
        )  # fmt: skip
        return Out("gate", model, report)

    def holding(self) -> list[Out]:
        """Every held claim, said again (with the heartbeat): the executor that handed a head
        over may report its own start of the claim after this worker took it over, and the
        gate credits a claim to whoever reported it last."""
        by_model: dict[str, list[StartedItem]] = {}
        for response, head in self.held.items():
            by_model.setdefault(head.model, []).append(StartedItem(response, head.claim_id))
        return [self._started_report(model, items) for model, items in sorted(by_model.items())]

    def adopt(self, partitions: Iterable[int]) -> list[Out]:
        """Take over every live claimed chain of ``partitions`` (after an assignment): a chain
        waiting on a slow step hears nothing for a while, and its head must not look
        abandoned meanwhile. Reads the table only."""
        wanted = set(partitions)
        outs: list[Out] = []
        for _, raw in list(self.state.items()):
            chain = decode_state(raw)
            if chain.partition in wanted:
                outs += self._take_over(chain)
                self._watch(chain)
        return outs

    def forget(self) -> None:
        """After a rebalance: claims must be taken over again by whoever holds them now, and
        overdue steps handed out again by whoever holds their chains."""
        self.held.clear()
        self.waiting.clear()


def _reissuable(chain: ChainState) -> list[tuple[StepEntry, datetime]]:
    """A live chain's steps in flight, each with when its work first went out (rule 6); steps
    stored before that time was kept have none and are left alone."""
    if chain.terminal:
        return []
    return [
        (entry, entry.recorded_at)
        for entry in chain.steps
        if entry.state in IN_FLIGHT_STEP_STATES and entry.recorded_at is not None
    ]


_FACTS: dict[type, StepFact] = {
    StepStarted: "started",
    StepCompleted: "completed",
    StepFailed: "failed",
}


def _apply(step: StepEntry, event: StepStarted | StepCompleted | StepFailed) -> bool:
    """§1.4 for redelivered facts: one that does not apply is dropped (False)."""
    state = step_after(step.state, _FACTS[type(event)])
    if state is None:
        return False
    step.state = state
    if isinstance(event, StepCompleted):
        step.result = event.payload
    elif isinstance(event, StepFailed):
        step.result = event.error
    return True


def _kind(kind: StepKind) -> EventStepKind:
    return "model_call" if kind is StepKind.MODEL_CALL else "tool_call"


def _tool_name(step: Step) -> str | None:
    if step.step_kind is not StepKind.TOOL_CALL or not isinstance(step.request_payload, dict):
        return None
    name = step.request_payload.get("name")
    return name if isinstance(name, str) else None


def _row_model(chain: ChainState, step: Step) -> str | None:
    """The model of a non-head model call's request row; None for the others."""
    row = sub_request_row(step)
    return None if row is None else row.model or chain.model


def _step_model(chain: ChainState, request: Any) -> str:
    model = request.get("model") if isinstance(request, dict) else None
    return model if isinstance(model, str) and model else chain.model


def sub_request_facts(chain_facts: BatchlessFacts, now: datetime) -> BatchlessFacts:
    """A non-head model call's row: the response's owner and key, never claimed (§1.3)."""
    return BatchlessFacts(
        owner=chain_facts.owner,
        path=SUB_REQUEST_PATH,
        service_tier=REALTIME_TIER,
        created_at=now,
        deadline=now,
        api_key_id=chain_facts.api_key_id,
    )


def transitions(model: str, events: Sequence[Any], now: datetime) -> RequestTransitions:
    first = events[0].event_id
    return RequestTransitions(
        event_id=ids.event_id("transitions", first, len(events)),
        occurred_at=now,
        model=model,
        events=list(events),
    )
