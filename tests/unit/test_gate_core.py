"""The claim gate, driven through ``Gate.handle`` (no Kafka).

Every message goes through :class:`Run`, which folds the published lifecycle the way the
projector does (``streams.lifecycle.next_state`` from None) and fails the test on any illegal
event, wrong ``from_state``, second ending of a request, capacity overrun or a batch's count of
unclaimed lines that drifted from its ranges — so each test also checks those invariants on its
own scenario.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import ids
from schemas.bodies import BodyRef
from schemas.events import (
    AbortDispatch,
    BatchFacts,
    CancelBatchRequests,
    ChunkRef,
    DispatchBatch,
    DispatchItem,
    ExecutionReport,
    ExecutionResult,
    FinishedItem,
    GateInput,
    GateTick,
    LineRange,
    ModelFilterAppended,
    ModelState,
    PendingRequests,
    RealtimeCompletionReported,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestCreated,
    RequestErased,
    RequestEvent,
    RequestFailed,
    RequestReclaimed,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
    RequestTransitions,
    SourceMark,
    StartedItem,
    State,
    WorkerHeartbeat,
    WorkerStopped,
)
from streams.emit import Out
from streams.execution.failure import BatchTerminated, parse
from streams.gate.core import Gate, GateRequest, Liveness, _Model, _ranges, _Ranked, _with_line
from streams.gate.scoring import GateConfig
from streams.lifecycle import IN_FLIGHT, TERMINAL, next_state

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
PATIENT = Liveness(claim_timeout=10 * HOUR, processing_timeout=10 * HOUR, stale_worker=10 * HOUR)
RESULTS: list[ExecutionResult] = ["completed", "failed", "retry", "canceled", "not_sent"]

NAMES: dict[str, str] = {}


def bid(name: str) -> str:
    """The batch id (a UUID, as the contracts require) of a batch named in a test."""
    batch_id = ids.derived("test-batch", name)
    NAMES[batch_id] = name
    return batch_id


def rid(batch: str, line: int) -> str:
    return ids.request_id(bid(batch), line)


class Step:
    """What one ``Gate.handle`` published."""

    def __init__(self, outs: list[Out]) -> None:
        self.outs = outs
        self.events: list[RequestEvent] = [
            e for o in outs if isinstance(o.value, RequestTransitions) for e in o.value.events
        ]
        self.records = [o.value for o in outs if isinstance(o.value, DispatchBatch)]
        items = {item.claim_id: item for r in self.records for item in r.items}
        # in claim order (records are per dispatch partition)
        self.dispatched = [
            items[e.claim_id] for e in self.of(RequestClaimed) if e.claim_id in items
        ]
        self.aborts = [o.value for o in outs if isinstance(o.value, AbortDispatch)]

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.events if not isinstance(e, RequestsPending)]

    def lines(self, batch: str = "b") -> list[int]:
        by_id = {rid(batch, n): n for n in range(1_000)}
        return [by_id[d.request_id] for d in self.dispatched]

    def batches(self) -> list[str]:
        return [NAMES[d.batch_id or ""] for d in self.dispatched]


class Run:
    """A gate and the lifecycle it published, folded and checked after every message."""

    def __init__(
        self,
        limits: dict[str, int] | None = None,
        *,
        liveness: Liveness = PATIENT,
        config: GateConfig | None = None,
        partitions: int = 1,
    ) -> None:
        self.limits = limits or {"m": 3}
        self.state: dict[str, bytes] = {}
        config = config or GateConfig(prefetch=0)  # the reference's rules, unless a test asks
        self.batch_size = config.claim_batch_size
        self.args: dict[str, Any] = {
            "config": config,
            "liveness": liveness,
            "dispatch_partitions": partitions,
        }
        self.gate = Gate(self.state, self.limits, "gate-1", **self.args)
        self.now = T0
        self.states: dict[str, State] = {}
        self.model_of: dict[str, str] = {}
        self.row_of: dict[str, tuple[str, int]] = {}  # request -> (batch id, line)
        self.facts: dict[str, BatchFacts] = {}
        self.ends: Counter[str] = Counter()
        self.claims: dict[str, DispatchItem] = {}  # latest dispatch of each request
        self.marks = itertools.count(1)
        self.sent: dict[str, PendingRequests] = {}
        self.waiting: dict[str, datetime] = {}  # not_before of rows waiting for a retry
        self.filters: dict[str, str] = {}

    # -- driving ----------------------------------------------------------------------------

    def send(self, message: GateInput, at: datetime | None = None) -> Step:
        self.now = at or self.now
        step = Step(self.gate.handle(message, self.now))
        self._fold(step)
        if isinstance(message, ModelFilterAppended):
            self.filters[message.model] = message.state
        if isinstance(message, PendingRequests):
            self.facts[message.batch.batch_id] = message.batch
        self._check_choices(getattr(message, "model", None), step)
        return step

    def _check_choices(self, model: str | None, step: Step) -> None:
        """What a claim cycle of ``model`` left behind is consistent with §3.3."""
        claimable = [
            r
            for r, s in self.states.items()
            if s == "pending" and self.model_of[r] == model and self.waiting[r] <= self.now
        ]
        for item in step.dispatched:  # each batch drains in line order ...
            batch, line = self.row_of[item.request_id]
            assert all(self.row_of[r] > (batch, line) for r in claimable if self.row_of[r][0] == batch)  # fmt: skip
        if model not in self.limits or self.filters.get(model, "live") != "live":
            return
        # ... a live model never leaves capacity idle while a row is claimable ...
        idle = self.limits[model] - self.in_flight(model)
        full_cycle = len(step.dispatched) >= self.batch_size
        assert idle <= 0 or not claimable or full_cycle, (idle, len(claimable))
        # ... and an owner's earliest-deadline batch goes first
        for item in step.dispatched:
            taken = self.facts[item.batch_id or ""]
            for r in claimable:
                left = self.facts[self.row_of[r][0]]
                assert not (left.owner == taken.owner and left.deadline < taken.deadline)

    def populate(
        self,
        batch: str = "b",
        n: int = 5,
        *,
        model: str = "m",
        owner: str = "alice",
        left: timedelta = 24 * HOUR,
        window: timedelta = 24 * HOUR,
        label: str = "24h",
        chunk: int = 100,
        headers: dict[str, str] | None = None,
        mark: SourceMark | None = None,
    ) -> Step:
        deadline = self.now + left
        facts = BatchFacts(
            batch_id=bid(batch),
            file_id=ids.derived("test-file", batch),
            owner=owner,
            created_at=deadline - window,
            deadline=deadline,
            window_class=label,
            window_s=window.total_seconds(),
            path="/v1/chat/completions",
            headers=headers or {},
        )
        chunks = [
            ChunkRef(first_line=s, count=min(chunk, n - s), partition=4, offset=100 + s)
            for s in range(0, n, chunk)
        ]
        message = PendingRequests(
            event_id=ids.new_id(),
            occurred_at=self.now,
            source=mark or SourceMark(0, next(self.marks), 0),
            batch=facts,
            model=model,
            ranges=[LineRange(0, n)],
            chunks=chunks,
        )
        self.sent[batch] = message
        return self.send(message)

    def report(
        self,
        item: DispatchItem,
        result: ExecutionResult = "completed",
        *,
        worker: str = "ex-1",
        not_before: datetime | None = None,
        **fields: Any,
    ) -> Step:
        if result == "completed":
            fields.setdefault("status", 200)
        done = FinishedItem(
            request_id=item.request_id,
            claim_id=item.claim_id,
            result=result,
            not_before=not_before,
            **fields,
        )
        return self.send(self._report(item.model, worker, finished=[done]))

    def finish(self, *items: DispatchItem) -> Step:
        """One report ending several calls at once."""
        done = [FinishedItem(request_id=i.request_id, claim_id=i.claim_id, result="completed",
                             status=200) for i in items]  # fmt: skip
        return self.send(self._report(items[0].model, "ex-1", finished=done))

    def start(self, *items: DispatchItem, worker: str = "ex-1") -> Step:
        started = [StartedItem(i.request_id, i.claim_id) for i in items]
        return self.send(self._report(items[0].model, worker, started=started))

    def _report(self, model: str, worker: str, **lists: Any) -> ExecutionReport:
        return ExecutionReport(
            event_id=ids.new_id(), occurred_at=self.now, worker_id=worker, model=model, **lists
        )

    def tick(self, at: datetime | None = None, model: str = "m") -> Step:
        at = at or self.now
        return self.send(GateTick(event_id=ids.new_id(), occurred_at=at, model=model), at)

    def cancel(self, batch: str = "b", model: str = "m") -> Step:
        event = CancelBatchRequests(
            event_id=ids.new_id(), occurred_at=self.now, batch_id=bid(batch), model=model
        )
        return self.send(event)

    def model_state(self, state: ModelState, model: str = "m") -> Step:
        event = ModelFilterAppended(
            event_id=ids.new_id(), occurred_at=self.now, model=model, state=state
        )
        return self.send(event)

    def heartbeat(self, worker: str = "ex-1") -> Step:
        event = WorkerHeartbeat(
            event_id=ids.new_id(), occurred_at=self.now, worker_id=worker, role="executor"
        )
        return self.send(event)

    def stop(self, worker: str = "ex-1") -> Step:
        event = WorkerStopped(
            event_id=ids.new_id(), occurred_at=self.now, worker_id=worker, role="executor"
        )
        return self.send(event)

    def restart(self) -> None:
        """A rebalance: a new gate derives everything from the state records."""
        self.gate = Gate(self.state, self.limits, "gate-2", **self.args)
        self.gate.rebuild()

    # -- what users see ---------------------------------------------------------------------

    def in_flight(self, model: str = "m") -> int:
        return sum(1 for r in self.states if self._flying(r, model))

    def _flying(self, request_id: str, model: str) -> bool:
        return self.states[request_id] in IN_FLIGHT and self.model_of[request_id] == model

    def live_keys(self) -> list[str]:
        return sorted(k for k in self.state if k[:2] in ("R:", "B:"))

    def _fold(self, step: Step) -> None:
        for event in step.events:
            if isinstance(event, RequestsPending):
                for item in event.items:
                    assert item.request_id not in self.states, "populated twice"
                    self.states[item.request_id] = "pending"
                    self.waiting[item.request_id] = T0
                    self.model_of[item.request_id] = event.model
                    self.row_of[item.request_id] = (event.batch_id, item.line_number)
                continue
            assert not isinstance(
                event, RequestCreated | RealtimeCompletionReported | RequestErased
            )
            current = self.states.get(event.request_id)
            assert event.from_state == current, (type(event).__name__, event.from_state, current)
            after = next_state(current, event)
            assert after is not None, f"illegal {type(event).__name__} from {current}"
            self.states[event.request_id] = after
            if isinstance(event, RequestRetryScheduled):
                self.waiting[event.request_id] = event.not_before
            if after in TERMINAL:
                self.ends[event.request_id] += 1
                assert self.ends[event.request_id] == 1, "a request ended twice"
        claimed = {e.request_id: e.claim_id for e in step.of(RequestClaimed)}
        assert {d.request_id: d.claim_id for d in step.dispatched} == claimed
        for claim in step.dispatched:
            self.claims[claim.request_id] = claim
        for index in self.gate.models.values():  # the count kept as lines are taken
            for batch in index.batches.values():
                assert batch.unclaimed_lines == sum(r.end - r.start for r in batch.entry.unclaimed)
        depth = 1 + self.gate.config.prefetch
        for model, limit in self.limits.items():
            assert self.in_flight(model) <= limit * depth
            assert self.gate.in_flight(model) == self.in_flight(model)
            if depth > 1:  # each claim in a lane of its model, none holding more than depth
                lanes = Counter(self.claims[r].lane for r in self.states if self._flying(r, model))  # fmt: skip
                assert set(lanes) <= set(range(limit)) and max(lanes.values(), default=0) <= depth  # fmt: skip


def test_claims_fill_capacity_in_line_order_and_never_exceed_it() -> None:
    run = Run({"m": 3})
    step = run.populate(n=10)
    assert step.lines() == [0, 1, 2]
    assert step.kinds() == ["RequestClaimed"] * 3
    assert {e.attempt for e in step.of(RequestClaimed)} == {0}
    assert [d.attempt for d in step.dispatched] == [0, 0, 0]
    assert run.tick().dispatched == []  # full


def test_a_cycle_claims_at_most_claim_batch_size() -> None:
    run = Run({"m": 10}, config=GateConfig(claim_batch_size=4))
    assert len(run.populate(n=9).dispatched) == 4
    assert len(run.tick().dispatched) == 4
    assert len(run.tick().dispatched) == 1


def test_a_finished_request_frees_capacity_for_the_next_line() -> None:
    run = Run({"m": 2})
    first = run.populate(n=5).dispatched
    step = run.report(first[0])
    assert step.kinds() == ["RequestStarted", "RequestCompleted", "RequestClaimed"]
    assert step.lines() == [2]
    assert run.states[rid("b", 0)] == "completed"


def test_lines_back_to_pending_merge_into_line_order() -> None:
    run = Run({"m": 2})
    zero, one = run.populate(n=5).dispatched
    assert run.report(one).lines() == [2]
    assert run.report(zero, "not_sent").lines() == [0]  # before lines 3 and 4


def test_earliest_deadline_batch_takes_all_capacity() -> None:
    run = Run({"m": 4})
    busy = run.populate("x", 4).dispatched  # hold every slot while both batches arrive
    run.populate("late", 5, left=20 * HOUR)
    run.populate("soon", 5, left=2 * HOUR)
    step = run.finish(*busy)
    assert step.batches() == ["soon"] * 4  # no round-robin


def test_the_owner_with_fewer_requests_in_flight_goes_first() -> None:
    run = Run({"m": 3})
    mine = run.populate("big", 50, left=2 * HOUR).dispatched  # alice takes every slot
    run.populate("small", 5, left=20 * HOUR, owner="bob")
    step = run.report(mine[0])  # alice 2 in flight, bob 0
    assert step.batches() == ["small"]
    step = run.report(mine[1])  # alice 1, bob 1: the score ties, the deadline decides
    assert step.batches() == ["big"]


def test_second_terminal_report_is_dropped() -> None:
    run = Run({"m": 1})
    (item,) = run.populate(n=2).dispatched
    assert run.report(item).kinds() == ["RequestStarted", "RequestCompleted", "RequestClaimed"]
    for result in RESULTS:
        assert run.report(item, result, not_before=T0 + MIN).outs == []
    assert run.states[item.request_id] == "completed"


def test_reports_of_another_claim_are_fenced_out() -> None:
    run = Run({"m": 1})
    (item,) = run.populate(n=1).dispatched
    forged = msgspec.structs.replace(item, claim_id=ids.new_id())
    assert run.start(forged).outs == []
    assert run.report(forged).outs == []
    assert run.states[item.request_id] == "claimed"


def test_a_population_handled_twice_creates_nothing_even_after_its_rows_ended() -> None:
    run = Run({"m": 2})
    items = run.populate(n=2).dispatched
    first = run.sent["b"]
    assert run.send(first).outs == []  # the same command, handled again while running
    for item in items:
        run.report(item)
    assert run.live_keys() == []
    assert run.send(first).outs == []  # ... and after every row ended
    older = msgspec.structs.replace(first, source=SourceMark(0, 0, 5))
    assert run.send(older).outs == []
    assert run.tick().outs == []
    assert run.live_keys() == []


def test_a_population_re_sent_past_its_mark_while_live_adds_nothing() -> None:
    run = Run({"m": 1})
    run.populate(n=3)
    again = msgspec.structs.replace(run.sent["b"], source=SourceMark(0, 99, 0))
    step = run.send(again)
    assert step.events == [] and step.dispatched == []


def test_marks_of_each_commands_partition_are_independent() -> None:
    run = Run({"m": 10})
    run.populate("a", 1, mark=SourceMark(0, 50, 0))
    assert len(run.populate("b", 1, mark=SourceMark(1, 3, 0)).dispatched) == 1
    assert len(run.populate("c", 1, mark=SourceMark(1, 3, 1)).dispatched) == 1  # next output
    assert run.populate("d", 1, mark=SourceMark(1, 3, 1)).outs == []


def test_state_holds_live_work_only() -> None:
    run = Run({"m": 2})
    items = run.populate(n=3).dispatched
    assert run.live_keys() == sorted([f"B:{bid('b')}:m", *(f"R:{i.request_id}" for i in items)])
    nxt = run.report(items[0], "failed", status=400, error_type="NonRetriableHttpStatus")
    run.report(items[1], "retry", not_before=T0 + SEC)
    run.report(nxt.dispatched[0])
    (again,) = run.tick(T0 + 2 * SEC).dispatched
    run.report(again)
    assert run.live_keys() == []
    assert sorted(Counter(run.states.values()).items()) == [("completed", 2), ("failed", 1)]


_OPS = st.lists(
    st.tuples(
        st.booleans(),
        st.tuples(
            st.sampled_from("abcd"),
            st.sampled_from(["24h", "flex"]),
            st.sampled_from([60.0, 3600.0]),
        ),  # fmt: skip
        st.integers(0, 5),
        st.integers(0, 9),
    ),
    max_size=80,
)


@given(ops=_OPS, busy=st.sets(st.sampled_from("abcd")))
def test_the_ranked_pairs_read_in_order_by_owner_by_kind_and_for_idle_owners(
    ops: list[tuple[bool, tuple[str, str, float], int, int]], busy: set[str]
) -> None:
    # Batches (or flex rows) of several kinds added and dropped in any order, deadlines tied or
    # not: the run of the owners with nothing in flight is exactly their pairs in (deadline,
    # id) order, whatever the busy ones hold; so is each owner's and each kind's.
    ranked, held = _Ranked(), set[tuple[tuple[str, str, float], tuple[datetime, str]]]()
    for add, kind, minutes, n in ops:
        pair = (T0 + timedelta(minutes=minutes), f"id{n}")
        if add and all(p != pair for _, p in held):
            ranked.add(kind, *pair)
            held.add((kind, pair))
        elif not add and (kind, pair) in held:
            ranked.drop(kind, *pair)
            held.discard((kind, pair))
        counts = {b: 1 for b in busy}
        assert list(ranked.others(counts)) == sorted(p for k, p in held if k[0] not in busy)
        for owner in "abcde":
            assert list(ranked.owned(owner)) == sorted(p for k, p in held if k[0] == owner)
        kinds = {k for k, _ in held}
        assert ranked.by_kind == {k: sorted(p for j, p in held if j == k) for k in kinds}
        assert ranked.heads == sorted((*min(p for j, p in held if j == k), k) for k in kinds)


def test_batches_that_ended_leave_nothing_in_the_gates_indexes() -> None:
    run = Run({"m": 1})
    for n in range(300):
        (item,) = run.populate(f"b{n}", n=1, owner=f"o{n % 7}").dispatched
        run.report(item)
    index = run.gate.models["m"]
    assert run.live_keys() == [] and index.batches == {}
    assert index.ranked.heads == [] and index.ranked.by_kind == {} and index.ranked.kinds == {}
    # deadlines of batches gone are let go too, not kept until each deadline passes
    assert len(index.deadlines) <= 64


def test_a_never_claimed_backlog_costs_one_record() -> None:
    run = Run({"m": 2})
    step = run.populate(n=100_000, chunk=10_000)
    assert len(step.of(RequestsPending)) == 100
    assert max(len(o.value.events) for o in step.outs if isinstance(o.value, RequestTransitions)) <= 1000  # fmt: skip
    assert run.live_keys() == sorted([f"B:{bid('b')}:m", *(f"R:{rid('b', n)}" for n in (0, 1))])
    assert len(run.state[f"B:{bid('b')}:m"]) < 1_000  # ten chunk refs and one line range


def test_retry_waits_for_not_before_then_claims_the_next_attempt() -> None:
    run = Run({"m": 1})
    (item,) = run.populate(n=1).dispatched
    run.start(item)
    later = T0 + 5 * SEC
    step = run.report(item, "retry", not_before=later)
    (retry,) = step.of(RequestRetryScheduled)
    assert (retry.from_state, retry.attempt, retry.not_before) == ("processing", 1, later)
    assert run.tick(T0 + 4 * SEC).dispatched == []
    (again,) = run.tick(later).dispatched
    assert again.attempt == 1 and again.claim_id != item.claim_id
    assert run.report(item).outs == []  # the old claim is fenced out
    done = run.report(again).of(RequestCompleted)
    assert done[0].attempt == 1


def test_not_sent_returns_the_row_without_counting_an_attempt() -> None:
    run = Run({"m": 1})
    (item,) = run.populate(n=1).dispatched
    step = run.report(item, "not_sent")
    (back,) = step.of(RequestReclaimed)
    assert (back.reason, back.attempt, back.from_state) == ("not_sent", 0, "claimed")
    (again,) = step.dispatched  # claimable again at once
    assert again.attempt == 0 and again.claim_id != item.claim_id


@pytest.mark.parametrize("result", ["completed", "failed"])
def test_a_result_of_a_claim_never_reported_started_starts_then_ends_it(
    result: ExecutionResult,
) -> None:
    run = Run({"m": 1})
    (item,) = run.populate(n=1).dispatched
    step = run.report(item, result, status=500, error_type="NonRetriableHttpStatus")
    started, ended = step.events[0], step.events[1]
    assert isinstance(started, RequestStarted) and started.from_state == "claimed"
    assert started.worker_id == "ex-1"
    assert isinstance(ended, RequestCompleted | RequestFailed)
    assert ended.from_state == "processing"
    assert run.states[item.request_id] == result


def test_the_upstream_result_is_recorded() -> None:
    run = Run({"m": 2})
    ok, bad = run.populate(n=2).dispatched
    done = run.report(ok, status=201, size=42, routed_model="m-big").of(RequestCompleted)[0]
    assert (done.status, done.size, done.routed_model, done.claim_id) == (
        201,
        42,
        "m-big",
        ok.claim_id,
    )
    failed = run.report(bad, "failed", status=400, size=7, error_type="NonRetriableHttpStatus")
    (f,) = failed.of(RequestFailed)
    assert (f.error_type, f.status, f.size, f.attempt, f.claim_id) == (
        "NonRetriableHttpStatus",
        400,
        7,
        0,
        bad.claim_id,
    )


def test_cancel_cancels_unsent_rows_and_aborts_in_flight_ones() -> None:
    run = Run({"m": 2})
    sent = run.populate(n=5).dispatched
    run.report(sent[0], "retry", not_before=T0 + HOUR)  # line 0 waits; line 2 claimed
    in_flight = [run.claims[rid("b", n)] for n in (1, 2)]
    step = run.cancel()
    canceled = step.of(RequestCanceled)
    assert {e.request_id for e in canceled} == {rid("b", n) for n in (0, 3, 4)}
    assert {e.from_state for e in canceled} == {"pending"}
    assert {(a.request_id, a.claim_id) for a in step.aborts} == {
        (i.request_id, i.claim_id) for i in in_flight
    }
    assert step.dispatched == []
    assert run.tick(T0 + 2 * HOUR).dispatched == []
    assert run.cancel().outs == []  # re-cancel is a no-op


def _partitions(step: Step) -> dict[str, int | None]:
    return {
        item.claim_id: out.partition
        for out in step.outs
        if isinstance(out.value, DispatchBatch)
        for item in out.value.items
    }


def test_a_decision_re_made_after_a_crash_reaches_the_same_executors() -> None:
    """The gate publishes before its table is saved: a fresh gate re-makes a decision from the
    older table, and each claim must reach the executor that may be running it already (which
    answers instead of calling the upstream a second time)."""

    def second_decision(crash: bool) -> dict[str, int | None]:
        run = Run({"m": 20}, partitions=3)
        first = run.populate(n=60)
        if crash:
            run.restart()
        step = run.finish(*first.dispatched)
        return {d.request_id: _partitions(step)[d.claim_id] for d in step.dispatched}

    assert second_decision(crash=True) == second_decision(crash=False)


def test_claims_and_aborts_travel_together_and_a_large_batch_is_spread() -> None:
    run = Run({"m": 96}, partitions=3)
    step = run.populate(n=96)  # a decision claims at most claim_batch_size (100) rows
    where = _partitions(step)
    by_line = [where[d.claim_id] for d in sorted(step.dispatched, key=lambda d: run.row_of[d.request_id])]  # fmt: skip
    assert len(by_line) == 96
    # Runs of 16 consecutive lines share a partition, so a decision travels in few records...
    assert all(len(set(by_line[i : i + 16])) == 1 for i in range(0, 96, 16))
    # ...and a large batch is shared by executors.
    assert len(set(by_line)) > 1
    aborts = {
        out.value.claim_id: (out.topic, out.key, out.partition)
        for out in run.cancel().outs
        if isinstance(out.value, AbortDispatch)
    }
    assert aborts == {d.claim_id: ("dispatch", d.request_id, where[d.claim_id]) for d in step.dispatched}  # fmt: skip


def test_with_prefetch_claims_queue_in_the_models_lanes_beyond_its_limit() -> None:
    run = Run({"m": 4}, config=GateConfig(prefetch=1), partitions=3)
    step = run.populate(n=9)
    assert step.lines() == list(range(8))  # one running and one queued in each of 4 lanes
    assert [d.lane for d in step.dispatched] == [0, 1, 2, 3, 0, 1, 2, 3]
    where = _partitions(step)
    for lane in range(4):  # a lane's claims reach one executor, which runs them in turn
        assert len({where[d.claim_id] for d in step.dispatched if d.lane == lane}) == 1
    assert run.tick().dispatched == []  # full
    # A call that ends makes room in its lane, and the next claim goes there.
    assert [d.lane for d in run.report(step.dispatched[2]).dispatched] == [2]  # the last line
    run.report(step.dispatched[5])  # lane 1 holds one call now, and nothing is pending
    run.restart()  # a fresh gate counts the lanes from its table
    assert [d.lane for d in run.populate("c", n=3).dispatched] == [1]


@settings(max_examples=200)
@given(st.integers(1, 12), st.lists(st.floats(0, 1), min_size=1, max_size=300))
def test_a_claim_takes_the_emptiest_lane_whatever_came_before(limit: int, moves: list[float]) -> None:  # fmt: skip
    """The lane picked is the emptiest, the lowest of equals, over all ``limit`` lanes, while
    what the model keeps to pick it stays in proportion to the lanes in use."""
    model, running = _Model(), list[GateRequest]()
    for move in moves:
        if running and move < 0.45:
            model.leave("r", running.pop(int(move * 1000) % len(running)))
            continue
        counts = model.lanes + [0] * (limit - len(model.lanes))
        lane = model.pick_lane(limit)
        assert counts[lane] == min(counts) and counts.index(min(counts)) == lane
        entry = GateRequest(model="m", state="claimed", batch_id="b", line=0, lane=lane)
        model.join("r", entry)
        running.append(entry)
        assert len(model._counts) <= 2 * len(model.lanes) + 65


@given(st.sets(st.integers(0, 60), max_size=40), st.integers(0, 61))
def test_a_line_put_back_joins_the_ranges_it_touches(lines: set[int], line: int) -> None:
    ranges = _ranges(sorted(lines))
    assert _with_line(ranges, line) == _ranges(sorted(lines | {line}))


def test_without_prefetch_claims_have_no_lane() -> None:
    assert {d.lane for d in Run({"m": 4}).populate(n=10).dispatched} == {-1}


@pytest.mark.parametrize(
    ("result", "ends"),
    [
        ("completed", "completed"),
        ("failed", "failed"),
        ("retry", "canceled"),
        ("canceled", "canceled"),
        ("not_sent", "canceled"),
    ],
)
def test_after_cancel_a_genuine_late_result_counts_anything_else_cancels(
    result: ExecutionResult, ends: str
) -> None:
    run = Run({"m": 1})
    (item,) = run.populate(n=3).dispatched
    run.cancel()
    step = run.report(item, result, not_before=T0 + SEC, status=200, error_type="Timeout")
    assert run.states[item.request_id] == ends
    assert step.dispatched == []
    assert [run.states[rid("b", n)] for n in (1, 2)] == ["canceled", "canceled"]
    assert run.live_keys() == []


def test_a_stale_aborted_claim_ends_canceled() -> None:
    run = Run({"m": 1}, liveness=Liveness(claim_timeout=60 * SEC))
    (item,) = run.populate(n=1).dispatched
    run.cancel()
    step = run.tick(T0 + 2 * MIN)
    assert step.kinds() == ["RequestCanceled"]
    assert step.of(RequestCanceled)[0].request_id == item.request_id
    assert run.live_keys() == []


def test_unknown_model_fails_its_rows_with_a_clear_error() -> None:
    run = Run({"m": 1})
    step = run.populate(n=2, model="nope")
    failed = step.of(RequestFailed)
    assert [f.request_id for f in failed] == [rid("b", 0), rid("b", 1)]
    assert {f.error_type for f in failed} == {"RequestBuilderError"}
    assert all(f.error and "model 'nope' is not configured" in f.error for f in failed)
    assert step.dispatched == [] and run.live_keys() == []


def test_rebuild_restores_capacity_accounting_and_waiting_retries() -> None:
    run = Run({"m": 2})
    a, b = run.populate(n=5).dispatched
    run.start(a)
    run.report(b, "retry", not_before=T0 + 10 * SEC)  # line 2 claimed meanwhile
    run.restart()
    assert run.gate.in_flight("m") == 2
    assert run.tick(T0 + 5 * SEC).dispatched == []  # full
    step = run.report(a)  # the fresh gate accepts the old claim's report
    assert step.lines() == [3]
    assert run.report(run.claims[rid("b", 2)]).lines() == [4]
    assert run.finish(run.claims[rid("b", 3)], run.claims[rid("b", 4)]).dispatched == []
    assert run.tick(T0 + 10 * SEC).lines() == [1]  # once its not_before is reached


def test_rebuild_keeps_a_cancelled_batch_closed() -> None:
    run = Run({"m": 1})
    (item,) = run.populate(n=3).dispatched
    run.cancel()
    run.restart()
    assert run.report(item, "canceled").kinds() == ["RequestStarted", "RequestCanceled"]
    assert run.live_keys() == []


def test_a_coming_model_trickles_through_the_leaky_bucket_until_live() -> None:
    run = Run({"m": 10, "n": 10})
    run.model_state("coming")
    run.model_state("coming", "n")
    assert len(run.populate(n=20).dispatched) == 1  # one leak per (owner, class, model)
    assert len(run.populate("b2", 5, owner="bob").dispatched) == 1  # bob's own bucket
    assert len(run.populate("b3", 5, model="n").dispatched) == 1  # and model n's own
    run.restart()  # the buckets survive a rebalance
    # a 24 h window leaks once per 24 h / 60 = 24 min
    assert run.tick(T0 + 23 * MIN).dispatched == []
    assert len(run.tick(T0 + 25 * MIN).dispatched) == 2
    assert len(run.tick(T0 + 50 * MIN).dispatched) == 2
    assert len(run.model_state("live").dispatched) == 4  # capacity 10, six in flight


def test_a_spent_token_leaves_the_state_once_it_is_due_whichever_model_cycles() -> None:
    run = Run({"m": 10, "n": 10})
    run.model_state("coming", "n")
    assert len(run.populate("b", 3, model="n").dispatched) == 1  # a leak: n's bucket cools
    run.populate("b2", 5)  # model m is live: all five claimed at once, no token spent
    tokens = [k for k in run.state if k.startswith("K:")]
    assert len(tokens) == 1
    run.restart()  # the token survives a rebalance
    run.tick(T0 + 23 * MIN)
    assert [k for k in run.state if k.startswith("K:")] == tokens
    run.tick(T0 + 25 * MIN)  # model m's cycle: n's token came back and is let go
    assert [k for k in run.state if k.startswith("K:")] == []
    assert len(run.tick(T0 + 26 * MIN, model="n").dispatched) == 1  # n leaks again


def test_an_owner_name_holding_the_bucket_keys_separator_still_trickles() -> None:
    run = Run({"m": 10})
    run.model_state("coming")
    owner = "team\x1fa"  # names may hold any character but NUL
    assert len(run.populate(n=5, owner=owner).dispatched) == 1
    assert run.tick(T0 + 23 * MIN).dispatched == []  # its bucket cools for 24 min
    run.restart()
    assert len(run.tick(T0 + 25 * MIN).dispatched) == 1


def test_a_not_live_model_claims_at_full_capacity_within_the_ramp() -> None:
    """§3.5: a 24 h and a 1 h batch, each 50 min from its deadline, on a model not live."""
    run = Run({"m": 10})
    run.model_state("absent")
    # 50 min is inside ramp(24 h) = 58.7 min: full capacity
    assert len(run.populate("day", 5, left=50 * MIN).dispatched) == 5
    # ... but not inside ramp(1 h) = 9.9 min: one leaked row, then one per minute
    assert len(run.populate("hour", 20, left=50 * MIN, window=HOUR, label="1h").dispatched) == 1
    assert run.tick(T0 + 59 * SEC).dispatched == []
    assert len(run.tick(T0 + 60 * SEC).dispatched) == 1
    assert len(run.tick(T0 + 41 * MIN).dispatched) == 3  # within its ramp: up to capacity


def test_a_claim_never_started_is_reclaimed_after_the_claim_timeout_as_an_attempt() -> None:
    run = Run({"m": 1}, liveness=Liveness(claim_timeout=60 * SEC))
    (item,) = run.populate(n=1).dispatched
    assert run.tick(T0 + 59 * SEC).outs == []
    step = run.tick(T0 + 61 * SEC)
    (back,) = step.of(RequestReclaimed)
    assert (back.reason, back.attempt, back.from_state) == ("claim_timeout", 1, "claimed")
    (again,) = step.dispatched
    assert again.attempt == 1 and again.claim_id != item.claim_id
    assert run.report(item).outs == []  # the first executor's late report is fenced out


def test_a_stopped_executors_calls_are_reclaimed_at_once() -> None:
    run = Run({"m": 2})
    sent = run.populate(n=4).dispatched
    run.start(*sent)
    run.stop()
    step = run.tick(T0 + SEC)
    assert {e.reason for e in step.of(RequestReclaimed)} == {"worker_dead"}
    assert {e.from_state for e in step.of(RequestReclaimed)} == {"processing"}
    assert step.lines() == [0, 1]  # lines back first, as new attempts
    assert {d.attempt for d in step.dispatched} == {1}


@pytest.mark.parametrize(
    ("liveness", "heartbeats", "reason"),
    [
        (Liveness(processing_timeout=600 * SEC, stale_worker=HOUR), True, "processing_timeout"),
        (Liveness(processing_timeout=HOUR, stale_worker=30 * SEC), False, "worker_stale"),
    ],
)
def test_processing_claims_are_reclaimed_when_stale(
    liveness: Liveness, heartbeats: bool, reason: str
) -> None:
    run = Run({"m": 1}, liveness=liveness)
    (item,) = run.populate(n=1).dispatched
    run.start(item)
    for second in range(0, 700, 20):
        run.now = T0 + second * SEC
        if heartbeats:
            run.heartbeat()
        step = run.tick()
        if step.events:
            break
    (back,) = step.of(RequestReclaimed)
    assert back.reason == reason
    limit = liveness.processing_timeout if heartbeats else liveness.stale_worker
    assert limit < run.now - T0 <= limit + 20 * SEC


def test_a_call_quiet_for_a_claim_timeout_is_dispatched_again_as_it_was() -> None:
    """Its executor answers a claim it ended from memory (a report lost on the way ends the
    row now, not at the processing timeout) and ignores one it still runs."""
    run = Run({"m": 2}, liveness=Liveness(claim_timeout=20 * SEC, stale_worker=HOUR, processing_timeout=HOUR), partitions=3)  # fmt: skip
    first, second = run.populate(n=2).dispatched
    run.start(first, second)
    where = _partitions(run.tick(T0 + 15 * SEC))
    assert where == {}  # not quiet long enough
    again = run.tick(T0 + 25 * SEC)
    items = sorted((i for r in again.records for i in r.items), key=lambda i: i.claim_id)
    assert items == sorted(
        [first, second], key=lambda i: i.claim_id
    )  # as dispatched, claim time and all
    assert _partitions(again) == {first.claim_id: run.gate._request(first.request_id).partition, second.claim_id: run.gate._request(second.request_id).partition}  # type: ignore[union-attr]  # fmt: skip
    assert again.events == []  # nothing changes in the lifecycle
    assert run.tick(T0 + 35 * SEC).records == []  # asked once a claim timeout
    run.report(first)  # the answer comes
    assert [d.claim_id for r in run.tick(T0 + 50 * SEC).records for d in r.items] == [second.claim_id]  # fmt: skip
    assert run.states[first.request_id] == "completed"


def test_a_claim_not_started_is_taken_back_not_dispatched_again() -> None:
    run = Run({"m": 1}, liveness=Liveness(claim_timeout=20 * SEC, stale_worker=HOUR))
    (item,) = run.populate(n=1).dispatched
    step = run.tick(T0 + 25 * SEC)
    assert [type(e).__name__ for e in step.events] == ["RequestReclaimed", "RequestClaimed"]
    assert [d.claim_id for d in step.dispatched] != [item.claim_id]


def test_an_old_heartbeat_read_late_does_not_make_a_live_worker_stale() -> None:
    """A gate taking a partition over reads that partition's backlog: its heartbeats are
    older than the ones the gate has had from the same worker on its other partitions."""
    run = Run({"m": 1}, liveness=Liveness(stale_worker=6 * SEC, processing_timeout=HOUR))
    (item,) = run.populate(n=1).dispatched
    run.start(item)
    run.now = T0 + 20 * SEC
    run.heartbeat()
    backlog = T0 + 5 * SEC
    run.send(WorkerHeartbeat(event_id=ids.new_id(), occurred_at=backlog, worker_id="ex-1", role="executor"))  # fmt: skip
    run.send(ExecutionReport(event_id=ids.new_id(), occurred_at=backlog, worker_id="ex-1", model="m"))  # fmt: skip
    assert run.tick().of(RequestReclaimed) == []


def test_a_chain_said_again_with_each_heartbeat_is_not_taken_back_for_running_long() -> None:
    """A chain worker holds a claimed head for the whole chain and says so with every
    heartbeat: the gate took it back every processing timeout (an attempt, an abort, a
    re-dispatch each ten minutes); once the saying stops, the timeout applies again."""
    # claim timeout an hour: the record is rewritten every half processing timeout
    patient = Liveness(claim_timeout=HOUR, processing_timeout=600 * SEC, stale_worker=HOUR)
    run = Run({"m": 1}, liveness=patient)
    (item,) = run.populate(n=1).dispatched
    run.start(item, worker="ex-1")  # the executor starts it, then hands it to the chain
    key, writes = f"R:{item.request_id}", 0
    for second in range(0, 1280, 20):  # the last word, at 1260 s, is kept in memory only
        run.now = T0 + second * SEC
        if second == 700:
            run.restart()  # a rebalance: the new gate counts from the record meanwhile
        run.heartbeat(worker="chains:w1")
        record = run.state[key]
        run.start(item, worker="chains:w1")  # holding(): the claim said again
        writes += run.state[key] != record
        step = run.tick()
        assert step.of(RequestReclaimed) == [] and step.records == [], second  # nor asked again
    # its record is rewritten every half processing timeout, not at each of 64 heartbeats
    assert writes == 4
    said_last = run.now
    for second in range(20, 700, 20):  # the worker lives on, but holds it no longer
        run.now = said_last + second * SEC
        run.heartbeat(worker="chains:w1")
        if back := run.tick().of(RequestReclaimed):
            break
    assert [b.reason for b in back] == ["processing_timeout"]
    assert 600 * SEC < run.now - said_last <= 620 * SEC


def test_a_gate_rebuilt_while_a_chain_is_held_neither_asks_it_again_nor_takes_it_back() -> None:
    """The default timeouts, a heartbeat every 5 s: what the rebuilt gate reads from the record
    is recent enough that the quiet check (a claim timeout) does not fire."""
    run = Run({"m": 1}, liveness=Liveness())
    (item,) = run.populate(n=1).dispatched
    run.start(item, worker="ex-1")
    for second in range(5, 295, 5):
        run.now = T0 + second * SEC
        run.heartbeat(worker="chains:w1")
        run.start(item, worker="chains:w1")
        assert run.tick().records == [], second
    run.restart()  # the held chain's last word (290 s) was not written to its record
    for second in (300, 320, 340):
        run.now = T0 + second * SEC
        run.heartbeat(worker="chains:w1")
        step = run.tick()
        assert step.of(RequestReclaimed) == [] and step.records == [], second


def test_reclaim_gives_up_after_max_retries() -> None:
    run = Run({"m": 1}, liveness=Liveness(claim_timeout=60 * SEC, max_retries=1))
    run.populate(n=1)
    assert run.tick(T0 + 2 * MIN).of(RequestReclaimed)[0].attempt == 1
    (failed,) = run.tick(T0 + 4 * MIN).of(RequestFailed)
    assert (failed.error_type, failed.attempt, failed.from_state) == (
        "TaskTerminated",
        1,
        "claimed",
    )
    assert run.live_keys() == []


def test_a_batch_past_its_deadline_fails_its_unsent_rows() -> None:
    run = Run({"m": 1})
    (item,) = run.populate(n=3, left=30 * SEC).dispatched
    step = run.tick(T0 + 31 * SEC)
    failed = step.of(RequestFailed)
    assert [f.request_id for f in failed] == [rid("b", 1), rid("b", 2)]
    assert {f.error_type for f in failed} == {"BatchTerminated"}
    assert {f.from_state for f in failed} == {"pending"}
    assert all(f.error and parse(f.error) == BatchTerminated() for f in failed)
    (abort,) = step.aborts
    assert abort.claim_id == item.claim_id
    assert step.dispatched == []


def test_a_running_claim_is_not_taken_back_by_another_executors_hand_back() -> None:
    run = Run({"m": 2})
    started, claimed = run.populate(n=3, left=30 * SEC).dispatched
    run.start(started)
    run.tick(T0 + 31 * SEC)
    (f,) = run.report(claimed, "not_sent").of(RequestFailed)  # unsent, and the batch expired
    assert f.error_type == "BatchTerminated"
    # The running claim's dispatch re-read by an executor that took its partition over: the
    # run goes on, and its own report ends the row.
    handed_back = run.report(started, "not_sent")
    assert handed_back.of(RequestFailed) == [] and handed_back.dispatched == []
    (f,) = run.report(started, "completed", status=200).of(RequestFailed)
    assert f.error_type == "BatchTerminated"
    assert run.live_keys() == []


@pytest.mark.parametrize("result", ["completed", "failed", "retry", "canceled"])
def test_expired_in_flight_work_ends_batch_terminated_whatever_it_reports(
    result: ExecutionResult,
) -> None:
    run = Run({"m": 2})
    started, claimed = run.populate(n=3, left=30 * SEC).dispatched
    run.start(started)
    run.tick(T0 + 31 * SEC)
    for item in (started, claimed):
        step = run.report(item, result, not_before=T0 + HOUR, status=200, error_type="Timeout")
        (f,) = step.of(RequestFailed)
        assert f.error_type == "BatchTerminated" and f.error == BatchTerminated().to_json()
    assert Counter(run.states.values()) == {"failed": 3}
    assert run.live_keys() == []


def test_an_overdue_batch_is_failed_not_claimed() -> None:
    run = Run({"m": 2})
    run.model_state("coming")
    step = run.populate(n=2, left=-SEC)
    assert step.dispatched == []
    assert step.kinds() == ["RequestFailed", "RequestFailed"]


def test_dispatch_carries_body_refs_and_batch_headers() -> None:
    run = Run({"m": 4}, partitions=2)
    headers = {"x-fusillade-batch-id": "b", "x-fusillade-batch-created-by": "alice"}
    step = run.populate(n=7, chunk=3, headers=headers)
    assert [d.body for d in step.dispatched] == [
        BodyRef(4, 100, 0),
        BodyRef(4, 100, 1),
        BodyRef(4, 100, 2),
        BodyRef(4, 103, 0),
    ]
    assert {d.path for d in step.dispatched} == {"/v1/chat/completions"}
    assert {d.deadline for d in step.dispatched} == {T0 + 24 * HOUR}
    assert len(step.records) == 1  # one decision, one executor
    for record in step.records:
        assert record.batch_headers == {bid("b"): headers}
    # a batch without header values sends none
    assert Run().populate(n=1).records[0].batch_headers == {}


# -- the whole lifecycle, under random interleavings -----------------------------------------

MODELS = ["m", "n", "unknown"]
ACTIONS = st.one_of(
    st.tuples(
        st.just("populate"),
        st.integers(0, 4),
        st.integers(1, 6),
        st.integers(0, 3),
        st.sampled_from(["m", "m", "n", "unknown"]),
    ),
    st.tuples(st.just("report"), st.integers(0, 63), st.sampled_from(RESULTS)),
    st.tuples(st.just("report"), st.integers(0, 63), st.just("completed")),
    st.tuples(st.just("start"), st.integers(0, 63)),
    st.tuples(st.just("cancel"), st.integers(0, 4)),
    st.tuples(st.just("tick"), st.integers(0, 90), st.sampled_from(MODELS[:2])),
    st.tuples(st.just("worker"), st.sampled_from(["heartbeat", "stop"])),
    st.tuples(st.just("filter"), st.sampled_from(["live", "coming"]), st.sampled_from(MODELS[:2])),
    st.tuples(st.just("restart")),
)
LEFT = [20 * SEC, 10 * MIN, HOUR, 24 * HOUR]


def play(run: Run, actions: Iterable[tuple[Any, ...]]) -> None:
    workers = itertools.cycle(["ex-1", "ex-2"])
    for action in actions:
        kind, *args = action
        known = sorted(run.claims.values(), key=lambda d: d.claim_id)
        if kind == "populate":
            name = f"b{args[0]}"
            if name in run.sent:
                run.send(run.sent[name])  # handled twice
            else:
                owner = f"u{args[0] % 2}"
                run.populate(name, args[1], owner=owner, left=LEFT[args[2]], model=args[3])
        elif kind in ("report", "start") and known:
            item = known[args[0] % len(known)]
            if kind == "start":
                run.start(item, worker=next(workers))
            else:
                run.report(item, args[1], worker=next(workers), not_before=run.now + 3 * SEC)
        elif kind == "cancel":
            name = f"b{args[0]}"
            run.cancel(name, run.sent[name].model if name in run.sent else "m")
        elif kind == "tick":
            run.tick(run.now + args[0] * SEC, args[1])
        elif kind == "worker":
            worker = next(workers)
            run.heartbeat(worker) if args[0] == "heartbeat" else run.stop(worker)
        elif kind == "filter":
            run.model_state(args[0], args[1])
        elif kind == "restart":
            run.restart()


@pytest.mark.parametrize("prefetch", [0, 1])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ACTIONS, max_size=60))
def test_random_interleavings_keep_the_lifecycle_legal(
    prefetch: int, actions: list[tuple[Any, ...]]
) -> None:
    run = Run(
        {"m": 3, "n": 1},
        liveness=Liveness(claim_timeout=60 * SEC, max_retries=3),
        config=GateConfig(prefetch=prefetch),
    )
    play(run, actions)  # Run checks legality, from_state, capacity and single endings
    # Past every deadline, whatever is still running is aborted; reports then end it.
    for model in ("m", "n"):
        run.tick(run.now + 2 * 24 * HOUR, model)
    for item in list(run.claims.values()):
        run.report(item)
    assert set(run.states.values()) <= TERMINAL
    assert set(run.ends) == set(run.states) and set(run.ends.values()) <= {1}
    assert run.live_keys() == []
