"""The gate killed at any moment, as Kafka and Faust replay it (no Kafka here).

The agent publishes a decision's events, then sends the table's changelog records; Faust
commits the input offset after both went. A gate killed between two inputs is replaced by one
whose table is the changelog as far as it landed (any input boundary at or after the commit:
records of one input go in one batch) and which reads its inputs again from the commit. The
executor answers a claim it ran already with how it ended; the projector applies an event only
from the state the event says it leaves.

Whatever the kill points, every row must end once, the read model must agree, and the table
must hold nothing afterwards: a row that stays ``claimed`` for good is the failure this
guards against."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import ids
from schemas.events import (
    AbortDispatch,
    BatchFacts,
    ChunkRef,
    DispatchBatch,
    DispatchItem,
    ExecutionReport,
    ExecutionResult,
    FinishedItem,
    GateInput,
    GateTick,
    LineRange,
    PendingRequests,
    RequestsPending,
    RequestTransition,
    RequestTransitions,
    SourceMark,
    StartedItem,
    State,
    WorkerHeartbeat,
)
from streams.gate.core import Gate, Liveness
from streams.gate.scoring import GateConfig
from streams.lifecycle import TERMINAL, next_state
from streams.tables import WriteBehind

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
LIVENESS = Liveness(
    claim_timeout=20 * SEC, processing_timeout=600 * SEC, stale_worker=6 * SEC, max_retries=3
)
EXECUTOR = "ex-1"


class Changelog(dict[str, bytes]):
    """The table's store: every write is also a changelog record, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, bytes | None]] = []

    def __setitem__(self, key: str, value: bytes) -> None:
        super().__setitem__(key, value)
        self.records.append((key, value))

    def pop(self, key: str, default: Any = None) -> Any:
        self.records.append((key, None))
        return super().pop(key, default)


def recovered(records: list[tuple[str, bytes | None]]) -> Changelog:
    table = Changelog()
    for key, value in records:
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return table


