"""The claim gate's ranking rules (core.md §3) against the spec's numbers and worked examples."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.gate.scoring import (
    GateConfig,
    Take,
    Unit,
    is_live,
    next_token_at,
    ramp_seconds,
    score,
    select_live,
    select_paced,
    window_class_for_batchless,
    within_ramp,
)
from tests.unit.ranking_oracle import select

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
MIN = timedelta(minutes=1)
H = timedelta(hours=1)
CONFIG = GateConfig()
EXP = CONFIG.claim_ramp_exponent


def batch(
    batch_id: str,
    owner: str,
    rows: int = 5,
    *,
    left: timedelta = 20 * H,
    window: timedelta = 24 * H,
    label: str = "24h",
) -> Unit:
    """A batch ``left`` from its deadline with ``rows`` claimable rows."""
    return Unit(
        id=batch_id,
        batch=True,
        owner=owner,
        deadline=NOW + left,
        window_s=window.total_seconds(),
        window_class=label,
        available=rows,
    )


def flex(request_id: str, owner: str, *, age: timedelta = 5 * MIN, tier: str | None = "flex") -> Unit:  # fmt: skip
    """A batchless row created ``age`` ago: D = created_at + W of its tier (§3.2)."""
    window = CONFIG.window_for_tier(tier)
    return Unit(
        id=request_id,
        batch=False,
        owner=owner,
        deadline=NOW - age + timedelta(seconds=window),
        window_s=window,
        window_class=window_class_for_batchless(tier),
    )


def run(
    units: Iterable[Unit],
    capacity: int = 10,
    counts: Mapping[str, int] | None = None,
    *,
    live: bool = True,
    cool: set[tuple[str, str]] | None = None,
    config: GateConfig = CONFIG,
    now: datetime = NOW,
) -> list[Take]:
    """What the gate takes of ``units``: its own read of them, grouped as it keeps them
    (``select_live`` or ``select_paced``), checked against the rules stated over every unit."""
    units, counts, cool = list(units), counts or {}, cool or set()
    expected = select(capacity, units, counts, live, cool, now, config)
    if live:
        got = select_live(capacity, runs(units, lambda u: u.owner), counts, now, config)
    else:
        ramping, waiting = paced(units, now, config.claim_ramp_exponent)
        got = select_paced(capacity, ramping, waiting, counts, cool, now, config)
    assert got == expected
    return got


def rows(takes: list[Take]) -> list[str]:
    """The claimed rows, one entry per row: the unit id repeated ``count`` times."""
    return [t.unit.id for t in takes for _ in range(t.count)]


# -- configuration ---------------------------------------------------------------------------


def test_config_defaults_follow_the_spec() -> None:
    assert CONFIG.urgency_weight == 0.0
    assert CONFIG.claim_ramp_exponent == 0.56
    assert CONFIG.leaks_per_window == 60
    assert CONFIG.service_tier_completion_windows_s == {"flex": 3600}
    assert CONFIG.default_completion_window_s == 86400
    assert CONFIG.claim_batch_size == 100
    other = GateConfig()  # the mutable default is not shared
    other.service_tier_completion_windows_s["priority"] = 0
    assert "priority" not in GateConfig().service_tier_completion_windows_s


def test_config_decodes_and_validates() -> None:
    decoded = msgspec.json.decode(b'{"urgency_weight": 0.3}', type=GateConfig)
    assert decoded.urgency_weight == 0.3 and decoded.leaks_per_window == 60
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"urgency_weight": 1.5}', type=GateConfig)
    for bad in (
        {"leaks_per_window": -1},
        {"claim_batch_size": -1},
        {"default_completion_window_s": -1},
        {"claim_ramp_exponent": float("nan")},
    ):
        with pytest.raises(ValueError):
            GateConfig(**bad)


def test_window_of_a_batchless_row_comes_from_its_tier() -> None:
    assert CONFIG.window_for_tier("flex") == 3600
    assert CONFIG.window_for_tier(None) == 86400
    assert CONFIG.window_for_tier("priority") == 86400  # unmapped tier: the default
    custom = GateConfig(
        service_tier_completion_windows_s={"flex": 7200, "priority": 0},
        default_completion_window_s=3600,
    )
    assert custom.window_for_tier("flex") == 7200
    assert custom.window_for_tier("priority") == 0
    assert custom.window_for_tier(None) == 3600


def test_window_class_of_a_batchless_row() -> None:
    assert window_class_for_batchless("flex") == "flex"
    assert window_class_for_batchless("priority") == "priority"
    assert window_class_for_batchless(None) == "default"


@pytest.mark.parametrize(
    ("state", "live"),
    [(None, True), ("live", True), ("coming", False), ("absent", False), ("leaving", False)],
)
def test_is_live(state: str | None, live: bool) -> None:
    assert is_live(state) is live


# -- the ramp --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window_s", "expected"),
    [(3600, 594), (7200, 876), (43200, 2389), (86400, 3522), (7 * 86400, 10473), (120, 88)],
)
def test_ramp_matches_the_spec_table(window_s: float, expected: float) -> None:
    assert abs(ramp_seconds(window_s, EXP) - expected) <= 1


@pytest.mark.parametrize("window_s", [0, 1, 30, 59.9, 60])
def test_windows_up_to_a_minute_always_ramp(window_s: float) -> None:
    assert within_ramp(NOW + 1000 * H, window_s, NOW, EXP)
    assert within_ramp(NOW + timedelta(seconds=window_s), window_s, NOW, EXP)


def test_just_over_a_minute_is_not_always_ramping() -> None:
    assert 60 < ramp_seconds(61, EXP) < 61
    assert not within_ramp(NOW + timedelta(seconds=61), 61, NOW, EXP)
    assert within_ramp(NOW + timedelta(seconds=60), 61, NOW, EXP)


def test_within_ramp_boundary_and_overdue() -> None:
    whole = int(ramp_seconds(86400, EXP))  # 3522 s
    assert within_ramp(NOW + timedelta(seconds=whole), 86400, NOW, EXP)
    assert not within_ramp(NOW + timedelta(seconds=whole + 1), 86400, NOW, EXP)
    assert within_ramp(NOW, 86400, NOW, EXP)
    assert within_ramp(NOW - 48 * H, 86400, NOW, EXP)  # overdue


def test_ramp_follows_the_configured_exponent() -> None:
    assert ramp_seconds(3600, 1.0) == pytest.approx(3600)
    assert ramp_seconds(3600, 0.0) == pytest.approx(60)


# -- the score -------------------------------------------------------------------------------


def test_score_fairness_only_when_u_is_zero() -> None:
    # counts {a: 5}: a scores 1, b and c (absent from the map) 0
    assert score(5, 5, NOW + H, NOW, 0.0) == 1.0
    assert score(0, 5, NOW + H, NOW, 0.0) == 0.0
    # A = 0 (an empty map): the denominator is 1
    assert score(0, 0, NOW + H, NOW, 0.0) == 0.0
    assert score(3, 0, NOW + H, NOW, 0.0) == 3.0


def test_score_worked_example_half_urgency() -> None:
    a = score(1, 1, NOW + H, NOW, 0.5)
    b = score(1, 1, NOW + 24 * H, NOW, 0.5)
    assert a == pytest.approx(0.521, abs=5e-4)
    assert b == pytest.approx(1.0)


def test_score_worked_examples_u_point_three() -> None:
    assert score(4, 4, NOW + H, NOW, 0.3) == pytest.approx(0.7125)
    assert score(0, 4, NOW + 24 * H, NOW, 0.3) == pytest.approx(0.3)
    assert score(1, 4, NOW + H, NOW, 0.3) == pytest.approx(0.1875)  # {a: 1, c: 4, b: 0}


def test_score_urgency_term_is_clamped() -> None:
    assert score(0, 0, NOW - H, NOW, 1.0) == 0.0  # overdue: no negative urgency
    assert score(0, 0, NOW + 72 * H, NOW, 1.0) == 1.0  # saturates at one day
    assert score(0, 0, NOW + 12 * H, NOW, 1.0) == pytest.approx(0.5)


# -- selection: the worked examples (§3.5) ---------------------------------------------------


def test_owners_with_requests_in_flight_go_after_the_others() -> None:
    units = [batch("A", "a", 3, left=1 * H), batch("B", "b", 3, left=5 * H)]
    units.append(batch("C", "c", 3, left=6 * H))
    takes = run(units, capacity=6, counts={"a": 5})
    assert rows(takes) == ["B"] * 3 + ["C"] * 3
    assert not any(t.leaked for t in takes)


def test_urgency_half_example_the_earlier_deadline_wins() -> None:
    units = [batch("A", "a", 2, left=1 * H), batch("B", "b", 2, left=24 * H, window=48 * H)]
    config = GateConfig(urgency_weight=0.5)
    assert rows(run(units, 2, {"a": 1, "b": 1}, config=config)) == ["A", "A"]
    # u = 0, {a: 5, b: 0}: b first despite the later deadline
    assert rows(run(units, 2, {"a": 5, "b": 0})) == ["B", "B"]


def test_urgency_point_three_examples() -> None:
    config = GateConfig(urgency_weight=0.3)
    units = [batch("A", "a", 2, left=1 * H), batch("B", "b", 2, left=24 * H, window=48 * H)]
    assert rows(run(units, 2, {"a": 4, "b": 0}, config=config)) == ["B", "B"]
    assert rows(run(units, 2, {"a": 1, "c": 4, "b": 0}, config=config)) == ["A", "A"]


def test_not_live_example_24h_ramps_1h_leaks_one_row() -> None:
    day = batch("D", "alice", 3, left=50 * MIN)
    hour = batch("H", "alice", 3, left=50 * MIN, window=H, label="1h")
    takes = run([hour, day], capacity=10, live=False)
    assert [(t.unit.id, t.count, t.leaked) for t in takes] == [("D", 3, False), ("H", 1, True)]


# -- selection: order and capacity -----------------------------------------------------------


def test_capacity_is_never_exceeded() -> None:
    units = [batch("A", "a", 50)] + [flex(f"f{i}", "b") for i in range(50)]
    assert len(rows(run(units, capacity=7))) == 7
    assert run(units, capacity=0) == []
    assert run(units, capacity=-3) == []
    assert len(rows(run(units, capacity=1000))) == 100
    assert run([], capacity=5) == []


def test_units_without_available_rows_are_skipped() -> None:
    units = [batch("A", "a", 0, left=H), batch("B", "a", 2)]
    assert [(t.unit.id, t.count) for t in run(units)] == [("B", 2)]


def test_equal_scores_earliest_deadline_batch_takes_all_capacity() -> None:
    units = [batch("Late", "a", 10, left=10 * H), batch("Early", "b", 10, left=2 * H)]
    units.append(batch("Mid", "c", 10, left=5 * H))
    random.Random(1).shuffle(units)
    assert rows(run(units, capacity=8)) == ["Early"] * 8  # no round-robin
    takes = run(units, capacity=14)
    assert [(t.unit.id, t.count) for t in takes] == [("Early", 10), ("Mid", 4)]


def test_equal_score_and_deadline_tie_break_by_id() -> None:
    units = [batch("Y", "a", 3), batch("X", "b", 3)]
    assert rows(run(units, capacity=4)) == ["X", "X", "X", "Y"]


def test_batchless_rows_rank_by_score_deadline_id() -> None:
    units = [
        flex("r3", "a", age=10 * MIN),
        flex("r2", "a", age=30 * MIN),
        flex("r1", "a", age=10 * MIN),
        flex("r0", "busy", age=59 * MIN),
    ]
    assert rows(run(units, capacity=4, counts={"busy": 1})) == ["r2", "r1", "r3", "r0"]


def test_busy_owner_yields_to_an_idle_one_for_batchless_rows_too() -> None:
    units = [flex(f"a{i}", "busy", age=50 * MIN) for i in range(5)]
    units.append(flex("b0", "idle", age=MIN))
    assert rows(run(units, capacity=1, counts={"busy": 40})) == ["b0"]


def test_batches_and_batchless_rows_merge_by_score_then_deadline() -> None:
    units = [
        batch("A", "a", 2, left=30 * H, window=48 * H),
        batch("B", "b", 2, left=2 * H),
        flex("f1", "c", age=10 * MIN),  # deadline in 50 min
        flex("f2", "busy", age=59 * MIN),  # deadline in 1 min, busy owner
    ]
    assert rows(run(units, counts={"busy": 3})) == ["f1", "B", "B", "A", "A", "f2"]


def test_a_live_model_never_leaks() -> None:
    units = [batch("A", "a", 3, left=23 * H), flex("f", "b")]
    takes = run(units, live=True, cool={("a", "24h"), ("b", "flex")})
    assert len(rows(takes)) == 4 and not any(t.leaked for t in takes)


# -- selection: the leaky bucket (Source B) --------------------------------------------------


def test_source_b_takes_one_row_per_owner_and_class() -> None:
    units = [
        batch("A1", "a", 5, left=20 * H),
        batch("A2", "a", 5, left=10 * H),  # a's best 24h batch: the earlier deadline
        batch("A3", "a", 5, left=40 * H, window=48 * H, label="48h"),
        batch("B1", "b", 5, left=20 * H),
        *[flex(f"af{i}", "a", age=i * MIN) for i in range(1, 4)],
        flex("bd", "b", tier=None),
    ]
    random.Random(3).shuffle(units)
    takes = run(units, capacity=50, live=False)
    assert all(t.leaked and t.count == 1 for t in takes)
    assert Counter((t.unit.owner, t.unit.window_class) for t in takes) == {
        ("a", "24h"): 1,
        ("a", "48h"): 1,
        ("a", "flex"): 1,
        ("b", "24h"): 1,
        ("b", "default"): 1,
    }
    assert {t.unit.id for t in takes} == {"A2", "A3", "B1", "af3", "bd"}


def test_source_b_respects_cooldown_per_owner_and_class() -> None:
    units = [
        batch("A", "a", 3),
        batch("H", "a", 3, left=50 * MIN, window=H, label="1h"),
        batch("B", "b", 3),
        flex("af", "a"),
    ]
    takes = run(units, live=False, cool={("a", "24h")})
    assert {t.unit.id for t in takes} == {"H", "B", "af"}
    everything = {("a", "24h"), ("a", "1h"), ("b", "24h"), ("a", "flex")}
    assert run(units, live=False, cool=everything) == []


def test_cooldown_never_blocks_full_capacity_claims_within_the_ramp() -> None:
    takes = run([batch("A", "a", 3, left=30 * MIN)], live=False, cool={("a", "24h")})
    assert [(t.unit.id, t.count, t.leaked) for t in takes] == [("A", 3, False)]


def test_source_a_fills_before_source_b_even_with_a_worse_score() -> None:
    units = [batch("R", "busy", 5, left=30 * MIN), batch("T", "idle", 5, left=20 * H)]
    counts = {"busy": 100}
    assert rows(run(units, capacity=3, counts=counts, live=False)) == ["R"] * 3
    takes = run(units, capacity=7, counts=counts, live=False)
    assert [(t.unit.id, t.count, t.leaked) for t in takes] == [("R", 5, False), ("T", 1, True)]


def test_source_b_rows_in_score_order_truncated_to_capacity() -> None:
    units = [batch("A", "a", 2, left=20 * H), batch("B", "b", 2, left=10 * H)]
    units.append(batch("C", "c", 2, left=15 * H))
    assert rows(run(units, capacity=2, counts={"b": 2}, live=False)) == ["C", "A"]


def test_batchless_rows_on_a_not_live_model_trickle_until_their_ramp() -> None:
    early = flex("early", "a", age=5 * MIN)  # 55 min left > ramp(1 h) = 594 s
    other = flex("other", "a", age=6 * MIN)
    ramping = [flex(f"late{i}", "a", age=52 * MIN) for i in range(3)]  # 8 min left
    takes = run([early, other, *ramping], live=False)
    assert [(t.unit.id, t.leaked) for t in takes] == [
        ("late0", False),
        ("late1", False),
        ("late2", False),
        ("other", True),
    ]
    assert [t.leaked for t in run([flex("overdue", "a", age=2 * H)], live=False)] == [False]


# -- the leaky bucket's tokens (§3.4) --------------------------------------------------------


@pytest.mark.parametrize(
    ("window_s", "interval"),
    [(3600, 60), (86400, 1440), (CONFIG.window_for_tier("flex"), 60), (120, 2)],
)
def test_token_intervals(window_s: float, interval: float) -> None:
    at = next_token_at(NOW, window_s, CONFIG.leaks_per_window)
    assert (at - NOW).total_seconds() == pytest.approx(interval)


def test_zero_leaks_per_window_never_refills_without_overflowing() -> None:
    assert next_token_at(NOW, 86400, 0) > NOW + timedelta(days=365 * 1000)
    assert next_token_at(NOW, 0, 0) == NOW


def test_a_bucket_leaks_once_per_interval() -> None:
    """Cooldown = buckets whose next token is later than now (the gate's cycle, §3.4)."""
    hour = batch("H", "a", 5, left=50 * MIN, window=H, label="1h")
    buckets: dict[tuple[str, str], datetime] = {}
    leaked: list[int] = []
    for second in range(0, 181, 10):
        now = NOW + timedelta(seconds=second)
        cool = {key for key, at in buckets.items() if at > now}
        for take in run([hour], live=False, cool=cool, now=now):
            assert take.leaked and take.count == 1
            leaked.append(second)
            key = (take.unit.owner, take.unit.window_class)
            buckets[key] = next_token_at(now, take.unit.window_s, CONFIG.leaks_per_window)
    assert leaked == [0, 60, 120, 180]


# -- a live model's merge over owners (the gate's path) --------------------------------------


def runs(units: Iterable[Unit], key: Callable[[Unit], object]) -> list[Iterator[Unit]]:
    """The units grouped by ``key``, each group in (deadline, id) order."""
    groups: dict[object, list[Unit]] = {}
    for unit in units:
        groups.setdefault(key(unit), []).append(unit)
    return [iter(sorted(mine, key=lambda u: (u.deadline, u.id))) for mine in groups.values()]


_units = st.lists(
    st.builds(
        Unit,
        id=st.uuids().map(str),
        batch=st.booleans(),
        owner=st.sampled_from(["a", "b", "c", "d"]),
        # few distinct deadlines, some past: ties and the clamped urgency term both occur
        deadline=st.integers(-3, 40).map(lambda h: NOW + h * H),
        window_s=st.just(86400.0),
        window_class=st.just("24h"),
        available=st.integers(0, 6),
    ),
    max_size=40,
    unique_by=lambda u: u.id,
)


@settings(max_examples=400, deadline=None)
@given(
    units=_units,
    capacity=st.integers(0, 60),
    counts=st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(1, 9)),
    urgency=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
)
def test_the_live_merge_takes_what_select_takes(
    units: list[Unit], capacity: int, counts: dict[str, int], urgency: float
) -> None:
    config = GateConfig(urgency_weight=urgency)
    expected = select(capacity, units, counts, True, set(), NOW, config)
    # one run per owner, or (as the gate groups them) per in-flight count
    assert select_live(capacity, runs(units, lambda u: u.owner), counts, NOW, config) == expected
    by_count = runs(units, lambda u: counts.get(u.owner, 0))
    assert select_live(capacity, by_count, counts, NOW, config) == expected


