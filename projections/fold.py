"""Folding request lifecycle events into read-model writes, free of I/O.

The gate records in every transition the state it left (``from_state``), so the projector needs
no copy of the rows to fold them: per poll it checks each event against the state machine
(:func:`streams.lifecycle.next_state`), collapses each request's events into one write of the
columns they set, and lets SQL move the batch counters from the first ``from_state`` to the
last state. A row remembers the offset of the last event applied to it and a write applies
only past it, so projecting a topic twice changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from schemas.events import (
    BatchlessFacts,
    RealtimeCompletionReported,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestCreated,
    RequestErased,
    RequestEvent,
    RequestFailed,
    RequestReclaimed,
    RequestRetried,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
    RequestTransition,
    State,
)
from streams.lifecycle import TERMINAL, next_state

#: Columns a transition may set, in bit order of :attr:`RowWrite.mask`.
COLUMNS: tuple[str, ...] = (
    "claim_id",
    "daemon_id",
    "claimed_at",
    "started_at",
    "retry_attempt",
    "not_before",
    "response_status",
    "response_size",
    "error_type",
    "routed_model",
    "completed_at",
    "failed_at",
    "canceled_at",
    "error_envelope",
)
_BIT = {column: 1 << i for i, column in enumerate(COLUMNS)}
COLUMN_TYPES = {
    "claim_id": "uuid", "daemon_id": "text", "claimed_at": "timestamptz",
    "started_at": "timestamptz", "retry_attempt": "int", "not_before": "timestamptz",
    "response_status": "int", "response_size": "int", "error_type": "text",
    "routed_model": "text", "completed_at": "timestamptz", "failed_at": "timestamptz",
    "canceled_at": "timestamptz", "error_envelope": "bytea",
}  # fmt: skip


class NewRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    batch_id: str | None
    file_id: str | None
    line_number: int | None
    model: str
    owner: str
    state: State
    deadline: datetime
    created_at: datetime
    service_tier: str | None
    offset: int
    path: str | None = None
    background: bool = False
    api_key_id: str | None = None


def batchless_row(request_id: str, model: str, state: State, facts: BatchlessFacts, offset: int) -> NewRow:  # fmt: skip
    return NewRow(
        id=request_id, batch_id=None, file_id=None, line_number=None, model=model,
        owner=facts.owner, state=state, deadline=facts.deadline, created_at=facts.created_at,
        service_tier=facts.service_tier, offset=offset, path=facts.path,
        background=facts.background, api_key_id=facts.api_key_id,
    )  # fmt: skip


class RowWrite(msgspec.Struct):
    """One request's net change over a poll."""

    id: str
    first_offset: int
    last_offset: int
    from_state: State
    state: State
    values: dict[str, Any]
    batchless: bool = False
    # The batch version of an explicit retry that re-pended it: its batch is live again.
    retried_version: int | None = None

    @property
    def mask(self) -> int:
        return sum(_BIT[c] for c in self.values)


class Fold:
    """Accumulates one poll's lifecycle events."""

    def __init__(self) -> None:
        self.new_rows: dict[str, NewRow] = {}
        self.writes: dict[str, RowWrite] = {}
        # Outcomes of rows never claimed, applied with responses §5 (insert if absent).
        self.realtime: dict[str, tuple[RealtimeCompletionReported, int]] = {}
        self.erased: set[str] = set()
        self.rejected: list[tuple[RequestEvent, str]] = []  # events that do not apply
        # Each write's events in order, for :func:`rebuilt` when its first one was stale.
        self.steps: dict[str, list[tuple[RequestTransition, int]]] = {}

    def apply(self, event: RequestEvent, offset: int) -> None:
        if isinstance(event, RequestsPending):
            for item in event.items:
                self.new_rows.setdefault(
                    item.request_id,
                    NewRow(
                        id=item.request_id,
                        batch_id=event.batch_id,
                        file_id=event.file_id,
                        line_number=item.line_number,
                        model=event.model,
                        owner=event.owner,
                        state="pending",
                        deadline=event.deadline,
                        created_at=event.created_at,
                        service_tier=event.service_tier,
                        offset=offset,
                        path=None,
                    ),
                )
            return
        if isinstance(event, RequestCreated):
            row = batchless_row(event.request_id, event.model, event.state, event.facts, offset)
            self.new_rows.setdefault(event.request_id, row)
            return
        if isinstance(event, RealtimeCompletionReported):
            self.realtime.setdefault(event.request_id, (event, offset))
            return
        if isinstance(event, RequestErased):
            # Erasure wins over anything else the poll said of the row.
            self.erased.add(event.request_id)
            self.writes.pop(event.request_id, None)
            self.steps.pop(event.request_id, None)
            self.new_rows.pop(event.request_id, None)
            self.realtime.pop(event.request_id, None)
            return
        if event.request_id in self.erased:
            return
        state = next_state(event.from_state, event)
        write = self.writes.get(event.request_id)
        if state is None or (write is not None and write.state != event.from_state):
            found = event.from_state if write is None else write.state
            self.rejected.append((event, f"{type(event).__name__} does not apply to {found}"))
            return
        if write is None:
            write = self.writes[event.request_id] = _write(event, offset)
        _advance(write, event, state, offset)
        self.steps.setdefault(event.request_id, []).append((event, offset))


