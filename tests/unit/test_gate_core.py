"""The claim gate's rules, driven directly (no Kafka)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from schemas import ids
from schemas.events import (
    AbortDispatch,
    CancelBatchRequests,
    Dispatch,
    ExecutionFinished,
    ExecutionStarted,
    GateTick,
    ModelFilterAppended,
    PendingItem,
    RequestCanceled,
    RequestClaimed,
    RequestCompleted,
    RequestFailed,
    RequestReclaimed,
    RequestRetryScheduled,
    RequestsPending,
    WorkerStopped,
)
from streams.gate.core import Gate, Liveness, decode_entry

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


def test_cancel_batch_cancels_unsent_rows_and_aborts_in_flight_ones() -> None:
    g = gate({"m": 1})
    (d,) = dispatched(g.handle(pending("b", "m", 3), NOW))
    outs = g.handle(
        CancelBatchRequests(event_id="c", occurred_at=NOW, batch_id="b", model="m"), NOW
    )
    assert sorted(
        o.value.request_id for o in outs if isinstance(o.value, RequestCanceled)
    ) == sorted(ids.request_id("b", i) for i in (1, 2))
    (abort,) = [o for o in outs if isinstance(o.value, AbortDispatch)]
    assert (
        abort.topic == "dispatch"
        and abort.key == d.request_id
        and abort.value.claim_id == d.claim_id
    )
    # Whatever the aborted call reports, the request ends canceled, never completed after its
    # cancel, and nothing else of the batch is claimed.
    done = g.handle(finish(d), NOW)
    assert [type(o.value) for o in done] == [RequestCanceled]
    assert g.in_flight("m") == 0


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


def model_state(model: str, state: str) -> ModelFilterAppended:
    return ModelFilterAppended(event_id=ids.new_id(), occurred_at=NOW, model=model, state=state)  # type: ignore[arg-type]


def tick(model: str = "m") -> GateTick:
    return GateTick(event_id=ids.new_id(), occurred_at=NOW, model=model)


def test_a_coming_model_only_trickles_through_the_leaky_bucket_until_live() -> None:
    # (A claim timeout longer than the test, so that no claim is taken back meanwhile.)
    g = Gate({}, {"m": 10}, "w", {}, liveness=Liveness(claim_timeout=timedelta(hours=1)))
    g.handle(model_state("m", "coming"), NOW)
    first = dispatched(g.handle(pending("b", "m", 20), NOW))
    assert len(first) == 1  # one leaked row per (owner, window-class, model)
    # The bucket has no token for W/60 = 24 min: nothing more leaks before that.
    assert dispatched(g.handle(tick(), NOW + timedelta(minutes=23))) == []
    assert len(dispatched(g.handle(tick(), NOW + timedelta(minutes=25)))) == 1
    # Turning live releases the backlog at full capacity.
    released = dispatched(g.handle(model_state("m", "live"), NOW + timedelta(minutes=26)))
    assert len(released) == 8  # capacity 10, two in flight


def test_a_coming_model_claims_at_full_capacity_within_the_ramp() -> None:
    g = gate({"m": 10})
    g.handle(model_state("m", "coming"), NOW)
    # 24 h window, 50 minutes from its deadline: inside ramp(24 h) = 58.7 min.
    assert len(dispatched(g.handle(pending("b", "m", 20, NOW + timedelta(minutes=50)), NOW))) == 10


def test_the_owner_with_fewer_requests_in_flight_goes_first() -> None:
    g = gate({"m": 3})
    big = pending("big", "m", 50)
    g.handle(big, NOW)  # alice takes all 3 slots
    small = RequestsPending(**{**msgspec.structs.asdict(pending("small", "m", 5)), "owner": "bob"})
    g.handle(small, NOW)
    (first_done,) = dispatched(g.handle(finish(dispatched_of(g, "big")[0]), NOW))
    assert first_done.batch_id == "small"  # bob has 0 in flight, alice 2


def dispatched_of(g: Gate, batch: str) -> list[Dispatch]:
    """Dispatches the gate would hold for ``batch``'s in-flight rows (rebuilt from entries)."""
    found = []
    for request_id, raw in g.entries.items():
        entry = decode_entry(raw)
        if entry.batch_id == batch and entry.state == "claimed":
            found.append(
                Dispatch(event_id="d", occurred_at=NOW, request_id=request_id, batch_id=batch,
                         template_id=entry.template_id, custom_id=entry.custom_id, model=entry.model,
                         claim_id=entry.claim_id or "", attempt=entry.attempt, deadline=NOW)
            )  # fmt: skip
    return found


