"""The step-chain agent's rules (responses §2, §9.3), driven directly with in-memory I/O: what
each event publishes, what a redelivery or a restart changes (nothing), the iteration cap
across restarts, and how a realtime or a claimed head ends."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from schemas import bodies
from schemas.events import (
    BatchlessFacts,
    ChainAborted,
    ChainHead,
    ChainStarted,
    ExecutionReport,
    RealtimeCompletionReported,
    RequestCanceled,
    RequestCreated,
    RequestTransitions,
    ResponseFinalized,
    StepCompleted,
    StepFailed,
    StepRecorded,
    StepStarted,
    StepWork,
)
from streams.chains import state as chain_state
from streams.chains.core import DEFAULT_STEP_DEADLINE as DEADLINE
from streams.chains.core import ChainCore
from streams.emit import Out
from streams.responses.chain import ITERATION_CAP_MESSAGE, STEP_ABANDONED
from streams.responses.steps import step_id, sub_request_id
from streams.tables import WriteBehind
from tests.unit.chain_fakes import MemoryBodies, of_type, works

HEAD = "9b0c6a43-8d0f-4f6b-9d57-2f7b1d7c0e11"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
WORKER = "chains:test"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {}}}


def completion(content: str | None = None, calls: Sequence[tuple[str, str]] = ()) -> Any:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": "{}"}}
            for cid, name in calls
        ]
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return {"object": "chat.completion", "choices": [{"index": 0, "message": message}], "usage": usage}  # fmt: skip


class Harness:
    """A chain agent plus the executor's side, played by hand."""

    def __init__(self, head: ChainHead | None = None, max_iterations: int = 10) -> None:
        self.bodies = MemoryBodies()
        self.table: dict[str, bytes] = {}
        self.now = T0
        self.core = self.new_core()
        self.head = head
        self.max_iterations = max_iterations
        self.sent: list[Out] = []

    def new_core(self) -> ChainCore:
        """A fresh worker on the same table (a restart)."""
        return ChainCore(self.table, self.bodies, WORKER, clock=lambda: self.now)

    def tick(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now

    def chain_started(self, body: dict[str, Any] | None = None, head: ChainHead | None = None, tools: Sequence[str] = ("get_weather", "lookup")) -> ChainStarted:  # fmt: skip
        parent = body or {"model": "chat-b", "input": "weather?", "tools": [WEATHER, LOOKUP]}
        ref = self.bodies.put(f"tpl:{HEAD}", parent)
        return ChainStarted(
            event_id="chain-started", occurred_at=self.tick(), response_id=HEAD,
            model="chat-b", parent=ref, resolved_tool_names=list(tools),
            facts=BatchlessFacts(owner="tina", path="/v1/responses", service_tier="priority",
                                 created_at=T0, deadline=T0, api_key_id=None),
            head=head or self.head, max_iterations=self.max_iterations,
        )  # fmt: skip

    async def feed(self, event: Any) -> list[Out]:
        outs = await self.core.handle(event, partition=2)
        self.sent += outs
        return outs

    async def complete(self, work: StepWork, payload: Any) -> list[Out]:
        started = StepStarted(event_id="s", occurred_at=self.tick(), response_id=HEAD, step_id=work.step_id)  # fmt: skip
        assert await self.feed(started) == []
        ref = self.bodies.put(f"sres:{work.step_id}", payload)
        done = StepCompleted(event_id="c", occurred_at=self.tick(), response_id=HEAD, step_id=work.step_id, payload=ref)  # fmt: skip
        return await self.feed(done)

    async def fail(self, work: StepWork, error: Any) -> list[Out]:
        ref = self.bodies.put(f"serr:{work.step_id}", error)
        failed = StepFailed(event_id="f", occurred_at=self.tick(), response_id=HEAD, step_id=work.step_id, error=ref)  # fmt: skip
        return await self.feed(failed)

    def payload(self, work: StepWork) -> Any:
        return self.bodies.json(work.payload)

    def chain(self) -> chain_state.ChainState:
        return chain_state.decode(self.table[HEAD])

    def result(self) -> tuple[int, Any]:
        """The head's finalisation: status and its res:/err: body."""
        [finalized] = of_type(self.sent, ResponseFinalized)
        raw = self.bodies.records[finalized.body.offset][1]
        return finalized.status, msgspec.json.decode(raw)


async def test_a_new_chain_records_its_head_model_call_and_hands_it_out() -> None:
    h = Harness()
    outs = await h.feed(h.chain_started())
    [recorded] = of_type(outs, StepRecorded)
    assert (recorded.step_id, recorded.request_id, recorded.sequence) == (HEAD, HEAD, 1)
    assert recorded.prev_step_id is None and recorded.parent_step_id is None
    assert of_type(outs, RequestTransitions) == []  # the head's row is the response's own
    [work] = works(outs)
    assert (work.step_id, work.kind, work.model, work.owner) == (HEAD, "model_call", "chat-b", "tina")  # fmt: skip
    payload = h.payload(work)
    assert payload["messages"] == [{"role": "user", "content": "weather?"}]
    assert [t["function"]["name"] for t in payload["tools"]] == ["get_weather", "lookup"]
    # Order: the step is recorded before its work goes out.
    assert [type(o.value) for o in outs] == [StepRecorded, StepWork]
    assert h.chain().evaluations == 1


async def test_a_redelivered_chain_started_changes_nothing() -> None:
    h = Harness()
    started = h.chain_started()
    await h.feed(started)
    before = h.table[HEAD]
    assert await h.feed(started) == []
    assert h.table[HEAD] == before


async def test_parallel_tool_calls_are_one_round_and_the_follow_up_waits_for_both() -> None:
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    outs = await h.complete(head, completion(calls=[("call_1", "get_weather"), ("call_2", "lookup")]))  # fmt: skip
    recorded = of_type(outs, StepRecorded)
    assert [(r.sequence, r.kind, r.request_id, r.tool) for r in recorded] == [
        (2, "tool_call", None, "get_weather"), (3, "tool_call", None, "lookup"),
    ]  # fmt: skip
    # Siblings chain linearly, all under the head.
    assert [r.prev_step_id for r in recorded] == [HEAD, step_id(HEAD, 2)]
    assert {r.parent_step_id for r in recorded} == {HEAD}
    assert of_type(outs, RequestTransitions) == []  # tool calls have no row
    first, second = works(outs)
    assert h.payload(first) == {"name": "get_weather", "args": {}, "call_id": "call_1"}
    assert await h.complete(second, {"temp_c": 18}) == []  # the round is not settled yet
    outs = await h.complete(first, {"rain": False})
    [follow_up] = works(outs)
    assert follow_up.sequence == 4 and follow_up.request_id == sub_request_id(HEAD, 4)
    tool_turns = [m for m in h.payload(follow_up)["messages"] if m["role"] == "tool"]
    assert tool_turns == [
        {"role": "tool", "tool_call_id": "call_1", "content": '{"rain":false}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c":18}'},
    ]
    # The follow-up model call has a row of its own, created processing, never claimed.
    [record] = of_type(outs, RequestTransitions)
    [created] = record.events
    assert isinstance(created, RequestCreated)
    assert (created.request_id, created.state, created.model) == (follow_up.request_id, "processing", "chat-b")  # fmt: skip
    assert (created.facts.path, created.facts.service_tier, created.facts.owner) == ("/v1/chat/completions", "priority", "tina")  # fmt: skip
    assert [type(o.value) for o in outs] == [StepRecorded, RequestTransitions, StepWork]


async def test_a_realtime_chain_ends_with_the_assembled_response() -> None:
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    [tool] = works(await h.complete(head, completion(calls=[("call_1", "get_weather")])))
    [final] = works(await h.complete(tool, {"temp_c": 18}))
    outs = await h.complete(final, completion("It's 18C"))
    assert works(outs) == []
    status, response = h.result()
    assert status == 200
    assert response["id"] == f"resp_{HEAD}" and response["status"] == "completed"
    assert [item["type"] for item in response["output"]] == ["function_call", "function_call_output", "message"]  # fmt: skip
    assert response["usage"]["total_tokens"] == 10
    assert response["created_at"] == int(T0.timestamp())
    [record] = of_type(outs, RequestTransitions)
    [reported] = record.events
    assert isinstance(reported, RealtimeCompletionReported)
    assert (reported.request_id, reported.status) == (HEAD, 200)
    assert reported.size == len(h.bodies.latest(f"res:{HEAD}") or b"")
    assert of_type(outs, ExecutionReport) == []  # a realtime head has no claim
    assert h.chain().terminal and h.chain().steps == []  # an ended chain keeps its outcome only


async def test_a_failed_tool_fails_the_response_with_its_error() -> None:
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    [tool] = works(await h.complete(head, completion(calls=[("call_1", "get_weather")])))
    error = {"type": "executor_error", "message": "executor error: HTTP 500: boom"}
    outs = await h.fail(tool, error)
    status, envelope = h.result()
    assert status == 500
    assert envelope["type"] == "NonRetriableHttpStatus"
    assert msgspec.json.decode(envelope["details"]["body"]) == error
    [record] = of_type(outs, RequestTransitions)
    assert record.events[0].status == 500
    assert h.bodies.latest(f"err:{HEAD}") is not None


async def test_the_cap_allows_five_model_calls_and_five_tool_rounds_across_restarts() -> None:
    h = Harness()
    [work] = works(await h.feed(h.chain_started()))
    kinds: list[str] = []
    while True:
        kinds.append(work.kind)
        h.core = h.new_core()  # every step lands on a freshly started worker
        if work.kind == "model_call":
            outs = await h.complete(work, completion(calls=[(f"c{len(kinds)}", "get_weather")]))
        else:
            outs = await h.complete(work, {"ok": True})
        if not works(outs):
            break
        [work] = works(outs)
    assert kinds == ["model_call", "tool_call"] * 5
    status, envelope = h.result()
    assert status == 500
    body = msgspec.json.decode(envelope["details"]["body"])
    assert body == {"type": "loop_error", "message": ITERATION_CAP_MESSAGE}


async def test_tool_outputs_too_large_together_for_a_record_end_the_chain() -> None:
    """Each output fits a record, and the follow-up that carries both does not: the chain ends
    with a loop error instead of failing its write for good (which held every chain of its
    partition back while the agent took it for a broker away)."""
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    calls = completion(None, [("call_a", "lookup"), ("call_b", "lookup")])
    first, second = works(await h.complete(head, calls))
    big = {"result": "x" * (9 * 1024 * 1024)}
    await h.complete(first, big)
    assert works(await h.complete(second, big)) == []
    status, envelope = h.result()
    assert status == 500
    body = msgspec.json.decode(envelope["details"]["body"])
    assert body["type"] == "loop_error" and "exceeds the" in body["message"]
    assert max(len(value) for _, value in h.bodies.records) <= bodies.MAX_BODY_BYTES


async def test_redelivered_step_facts_never_record_a_step_twice() -> None:
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    outs = await h.complete(head, completion(calls=[("call_1", "get_weather")]))
    assert len(of_type(outs, StepRecorded)) == 1
    # The same completion again (Kafka redelivered it): the step is terminal, nothing moves.
    ref = h.bodies.put(f"sres:{HEAD}", completion(calls=[("call_1", "get_weather")]))
    again = StepCompleted(event_id="c", occurred_at=h.tick(), response_id=HEAD, step_id=HEAD, payload=ref)  # fmt: skip
    assert await h.feed(again) == []
    late_start = StepStarted(event_id="s", occurred_at=h.tick(), response_id=HEAD, step_id=HEAD)  # fmt: skip
    assert await h.feed(late_start) == []


async def test_a_decision_re_made_after_a_crash_names_the_same_steps_and_events() -> None:
    """The agent published a round, then died before its state reached the changelog: the
    event is handled again on the old state and publishes the same facts."""
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    started = StepStarted(event_id="s", occurred_at=h.tick(), response_id=HEAD, step_id=HEAD)
    await h.feed(started)
    ref = h.bodies.put(f"sres:{HEAD}", completion(calls=[("call_1", "get_weather"), ("call_2", "lookup")]))  # fmt: skip
    done = StepCompleted(event_id="c", occurred_at=h.tick(), response_id=HEAD, step_id=HEAD, payload=ref)  # fmt: skip
    buffered = WriteBehind(h.table)
    core = ChainCore(buffered, h.bodies, WORKER, clock=lambda: h.now)
    first = await core.handle(done)
    buffered.discard()  # the crash: published, not remembered
    second = await ChainCore(WriteBehind(h.table), h.bodies, WORKER, clock=lambda: h.now).handle(done)  # fmt: skip

    def facts(outs: list[Out]) -> list[tuple[str, str, str | None]]:
        return [(type(o.value).__name__, getattr(o.value, "event_id", ""), getattr(o.value, "step_id", None)) for o in outs]  # fmt: skip

    assert facts(first) == facts(second) and len(first) == 4
    # Payloads are equal too (their refs differ: each decision wrote its own copy).
    assert [h.payload(w) for w in works(first)] == [h.payload(w) for w in works(second)]


async def test_an_abandoned_step_fails_the_response_step_abandoned() -> None:
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    [tool] = works(await h.complete(head, completion(calls=[("call_1", "get_weather")])))
    await h.fail(tool, dict(STEP_ABANDONED))
    status, envelope = h.result()
    assert status == 500
    assert msgspec.json.decode(envelope["details"]["body"])["type"] == "step_abandoned"


async def test_a_client_side_function_passes_the_whole_round_through() -> None:
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    outs = await h.complete(head, completion("let me check", calls=[("call_1", "get_weather"), ("call_2", "client_fn")]))  # fmt: skip
    assert works(outs) == []  # not even get_weather runs
    status, response = h.result()
    assert status == 200
    assert [(i["type"], i.get("name")) for i in response["output"]] == [
        ("message", None), ("function_call", "get_weather"), ("function_call", "client_fn"),
    ]  # fmt: skip


async def test_events_for_an_ended_chain_are_dropped() -> None:
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    await h.complete(head, completion("done"))
    ref = h.bodies.put(f"sres:{HEAD}", completion("again"))
    late = StepCompleted(event_id="x", occurred_at=h.tick(), response_id=HEAD, step_id=HEAD, payload=ref)  # fmt: skip
    assert await h.feed(late) == []
    assert len(of_type(h.sent, ResponseFinalized)) == 1


async def test_unknown_chains_and_steps_are_dropped() -> None:
    h = Harness()
    stray = StepStarted(event_id="s", occurred_at=h.tick(), response_id=HEAD, step_id=HEAD)
    assert await h.feed(stray) == []
    assert HEAD not in h.table
    await h.feed(h.chain_started())
    other = StepStarted(event_id="s", occurred_at=h.tick(), response_id=HEAD, step_id=step_id(HEAD, 9))  # fmt: skip
    assert await h.feed(other) == []


async def test_an_unreadable_parent_ends_the_chain_with_a_loop_error() -> None:
    h = Harness()
    started = msgspec.structs.replace(h.chain_started(), parent=msgspec.convert([0, 999], type=type(h.chain_started().parent)))  # fmt: skip
    outs = await h.feed(started)
    assert works(outs) == []
    status, envelope = h.result()
    assert status == 500
    assert msgspec.json.decode(envelope["details"]["body"])["type"] == "loop_error"


# -- claimed heads (flex, batch lines) ----------------------------------------------------

CLAIM = ChainHead(claim_id="claim-1", model="chat-b", batch_id=None)


def reports(outs: Sequence[Out]) -> list[ExecutionReport]:
    found = of_type(outs, ExecutionReport)
    assert all(o.topic == "gate" and o.key == "chat-b" for o in outs if isinstance(o.value, ExecutionReport))  # fmt: skip
    return found


async def test_a_claimed_head_is_taken_over_then_ended_by_its_claim() -> None:
    h = Harness(head=CLAIM)
    outs = await h.feed(h.chain_started())
    [report] = reports(outs)
    assert report.worker_id == WORKER and report.finished == []
    assert [(s.request_id, s.claim_id) for s in report.started] == [(HEAD, "claim-1")]
    [head] = works(outs)
    outs = await h.complete(head, completion("done"))
    [report] = reports(outs)
    [item] = report.finished
    assert (item.request_id, item.claim_id, item.result, item.status) == (HEAD, "claim-1", "completed", 200)  # fmt: skip
    assert item.size == len(h.bodies.latest(f"res:{HEAD}") or b"")
    assert of_type(outs, RequestTransitions) == []  # the gate writes a claimed row's lifecycle


async def test_a_failed_claimed_chain_is_failed_never_retried() -> None:
    h = Harness(head=CLAIM)
    [head] = works(await h.feed(h.chain_started()))
    outs = await h.fail(head, {"type": "executor_error", "message": "executor error: x"})
    [report] = reports(outs)
    [item] = report.finished
    assert (item.result, item.error_type, item.status) == ("failed", "NonRetriableHttpStatus", 500)


async def test_a_re_dispatched_head_of_an_ended_chain_gets_its_outcome_again() -> None:
    h = Harness(head=CLAIM)
    [head] = works(await h.feed(h.chain_started()))
    await h.complete(head, completion("done"))
    first = reports(h.sent)[-1].finished[0]
    assert await h.feed(h.chain_started()) == []  # the same claim: a redelivery
    newer = ChainHead(claim_id="claim-2", model="chat-b")
    [report] = reports(await h.feed(h.chain_started(head=newer)))
    [item] = report.finished
    assert (item.claim_id, item.result, item.status, item.size) == ("claim-2", "completed", 200, first.size)  # fmt: skip
    assert len(of_type(h.sent, ResponseFinalized)) == 1


async def test_a_re_dispatched_head_of_a_running_chain_is_taken_over_with_its_new_claim() -> None:
    h = Harness(head=CLAIM)
    [head] = works(await h.feed(h.chain_started()))
    newer = ChainHead(claim_id="claim-2", model="chat-b")
    outs = await h.feed(h.chain_started(head=newer))
    [report] = reports(outs)
    assert [(s.claim_id) for s in report.started] == ["claim-2"]
    assert works(outs) == []  # the chain goes on where it was
    outs = await h.complete(head, completion("done"))
    assert reports(outs)[0].finished[0].claim_id == "claim-2"


async def test_a_restarted_worker_takes_over_its_live_claimed_chains() -> None:
    h = Harness(head=CLAIM)
    await h.feed(h.chain_started())
    h.core = h.new_core()
    [report] = reports(h.core.adopt([2]))
    assert report.started[0].claim_id == "claim-1"
    assert h.core.adopt([2]) == []  # once per claim and process
    assert h.new_core().adopt([0, 1, 3]) == []  # another partition's worker leaves it alone


@pytest.mark.parametrize("size", [10, 2_000_000])
async def test_table_values_hold_refs_not_payloads(size: int) -> None:
    h = Harness()
    body = {"model": "chat-b", "input": "x" * size, "tools": [WEATHER]}
    [head] = works(await h.feed(h.chain_started(body)))
    await h.complete(head, completion(calls=[("call_1", "get_weather")]))
    assert len(h.table[HEAD]) < 1_000
    assert h.bodies.latest(bodies.key(bodies.STEP_REQUEST, HEAD)) is not None


async def test_held_claims_are_said_again_until_their_chain_ends() -> None:
    h = Harness(head=CLAIM)
    [head] = works(await h.feed(h.chain_started()))
    [report] = reports(h.core.holding())
    assert [(s.request_id, s.claim_id) for s in report.started] == [(HEAD, "claim-1")]
    assert report.worker_id == WORKER
    await h.complete(head, completion("done"))
    assert h.core.holding() == []
    assert Harness().core.holding() == []  # realtime heads have no claim to hold


def aborted(claim: str = "claim-1", erased: bool = False) -> ChainAborted:
    return ChainAborted(
        event_id="a", occurred_at=T0 + timedelta(minutes=1), response_id=HEAD, claim_id=claim,
        erased=erased,
    )  # fmt: skip


async def a_chain_waiting_on_its_second_model_call(h: Harness) -> StepWork:
    [head] = works(await h.feed(h.chain_started()))
    [tool] = works(await h.complete(head, completion(calls=[("call_1", "get_weather")])))
    [follow_up] = works(await h.complete(tool, {"rain": False}))
    return follow_up


async def test_an_aborted_chain_cancels_its_unstarted_rows_and_reports_its_claim_canceled() -> None:
    h = Harness(head=CLAIM)
    follow_up = await a_chain_waiting_on_its_second_model_call(h)
    outs = await h.feed(aborted())
    [record] = of_type(outs, RequestTransitions)
    [canceled] = record.events
    assert isinstance(canceled, RequestCanceled)
    assert (canceled.request_id, canceled.from_state, canceled.model) == (follow_up.request_id, "processing", "chat-b")  # fmt: skip
    [finalized] = of_type(outs, ResponseFinalized)
    assert (finalized.status, finalized.body) == (499, None)  # a canceled row has no body
    [report] = reports(outs)
    assert [(i.claim_id, i.result) for i in report.finished] == [("claim-1", "canceled")]
    assert works(outs) == []
    assert await h.complete(follow_up, completion("late")) == []  # nothing more is evaluated
    assert await h.feed(aborted()) == []  # a redelivered abort


async def test_a_started_model_call_keeps_its_row_for_its_step_executor_to_end() -> None:
    h = Harness(head=CLAIM)
    follow_up = await a_chain_waiting_on_its_second_model_call(h)
    started = StepStarted(event_id="s", occurred_at=h.tick(), response_id=HEAD, step_id=follow_up.step_id)  # fmt: skip
    await h.feed(started)
    outs = await h.feed(aborted())
    assert of_type(outs, RequestTransitions) == []
    assert [i.result for i in reports(outs)[0].finished] == ["canceled"]


async def test_the_abort_of_an_older_claim_or_an_erased_chain_reports_nothing() -> None:
    h = Harness(head=CLAIM)
    await a_chain_waiting_on_its_second_model_call(h)
    assert await h.feed(aborted(claim="claim-0")) == []  # the head runs under claim-1
    assert not h.chain().terminal
    outs = await h.feed(aborted(erased=True))
    assert [type(o.value) for o in outs] == [RequestTransitions]  # its rows end, nothing else
    assert h.chain().terminal
    # A later claim of the same head (the batch retried) is told the chain failed.
    newer = ChainHead(claim_id="claim-2", model="chat-b")
    [report] = reports(await h.feed(h.chain_started(head=newer)))
    assert [(i.claim_id, i.result, i.status) for i in report.finished] == [("claim-2", "failed", 499)]  # fmt: skip


async def test_a_step_still_in_flight_a_deadline_later_has_its_work_handed_out_again() -> None:
    # Its executor may have let the work go at a rebalance and died: no one would end it, and
    # the chain would hold its head for good.
    h = Harness()
    [work] = works(await h.feed(h.chain_started()))
    h.now = work.occurred_at + DEADLINE - timedelta(seconds=1)
    assert await h.core.overdue() == []

    h.now = work.occurred_at + DEADLINE
    [again] = works(await h.core.overdue())
    # The same work, with its first time: the ledger reads the chain log from there, so a
    # start the dead worker logged is found (step_abandoned), never fired twice.
    assert again == work
    h.now += DEADLINE / 2
    assert await h.core.overdue() == []  # at most once a deadline
    h.now += DEADLINE / 2
    assert works(await h.core.overdue()) == [work]

    await h.complete(work, completion("sunny"))
    h.now += DEADLINE
    assert await h.core.overdue() == []  # it ended: the chain is over


async def test_overdue_steps_are_handed_out_by_whoever_holds_the_chain_after_a_restart() -> None:
    h = Harness()
    [work] = works(await h.feed(h.chain_started()))
    h.core = h.new_core()
    h.now = work.occurred_at + DEADLINE
    assert await h.core.overdue() == []  # not this worker's chain until it adopts it
    h.core.adopt([0, 1, 3])
    h.now += DEADLINE
    assert await h.core.overdue() == []  # another partition's: not this worker's either
    h.core.adopt([2])
    h.now += DEADLINE - timedelta(seconds=1)
    assert await h.core.overdue() == []  # quiet since it adopted it, by its own clock
    h.now += timedelta(seconds=1)
    assert works(await h.core.overdue()) == [work]
    h.core.forget()  # a rebalance: the next holder decides
    h.now += DEADLINE
    assert await h.core.overdue() == []


async def test_a_step_started_and_running_goes_out_again_a_deadline_after_its_start() -> None:
    h = Harness()
    [work] = works(await h.feed(h.chain_started()))
    started = StepStarted(event_id="s", occurred_at=h.tick(), response_id=HEAD, step_id=HEAD)
    await h.feed(started)
    h.now = started.occurred_at + DEADLINE - timedelta(seconds=1)
    assert await h.core.overdue() == []  # quiet for less than a deadline since it started
    h.now = started.occurred_at + DEADLINE
    assert works(await h.core.overdue()) == [work]


async def test_only_the_steps_still_in_flight_go_out_again_once_the_chain_is_quiet() -> None:
    h = Harness()
    [head] = works(await h.feed(h.chain_started()))
    outs = await h.complete(head, completion(calls=[("c1", "get_weather"), ("c2", "lookup")]))
    weather, lookup = works(outs)
    await h.complete(weather, {"temp_c": 18})
    h.now += DEADLINE - timedelta(seconds=1)
    assert await h.core.overdue() == []  # quiet for less than a deadline since the last fact
    h.now += timedelta(seconds=1)
    assert works(await h.core.overdue()) == [lookup]
