"""The multi-step loop: payloads (§2.6–2.7), transitions (§2.8), step outcomes (§2.9), the cap
(§2.10), finalisation (§2.11) and assembly (§3)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.responses import Response

from streams.execution import failure
from streams.execution.failure import NetworkError, NonRetriableHttpStatus
from streams.execution.outcome import Failure, Success
from streams.responses.chain import (
    ITERATION_CAP_MESSAGE,
    STEP_ABANDONED,
    AppendSteps,
    Complete,
    Fail,
    HeadCompleted,
    HeadFailed,
    LoopError,
    StepErrored,
    StepSucceeded,
    assemble_output,
    assemble_response,
    conclude,
    evaluate,
    extract_tool_calls,
    finalize,
    follow_up_payload,
    initial_payload,
    latest_round,
    merge_usage,
    model_call_result,
    model_call_transport_error,
    next_action,
    round_settled,
    tool_call_result,
    tool_not_found,
    tool_timeout,
    tool_transport_error,
)
from streams.responses.inputs import ParentRequest, parse_parent
from streams.responses.steps import (
    Step,
    StepDescriptor,
    StepKind,
    StepState,
    record_round,
)
from tests.unit.step_fixtures import canceled, completed, failed, started, step_violations

HEAD = "5d0c2f7e-1b3a-4c5d-8e9f-0a1b2c3d4e5f"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
PARENT = parse_parent({"model": "llama", "input": "Weather in Paris?", "tools": [WEATHER_TOOL]})
SERVER_TOOLS = frozenset({"get_weather"})


def tool_call(call_id: str | None, name: str | None = "get_weather", arguments: Any = "{}") -> Any:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if arguments is not ...:
        function["arguments"] = arguments
    call: dict[str, Any] = {"type": "function", "function": function}
    if call_id is not None:
        call["id"] = call_id
    return call


def completion(
    content: str | None = None, calls: Sequence[Any] = (), usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    body: dict[str, Any] = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "llama",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if calls else "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


class Loop:
    """Drives a chain with the pure functions only, as the chain agent and executors would."""

    def __init__(self, parent: ParentRequest = PARENT, resolved: frozenset[str] = SERVER_TOOLS):
        self.parent = parent
        self.resolved = resolved
        self.chain: list[Step] = []
        self.evaluations = 0
        self.now = T0

    def tick(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now

    def evaluate(self, cap: int = 10) -> Any:
        assert round_settled(self.chain)
        result = evaluate(self.parent, self.chain, self.resolved, self.evaluations, cap)
        self.evaluations = result.evaluations
        return result.outcome

    def record(self, outcome: Any) -> list[Step]:
        assert isinstance(outcome, AppendSteps)
        steps = record_round(self.chain, HEAD, outcome.descriptors, self.tick())
        self.chain += steps
        return steps

    def finish(self, step: Step, payload: Any) -> None:
        done = completed(started(step, self.tick()), payload, self.tick())
        self.chain = [done if s.id == step.id else s for s in self.chain]

    def fail(self, step: Step, error: Any) -> None:
        ended = failed(started(step, self.tick()), error, self.tick())
        self.chain = [ended if s.id == step.id else s for s in self.chain]


def weather_chain() -> Loop:
    """§3's example: model(call_1 get_weather) → tool({"temp_c":18}) → model("It's 18°C")."""
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(
        model,
        completion(
            calls=[tool_call("call_1", arguments='{"city":"Paris"}')],
            usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        ),
    )
    [tool] = loop.record(loop.evaluate())
    loop.finish(tool, {"temp_c": 18})
    [model2] = loop.record(loop.evaluate())
    loop.finish(
        model2,
        completion(
            "It's 18°C", usage={"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
        ),
    )
    return loop


# --- §2.6 payloads ---------------------------------------------------------------------------


def test_initial_model_call_forwards_only_model_messages_stream_and_tools() -> None:
    parent = parse_parent(
        {
            "model": "llama",
            "input": "hi",
            "stream": True,
            "tools": [WEATHER_TOOL],
            "temperature": 0.2,
            "instructions": "be brief",
        }
    )
    assert initial_payload(parent) == {
        "model": "llama",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "tools": [WEATHER_TOOL],
    }
    assert "tools" not in initial_payload(parse_parent({"model": "m", "input": "x"}))


def test_follow_up_replays_the_conversation_with_the_real_tool_call_id() -> None:
    loop = weather_chain()
    payload = loop.chain[2].request_payload
    assert payload["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [tool_call("call_1", arguments='{"city":"Paris"}')],
        },
        # Deviation: the reference sent "unknown" here.
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c":18}'},
    ]
    assert payload["tools"] == [WEATHER_TOOL]
    assert payload["model"] == "llama"


