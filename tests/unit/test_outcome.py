from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from streams.execution.failure import NonRetriableHttpStatus, RetriableHttpStatus
from streams.execution.outcome import (
    Failure,
    ModelEscalation,
    RetryPolicy,
    Success,
    classify,
    escalate,
    inject_deadline_priority,
    override_response_id,
)

REQUEST_ID = "6f1c1f8e-3a57-4c3e-9a59-0d2f4b0f7a11"
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("status", [100, 200, 201, 204, 301, 302, 399])
def test_statuses_below_400_complete_with_status_and_body(status: int) -> None:
    assert classify(status, "body") == Success(status=status, body="body")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599, 429, 408, 404, 499])
def test_transient_statuses_are_retriable(status: int) -> None:
    assert classify(status, "oops") == Failure(RetriableHttpStatus(status=status, body="oops"))


@pytest.mark.parametrize("status", [400, 401, 402, 403, 409, 413, 422, 498])
def test_other_client_errors_fail_for_good(status: int) -> None:
    assert classify(status, "no") == Failure(NonRetriableHttpStatus(status=status, body="no"))


def test_additional_statuses_replace_the_499_default_and_ignore_values_below_400() -> None:
    policy = RetryPolicy(additional_retryable_statuses=(418, 200, 302))

    assert classify(418, "teapot", policy) == Failure(RetriableHttpStatus(418, "teapot"))
    assert classify(499, "gone", policy) == Failure(NonRetriableHttpStatus(499, "gone"))
    assert classify(200, "ok", policy) == Success(200, "ok")
    assert classify(302, "moved", policy) == Success(302, "moved")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_response_id_becomes_resp_request_id_keeping_other_keys_in_order(path: str) -> None:
    body = '{"object":"chat.completion","id":"chatcmpl-123","choices":[],"n":1.5}'

    rewritten = override_response_id(body, REQUEST_ID, path)

    assert rewritten == (
        f'{{"object":"chat.completion","id":"resp_{REQUEST_ID}","choices":[],"n":1.5}}'
    )


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ('{ "id": "resp_upstream", "x": 1 }', "/v1/responses"),
        ('{ "id": "chatcmpl-1" }', "/v1/embeddings"),
        ('{ "id": "chatcmpl-1" }', "/v1/chat/completions/"),
        ('{ "object": "chat.completion" }', "/v1/chat/completions"),
        ('[{"id": "x"}]', "/v1/chat/completions"),
        ("not json", "/v1/chat/completions"),
        ("", "/v1/responses"),
    ],
)
def test_response_id_left_byte_for_byte_when_rule_does_not_apply(body: str, path: str) -> None:
    assert override_response_id(body, REQUEST_ID, path) == body


ESCALATIONS = {"small": ModelEscalation(escalation_model="big")}


def test_escalation_switches_model_and_body_model_close_to_the_deadline() -> None:
    body = b'{"model":"small","messages":[{"role":"user","content":"hi"}]}'

    model, sent = escalate("small", body, NOW + timedelta(seconds=899), NOW, ESCALATIONS)

    assert model == "big"
    assert sent == b'{"model":"big","messages":[{"role":"user","content":"hi"}]}'


def test_no_escalation_at_or_beyond_the_threshold_or_without_config() -> None:
    body = b'{ "model": "small" }'
    far = NOW + timedelta(seconds=900)

    assert escalate("small", body, far, NOW, ESCALATIONS) == ("small", body)
    assert escalate("other", body, NOW, NOW, ESCALATIONS) == ("other", body)


def test_escalation_threshold_is_configurable_and_non_object_bodies_keep_their_bytes() -> None:
    escalations = {"small": ModelEscalation(escalation_model="big", threshold_s=60)}

    assert escalate("small", b"[1]", NOW + timedelta(seconds=59), NOW, escalations) == (
        "big",
        b"[1]",
    )
    assert escalate("small", b"{}", NOW + timedelta(seconds=61), NOW, escalations) == (
        "small",
        b"{}",
    )


def test_deadline_priority_is_negative_deadline_seconds_merged_into_nvext() -> None:
    deadline = datetime(2025, 6, 2, 0, 0, 0, 900_000, tzinfo=UTC)
    body = b'{"model":"m","nvext":{"router":{"x":1},"agent_hints":{"priority":5,"keep":true}}}'

    rewritten = msgspec.json.decode(inject_deadline_priority(body, deadline))

    assert rewritten == {
        "model": "m",
        "nvext": {
            "router": {"x": 1},
            "agent_hints": {"priority": -int(deadline.timestamp()), "keep": True},
        },
    }


def test_deadline_priority_creates_the_path_and_clamps_to_32_bits() -> None:
    far_future = datetime(2100, 1, 1, tzinfo=UTC)

    rewritten = inject_deadline_priority(b'{"model":"m"}', far_future)

    assert rewritten == b'{"model":"m","nvext":{"agent_hints":{"priority":-2147483648}}}'


@pytest.mark.parametrize(
    "body", [b"not json", b"[1]", b'{"nvext": 3}', b'{"nvext": {"agent_hints": []}}']
)
def test_deadline_priority_leaves_unsuitable_bodies_alone(body: bytes) -> None:
    assert inject_deadline_priority(body, NOW) == body