def test_the_live_merge_reads_one_unit_per_owner_and_one_per_take() -> None:
    read: list[str] = []

    def owner(name: str, n: int) -> Iterator[Unit]:
        for i in range(n):
            read.append(f"{name}{i}")
            yield batch(f"{name}{i:05d}", name, 2, left=(1 + i) * H)

    takes = select_live(5, [owner("a", 10_000), owner("b", 10_000)], {"a": 1}, NOW, CONFIG)
    # b is idle, so its earliest batches win; a's first batch was read and left
    assert rows(takes) == ["b00000", "b00000", "b00001", "b00001", "b00002"]
    assert read == ["a0", "b0", "b1", "b2"]


# -- a not-live model's paced read (the gate's path) -----------------------------------------


def paced(units: Iterable[Unit], now: datetime, exponent: float = EXP) -> tuple[list[Iterator[Unit]], list[Unit]]:  # fmt: skip
    """As the gate offers them: each (owner, window-class, W) kind's units in (deadline, id)
    order, split where they leave their ramp; the ramping ones as runs, the first unit past
    the ramp with rows claimable as waiting."""
    ramping: list[Iterator[Unit]] = []
    waiting: list[Unit] = []
    for mine in runs(units, lambda u: (u.owner, u.window_class, u.window_s)):
        kind = list(mine)
        ramped = [u for u in kind if within_ramp(u.deadline, u.window_s, now, exponent)]
        assert kind[: len(ramped)] == ramped  # a kind's ramping units come first
        ramping.append(iter(ramped))
        waiting += [u for u in kind[len(ramped) :] if u.available > 0][:1]
    return ramping, waiting


