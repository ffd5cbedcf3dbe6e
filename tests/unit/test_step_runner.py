"""The step executor's rules (responses §2.9, §9.3) with in-memory Kafka, upstream and tools:
a step starts before its call goes out and is reported after it; a step the chain log saw
start and never finish is failed `step_abandoned` instead of firing again; finished steps are
skipped; a round's tool calls run concurrently; work is acknowledged only once reported."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from cannonade.config import Config, ModelConfig
from schemas.bodies import MAX_BODY_BYTES, BodyRef
from schemas.events import (
    RealtimeCompletionReported,
    RequestTransitions,
    StepCompleted,
    StepFailed,
    StepStarted,
    StepWork,
)
from streams.chains.runner import StepRunner, StepStatus, ToolTransportError
from streams.emit import Out
from streams.execution.bodies import BodyUnavailable
from streams.execution.client import Timeouts, TransportTimeout, UpstreamRequest, UpstreamResponse
from streams.responses.steps import step_id, sub_request_id
from streams.responses.tools import ToolConfig, ToolHttpRequest
from tests.unit.chain_fakes import MemoryBodies, of_type

HEAD = "3f2a9c1e-6b7d-4e8f-9a0b-1c2d3e4f5a6b"
T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
CONFIG = Config(
    models={"chat-b": ModelConfig(upstream="http://upstream.test", api_key="upstream-key")},
    tools={
        "get_weather": ToolConfig(
            description="w", url="http://tools.test/w", api_key="tool-key", timeout_secs=2
        ),  # fmt: skip
        "lookup": ToolConfig(description="l", url="http://tools.test/l"),
    },
)


class Ledger:
    def __init__(self) -> None:
        self.statuses: dict[str, StepStatus] = {}
        self.asked: list[tuple[int, str, datetime]] = []

    async def status(self, partition: int, response_id: str, step: str, since: datetime) -> StepStatus:  # fmt: skip
        self.asked.append((partition, step, since))
        return self.statuses.get(step, StepStatus.UNSEEN)


class Upstream:
    def __init__(self, status: int = 200, body: Any = None, error: Exception | None = None) -> None:
        self.status, self.error = status, error
        self.body = body if body is not None else {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}  # fmt: skip
        self.requests: list[UpstreamRequest] = []
        self.seen_started_before: list[bool] = []
        self.bodies: MemoryBodies | None = None

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        self.requests.append(request)
        if self.bodies is not None:
            self.seen_started_before.append(bool(of_type(self.bodies.published, StepStarted)))
        if self.error is not None:
            raise self.error
        text = self.body if isinstance(self.body, str) else msgspec.json.encode(self.body).decode()
        return UpstreamResponse(self.status, text)


class Tools:
    def __init__(self, replies: dict[str, Any] | None = None, gate: int = 0) -> None:
        self.replies = replies or {}
        self.requests: list[ToolHttpRequest] = []
        self.arrived = 0
        self.gate = gate  # answer only once this many calls are in flight together
        self.all_in = asyncio.Event()

    async def post(self, request: ToolHttpRequest) -> tuple[int, str]:
        self.requests.append(request)
        self.arrived += 1
        if self.arrived >= self.gate:
            self.all_in.set()
        await asyncio.wait_for(self.all_in.wait(), 2)
        reply = self.replies.get(request.url, (200, '{"temp_c": 18}'))
        if isinstance(reply, Exception):
            raise reply
        return reply  # type: ignore[no-any-return]


class Acks:
    def __init__(self) -> None:
        self.acked: list[str] = []

    def for_(self, work: StepWork) -> Any:
        return lambda: self.acked.append(work.step_id)


def make(upstream: Upstream | None = None, tools: Tools | None = None) -> tuple[StepRunner, MemoryBodies, Ledger]:  # fmt: skip
    bodies = MemoryBodies()
    ledger = Ledger()
    upstream = upstream or Upstream()
    upstream.bodies = bodies
    runner = StepRunner(bodies, ledger, upstream, tools or Tools(), CONFIG, timeouts=Timeouts())
    return runner, bodies, ledger


def model_work(bodies: MemoryBodies, sequence: int, payload: Any = None) -> StepWork:
    sid = step_id(HEAD, sequence)
    ref = bodies.put(f"sreq:{sid}", payload or {"model": "chat-b", "messages": [], "stream": False})
    return StepWork(
        event_id=f"w{sequence}", occurred_at=T0, response_id=HEAD, step_id=sid,
        sequence=sequence, kind="model_call", payload=ref, model="chat-b", owner="tina",
        request_id=sub_request_id(HEAD, sequence),
    )  # fmt: skip


def tool_work(bodies: MemoryBodies, sequence: int, name: str, args: Any = None) -> StepWork:
    sid = step_id(HEAD, sequence)
    call = {"name": name, "args": args if args is not None else {"city": "Paris"}, "call_id": f"call_{sequence}"}  # fmt: skip
    ref = bodies.put(f"sreq:{sid}", call)
    return StepWork(
        event_id=f"w{sequence}", occurred_at=T0, response_id=HEAD, step_id=sid,
        sequence=sequence, kind="tool_call", payload=ref, model="chat-b", owner="tina",
        tool=name,
    )  # fmt: skip


async def drain(runner: StepRunner) -> None:
    """Wait for every step the runner is running."""
    while runner.running:
        await asyncio.gather(*(entry.task for entry in list(runner.running.values())))


async def run(runner: StepRunner, works: Iterable[StepWork], acks: Acks) -> None:
    for work in works:
        await runner.accept(work, 1, acks.for_(work))
    await drain(runner)


def stored(bodies: MemoryBodies, event: StepCompleted | StepFailed) -> Any:
    ref = event.payload if isinstance(event, StepCompleted) else event.error
    return bodies.json(ref)


async def test_a_model_call_starts_then_runs_then_reports_payload_and_row() -> None:
    upstream = Upstream()
    runner, bodies, ledger = make(upstream)
    acks = Acks()
    work = model_work(bodies, 3)
    await run(runner, [work], acks)
    [request] = upstream.requests
    assert request.url == "http://upstream.test/v1/chat/completions"
    assert request.headers["Authorization"] == "Bearer upstream-key"
    assert upstream.seen_started_before == [True]  # StepStarted was on Kafka before the call
    kinds = [type(o.value).__name__ for o in bodies.published]
    assert kinds == ["StepStarted", "StepCompleted", "RequestTransitions"]
    [completed] = of_type(bodies.published, StepCompleted)
    assert stored(bodies, completed)["choices"][0]["message"]["content"] == "hi"
    [record] = of_type(bodies.published, RequestTransitions)
    [row] = record.events
    assert isinstance(row, RealtimeCompletionReported)
    assert (row.request_id, row.status, row.model) == (work.request_id, 200, "chat-b")
    assert bodies.latest(f"res:{work.request_id}") is not None
    assert acks.acked == [work.step_id]
    # The ledger was asked from a little before the work's time.
    assert ledger.asked[0][2] < T0


async def test_the_head_model_call_leaves_the_head_row_to_the_chain() -> None:
    runner, bodies, _ = make()
    work = msgspec.structs.replace(model_work(bodies, 1), request_id=HEAD, step_id=HEAD)
    await run(runner, [work], Acks())
    assert of_type(bodies.published, RequestTransitions) == []
    assert len(of_type(bodies.published, StepCompleted)) == 1


async def test_an_upstream_error_fails_the_step_and_its_row() -> None:
    runner, bodies, _ = make(Upstream(status=500, body='{"error":{"message":"down"}}'))
    work = model_work(bodies, 3)
    await run(runner, [work], Acks())
    [failed] = of_type(bodies.published, StepFailed)
    error = stored(bodies, failed)
    assert error["type"] == "executor_error"
    assert error["message"].startswith("executor error: model call returned HTTP 500 Internal Server Error:")  # fmt: skip
    [record] = of_type(bodies.published, RequestTransitions)
    assert record.events[0].status == 500
    assert b"NonRetriableHttpStatus" in (bodies.latest(f"err:{work.request_id}") or b"")


async def test_a_transport_failure_fails_the_step_with_its_cause() -> None:
    runner, bodies, _ = make(Upstream(error=TransportTimeout("no first event within 5ms")))
    await run(runner, [model_work(bodies, 3)], Acks())
    [failed] = of_type(bodies.published, StepFailed)
    assert "no first event within 5ms" in stored(bodies, failed)["message"]
    [record] = of_type(bodies.published, RequestTransitions)
    assert record.events[0].status == 502


async def test_a_result_too_large_for_a_record_fails_the_step_and_its_row() -> None:
    huge = {"choices": [{"message": {"role": "assistant", "content": "x" * MAX_BODY_BYTES}}]}
    runner, bodies, _ = make(Upstream(body=huge))
    work = model_work(bodies, 3)
    await run(runner, [work], Acks())
    [failed] = of_type(bodies.published, StepFailed)
    assert "exceeds the" in stored(bodies, failed)["message"]
    [record] = of_type(bodies.published, RequestTransitions)
    assert record.events[0].status != 200  # the row fails too, with a short error
    assert len(bodies.latest(f"err:{work.request_id}") or b"") < 1024


async def test_a_payload_the_broker_is_slow_to_hand_over_is_waited_for_not_failed() -> None:
    runner, bodies, _ = make()
    runner.retry_s = 0.01
    read = bodies.read_body
    slow = [BodyUnavailable("the broker did not hand over 0@0 within 10 s")] * 2

    async def read_later(ref: BodyRef) -> bytes:
        if slow:
            raise slow.pop()
        return await read(ref)

    bodies.read_body = read_later  # type: ignore[method-assign]
    await run(runner, [model_work(bodies, 3)], Acks())
    assert len(of_type(bodies.published, StepCompleted)) == 1 and not slow


async def test_a_tool_call_posts_its_args_with_the_tool_key() -> None:
    tools = Tools()
    runner, bodies, _ = make(tools=tools)
    await run(runner, [tool_work(bodies, 2, "get_weather")], Acks())
    [request] = tools.requests
    assert request.url == "http://tools.test/w"
    assert request.headers["Authorization"] == "Bearer tool-key"
    assert msgspec.json.decode(request.body) == {"city": "Paris"}
    assert request.timeout_secs == 2
    [completed] = of_type(bodies.published, StepCompleted)
    assert stored(bodies, completed) == {"temp_c": 18}
    assert of_type(bodies.published, RequestTransitions) == []


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ((500, "boom"), "executor error: HTTP 500: boom"),
        (TimeoutError(), "executor error: tool 'get_weather' timed out after 2s"),
        (ToolTransportError("connection refused"), "executor error: connection refused"),
    ],
)
async def test_tool_failures_fail_the_step(reply: Any, message: str) -> None:
    runner, bodies, _ = make(tools=Tools({"http://tools.test/w": reply}))
    await run(runner, [tool_work(bodies, 2, "get_weather")], Acks())
    [failed] = of_type(bodies.published, StepFailed)
    assert stored(bodies, failed) == {"type": "executor_error", "message": message}


async def test_an_unknown_tool_is_not_found() -> None:
    runner, bodies, _ = make()
    await run(runner, [tool_work(bodies, 2, "nope")], Acks())
    [failed] = of_type(bodies.published, StepFailed)
    assert stored(bodies, failed)["message"] == "executor target not found: nope"


async def test_a_round_of_tool_calls_runs_concurrently() -> None:
    tools = Tools(gate=2)  # neither call answers until both are in flight
    runner, bodies, _ = make(tools=tools)
    acks = Acks()
    works = [tool_work(bodies, 2, "get_weather"), tool_work(bodies, 3, "lookup")]
    await run(runner, works, acks)
    assert len(of_type(bodies.published, StepCompleted)) == 2
    assert sorted(acks.acked) == sorted(w.step_id for w in works)


async def test_work_is_acknowledged_only_once_reported() -> None:
    tools = Tools(gate=2)
    runner, bodies, _ = make(tools=tools)
    acks = Acks()
    work = tool_work(bodies, 2, "get_weather")
    await runner.accept(work, 0, acks.for_(work))
    await asyncio.sleep(0.01)
    assert acks.acked == [] and of_type(bodies.published, StepCompleted) == []
    tools.all_in.set()
    await drain(runner)
    assert acks.acked == [work.step_id]


async def test_a_step_started_elsewhere_and_never_finished_is_abandoned_not_fired() -> None:
    upstream = Upstream()
    runner, bodies, ledger = make(upstream)
    acks = Acks()
    work = model_work(bodies, 3)
    ledger.statuses[work.step_id] = StepStatus.STARTED
    await run(runner, [work], acks)
    assert upstream.requests == []
    assert of_type(bodies.published, StepStarted) == []
    [failed] = of_type(bodies.published, StepFailed)
    assert stored(bodies, failed)["type"] == "step_abandoned"
    [record] = of_type(bodies.published, RequestTransitions)  # its row ends too
    assert record.events[0].status == 500
    assert acks.acked == [work.step_id]


@pytest.mark.parametrize("status", [StepStatus.FINISHED, StepStatus.CHAIN_OVER])
async def test_a_finished_step_is_skipped(status: StepStatus) -> None:
    upstream = Upstream()
    runner, bodies, ledger = make(upstream)
    acks = Acks()
    work = model_work(bodies, 3)
    ledger.statuses[work.step_id] = status
    await run(runner, [work], acks)
    assert upstream.requests == [] and bodies.published == []
    assert acks.acked == [work.step_id]


async def test_the_same_work_twice_in_one_worker_runs_once() -> None:
    tools = Tools(gate=1)
    runner, bodies, ledger = make(tools=tools)
    acks = Acks()
    work = tool_work(bodies, 2, "get_weather")
    await runner.accept(work, 0, acks.for_(work))
    await runner.accept(work, 0, acks.for_(work))  # while it runs
    await drain(runner)
    await runner.accept(work, 0, acks.for_(work))  # after it ended
    assert len(tools.requests) == 1
    assert len(of_type(bodies.published, StepStarted)) == 1
    assert len(ledger.asked) == 1
    assert acks.acked == [work.step_id] * 3


async def test_release_lets_running_work_commit_while_it_still_reports() -> None:
    tools = Tools(gate=2)
    runner, bodies, _ = make(tools=tools)
    acks = Acks()
    work = tool_work(bodies, 2, "get_weather")
    await runner.accept(work, 0, acks.for_(work))
    runner.release()
    assert acks.acked == [work.step_id]
    tools.all_in.set()
    await drain(runner)
    assert len(of_type(bodies.published, StepCompleted)) == 1


async def let_go(tools: Tools, bodies: MemoryBodies | None = None) -> tuple[StepRunner, MemoryBodies, StepWork]:  # fmt: skip
    """A tool step running, its work let go at a rebalance (``bodies``: the runner's I/O)."""
    runner, made, _ = make(tools=tools)
    bodies = runner.io = bodies or made
    work = tool_work(bodies, 2, "get_weather")
    await runner.accept(work, 0, Acks().for_(work))
    runner.release()
    return runner, bodies, work


async def test_a_step_still_running_at_shutdown_is_reported_abandoned_not_left_in_flight() -> None:
    # Its work was let go at a rebalance: no other worker will get it, so without a report
    # here its chain would wait for good.
    runner, bodies, work = await let_go(Tools(gate=2))  # never answers: one call only
    await runner.stop(grace_s=0.05)
    [failed] = of_type(bodies.published, StepFailed)
    assert failed.step_id == work.step_id and stored(bodies, failed)["type"] == "step_abandoned"
    assert of_type(bodies.published, StepCompleted) == [] and runner.running == {}


async def test_a_step_that_finishes_within_the_grace_reports_its_result() -> None:
    tools = Tools(gate=2)
    runner, bodies, _ = await let_go(tools)
    stopping = asyncio.ensure_future(runner.stop(grace_s=30))
    await asyncio.sleep(0)
    tools.all_in.set()  # the call answers while the worker is stopping
    await asyncio.wait_for(stopping, timeout=5)
    assert len(of_type(bodies.published, StepCompleted)) == 1
    assert of_type(bodies.published, StepFailed) == []


class SlowAcks(MemoryBodies):
    """A broker that has the records before it says so, and says so when ``acked`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.acked = asyncio.Event()
        self.acked.set()
        self.unacknowledged = asyncio.Event()  # a publish waits for its acknowledgement

    async def publish(self, outs: Sequence[Out]) -> None:
        await super().publish(outs)
        if not self.acked.is_set():
            self.unacknowledged.set()
        await self.acked.wait()


@pytest.mark.parametrize("turns", range(8))
async def test_a_step_ending_as_the_grace_runs_out_is_reported_once(turns: int) -> None:
    # Its answer lands a few loop turns before, at or after the grace ends: it is reported
    # completed or abandoned, never both.
    tools = Tools(gate=2)
    runner, bodies, _ = await let_go(tools)
    loop = asyncio.get_running_loop()

    def answer(left: int) -> None:
        if left:
            loop.call_soon(answer, left - 1)
        else:
            tools.all_in.set()

    answer(turns)
    await runner.stop(grace_s=0)
    ends = of_type(bodies.published, StepCompleted) + of_type(bodies.published, StepFailed)
    assert len(ends) == 1, ends


async def test_a_step_whose_report_is_under_way_at_shutdown_is_not_also_abandoned() -> None:
    bodies = SlowAcks()
    runner, _, _ = await let_go(Tools(gate=1), bodies)
    bodies.acked.clear()  # its StepCompleted will be on the broker, not acknowledged
    await asyncio.wait_for(bodies.unacknowledged.wait(), timeout=5)
    assert len(of_type(bodies.published, StepCompleted)) == 1
    # Were it abandoned too, that report would wait for an acknowledgement that never comes.
    await asyncio.wait_for(runner.stop(grace_s=0.01), timeout=5)
    assert of_type(bodies.published, StepFailed) == []
