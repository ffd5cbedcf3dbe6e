"""The claim gate's ranking rules (spec ``core.md`` §3), as pure functions.

Nothing here reads a clock or does I/O: ``now`` is always a parameter. The gate
(:mod:`streams.gate.core`) gathers the eligible pending rows of one model (§3.1: pending,
``not_before`` ≤ now, batch not cancelled or finished) as :class:`Candidate` values and asks
:func:`select` which of them to claim this cycle; the leaky-bucket helpers (§3.4) tell it which
``(owner, window-class, model)`` buckets are cooling down and when a leaked claim's bucket
gets its next token.

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
from collections.abc import Iterable, Mapping, MutableMapping
from datetime import datetime, timedelta
from operator import itemgetter

import msgspec

#: Seconds in a day: the urgency term saturates at one day from the deadline.
URGENCY_HORIZON_S = 86400.0
#: ``leaks_per_window`` is divided into the window; this keeps a zero from dividing by zero.
LEAK_EPSILON = 1e-9
#: Window-class of a batchless row without a service tier.
DEFAULT_WINDOW_CLASS = "default"

#: A leaky bucket: (owner, window-class, model) — the later rule adopted by §3.4.
BucketKey = tuple[str, str, str]


class GateConfig(msgspec.Struct, kw_only=True):
    """The gate's knobs with the reference defaults (§1.7), durations in seconds."""

    urgency_weight: float = 0.0
    claim_ramp_exponent: float = 0.56
    leaks_per_window: float = 60.0
    service_tier_completion_windows_s: dict[str, float] = msgspec.field(
        default_factory=lambda: {"flex": 3600.0}
    )
    default_completion_window_s: float = 86400.0
    claim_batch_size: int = 100

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


# -- per-row quantities (§3.2) ---------------------------------------------------------------


def ramp_seconds(window_s: float, exponent: float) -> float:
    """``ramp(W) = 60·(W/60)^exponent`` seconds.

    A window of at most 60 s is always ramping: the result is then infinite (≥ W), so
    :func:`within_ramp` holds whatever ``now`` is (even with a little clock skew).
    """
    if window_s <= 60.0:
        return math.inf
    return 60.0 * (window_s / 60.0) ** exponent


def within_ramp(deadline: datetime, window_s: float, now: datetime, exponent: float) -> bool:
    """``D − now ≤ ramp(W)``; an overdue row (``D ≤ now``) is always within its ramp."""
    return (deadline - now).total_seconds() <= ramp_seconds(window_s, exponent)


def window_for_batch(created_at: datetime, expires_at: datetime) -> float:
    """W of a batch row: ``max(expires_at − created_at, 0)`` seconds (not the window text)."""
    return max((expires_at - created_at).total_seconds(), 0.0)


def window_for_batchless(tier: str | None, config: GateConfig) -> float:
    """W of a batchless row: its tier's window if the tier is mapped, else the default."""
    if tier is not None:
        mapped = config.service_tier_completion_windows_s.get(tier)
        if mapped is not None:
            return float(mapped)
    return float(config.default_completion_window_s)


def deadline_for_batchless(created_at: datetime, tier: str | None, config: GateConfig) -> datetime:
    """D of a batchless row: ``created_at + W``."""
    return created_at + timedelta(seconds=window_for_batchless(tier, config))


def window_class_for_batch(completion_window: str) -> str:
    """Bucket label of a batch row: its ``completion_window`` text (``24h``, ``1h``…)."""
    return completion_window


def window_class_for_batchless(tier: str | None) -> str:
    """Bucket label of a batchless row: its tier, ``default`` when it has none."""
    return tier if tier else DEFAULT_WINDOW_CLASS


def is_live(state: str | None) -> bool:
    """A model is live when it has no filter events (``None``) or its current state is
    ``live``; an explicit ``coming``, ``absent`` or ``leaving`` (or anything else) is not."""
    return state is None or state == "live"


def max_active_count(user_active_counts: Mapping[str, int]) -> int:
    """``A`` of the score: the largest in-flight count of any owner (0 for an empty map)."""
    return max(user_active_counts.values(), default=0)


def _score(active: int, denominator: int, until_deadline_s: float, urgency_weight: float) -> float:
    fairness = (1.0 - urgency_weight) * active / denominator
    urgency = urgency_weight * min(max(until_deadline_s, 0.0) / URGENCY_HORIZON_S, 1.0)
    return fairness + urgency


def score(
    active: int, max_active: int, deadline: datetime, now: datetime, urgency_weight: float
) -> float:
    """§3.2: ``(1 − u)·a / max(A, 1) + u·min(max(D − now, 0)/86400, 1)``; lower goes first.

    ``active`` is the owner's in-flight count (``a``, 0 when the owner is not in the map) and
    ``max_active`` the map's maximum (``A``, see :func:`max_active_count`)."""
    return _score(active, max(max_active, 1), (deadline - now).total_seconds(), urgency_weight)


# -- selection (§3.3) ------------------------------------------------------------------------