def test_follow_up_skips_steps_that_did_not_complete() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion(calls=[tool_call("a"), tool_call("b")]))
    a, b = loop.record(loop.evaluate())
    loop.finish(a, "sunny")
    loop.chain[-1] = canceled(b, loop.tick())
    messages = follow_up_payload(PARENT, loop.chain)["messages"]
    assert [m.get("tool_call_id") for m in messages if m["role"] == "tool"] == ["a"]
    assert messages[-1]["content"] == '"sunny"'


# --- §2.7 extracting tool calls --------------------------------------------------------------


def test_tool_call_extraction_rules() -> None:
    payload = completion(
        calls=[
            tool_call("c1", arguments='{"city":"Paris"}'),
            tool_call("c2", arguments="{not json"),
            tool_call("c3", arguments={"already": "parsed"}),
            tool_call("c4", arguments=...),
            tool_call(None),
            tool_call("c6", name=None),  # no name: skipped
            "garbage",
        ]
    )
    assert extract_tool_calls(payload) == [
        {"name": "get_weather", "args": {"city": "Paris"}, "call_id": "c1"},
        {"name": "get_weather", "args": {}, "call_id": "c2"},
        {"name": "get_weather", "args": {"already": "parsed"}, "call_id": "c3"},
        {"name": "get_weather", "args": {}, "call_id": "c4"},
        {"name": "get_weather", "args": {}, "call_id": "call_unknown"},
    ]


@pytest.mark.parametrize("payload", [{}, None, {"choices": []}, {"choices": [{"x": 1}]}, "text"])
def test_payloads_without_a_message_have_no_calls(payload: Any) -> None:
    assert extract_tool_calls(payload) == []


# --- §2.8 transitions ------------------------------------------------------------------------


def test_rule_1_an_empty_chain_starts_with_the_initial_model_call() -> None:
    assert next_action(PARENT, [], SERVER_TOOLS) == AppendSteps(
        (StepDescriptor(StepKind.MODEL_CALL, initial_payload(PARENT)),)
    )


@pytest.mark.parametrize("begun", [False, True])
def test_rule_2_a_step_in_flight_on_resume_fails_the_response(begun: bool) -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    if begun:
        loop.chain[0] = started(model, loop.tick())
    action = next_action(PARENT, loop.chain, SERVER_TOOLS)
    assert action == Fail(STEP_ABANDONED)
    assert action.error == {
        "type": "step_abandoned",
        "message": "a step was in flight when this worker took over; "
        "the previous worker exited before completing it",
    }


def test_rule_2_wins_over_a_failed_sibling() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion(calls=[tool_call("a"), tool_call("b")]))
    a, _ = loop.record(loop.evaluate())
    loop.fail(a, {"type": "executor_error", "message": "executor error: HTTP 500: x"})
    assert next_action(PARENT, loop.chain, SERVER_TOOLS) == Fail(STEP_ABANDONED)


def test_rule_3_a_failed_sibling_fails_the_response_even_if_not_last() -> None:
    # Deviation: the reference only looked at the last terminal step and carried on.
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion(calls=[tool_call("a"), tool_call("b"), tool_call("c")]))
    a, b, c = loop.record(loop.evaluate())
    loop.finish(a, {"ok": 1})
    loop.fail(b, {"type": "executor_error", "message": "executor error: first"})
    loop.fail(c, {"type": "executor_error", "message": "executor error: second"})
    assert next_action(PARENT, loop.chain, SERVER_TOOLS) == Fail(
        {"type": "executor_error", "message": "executor error: first"}
    )


