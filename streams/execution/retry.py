"""The retry decision after a failed attempt (core §4.6): back off exponentially, never past
the deadline (less `stop_before_deadline_ms`) nor beyond `max_retries`."""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from streams.execution.failure import FailureReason


class BackoffPolicy(msgspec.Struct, frozen=True):
    backoff_ms: int = 1000
    backoff_factor: float = 2.0
    max_backoff_ms: int = 10_000
    max_retries: int | None = 1000
    # Unset behaves as 0 (the reference's deadline awareness is always on); negative = grace.
    stop_before_deadline_ms: int | None = 0

    def delay(self, attempt: int) -> timedelta:
        try:
            grown = self.backoff_ms * self.backoff_factor**attempt
        except OverflowError:  # a float factor after hundreds of attempts
            grown = self.max_backoff_ms
        return timedelta(milliseconds=min(grown, self.max_backoff_ms))


DEFAULT_BACKOFF_POLICY = BackoffPolicy()


class Retry(msgspec.Struct, frozen=True):
    attempt: int
    not_before: datetime


class GiveUp(msgspec.Struct, frozen=True):
    reason: FailureReason
    attempt: int


def decide(
    reason: FailureReason,
    attempt: int,
    now: datetime,
    deadline: datetime,
    policy: BackoffPolicy = DEFAULT_BACKOFF_POLICY,
) -> Retry | GiveUp:
    """`attempt` is the one that just failed (0 = first try)."""
    if not reason.retriable:
        return GiveUp(reason, attempt)
    if policy.max_retries is not None and attempt >= policy.max_retries:
        return GiveUp(reason, attempt)
    not_before = now + policy.delay(attempt)
    cutoff = deadline - timedelta(milliseconds=policy.stop_before_deadline_ms or 0)
    if not_before >= cutoff:
        return GiveUp(reason, attempt)
    return Retry(attempt + 1, not_before)