def rebuilt(steps: list[tuple[RequestTransition, int]], state: State, last_offset: int) -> RowWrite | None:  # fmt: skip
    """The write of a poll's events for a row that its first event did not find: the row is
    already past it (a decision the gate published again after a crash, whose first copy an
    earlier poll applied). From the row's state and position, each later event that applies
    moves it on, and the stale ones are skipped, as a single event is; None if none applies."""
    write: RowWrite | None = None
    for event, offset in steps:
        after = next_state(state, event) if event.from_state == state else None
        if offset <= last_offset or after is None:
            continue
        if write is None:
            write = _write(event, offset)
        _advance(write, event, after, offset)
        state = after
    return write


def _write(event: RequestTransition, offset: int) -> RowWrite:
    return RowWrite(
        event.request_id, offset, offset, event.from_state, event.from_state, {},
        batchless=event.batch_id is None,
    )  # fmt: skip


def _advance(write: RowWrite, event: RequestTransition, state: State, offset: int) -> None:
    write.state, write.last_offset = state, offset
    write.values.update(_fields(event))
    if isinstance(event, RequestRetried):
        write.retried_version = max(write.retried_version or 0, event.retry_version)


def settled(fold: Fold) -> set[str]:
    """Requests without a batch that ended in this poll: blocking API calls wait for them."""
    ended = {w.id for w in fold.writes.values() if w.batchless and w.state in TERMINAL}
    return ended | set(fold.realtime)


def _fields(event: RequestEvent) -> dict[str, Any]:
    """The columns each transition sets (core §1.4.2: each state carries exactly its fields)."""
    at = event.occurred_at
    match event:
        case RequestClaimed():
            return {
                "claim_id": event.claim_id, "daemon_id": event.worker_id, "claimed_at": at,
                "retry_attempt": event.attempt, "not_before": None, "started_at": None,
            }  # fmt: skip
        case RequestStarted():
            return {"daemon_id": event.worker_id, "started_at": at}
        case RequestRetryScheduled():
            return {
                "retry_attempt": event.attempt, "not_before": event.not_before,
                "claim_id": None, "daemon_id": None, "claimed_at": None, "started_at": None,
            }  # fmt: skip
        case RequestReclaimed():
            return {
                "retry_attempt": event.attempt, "claim_id": None, "daemon_id": None,
                "claimed_at": None, "started_at": None,
            }  # fmt: skip
        case RequestCompleted():
            return {
                "response_status": event.status, "response_size": event.size,
                "routed_model": event.routed_model, "completed_at": at, "canceled_at": None,
            }  # fmt: skip
        case RequestFailed():
            return {
                "error_type": event.error_type, "response_status": event.status,
                "response_size": event.size, "failed_at": at, "retry_attempt": event.attempt,
                "canceled_at": None,
                # An upstream failure's envelope is on the bodies topic; clearing an earlier
                # run's engine envelope lets the reads find it.
                "error_envelope": None if event.error is None else event.error.encode(),
            }  # fmt: skip
        case RequestCanceled():
            return {"canceled_at": at}
        case RequestRetried():
            return dict.fromkeys(COLUMNS) | {"retry_attempt": 0, "response_size": 0}
    return {}