def test_rule_3_a_failure_without_error_reads_step_failed() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.chain[0] = msgspec.structs.replace(
        failed(model, {"x": 1}, loop.tick()), error=None
    )  # an error-less failure read back from an old row
    assert next_action(PARENT, loop.chain, SERVER_TOOLS) == Fail({"type": "step_failed"})


def test_rule_4_a_model_answer_without_calls_completes() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    answer = completion("Paris is sunny")
    loop.finish(model, answer)
    assert next_action(PARENT, loop.chain, SERVER_TOOLS) == Complete(answer)


def test_rule_4_server_side_calls_are_dispatched_in_order() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion(calls=[tool_call("a", arguments='{"x":1}'), tool_call("b")]))
    action = next_action(PARENT, loop.chain, SERVER_TOOLS)
    assert action == AppendSteps(
        (
            StepDescriptor(
                StepKind.TOOL_CALL, {"name": "get_weather", "args": {"x": 1}, "call_id": "a"}
            ),
            StepDescriptor(StepKind.TOOL_CALL, {"name": "get_weather", "args": {}, "call_id": "b"}),
        )
    )


def test_rule_4_a_round_with_any_client_function_goes_back_to_the_client_whole() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    mixed = completion(calls=[tool_call("a"), tool_call("b", name="lookup_order")])
    loop.finish(model, mixed)
    assert next_action(PARENT, loop.chain, SERVER_TOOLS) == Complete(mixed)


def test_rule_4_after_tool_results_the_model_is_asked_again() -> None:
    loop = weather_chain()
    follow_up = loop.chain[2]
    assert follow_up.step_kind is StepKind.MODEL_CALL
    assert follow_up.request_payload == follow_up_payload(PARENT, loop.chain[:2])


def test_rule_4_canceled_steps_are_ignored() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion(calls=[tool_call("a"), tool_call("b")]))
    a, b = loop.record(loop.evaluate())
    loop.chain[-2] = canceled(a, loop.tick())
    loop.finish(b, {"ok": True})
    action = next_action(PARENT, loop.chain, SERVER_TOOLS)
    assert isinstance(action, AppendSteps)
    assert action.descriptors[0].kind is StepKind.MODEL_CALL


def test_rule_4_a_chain_with_nothing_completed_is_abandoned() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.chain[0] = canceled(model, loop.tick())
    assert next_action(PARENT, loop.chain, SERVER_TOOLS) == Fail(STEP_ABANDONED)


def test_latest_round_and_settling() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    assert latest_round(loop.chain) == [model]
    assert not round_settled(loop.chain)
    loop.finish(model, completion(calls=[tool_call("a"), tool_call("b")]))
    a, b = loop.record(loop.evaluate())
    assert [s.id for s in latest_round(loop.chain)] == [a.id, b.id]
    loop.finish(a, 1)
    assert not round_settled(loop.chain)
    loop.finish(b, 2)
    assert round_settled(loop.chain)
    assert round_settled([])


# --- §2.10 the iteration cap -----------------------------------------------------------------


def run_tool_every_turn(cap: int = 10, calls_per_turn: int = 1) -> tuple[Loop, Any]:
    loop = Loop()
    turn = 0
    while True:
        outcome = loop.evaluate(cap)
        if not isinstance(outcome, AppendSteps):
            return loop, outcome
        for step in loop.record(outcome):
            if step.step_kind is StepKind.MODEL_CALL:
                turn += 1
                calls = [tool_call(f"call_{turn}_{i}") for i in range(calls_per_turn)]
                loop.finish(step, completion(calls=calls))
            else:
                loop.finish(step, {"temp_c": 18})


