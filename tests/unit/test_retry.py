from datetime import UTC, datetime, timedelta

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
)
from streams.execution.retry import BackoffPolicy, GiveUp, Retry, decide

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
FAR = NOW + timedelta(hours=24)
BUSY = RetriableHttpStatus(status=503, body="busy")


def test_default_delays_are_1_2_4_8_then_capped_at_10_seconds() -> None:
    delays = []
    for attempt in range(7):
        decision = decide(BUSY, attempt, NOW, FAR)
        assert isinstance(decision, Retry)
        assert decision.attempt == attempt + 1
        delays.append((decision.not_before - NOW).total_seconds())

    assert delays == [1, 2, 4, 8, 10, 10, 10]


def test_max_retries_3_means_at_most_four_upstream_calls() -> None:
    policy = BackoffPolicy(max_retries=3)
    attempt, now, calls = 0, NOW, 0
    while True:
        calls += 1  # the upstream call for `attempt` failed with 503
        decision = decide(BUSY, attempt, now, FAR, policy)
        if isinstance(decision, GiveUp):
            break
        attempt, now = decision.attempt, decision.not_before

    assert calls == 4
    assert decision == GiveUp(BUSY, 3)


def test_without_max_retries_only_the_deadline_stops_retrying() -> None:
    policy = BackoffPolicy(max_retries=None)

    assert isinstance(decide(BUSY, 5000, NOW, FAR, policy), Retry)


def test_no_retry_whose_not_before_reaches_the_deadline() -> None:
    # Attempt 2 backs off 4 s.
    assert isinstance(decide(BUSY, 2, NOW, NOW + timedelta(seconds=4, microseconds=1)), Retry)
    assert decide(BUSY, 2, NOW, NOW + timedelta(seconds=4)) == GiveUp(BUSY, 2)
    assert decide(BUSY, 2, NOW, NOW + timedelta(seconds=3)) == GiveUp(BUSY, 2)


def test_stop_before_deadline_moves_the_cut_off_earlier() -> None:
    policy = BackoffPolicy(stop_before_deadline_ms=5000)
    deadline = NOW + timedelta(seconds=5, milliseconds=500)

    assert decide(BUSY, 0, NOW, deadline, policy) == GiveUp(BUSY, 0)
    assert isinstance(decide(BUSY, 0, NOW, deadline + timedelta(seconds=1), policy), Retry)


def test_unset_stop_before_deadline_behaves_as_zero() -> None:
    policy = BackoffPolicy(stop_before_deadline_ms=None)

    assert decide(BUSY, 0, NOW, NOW + timedelta(seconds=1), policy) == GiveUp(BUSY, 0)
    assert isinstance(decide(BUSY, 0, NOW, NOW + timedelta(seconds=2), policy), Retry)


def test_negative_stop_before_deadline_is_a_grace_period_after_it() -> None:
    policy = BackoffPolicy(stop_before_deadline_ms=-5000)
    deadline = NOW - timedelta(seconds=1)  # already past: cut-off is now + 4 s

    retry = decide(BUSY, 1, NOW, deadline, policy)

    assert retry == Retry(2, NOW + timedelta(seconds=2))
    assert decide(BUSY, 2, NOW, deadline, policy) == GiveUp(BUSY, 2)


@pytest.mark.parametrize(
    "reason",
    [
        NonRetriableHttpStatus(status=400, body="bad"),
        RequestBuilderError(error="invalid header"),
        BatchTerminated(),
    ],
)
def test_non_retriable_reasons_give_up_at_once(reason: FailureReason) -> None:
    assert decide(reason, 0, NOW, FAR) == GiveUp(reason, 0)


@pytest.mark.parametrize(
    "reason",
    [NetworkError.of("reset"), Timeout(error="slow"), TaskTerminated(), BUSY],
)
def test_retriable_reasons_are_rescheduled(reason: FailureReason) -> None:
    assert decide(reason, 0, NOW, FAR) == Retry(1, NOW + timedelta(seconds=1))


def test_custom_backoff_shape() -> None:
    policy = BackoffPolicy(backoff_ms=200, backoff_factor=3, max_backoff_ms=1000)

    assert [policy.delay(k).total_seconds() for k in range(4)] == [0.2, 0.6, 1.0, 1.0]
