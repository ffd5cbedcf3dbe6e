"""The multi-step loop as pure functions (§2.6–§2.11) and the assembled response (§3).

The chain agent folds step facts into a chain, calls `evaluate` when a round has settled and
publishes what comes back: steps to record (`AppendSteps`), or a terminal outcome that
`conclude` turns into the head row's completion or failure. Executors shape what their HTTP
calls returned with the `*_result` functions below.
"""

from __future__ import annotations

import http
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

import msgspec

from streams.execution.failure import NetworkError, NonRetriableHttpStatus
from streams.execution.outcome import Failure, Outcome, Success
from streams.responses.inputs import ParentRequest, compact_json
from streams.responses.steps import (
    IN_FLIGHT_STEP_STATES,
    TERMINAL_STEP_STATES,
    Placed,
    Step,
    StepDescriptor,
    StepKind,
    StepState,
    response_id,
)
from streams.responses.translate import (
    function_call_item,
    is_int,
    item_id,
    message_item,
    responses_tool_choice,
    responses_tools,
    responses_usage,
    unique_call,
)

DEFAULT_MAX_RESPONSE_ITERATIONS = 10
ITERATION_CAP_MESSAGE = "response loop exceeded max_response_iterations cap"
EMPTY_ACTION_MESSAGE = "empty_action"
STEP_ABANDONED: dict[str, str] = {
    "type": "step_abandoned",
    "message": "a step was in flight when this worker took over; "
    "the previous worker exited before completing it",
}
STEP_FAILED: dict[str, str] = {"type": "step_failed"}


class AppendSteps(msgspec.Struct, frozen=True):
    descriptors: tuple[StepDescriptor, ...]


class Complete(msgspec.Struct, frozen=True):
    payload: Any


class Fail(msgspec.Struct, frozen=True):
    error: Any


class LoopError(msgspec.Struct, frozen=True):
    """The loop itself gave up (cap, empty action); finalised as a `loop_error`."""

    message: str


Action = AppendSteps | Complete | Fail


class Evaluation(msgspec.Struct, frozen=True):
    outcome: Action | LoopError
    evaluations: int  # to persist with the chain: the cap spans workers (§2.10)


# --- payloads (§2.6, §2.7) -------------------------------------------------------------------


def initial_payload(parent: ParentRequest) -> dict[str, Any]:
    return _payload(parent, list(parent.messages))


def follow_up_payload(parent: ParentRequest, chain: Sequence[Step]) -> dict[str, Any]:
    """The initial messages plus every completed step's turn, in sequence order."""
    messages = list(parent.messages)
    payloads = _model_payloads(chain)
    for step in _ordered(chain):
        if step.state is not StepState.COMPLETED:
            continue
        if step.step_kind is StepKind.MODEL_CALL:
            message = _first_message(payloads[step.id])
            if message is not None:
                messages.append(message)
        else:
            # Deviation: the real call id; the reference sent "unknown".
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _tool_call_id(step),
                    "content": compact_json(_payload_or_none(step)),
                }
            )
    return _payload(parent, messages)


def _payload(parent: ParentRequest, messages: list[Any]) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": parent.model, "messages": messages, "stream": parent.stream}
    if parent.tools is not None:
        payload["tools"] = parent.tools
    return payload


def extract_tool_calls(payload: Any) -> list[dict[str, Any]]:
    """`{"name","args","call_id"}` per named entry of `choices[0].message.tool_calls`."""
    message = _first_message(payload)
    calls = message.get("tool_calls") if message is not None else None
    extracted: list[dict[str, Any]] = []
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            continue
        function = call["function"]
        if not isinstance(function.get("name"), str):
            continue
        call_id = call.get("id")
        extracted.append(
            {
                "name": function["name"],
                "args": _arguments(function.get("arguments")),
                "call_id": call_id if isinstance(call_id, str) else "call_unknown",
            }
        )
    return extracted


def _arguments(arguments: Any) -> Any:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            return msgspec.json.decode(arguments)
        except (msgspec.DecodeError, RecursionError):
            return {}
    return arguments