@pytest.mark.parametrize("calls_per_turn", [1, 3])
def test_a_model_calling_a_server_tool_every_turn_gets_five_rounds_then_fails(
    calls_per_turn: int,
) -> None:
    loop, outcome = run_tool_every_turn(calls_per_turn=calls_per_turn)

    kinds = [s.step_kind for s in loop.chain]
    assert kinds.count(StepKind.MODEL_CALL) == 5
    assert kinds.count(StepKind.TOOL_CALL) == 5 * calls_per_turn
    assert outcome == LoopError("response loop exceeded max_response_iterations cap")
    assert loop.evaluations == 10

    final = conclude(outcome, HEAD, loop.chain, PARENT, created_at=1, completed_at=2)
    assert isinstance(final, HeadFailed)
    assert msgspec.json.decode(final.error) == {
        "type": "NonRetriableHttpStatus",
        "details": {
            "status": 500,
            "body": '{"type":"loop_error","message":"response loop exceeded '
            'max_response_iterations cap"}',
        },
    }


@pytest.mark.parametrize("cap", [1, 2, 3, 7])
def test_cap_counts_evaluations_not_steps(cap: int) -> None:
    loop, outcome = run_tool_every_turn(cap=cap)
    assert outcome == LoopError(ITERATION_CAP_MESSAGE)
    assert len(loop.chain) == cap
    assert loop.evaluations == cap


def test_the_count_carries_over_to_the_worker_that_resumes() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion(calls=[tool_call("a")]))
    # Another worker takes over with the persisted count: one evaluation left of 2.
    assert isinstance(evaluate(PARENT, loop.chain, SERVER_TOOLS, 1, 2).outcome, AppendSteps)
    assert evaluate(PARENT, loop.chain, SERVER_TOOLS, 2, 2).outcome == LoopError(
        ITERATION_CAP_MESSAGE
    )


def test_a_capped_evaluation_is_not_counted() -> None:
    result = evaluate(PARENT, [], SERVER_TOOLS, 10, 10)
    assert result.evaluations == 10


# --- §2.9 step outcomes ----------------------------------------------------------------------


def test_model_call_2xx_completes_step_and_row() -> None:
    body = msgspec.json.encode(completion("hi")).decode()
    outcome = model_call_result(200, body.encode())
    assert outcome.step == StepSucceeded(completion("hi"))
    assert outcome.row == Success(status=200, body=body)


def test_model_call_non_2xx_fails_with_the_executor_error_text() -> None:
    outcome = model_call_result(503, b'{"error":"busy"}')
    assert outcome.step == StepErrored(
        {
            "type": "executor_error",
            "message": 'executor error: model call returned HTTP 503 Service Unavailable: {"error":"busy"}',
        }
    )
    assert outcome.row == Failure(NonRetriableHttpStatus(status=503, body='{"error":"busy"}'))
    assert model_call_result(429, "slow down", reason="Too Many").step == StepErrored(
        {
            "type": "executor_error",
            "message": "executor error: model call returned HTTP 429 Too Many: slow down",
        }
    )


def test_model_call_unparseable_or_unreachable_is_an_executor_error() -> None:
    garbled = model_call_result(200, b"<html>")
    assert isinstance(garbled.step, StepErrored)
    assert garbled.step.error["type"] == "executor_error"
    assert garbled.step.error["message"].startswith(
        "executor error: model call returned invalid JSON"
    )
    assert isinstance(garbled.row, Failure)

    refused = model_call_transport_error("connection refused")
    assert refused.step == StepErrored(
        {"type": "executor_error", "message": "executor error: connection refused"}
    )
    assert refused.row == Failure(NetworkError.of("connection refused"))


@pytest.mark.parametrize(
    ("status", "body", "result"),
    [
        (200, b'{"temp_c":18}', StepSucceeded({"temp_c": 18})),
        (201, b"[1,2]", StepSucceeded([1, 2])),
        (200, b"null", StepSucceeded(None)),
        (200, b"sunny and warm", StepSucceeded({"result": "sunny and warm"})),
        (200, b"", StepSucceeded({"result": ""})),
        (
            500,
            b"boom",
            StepErrored({"type": "executor_error", "message": "executor error: HTTP 500: boom"}),
        ),
        (
            302,
            b"",
            StepErrored({"type": "executor_error", "message": "executor error: HTTP 302: "}),
        ),
    ],
)
def test_tool_http_results(status: int, body: bytes, result: Any) -> None:
    assert tool_call_result(status, body) == result


