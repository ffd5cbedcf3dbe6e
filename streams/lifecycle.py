"""The request state machine (core §5.1, §6 inv. 4), free of I/O.

The claim gate decides every transition through :func:`next_state` and records the state it
left in the event (``from_state``); the projector folds the same events through the same
function, so a transition the gate makes is one the read model accepts, and an event that does
not apply (``None``) is a defect the projector dead-letters rather than a row it corrupts.
"""

from __future__ import annotations

from schemas.events import (
    RealtimeCompletionReported,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestCreated,
    RequestEvent,
    RequestFailed,
    RequestReclaimed,
    RequestRetried,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
    State,
)

__all__ = ["ACTIVE", "IN_FLIGHT", "TERMINAL", "State", "next_state"]

TERMINAL: frozenset[str] = frozenset({"completed", "failed", "canceled"})
IN_FLIGHT: frozenset[str] = frozenset({"claimed", "processing"})
ACTIVE: frozenset[str] = frozenset({"pending", "claimed", "processing"})


def next_state(current: State | None, event: RequestEvent) -> State | None:
    """The state after ``event``, or ``None`` when the event does not apply. (An erased row
    has no state: erasure applies from any state and removes the row.)"""
    match event:
        case RequestsPending():
            return "pending" if current is None else None
        case RequestCreated():
            return event.state if current is None else None
        case RealtimeCompletionReported():
            # Never claimed: from processing, or straight into its final state (insert if
            # absent); an ended row stays as it is (responses §5).
            if current is None or current == "processing":
                return "completed" if 200 <= event.status < 300 else "failed"
            return None
        case RequestClaimed():
            return "claimed" if current == "pending" else None
        case RequestStarted():
            return "processing" if current == "claimed" else None
        case RequestRetryScheduled() | RequestReclaimed():
            return "pending" if current in IN_FLIGHT else None
        case RequestCompleted():
            # completed/failed are hard terminals (first result wins); canceled is soft: a
            # genuine late result of work that was in flight supersedes it.
            return "completed" if current in ACTIVE or current == "canceled" else None
        case RequestFailed():
            return "failed" if current in ACTIVE or current == "canceled" else None
        case RequestCanceled():
            return "canceled" if current in ACTIVE else None
        case RequestRetried():
            # Only an explicit retry moves failed (and canceled) rows back (core §6 inv. 4).
            return "pending" if current in ("failed", "canceled") else None
    return None