def _first_message(payload: Any) -> dict[str, Any] | None:
    choices = payload.get("choices") if isinstance(payload, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    return message if isinstance(message, dict) else None


def _model_payload(step: Step) -> Any:
    payload = _payload_or_none(step)
    return {} if payload is None else payload


def _model_payloads(chain: Sequence[Step]) -> dict[str, Any]:
    """Each completed model call's payload by step id, its tool calls' ids unique."""
    taken: set[str] = set()
    payloads: dict[str, Any] = {}
    for step in _ordered(chain):
        if step.step_kind is StepKind.MODEL_CALL and step.state is StepState.COMPLETED:
            payloads[step.id] = with_unique_call_ids(
                _model_payload(step), step.step_sequence, taken
            )
    return payloads


def with_unique_call_ids(payload: Any, sequence: int, taken: set[str]) -> Any:
    """A model call's `payload` whose tool calls have ids no earlier call of the chain had.

    Deviation (§2.7, §3): a call without an id, or with one an earlier call took (upstreams
    that count from `call_0` every round), is named `call_<sequence>_<index>` rather than
    `call_unknown` or the repeat, so that its tool step, the follow-up messages, the assembled
    items and the stream each name one call (the `openai` SDK refuses a response naming two
    alike). `taken` holds the ids of the chain's earlier calls and gains these: the ids follow
    from the chain alone, and a replay names them alike.
    """
    message = _first_message(payload)
    calls = message.get("tool_calls") if message is not None else None
    if message is None or not isinstance(calls, list):
        return payload
    unique = [
        unique_call(call, f"call_{sequence}_{index}", taken) if isinstance(call, dict) else call
        for index, call in enumerate(calls)
    ]
    if unique == calls:
        return payload
    choices = payload["choices"]
    return payload | {"choices": [choices[0] | {"message": message | {"tool_calls": unique}}, *choices[1:]]}  # fmt: skip


def _payload_or_none(step: Step) -> Any:
    return step.response_payload if step.has_response_payload else None


def _tool_call_id(step: Step) -> str:
    payload = step.request_payload
    call_id = payload.get("call_id") if isinstance(payload, dict) else None
    return call_id if isinstance(call_id, str) else f"call_step_{step.step_sequence}"


_S = TypeVar("_S", bound=Placed)


def _ordered(chain: Sequence[_S]) -> list[_S]:
    return sorted(chain, key=lambda s: s.step_sequence)


# --- transition (§2.8) and cap (§2.10) -------------------------------------------------------


def latest_round(chain: Sequence[_S]) -> list[_S]:
    """The last model call alone, or the tool calls recorded after the last model call."""
    steps = _ordered(chain)
    if not steps or steps[-1].step_kind is StepKind.MODEL_CALL:
        return steps[-1:]
    round_: list[_S] = []
    for step in reversed(steps):
        if step.step_kind is StepKind.MODEL_CALL:
            break
        round_.append(step)
    return round_[::-1]


def round_settled(chain: Sequence[Placed]) -> bool:
    """True when the chain is ready for its next evaluation (an empty chain is)."""
    return all(step.state in TERMINAL_STEP_STATES for step in latest_round(chain))


def next_action(
    parent: ParentRequest, chain: Sequence[Step], resolved_tool_names: Collection[str]
) -> Action:
    steps = _ordered(chain)
    if not steps:
        return AppendSteps((StepDescriptor(StepKind.MODEL_CALL, initial_payload(parent)),))
    # Rule 2: whatever was in flight may have had effects; it is never fired again.
    if any(step.state in IN_FLIGHT_STEP_STATES for step in steps):
        return Fail(dict(STEP_ABANDONED))
    failed = [s for s in latest_round(steps) if s.state is StepState.FAILED]
    if failed:
        return Fail(failed[0].error if failed[0].error is not None else dict(STEP_FAILED))
    completed = [s for s in steps if s.state is StepState.COMPLETED]
    if not completed:
        return Fail(dict(STEP_ABANDONED))
    last = completed[-1]
    if last.step_kind is StepKind.TOOL_CALL:
        return AppendSteps((StepDescriptor(StepKind.MODEL_CALL, follow_up_payload(parent, steps)),))
    payload = _model_payloads(steps)[last.id]
    calls = extract_tool_calls(payload)
    # A round with any client-side function goes back to the client whole, never half-run.
    if calls and all(call["name"] in resolved_tool_names for call in calls):
        return AppendSteps(tuple(StepDescriptor(StepKind.TOOL_CALL, call) for call in calls))
    return Complete(payload)


def evaluate(
    parent: ParentRequest,
    chain: Sequence[Step],
    resolved_tool_names: Collection[str],
    evaluations: int,
    max_iterations: int = DEFAULT_MAX_RESPONSE_ITERATIONS,
) -> Evaluation:
    """One counted evaluation; `evaluations` is how many this response has had so far."""
    if evaluations >= max_iterations:
        return Evaluation(LoopError(ITERATION_CAP_MESSAGE), evaluations)
    action = next_action(parent, chain, resolved_tool_names)
    if isinstance(action, AppendSteps) and not action.descriptors:
        return Evaluation(LoopError(EMPTY_ACTION_MESSAGE), evaluations + 1)
    return Evaluation(action, evaluations + 1)


# --- executing a round (§2.9) ----------------------------------------------------------------


class StepSucceeded(msgspec.Struct, frozen=True):
    payload: Any


class StepErrored(msgspec.Struct, frozen=True):
    error: dict[str, str]


StepResult = StepSucceeded | StepErrored


class ModelCallOutcome(msgspec.Struct, frozen=True):
    """The step's result and, for a non-head model call, what its request row records."""

    step: StepResult
    row: Outcome


def executor_error(message: str) -> StepErrored:
    return StepErrored({"type": "executor_error", "message": f"executor error: {message}"})


def _text(body: bytes | str) -> str:
    return body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "<unknown status code>"


def model_call_result(
    status: int, body: bytes | str, reason: str | None = None
) -> ModelCallOutcome:
    """An upstream chat-completions answer (streamed replies already reassembled)."""
    text = _text(body)
    if not 200 <= status < 300:
        phrase = reason if reason is not None else _reason(status)
        return ModelCallOutcome(
            executor_error(f"model call returned HTTP {status} {phrase}: {text}"),
            Failure(NonRetriableHttpStatus(status=status, body=text)),
        )
    try:
        payload = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError) as exc:
        cause = f"model call returned invalid JSON: {exc}"
        return ModelCallOutcome(executor_error(cause), Failure(NetworkError.of(cause)))
    return ModelCallOutcome(StepSucceeded(payload), Success(status=status, body=text))