def test_tool_timeouts_unknown_names_and_transport_errors() -> None:
    assert tool_timeout("get_weather", 30) == StepErrored(
        {
            "type": "executor_error",
            "message": "executor error: tool 'get_weather' timed out after 30s",
        }
    )
    assert tool_timeout("slow", 2.5).error["message"].endswith("timed out after 2.5s")
    assert tool_timeout("slow", 5.0).error["message"].endswith("timed out after 5s")
    assert tool_not_found("ghost") == StepErrored(
        {"type": "executor_error", "message": "executor target not found: ghost"}
    )
    assert tool_transport_error("connection reset").error["message"] == (
        "executor error: connection reset"
    )


def test_a_failed_tool_fails_the_response_with_its_error() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion(calls=[tool_call("a")]))
    [tool] = loop.record(loop.evaluate())
    result = tool_timeout("get_weather", 30)
    loop.fail(tool, result.error)
    outcome = loop.evaluate()
    assert outcome == Fail(result.error)
    final = conclude(outcome, HEAD, loop.chain, PARENT, created_at=1, completed_at=2)
    assert isinstance(final, HeadFailed)
    reason = failure.parse(final.error)
    assert reason == NonRetriableHttpStatus(
        status=500,
        body='{"type":"executor_error","message":"executor error: tool \'get_weather\' '
        'timed out after 30s"}',
    )
    assert not reason.retriable  # the core retry policy must not re-run a finalised chain


# --- §2.11 finalisation ----------------------------------------------------------------------


def test_finalize_completes_the_head_row_with_the_compact_body() -> None:
    assert finalize(200, {"id": "resp_x", "output": [1, 2]}) == HeadCompleted(
        status=200, body='{"id":"resp_x","output":[1,2]}'
    )


def test_finalize_fails_the_head_row_with_the_non_retriable_envelope() -> None:
    final = finalize(500, {"type": "step_failed"})
    assert final == HeadFailed(
        status=500,
        error='{"type":"NonRetriableHttpStatus","details":{"status":500,'
        '"body":"{\\"type\\":\\"step_failed\\"}"}}',
    )


def test_conclude_a_completed_chain_stores_the_assembled_response() -> None:
    loop = weather_chain()
    outcome = loop.evaluate()
    assert isinstance(outcome, Complete)
    final = conclude(outcome, HEAD, loop.chain, PARENT, created_at=100, completed_at=160)
    assert isinstance(final, HeadCompleted)
    assert msgspec.json.decode(final.body) == assemble_response(
        HEAD, loop.chain, PARENT, created_at=100, completed_at=160
    )


def test_conclude_a_failed_step() -> None:
    final = conclude(
        Fail({"type": "executor_error", "message": "m"}),
        HEAD,
        [],
        PARENT,
        created_at=1,
        completed_at=2,
    )
    assert isinstance(final, HeadFailed)
    assert failure.parse(final.error) == NonRetriableHttpStatus(
        500, '{"type":"executor_error","message":"m"}'
    )


# --- §3 assembly -----------------------------------------------------------------------------


def shape(item: dict[str, Any]) -> tuple[Any, ...]:
    if item["type"] == "message":
        return ("message", item["content"][0]["text"])
    if item["type"] == "function_call":
        return ("function_call", item["call_id"], item["name"], item["arguments"])
    return ("function_call_output", item["call_id"], item["output"])


def test_the_get_weather_example() -> None:
    loop = weather_chain()
    response = assemble_response(HEAD, loop.chain, PARENT, created_at=100, completed_at=160)

    assert [shape(i) for i in response["output"]] == [
        ("function_call", "call_1", "get_weather", '{"city":"Paris"}'),
        ("function_call_output", "call_1", '{"temp_c":18}'),
        ("message", "It's 18°C"),
    ]
    assert response["id"] == f"resp_{HEAD}"
    assert response["object"] == "response"
    assert response["status"] == "completed"
    assert response["model"] == "llama"
    assert response["background"] is False
    # Decision: Responses-style usage, summed over both model calls.
    assert response["usage"] == {
        "input_tokens": 40,
        "output_tokens": 12,
        "total_tokens": 52,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }

    parsed = Response.model_validate(response)
    assert parsed.output_text == "It's 18°C"
    assert parsed.usage is not None and parsed.usage.total_tokens == 52
    assert [t.name for t in parsed.tools if t.type == "function"] == ["get_weather"]


