"""Folding request lifecycle events into read-model rows and batch counter deltas, free of I/O.

The projector loads the rows an event batch touches, folds the events through
:func:`apply`, and writes back the rows and the counter deltas in one transaction. A row
remembers the offset of the last event applied to it; an event at or below that offset is a
replay and changes nothing, so projecting a topic twice leaves the read model as it was.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

import msgspec

from schemas.events import (
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestEvent,
    RequestFailed,
    RequestReclaimed,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
)
from streams.lifecycle import State, next_state

# The batch counter each state is counted under.
COUNTER: dict[str, str] = {
    "pending": "pending",
    "claimed": "in_progress",
    "processing": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "canceled": "canceled",
}
COUNTERS = (
    "pending",
    "in_progress",
    "completed",
    "failed",
    "canceled",
    "response_bytes",
    "error_bytes",
)


class RequestRow(msgspec.Struct):
    id: str
    batch_id: str | None
    template_id: str | None
    line_number: int | None
    custom_id: str | None
    model: str
    owner: str
    state: State
    deadline: datetime
    created_at: datetime
    last_offset: int
    service_tier: str | None = None
    retry_attempt: int = 0
    not_before: datetime | None = None
    claim_id: str | None = None
    daemon_id: str | None = None
    claimed_at: datetime | None = None
    started_at: datetime | None = None
    response_status: int | None = None
    response_size: int = 0
    error_type: str | None = None
    routed_model: str | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    canceled_at: datetime | None = None


COLUMNS: tuple[str, ...] = tuple(RequestRow.__struct_fields__)


class BatchDelta(msgspec.Struct):
    counts: dict[str, int] = msgspec.field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    last_terminal_at: datetime | None = None


class Fold:
    """Accumulates row changes and per-batch deltas over one batch of events."""

    def __init__(self, rows: dict[str, RequestRow]) -> None:
        self.rows = rows
        self.changed: set[str] = set()
        self.deltas: dict[str, BatchDelta] = defaultdict(BatchDelta)

    def apply(self, event: RequestEvent, offset: int) -> None:
        if isinstance(event, RequestsPending):
            self._pending(event, offset)
            return
        row = self.rows.get(event.request_id)
        if row is None or offset <= row.last_offset:
            return
        state = next_state(row.state, event)
        row.last_offset = offset
        self.changed.add(row.id)
        if state is None:
            return
        was = row.state
        row.state = state
        _set_fields(row, event)
        if row.batch_id is not None:
            self._count(row, was, -1)
            self._count(row, state, +1)

    def _pending(self, event: RequestsPending, offset: int) -> None:
        for item in event.items:
            if item.request_id in self.rows:
                continue
            row = RequestRow(
                id=item.request_id,
                batch_id=event.batch_id,
                template_id=item.template_id,
                line_number=item.line_number,
                custom_id=item.custom_id,
                model=event.model,
                owner=event.owner,
                state="pending",
                deadline=event.deadline,
                created_at=event.created_at,
                service_tier=event.service_tier,
                last_offset=offset,
            )
            self.rows[row.id] = row
            self.changed.add(row.id)
            if row.batch_id is not None:
                self._count(row, "pending", +1)

    def _count(self, row: RequestRow, state: State, sign: int) -> None:
        assert row.batch_id is not None
        delta = self.deltas[row.batch_id]
        delta.counts[COUNTER[state]] += sign
        if state == "completed":
            delta.counts["response_bytes"] += sign * row.response_size
        elif state == "failed":
            delta.counts["error_bytes"] += sign * row.response_size
        if sign > 0 and state in ("completed", "failed", "canceled"):
            at = row.completed_at or row.failed_at or row.canceled_at
            if at is not None and (delta.last_terminal_at is None or at > delta.last_terminal_at):
                delta.last_terminal_at = at


def _set_fields(row: RequestRow, event: RequestEvent) -> None:
    """The fields each state carries (core §1.4.2)."""
    at = event.occurred_at
    match event:
        case RequestClaimed():
            row.claim_id, row.daemon_id, row.claimed_at = event.claim_id, event.worker_id, at
            row.retry_attempt, row.not_before, row.started_at = event.attempt, None, None
        case RequestStarted():
            row.daemon_id, row.started_at = event.worker_id, at
        case RequestRetryScheduled():
            row.retry_attempt, row.not_before = event.attempt, event.not_before
            row.claim_id = row.daemon_id = row.claimed_at = row.started_at = None
        case RequestReclaimed():
            row.retry_attempt = event.attempt
            row.claim_id = row.daemon_id = row.claimed_at = row.started_at = None
        case RequestCompleted():
            row.response_status, row.response_size = event.status, event.size
            row.routed_model, row.completed_at = event.routed_model, at
            row.canceled_at = None  # a genuine late result supersedes a cancel
        case RequestFailed():
            row.error_type, row.response_status = event.error_type, event.status
            row.response_size, row.failed_at, row.retry_attempt = event.size, at, event.attempt
            row.canceled_at = None
        case RequestCanceled():
            row.canceled_at = at
