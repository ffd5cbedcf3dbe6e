"""The request state machine (core §5.1, §6 inv. 4), free of I/O.

The claim gate and the requests projector both fold lifecycle events through
:func:`next_state`, so the write path and the read model can never disagree on which
transitions exist. An event that does not apply to the current state returns ``None`` and is
ignored: that is what makes redelivery and replay harmless.
"""

from __future__ import annotations

from typing import Literal

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

State = Literal["pending", "claimed", "processing", "completed", "failed", "canceled"]

TERMINAL: frozenset[str] = frozenset({"completed", "failed", "canceled"})
IN_FLIGHT: frozenset[str] = frozenset({"claimed", "processing"})
ACTIVE: frozenset[str] = frozenset({"pending", "claimed", "processing"})


def next_state(current: State | None, event: RequestEvent) -> State | None:
    """The state after ``event``, or ``None`` when the event does not apply."""
    match event:
        case RequestsPending():
            return "pending" if current is None else None
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
    return None