class Candidate(msgspec.Struct, frozen=True, gc=False):
    """One eligible pending row offered to :func:`select` (the gate has already applied §3.1).

    Rows of one batch share ``owner``, ``deadline`` (the batch's ``expires_at``), ``window_s``
    and ``window_class``; ``created_at`` and ``line`` order them inside the batch."""

    request_id: str
    model: str
    owner: str
    batch_id: str | None
    deadline: datetime
    created_at: datetime
    line: int
    window_s: float
    window_class: str


class Selected(msgspec.Struct, frozen=True, gc=False):
    """A row to claim. ``leaked`` rows came through the leaky bucket (Source B): the gate
    stamps bucket ``(owner, window_class, model)`` after the cycle (:func:`leak_stamps`)."""

    request_id: str
    leaked: bool
    window_class: str
    window_s: float
    owner: str = ""


def batch_candidate(
    *,
    request_id: str,
    model: str,
    owner: str,
    batch_id: str,
    batch_created_at: datetime,
    expires_at: datetime,
    completion_window: str,
    created_at: datetime,
    line: int,
) -> Candidate:
    """A :class:`Candidate` for a row of a batch (W from the batch's timestamps)."""
    return Candidate(
        request_id=request_id,
        model=model,
        owner=owner,
        batch_id=batch_id,
        deadline=expires_at,
        created_at=created_at,
        line=line,
        window_s=window_for_batch(batch_created_at, expires_at),
        window_class=window_class_for_batch(completion_window),
    )


def batchless_candidate(
    *,
    request_id: str,
    model: str,
    owner: str,
    tier: str | None,
    created_at: datetime,
    config: GateConfig,
) -> Candidate:
    """A :class:`Candidate` for a batchless (flex) row (W and D from its tier)."""
    window_s = window_for_batchless(tier, config)
    return Candidate(
        request_id=request_id,
        model=model,
        owner=owner,
        batch_id=None,
        deadline=created_at + timedelta(seconds=window_s),
        created_at=created_at,
        line=0,
        window_s=window_s,
        window_class=window_class_for_batchless(tier),
    )


# The one total order of rule 3, "(score, deadline, id)", spelled out so that it also keeps
# rule 1's drain order: a batch row's "id" is (batch id, created_at, line) — rows of one batch
# share score and deadline, so batches come in (score, expires_at, batch id) order and each is
# drained oldest first, line breaking ties — and a batchless row's is its request id. The
# trailing request id makes every key unique.
_Key = tuple[float, datetime, str, datetime, int, str]
_Pick = tuple[_Key, Candidate]
_BatchKey = tuple[float, datetime, str]
_first = itemgetter(0)


def _row_order(candidate: Candidate) -> tuple[datetime, int, str]:
    return (candidate.created_at, candidate.line, candidate.request_id)


def _batch_row_key(batch_key: _BatchKey, row: Candidate) -> _Key:
    return (batch_key[0], batch_key[1], batch_key[2], row.created_at, row.line, row.request_id)


