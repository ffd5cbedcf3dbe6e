"""Pending request counts by model and deadline window (core §2.7), with the priority decay.

Control planes use these counts for capacity admission ("how much work is due within 1 h on
this model?"). Eligibility is the claim gate's (§3.1, §6 inv. 6): pending/in-flight rows of
live batches or batchless rows, whose template is present.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg
import msgspec

from schemas.errors import ApiError

TierFilter = tuple[Literal["any", "include", "exclude"], frozenset[str]]
ANY_TIER: TierFilter = ("any", frozenset())
DECAY_LABEL = "1h"


class Window(msgspec.Struct, frozen=True, array_like=True):
    label: str
    start_s: float | None  # None: no lower bound (overdue rows count)
    end_s: float


def validate(windows: list[Window], priority_decay_s: float | None) -> None:
    for w in windows:
        if w.start_s is not None and w.start_s > w.end_s:
            raise ApiError(400, f"Window '{w.label}': start must not be after end")
    if priority_decay_s is not None and priority_decay_s < 0:
        raise ApiError(400, "priority_decay_window must be >= 0")


def shape(
    windows: list[Window], rows: list[tuple[str, list[int], bool]], decay: dict[str, int]
) -> dict[str, dict[str, int]]:
    """``rows``: per model, its count per window and whether any counted row is due before
    now + max(end). A model appears iff it has such a row; it then lists every label."""
    result: dict[str, dict[str, int]] = {}
    for model, counts, present in rows:
        if not present:
            continue
        labels = {w.label: n for w, n in zip(windows, counts, strict=True)}
        if DECAY_LABEL in labels:
            labels[DECAY_LABEL] += decay.get(model, 0)
        result[model] = labels
    return result


def _tier_clause(tier: TierFilter, args: list[Any]) -> str:
    kind, values = tier
    if kind == "any":
        return "true"
    args.append([v for v in values if v != "absent"])
    named = f"r.service_tier = ANY(${len(args)}::text[])"
    matches = f"({named} OR r.service_tier IS NULL)" if "absent" in values else named
    return matches if kind == "include" else f"NOT COALESCE({matches}, false)"


# A row's template is line line_number of its file (batch rows; a batchless row carries its
# own body and is deleted whole by erasure).
_TEMPLATE = (
    "LEFT JOIN request_templates t ON t.file_id = r.file_id AND t.line_number = r.line_number"
)
_PRESENT = "(r.file_id IS NULL OR t.file_id IS NOT NULL)"
_ELIGIBLE = f"""
    FROM requests r
    {_TEMPLATE}
    LEFT JOIN batches b ON b.id = r.batch_id
    WHERE {_PRESENT}
      AND (r.batch_id IS NULL OR (b.cancelling_at IS NULL AND b.deleted_at IS NULL
           AND b.completed_at IS NULL AND b.failed_at IS NULL AND b.cancelled_at IS NULL))
"""


async def pending_counts(
    conn: asyncpg.Connection,
    windows: list[Window],
    states: list[str],
    now: datetime,
    *,
    models: list[str] | None = None,
    tier: TierFilter = ANY_TIER,
    priority_decay_s: float | None = None,
) -> dict[str, dict[str, int]]:
    validate(windows, priority_decay_s)
    if not windows or not states:
        return {}
    args: list[Any] = [states]
    where = ["r.state = ANY($1::text[])"]
    if models:
        args.append(models)
        where.append(f"r.model = ANY(${len(args)}::text[])")
    where.append(_tier_clause(tier, args))
    filters = []
    for w in windows:
        args.append(now + timedelta(seconds=w.end_s))
        upper = f"r.deadline < ${len(args)}"
        if w.start_s is None:
            filters.append(f"count(*) FILTER (WHERE {upper})")
        else:
            args.append(now + timedelta(seconds=w.start_s))
            filters.append(f"count(*) FILTER (WHERE {upper} AND r.deadline >= ${len(args)})")
    args.append(now + timedelta(seconds=max(w.end_s for w in windows)))
    present = f"bool_or(r.deadline < ${len(args)})"
    records = await conn.fetch(
        f"SELECT r.model, {', '.join(filters)}, {present} {_ELIGIBLE} AND {' AND '.join(where)}"
        " GROUP BY r.model",
        *args,
    )
    rows = [(r[0], [int(v) for v in list(r)[1:-1]], bool(r[-1])) for r in records]
    decay: dict[str, int] = {}
    if priority_decay_s is not None and any(w.label == DECAY_LABEL for w in windows):
        decay_args: list[Any] = [now - timedelta(seconds=priority_decay_s), now]
        model_clause = ""
        if models:
            decay_args.append(models)
            model_clause = " AND r.model = ANY($3::text[])"
        for r in await conn.fetch(
            f"SELECT r.model, count(*) FROM requests r {_TEMPLATE}"
            f" WHERE {_PRESENT} AND r.service_tier = 'flex' AND r.state = 'completed'"
            f" AND r.completed_at BETWEEN $1 AND $2{model_clause} GROUP BY r.model",
            *decay_args,
        ):
            decay[r[0]] = int(r[1])
    return shape(windows, rows, decay)
