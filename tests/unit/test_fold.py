"""The request state machine and the projector's fold, without Kafka or PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from projections.fold import Fold
from schemas.events import (
    PendingItem,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestFailed,
    RequestRetryScheduled,
    RequestsPending,
    RequestStarted,
)
from streams.lifecycle import next_state

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BASE = {"batch_id": "b", "model": "m"}


def at(s: int) -> datetime:
    return T0 + timedelta(seconds=s)


def pending(*ids: str) -> RequestsPending:
    return RequestsPending(
        event_id="p", occurred_at=T0, batch_id="b", model="m", owner="u", created_at=T0,
        deadline=at(86400), window_class="24h", service_tier=None,
        items=[PendingItem(i, f"t-{i}", n, f"c-{i}") for n, i in enumerate(ids)],
    )  # fmt: skip


def claimed(rid: str, s: int = 1) -> RequestClaimed:
    return RequestClaimed(
        event_id="c",
        occurred_at=at(s),
        request_id=rid,
        claim_id="k",
        worker_id="w",
        attempt=0,
        **BASE,
    )


def started(rid: str, s: int = 2) -> RequestStarted:
    return RequestStarted(
        event_id="s", occurred_at=at(s), request_id=rid, claim_id="k", worker_id="w", **BASE
    )


def completed(rid: str, s: int = 3, size: int = 10) -> RequestCompleted:
    return RequestCompleted(
        event_id="d",
        occurred_at=at(s),
        request_id=rid,
        claim_id="k",
        status=200,
        size=size,
        routed_model="m",
        attempt=0,
        **BASE,
    )


def failed(rid: str, s: int = 3) -> RequestFailed:
    return RequestFailed(
        event_id="f",
        occurred_at=at(s),
        request_id=rid,
        claim_id="k",
        error_type="NonRetriableHttpStatus",
        status=400,
        size=7,
        attempt=0,
        **BASE,
    )


def canceled(rid: str, s: int = 3) -> RequestCanceled:
    return RequestCanceled(event_id="x", occurred_at=at(s), request_id=rid, **BASE)


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (None, pending("r"), "pending"),
        ("pending", pending("r"), None),
        ("pending", claimed("r"), "claimed"),
        ("claimed", started("r"), "processing"),
        ("processing", completed("r"), "completed"),
        ("completed", failed("r"), None),  # first result wins
        ("failed", completed("r"), None),
        ("completed", canceled("r"), None),  # cancel never overwrites a result
        ("canceled", completed("r"), "completed"),  # a genuine late result supersedes a cancel
        ("canceled", canceled("r"), None),
        (
            "processing",
            RequestRetryScheduled(
                event_id="y",
                occurred_at=T0,
                request_id="r",
                claim_id="k",
                attempt=1,
                not_before=at(1),
                **BASE,
            ),
            "pending",
        ),
        ("completed", claimed("r"), None),  # claims never revive a terminal row
    ],
)
def test_transitions(state: str | None, event: object, expected: str | None) -> None:
    assert next_state(state, event) == expected  # type: ignore[arg-type]


def test_fold_counts_follow_transitions_and_replays_change_nothing() -> None:
    events = [
        pending("a", "b", "c"),
        claimed("a"),
        started("a"),
        completed("a", size=42),
        claimed("b"),
        canceled("c"),
    ]
    fold = Fold({})
    for offset, event in enumerate(events):
        fold.apply(event, offset)
    counts = fold.deltas["b"].counts
    assert (counts["pending"], counts["in_progress"], counts["completed"], counts["canceled"]) == (
        0,
        1,
        1,
        1,
    )
    assert counts["response_bytes"] == 42
    assert fold.deltas["b"].last_terminal_at == at(3)
    row = fold.rows["a"]
    assert (row.state, row.response_size, row.claimed_at, row.started_at) == (
        "completed",
        42,
        at(1),
        at(2),
    )

    again = Fold(fold.rows)  # the same events at the same offsets: a replay
    for offset, event in enumerate(events):
        again.apply(event, offset)
    assert not again.deltas and {r.state for r in again.rows.values()} == {
        "completed",
        "claimed",
        "canceled",
    }


def test_failed_rows_count_their_error_size() -> None:
    fold = Fold({})
    for offset, event in enumerate([pending("a"), claimed("a"), started("a"), failed("a")]):
        fold.apply(event, offset)
    counts = fold.deltas["b"].counts
    assert (
        counts["failed"] == 1
        and counts["error_bytes"] == 7
        and fold.rows["a"].error_type == "NonRetriableHttpStatus"
    )
