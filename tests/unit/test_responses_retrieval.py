"""Retrieval: lookup (§4.1), status (§4.2), the Responses object (§4.3), the error column (§4.4),
error types (§4.5), flex chat-completion answers (§4.6) and the README decisions on usage and
failure payloads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pydantic
import pytest
from openai._models import construct_type
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from projections.rules.responses import (
    ParsedError,
    RequestDetail,
    backing_request_id,
    chat_completion_result,
    parse_error_column,
    response_object,
    state_to_status,
    status_error_type,
)
from streams.execution.failure import NetworkError, NonRetriableHttpStatus, RetriableHttpStatus
from streams.responses.chain import (
    Complete,
    HeadCompleted,
    HeadFailed,
    LoopError,
    conclude,
    finalize,
)
from streams.responses.inputs import parse_parent
from streams.responses.steps import (
    StepDescriptor,
    StepKind,
    record_step,
)
from streams.responses.translate import chat_to_responses
from tests.unit import step_fixtures

ROW = "8e2d4c6a-1f3b-4a5c-9d7e-2b4c6d8e0f1a"
CREATED = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
DONE = CREATED + timedelta(seconds=30)
FORBIDDEN = '{"error":{"message":"Forbidden","type":"invalid_request_error","code":"forbidden"}}'
CHAT = {
    "id": f"resp_{ROW}",
    "object": "chat.completion",
    "created": 1_748_779_200,
    "model": "llama",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


def detail(state: str, **fields: Any) -> RequestDetail:
    return RequestDetail(id=ROW, state=state, model="llama", created_at=CREATED, **fields)


def completed(
    result: Any, status: int | None = 200, request: dict[str, Any] | None = None
) -> RequestDetail:
    text = (
        result
        if isinstance(result, str) or result is None
        else msgspec.json.encode(result).decode()
    )
    return detail(
        "completed",
        response_status=status,
        response_body=text,
        completed_at=DONE,
        body=None if request is None else msgspec.json.encode(request).decode(),
    )


def failed(error: str | None) -> RequestDetail:
    return detail("failed", error=error, failed_at=DONE)


def sdk_parse(response: dict[str, Any]) -> Response:
    """What `client.responses.retrieve` does with the JSON: the SDK's lenient construction."""
    parsed = construct_type(type_=Response, value=response)
    assert isinstance(parsed, Response)
    return parsed


# --- §4.1 lookup -----------------------------------------------------------------------------


def test_a_head_step_answers_through_its_request_row_and_other_steps_are_not_responses() -> None:
    model = StepDescriptor(StepKind.MODEL_CALL, {"model": "llama"})
    head = record_step([], ROW, model, CREATED)
    second = record_step([head], ROW, model, CREATED)
    assert backing_request_id(ROW, head) == ROW
    assert backing_request_id(second.id, second) is None
    assert backing_request_id(ROW, None) == ROW  # single-step: the row's own id
    headless = msgspec.structs.replace(head, request_id=None)
    assert backing_request_id(ROW, headless) is None


# --- §4.2 / §4.5 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("pending", "queued"),
        ("claimed", "in_progress"),
        ("processing", "in_progress"),
        ("completed", "completed"),
        ("failed", "failed"),
        ("canceled", "cancelled"),
        ("exploded", "failed"),
    ],
)
def test_state_to_status(state: str, status: str) -> None:
    assert state_to_status(state) == status


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "insufficient_credits"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (499, "client_disconnected"),
        (408, "server_error"),
        (500, "server_error"),
        (503, "server_error"),
        (200, "server_error"),
    ],
)
def test_status_to_error_type(code: int, kind: str) -> None:
    assert status_error_type(code) == kind


# --- §4.4 the error column -------------------------------------------------------------------


def test_rule_1_failure_reason_with_an_openai_body() -> None:
    text = NonRetriableHttpStatus(status=403, body=FORBIDDEN).to_json()
    assert parse_error_column(text) == ParsedError("permission_error", "Forbidden", 403)


