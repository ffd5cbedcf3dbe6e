import msgspec
import pytest

from streams.execution.failure import (
    BatchTerminated,
    FailureReason,
    NetworkError,
    NonRetriableHttpStatus,
    RequestBuilderError,
    RetriableHttpStatus,
    TaskTerminated,
    Timeout,
    parse,
)

STORED = [
    (
        RetriableHttpStatus(status=500, body='{"error":"boom"}'),
        '{"type":"RetriableHttpStatus","details":{"status":500,"body":"{\\"error\\":\\"boom\\"}"}}',
        True,
    ),
    (
        NonRetriableHttpStatus(status=400, body="bad"),
        '{"type":"NonRetriableHttpStatus","details":{"status":400,"body":"bad"}}',
        False,
    ),
    (
        NetworkError(error="reset"),
        '{"type":"NetworkError","details":{"error":"reset"}}',
        True,
    ),
    (
        Timeout(error="no first event within 10ms"),
        '{"type":"Timeout","details":{"error":"no first event within 10ms"}}',
        True,
    ),
    (TaskTerminated(), '{"type":"TaskTerminated"}', True),
    (
        RequestBuilderError(error="invalid header"),
        '{"type":"RequestBuilderError","details":{"error":"invalid header"}}',
        False,
    ),
    (BatchTerminated(), '{"type":"BatchTerminated"}', False),
]


@pytest.mark.parametrize(("reason", "text", "retriable"), STORED)
def test_envelope_text_matches_the_stored_form_and_reads_back(
    reason: FailureReason, text: str, retriable: bool
) -> None:
    assert reason.to_json() == text
    assert parse(text) == reason
    assert reason.retriable is retriable


def test_bodies_are_escaped_like_the_reference_and_keep_non_ascii() -> None:
    reason = NonRetriableHttpStatus(status=422, body='café "x"\n\ttab\u0001')

    text = reason.to_json()

    assert text == (
        '{"type":"NonRetriableHttpStatus","details":'
        '{"status":422,"body":"café \\"x\\"\\n\\ttab\\u0001"}}'
    )
    assert parse(text) == reason


def test_network_error_detail_is_itself_a_message_and_sources_document() -> None:
    reason = NetworkError.of("connection reset", ["os error 104", "broken pipe"])

    stored = msgspec.json.decode(reason.to_json())

    assert stored["type"] == "NetworkError"
    assert msgspec.json.decode(stored["details"]["error"]) == {
        "message": "connection reset",
        "sources": ["os error 104", "broken pipe"],
    }
    assert parse(reason.to_json()) == reason


@pytest.mark.parametrize(
    "text",
    [
        "Upstream returned 502: bad gateway",
        "",
        "[1, 2]",
        '"just a string"',
        '{"error": {"message": "not ours"}}',
        '{"type": "Exploded"}',
        '{"type": "RetriableHttpStatus"}',
        '{"type": "RetriableHttpStatus", "details": {"status": "500", "body": "x"}}',
        '{"type": "NonRetriableHttpStatus", "details": {"status": 70000, "body": "x"}}',
        '{"type": "Timeout", "details": {"error": 5}}',
    ],
)
def test_anything_that_is_not_an_envelope_reads_as_network_error_with_raw_text(
    text: str,
) -> None:
    reason = parse(text)

    assert reason == NetworkError(error=text)
    assert reason.retriable