_shapes = st.sampled_from([(86400.0, "24h"), (3600.0, "1h"), (3600.0, "flex"), (30.0, "flex")])
_paced_units = st.lists(
    st.builds(
        lambda id_, batch_, owner, minutes, shape, available: Unit(
            id=id_,
            batch=batch_,
            owner=owner,
            deadline=NOW + minutes * MIN,
            window_s=shape[0],
            window_class=shape[1],
            available=available,
        ),  # fmt: skip
        st.uuids().map(str),
        st.booleans(),
        st.sampled_from(["a", "b", "c"]),
        # some past, some within the ramps (about 10 min for 1 h, 59 min for 24 h), some beyond
        st.integers(-30, 600),
        _shapes,
        st.integers(0, 4),
    ),
    max_size=40,
    unique_by=lambda u: u.id,
)


@settings(max_examples=400, deadline=None)
@given(
    units=_paced_units,
    capacity=st.integers(0, 30),
    counts=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.integers(1, 9)),
    cool=st.sets(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["24h", "1h", "flex"]))
    ),  # fmt: skip
    urgency=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_the_paced_read_takes_what_select_takes_of_a_not_live_model(
    units: list[Unit],
    capacity: int,
    counts: dict[str, int],
    cool: set[tuple[str, str]],
    urgency: float,
) -> None:
    config = GateConfig(urgency_weight=urgency)
    expected = select(capacity, units, counts, False, cool, NOW, config)
    ramping, waiting = paced(units, NOW)
    assert select_paced(capacity, ramping, waiting, counts, cool, NOW, config) == expected