@dataclass
class World:
    """One model's gate partition, its executor and the read model of its rows."""

    lines: int
    limit: int
    inputs: list[GateInput] = field(default_factory=list)  # the gate topic, in order
    position: int = 0  # the next input the gate reads
    committed: int = 0  # the input offset Faust committed
    now: datetime = T0
    read_model: dict[str, State] = field(default_factory=dict)
    outcomes: dict[str, FinishedItem] = field(default_factory=dict)  # the executor's memory
    dispatched: list[DispatchItem] = field(default_factory=list)  # not yet run
    aborted: set[str] = field(default_factory=set)
    endings: dict[str, set[str]] = field(default_factory=dict)  # request -> terminal event ids
    kills: int = 0

    def __post_init__(self) -> None:
        self.table = Changelog()
        # Changelog length after each input handled: where a kill may cut it.
        self.landed: dict[int, int] = {0: 0}
        self.gate = self._new_gate()
        deadline = T0 + timedelta(hours=24)
        facts = BatchFacts(
            batch_id=ids.derived("test-batch", "crash"), file_id=ids.derived("test-file", "crash"),
            owner="alice", created_at=T0, deadline=deadline, window_class="24h",
            window_s=86400.0, path="/v1/chat/completions", headers={},
        )  # fmt: skip
        self.inputs.append(PendingRequests(
            event_id=ids.new_id(), occurred_at=T0, source=SourceMark(0, 1, 0), batch=facts,
            model="m", ranges=[LineRange(0, self.lines)],
            chunks=[ChunkRef(first_line=0, count=self.lines, partition=0, offset=0)],
        ))  # fmt: skip

    def _new_gate(self) -> Gate:
        gate = Gate(
            WriteBehind(self.table), {"m": self.limit}, f"gate-{self.kills}",
            config=GateConfig(prefetch=1), liveness=LIVENESS, dispatch_partitions=3,
        )  # fmt: skip
        gate.rebuild()
        return gate

    # -- the gate agent -----------------------------------------------------------------------

    def handle_next(self) -> None:
        message = self.inputs[self.position]
        state = self.gate.state
        assert isinstance(state, WriteBehind)
        for out in self.gate.handle(message, self.now):
            self._publish(out.value)
        state.flush()
        self.position += 1
        self.landed[self.position] = len(self.table.records)

    def commit(self) -> None:
        self.committed = self.position

    def kill(self, cut: int) -> None:
        """Killed after input ``position``: the changelog landed up to the end of some input
        between the commit and now; the new gate reads from the commit."""
        upto = self.committed + cut % (self.position - self.committed + 1)
        self.kills += 1
        self.table = recovered(self.table.records[: self.landed[upto]])
        # What landed stays landed: a later kill cuts after it.
        self.position = self.committed
        self.landed = {self.committed: len(self.table.records)}
        self.gate = self._new_gate()

    def _publish(self, value: Any) -> None:
        if isinstance(value, RequestTransitions):
            for event in value.events:
                if isinstance(event, RequestsPending):
                    for item in event.items:
                        self.read_model.setdefault(item.request_id, "pending")
                    continue
                assert isinstance(event, RequestTransition)  # batch rows only here
                if next_state(event.from_state, event) in TERMINAL:
                    self.endings.setdefault(event.request_id, set()).add(event.event_id)
                current = self.read_model.get(event.request_id)
                # The projector: an event applies only from the state it says it leaves.
                if current == event.from_state and (after := next_state(current, event)):
                    self.read_model[event.request_id] = after
        elif isinstance(value, DispatchBatch):
            self.dispatched += value.items
        elif isinstance(value, AbortDispatch):
            self.aborted.add(value.claim_id)

    # -- the executor and the clock ------------------------------------------------------------

    def run_dispatched(self, how_many: int) -> None:
        """The executor runs (or answers) the oldest dispatches; one report for them all."""
        taken, self.dispatched = self.dispatched[:how_many], self.dispatched[how_many:]
        started, finished = [], []
        for item in taken:
            done = self.outcomes.get(item.claim_id)
            if done is None:
                result: ExecutionResult = (
                    "canceled" if item.claim_id in self.aborted else "completed"
                )
                started.append(StartedItem(item.request_id, item.claim_id))
                done = FinishedItem(
                    request_id=item.request_id, claim_id=item.claim_id, result=result, status=200
                )
                self.outcomes[item.claim_id] = done
            finished.append(done)
        if taken:
            self.inputs.append(ExecutionReport(
                event_id=ids.new_id(), occurred_at=self.now, worker_id=EXECUTOR, model="m",
                started=started, finished=finished,
            ))  # fmt: skip

    def tick(self, seconds: float) -> None:
        self.now += seconds * SEC
        self.inputs.append(GateTick(event_id=ids.new_id(), occurred_at=self.now, model="m"))
        self.inputs.append(WorkerHeartbeat(
            event_id=ids.new_id(), occurred_at=self.now, worker_id=EXECUTOR, role="executor",
        ))  # fmt: skip

    def catch_up(self) -> Iterator[None]:
        while self.position < len(self.inputs):
            self.handle_next()
            yield


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("handle"), st.integers(1, 8)),
        st.tuples(st.just("run"), st.integers(1, 8)),
        st.tuples(st.just("tick"), st.integers(0, 30)),
        st.tuples(st.just("commit"), st.just(0)),
        st.tuples(st.just("kill"), st.integers(0, 50)),
    ),
    min_size=10,
    max_size=120,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 12), st.integers(1, 4), ACTIONS)
def test_a_gate_killed_anywhere_still_ends_every_row_once(
    lines: int, limit: int, actions: list[tuple[str, int]]
) -> None:
    world = World(lines, limit)
    for kind, n in actions:
        if kind == "handle":
            for _ in range(n):
                if world.position < len(world.inputs):
                    world.handle_next()
        elif kind == "run":
            world.run_dispatched(n)
        elif kind == "tick":
            world.tick(n)
        elif kind == "commit":
            world.commit()
        elif kind == "kill" and world.position > world.committed:
            world.kill(n)
    # Then no more faults: time goes on and everything is delivered until nothing moves.
    for _ in range(200):
        for _ in world.catch_up():
            pass
        if world.dispatched:
            world.run_dispatched(len(world.dispatched))
        elif all(s in TERMINAL for s in world.read_model.values()) and world.read_model:
            break
        else:
            world.tick(7)
    stuck = {r: s for r, s in world.read_model.items() if s not in TERMINAL}
    assert len(world.read_model) == lines
    assert not stuck, f"rows never ended in the read model: {stuck}"
    # A decision made again after a kill publishes the same ending again, never another one.
    assert {r: len(e) for r, e in world.endings.items()} == dict.fromkeys(world.read_model, 1)
    assert [k for k in world.table if k[:2] in ("R:", "B:")] == []
