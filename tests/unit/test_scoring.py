"""The claim gate's ranking rules (core.md §3) against the spec's numbers and examples."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from streams.gate.scoring import (
    BucketKey,
    Candidate,
    GateConfig,
    Selected,
    batch_candidate,
    batchless_candidate,
    cooldown,
    deadline_for_batchless,
    drop_expired,
    expired_buckets,
    is_live,
    leak_interval_seconds,
    leak_stamps,
    max_active_count,
    next_token_at,
    ramp_seconds,
    score,
    select,
    window_class_for_batch,
    window_class_for_batchless,
    window_for_batch,
    window_for_batchless,
    within_ramp,
)

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
H = timedelta(hours=1)
CONFIG = GateConfig()
EXP = CONFIG.claim_ramp_exponent


def batch(
    batch_id: str,
    owner: str,
    n: int,
    *,
    window: timedelta = 24 * H,
    left: timedelta = 20 * H,
    completion_window: str = "24h",
    model: str = "m",
    lines: Iterable[int] | None = None,
) -> list[Candidate]:
    """Rows of a batch created ``window`` before its deadline, ``left`` from now."""
    expires = NOW + left
    created = expires - window
    return [
        batch_candidate(
            request_id=f"{batch_id}-{line:05d}",
            model=model,
            owner=owner,
            batch_id=batch_id,
            batch_created_at=created,
            expires_at=expires,
            completion_window=completion_window,
            created_at=created,
            line=line,
        )
        for line in (range(n) if lines is None else lines)
    ]


def flex(
    request_id: str,
    owner: str,
    *,
    age: timedelta = timedelta(minutes=5),
    tier: str | None = "flex",
    model: str = "m",
) -> Candidate:
    return batchless_candidate(
        request_id=request_id,
        model=model,
        owner=owner,
        tier=tier,
        created_at=NOW - age,
        config=CONFIG,
    )


def run(
    candidates: Iterable[Candidate],
    capacity: int = 10,
    counts: Mapping[str, int] | None = None,
    *,
    live: bool = True,
    cool: set[BucketKey] | None = None,
    config: GateConfig = CONFIG,
    model: str = "m",
) -> list[Selected]:
    return select(model, capacity, list(candidates), counts or {}, live, cool or set(), NOW, config)


def ids(selected: list[Selected]) -> list[str]:
    return [s.request_id for s in selected]


def batches_of(selected: list[Selected]) -> list[str]:
    return [s.request_id.split("-")[0] for s in selected]


# -- configuration ---------------------------------------------------------------------------


def test_config_defaults_follow_the_spec() -> None:
    assert CONFIG.urgency_weight == 0.0
    assert CONFIG.claim_ramp_exponent == 0.56
    assert CONFIG.leaks_per_window == 60
    assert CONFIG.service_tier_completion_windows_s == {"flex": 3600}
    assert CONFIG.default_completion_window_s == 86400
    assert CONFIG.claim_batch_size == 100
    # the mutable default is not shared between instances
    other = GateConfig()
    other.service_tier_completion_windows_s["priority"] = 0
    assert "priority" not in GateConfig().service_tier_completion_windows_s


def test_config_decodes_and_validates() -> None:
    decoded = msgspec.json.decode(b'{"urgency_weight": 0.3}', type=GateConfig)
    assert decoded.urgency_weight == 0.3 and decoded.leaks_per_window == 60
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"urgency_weight": 1.5}', type=GateConfig)
    with pytest.raises(ValueError):
        GateConfig(leaks_per_window=-1)


# -- per-row quantities ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window_s", "expected"),
    [
        (3600, 594),
        (2 * 3600, 876),
        (12 * 3600, 2389),
        (24 * 3600, 3522),
        (7 * 86400, 10473),
        (120, 88),
    ],
)
def test_ramp_matches_the_spec_table(window_s: float, expected: float) -> None:
    assert abs(ramp_seconds(window_s, EXP) - expected) <= 1


@pytest.mark.parametrize("window_s", [0, 1, 30, 59.9, 60])
def test_windows_up_to_a_minute_always_ramp(window_s: float) -> None:
    assert ramp_seconds(window_s, EXP) >= window_s
    # even a deadline far away (or a row "from the future") counts as ramping
    assert within_ramp(NOW + 1000 * H, window_s, NOW, EXP)
    assert within_ramp(NOW + timedelta(seconds=window_s), window_s, NOW, EXP)


def test_just_over_a_minute_is_not_always_ramping() -> None:
    ramp = ramp_seconds(61, EXP)
    assert 60 < ramp < 61
    assert not within_ramp(NOW + timedelta(seconds=61), 61, NOW, EXP)
    assert within_ramp(NOW + timedelta(seconds=60), 61, NOW, EXP)


def test_within_ramp_boundary_and_overdue() -> None:
    day = 86400
    ramp = ramp_seconds(day, EXP)
    whole = int(ramp)  # 3522 s; datetimes hold microseconds, so stay off the exact float
    assert within_ramp(NOW + timedelta(seconds=whole), day, NOW, EXP)  # D − now ≤ ramp
    assert not within_ramp(NOW + timedelta(seconds=whole + 1), day, NOW, EXP)
    assert within_ramp(NOW, day, NOW, EXP)
    assert within_ramp(NOW - timedelta(seconds=1), day, NOW, EXP)  # overdue
    assert within_ramp(NOW - 48 * H, day, NOW, EXP)


def test_ramp_follows_the_configured_exponent() -> None:
    assert ramp_seconds(3600, 1.0) == pytest.approx(3600)
    assert ramp_seconds(3600, 0.0) == pytest.approx(60)


def test_windows() -> None:
    created = NOW - 2 * H
    assert window_for_batch(created, created + 24 * H) == 86400
    assert window_for_batch(created, created + timedelta(minutes=90)) == 5400
    assert window_for_batch(created, created - H) == 0  # never negative
    assert window_for_batchless("flex", CONFIG) == 3600
    assert window_for_batchless(None, CONFIG) == 86400
    assert window_for_batchless("priority", CONFIG) == 86400  # unmapped tier: default
    custom = GateConfig(
        service_tier_completion_windows_s={"flex": 7200, "priority": 0},
        default_completion_window_s=3600,
    )
    assert window_for_batchless("flex", custom) == 7200
    assert window_for_batchless("priority", custom) == 0
    assert window_for_batchless(None, custom) == 3600
    assert deadline_for_batchless(NOW, "flex", CONFIG) == NOW + H
    assert deadline_for_batchless(NOW, None, CONFIG) == NOW + 24 * H


def test_window_classes() -> None:
    assert window_class_for_batch("24h") == "24h"
    assert window_class_for_batch("1h") == "1h"
    assert window_class_for_batchless("flex") == "flex"
    assert window_class_for_batchless(None) == "default"


def test_candidate_builders_derive_window_deadline_and_class() -> None:
    (row,) = batch("b", "alice", 1, window=24 * H, left=3 * H)
    assert row.deadline == NOW + 3 * H
    assert row.window_s == 86400
    assert row.window_class == "24h"
    loose = flex("r", "bob", age=10 * timedelta(minutes=1))
    assert loose.batch_id is None
    assert loose.deadline == NOW - timedelta(minutes=10) + H
    assert loose.window_s == 3600 and loose.window_class == "flex"
    tierless = flex("r2", "bob", tier=None)
    assert tierless.window_s == 86400 and tierless.window_class == "default"


@pytest.mark.parametrize(
    ("state", "live"),
    [(None, True), ("live", True), ("coming", False), ("absent", False), ("leaving", False)],
)
def test_is_live(state: str | None, live: bool) -> None:
    assert is_live(state) is live


# -- the score -------------------------------------------------------------------------------


def test_score_fairness_only_when_u_is_zero() -> None:
    counts = {"a": 5}
    top = max_active_count(counts)
    assert score(5, top, NOW + H, NOW, 0.0) == 1.0
    assert score(0, top, NOW + H, NOW, 0.0) == 0.0  # b and c, absent from the map
    assert max_active_count({}) == 0
    # A = 0 or an empty map: the denominator is 1
    assert score(0, 0, NOW + H, NOW, 0.0) == 0.0
    assert score(3, 0, NOW + H, NOW, 0.0) == 3.0


def test_score_worked_example_half_urgency() -> None:
    a = score(1, 1, NOW + H, NOW, 0.5)
    b = score(1, 1, NOW + 24 * H, NOW, 0.5)
    assert a == pytest.approx(0.521, abs=5e-4)
    assert b == pytest.approx(1.0)
    assert a < b


def test_score_worked_examples_u_point_three() -> None:
    a = score(4, 4, NOW + H, NOW, 0.3)
    b = score(0, 4, NOW + 24 * H, NOW, 0.3)
    assert a == pytest.approx(0.7125)
    assert b == pytest.approx(0.3)
    assert b < a
    a = score(1, 4, NOW + H, NOW, 0.3)  # counts {a: 1, c: 4, b: 0}
    assert a == pytest.approx(0.1875)
    assert a < b


def test_score_urgency_term_is_clamped() -> None:
    assert score(0, 0, NOW - H, NOW, 1.0) == 0.0  # overdue: no negative urgency
    assert score(0, 0, NOW + 72 * H, NOW, 1.0) == 1.0  # saturates at one day
    assert score(0, 0, NOW + 12 * H, NOW, 1.0) == pytest.approx(0.5)


# -- selection: worked examples --------------------------------------------------------------


def test_owner_with_active_requests_goes_after_the_others() -> None:
    rows = (
        batch("A", "a", 3, left=1 * H)
        + batch("B", "b", 3, left=5 * H)
        + batch("C", "c", 3, left=6 * H)
    )
    chosen = run(rows, capacity=6, counts={"a": 5})
    assert batches_of(chosen) == ["B"] * 3 + ["C"] * 3
    assert not any(s.leaked for s in chosen)


def test_fairness_beats_deadline_when_u_is_zero() -> None:
    rows = batch("A", "a", 5, left=1 * H) + batch("B", "b", 5, left=24 * H, window=48 * H)
    chosen = run(rows, capacity=5, counts={"a": 5, "b": 0})
    assert batches_of(chosen) == ["B"] * 5


def test_busy_user_yields_to_an_idle_one_for_batchless_rows_too() -> None:
    rows = [flex(f"a{i}", "busy", age=50 * timedelta(minutes=1)) for i in range(5)] + [
        flex("b0", "idle", age=timedelta(minutes=1))
    ]
    chosen = run(rows, capacity=1, counts={"busy": 40})
    assert ids(chosen) == ["b0"]


def test_urgency_half_example_earlier_deadline_wins() -> None:
    rows = batch("A", "a", 2, left=1 * H) + batch("B", "b", 2, left=24 * H, window=48 * H)
    config = GateConfig(urgency_weight=0.5)
    chosen = run(rows, capacity=2, counts={"a": 1, "b": 1}, config=config)
    assert batches_of(chosen) == ["A", "A"]


def test_urgency_point_three_examples() -> None:
    config = GateConfig(urgency_weight=0.3)
    rows = batch("A", "a", 2, left=1 * H) + batch("B", "b", 2, left=24 * H, window=48 * H)
    chosen = run(rows, capacity=2, counts={"a": 4, "b": 0}, config=config)
    assert batches_of(chosen) == ["B", "B"]
    chosen = run(rows, capacity=2, counts={"a": 1, "c": 4, "b": 0}, config=config)
    assert batches_of(chosen) == ["A", "A"]


def test_not_live_example_24h_ramps_1h_leaks_one_row() -> None:
    day = batch("D", "alice", 3, window=24 * H, left=timedelta(minutes=50))
    hour = batch("H", "alice", 3, window=1 * H, left=timedelta(minutes=50), completion_window="1h")
    chosen = run(day + hour, capacity=10, live=False)
    assert ids(chosen) == ["D-00000", "D-00001", "D-00002", "H-00000"]
    assert [s.leaked for s in chosen] == [False, False, False, True]
    assert chosen[-1].window_class == "1h" and chosen[-1].window_s == 3600
    assert chosen[0].window_class == "24h" and chosen[0].window_s == 86400


# -- selection: ordering and capacity --------------------------------------------------------


def test_capacity_truncates_and_zero_capacity_claims_nothing() -> None:
    rows = batch("A", "a", 50) + [flex(f"f{i}", "b") for i in range(50)]
    assert len(run(rows, capacity=7)) == 7
    assert run(rows, capacity=0) == []
    assert run(rows, capacity=-3) == []
    assert len(run(rows, capacity=1000)) == 100
    assert run([], capacity=5) == []


def test_equal_scores_earliest_deadline_batch_takes_all_capacity() -> None:
    rows = (
        batch("Late", "a", 10, left=10 * H)
        + batch("Early", "b", 10, left=2 * H)
        + batch("Mid", "c", 10, left=5 * H)
    )
    random.Random(1).shuffle(rows)
    chosen = run(rows, capacity=8)
    assert batches_of(chosen) == ["Early"] * 8  # no round-robin
    chosen = run(rows, capacity=14)
    assert batches_of(chosen) == ["Early"] * 10 + ["Mid"] * 4


def test_batch_drains_by_line_in_upload_order() -> None:
    lines = list(range(20))
    random.Random(7).shuffle(lines)
    rows = batch("A", "a", 0, lines=lines)
    chosen = run(rows, capacity=5)
    assert ids(chosen) == [f"A-{i:05d}" for i in range(5)]


def test_batch_rows_oldest_created_at_first_then_line() -> None:
    base = batch("A", "a", 4)
    # a retried/re-populated row may be older than its lower-numbered siblings
    older = msgspec.structs.replace(base[3], created_at=base[3].created_at - H)
    chosen = run([base[0], base[1], base[2], older], capacity=2)
    assert ids(chosen) == ["A-00003", "A-00000"]


def test_batches_with_equal_score_and_deadline_tie_break_by_batch_id() -> None:
    rows = batch("Y", "a", 3) + batch("X", "b", 3)
    assert batches_of(run(rows, capacity=4)) == ["X", "X", "X", "Y"]


def test_batchless_rows_rank_by_score_deadline_id() -> None:
    rows = [
        flex("r3", "a", age=10 * timedelta(minutes=1)),
        flex("r2", "a", age=30 * timedelta(minutes=1)),
        flex("r1", "a", age=10 * timedelta(minutes=1)),
        flex("r0", "busy", age=59 * timedelta(minutes=1)),
    ]
    assert ids(run(rows, capacity=4, counts={"busy": 1})) == ["r2", "r1", "r3", "r0"]


def test_batch_and_batchless_rows_merge_by_score_then_deadline() -> None:
    rows = (
        batch("A", "a", 2, left=30 * H, window=48 * H)
        + batch("B", "b", 2, left=2 * H)
        + [flex("f1", "c", age=timedelta(minutes=10))]  # deadline in 50 min
        + [flex("f2", "busy", age=timedelta(minutes=59))]  # deadline in 1 min, busy owner
    )
    chosen = run(rows, capacity=10, counts={"busy": 3})
    assert ids(chosen) == ["f1", "B-00000", "B-00001", "A-00000", "A-00001", "f2"]


def test_other_models_are_ignored() -> None:
    rows = batch("A", "a", 3, model="other") + batch("B", "a", 3, left=30 * H, window=48 * H)
    assert batches_of(run(rows, capacity=10)) == ["B", "B", "B"]


def test_live_model_never_leaks() -> None:
    rows = batch("A", "a", 3, left=23 * H) + [flex("f", "b")]
    chosen = run(rows, capacity=10, live=True, cool={("a", "24h", "m"), ("b", "flex", "m")})
    assert len(chosen) == 4
    assert not any(s.leaked for s in chosen)


# -- selection: the leaky bucket (Source B) --------------------------------------------------


def test_source_b_one_row_per_owner_and_class_per_cycle() -> None:
    rows = (
        batch("A1", "a", 5, left=20 * H)
        + batch("A2", "a", 5, left=10 * H)  # a's best 24h batch: earlier deadline
        + batch("A3", "a", 5, left=40 * H, window=48 * H, completion_window="48h")
        + batch("B1", "b", 5, left=20 * H)
        + [flex(f"af{i}", "a", age=timedelta(minutes=i)) for i in range(1, 4)]
        + [flex("bd", "b", tier=None)]
    )
    random.Random(3).shuffle(rows)
    chosen = run(rows, capacity=50, live=False)
    assert all(s.leaked for s in chosen)
    pairs = Counter((s.owner, s.window_class) for s in chosen)
    assert pairs == {
        ("a", "24h"): 1,
        ("a", "48h"): 1,
        ("a", "flex"): 1,
        ("b", "24h"): 1,
        ("b", "default"): 1,
    }
    assert set(ids(chosen)) == {"A2-00000", "A3-00000", "B1-00000", "af3", "bd"}


def test_source_b_takes_the_oldest_row_of_the_best_batch() -> None:
    lines = [4, 2, 9, 3]
    rows = batch("A", "a", 0, lines=lines) + batch("Z", "a", 3, left=30 * H, window=48 * H)
    chosen = run(rows, capacity=5, live=False)
    assert ids(chosen) == ["A-00002"]
    assert chosen[0].leaked


def test_source_b_respects_cooldown_per_owner_class_and_model() -> None:
    rows = (
        batch("A", "a", 3)
        + batch("H", "a", 3, window=H, left=50 * timedelta(minutes=1), completion_window="1h")
        + batch("B", "b", 3)
        + [flex("af", "a")]
    )
    cool = {("a", "24h", "m"), ("b", "24h", "other-model"), ("a", "flex", "other-model")}
    chosen = run(rows, capacity=10, live=False, cool=cool)
    assert set(ids(chosen)) == {"H-00000", "B-00000", "af"}
    everything = {("a", "24h", "m"), ("a", "1h", "m"), ("b", "24h", "m"), ("a", "flex", "m")}
    assert run(rows, capacity=10, live=False, cool=everything) == []


def test_cooldown_does_not_block_full_capacity_claims_within_ramp() -> None:
    rows = batch("A", "a", 3, left=30 * timedelta(minutes=1))  # 24h batch within its ramp
    chosen = run(rows, capacity=10, live=False, cool={("a", "24h", "m")})
    assert ids(chosen) == ["A-00000", "A-00001", "A-00002"]
    assert not any(s.leaked for s in chosen)


def test_source_a_fills_before_source_b_even_with_worse_score() -> None:
    ramping = batch("R", "busy", 5, left=timedelta(minutes=30))
    trickle = batch("T", "idle", 5, left=20 * H)
    chosen = run(ramping + trickle, capacity=3, counts={"busy": 100}, live=False)
    assert batches_of(chosen) == ["R", "R", "R"]
    chosen = run(ramping + trickle, capacity=7, counts={"busy": 100}, live=False)
    assert batches_of(chosen) == ["R"] * 5 + ["T"]
    assert [s.leaked for s in chosen] == [False] * 5 + [True]


def test_source_b_rows_ordered_by_score_and_truncated() -> None:
    rows = (
        batch("A", "a", 2, left=20 * H)
        + batch("B", "b", 2, left=10 * H)
        + batch("C", "c", 2, left=15 * H)
    )
    chosen = run(rows, capacity=2, counts={"b": 2}, live=False)
    assert ids(chosen) == ["C-00000", "A-00000"]


def test_batchless_on_not_live_model_trickles_until_its_ramp() -> None:
    early = flex("early", "a", age=timedelta(minutes=5))  # 55 min left > 594 s ramp
    other = flex("other", "a", age=timedelta(minutes=6))
    ramping = [flex(f"late{i}", "a", age=timedelta(minutes=52)) for i in range(3)]  # 8 min left
    chosen = run([early, other, *ramping], capacity=10, live=False)
    assert ids(chosen) == ["late0", "late1", "late2", "other"]
    assert [s.leaked for s in chosen] == [False, False, False, True]
    overdue = flex("overdue", "a", age=2 * H)
    assert [s.leaked for s in run([overdue], live=False)] == [False]


# -- the leaky bucket: tokens and cooldown ---------------------------------------------------


@pytest.mark.parametrize(
    ("window_s", "interval"),
    [(3600, 60), (86400, 1440), (CONFIG.service_tier_completion_windows_s["flex"], 60), (120, 2)],
)
def test_token_intervals(window_s: float, interval: float) -> None:
    assert leak_interval_seconds(window_s, CONFIG.leaks_per_window) == pytest.approx(interval)
    at = next_token_at(NOW, window_s, CONFIG.leaks_per_window)
    assert (at - NOW).total_seconds() == pytest.approx(interval)


def test_zero_leaks_per_window_never_refills_without_overflowing() -> None:
    at = next_token_at(NOW, 86400, 0)
    assert at > NOW + timedelta(days=365 * 1000)
    assert next_token_at(NOW, 0, 0) == NOW


def test_leak_stamps_only_for_leaked_rows() -> None:
    selected = [
        Selected("r1", False, "24h", 86400, "a"),
        Selected("r2", True, "1h", 3600, "a"),
        Selected("r3", True, "flex", 3600, "b"),
    ]
    stamps = leak_stamps(selected, "m", NOW, 60)
    assert stamps == {
        ("a", "1h", "m"): NOW + timedelta(seconds=60),
        ("b", "flex", "m"): NOW + timedelta(seconds=60),
    }


def test_cooldown_and_expired_buckets() -> None:
    buckets: dict[BucketKey, datetime] = {
        ("a", "24h", "m"): NOW + timedelta(seconds=1),
        ("a", "1h", "m"): NOW,
        ("b", "flex", "m"): NOW - timedelta(seconds=5),
    }
    assert cooldown(buckets, NOW) == {("a", "24h", "m")}
    assert set(expired_buckets(buckets, NOW)) == {("a", "1h", "m"), ("b", "flex", "m")}
    dropped = drop_expired(buckets, NOW)
    assert set(dropped) == {("a", "1h", "m"), ("b", "flex", "m")}
    assert buckets == {("a", "24h", "m"): NOW + timedelta(seconds=1)}
    assert cooldown(buckets, NOW + timedelta(seconds=1)) == set()


def test_a_bucket_cycle_leaks_once_per_interval() -> None:
    rows = batch("H", "a", 5, window=H, left=50 * timedelta(minutes=1), completion_window="1h")
    buckets: dict[BucketKey, datetime] = {}
    claimed: list[str] = []
    for second in range(0, 181, 10):
        now = NOW + timedelta(seconds=second)
        drop_expired(buckets, now)
        remaining = [r for r in rows if r.request_id not in claimed]
        chosen = select("m", 10, remaining, {}, False, cooldown(buckets, now), now, CONFIG)
        claimed += ids(chosen)
        buckets.update(leak_stamps(chosen, "m", now, CONFIG.leaks_per_window))
    assert claimed == ["H-00000", "H-00001", "H-00002", "H-00003"]  # t = 0, 60, 120, 180 s


# -- efficiency ------------------------------------------------------------------------------


def test_large_backlog_selects_correctly_and_quickly() -> None:
    rng = random.Random(11)
    rows: list[Candidate] = []
    for b in range(200):
        rows += batch(f"B{b:03d}", f"u{b % 17}", 400, left=(2 + b) * H, window=300 * H)
    # batchless rows of busy owners only (u1..u16), deadlines 601..3600 s away: not ramping
    rows += [
        flex(f"f{i:06d}", f"u{1 + i % 16}", age=timedelta(seconds=i % 3000)) for i in range(20000)
    ]
    rng.shuffle(rows)
    assert len(rows) == 100_000
    counts = {f"u{i}": i for i in range(17)}  # u0 is idle, so its best batch wins
    started = time.perf_counter()
    chosen = run(rows, capacity=10, counts=counts)
    elapsed = time.perf_counter() - started
    assert ids(chosen) == [f"B000-{i:05d}" for i in range(10)]
    assert elapsed < 5.0
    # not live: B000..B002 are within ramp(300 h) ≈ 4 h, everything else trickles
    started = time.perf_counter()
    chosen = run(rows, capacity=1300, counts=counts, live=False)
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0
    assert batches_of(chosen[:1200]) == ["B000"] * 400 + ["B001"] * 400 + ["B002"] * 400
    assert not any(s.leaked for s in chosen[:1200])
    leaked = chosen[1200:]
    assert all(s.leaked for s in leaked)
    # one per (owner, class): 17 owners' 24h batches + 16 owners' flex rows
    assert len(leaked) == 33
    assert len({(s.owner, s.window_class) for s in leaked}) == 33
