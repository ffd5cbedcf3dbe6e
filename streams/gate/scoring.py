"""The claim gate's ranking rules (spec ``core.md`` §3), as pure functions.

Nothing here reads a clock or does I/O: ``now`` is always a parameter. The gate
(:mod:`streams.gate.core`) offers the claimable work of one model as :class:`Unit` values — a
batch with the number of its rows claimable now, or one batchless row — and asks
:func:`select_live` (a live model) or :func:`select_paced` (a not-live one) how many rows of
each to claim this cycle. Rows of one batch share everything the ranking looks at (owner,
deadline, window, liveness), which is why ranking happens per batch and never per row; and
both read the units in deadline order only as far as the claims go, so a cycle does not grow
with the backlog.

What to claim (§3.3 rules 1–3):

* **Source A** (``leaked=False``): units of a live model, or within ramp(W) of their deadline,
  in (score, deadline, id) order; each batch is drained before the next (the earliest-deadline
  batch takes all capacity when scores are equal: no round-robin).
* **Source B** (``leaked=True``): units of a not-live model before their ramp whose bucket
  ``(owner, window-class)`` of this model is not cooling; one row per (owner, window-class):
  the best unit's oldest row.
* All of Source A, then Source B, each in (score, deadline, id) order; at most the capacity.

Rule 4 (the cross-model ``claim_batch_size`` limit) is the gate's. The tests state these rules
directly over every unit (``tests/unit/ranking_oracle.py``) and check both reads against them.

Vocabulary (§3.2):

* **W** — the completion window in seconds: a batch's ``expires_at − created_at`` (never the
  window text), a batchless row's tier window or the default window.
* **deadline D** — a batch's ``expires_at``; a batchless row's ``created_at + W``.
* **window-class** — the bucket label: a batch's ``completion_window`` text (``24h``, ``1h``);
  a batchless row's tier, ``default`` when it has none.
* **ramp(W)** = ``60·(W/60)^exponent`` seconds; a row is *within ramp* when ``D − now ≤
  ramp(W)`` (overdue rows always are; ``W ≤ 60 s`` rows always are).
* **score** (lower first) = ``(1 − u)·a / max(A, 1) + u·min(max(D − now, 0)/86400, 1)``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from datetime import datetime, timedelta

import msgspec

#: Seconds in a day: the urgency term saturates at one day from the deadline.
URGENCY_HORIZON_S = 86400.0
#: ``leaks_per_window`` is divided into the window; this keeps a zero from dividing by zero.
LEAK_EPSILON = 1e-9
#: Window-class of a batchless row without a service tier.
DEFAULT_WINDOW_CLASS = "default"


class GateConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The gate's knobs with the reference defaults (§1.7), durations in seconds."""

    urgency_weight: float = 0.0
    claim_ramp_exponent: float = 0.56
    leaks_per_window: float = 60.0
    service_tier_completion_windows_s: dict[str, float] = msgspec.field(
        default_factory=lambda: {"flex": 3600.0}
    )
    default_completion_window_s: float = 86400.0
    claim_batch_size: int = 100
    # Claims queued behind each running call of a model, in its lanes (DispatchItem.lane):
    # a call that ends starts the next at once, without waiting for the gate to hear of it
    # and claim again. 0 = claim only into free capacity (the reference's behaviour).
    prefetch: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.urgency_weight <= 1.0:
            raise ValueError("urgency_weight must be within 0..1")
        if not math.isfinite(self.claim_ramp_exponent):
            raise ValueError("claim_ramp_exponent must be finite")
        if self.leaks_per_window < 0:
            raise ValueError("leaks_per_window must be >= 0")
        if self.default_completion_window_s < 0 or any(
            w < 0 for w in self.service_tier_completion_windows_s.values()
        ):
            raise ValueError("completion windows must be >= 0")
        if self.claim_batch_size < 0:
            raise ValueError("claim_batch_size must be >= 0")
        if self.prefetch < 0:
            raise ValueError("prefetch must be >= 0")

    def window_for_tier(self, tier: str | None) -> float:
        """W of a batchless row: its tier's window if the tier is mapped, else the default."""
        if tier is not None:
            mapped = self.service_tier_completion_windows_s.get(tier)
            if mapped is not None:
                return float(mapped)
        return float(self.default_completion_window_s)


# -- per-row quantities (§3.2) ---------------------------------------------------------------


def ramp_seconds(window_s: float, exponent: float) -> float:
    """``ramp(W) = 60·(W/60)^exponent`` seconds.

    A window of at most 60 s is always ramping: the result is then infinite (≥ W), so
    :func:`within_ramp` holds whatever ``now`` is (even with a little clock skew).
    """
    if window_s <= 60.0:
        return math.inf
    return 60.0 * float((window_s / 60.0) ** exponent)


def within_ramp(deadline: datetime, window_s: float, now: datetime, exponent: float) -> bool:
    """``D − now ≤ ramp(W)``; an overdue row (``D ≤ now``) is always within its ramp."""
    return (deadline - now).total_seconds() <= ramp_seconds(window_s, exponent)


def window_class_for_batchless(tier: str | None) -> str:
    """Bucket label of a batchless row: its tier, ``default`` when it has none."""
    return tier if tier else DEFAULT_WINDOW_CLASS


def is_live(state: str | None) -> bool:
    """A model is live when it has no filter events (``None``) or its current state is
    ``live``; an explicit ``coming``, ``absent`` or ``leaving`` (or anything else) is not."""
    return state is None or state == "live"


