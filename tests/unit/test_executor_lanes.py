"""The executor's lanes (gate.prefetch): claims of one lane run one at a time, in the order
they came, a claim queued in its lane can be aborted without reaching the upstream, and each
call that leaves its lane is counted by whether the next claim was queued behind it; reports
gather calls that end together, but the call that leaves nothing running is reported at once.
The upstream is a transport that holds each call until the test lets it answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from prometheus_client import REGISTRY

from cannonade.config import Config, ExecutorConfig, ModelConfig
from schemas import ids
from schemas.bodies import BodyRef
from schemas.events import DispatchBatch, DispatchItem, ExecutionReport, FinishedItem
from streams.agents.executor import Executor
from streams.emit import Out
from streams.execution.bodies import Template
from streams.execution.client import Timeouts, UpstreamClient, UpstreamRequest, UpstreamResponse
from streams.execution.reporter import Reporter
from streams.metrics import Hooks

MODELS = {"m": ModelConfig(upstream="http://upstream.test", api_key="k")}


class HeldUpstream:
    """Each call waits for its own release; ``sent`` lists the calls in the order they came."""

    def __init__(self, changed: asyncio.Condition) -> None:
        self.sent: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.changed = changed

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        assert request.body is not None
        name = request.body.decode()
        self.sent.append(name)
        async with self.changed:
            self.changed.notify_all()
        await self.release.setdefault(name, asyncio.Event()).wait()
        return UpstreamResponse(200, '{"id": "x", "object": "chat.completion", "choices": []}')

    def answer(self, name: str) -> None:
        self.release.setdefault(name, asyncio.Event()).set()


class Bodies:
    async def template(self, ref: BodyRef) -> Template:
        return Template(custom_id=None, body=f"call-{ref.offset}".encode())


def claim(n: int, lane: int) -> DispatchItem:
    request_id = ids.derived("lane-test", str(n))
    return DispatchItem(
        request_id=request_id, claim_id=ids.claim_id(request_id, 1, 0), batch_id=None,
        model="m", path="/v1/chat/completions", attempt=0,
        deadline=datetime(2100, 1, 1, tzinfo=UTC), claimed_at=datetime.now(UTC),
        body=BodyRef(0, n), lane=lane,
    )  # fmt: skip


class Harness:
    def __init__(self, max_in_flight: int = 512, gather_s: float = 0.0) -> None:
        config = Config(models=MODELS, executor=ExecutorConfig(max_in_flight=max_in_flight))
        self.changed = asyncio.Condition()  # notified on every call sent and report published
        self.upstream = HeldUpstream(self.changed)
        self.reports: list[FinishedItem] = []
        self.written: list[bytes] = []  # result and error bodies published

        async def publish(outs: Sequence[Out]) -> None:
            for out in outs:
                if isinstance(out.value, ExecutionReport):
                    self.reports += out.value.finished
                    self.reports_sent += 1
                elif isinstance(out.value, bytes):
                    self.written.append(out.value)
            async with self.changed:
                self.changed.notify_all()

        async def nothing(outs: Sequence[Out]) -> None:
            return None

        async def no_bodies(records: Sequence[tuple[str, bytes, int]]) -> list[BodyRef]:
            raise AssertionError("no chain in these tests")

        self.reports_sent = 0  # ExecutionReport records published
        self.reporter = Reporter(publish, "ex-1", finished_delay_s=gather_s)
        self.executor = Executor(
            self.reporter, Bodies(), UpstreamClient(self.upstream), config, "ex-1", nothing,
            no_bodies, Hooks({"m"}),
        )  # fmt: skip

    def results(self) -> dict[str, str]:
        return {r.claim_id: r.result for r in self.reports}

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(10), self.changed:
            await self.changed.wait_for(check)


def test_a_lanes_claims_run_one_at_a_time_in_order_and_lanes_run_side_by_side() -> None:
    async def scenario() -> None:
        h = Harness()
        h.reporter.start()
        first, second, third, other = claim(0, 0), claim(1, 0), claim(2, 0), claim(3, 1)
        await h.executor.accept(DispatchBatch(event_id="d", occurred_at=datetime.now(UTC), items=[first, second, third, other]))  # fmt: skip
        await h.until(lambda: len(h.upstream.sent) == 2)
        assert h.upstream.sent == ["call-0", "call-3"]  # lane 0's first, and lane 1
        h.upstream.answer("call-0")
        await h.until(lambda: len(h.upstream.sent) == 3)
        assert h.upstream.sent[2] == "call-1"  # the moment the call ahead of it ended
        await h.until(lambda: h.results() == {first.claim_id: "completed"})
        for name in ("call-1", "call-2", "call-3"):
            h.upstream.answer(name)
        await h.until(lambda: len(h.reports) == 4)
        assert h.upstream.sent == ["call-0", "call-3", "call-1", "call-2"]
        assert set(h.results().values()) == {"completed"}
        await h.reporter.stop()

    asyncio.run(scenario())


def test_a_claim_aborted_while_queued_in_its_lane_is_never_sent() -> None:
    async def scenario() -> None:
        h = Harness()
        h.reporter.start()
        running, queued = claim(0, 2), claim(1, 2)
        await h.executor.accept(DispatchBatch(event_id="d", occurred_at=datetime.now(UTC), items=[running, queued]))  # fmt: skip
        await h.until(lambda: h.upstream.sent == ["call-0"])
        h.executor.abort(queued.claim_id)
        await h.until(lambda: queued.claim_id in h.results())
        assert h.results()[queued.claim_id] == "canceled"
        h.upstream.answer("call-0")
        await h.until(lambda: running.claim_id in h.results())
        assert h.upstream.sent == ["call-0"] and h.results()[running.claim_id] == "completed"
        await h.reporter.stop()

    asyncio.run(scenario())


def test_a_claim_queued_in_its_lane_holds_no_call_slot() -> None:
    async def scenario() -> None:
        h = Harness(max_in_flight=2)
        h.reporter.start()
        items = [claim(0, 0), claim(1, 0), claim(2, 1)]  # lane 0's second waits for its first
        async with asyncio.timeout(10):
            await h.executor.accept(DispatchBatch(event_id="d", occurred_at=datetime.now(UTC), items=items))  # fmt: skip
        await h.until(lambda: len(h.upstream.sent) == 2)
        assert h.upstream.sent == ["call-0", "call-2"]  # both slots call upstreams
        for name in ("call-0", "call-1", "call-2"):
            h.upstream.answer(name)
        await h.until(lambda: len(h.reports) == 3)
        assert set(h.results().values()) == {"completed"}
        await h.reporter.stop()

    asyncio.run(scenario())


def handoffs() -> dict[str, float]:
    labels = ("queued", "none")
    sample = REGISTRY.get_sample_value
    return {n: sample("cannonade_lane_handoffs_total", {"model": "m", "next": n}) or 0.0 for n in labels}  # fmt: skip


def test_each_call_leaving_its_lane_is_counted_by_whether_a_claim_was_queued_behind_it() -> None:
    """What an operator reads to see whether prefetch keeps the upstream's slots busy."""

    async def scenario() -> None:
        h = Harness()
        h.reporter.start()
        before = handoffs()
        first, second, running, aborted = claim(0, 0), claim(1, 0), claim(2, 1), claim(3, 1)
        items = [first, second, running, aborted]
        await h.executor.accept(DispatchBatch(event_id="d", occurred_at=datetime.now(UTC), items=items))  # fmt: skip
        await h.until(lambda: h.upstream.sent == ["call-0", "call-2"])
        h.executor.abort(aborted.claim_id)  # no longer waiting behind call-2
        await h.until(lambda: aborted.claim_id in h.results())
        for name in ("call-0", "call-1", "call-2"):
            h.upstream.answer(name)
        await h.until(lambda: len(h.reports) == 4)
        after = handoffs()
        # call-0 handed its slot to call-1 at once; call-1 and call-2 left nothing behind.
        assert {n: after[n] - before[n] for n in after} == {"queued": 1.0, "none": 2.0}
        await h.reporter.stop()

    asyncio.run(scenario())


def test_reports_gather_while_calls_run_and_the_last_call_is_reported_at_once() -> None:
    """A lone flex request's answer must not wait out the gathering meant for busy times."""

    async def scenario() -> None:
        h = Harness(gather_s=60.0)  # longer than any test: only the last call skips it
        h.reporter.start()
        first, second = claim(0, 0), claim(1, 1)
        await h.executor.accept(DispatchBatch(event_id="d", occurred_at=datetime.now(UTC), items=[first, second]))  # fmt: skip
        await h.until(lambda: len(h.upstream.sent) == 2)
        h.upstream.answer("call-0")
        for _ in range(50):  # the first call's end is in the reporter, gathering
            await asyncio.sleep(0)
        assert h.reports_sent == 0
        h.upstream.answer("call-1")  # nothing else runs now
        await h.until(lambda: h.reports_sent == 1)
        assert h.results() == {first.claim_id: "completed", second.claim_id: "completed"}
        await h.reporter.stop()

    asyncio.run(scenario())
