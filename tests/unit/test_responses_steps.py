"""Response steps: ids (§0, §9.4), recording (§1.3), the state machine (§1.4), invariants (§1.2)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.ids import NAMESPACE
from streams.responses.steps import (
    NS_STEP,
    NS_SUBREQ,
    Step,
    StepDescriptor,
    StepKind,
    StepNotFoundError,
    StepState,
    StepTransitionError,
    cancel,
    chain_violations,
    complete,
    fail,
    find_step,
    mark_processing,
    parse_response_id,
    record_round,
    record_step,
    requeue_for_retry,
    response_id,
    step_id,
    step_violations,
    sub_request_id,
    sub_request_row,
)

HEAD = "0b7e6a52-6f0c-4d8e-9a41-3c2d1e0f9a8b"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)
T2 = T0 + timedelta(seconds=2)

MODEL = StepDescriptor(StepKind.MODEL_CALL, {"model": "llama", "messages": [], "stream": False})


def tool(call_id: str) -> StepDescriptor:
    return StepDescriptor(
        StepKind.TOOL_CALL, {"name": "get_weather", "args": {}, "call_id": call_id}
    )


def head_step() -> Step:
    return record_step([], HEAD, MODEL, T0)


def in_state(state: StepState) -> Step:
    step = mark_processing(head_step(), T1)
    if state is StepState.PENDING:
        return head_step()
    if state is StepState.PROCESSING:
        return step
    if state is StepState.COMPLETED:
        return complete(step, {"choices": []}, T2)
    if state is StepState.FAILED:
        return fail(step, {"type": "executor_error", "message": "x"}, T2)
    return cancel(step, T2)


# --- response ids (§0) -----------------------------------------------------------------------


def test_prefixed_and_bare_ids_name_the_same_response() -> None:
    assert parse_response_id(f"resp_{HEAD}") == HEAD
    assert parse_response_id(HEAD) == HEAD


@pytest.mark.parametrize(
    "text",
    [
        HEAD.upper(),
        f"resp_{HEAD.upper()}",
        HEAD.replace("-", ""),
        "{" + HEAD + "}",
        f"urn:uuid:{HEAD}",
    ],
)
def test_other_uuid_spellings_parse_to_the_canonical_form(text: str) -> None:
    assert parse_response_id(text) == HEAD


@pytest.mark.parametrize(
    "text",
    [
        "",
        "resp_",
        "not-a-uuid",
        f"resp_resp_{HEAD}",  # only one prefix is stripped
        f"RESP_{HEAD}",
        f"Resp_{HEAD}",
        f" {HEAD}",
        f"{HEAD}\n",
        HEAD[:-1],
        HEAD + "0",
        HEAD.replace("-", "_"),  # Python's uuid.UUID() would take these
        "0b7e-6a526f0c-4d8e-9a41-3c2d1e0f9a8b",
        f"batch_req_{HEAD}",
    ],
)
def test_unparseable_ids_are_not_found_rather_than_errors(text: str) -> None:
    assert parse_response_id(text) is None


@given(st.uuids())
def test_any_uuid_round_trips_through_response_id(value: uuid.UUID) -> None:
    canonical = str(value)
    assert parse_response_id(response_id(canonical)) == canonical
    assert parse_response_id(canonical.upper()) == canonical


@given(st.text(max_size=60))
def test_parsing_arbitrary_text_yields_none_or_a_canonical_uuid(text: str) -> None:
    parsed = parse_response_id(text)
    assert parsed is None or parsed == str(uuid.UUID(parsed))


# --- deterministic ids (§9.4) ----------------------------------------------------------------


def test_namespaces_are_the_documented_derivations() -> None:
    # Changing them would rename every step of every stored chain.
    assert uuid.uuid5(NAMESPACE, "responses/step") == NS_STEP
    assert uuid.uuid5(NAMESPACE, "responses/sub-request") == NS_SUBREQ


def test_head_step_and_its_row_are_the_response_itself() -> None:
    assert step_id(HEAD, 1) == HEAD
    assert sub_request_id(HEAD, 1) == HEAD


def test_later_steps_are_uuid5_of_head_and_sequence() -> None:
    assert step_id(HEAD, 2) == str(uuid.uuid5(NS_STEP, f"{HEAD}:2"))
    assert sub_request_id(HEAD, 2) == str(uuid.uuid5(NS_SUBREQ, f"{HEAD}:2"))
    assert step_id(HEAD, 2) == "aafc7f21-d3cf-5b16-92c1-fe7df92e8d87"


@given(st.uuids(), st.uuids(), st.integers(2, 10_000), st.integers(2, 10_000))
def test_derived_ids_differ_across_heads_sequences_and_kinds(
    a: uuid.UUID, b: uuid.UUID, s: int, t: int
) -> None:
    ids = {step_id(str(a), s), sub_request_id(str(a), s), step_id(str(b), t)}
    expected = 3 if (a, s) != (b, t) else 2
    assert len(ids) == expected


# --- recording (§1.3) ------------------------------------------------------------------------


def test_first_step_is_the_head_and_reuses_the_response_row() -> None:
    head = head_step()
    assert (head.id, head.request_id, head.parent_step_id, head.prev_step_id) == (
        HEAD,
        HEAD,
        None,
        None,
    )
    assert head.step_sequence == 1
    assert head.state is StepState.PENDING
    assert head.is_head
    assert step_violations(head) == []


def test_later_steps_hang_off_the_head_and_link_to_the_previous_step() -> None:
    chain = [head_step()]
    tool_step = record_step(chain, HEAD, tool("call_1"), T1)
    chain.append(tool_step)
    follow_up = record_step(chain, HEAD, MODEL, T2)

    assert tool_step.parent_step_id == HEAD
    assert tool_step.prev_step_id == HEAD
    assert tool_step.step_sequence == 2
    assert tool_step.request_id is None
    assert follow_up.prev_step_id == tool_step.id
    assert follow_up.step_sequence == 3
    assert follow_up.request_id == sub_request_id(HEAD, 3)
    assert not follow_up.is_head


def test_sequence_is_max_plus_one_whatever_order_the_chain_arrives_in() -> None:
    chain = record_round([], HEAD, [MODEL, tool("a"), tool("b")], T0)
    nxt = record_step(list(reversed(chain)), HEAD, MODEL, T1)
    assert nxt.step_sequence == 4
    assert nxt.prev_step_id == chain[-1].id


def test_parallel_tool_calls_chain_linearly_within_their_round() -> None:
    chain = [head_step()]
    siblings = record_round(chain, HEAD, [tool("a"), tool("b"), tool("c")], T1)

    assert [s.step_sequence for s in siblings] == [2, 3, 4]
    assert [s.prev_step_id for s in siblings] == [HEAD, siblings[0].id, siblings[1].id]
    assert {s.parent_step_id for s in siblings} == {HEAD}
    assert chain_violations([*chain, *siblings]) == []


def test_recording_the_same_round_again_names_the_same_steps() -> None:
    chain = [head_step()]
    assert record_round(chain, HEAD, [tool("a"), tool("b")], T1) == record_round(
        chain, HEAD, [tool("a"), tool("b")], T1
    )


def test_non_head_model_call_gets_a_processing_row_for_chat_completions() -> None:
    chain = [head_step(), record_step([head_step()], HEAD, tool("a"), T1)]
    payload = {"model": "llama", "messages": [{"role": "user", "content": "hé"}]}
    step = record_step(chain, HEAD, StepDescriptor(StepKind.MODEL_CALL, payload), T2)

    row = sub_request_row(step)

    assert row is not None
    assert row.id == step.request_id == sub_request_id(HEAD, 3)
    assert row.model == "llama"
    assert row.path == "/v1/chat/completions"
    assert msgspec.json.decode(row.body) == payload
    assert " " not in row.body.replace("hé", "")


def test_head_and_tool_steps_need_no_new_row() -> None:
    chain = [head_step()]
    assert sub_request_row(chain[0]) is None
    assert sub_request_row(record_step(chain, HEAD, tool("a"), T1)) is None


# --- state machine (§1.4) --------------------------------------------------------------------


def test_mark_processing_starts_a_pending_step() -> None:
    step = mark_processing(head_step(), T1)
    assert step.state is StepState.PROCESSING
    assert step.started_at == T1
    assert step.updated_at == T1


@pytest.mark.parametrize(
    "state",
    [StepState.PROCESSING, StepState.COMPLETED, StepState.FAILED, StepState.CANCELED],
)
def test_mark_processing_is_a_silent_no_op_on_any_other_state(state: StepState) -> None:
    step = in_state(state)
    assert mark_processing(step, T2 + timedelta(seconds=5)) == step


@pytest.mark.parametrize("state", [StepState.PENDING, StepState.PROCESSING])
def test_complete_from_pending_or_processing(state: StepState) -> None:
    done = complete(in_state(state), {"choices": []}, T2)
    assert done.state is StepState.COMPLETED
    assert done.response_payload == {"choices": []}
    assert done.completed_at == T2
    assert done.started_at is not None
    assert step_violations(done) == []


def test_a_tool_result_of_json_null_is_still_a_result() -> None:
    done = complete(in_state(StepState.PROCESSING), None, T2)
    assert done.has_response_payload
    assert step_violations(done) == []


@pytest.mark.parametrize("state", [StepState.PENDING, StepState.PROCESSING])
def test_fail_and_cancel_from_pending_or_processing(state: StepState) -> None:
    error = {"type": "executor_error", "message": "executor error: boom"}
    failed = fail(in_state(state), error, T2)
    canceled = cancel(in_state(state), T2)
    assert (failed.state, failed.error, failed.failed_at) == (StepState.FAILED, error, T2)
    assert (canceled.state, canceled.canceled_at) == (StepState.CANCELED, T2)
    assert step_violations(failed) == step_violations(canceled) == []


@pytest.mark.parametrize("state", ["completed", "failed", "canceled"])
def test_terminal_steps_refuse_direct_commands_with_the_spec_texts(state: str) -> None:
    step = in_state(StepState(state))
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: complete(step, {}, T2), f"not in completable state (current: {state})"),
        (lambda: fail(step, {}, T2), f"not in failable state (current: {state})"),
        (lambda: cancel(step, T2), "not in cancelable state"),
        (lambda: requeue_for_retry(step, T2), "not in retryable state"),
    ]
    for command, text in cases:
        with pytest.raises(StepTransitionError) as info:
            command()
        assert str(info.value) == text


def test_requeue_puts_a_processing_step_back_for_another_attempt() -> None:
    again = requeue_for_retry(in_state(StepState.PROCESSING), T2)
    assert again.state is StepState.PENDING
    assert again.retry_attempt == 1
    assert again.started_at is None
    assert step_violations(again) == []
    assert requeue_for_retry(mark_processing(again, T2), T2).retry_attempt == 2


def test_requeue_refuses_a_pending_step() -> None:
    with pytest.raises(StepTransitionError, match="^not in retryable state$"):
        requeue_for_retry(head_step(), T1)


def test_find_step_reports_unknown_ids() -> None:
    chain = [head_step()]
    assert find_step(chain, HEAD) == chain[0]
    with pytest.raises(StepNotFoundError) as info:
        find_step(chain, "missing")
    assert info.value.step_id == "missing"


_OPERATIONS: list[Callable[[Step, datetime], Step]] = [
    mark_processing,
    lambda s, t: complete(s, {"ok": True}, t),
    lambda s, t: fail(s, {"type": "executor_error"}, t),
    cancel,
    requeue_for_retry,
]


@given(st.lists(st.integers(0, len(_OPERATIONS) - 1), max_size=12), st.booleans())
def test_any_sequence_of_commands_leaves_a_well_formed_step(ops: list[int], is_tool: bool) -> None:
    chain = [head_step()]
    step = record_step(chain, HEAD, tool("a"), T0) if is_tool else chain[0]
    at = T0
    for op in ops:
        at += timedelta(seconds=1)
        before = step
        try:
            step = _OPERATIONS[op](step, at)
        except StepTransitionError:
            assert step == before
        assert step_violations(step) == []
        # Terminal states never change again.
        if before.state in (StepState.COMPLETED, StepState.FAILED, StepState.CANCELED):
            assert step == before


# --- invariants (§1.2) -----------------------------------------------------------------------


def test_invariant_checker_names_what_is_wrong() -> None:
    head = head_step()
    bad_cases = [
        (msgspec.structs.replace(head, request_id=None), "model_call step must have a request_id"),
        (
            msgspec.structs.replace(record_step([head], HEAD, tool("a"), T1), request_id="x"),
            "tool_call step must not have a request_id",
        ),
        (msgspec.structs.replace(head, started_at=T1), "pending step must not have started_at"),
        (
            msgspec.structs.replace(head, state=StepState.PROCESSING),
            "processing step requires started_at",
        ),
        (
            msgspec.structs.replace(in_state(StepState.COMPLETED), response_payload=msgspec.UNSET),
            "completed step requires response_payload",
        ),
        (
            msgspec.structs.replace(in_state(StepState.COMPLETED), error={"x": 1}),
            "completed step must not have error",
        ),
        (
            msgspec.structs.replace(in_state(StepState.FAILED), error=None),
            "failed step requires error",
        ),
        (
            msgspec.structs.replace(in_state(StepState.CANCELED), response_payload={}),
            "canceled step must not have response_payload",
        ),
    ]
    for step, problem in bad_cases:
        assert problem in step_violations(step)


def test_a_failed_step_may_or_may_not_have_started() -> None:
    assert step_violations(fail(head_step(), {"type": "x"}, T1)) == []
    assert step_violations(fail(in_state(StepState.PROCESSING), {"type": "x"}, T2)) == []


def test_a_request_row_backs_at_most_one_step() -> None:
    head = head_step()
    second = record_step([head], HEAD, MODEL, T1)
    clash = msgspec.structs.replace(second, request_id=HEAD)
    assert chain_violations([head, second]) == []
    assert f"request_id {HEAD} backs more than one step" in chain_violations([head, clash])


# --- wire form -------------------------------------------------------------------------------


def test_steps_survive_json_and_keep_null_results_apart_from_no_result() -> None:
    pending = head_step()
    null_result = complete(in_state(StepState.PROCESSING), None, T2)

    encoded = msgspec.json.encode(pending)
    assert b"response_payload" not in encoded
    assert msgspec.json.decode(encoded, type=Step) == pending

    decoded = msgspec.json.decode(msgspec.json.encode(null_result), type=Step)
    assert decoded == null_result
    assert decoded.has_response_payload and decoded.response_payload is None
