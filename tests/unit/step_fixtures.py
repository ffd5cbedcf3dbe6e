"""Steps in any state for the loop's tests, and the §1.2 invariants as a test oracle.

Steps move by the production rule (:func:`streams.responses.steps.step_after`) and take the
timestamps the projector gives them (``projections.writers._MOVE_STEPS``); in production the
invariants are the read model's CHECK constraints.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from streams.responses.steps import (
    IN_FLIGHT_STEP_STATES,
    Step,
    StepFact,
    StepKind,
    StepState,
    step_after,
)


def _next(step: Step, fact: StepFact) -> StepState:
    state = step_after(step.state, fact)
    assert state is not None, f"{fact} does not apply to a {step.state} step"
    return state


def started(step: Step, at: datetime) -> Step:
    return msgspec.structs.replace(step, state=_next(step, "started"), started_at=at, updated_at=at)


def completed(step: Step, payload: Any, at: datetime) -> Step:
    return msgspec.structs.replace(
        step,
        state=_next(step, "completed"),
        response_payload=payload,
        started_at=step.started_at or at,
        completed_at=at,
        updated_at=at,
    )


def failed(step: Step, error: Any, at: datetime) -> Step:
    return msgspec.structs.replace(
        step, state=_next(step, "failed"), error=error, failed_at=at, updated_at=at
    )


def canceled(step: Step, at: datetime) -> Step:
    """No fact cancels a step in Cannonade; the state is the reference's, and stored chains
    may hold it, so the loop's rules must still read it."""
    assert step.state in IN_FLIGHT_STEP_STATES
    return msgspec.structs.replace(step, state=StepState.CANCELED, canceled_at=at, updated_at=at)


_OPTIONAL_FIELDS = (
    "started_at",
    "completed_at",
    "failed_at",
    "canceled_at",
    "response_payload",
    "error",
)
_REQUIRED: dict[StepState, tuple[str, ...]] = {
    StepState.PENDING: (),
    StepState.PROCESSING: ("started_at",),
    StepState.COMPLETED: ("started_at", "completed_at", "response_payload"),
    StepState.FAILED: ("failed_at", "error"),
    StepState.CANCELED: ("canceled_at",),
}
_FORBIDDEN: dict[StepState, tuple[str, ...]] = {
    StepState.PENDING: _OPTIONAL_FIELDS,
    StepState.PROCESSING: ("completed_at", "failed_at", "canceled_at", "response_payload", "error"),
    StepState.COMPLETED: ("failed_at", "canceled_at", "error"),
    StepState.FAILED: ("completed_at", "canceled_at", "response_payload"),
    StepState.CANCELED: ("completed_at", "failed_at", "response_payload"),
}


def _is_set(step: Step, field: str) -> bool:
    if field == "response_payload":
        return step.has_response_payload
    return getattr(step, field) is not None


def step_violations(step: Step) -> list[str]:
    """Every §1.2 rule `step` breaks, as readable sentences; empty when it is well-formed."""
    problems: list[str] = []
    if step.step_kind is StepKind.MODEL_CALL and step.request_id is None:
        problems.append("model_call step must have a request_id")
    if step.step_kind is StepKind.TOOL_CALL and step.request_id is not None:
        problems.append("tool_call step must not have a request_id")
    problems += [
        f"{step.state} step requires {field}"
        for field in _REQUIRED[step.state]
        if not _is_set(step, field)
    ]
    problems += [
        f"{step.state} step must not have {field}"
        for field in _FORBIDDEN[step.state]
        if _is_set(step, field)
    ]
    return problems


def chain_violations(chain: Sequence[Step]) -> list[str]:
    """Per-step rules plus the chain-wide ones: unique ids and a 1:1 step ↔ request row."""
    problems = [f"step {s.id}: {p}" for s in chain for p in step_violations(s)]
    seen_ids: set[str] = set()
    seen_requests: set[str] = set()
    for step in chain:
        if step.id in seen_ids:
            problems.append(f"step id {step.id} appears twice")
        seen_ids.add(step.id)
        if step.request_id is not None:
            if step.request_id in seen_requests:
                problems.append(f"request_id {step.request_id} backs more than one step")
            seen_requests.add(step.request_id)
    return problems
