"""An executor's claims at the edges of its life and of the topics' limits: a claim aborted
before its task ran is reported once, a shutdown starts no queued call and reports nothing it
stopped, a body the broker is slow to hand over is an attempt rather than a failure, an
answer too large for a record fails that claim alone, and the reporter's stop sends what a
send under way held."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from cannonade.config import Config, ExecutorConfig, ModelConfig
from schemas.bodies import MAX_BODY_BYTES, BodyRef
from schemas.events import ChainStarted, DispatchBatch, ExecutionReport, FinishedItem, StartedItem
from streams.emit import Out
from streams.execution.bodies import BodyUnavailable, Template
from streams.execution.client import Timeouts, UpstreamClient, UpstreamRequest, UpstreamResponse
from streams.execution.outcome import ModelEscalation
from streams.execution.reporter import Reporter
from streams.responses.tools import ToolConfig
from tests.unit.test_executor_lanes import Harness, claim


def dispatch(*items: object) -> DispatchBatch:
    return DispatchBatch(event_id="d", occurred_at=datetime.now(UTC), items=list(items))  # type: ignore[arg-type]


def test_a_claim_aborted_before_its_task_ran_is_reported_canceled_once() -> None:
    async def scenario() -> None:
        h = Harness()
        h.reporter.start()
        item = claim(0, -1)
        await h.executor.accept(dispatch(item))
        h.executor.abort(item.claim_id)  # before the loop ran the new task at all
        await h.until(lambda: bool(h.reports))
        await h.reporter.stop()
        assert [(r.claim_id, r.result) for r in h.reports] == [(item.claim_id, "canceled")]
        assert h.upstream.sent == []

    asyncio.run(scenario())


def test_stopping_starts_no_queued_call_and_reports_nothing_it_stopped() -> None:
    async def scenario() -> None:
        h = Harness()
        h.reporter.start()
        running, queued = claim(0, 0), claim(1, 0)
        await h.executor.accept(dispatch(running, queued))
        await h.until(lambda: h.upstream.sent == ["call-0"])
        await h.executor.stop_running()
        h.upstream.answer("call-0")
        await h.reporter.stop()
        assert h.upstream.sent == ["call-0"]  # the queued claim never called
        assert h.reports == [] and h.executor.running == {}

    asyncio.run(scenario())


class SlowBroker:
    async def template(self, ref: BodyRef) -> Template:
        raise BodyUnavailable(f"the broker did not hand over 0@{ref.offset} within 10 s")


async def one_claim(h: Harness) -> FinishedItem:
    """Run one claim through the harness's executor; its one report."""
    h.reporter.start()
    await h.executor.accept(dispatch(claim(0, -1)))
    await h.until(lambda: bool(h.reports))
    await h.reporter.stop()
    [report] = h.reports
    return report


def test_a_body_the_broker_is_slow_to_hand_over_is_retried_not_failed() -> None:
    h = Harness()
    h.executor.bodies = SlowBroker()
    report = asyncio.run(one_claim(h))
    assert report.result == "retry" and report.not_before is not None


class HugeUpstream:
    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        return UpstreamResponse(200, '{"content": "' + "x" * MAX_BODY_BYTES + '"}')


def test_an_answer_too_large_for_a_record_fails_its_claim_with_a_short_error() -> None:
    h = Harness()
    h.executor.client = UpstreamClient(HugeUpstream())
    report = asyncio.run(one_claim(h))
    assert (report.result, report.error_type, report.status) == ("failed", "NonRetriableHttpStatus", 502)  # fmt: skip
    [body] = h.written
    assert len(body) < 1024 and b"a result holds at most" in body


def test_stopping_the_reporter_sends_what_a_send_under_way_held() -> None:
    async def scenario() -> None:
        delivered: list[FinishedItem] = []
        stuck = asyncio.Event()  # the first send waits for a full batch, say, until cancelled

        async def publish(outs: Sequence[Out]) -> None:
            if not stuck.is_set():
                stuck.set()
                await asyncio.Event().wait()
            delivered.extend(f for o in outs if isinstance(o.value, ExecutionReport) for f in o.value.finished)  # fmt: skip

        reporter = Reporter(publish, "ex-1", finished_delay_s=0)
        reporter.start()
        item = FinishedItem(request_id="r", claim_id="c", result="completed")
        reporter.started("m", StartedItem("r", "c"))
        reporter.finished("m", item, last=True)
        async with asyncio.timeout(10):
            await stuck.wait()
        await reporter.stop()
        assert delivered == [item]

    asyncio.run(scenario())


def test_a_chain_reads_the_escalated_body_whether_or_not_tools_were_added() -> None:
    """A /v1/responses line near its deadline on a model that escalates: its chain runs the
    escalated model, with the caller's own tools as with server-side tools injected."""
    own_tools = {"model": "small", "input": "hi", "tools": [{"type": "function", "name": "mine"}]}
    injected = {"model": "small", "input": "hi"}
    stored = [msgspec.json.encode(own_tools), msgspec.json.encode(injected)]

    class Bodies:
        async def template(self, ref: BodyRef) -> Template:
            return Template(custom_id=None, body=stored[ref.offset])

    async def scenario() -> list[str]:
        h = Harness()
        h.executor.bodies = Bodies()
        h.executor.config = Config(
            models={m: ModelConfig(upstream="http://u", api_key="k") for m in ("small", "big")},
            executor=ExecutorConfig(
                model_escalations={"small": ModelEscalation(escalation_model="big")}
            ),  # fmt: skip
            tools={
                "lookup": ToolConfig(
                    description="l", url="http://t", models=("small",), users=("tina",)
                )
            },
        )
        started: list[ChainStarted] = []

        async def publish(outs: Sequence[Out]) -> None:
            started.extend(o.value for o in outs if isinstance(o.value, ChainStarted))

        async def write_bodies(records: Sequence[tuple[str, bytes, int]]) -> list[BodyRef]:
            stored.extend(value for _, value, _ in records)
            return [BodyRef(0, len(stored) - len(records) + i) for i in range(len(records))]

        h.executor.publish, h.executor.write_bodies = publish, write_bodies
        near = datetime.now(UTC) + timedelta(seconds=60)
        for line in (0, 1):
            item = msgspec.structs.replace(claim(line, -1), model="small", path="/v1/responses", deadline=near, body=BodyRef(0, line), owner="tina")  # fmt: skip
            await h.executor._execute(item, {})
        return [msgspec.json.decode(stored[s.parent.offset])["model"] for s in started]

    assert asyncio.run(scenario()) == ["big", "big"]


def test_a_claim_dispatched_again_is_answered_not_called_again() -> None:
    """The gate sends a long-quiet call's dispatch again (its report may have been lost): while
    the call runs that changes nothing; once it ended, its outcome is said again."""

    async def scenario() -> None:
        h = Harness()
        h.reporter.start()
        item = claim(0, -1)
        await h.executor.accept(dispatch(item))
        await h.until(lambda: h.upstream.sent == ["call-0"])
        await h.executor.accept(dispatch(item))  # while it runs
        h.upstream.answer("call-0")
        await h.until(lambda: len(h.reports) == 1)
        await h.executor.accept(dispatch(item))  # after it ended
        await h.until(lambda: len(h.reports) == 2)
        await h.reporter.stop()
        assert h.upstream.sent == ["call-0"]
        assert [(r.claim_id, r.result) for r in h.reports] == [(item.claim_id, "completed")] * 2

    asyncio.run(scenario())