def test_a_claim_never_started_is_reclaimed_after_the_claim_timeout_and_counts_as_an_attempt() -> (
    None
):
    g = gate({"m": 1})
    (d,) = dispatched(g.handle(pending("b", "m", 1), NOW))
    assert g.handle(tick(), NOW + timedelta(seconds=59)) == []
    outs = g.handle(tick(), NOW + timedelta(seconds=61))
    (reclaimed,) = [o.value for o in outs if isinstance(o.value, RequestReclaimed)]
    assert reclaimed.reason == "claim_timeout" and reclaimed.attempt == 1
    (again,) = dispatched(outs)
    assert again.attempt == 1 and again.claim_id != d.claim_id
    # The first executor's late report is fenced out.
    assert g.handle(finish(d), NOW + timedelta(seconds=62)) == []


def test_requests_of_a_stopped_executor_are_reclaimed_at_once() -> None:
    g = gate({"m": 2})
    sent = dispatched(g.handle(pending("b", "m", 2), NOW))
    for d in sent:
        g.handle(
            ExecutionStarted(
                event_id="s",
                occurred_at=NOW,
                request_id=d.request_id,
                model="m",
                claim_id=d.claim_id,
                worker_id="ex-1",
            ),
            NOW,
        )
    g.handle(WorkerStopped(event_id="x", occurred_at=NOW, worker_id="ex-1", role="executor"), NOW)
    outs = g.handle(tick(), NOW + timedelta(seconds=1))
    assert {o.value.reason for o in outs if isinstance(o.value, RequestReclaimed)} == {
        "worker_dead"
    }
    assert len(dispatched(outs)) == 2


def test_reclaim_gives_up_after_max_retries() -> None:
    g = Gate({}, {"m": 1}, "w", {}, liveness=Liveness(max_retries=0))
    dispatched(g.handle(pending("b", "m", 1), NOW))
    outs = g.handle(tick(), NOW + timedelta(minutes=2))
    (failed,) = [o.value for o in outs if isinstance(o.value, RequestFailed)]
    assert failed.error_type == "TaskTerminated"


def test_reading_back_its_own_reclaim_does_not_undo_the_claim_made_since() -> None:
    g = gate({"m": 1})
    dispatched(g.handle(pending("b", "m", 1), NOW))
    outs = g.handle(tick(), NOW + timedelta(seconds=61))
    (reclaimed,) = [o.value for o in outs if isinstance(o.value, RequestReclaimed)]
    (second,) = dispatched(outs)
    # The reclaim comes back on the lifecycle topic after the new claim was made.
    assert g.handle(reclaimed, NOW + timedelta(seconds=62)) == []
    assert g.in_flight("m") == 1
    assert dispatched(g.handle(tick(), NOW + timedelta(seconds=63))) == []
    entry = decode_entry(g.entries[second.request_id])
    assert (entry.state, entry.claim_id) == ("claimed", second.claim_id)


def test_a_batch_past_its_deadline_fails_its_unsent_rows_and_claims_nothing_more() -> None:
    g = gate({"m": 1})
    (d,) = dispatched(g.handle(pending("b", "m", 3, NOW + timedelta(seconds=30)), NOW))
    outs = g.handle(tick(), NOW + timedelta(seconds=31))
    failed = [o.value for o in outs if isinstance(o.value, RequestFailed)]
    assert {f.request_id for f in failed} == {ids.request_id("b", i) for i in (1, 2)}
    assert {f.error_type for f in failed} == {"BatchTerminated"}
    assert dispatched(outs) == []
    # The row in flight still finishes with its genuine result.
    assert [type(o.value) for o in g.handle(finish(d), NOW + timedelta(seconds=32))] == [
        RequestCompleted
    ]


def test_walking_a_heap_in_order_matches_sorting_it() -> None:
    import heapq
    import random

    from streams.gate.core import _in_order

    items = [(random.random(), random.randint(0, 9), str(i)) for i in range(500)]
    heap = list(items)
    heapq.heapify(heap)
    assert list(_in_order(heap)) == sorted(items)
    assert list(_in_order([])) == []