def score(
    active: int, max_active: int, deadline: datetime, now: datetime, urgency_weight: float
) -> float:
    """§3.2: ``(1 − u)·a / max(A, 1) + u·min(max(D − now, 0)/86400, 1)``; lower goes first.

    ``active`` is the owner's in-flight count (``a``, 0 when the owner is not in the map) and
    ``max_active`` the map's maximum (``A``)."""
    fairness = (1.0 - urgency_weight) * active / max(max_active, 1)
    until = (deadline - now).total_seconds()
    return fairness + urgency_weight * min(max(until, 0.0) / URGENCY_HORIZON_S, 1.0)


# -- selection (§3.3) ------------------------------------------------------------------------


class Unit(msgspec.Struct, frozen=True, gc=False):
    """Claimable work offered to the selection (the gate has already applied §3.1): a batch
    with ``available`` rows claimable now, drained in line order by the gate, or one batchless
    row (``batch=False``, ``available`` 1)."""

    id: str  # batch id or request id
    batch: bool
    owner: str
    deadline: datetime
    window_s: float
    window_class: str
    available: int = 1


class Take(msgspec.Struct, frozen=True, gc=False):
    """Claim ``count`` rows of a unit. ``leaked`` rows came through the leaky bucket (Source
    B): the gate stamps bucket ``(owner, window_class, model)`` after the cycle."""

    unit: Unit
    count: int
    leaked: bool


#: (score, deadline, id): the order units are taken in, lower first.
RankKey = tuple[float, datetime, str]


def _rank_key(
    unit: Unit, counts: Mapping[str, int], max_active: int, now: datetime, urgency: float
) -> RankKey:
    active = counts.get(unit.owner, 0)
    return score(active, max_active, unit.deadline, now, urgency), unit.deadline, unit.id


def _first(pair: tuple[RankKey, Unit]) -> RankKey:
    return pair[0]


def select_live(
    capacity: int,
    runs: Iterable[Iterator[Unit]],
    user_active_counts: Mapping[str, int],
    now: datetime,
    config: GateConfig,
) -> list[Take]:
    """Source A (a live model's units, or a not-live one's within their ramp), given in runs:
    each run in (deadline, id) order, its units' owners all with the same in-flight count (one
    owner's units, or those of every owner with none in flight). It reads one unit per run
    plus one per take, not every unit.

    Within a run the fairness term is the same for every unit and the urgency term never
    falls as the deadline grows, so (score, deadline, id) orders a run as (deadline, id) does;
    merging the runs by their heads' keys then yields the units in (score, deadline, id)
    order."""
    if capacity <= 0:
        return []
    urgency = config.urgency_weight
    max_active = max(user_active_counts.values(), default=0)
    heads: list[tuple[RankKey, int, Unit, Iterator[Unit]]] = []

    def push(n: int, units: Iterator[Unit]) -> None:
        for unit in units:
            if unit.available > 0:
                key = _rank_key(unit, user_active_counts, max_active, now, urgency)
                heapq.heappush(heads, (key, n, unit, units))
                return

    for n, units in enumerate(runs):
        push(n, units)
    takes: list[Take] = []
    room = capacity
    while heads and room > 0:
        _, n, unit, units = heapq.heappop(heads)
        count = min(unit.available, room)
        takes.append(Take(unit, count, leaked=False))
        room -= count
        if room > 0:
            push(n, units)
    return takes


def select_paced(
    capacity: int,
    ramping: Iterable[Iterator[Unit]],
    waiting: Iterable[Unit],
    user_active_counts: Mapping[str, int],
    cooldown: AbstractSet[tuple[str, str]],
    now: datetime,
    config: GateConfig,
) -> list[Take]:
    """A not-live model's takes, given its units within ramp in runs (as for
    :func:`select_live`) and, of those before their ramp, at least the first claimable one of
    each (owner, window-class, W) in (deadline, id) order: it reads the runs only as far as
    the claims go and one unit of each kind before its ramp.

    Source A is :func:`select_live` of the runs. Source B takes the best unit of each (owner,
    window-class) before its ramp: within one owner the score never falls as the deadline
    grows, so that is the earliest of its kinds' first units."""
    takes = select_live(capacity, ramping, user_active_counts, now, config)
    room = capacity - sum(take.count for take in takes)
    if room <= 0:
        return takes
    max_active = max(user_active_counts.values(), default=0)
    leaky: dict[tuple[str, str], tuple[RankKey, Unit]] = {}
    for unit in waiting:
        pair = (unit.owner, unit.window_class)
        if unit.available <= 0 or pair in cooldown:
            continue
        key = _rank_key(unit, user_active_counts, max_active, now, config.urgency_weight)
        held = leaky.get(pair)
        if held is None or key < held[0]:
            leaky[pair] = (key, unit)
    best = sorted(leaky.values(), key=_first)[:room]
    return takes + [Take(unit, 1, leaked=True) for _, unit in best]


# -- the leaky bucket (§3.4) -----------------------------------------------------------------


def next_token_at(now: datetime, window_s: float, leaks_per_window: float) -> datetime:
    """When a bucket that just leaked a row of window ``window_s`` may leak again:
    ``now + W / max(leaks_per_window, ε)``."""
    seconds = max(window_s, 0.0) / max(leaks_per_window, LEAK_EPSILON)
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:  # leaks_per_window ≈ 0: the bucket never refills
        return datetime.max.replace(tzinfo=now.tzinfo)
