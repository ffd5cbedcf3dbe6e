"""Folding lifecycle events into read-model writes (projections/fold.py), and the request state
machine it shares with the gate (streams/lifecycle.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from projections.fold import COLUMNS, Fold, rebuilt
from schemas.events import (
    PendingItem,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestEvent,
    RequestFailed,
    RequestReclaimed,
    RequestRetried,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
)
from streams.lifecycle import next_state

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BATCH = "1f0e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
FILE = "7b0f1c2e-3a4d-4e5f-8a9b-0c1d2e3f4a5b"
R = "00000000-0000-4000-8000-000000000001"
CLAIM = "00000000-0000-4000-8000-0000000000c1"


def common(from_state: str, at: datetime = NOW) -> dict[str, Any]:
    return {"event_id": "e", "occurred_at": at, "request_id": R, "batch_id": BATCH, "model": "m", "from_state": from_state}  # fmt: skip


def pending() -> RequestsPending:
    return RequestsPending(
        event_id="p", occurred_at=NOW, batch_id=BATCH, file_id=FILE, model="m", owner="alice",
        created_at=NOW, deadline=NOW + timedelta(hours=24), window_class="24h",
        service_tier=None, items=[PendingItem(R, 0)],
    )  # fmt: skip


def claimed(from_state: str = "pending") -> RequestClaimed:
    return RequestClaimed(**common(from_state), claim_id=CLAIM, worker_id="gate", attempt=0)


def started(from_state: str = "claimed") -> RequestStarted:
    return RequestStarted(**common(from_state), claim_id=CLAIM, worker_id="executor-1")


def completed(from_state: str = "processing") -> RequestCompleted:
    return RequestCompleted(
        **common(from_state, NOW + timedelta(seconds=2)), claim_id=CLAIM, status=200, size=42,
        routed_model="m", attempt=0,
    )  # fmt: skip


def failed(from_state: str = "processing", error: str | None = None) -> RequestFailed:
    return RequestFailed(
        **common(from_state), claim_id=CLAIM, error_type="BatchTerminated", status=None,
        size=26, attempt=0, error=error,
    )  # fmt: skip


def canceled(from_state: str = "pending") -> RequestCanceled:
    return RequestCanceled(**common(from_state))


def retry(from_state: str = "processing") -> RequestRetryScheduled:
    return RequestRetryScheduled(**common(from_state), claim_id=CLAIM, attempt=1, not_before=NOW)


def reclaimed(from_state: str = "claimed") -> RequestReclaimed:
    return RequestReclaimed(**common(from_state), claim_id=CLAIM, attempt=1, reason="claim_timeout")  # fmt: skip


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (None, pending(), "pending"),
        ("pending", pending(), None),
        ("pending", claimed(), "claimed"),
        ("claimed", claimed(), None),
        ("claimed", started(), "processing"),
        ("pending", started(), None),
        ("processing", retry(), "pending"),
        ("claimed", reclaimed(), "pending"),
        ("pending", reclaimed(), None),
        ("processing", completed(), "completed"),
        ("canceled", completed(), "completed"),  # a genuine late result supersedes a cancel
        ("completed", completed(), None),  # first result wins
        ("failed", completed(), None),
        ("completed", failed(), None),
        ("pending", canceled(), "canceled"),
        ("completed", canceled(), None),  # cancel never overwrites a result
        ("canceled", canceled(), None),
    ],
)
def test_transitions(state: str | None, event: Any, expected: str | None) -> None:
    assert next_state(state, event) == expected  # type: ignore[arg-type]


def test_a_whole_lifecycle_collapses_into_one_write_of_its_final_columns() -> None:
    fold = Fold()
    lifecycle: list[RequestEvent] = [pending(), claimed(), started(), completed()]
    for position, event in enumerate(lifecycle):
        fold.apply(event, position)
    assert list(fold.new_rows) == [R]
    write = fold.writes[R]
    assert (write.from_state, write.state) == ("pending", "completed")
    assert (write.first_offset, write.last_offset) == (1, 3)
    assert write.values["claim_id"] == CLAIM
    assert write.values["daemon_id"] == "executor-1"  # the start overwrote the claimant
    assert write.values["response_size"] == 42
    assert write.values["completed_at"] == NOW + timedelta(seconds=2)
    assert write.values["canceled_at"] is None
    assert set(write.values) <= set(COLUMNS)
    assert not fold.rejected


def test_a_row_already_past_its_writes_first_event_takes_only_the_events_after_it() -> None:
    """A claim the gate published again after a crash shares a poll with the row's start; the
    row, which an earlier poll's copy claimed, takes the start alone."""
    fold = Fold()
    fold.apply(claimed(), 5)
    fold.apply(started(), 6)
    write = rebuilt(fold.steps[R], "claimed", 2)
    assert write is not None
    assert (write.from_state, write.state) == ("claimed", "processing")
    assert (write.first_offset, write.last_offset) == (6, 6)
    assert set(write.values) == {"daemon_id", "started_at"}
    assert rebuilt(fold.steps[R], "processing", 4) is None  # both were copies
    assert rebuilt(fold.steps[R], "claimed", 6) is None  # a replay past them all


def test_a_retry_clears_the_claim_columns_it_leaves_behind() -> None:
    fold = Fold()
    lifecycle: list[RequestEvent] = [claimed(), started(), retry()]
    for position, event in enumerate(lifecycle):
        fold.apply(event, position)
    values = fold.writes[R].values
    assert fold.writes[R].state == "pending"
    assert values["claim_id"] is None and values["started_at"] is None
    assert values["retry_attempt"] == 1 and values["not_before"] == NOW


def test_an_event_that_does_not_follow_the_state_it_claims_is_refused() -> None:
    fold = Fold()
    fold.apply(claimed(), 1)
    fold.apply(completed("processing"), 2)  # the row is claimed, not processing
    assert fold.writes[R].state == "claimed"
    assert [reason for _, reason in fold.rejected] == ["RequestCompleted does not apply to claimed"]


def test_an_illegal_transition_is_refused_even_as_the_first_event() -> None:
    fold = Fold()
    fold.apply(completed("completed"), 1)
    assert not fold.writes
    assert fold.rejected[0][1] == "RequestCompleted does not apply to completed"


def test_engine_made_failure_envelopes_are_kept_for_the_error_file() -> None:
    fold = Fold()
    fold.apply(failed("pending", error='{"type":"BatchTerminated"}'), 1)
    assert fold.writes[R].values["error_envelope"] == b'{"type":"BatchTerminated"}'
    assert fold.writes[R].values["failed_at"] == NOW


def test_an_upstream_failure_clears_an_earlier_run_s_engine_envelope() -> None:
    # its envelope is on the bodies topic, where the reads find it once the row's is gone
    fold = Fold()
    fold.apply(failed("pending", error='{"type":"BatchTerminated"}'), 1)
    fold.apply(RequestRetried(**common("failed")), 2)
    assert fold.writes[R].values["error_envelope"] is None
    fold.apply(failed("pending"), 3)
    assert fold.writes[R].state == "failed" and fold.writes[R].values["error_envelope"] is None
