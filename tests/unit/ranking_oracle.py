"""The claim gate's ranking rules (spec ``core.md`` §3.3 rules 1–3) stated directly, over every
claimable unit of one model: the oracle the gate's own reads (``scoring.select_live`` for a
live model, ``scoring.select_paced`` for a not-live one), which read only as far as the claims
go, are checked against."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from datetime import datetime

from streams.gate.scoring import GateConfig, Take, Unit, score, within_ramp


def select(
    capacity: int,
    units: Iterable[Unit],
    user_active_counts: Mapping[str, int],
    model_live: bool,
    cooldown: AbstractSet[tuple[str, str]],
    now: datetime,
    config: GateConfig,
) -> list[Take]:
    """How many rows of each unit of one model to claim this cycle (§3.3 rules 1–3).

    * **Source A** (``leaked=False``): units of a live model, or within ramp(W) of their
      deadline, in (score, deadline, id) order; each batch is drained before the next (the
      earliest-deadline batch takes all capacity when scores are equal: no round-robin).
    * **Source B** (``leaked=True``): units of a not-live model before their ramp whose bucket
      ``(owner, window-class)`` of this model is not in ``cooldown``; one row per (owner,
      window-class): the best unit's oldest row.
    * All of Source A, then Source B, each in (score, deadline, id) order; at most
      ``capacity`` rows.

    Rule 4 (the cross-model ``claim_batch_size`` limit, models in random order) is the
    caller's.
    """
    if capacity <= 0:
        return []
    urgency = config.urgency_weight
    max_active = max(user_active_counts.values(), default=0)
    exponent = config.claim_ramp_exponent
    full: list[tuple[tuple[float, datetime, str], Unit]] = []
    leaky: dict[tuple[str, str], tuple[tuple[float, datetime, str], Unit]] = {}
    for unit in units:
        if unit.available <= 0:
            continue
        key = (
            score(user_active_counts.get(unit.owner, 0), max_active, unit.deadline, now, urgency),
            unit.deadline,
            unit.id,
        )
        if model_live or within_ramp(unit.deadline, unit.window_s, now, exponent):
            full.append((key, unit))
            continue
        pair = (unit.owner, unit.window_class)
        if pair in cooldown:
            continue
        held = leaky.get(pair)
        if held is None or key < held[0]:
            leaky[pair] = (key, unit)

    takes: list[Take] = []
    room = capacity
    for _, unit in sorted(full, key=_first):
        if room <= 0:
            return takes
        count = min(unit.available, room)
        takes.append(Take(unit, count, leaked=False))
        room -= count
    for _, unit in sorted(leaky.values(), key=_first)[:room]:
        takes.append(Take(unit, 1, leaked=True))
    return takes


def _first(pair: tuple[tuple[float, datetime, str], Unit]) -> tuple[float, datetime, str]:
    return pair[0]
