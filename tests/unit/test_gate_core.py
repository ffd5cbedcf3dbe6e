"""The claim gate's rules, driven directly (no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas import ids
from schemas.events import (
    CancelBatchRequests,
    Dispatch,
    ExecutionFinished,
    ExecutionStarted,
    GateTick,
    PendingItem,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestFailed,
    RequestRetryScheduled,
    RequestsPending,
)
from streams.gate.core import Gate

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def pending(
    batch: str, model: str, n: int, deadline: datetime = NOW + timedelta(hours=24)
) -> RequestsPending:
    return RequestsPending(
        event_id=ids.new_id(),
        occurred_at=NOW,
        batch_id=batch,
        model=model,
        owner="alice",
        created_at=NOW,
        deadline=deadline,
        window_class="24h",
        service_tier=None,
        items=[
            PendingItem(ids.request_id(batch, i), ids.template_id("f", i), i, f"c{i}")
            for i in range(n)
        ],
    )


def gate(limits: dict[str, int]) -> Gate:
    return Gate({}, limits, "gate-test", {})


def dispatched(outs: list) -> list[Dispatch]:
    return [o.value for o in outs if isinstance(o.value, Dispatch)]


def finish(d: Dispatch, result: str = "completed", **kw: object) -> ExecutionFinished:
    return ExecutionFinished(
        event_id=ids.new_id(), occurred_at=NOW, request_id=d.request_id, model=d.model,
        claim_id=d.claim_id, worker_id="w", result=result, status=200, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_claims_never_exceed_model_capacity_and_follow_line_order() -> None:
    g = gate({"m": 3})
    outs = g.handle(pending("b1", "m", 10), NOW)
    sent = dispatched(outs)
    assert [d.request_id for d in sent] == [ids.request_id("b1", i) for i in range(3)]
    assert all(isinstance(o.value, RequestClaimed) for o in outs if o.topic == "requests")
    assert g.in_flight("m") == 3


def test_a_finished_request_frees_capacity_for_the_next_one() -> None:
    g = gate({"m": 2})
    first = dispatched(g.handle(pending("b1", "m", 5), NOW))
    outs = g.handle(finish(first[0]), NOW)
    assert [type(o.value).__name__ for o in outs if o.topic == "requests"] == [
        "RequestCompleted",
        "RequestClaimed",
    ]
    assert dispatched(outs)[0].request_id == ids.request_id("b1", 2)
    assert g.in_flight("m") == 2


def test_earlier_deadline_batch_goes_first() -> None:
    g = gate({"m": 1})
    (first,) = dispatched(g.handle(pending("late", "m", 2, NOW + timedelta(hours=24)), NOW))
    assert dispatched(g.handle(pending("soon", "m", 2, NOW + timedelta(hours=1)), NOW)) == []
    (nxt,) = dispatched(g.handle(finish(first), NOW))
    assert nxt.request_id == ids.request_id("soon", 0)


def test_second_terminal_report_is_dropped() -> None:
    g = gate({"m": 1})
    (d,) = dispatched(g.handle(pending("b", "m", 1), NOW))
    first = g.handle(finish(d), NOW)
    again = g.handle(finish(d), NOW)
    failed_late = g.handle(finish(d, "failed", error_type="NonRetriableHttpStatus"), NOW)
    assert sum(isinstance(o.value, RequestCompleted) for o in first) == 1
    assert again == [] and failed_late == []


def test_redelivered_population_does_not_resurrect_a_finished_request() -> None:
    g = gate({"m": 1})
    (d,) = dispatched(g.handle(pending("b", "m", 1), NOW))
    g.handle(finish(d), NOW)
    assert dispatched(g.handle(pending("b", "m", 1), NOW)) == []


def test_stale_claim_report_is_fenced_out() -> None:
    g = gate({"m": 1})
    (d,) = dispatched(g.handle(pending("b", "m", 1), NOW))
    stale = ExecutionStarted(
        event_id="x",
        occurred_at=NOW,
        request_id=d.request_id,
        model="m",
        claim_id="other",
        worker_id="w",
    )
    assert g.handle(stale, NOW) == []


def test_retry_waits_for_not_before_then_is_claimed_again_with_next_attempt() -> None:
    g = gate({"m": 1})
    (d,) = dispatched(g.handle(pending("b", "m", 1), NOW))
    later = NOW + timedelta(seconds=2)
    outs = g.handle(finish(d, "retry", not_before=later), NOW)
    assert [type(o.value) for o in outs] == [RequestRetryScheduled]
    assert (
        dispatched(
            g.handle(GateTick(event_id="t", occurred_at=NOW, model="m"), NOW + timedelta(seconds=1))
        )
        == []
    )
    (again,) = dispatched(g.handle(GateTick(event_id="t", occurred_at=NOW, model="m"), later))
    assert again.attempt == 1 and again.claim_id != d.claim_id


def test_cancel_batch_cancels_unsent_rows_and_lets_in_flight_finish() -> None:
    g = gate({"m": 1})
    (d,) = dispatched(g.handle(pending("b", "m", 3), NOW))
    outs = g.handle(
        CancelBatchRequests(event_id="c", occurred_at=NOW, batch_id="b", model="m"), NOW
    )
    assert sorted(
        o.value.request_id for o in outs if isinstance(o.value, RequestCanceled)
    ) == sorted(ids.request_id("b", i) for i in (1, 2))
    done = g.handle(finish(d), NOW)
    assert [type(o.value) for o in done] == [RequestCompleted]  # nothing else claimed


def test_unknown_model_fails_its_requests_with_a_clear_error() -> None:
    g = gate({"m": 1})
    outs = g.handle(pending("b", "nope", 1), NOW)
    (failed,) = [o.value for o in outs if isinstance(o.value, RequestFailed)]
    (body,) = [o.value for o in outs if o.topic == "bodies"]
    assert failed.error_type == "RequestBuilderError"
    assert "model 'nope' is not configured" in body.text


def test_rebuild_from_entries_restores_capacity_accounting() -> None:
    entries: dict[str, bytes] = {}
    g = Gate(entries, {"m": 2}, "w", {})
    g.handle(pending("b", "m", 5), NOW)
    fresh = Gate(entries, {"m": 2}, "w2", {})
    fresh.rebuild()
    assert fresh.in_flight("m") == 2
    assert dispatched(fresh.handle(GateTick(event_id="t", occurred_at=NOW, model="m"), NOW)) == []
