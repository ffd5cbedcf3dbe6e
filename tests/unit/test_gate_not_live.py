"""A not-live model's claim cycle, driven through ``Gate.handle``: it reads each kind's rows
within their ramp and the first past it (``scoring.select_paced``), never every row, and takes
exactly what the ranking rules stated over every claimable unit take (``ranking_oracle``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import ids
from schemas.events import (
    BatchFacts,
    ChunkRef,
    DispatchItem,
    ExecutionReport,
    FinishedItem,
    GateTick,
    LineRange,
    ModelFilterAppended,
    ModelState,
    PendingRequests,
    SourceMark,
)
from streams.gate import scoring
from streams.gate.core import Gate, Liveness, _Model, _units
from streams.gate.scoring import GateConfig, Take, Unit
from tests.unit import ranking_oracle as oracle
from tests.unit.test_gate_flex import dispatched, submitted

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)
PATIENT = Liveness(claim_timeout=timedelta(days=9), processing_timeout=timedelta(days=9))


class Checked:
    """A gate whose every not-live cycle is checked against the ranking rules stated over
    all of the model's claimable units, gathered the slow way."""

    def __init__(self, limit: int, config: GateConfig) -> None:
        self.gate = Gate({}, {"m": limit}, "gate", config=config, liveness=PATIENT)
        self.marks = iter(range(1, 1_000_000))  # of commands partition 1: flex rows are on 0
        self.in_flight: list[DispatchItem] = []

    def select_paced(
        self,
        capacity: int,
        ramping: Iterable[Iterator[Unit]],
        waiting: Iterable[Unit],
        counts: dict[str, int],
        cooldown: AbstractSet[tuple[str, str]],
        now: datetime,
        config: GateConfig,
    ) -> list[Take]:
        index: _Model = self.gate.models["m"]
        every = [
            *_units(index, (p for pairs in index.ranked.by_kind.values() for p in pairs)),
            *self.gate._loose_units(
                index, (p for pairs in index.loose_ranked.by_kind.values() for p in pairs), []
            ),
        ]  # fmt: skip
        expected = oracle.select(capacity, every, counts, False, set(cooldown), now, config)
        got = PACED(capacity, ramping, waiting, counts, cooldown, now, config)
        assert got == expected
        return got

    def send(self, message: Any, now: datetime) -> None:
        self.in_flight += dispatched(self.gate.handle(message, now))

    def batch(self, name: str, owner: str, shape: tuple[str, float], left: int, n: int, now: datetime, ranges: list[LineRange] | None = None) -> None:  # fmt: skip
        label, window_s = shape
        deadline = now + left * MIN
        facts = BatchFacts(
            batch_id=ids.derived("paced-batch", name), file_id=ids.derived("paced-file", name),
            owner=owner, created_at=deadline - timedelta(seconds=window_s), deadline=deadline,
            window_class=label, window_s=window_s, path="/v1/chat/completions",
        )  # fmt: skip
        self.send(
            PendingRequests(
                event_id=ids.new_id(),
                occurred_at=now,
                source=SourceMark(1, next(self.marks), 0),
                batch=facts,
                model="m",
                ranges=ranges or [LineRange(0, n)],
                chunks=[ChunkRef(first_line=0, count=n, partition=0, offset=1)],
            ),  # fmt: skip
            now,
        )

    def flex(self, name: str, owner: str, tier: str | None, age: int, now: datetime) -> None:
        window = timedelta(seconds=self.gate.config.window_for_tier(tier))
        row = ids.derived("paced-row", name)
        self.send(submitted(row, owner, at=now - age * MIN, tier=tier, window=window), now)

    def finish(self, count: int, now: datetime) -> None:
        done, self.in_flight = self.in_flight[:count], self.in_flight[count:]
        if done:
            finished = [FinishedItem(request_id=i.request_id, claim_id=i.claim_id, result="completed", status=200) for i in done]  # fmt: skip
            self.send(ExecutionReport(event_id=ids.new_id(), occurred_at=now, worker_id="ex-1", model="m", finished=finished), now)  # fmt: skip