def test_rule_1_failure_reason_with_a_plain_body() -> None:
    text = RetriableHttpStatus(status=503, body="upstream overloaded").to_json()
    assert parse_error_column(text) == ParsedError("server_error", "upstream overloaded", 503)


@pytest.mark.parametrize("status", [70000, -1, "403", None, 4.5])
def test_rule_1_an_unusable_status_is_not_recovered(status: Any) -> None:
    text = msgspec.json.encode({"type": "X", "details": {"status": status, "body": "b"}}).decode()
    assert parse_error_column(text) == ParsedError("server_error", "b", None)


def test_rule_1_status_zero_is_still_a_status() -> None:
    text = '{"type":"X","details":{"status":0,"body":"b"}}'
    assert parse_error_column(text) == ParsedError("server_error", "b", 0)
    assert chat_completion_result(failed(text))[0] == 0


def test_rule_2_upstream_returned() -> None:
    assert parse_error_column(f"Upstream returned 403: {FORBIDDEN}") == ParsedError(
        "permission_error", "Forbidden", 403
    )
    assert parse_error_column("Upstream returned 429: slow: down") == ParsedError(
        "rate_limit_error", "slow: down", 429
    )


def test_rule_1_without_a_string_body_falls_through() -> None:
    text = NetworkError.of("connection refused").to_json()
    assert parse_error_column(text) == ParsedError("server_error", text, None)


def test_rule_3_a_bare_openai_envelope() -> None:
    assert parse_error_column(FORBIDDEN) == ParsedError("server_error", "Forbidden", None)


def test_rule_4_raw_text() -> None:
    assert parse_error_column("some unknown error") == ParsedError(
        "server_error", "some unknown error", None
    )
    assert parse_error_column('{"type":"TaskTerminated"}') == ParsedError(
        "server_error", '{"type":"TaskTerminated"}', None
    )


def test_decision_failure_payloads_are_unwrapped() -> None:
    # What a failed chain leaves in the head row's error column (§2.11).
    final = finalize(500, {"type": "executor_error", "message": "executor error: HTTP 500: x"})
    assert isinstance(final, HeadFailed)
    assert parse_error_column(final.error) == ParsedError(
        "executor_error", "executor error: HTTP 500: x", 500
    )
    assert parse_error_column('{"type":"loop_error","message":"m"}') == ParsedError(
        "loop_error", "m", None
    )
    # Half a payload is not one: the raw body stays the message.
    half = NonRetriableHttpStatus(status=500, body='{"type":"step_failed"}').to_json()
    assert parse_error_column(half) == ParsedError("server_error", '{"type":"step_failed"}', 500)


# --- §4.3 the Responses object ---------------------------------------------------------------


def test_base_object_for_a_queued_row() -> None:
    response = response_object(detail("pending", body='{"model":"llama","background":true}'))
    assert response == {
        "id": f"resp_{ROW}",
        "object": "response",
        "created_at": 1_748_779_200,
        "status": "queued",
        "model": "llama",
        "background": True,
        "output": [],
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
    }
    Response.model_validate(response)


@pytest.mark.parametrize("body", [None, "not json", '{"background":"yes"}', "[1]"])
def test_background_defaults_to_false(body: str | None) -> None:
    assert response_object(detail("processing", body=body))["background"] is False


def test_in_progress_rows_carry_no_result_fields() -> None:
    response = response_object(detail("processing", error="stale"))
    assert response["status"] == "in_progress"
    assert not {"error", "usage", "completed_at"} & response.keys()


def test_a_completed_single_step_response_copies_output_and_usage() -> None:
    request = {"model": "llama", "input": "Hi", "tools": [{"type": "function", "name": "f"}]}
    stored = chat_to_responses({**CHAT, "id": "x"}, request)
    response = response_object(completed(stored, request=request))

    assert response["status"] == "completed"
    assert response["output"] == stored["output"]
    assert response["usage"] == stored["usage"]
    assert response["completed_at"] == 1_748_779_230
    assert response["tools"][0]["name"] == "f"
    parsed = Response.model_validate(response)
    assert parsed.output_text == "hi"