def model_call_transport_error(cause: str) -> ModelCallOutcome:
    return ModelCallOutcome(executor_error(cause), Failure(NetworkError.of(cause)))


def tool_call_result(status: int, body: bytes | str) -> StepResult:
    text = _text(body)
    if not 200 <= status < 300:
        return executor_error(f"HTTP {status}: {text}")
    try:
        return StepSucceeded(msgspec.json.decode(text))
    except (msgspec.DecodeError, RecursionError):
        return StepSucceeded({"result": text})


def tool_timeout(name: str, timeout_secs: float) -> StepErrored:
    seconds = int(timeout_secs) if float(timeout_secs).is_integer() else timeout_secs
    return executor_error(f"tool '{name}' timed out after {seconds}s")


def tool_transport_error(cause: str) -> StepErrored:
    return executor_error(cause)


def tool_not_found(name: str) -> StepErrored:
    return StepErrored({"type": "executor_error", "message": f"executor target not found: {name}"})


# --- assembly (§3) ---------------------------------------------------------------------------


def merge_usage(total: Any, new: Any) -> Any:
    """§3 per key: integers add up, anything else takes the new value.

    Nested objects (token details) merge by the same rule instead of being replaced, so
    cached and reasoning tokens also add up across calls.
    """
    if total is None:
        return new
    if not isinstance(total, dict) or not isinstance(new, dict):
        return new
    merged = dict(total)
    for key, value in new.items():
        old = merged.get(key)
        if is_int(old) and is_int(value):
            merged[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            merged[key] = merge_usage(old, value)
        else:
            merged[key] = value
    return merged


def assemble_output(chain: Sequence[Step]) -> tuple[list[dict[str, Any]], Any]:
    """(output items, merged chat usage or None) from the completed steps in order."""
    output: list[dict[str, Any]] = []
    usage: Any = None
    payloads = _model_payloads(chain)
    for step in _ordered(chain):
        if step.state is not StepState.COMPLETED:
            continue
        if step.step_kind is StepKind.TOOL_CALL:
            output.append(
                {
                    "type": "function_call_output",
                    "id": item_id("fco", step.id, 0),
                    "status": "completed",
                    "call_id": _tool_call_id(step),
                    "output": compact_json(_payload_or_none(step)),
                }
            )
            continue
        payload = payloads[step.id]
        message = _first_message(payload)
        if message is not None:
            content = message.get("content")
            if isinstance(content, str) and content:
                output.append(message_item(content, item_id("msg", step.id, 0)))
            calls = message.get("tool_calls")
            for index, call in enumerate(calls if isinstance(calls, list) else []):
                if isinstance(call, dict):
                    output.append(function_call_item(call, item_id("fc", step.id, index + 1)))
        if isinstance(payload, dict) and "usage" in payload:
            usage = merge_usage(usage, payload["usage"])
    return output, usage


def assemble_response(
    head_id: str,
    chain: Sequence[Step],
    parent: ParentRequest,
    *,
    created_at: int,
    completed_at: int,
) -> dict[str, Any]:
    """The completed Responses object of a chain; usage in Responses style (README decision)."""
    output, usage = assemble_output(chain)
    response: dict[str, Any] = {
        "id": response_id(head_id),
        "object": "response",
        "created_at": created_at,
        "status": "completed",
        "completed_at": completed_at,
        "model": parent.model,
        "background": parent.background,
        "output": output,
        "tools": responses_tools(parent.tools),
        "tool_choice": responses_tool_choice(parent.tool_choice),
        "parallel_tool_calls": parent.parallel_tool_calls,
    }
    converted = responses_usage(usage)
    if converted is not None:
        response["usage"] = converted
    return response


# --- termination (§2.11) ---------------------------------------------------------------------


class HeadCompleted(msgspec.Struct, frozen=True):
    """Complete the head row: `response_status` = status, `response_body` = body."""

    status: int
    body: str


class HeadFailed(msgspec.Struct, frozen=True):
    """Fail the head row with `error` = the NonRetriableHttpStatus envelope text.

    Non-retriable on purpose: the core retry policy must not re-run a finalised chain.
    """

    status: int
    error: str


HeadFinalization = HeadCompleted | HeadFailed


def loop_error_payload(message: str) -> dict[str, str]:
    return {"type": "loop_error", "message": message}


def finalize(status: int, body: Any) -> HeadFinalization:
    text = compact_json(body)
    if status == 200:
        return HeadCompleted(status=200, body=text)
    return HeadFailed(
        status=status, error=NonRetriableHttpStatus(status=status, body=text).to_json()
    )


def conclude(
    outcome: Complete | Fail | LoopError,
    head_id: str,
    chain: Sequence[Step],
    parent: ParentRequest,
    *,
    created_at: int,
    completed_at: int,
) -> HeadFinalization:
    if isinstance(outcome, Complete):
        assembled = assemble_response(
            head_id, chain, parent, created_at=created_at, completed_at=completed_at
        )
        return finalize(200, assembled)
    if isinstance(outcome, Fail):
        return finalize(500, outcome.error)
    return finalize(500, loop_error_payload(outcome.message))
