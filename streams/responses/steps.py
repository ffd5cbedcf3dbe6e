"""Response steps: the record, its state machine and its ids (§1, §9.4, §0). The §1.2
invariants are CHECK constraints of the read model (``projections/migrations/006``).

A chain is the head step plus every step whose `parent_step_id` is the head. Step ids are
derived from (head, sequence) so that an agent re-emitting a round after redelivery names the
same steps and the same sub-request rows, and projectors can insert with ON CONFLICT DO NOTHING.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, Protocol

import msgspec

# Fixed forever: changing either renames every derived step and sub-request row, so a replay
# would no longer match what was projected. Both are uuid5(schemas.ids.NAMESPACE, name) for the
# names "responses/step" and "responses/sub-request", written out so other implementations can
# use them without importing Cannonade.
NS_STEP = uuid.UUID("f2de38fd-d765-5877-826f-3cab2c9fe587")
NS_SUBREQ = uuid.UUID("d9d6cdbf-1319-5880-82f4-11facfa8ee25")

SUB_REQUEST_PATH = "/v1/chat/completions"
#: A request on this path that has tools runs as a chain (§7.9).
RESPONSES_PATH = "/v1/responses"


class StepKind(StrEnum):
    MODEL_CALL = "model_call"
    TOOL_CALL = "tool_call"


class StepState(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STEP_STATES = frozenset({StepState.COMPLETED, StepState.FAILED, StepState.CANCELED})
IN_FLIGHT_STEP_STATES = frozenset({StepState.PENDING, StepState.PROCESSING})


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One model call or tool call of a response (§1.1). Ids are lower-case hyphenated UUIDs.

    `response_payload` is UNSET until completed rather than None, because a tool may answer
    the JSON value `null` and that is still a result.
    """

    id: str
    request_id: str | None
    prev_step_id: str | None
    parent_step_id: str | None
    step_kind: StepKind
    step_sequence: int
    request_payload: Any
    created_at: datetime
    updated_at: datetime
    response_payload: Any = msgspec.UNSET
    state: StepState = StepState.PENDING
    started_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    canceled_at: datetime | None = None
    retry_attempt: int = 0
    error: Any = None

    @property
    def is_head(self) -> bool:
        return self.parent_step_id is None

    @property
    def has_response_payload(self) -> bool:
        return self.response_payload is not msgspec.UNSET


class Placed(Protocol):
    """What ordering a chain into rounds needs of a step: the chain agent's compact entries
    (:class:`streams.chains.state.StepEntry`) have it as well as full steps."""

    @property
    def step_kind(self) -> StepKind: ...
    @property
    def step_sequence(self) -> int: ...
    @property
    def state(self) -> StepState: ...


class StepDescriptor(msgspec.Struct, frozen=True):
    """What the transition function asks to record: a kind and its request payload."""

    kind: StepKind
    request_payload: Any


class SubRequestRow(msgspec.Struct, frozen=True):
    """The batchless request row backing a non-head model call, created `processing` (§1.3)."""

    id: str
    model: str
    path: str
    body: str


# --- ids -------------------------------------------------------------------------------------

_UUID_TEXT = re.compile(
    r"(?:urn:uuid:)?(?P<hyphenated>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"|\{(?P<braced>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}"
    r"|(?P<simple>[0-9a-fA-F]{32})"
)


def parse_response_id(text: str) -> str | None:
    """`resp_<uuid>` or `<uuid>` → the canonical uuid; anything else → None ("not found").

    Accepts the forms the reference's UUID parser does (hyphenated, simple, braced, urn) and
    nothing looser: Python's `uuid.UUID` would also take stray hyphens, underscores and spaces.
    """
    rest = text.removeprefix("resp_")
    if _UUID_TEXT.fullmatch(rest) is None:
        return None
    return str(uuid.UUID(rest))


def response_id(head_id: str) -> str:
    return f"resp_{head_id}"


def step_id(head_id: str, sequence: int) -> str:
    """The head keeps the response uuid; later steps are uuid5(NS_STEP, "<head>:<s>")."""
    if sequence == 1:
        return head_id
    return str(uuid.uuid5(NS_STEP, f"{head_id}:{sequence}"))


def sub_request_id(head_id: str, sequence: int) -> str:
    """The head model call reuses the response's own row; later ones get a derived row id."""
    if sequence == 1:
        return head_id
    return str(uuid.uuid5(NS_SUBREQ, f"{head_id}:{sequence}"))


# --- recording (§1.3) ------------------------------------------------------------------------


def record_step(
    chain: Sequence[Step], head_id: str, descriptor: StepDescriptor, now: datetime
) -> Step:
    """The `pending` step that recording `descriptor` after `chain` inserts."""
    last = max(chain, key=lambda s: s.step_sequence, default=None)
    sequence = 1 if last is None else last.step_sequence + 1
    is_model_call = descriptor.kind is StepKind.MODEL_CALL
    return Step(
        id=step_id(head_id, sequence),
        request_id=sub_request_id(head_id, sequence) if is_model_call else None,
        prev_step_id=None if last is None else last.id,
        parent_step_id=None if last is None else head_id,
        step_kind=descriptor.kind,
        step_sequence=sequence,
        request_payload=descriptor.request_payload,
        created_at=now,
        updated_at=now,
    )


def record_round(
    chain: Sequence[Step], head_id: str, descriptors: Iterable[StepDescriptor], now: datetime
) -> list[Step]:
    """Record a round in order: siblings link k → k−1, the first to the previous round's last."""
    recorded: list[Step] = []
    for descriptor in descriptors:
        recorded.append(record_step([*chain, *recorded], head_id, descriptor, now))
    return recorded


def sub_request_row(step: Step) -> SubRequestRow | None:
    """The row to create for a non-head model call; None for the head and for tool calls."""
    if step.step_kind is not StepKind.MODEL_CALL or step.is_head or step.request_id is None:
        return None
    payload = step.request_payload
    model = payload.get("model") if isinstance(payload, dict) else None
    return SubRequestRow(
        id=step.request_id,
        model=model if isinstance(model, str) else "",
        path=SUB_REQUEST_PATH,
        body=msgspec.json.encode(payload).decode(),
    )


# --- state machine (§1.4) --------------------------------------------------------------------

#: What the chain agent hears about a step: StepStarted, StepCompleted, StepFailed.
StepFact = Literal["started", "completed", "failed"]


def step_after(state: StepState, fact: StepFact) -> StepState | None:
    """The state ``fact`` moves a step in ``state`` to, or None when it does not apply.

    Steps move only by facts on the responses topic, which Kafka may deliver again or after a
    later one, so a fact that does not apply is dropped, never an error (§1.4's last rule): a
    start moves only a pending step; the first completion or failure ends a step that has not
    ended, started or not. The projector folds the same rule in SQL
    (``projections.writers._MOVE_STEPS``).
    """
    if fact == "started":
        return StepState.PROCESSING if state is StepState.PENDING else None
    if state in TERMINAL_STEP_STATES:
        return None
    return StepState.COMPLETED if fact == "completed" else StepState.FAILED