def test_a_response_cut_short_is_retrieved_incomplete_as_it_was_created() -> None:
    request = {"model": "llama", "input": "Hi"}
    cut = {**CHAT, "choices": [{**CHAT["choices"][0], "finish_reason": "length"}]}  # type: ignore[index]
    stored = chat_to_responses(cut, request)
    assert stored["status"] == "incomplete"
    response = response_object(completed(stored, request=request))
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    parsed = Response.model_validate(response)
    assert parsed.status == "incomplete" and parsed.output_text == "hi"


def test_a_completed_chain_is_retrievable_with_responses_usage() -> None:
    request = {"model": "llama", "input": "x"}
    model = record_step([], ROW, StepDescriptor(StepKind.MODEL_CALL, {}), CREATED)
    done = step_fixtures.completed(step_fixtures.started(model, CREATED), CHAT, DONE)
    final = conclude(
        Complete(CHAT), ROW, [done], parse_parent(request), created_at=1, completed_at=2
    )
    assert isinstance(final, HeadCompleted)

    response = response_object(completed(final.body, request=request), head_id=ROW)

    assert response["id"] == f"resp_{ROW}"
    assert response["output"][0]["content"][0]["text"] == "hi"
    assert response["usage"]["input_tokens"] == 5
    assert "prompt_tokens" not in response["usage"]
    assert Response.model_validate(response).output_text == "hi"


def test_a_stored_chat_completion_is_wrapped_whole_with_responses_usage() -> None:
    response = response_object(completed(CHAT))
    assert response["output"] == [{"type": "message", "role": "assistant", "content": CHAT}]
    assert response["usage"] == {
        "input_tokens": 5,
        "output_tokens": 1,
        "total_tokens": 6,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    # `choices` wins over an `output` key.
    assert response_object(completed({**CHAT, "output": ["x"]}))["output"][0]["content"] == {
        **CHAT,
        "output": ["x"],
    }
    # The SDK client (lenient) still reads the status and usage of such an object.
    parsed = sdk_parse(response)
    assert parsed.status == "completed"
    assert parsed.usage is not None and parsed.usage.total_tokens == 6


def test_null_status_reads_as_200_and_an_unparseable_body_leaves_output_empty() -> None:
    response = response_object(completed("not json", status=None))
    assert response["status"] == "completed"
    assert response["output"] == []
    assert "usage" not in response
    assert response["completed_at"] == 1_748_779_230


def test_completed_without_a_completion_time_shows_null() -> None:
    response = response_object(detail("completed", response_status=200, response_body="{}"))
    assert "completed_at" in response and response["completed_at"] is None


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        (403, FORBIDDEN, "permission_error", "Forbidden"),
        (429, "slow down", "rate_limit_error", "slow down"),
        (502, None, "server_error", "Upstream returned 502"),
        (
            499,
            '{"error":{"type":"client_disconnected","message":"client cancelled request before '
            'upstream response","code":499}}',
            "client_disconnected",
            "client cancelled request before upstream response",
        ),
    ],
)
def test_a_stored_upstream_error_reads_as_failed(
    status: int, body: str | None, kind: str, message: str
) -> None:
    response = response_object(completed(body, status=status))
    assert response["status"] == "failed"
    assert response["error"] == {"type": kind, "code": status, "message": message}
    assert response["output"] == []
    assert response["completed_at"] == 1_748_779_230
    assert "usage" not in response


def test_failed_rows_carry_the_parsed_error() -> None:
    error = NonRetriableHttpStatus(status=403, body=FORBIDDEN).to_json()
    response = response_object(failed(error))
    assert response["status"] == "failed"
    assert response["error"] == {"type": "permission_error", "message": "Forbidden", "code": 403}

    plain = response_object(failed("boom"))
    assert plain["error"] == {"type": "server_error", "message": "boom"}
    assert "error" not in response_object(failed(None))