def test_the_paced_read_stops_at_the_claims() -> None:
    read: list[str] = []

    def kind(name: str, n: int) -> Iterator[Unit]:
        for i in range(n):
            read.append(f"{name}{i}")
            yield batch(f"{name}{i:05d}", name, 1, left=i * MIN)

    waiting = [batch("late", "c", left=20 * H)]
    takes = select_paced(3, [kind("a", 10_000), kind("b", 10_000)], waiting, {"a": 1}, set(), NOW, CONFIG)  # fmt: skip
    assert rows(takes) == ["b00000", "b00001", "b00002"]
    assert read == ["a0", "b0", "b1", "b2"]
    # room left over goes to the trickle, one row of the waiting unit
    assert rows(select_paced(5, [iter([batch("x", "a", 2, left=MIN)])], waiting, {}, set(), NOW, CONFIG)) == ["x", "x", "late"]  # fmt: skip


# -- efficiency ------------------------------------------------------------------------------


def test_a_large_backlog_is_taken_in_whole_batches_with_one_leak_per_owner_and_class() -> None:
    # What this costs is bench.gate_memory's figure; here, that a backlog of 2 M batch rows
    # is ranked per unit: a batch's rows are taken at once, never one by one.
    rng = random.Random(11)
    # 200 batches of 10 000 rows each and 20 000 batchless rows of busy owners (u1..u16)
    units = [
        batch(f"B{b:03d}", f"u{b % 17}", 10_000, left=(2 + b) * H, window=300 * H)
        for b in range(200)
    ]
    units += [flex(f"f{i:06d}", f"u{1 + i % 16}", age=timedelta(seconds=i % 3000)) for i in range(20_000)]  # fmt: skip
    rng.shuffle(units)
    counts = {f"u{i}": i for i in range(17)}  # u0 is idle, so its best batch wins
    assert [(t.unit.id, t.count) for t in run(units, 10, counts)] == [("B000", 10)]
    # not live: B000..B002 are within ramp(300 h) ≈ 4 h, everything else trickles
    takes = run(units, 40_000, counts, live=False)
    assert [(t.unit.id, t.count, t.leaked) for t in takes[:3]] == [
        ("B000", 10_000, False),
        ("B001", 10_000, False),
        ("B002", 10_000, False),
    ]
    leaked = takes[3:]
    assert all(t.leaked and t.count == 1 for t in leaked)
    # one per (owner, class): 17 owners' 24h batches and 16 owners' flex rows
    assert len({(t.unit.owner, t.unit.window_class) for t in leaked}) == len(leaked) == 33
