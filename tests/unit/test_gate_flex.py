"""Flex requests (rows without a batch) through the claim gate, driven by ``Gate.handle``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas import ids
from schemas.bodies import BodyRef
from schemas.events import (
    BatchFacts,
    BatchlessFacts,
    ChunkRef,
    DispatchBatch,
    DispatchItem,
    ExecutionReport,
    FinishedItem,
    GateTick,
    LineRange,
    ModelFilterAppended,
    PendingRequests,
    RequestClaimed,
    RequestCompleted,
    RequestCreated,
    RequestEvent,
    RequestFailed,
    RequestsPending,
    RequestSubmitted,
    RequestTransitions,
    SourceMark,
)
from streams.emit import Out
from streams.gate.core import Gate, Liveness
from streams.gate.scoring import GateConfig
from streams.lifecycle import next_state

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
marks = iter(range(1, 10_000))

REFERENCE = GateConfig(prefetch=0)  # claims only into free capacity, as the reference


def submitted(
    request_id: str, owner: str = "alice", model: str = "m", at: datetime = T0, *,
    tier: str | None = "flex", window: timedelta = HOUR,
) -> RequestSubmitted:  # fmt: skip
    """A flex request created ``at``, its deadline a ``window`` later (commands partition 0)."""
    return RequestSubmitted(
        event_id=ids.new_id(), occurred_at=at, source=SourceMark(0, next(marks), 0),
        request_id=request_id, model=model, body=BodyRef(2, 40),
        facts=BatchlessFacts(
            owner=owner, path="/v1/chat/completions", service_tier=tier, created_at=at,
            deadline=at + window,
        ),
    )  # fmt: skip


def events(outs: list[Out]) -> list[RequestEvent]:
    return [e for o in outs if isinstance(o.value, RequestTransitions) for e in o.value.events]


def dispatched(outs: list[Out]) -> list[DispatchItem]:
    return [i for o in outs if isinstance(o.value, DispatchBatch) for i in o.value.items]


def finish(item: DispatchItem, at: datetime = T0) -> ExecutionReport:
    return ExecutionReport(
        event_id=ids.new_id(), occurred_at=at, worker_id="ex-1", model=item.model,
        finished=[FinishedItem(request_id=item.request_id, claim_id=item.claim_id, result="completed", status=200, size=5)],
    )  # fmt: skip


def test_a_flex_request_is_created_claimed_dispatched_and_forgotten_when_done() -> None:
    state: dict[str, bytes] = {}
    gate = Gate(state, {"m": 2}, "gate", config=REFERENCE)
    request_id = ids.new_id()
    outs = gate.handle(submitted(request_id), T0)
    created, claimed = events(outs)
    assert isinstance(created, RequestCreated) and created.state == "pending"
    assert created.batch_id is None and created.facts.service_tier == "flex"
    assert isinstance(claimed, RequestClaimed) and claimed.batch_id is None
    [item] = dispatched(outs)
    assert (item.request_id, item.batch_id, item.body, item.owner) == (request_id, None, BodyRef(2, 40), "alice")  # fmt: skip
    assert item.deadline == T0 + HOUR
    done = events(gate.handle(finish(item), T0))
    assert [type(e).__name__ for e in done] == ["RequestStarted", "RequestCompleted"]
    assert all(e.batch_id is None for e in done)
    assert [k for k in state if not k.startswith("W:")] == []  # nothing left of the request
    # The same submission handled again (a command replayed after a crash) creates nothing.
    replayed = submitted(request_id)
    assert gate.handle(RequestSubmitted(
        event_id=ids.new_id(), occurred_at=T0, source=SourceMark(0, 0, 0), request_id=request_id,
        model="m", body=BodyRef(2, 40), facts=replayed.facts,
    ), T0) == []  # fmt: skip


def test_a_flex_backlog_is_claimed_fairly_in_deadline_order_and_then_forgotten() -> None:
    state: dict[str, bytes] = {}
    gate = Gate(state, {"m": 2}, "gate", config=REFERENCE)
    made: dict[str, list[str]] = {"alice": [], "bob": []}
    running: list[DispatchItem] = []
    for n in range(40):  # owners alternating, then alice alone; each row due a second later
        owner = ("alice", "bob")[n % 2] if n < 30 else "alice"
        request_id, at = ids.new_id(), T0 + n * timedelta(seconds=1)
        made[owner].append(request_id)
        running += dispatched(gate.handle(submitted(request_id, owner=owner, at=at), at))
    claimed = [i.request_id for i in running]
    while running:
        item = running.pop(0)
        nxt = dispatched(gate.handle(finish(item, T0 + HOUR), T0 + HOUR))
        assert len(nxt) == (1 if len(claimed) < 40 else 0)  # a freed slot never stays idle
        running += nxt
        claimed += [i.request_id for i in nxt]
    # each owner's rows in deadline order, the owners taking turns while both have rows, and
    # alice's last rows claimed while she always has one in flight
    assert [r for r in claimed if r in made["alice"]] == made["alice"]
    assert [r for r in claimed if r in made["bob"]] == made["bob"]
    owners = ["alice" if r in made["alice"] else "bob" for r in claimed]
    assert all(owners[i] != owners[i + 1] for i in range(0, 30, 2))
    index = gate.models["m"]
    assert index.loose == {} and index.loose_ranked.heads == [] and index.loose_ranked.by_kind == {}
    assert [k for k in state if not k.startswith("W:")] == []


def test_every_event_of_a_flex_request_is_a_legal_transition() -> None:
    gate = Gate({}, {"m": 1}, "gate", config=REFERENCE)
    states: dict[str, str | None] = {}
    pending = [ids.new_id() for _ in range(3)]
    for request_id in pending:
        for e in events(gate.handle(submitted(request_id), T0)):
            assert not isinstance(e, RequestsPending)  # a flex request is never a batch row
            states[e.request_id] = next_state(states.get(e.request_id), e)  # type: ignore[arg-type]
    while True:
        claims = [i for i in (states.items()) if i[1] == "claimed"]
        if not claims:
            break
        [(request_id, _)] = claims  # capacity 1: one at a time
        item = DispatchItem(request_id=request_id, claim_id=ids.claim_id(request_id, 1), batch_id=None, model="m", path="/v1/chat/completions", attempt=0, deadline=T0 + HOUR, claimed_at=T0, body=BodyRef(0, 0))  # fmt: skip
        for e in events(gate.handle(finish(item), T0)):
            assert not isinstance(e, RequestsPending)
            after = next_state(states.get(e.request_id), e)  # type: ignore[arg-type]
            assert after is not None, e
            states[e.request_id] = after
    assert set(states.values()) == {"completed"}


def test_an_unknown_model_fails_the_request_with_a_clear_error() -> None:
    gate = Gate({}, {"m": 1}, "gate", config=REFERENCE)
    outs = gate.handle(submitted(ids.new_id(), model="nope"), T0)
    created, failed = events(outs)
    assert isinstance(created, RequestCreated) and isinstance(failed, RequestFailed)
    assert failed.error_type == "RequestBuilderError" and "'nope' is not configured" in (failed.error or "")  # fmt: skip
    assert dispatched(outs) == []


def test_flex_rows_and_batch_rows_share_capacity_by_fairness() -> None:
    gate = Gate({}, {"m": 2}, "gate", config=REFERENCE)
    batch = ids.new_id()
    facts = BatchFacts(
        batch_id=batch, file_id=ids.new_id(), owner="bob", created_at=T0, deadline=T0 + 24 * HOUR,
        window_class="24h", window_s=86400, path="/v1/chat/completions",
    )  # fmt: skip
    population = PendingRequests(
        event_id=ids.new_id(), occurred_at=T0, source=SourceMark(1, 1, 0), batch=facts,
        model="m", ranges=[LineRange(0, 10)], chunks=[ChunkRef(0, 10, 0, 0)],
    )  # fmt: skip
    first = dispatched(gate.handle(population, T0))
    assert [i.batch_id for i in first] == [batch, batch]  # bob's batch took the capacity
    flex = ids.new_id()
    assert dispatched(gate.handle(submitted(flex, owner="alice"), T0)) == []  # no room
    # When one of bob's calls ends, alice (nothing in flight) goes before bob's next row.
    nxt = dispatched(gate.handle(finish(first[0]), T0))
    assert [i.request_id for i in nxt] == [flex]


@pytest.mark.parametrize("busy", ["", "alice"])
def test_an_owner_with_rows_in_flight_yields_to_idle_owners_whatever_its_name(busy: str) -> None:
    # created_by may be empty: that is still an owner, whose batches and flex rows rank together
    gate = Gate({}, {"m": 2}, "gate", config=REFERENCE)

    def population(owner: str, deadline: datetime) -> PendingRequests:
        facts = BatchFacts(
            batch_id=ids.new_id(), file_id=ids.new_id(), owner=owner, created_at=T0,
            deadline=deadline, window_class="24h", window_s=86400, path="/v1/chat/completions",
        )  # fmt: skip
        return PendingRequests(
            event_id=ids.new_id(), occurred_at=T0, source=SourceMark(1, next(marks), 0),
            batch=facts, model="m", ranges=[LineRange(0, 10)], chunks=[ChunkRef(0, 10, 0, 0)],
        )  # fmt: skip

    first = dispatched(gate.handle(population(busy, T0 + 24 * HOUR), T0))
    # busy's next work is due in an hour: a flex row (an owner-less one can only be a batch)
    soon = submitted(ids.new_id(), owner=busy) if busy else population(busy, T0 + HOUR)
    assert dispatched(gate.handle(soon, T0)) == []
    bobs = population("bob", T0 + 20 * HOUR)
    assert dispatched(gate.handle(bobs, T0)) == []
    # busy has a row in flight, bob none: bob's batch goes first, however close busy's work is
    assert [i.batch_id for i in dispatched(gate.handle(finish(first[0]), T0))] == [bobs.batch.batch_id]  # fmt: skip
    # one each: the earliest deadline goes, busy's
    (nxt,) = dispatched(gate.handle(finish(first[1]), T0))
    if isinstance(soon, RequestSubmitted):
        assert nxt.request_id == soon.request_id
    else:
        assert nxt.batch_id == soon.batch.batch_id


def test_a_flex_row_on_a_model_that_is_not_live_trickles_through_the_bucket() -> None:
    gate = Gate({}, {"m": 5}, "gate", config=REFERENCE, liveness=Liveness(claim_timeout=10 * HOUR))
    gate.handle(ModelFilterAppended(event_id=ids.new_id(), occurred_at=T0, model="m", state="coming"), T0)  # fmt: skip
    one, two = ids.new_id(), ids.new_id()
    got = dispatched(gate.handle(submitted(one), T0)) + dispatched(gate.handle(submitted(two), T0))
    assert [i.request_id for i in got] == [one]  # one leak per (owner, flex) per 60 s
    later = T0 + timedelta(seconds=61)
    assert [i.request_id for i in dispatched(gate.handle(GateTick(event_id=ids.new_id(), occurred_at=later, model="m"), later))] == [two]  # fmt: skip


def test_rebuild_keeps_pending_and_in_flight_flex_rows() -> None:
    state: dict[str, bytes] = {}
    gate = Gate(state, {"m": 1}, "gate", config=REFERENCE)
    first, second = ids.new_id(), ids.new_id()
    [item] = dispatched(gate.handle(submitted(first), T0))
    gate.handle(submitted(second), T0)
    fresh = Gate(state, {"m": 1}, "gate", config=REFERENCE)
    fresh.rebuild()
    assert fresh.in_flight("m") == 1
    outs = fresh.handle(finish(item), T0)
    assert [e for e in events(outs) if isinstance(e, RequestCompleted)]
    assert [i.request_id for i in dispatched(outs)] == [second]
