"""Response steps: ids (§0, §9.4), recording (§1.3), the state machine (§1.4), invariants (§1.2)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

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
    StepFact,
    StepKind,
    StepState,
    parse_response_id,
    record_round,
    record_step,
    response_id,
    step_after,
    step_id,
    sub_request_id,
    sub_request_row,
)
from tests.unit.step_fixtures import (
    canceled,
    chain_violations,
    completed,
    failed,
    started,
    step_violations,
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
    step = started(head_step(), T1)
    if state is StepState.PENDING:
        return head_step()
    if state is StepState.PROCESSING:
        return step
    if state is StepState.COMPLETED:
        return completed(step, {"choices": []}, T2)
    if state is StepState.FAILED:
        return failed(step, {"type": "executor_error", "message": "x"}, T2)
    return canceled(step, T2)


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

ENDED = [StepState.COMPLETED, StepState.FAILED, StepState.CANCELED]
FACTS: list[StepFact] = ["started", "completed", "failed"]


def test_a_start_moves_only_a_pending_step() -> None:
    assert step_after(StepState.PENDING, "started") is StepState.PROCESSING
    for state in [StepState.PROCESSING, *ENDED]:
        assert step_after(state, "started") is None


@pytest.mark.parametrize("state", [StepState.PENDING, StepState.PROCESSING])
def test_a_step_that_has_not_ended_completes_or_fails_started_or_not(state: StepState) -> None:
    assert step_after(state, "completed") is StepState.COMPLETED
    assert step_after(state, "failed") is StepState.FAILED


@pytest.mark.parametrize("state", ENDED)
def test_an_ended_step_drops_every_later_fact(state: StepState) -> None:
    assert [step_after(state, fact) for fact in FACTS] == [None, None, None]


@given(st.lists(st.sampled_from(FACTS), max_size=8))
def test_redelivered_and_reordered_facts_leave_the_first_ending(facts: list[StepFact]) -> None:
    """Kafka may deliver a step's facts again or late: the first completion or failure wins,
    and a start that comes after it changes nothing."""
    state = StepState.PENDING
    for fact in facts:
        state = step_after(state, fact) or state
    endings = [f for f in facts if f != "started"]
    if endings:
        assert state is (StepState.COMPLETED if endings[0] == "completed" else StepState.FAILED)
    else:
        assert state is (StepState.PROCESSING if facts else StepState.PENDING)


def test_a_later_model_call_backs_a_request_row_of_its_own() -> None:
    head = head_step()
    second = record_step([head], HEAD, MODEL, T1)
    clash = msgspec.structs.replace(second, request_id=HEAD)
    assert chain_violations([head, second]) == []
    assert f"request_id {HEAD} backs more than one step" in chain_violations([head, clash])


# --- wire form -------------------------------------------------------------------------------


def test_steps_survive_json_and_keep_null_results_apart_from_no_result() -> None:
    pending = head_step()
    null_result = completed(in_state(StepState.PROCESSING), None, T2)

    encoded = msgspec.json.encode(pending)
    assert b"response_payload" not in encoded
    assert msgspec.json.decode(encoded, type=Step) == pending

    decoded = msgspec.json.decode(msgspec.json.encode(null_result), type=Step)
    assert decoded == null_result
    assert decoded.has_response_payload and decoded.response_payload is None
