"""Explicit retries and per-request control through the claim gate (core §2.3, §2.4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from schemas import ids
from schemas.bodies import BodyRef
from schemas.commands import CancelBatch, RetryBatch, RowRanges
from schemas.errors import ApiError
from schemas.events import (
    BatchFacts,
    BatchlessFacts,
    CancelBatchRequests,
    ChainAborted,
    ChunkRef,
    DispatchBatch,
    DispatchItem,
    ExecutionReport,
    FinishedItem,
    GateTick,
    LineRange,
    PendingRequests,
    RequestCanceled,
    RequestControl,
    RequestErased,
    RequestEvent,
    RequestFailed,
    RequestRetried,
    RequestSubmitted,
    RequestTransitions,
    RetryRows,
    SourceMark,
    StartedItem,
)
from streams import population
from streams.emit import Out
from streams.gate.core import Gate
from streams.gate.scoring import GateConfig
from streams.lifecycle import next_state

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
BATCH = ids.derived("test", "retry-batch")
marks = iter(range(1, 10_000))

REFERENCE = GateConfig(prefetch=0)  # claims only into free capacity, as the reference


def mark() -> SourceMark:
    return SourceMark(0, next(marks), 0)


def facts(version: int = 0, deadline: datetime = T0 + 24 * HOUR) -> BatchFacts:
    return BatchFacts(
        batch_id=BATCH, file_id=ids.derived("test", "file"), owner="alice", created_at=T0,
        deadline=deadline, window_class="24h", window_s=86400, path="/v1/chat/completions",
        retry_version=version,
    )  # fmt: skip


def events(outs: list[Out]) -> list[RequestEvent]:
    return [e for o in outs if isinstance(o.value, RequestTransitions) for e in o.value.events]


def dispatched(outs: list[Out]) -> list[DispatchItem]:
    return [i for o in outs if isinstance(o.value, DispatchBatch) for i in o.value.items]


def report(items: list[DispatchItem], result: str) -> ExecutionReport:
    return ExecutionReport(
        event_id=ids.new_id(), occurred_at=T0, worker_id="ex", model=items[0].model if items else "m",
        finished=[FinishedItem(request_id=i.request_id, claim_id=i.claim_id, result=result, size=3)  # type: ignore[arg-type]
                  for i in items],
    )  # fmt: skip


class Lifecycle:
    """Folds what the gate publishes the way the projector does."""

    def __init__(self) -> None:
        self.states: dict[str, str | None] = {}

    def fold(self, outs: list[Out]) -> list[Out]:
        for event in events(outs):
            if isinstance(event, RequestErased):
                self.states.pop(event.request_id, None)
                continue
            rows = getattr(event, "items", None)
            targets = [i.request_id for i in rows] if rows else [event.request_id]  # type: ignore[union-attr]
            for target in targets:
                after = next_state(self.states.get(target), event)  # type: ignore[arg-type]
                assert after is not None, (type(event).__name__, self.states.get(target))
                self.states[target] = after
        return outs


def populated(lines: int, batch: BatchFacts | None = None) -> PendingRequests:
    return PendingRequests(
        event_id=ids.new_id(), occurred_at=T0, source=mark(), batch=batch or facts(), model="m",
        ranges=[LineRange(0, lines)], chunks=[ChunkRef(0, lines, 1, 7)],
    )  # fmt: skip


def retry_of(
    batch: BatchFacts,
    lines: int,
    *,
    failed: LineRange | None = None,
    canceled: LineRange | None = None,
    at: datetime = T0,
) -> RetryRows:
    """The commands agent's retry of a batch whose file has ``lines`` lines: its ended rows in
    ``failed`` and ``canceled`` run again."""
    return RetryRows(
        event_id=ids.new_id(), occurred_at=at, source=mark(), batch=batch, model="m",
        failed=[failed] if failed else [], canceled=[canceled] if canceled else [],
        chunks=[ChunkRef(0, lines, 1, 7)],
    )  # fmt: skip


def run_batch_to_failure(gate: Gate, life: Lifecycle, n: int = 3) -> list[DispatchItem]:
    population = populated(n)
    claims = dispatched(life.fold(gate.handle(population, T0)))
    life.fold(gate.handle(report(claims, "failed"), T0))
    return claims


def test_a_retry_runs_ended_rows_again_under_new_claim_ids() -> None:
    state: dict[str, bytes] = {}
    gate, life = Gate(state, {"m": 5}, "gate", config=REFERENCE), Lifecycle()
    first = run_batch_to_failure(gate, life)
    assert set(life.states.values()) == {"failed"}
    assert [k for k in state if k[0] in "BR"] == []  # the gate forgot the batch
    retry = retry_of(facts(version=1), 3, failed=LineRange(0, 3))
    outs = life.fold(gate.handle(retry, T0))
    retried = [e for e in events(outs) if isinstance(e, RequestRetried)]
    assert [e.from_state for e in retried] == ["failed"] * 3
    again = dispatched(outs)
    assert sorted(i.request_id for i in again) == sorted(i.request_id for i in first)
    assert {i.claim_id for i in again}.isdisjoint({i.claim_id for i in first})
    assert {i.attempt for i in again} == {0}
    assert again[0].body == BodyRef(1, 7, 0)
    life.fold(gate.handle(report(again, "completed"), T0))
    assert set(life.states.values()) == {"completed"}


def test_a_retry_skips_rows_that_are_still_live() -> None:
    gate, life = Gate({}, {"m": 1}, "gate", config=REFERENCE), Lifecycle()
    population = populated(2)
    [claim] = dispatched(life.fold(gate.handle(population, T0)))  # capacity 1: line 1 waits
    retry = retry_of(facts(version=1), 2, failed=LineRange(0, 2))
    assert [e for e in events(gate.handle(retry, T0)) if isinstance(e, RequestRetried)] == []
    assert claim.request_id == ids.request_id(BATCH, 0)


def test_cancel_then_retry_is_pause_and_resume() -> None:
    gate, life = Gate({}, {"m": 1}, "gate", config=REFERENCE), Lifecycle()
    population = populated(4)
    [claim] = dispatched(life.fold(gate.handle(population, T0)))
    cancel = CancelBatchRequests(event_id=ids.new_id(), occurred_at=T0, batch_id=BATCH, model="m")
    life.fold(gate.handle(cancel, T0))
    life.fold(gate.handle(report([claim], "canceled"), T0))
    assert set(life.states.values()) == {"canceled"}
    retry = retry_of(facts(version=1), 4, canceled=LineRange(0, 4))
    outs = life.fold(gate.handle(retry, T0))
    assert len(dispatched(outs)) == 1  # the reopened batch claims again, in line order
    assert dispatched(outs)[0].request_id == ids.request_id(BATCH, 0)


def test_a_row_in_flight_at_a_cancel_runs_again_when_the_batch_is_resumed_at_once() -> None:
    state: dict[str, bytes] = {}
    gate, life = Gate(state, {"m": 1}, "gate", config=REFERENCE), Lifecycle()
    population = populated(4)
    [claim] = dispatched(life.fold(gate.handle(population, T0)))
    cancel = CancelBatchRequests(event_id=ids.new_id(), occurred_at=T0, batch_id=BATCH, model="m")
    life.fold(gate.handle(cancel, T0))
    # Resumed before the abort lands: the read model shows line 0 claimed, so only the
    # other three are listed as canceled.
    retry = retry_of(facts(version=1), 4, canceled=LineRange(1, 4))
    life.fold(gate.handle(retry, T0))
    outs = life.fold(gate.handle(report([claim], "canceled"), T0))  # the abort stopped the call
    first = ids.request_id(BATCH, 0)
    ended = [e for e in events(outs) if isinstance(e, RequestCanceled | RequestRetried)]
    assert [(type(e).__name__, e.request_id) for e in ended] == [
        ("RequestCanceled", first),
        ("RequestRetried", first),
    ]
    queue = dispatched(outs)
    while queue:
        outs = life.fold(gate.handle(report(queue[:1], "completed"), T0))
        queue = queue[1:] + dispatched(outs)
    assert [life.states[ids.request_id(BATCH, n)] for n in range(4)] == ["completed"] * 4
    assert [k for k in state if k[0] in "BR"] == []  # and the gate forgot the batch


def test_a_result_that_comes_back_after_its_batch_was_resumed_counts() -> None:
    gate, life = Gate({}, {"m": 1}, "gate", config=REFERENCE), Lifecycle()
    population = populated(2, facts(deadline=T0 + HOUR))
    [claim] = dispatched(life.fold(gate.handle(population, T0)))
    later = T0 + HOUR + timedelta(seconds=1)
    started = ExecutionReport(
        event_id=ids.new_id(), occurred_at=later, worker_id="ex", model="m",
        started=[StartedItem(claim.request_id, claim.claim_id)],
    )  # fmt: skip
    life.fold(gate.handle(started, later))  # the batch expires meanwhile: line 1 fails
    renewed = facts(version=1, deadline=later + 24 * HOUR)
    retry = retry_of(renewed, 2, failed=LineRange(1, 2), at=later)
    life.fold(gate.handle(retry, later))
    outs = life.fold(gate.handle(report([claim], "completed"), later))  # before the abort
    assert life.states[claim.request_id] == "completed"  # not failed BatchTerminated
    life.fold(gate.handle(report(dispatched(outs), "completed"), later))
    assert set(life.states.values()) == {"completed"}


def test_each_run_of_a_retried_row_ends_with_an_event_of_its_own() -> None:
    gate, life = Gate({}, {"m": 5}, "gate", config=REFERENCE), Lifecycle()
    population = populated(1)
    ended: list[str] = []
    claims = dispatched(life.fold(gate.handle(population, T0)))
    for version in (1, 2):
        outs = life.fold(gate.handle(report(claims, "failed"), T0))
        ended += [e.event_id for e in events(outs) if isinstance(e, RequestFailed)]
        retry = retry_of(facts(version=version), 1, failed=LineRange(0, 1))
        claims = dispatched(life.fold(gate.handle(retry, T0)))
    # A consumer that drops an event id it has seen would otherwise miss the second failure.
    assert len(set(ended)) == 2
    assert ended[0] == ids.event_id("terminal", ids.request_id(BATCH, 0))  # as it always was


def test_a_retried_expired_batch_runs_under_its_new_deadline() -> None:
    gate, life = Gate({}, {"m": 2}, "gate", config=REFERENCE), Lifecycle()
    population = populated(4, facts(deadline=T0 + HOUR))
    life.fold(gate.handle(population, T0))
    later = T0 + 2 * HOUR
    renewed = facts(version=1, deadline=later + 24 * HOUR)
    retry = retry_of(renewed, 4, failed=LineRange(0, 4), at=later)
    life.fold(gate.handle(GateTick(event_id=ids.new_id(), occurred_at=later, model="m"), later))
    # Two hours on, the silent claims were taken back and every row expired BatchTerminated.
    assert set(life.states.values()) == {"failed"}
    outs = life.fold(gate.handle(retry, later))
    assert {i.deadline for i in dispatched(outs)} == {renewed.deadline}


def test_a_batch_retried_while_live_expires_at_its_renewed_deadline_then_leaves() -> None:
    gate, life = Gate({}, {"m": 2}, "gate", config=REFERENCE), Lifecycle()
    first = dispatched(life.fold(gate.handle(populated(4, facts(deadline=T0 + HOUR)), T0)))
    life.fold(gate.handle(report(first, "failed"), T0))  # lines 2 and 3 are claimed now
    renewed = facts(version=1, deadline=T0 + 3 * HOUR)
    retry = retry_of(renewed, 4, failed=LineRange(0, 2))
    life.fold(gate.handle(retry, T0))

    def tick(at: datetime) -> list[Out]:
        return life.fold(gate.handle(GateTick(event_id=ids.new_id(), occurred_at=at, model="m"), at))  # fmt: skip

    # Past the first deadline, not the renewed one: nothing expires.
    outs = tick(T0 + HOUR + timedelta(minutes=1))
    assert not [e for e in events(outs) if isinstance(e, RequestFailed)]
    # Past the renewed deadline every row fails BatchTerminated.
    outs = tick(renewed.deadline + timedelta(minutes=1))
    assert set(life.states.values()) == {"failed"}
    assert {e.error_type for e in events(outs) if isinstance(e, RequestFailed)} == {"BatchTerminated"}  # fmt: skip
    # The batch left the gate; the next batch of the model is claimed as usual.
    at = renewed.deadline + timedelta(minutes=2)
    other = msgspec.structs.replace(facts(deadline=at + HOUR), batch_id=ids.derived("test", "b2"))
    claims = dispatched(life.fold(gate.handle(populated(1, other), at)))
    assert [c.batch_id for c in claims] == [other.batch_id]


def test_a_row_rerun_after_a_cancel_keeps_its_new_wait_not_the_old_one() -> None:
    gate, life = Gate({}, {"m": 1}, "gate", config=REFERENCE), Lifecycle()
    second = timedelta(seconds=1)

    def wait_until(item: DispatchItem, until: datetime, at: datetime) -> list[Out]:
        finished = FinishedItem(request_id=item.request_id, claim_id=item.claim_id, result="retry", not_before=until)  # fmt: skip
        said = ExecutionReport(event_id=ids.new_id(), occurred_at=at, worker_id="ex", model="m", finished=[finished])  # fmt: skip
        return life.fold(gate.handle(said, at))

    [first] = dispatched(life.fold(gate.handle(populated(1), T0)))
    wait_until(first, T0 + 100 * second, T0)  # a retry in 100 s
    cancel = CancelBatchRequests(event_id=ids.new_id(), occurred_at=T0, batch_id=BATCH, model="m")
    life.fold(gate.handle(cancel, T0 + second))  # the waiting row ends canceled
    [again] = dispatched(life.fold(gate.handle(retry_of(facts(version=1), 1, canceled=LineRange(0, 1)), T0 + 2 * second)))  # fmt: skip
    wait_until(again, T0 + 1000 * second, T0 + 3 * second)  # this run waits 1000 s
    tick = GateTick(event_id=ids.new_id(), occurred_at=T0 + 150 * second, model="m")
    assert dispatched(life.fold(gate.handle(tick, T0 + 150 * second))) == []  # not the old 100 s
    tick = GateTick(event_id=ids.new_id(), occurred_at=T0 + 1001 * second, model="m")
    assert [i.request_id for i in dispatched(life.fold(gate.handle(tick, T0 + 1001 * second)))] == [again.request_id]  # fmt: skip


def flex(request_id: str) -> RequestSubmitted:
    return RequestSubmitted(
        event_id=ids.new_id(), occurred_at=T0, source=mark(), request_id=request_id, model="m",
        body=BodyRef(0, 1),
        facts=BatchlessFacts(owner="a", path="/v1/chat/completions", service_tier="flex", created_at=T0, deadline=T0 + HOUR),
    )  # fmt: skip


def control(request_id: str, action: str, submitted: RequestSubmitted | None = None) -> RequestControl:  # fmt: skip
    return RequestControl(
        event_id=ids.new_id(), occurred_at=T0, source=mark(), request_id=request_id, model="m",
        action=action,  # type: ignore[arg-type]
        facts=None if submitted is None else submitted.facts,
        body=None if submitted is None else submitted.body,
    )  # fmt: skip


def test_a_flex_request_is_cancelled_in_flight_then_retried() -> None:
    gate, life = Gate({}, {"m": 1}, "gate", config=REFERENCE), Lifecycle()
    request_id = ids.new_id()
    submitted = flex(request_id)
    [claim] = dispatched(life.fold(gate.handle(submitted, T0)))
    outs = life.fold(gate.handle(control(request_id, "cancel"), T0))
    assert any(getattr(o.value, "claim_id", None) == claim.claim_id for o in outs)  # abort
    life.fold(gate.handle(report([claim], "canceled"), T0))
    assert life.states[request_id] == "canceled"
    # Only failed rows are retried one by one; make it fail first.
    life.states[request_id] = "failed"
    outs = life.fold(gate.handle(control(request_id, "retry", submitted), T0))
    [again] = dispatched(outs)
    assert again.request_id == request_id and again.claim_id != claim.claim_id


def test_erasing_a_live_flex_request_aborts_it_and_forgets_it() -> None:
    state: dict[str, bytes] = {}
    gate, life = Gate(state, {"m": 1}, "gate", config=REFERENCE), Lifecycle()
    request_id = ids.new_id()
    [claim] = dispatched(life.fold(gate.handle(flex(request_id), T0)))
    started = [StartedItem(claim.request_id, claim.claim_id)]
    for worker in ("ex", "chains:w1"):  # started, then said again by a chain worker
        said = ExecutionReport(event_id=ids.new_id(), occurred_at=T0, worker_id=worker, model="m", started=started)  # fmt: skip
        life.fold(gate.handle(said, T0))
    outs = life.fold(gate.handle(control(request_id, "erase"), T0))
    assert any(isinstance(e, RequestErased) for e in events(outs))
    assert request_id not in life.states and f"R:{request_id}" not in state
    assert gate.in_flight("m") == 0
    assert request_id not in gate.heard  # nothing kept in memory for it either
    assert events(gate.handle(report([claim], "completed"), T0)) == []  # fenced out


def chain_aborts(outs: list[Out]) -> list[tuple[str, str, bool]]:
    return [
        (o.topic, o.value.claim_id, o.value.erased)
        for o in outs
        if isinstance(o.value, ChainAborted)
    ]


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions"])
def test_a_cancelled_batch_tells_the_chain_agent_of_its_responses_rows_in_flight(path: str) -> None:
    gate = Gate({}, {"m": 1}, "gate", config=REFERENCE)
    population = populated(2, msgspec.structs.replace(facts(), path=path))
    [claim] = dispatched(gate.handle(population, T0))
    cancel = CancelBatchRequests(event_id=ids.new_id(), occurred_at=T0, batch_id=BATCH, model="m")
    expected = [("responses", claim.claim_id, False)] if path == "/v1/responses" else []
    assert chain_aborts(gate.handle(cancel, T0)) == expected


def test_a_cancelled_or_erased_flex_response_tells_the_chain_agent() -> None:
    gate = Gate({}, {"m": 2}, "gate", config=REFERENCE)
    first, second = ids.new_id(), ids.new_id()
    claims = []
    for request_id in (first, second):
        submitted = flex(request_id)
        submitted = msgspec.structs.replace(
            submitted, facts=msgspec.structs.replace(submitted.facts, path="/v1/responses")
        )
        [claim] = dispatched(gate.handle(submitted, T0))
        claims.append(claim)
    assert chain_aborts(gate.handle(control(first, "cancel"), T0)) == [("responses", claims[0].claim_id, False)]  # fmt: skip
    assert chain_aborts(gate.handle(control(second, "erase"), T0)) == [("responses", claims[1].claim_id, True)]  # fmt: skip


def two_model_batch(gate: Gate, life: Lifecycle) -> tuple[population.BatchRecord, list[DispatchItem]]:  # fmt: skip
    """Line 0 on model a, line 1 on model b, each with capacity 1: both claimed at once."""
    record = population.BatchRecord(populated=True, models=["a", "b"], facts=facts(), chunks=[ChunkRef(0, 2, 1, 7)])  # fmt: skip
    claims: list[DispatchItem] = []
    for line, model in enumerate("ab"):
        pending = PendingRequests(
            event_id=ids.new_id(), occurred_at=T0, source=mark(), batch=facts(), model=model,
            ranges=[LineRange(line, line + 1)], chunks=[ChunkRef(0, 2, 1, 7)],
        )  # fmt: skip
        claims += dispatched(life.fold(gate.handle(pending, T0)))
    return record, claims


def retry_batch(record: population.BatchRecord, scope: str, failed: list[RowRanges], canceled: list[RowRanges]) -> list[Out]:  # fmt: skip
    cmd = RetryBatch(
        command_id="r", issued_at=T0, batch_id=BATCH, retry_version=record.retry_version,
        scope=scope, failed=failed, canceled=canceled,  # type: ignore[arg-type]
    )  # fmt: skip
    return population.retry(record, cmd, (0, next(marks)), T0)


def test_resuming_a_batch_runs_again_what_its_cancel_stopped_on_every_model() -> None:
    gate, life = Gate({}, {"a": 1, "b": 1}, "gate", config=REFERENCE), Lifecycle()
    record, (on_a, on_b) = two_model_batch(gate, life)
    for model in "ab":
        cancel = CancelBatchRequests(event_id=ids.new_id(), occurred_at=T0, batch_id=BATCH, model=model)  # fmt: skip
        life.fold(gate.handle(cancel, T0))
    life.fold(gate.handle(report([on_a], "canceled"), T0))  # a's call stopped; b's still runs
    # The read model shows a's row canceled and b's in progress: the retry names a's alone.
    outs = retry_batch(record, "batch", [], [RowRanges("a", [LineRange(0, 1)])])
    assert sorted(o.key for o in outs if isinstance(o.value, RetryRows)) == ["a", "b"]
    queue: list[DispatchItem] = []
    for out in outs:
        if isinstance(out.value, RetryRows):
            queue += dispatched(life.fold(gate.handle(out.value, T0)))
    queue += dispatched(
        life.fold(gate.handle(report([on_b], "canceled"), T0))
    )  # b's abort lands late
    assert sorted(i.request_id for i in queue) == sorted([on_a.request_id, on_b.request_id])
    for item in queue:
        life.fold(gate.handle(report([item], "completed"), T0))
    assert set(life.states.values()) == {"completed"}


def test_retrying_chosen_failed_rows_does_not_resume_rows_a_cancel_stopped() -> None:
    gate, life = Gate({}, {"a": 1, "b": 1}, "gate", config=REFERENCE), Lifecycle()
    record, (on_a, on_b) = two_model_batch(gate, life)
    life.fold(gate.handle(report([on_a], "failed"), T0))  # a's row fails
    cancel = CancelBatchRequests(event_id=ids.new_id(), occurred_at=T0, batch_id=BATCH, model="b")  # fmt: skip
    life.fold(gate.handle(cancel, T0))
    for out in retry_batch(record, "requests", [RowRanges("a", [LineRange(0, 1)])], []):
        if isinstance(out.value, RetryRows):
            life.fold(gate.handle(out.value, T0))
    assert dispatched(life.fold(gate.handle(report([on_b], "canceled"), T0))) == []
    assert life.states[on_b.request_id] == "canceled"


def test_a_batch_whose_input_file_was_deleted_never_runs_again() -> None:
    record = population.BatchRecord(populated=True, models=["a"], facts=facts(), chunks=[ChunkRef(0, 1, 1, 7)])  # fmt: skip
    population.cancel_requested(record, BATCH, (0, next(marks)), T0, input_deleted=True)
    with pytest.raises(ApiError, match="was deleted") as info:
        retry_batch(record, "batch", [], [RowRanges("a", [LineRange(0, 1)])])
    assert info.value.status == 400


def test_a_cancel_read_again_after_the_resume_that_followed_it_changes_nothing() -> None:
    """Both agents run at least once: after a crash the cancel and the retry that resumed the
    batch are read again, the tables already holding what they did."""
    gate, life = Gate({}, {"m": 1}, "gate", config=REFERENCE), Lifecycle()
    record = population.BatchRecord(populated=True, models=["m"], facts=facts(), chunks=[ChunkRef(0, 4, 1, 7)])  # fmt: skip
    [claim] = dispatched(life.fold(gate.handle(populated(4), T0)))
    cancel_cmd = CancelBatch(command_id="c", issued_at=T0, batch_id=BATCH)
    resume_cmd = RetryBatch(
        command_id="r", issued_at=T0, batch_id=BATCH, retry_version=0, scope="batch",
        failed=[], canceled=[RowRanges("m", [LineRange(0, 4)])],
    )  # fmt: skip
    cancel_at, resume_at = (0, next(marks)), (0, next(marks))
    outs = population.batch_command(record, cancel_cmd, cancel_at, T0)
    [cancel] = [o.value for o in outs if isinstance(o.value, CancelBatchRequests)]
    life.fold(gate.handle(cancel, T0))
    life.fold(gate.handle(report([claim], "canceled"), T0))
    for out in population.batch_command(record, resume_cmd, resume_at, T0):
        if isinstance(out.value, RetryRows):
            life.fold(gate.handle(out.value, T0))
    resumed = dict(life.states)
    assert "canceled" not in resumed.values()
    # The commands agent reads both commands again: nothing is published, nothing refused.
    assert population.batch_command(record, cancel_cmd, cancel_at, T0) == []
    assert population.batch_command(record, resume_cmd, resume_at, T0) == []
    assert not record.cancelled and record.retry_version == 1
    # The gate reads the cancel again (its own crash): the resumed rows stay as they are.
    assert events(life.fold(gate.handle(cancel, T0))) == []
    assert life.states == resumed