PACED = scoring.select_paced
OWNERS = st.sampled_from(["a", "b", "c"])
_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("batch"),
            OWNERS,
            st.sampled_from([("24h", 86400.0), ("1h", 3600.0)]),
            st.integers(1, 1440),
            st.integers(1, 4),
        ),  # fmt: skip
        st.tuples(st.just("flex"), OWNERS, st.sampled_from(["flex", None]), st.integers(0, 90)),
        st.tuples(st.just("tick"), st.integers(0, 40)),
        st.tuples(st.just("finish"), st.integers(1, 5)),
        st.tuples(st.just("state"), st.sampled_from(["coming", "live", "absent"])),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=_ops,
    limit=st.integers(1, 30),
    urgency=st.sampled_from([0.0, 0.5, 1.0]),
    leaks=st.sampled_from([60.0, 6.0]),
)
def test_a_not_live_cycle_takes_what_ranking_every_unit_takes(
    ops: list[tuple[Any, ...]], limit: int, urgency: float, leaks: float
) -> None:
    config = GateConfig(urgency_weight=urgency, leaks_per_window=leaks, prefetch=0)
    run = Checked(limit, config)
    now = T0
    run.send(ModelFilterAppended(event_id=ids.new_id(), occurred_at=now, model="m", state="coming"), now)  # fmt: skip
    with mock.patch.object(scoring, "select_paced", run.select_paced):
        for n, op in enumerate(ops):
            match op:
                case ("batch", owner, shape, left, rows):
                    run.batch(f"b{n}", owner, shape, left, rows, now)
                case ("flex", owner, tier, age):
                    run.flex(f"f{n}", owner, tier, age, now)
                case ("tick", minutes):
                    now += minutes * MIN
                    run.send(GateTick(event_id=ids.new_id(), occurred_at=now, model="m"), now)
                case ("finish", count):
                    run.finish(count, now)
                case ("state", state):
                    event = ModelFilterAppended(event_id=ids.new_id(), occurred_at=now, model="m", state=state)  # fmt: skip
                    run.send(event, now)


def test_a_backlog_on_a_not_live_model_is_read_per_kind_not_per_row() -> None:
    # 2,000 flex rows of one owner on a model scaled to zero: each submission's cycle reads the
    # kind's first row (its bucket cooling after the first leak), not the whole backlog.
    run = Checked(8, GateConfig(prefetch=0))
    state: ModelState = "coming"
    run.send(ModelFilterAppended(event_id=ids.new_id(), occurred_at=T0, model="m", state=state), T0)  # fmt: skip
    read: list[str] = []
    loose_units = run.gate._loose_units

    def counted(index: _Model, rows: Iterable[tuple[datetime, str]], moved_on: list[str]) -> Iterator[Unit]:  # fmt: skip
        for unit in loose_units(index, rows, moved_on):
            read.append(unit.id)
            yield unit

    with mock.patch.object(run.gate, "_loose_units", counted):
        for n in range(2_000):
            run.flex(f"f{n}", "a", "flex", 0, T0)
    assert len(run.in_flight) == 1  # one leak, the bucket then cools for a minute
    assert len(read) <= 2 * 2_000


def test_a_batch_with_nothing_claimable_does_not_hide_the_next_of_its_kind() -> None:
    # The first batch's ranges end in an empty one: once its two lines are claimed it holds
    # no claimable row, yet its range list is not empty. On a model that then stops being
    # live, the same owner's later batch of the same window must still trickle.
    run = Checked(19, GateConfig(prefetch=0))
    run.batch("first", "bob", ("24h", 86400.0), 94, 2, T0, [LineRange(0, 2), LineRange(4, 4)])
    assert len(run.in_flight) == 2
    leaving = ModelFilterAppended(event_id=ids.new_id(), occurred_at=T0, model="m", state="leaving")  # fmt: skip
    run.send(leaving, T0)
    run.batch("later", "bob", ("24h", 86400.0), 1041, 3, T0)
    with mock.patch.object(scoring, "select_paced", run.select_paced):
        run.send(GateTick(event_id=ids.new_id(), occurred_at=T0, model="m"), T0)
    assert [i.batch_id for i in run.in_flight[2:]] == [ids.derived("paced-batch", "later")]