def test_a_client_side_round_surfaces_its_calls_without_outputs() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(
        model,
        completion(
            "I'll look that up.",
            calls=[tool_call("c1", name="lookup_order", arguments={"order": 7})],
        ),
    )
    outcome = loop.evaluate()
    assert isinstance(outcome, Complete)
    response = assemble_response(HEAD, loop.chain, PARENT, created_at=1, completed_at=2)
    assert [shape(i) for i in response["output"]] == [
        ("message", "I'll look that up."),
        ("function_call", "c1", "lookup_order", '{"order":7}'),
    ]
    assert "usage" not in response
    parsed = Response.model_validate(response)
    call = parsed.output[1]
    assert call.type == "function_call" and call.call_id == "c1"


def test_assembly_fallbacks_for_sparse_payloads() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion("", calls=[{"type": "function", "function": {}}, tool_call("x")]))
    tool_step = record_round(
        loop.chain,
        HEAD,
        [StepDescriptor(StepKind.TOOL_CALL, {"name": "get_weather", "args": {}})],
        loop.tick(),
    )[0]
    loop.chain.append(tool_step)
    loop.finish(tool_step, None)
    output, usage = assemble_output(loop.chain)
    assert [shape(i) for i in output] == [
        ("function_call", "call_1_0", "", "{}"),  # named by its step and place (not unknown)
        ("function_call", "x", "get_weather", "{}"),
        ("function_call_output", "call_step_2", "null"),
    ]
    assert usage is None


def test_only_completed_steps_are_assembled() -> None:
    loop = Loop()
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion("first", calls=[tool_call("a"), tool_call("b")]))
    a, b = loop.record(loop.evaluate())
    loop.finish(a, 1)
    loop.fail(b, {"type": "executor_error"})
    assert [shape(i)[0] for i in assemble_output(loop.chain)[0]] == [
        "message",
        "function_call",
        "function_call",
        "function_call_output",
    ]


def test_assembly_is_deterministic_and_item_ids_are_unique() -> None:
    first = weather_chain()
    again = weather_chain()
    one = assemble_response(HEAD, first.chain, PARENT, created_at=1, completed_at=2)
    two = assemble_response(HEAD, again.chain, PARENT, created_at=1, completed_at=2)
    assert one == two
    ids = [item["id"] for item in one["output"]]
    assert len(set(ids)) == len(ids)


def test_usage_merge_rule() -> None:
    assert merge_usage(None, {"prompt_tokens": 3}) == {"prompt_tokens": 3}
    assert merge_usage(
        {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "model": "a"},
        {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "model": "b", "x": 1},
    ) == {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11, "model": "b", "x": 1}
    assert merge_usage({"total_tokens": 4}, {"total_tokens": 2.5}) == {"total_tokens": 2.5}
    assert merge_usage({"total_tokens": 4}, {"total_tokens": True}) == {"total_tokens": True}
    assert merge_usage(
        {"prompt_tokens_details": {"cached_tokens": 2}},
        {"prompt_tokens_details": {"cached_tokens": 3}},
    ) == {"prompt_tokens_details": {"cached_tokens": 5}}


_usage = st.fixed_dictionaries(
    {
        "prompt_tokens": st.integers(0, 10_000),
        "completion_tokens": st.integers(0, 10_000),
        "total_tokens": st.integers(0, 20_000),
    }
)


@given(st.lists(_usage, min_size=1, max_size=6))
def test_chat_token_counts_add_up_across_calls(usages: list[dict[str, int]]) -> None:
    merged: Any = None
    for usage in usages:
        merged = merge_usage(merged, usage)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert merged[key] == sum(u[key] for u in usages)


def test_every_step_the_loop_records_is_well_formed() -> None:
    loop, _ = run_tool_every_turn(calls_per_turn=2)
    for step in loop.chain:
        assert step.state is StepState.COMPLETED
        assert step_violations(step) == []