def test_a_capped_chain_reads_as_its_loop_error() -> None:
    parent = parse_parent({"model": "llama", "input": "x"})
    cap = LoopError("response loop exceeded max_response_iterations cap")
    final = conclude(cap, ROW, [], parent, created_at=1, completed_at=2)
    assert isinstance(final, HeadFailed)
    response = response_object(failed(final.error), head_id=ROW)
    assert response["error"] == {
        "type": "loop_error",
        "message": "response loop exceeded max_response_iterations cap",
        "code": 500,
    }
    # The SDK's strict type wants a string `code`; the spec's integer code is what the HTTP
    # layer answers with (§7.5). Nothing else about the object is out of shape, and the SDK's
    # client parse reads it.
    with pytest.raises(pydantic.ValidationError) as info:
        Response.model_validate(response)
    assert [e["loc"] for e in info.value.errors()] == [("error", "code")]
    parsed = sdk_parse(response)
    assert parsed.error is not None
    assert parsed.error.message == "response loop exceeded max_response_iterations cap"
    assert parsed.error.type == "loop_error"


def test_canceled_rows_read_as_cancelled_without_error() -> None:
    response = response_object(detail("canceled", error="x"))
    assert response["status"] == "cancelled"
    assert "error" not in response
    Response.model_validate(response)


# --- §4.6 flex chat completions --------------------------------------------------------------


def test_a_completed_chat_completion_is_answered_verbatim() -> None:
    status, body = chat_completion_result(completed(CHAT))
    assert (status, body) == (200, CHAT)
    assert ChatCompletion.model_validate(body).id == f"resp_{ROW}"
    assert chat_completion_result(completed(CHAT, status=None))[0] == 200
    assert chat_completion_result(completed(CHAT, status=201)) == (201, CHAT)


@pytest.mark.parametrize("body", [None, "", "<html>"])
def test_a_missing_or_garbled_success_body_is_a_500(body: str | None) -> None:
    assert chat_completion_result(completed(body)) == (
        500,
        {
            "error": {
                "message": "Empty or invalid response from upstream",
                "type": "server_error",
                "param": None,
                "code": 500,
            }
        },
    )


def test_a_stored_upstream_error_is_answered_with_its_status() -> None:
    assert chat_completion_result(completed(FORBIDDEN, status=403)) == (
        403,
        {"error": {"message": "Forbidden", "type": "permission_error", "param": None, "code": 403}},
    )
    assert chat_completion_result(completed(None, status=429)) == (
        429,
        {
            "error": {
                "message": "Upstream returned 429",
                "type": "rate_limit_error",
                "param": None,
                "code": 429,
            }
        },
    )


def test_failed_rows_answer_with_the_recovered_status() -> None:
    error = NonRetriableHttpStatus(status=400, body=FORBIDDEN).to_json()
    assert chat_completion_result(failed(error)) == (
        400,
        {
            "error": {
                "message": "Forbidden",
                "type": "invalid_request_error",
                "param": None,
                "code": 400,
            }
        },
    )
    assert chat_completion_result(failed(f"Upstream returned 500: {FORBIDDEN}")) == (
        500,
        {"error": {"message": "Forbidden", "type": "server_error", "param": None, "code": 500}},
    )
    assert chat_completion_result(failed("reset by peer")) == (
        500,
        {"error": {"message": "reset by peer", "type": "server_error", "param": None, "code": 500}},
    )
    assert chat_completion_result(failed(None)) == (
        500,
        {
            "error": {
                "message": "Request failed",
                "type": "server_error",
                "param": None,
                "code": 500,
            }
        },
    )


def test_canceled_and_unexpected_states() -> None:
    assert chat_completion_result(detail("canceled")) == (
        499,
        {
            "error": {
                "message": "Request was canceled",
                "type": "request_canceled",
                "param": None,
                "code": 499,
            }
        },
    )
    assert chat_completion_result(detail("processing")) == (
        500,
        {
            "error": {
                "message": "Unexpected request state: processing",
                "type": "server_error",
                "param": None,
                "code": 500,
            }
        },
    )