def select(
    model: str,
    capacity: int,
    candidates: Iterable[Candidate],
    user_active_counts: Mapping[str, int],
    model_live: bool,
    cooldown: set[BucketKey] | frozenset[BucketKey],
    now: datetime,
    config: GateConfig,
) -> list[Selected]:
    """The rows of ``model`` to claim this cycle, in claim order (§3.3 rules 1–3).

    * **Source A** (``leaked=False``): rows of a live model, or rows within ramp(W) of their
      deadline. Batches rank by (score, ``expires_at``, batch id) and each is drained oldest
      row first (ties by line) before the next; batchless rows rank by (score, D, id).
    * **Source B** (``leaked=True``): rows of a not-live model before their ramp whose bucket
      ``(owner, window-class, model)`` is not in ``cooldown``; at most one per (owner,
      window-class): the oldest row of that pair's best batch, or its best batchless row.
    * All of Source A, then Source B, each in (score, deadline, id) order; at most
      ``capacity`` rows. Equal scores get no round-robin: the earliest deadline takes all.

    Candidates of other models are ignored. Rule 4 (the cross-model ``claim_batch_size``
    limit, models in random order) is the caller's.

    Complexity, n candidates, c = capacity, k = batches: one O(n) pass groups batch rows by
    batch and ranks batchless rows (score and ramp per row are O(1)); batchless Source A is a
    heap selection, O(n log c); batches are ranked with a heap too, O(k log c), and only the
    ≤ c batches actually drained have their rows heap-selected, O(m log c) for a batch of m
    rows; Source B scans only the best batch of each (owner, class), O(m). No step sorts all
    n rows; memory is O(n) for the grouping.
    """
    if capacity <= 0:
        return []
    urgency = config.urgency_weight
    denominator = max(max_active_count(user_active_counts), 1)
    exponent = config.claim_ramp_exponent
    ramps: dict[float, float] = {}

    def ramp(window_s: float) -> float:
        value = ramps.get(window_s)
        if value is None:
            value = ramps[window_s] = ramp_seconds(window_s, exponent)
        return value

    batches: dict[str, list[Candidate]] = {}
    loose_a: list[_Pick] = []
    best_b: dict[tuple[str, str], _Pick] = {}

    for candidate in candidates:
        if candidate.model != model:
            continue
        batch_id = candidate.batch_id
        if batch_id is not None:
            rows = batches.get(batch_id)
            if rows is None:
                batches[batch_id] = [candidate]
            else:
                rows.append(candidate)
            continue
        until = (candidate.deadline - now).total_seconds()
        key: _Key = (
            _score(user_active_counts.get(candidate.owner, 0), denominator, until, urgency),
            candidate.deadline,
            candidate.request_id,
            candidate.created_at,
            0,
            candidate.request_id,
        )
        if model_live or until <= ramp(candidate.window_s):
            loose_a.append((key, candidate))
        elif (candidate.owner, candidate.window_class, model) not in cooldown:
            pair = (candidate.owner, candidate.window_class)
            held = best_b.get(pair)
            if held is None or key < held[0]:
                best_b[pair] = (key, candidate)

    # Batches: rank once per batch (owner, deadline, W and liveness are shared by its rows).
    ranked_a: list[tuple[_BatchKey, list[Candidate]]] = []
    best_batch_b: dict[tuple[str, str], tuple[_BatchKey, list[Candidate]]] = {}
    for batch_id, rows in batches.items():
        head = rows[0]
        until = (head.deadline - now).total_seconds()
        batch_key: _BatchKey = (
            _score(user_active_counts.get(head.owner, 0), denominator, until, urgency),
            head.deadline,
            batch_id,
        )
        if model_live or until <= ramp(head.window_s):
            ranked_a.append((batch_key, rows))
        elif (head.owner, head.window_class, model) not in cooldown:
            pair = (head.owner, head.window_class)
            held_batch = best_batch_b.get(pair)
            if held_batch is None or batch_key < held_batch[0]:
                best_batch_b[pair] = (batch_key, rows)

    source_a: list[_Pick] = []
    remaining = capacity
    for batch_key, rows in heapq.nsmallest(capacity, ranked_a, key=_first):
        for row in heapq.nsmallest(remaining, rows, key=_row_order):
            source_a.append((_batch_row_key(batch_key, row), row))
        remaining = capacity - len(source_a)
        if remaining <= 0:
            break
    source_a.extend(heapq.nsmallest(capacity, loose_a, key=_first))
    source_a.sort(key=_first)
    picks = source_a[:capacity]
    leaked_from = len(picks)

    room = capacity - leaked_from
    if room > 0:
        for pair, (batch_key, rows) in best_batch_b.items():
            oldest = min(rows, key=_row_order)
            pick = (_batch_row_key(batch_key, oldest), oldest)
            # The two families' window-classes never collide; should they, the best row of
            # the pair still wins, so ≤ 1 per (owner, class) holds regardless.
            held = best_b.get(pair)
            if held is None or pick[0] < held[0]:
                best_b[pair] = pick
        picks.extend(heapq.nsmallest(room, best_b.values(), key=_first))

    return [
        Selected(
            request_id=candidate.request_id,
            leaked=index >= leaked_from,
            window_class=candidate.window_class,
            window_s=candidate.window_s,
            owner=candidate.owner,
        )
        for index, (_, candidate) in enumerate(picks)
    ]


# -- the leaky bucket (§3.4) -----------------------------------------------------------------


def bucket_key(owner: str, window_class: str, model: str) -> BucketKey:
    return (owner, window_class, model)


def leak_interval_seconds(window_s: float, leaks_per_window: float) -> float:
    """Seconds between two leaks of one bucket: ``W / max(leaks_per_window, ε)``."""
    return max(window_s, 0.0) / max(leaks_per_window, LEAK_EPSILON)


def next_token_at(now: datetime, window_s: float, leaks_per_window: float) -> datetime:
    """When a bucket that just leaked a row of window ``window_s`` may leak again."""
    seconds = leak_interval_seconds(window_s, leaks_per_window)
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:  # leaks_per_window ≈ 0: the bucket never refills
        return datetime.max.replace(tzinfo=now.tzinfo)


def leak_stamps(
    selected: Iterable[Selected], model: str, now: datetime, leaks_per_window: float
) -> dict[BucketKey, datetime]:
    """New ``next_token_at`` of every bucket that leaked in this cycle (full-capacity claims
    never use a token)."""
    return {
        (row.owner, row.window_class, model): next_token_at(now, row.window_s, leaks_per_window)
        for row in selected
        if row.leaked
    }


def cooldown(buckets: Mapping[BucketKey, datetime], now: datetime) -> set[BucketKey]:
    """Buckets without a token this cycle: ``next_token_at > now``."""
    return {key for key, at in buckets.items() if at > now}


def expired_buckets(buckets: Mapping[BucketKey, datetime], now: datetime) -> list[BucketKey]:
    """Buckets whose token is back (``next_token_at ≤ now``): they carry no state any more."""
    return [key for key, at in buckets.items() if at <= now]


def drop_expired(buckets: MutableMapping[BucketKey, datetime], now: datetime) -> list[BucketKey]:
    """Delete the expired buckets from ``buckets`` in place; returns the keys dropped."""
    dropped = expired_buckets(buckets, now)
    for key in dropped:
        del buckets[key]
    return dropped
