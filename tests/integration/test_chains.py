"""Multi-step responses with server-side tools against the real stack, through the `openai`
SDK (responses §2, §3, §7.4, §7.9, §9): parallel tool rounds, failures, the iteration cap,
client-side functions, streaming, a chain worker killed mid-chain, replay of the read model,
and chains headed by a claimed row (flex, batch lines)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import openai
import pytest
from aiokafka import AIOKafkaProducer
from openai import OpenAI

from cannonade.testing.fake_tools import FakeToolsControl
from cannonade.testing.fake_upstream import FakeUpstreamControl
from compose import postgres, stack
from compose.services import Services
from schemas import codec, topics
from schemas.bodies import BodyRef
from schemas.events import StepRecorded
from tests.integration.conftest import (
    TOOL_USERS,
    caught_up,
    eventually,
    jsonl,
    project_to_end,
    read_topic,
    run,
    wait_for_batch,
)

pytestmark = pytest.mark.integration

MODEL = "chat-b"
_users: Iterator[str] = iter(TOOL_USERS)


@pytest.fixture
def client(client_for: Callable[[str], OpenAI]) -> OpenAI:
    """A user the server-side tools resolve for (a fresh one per test)."""
    return client_for(next(_users))


def marker() -> str:
    return f"m{uuid.uuid4().hex[:12]}"


def calls(*specs: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    """A scripted model reply calling tools: (call id, name, arguments)."""
    return {"tool_calls": [{"id": i, "name": n, "arguments": a} for i, n, a in specs]}


def db_rows(services: Services, query: str, *args: Any) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(services.env["CANNONADE_DATABASE_URL"])
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return run(fetch())  # type: ignore[no-any-return]


def steps_of(services: Services, response: str) -> list[dict[str, Any]]:
    head = response.removeprefix("resp_")
    return db_rows(
        services,
        "SELECT * FROM response_steps WHERE id = $1 OR parent_step_id = $1 ORDER BY step_sequence",
        uuid.UUID(head),
    )


def wait_for_response(client: OpenAI, response_id: str, timeout_s: float = 120) -> Any:
    def ended() -> Any:
        found = client.responses.retrieve(response_id)
        return found if found.status in ("completed", "failed", "cancelled") else None

    return eventually(ended, f"{response_id} to end", timeout_s)


def error_type(response: Any) -> Any:
    """A failed response's `error.type` (a failure payload's type, §4.4 with the decisions);
    the SDK's ResponseError keeps it as an extra field."""
    return getattr(response.error, "type", None)


def model_calls(upstream: FakeUpstreamControl, mark: str) -> list[Any]:
    return upstream.received(marker=mark, path="/v1/chat/completions")


# -- the warm path (realtime, §7.4) -------------------------------------------------------


def test_a_parallel_round_of_two_tools_then_an_answer(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_w", "get_weather", {"city": "Paris", "m": mark}),
              ("call_l", "lookup", {"term": "umbrella", "m": mark})),
        {"content": f"It is 18C in Paris {mark}"},
        marker=mark,
    )  # fmt: skip
    # Each tool answers after 1.5 s: run one after the other, they could not overlap.
    tools.script({"result": {"temp_c": 18}, "latency_ms": 1500}, tool="get_weather", marker=mark)
    tools.script({"result": {"found": True}, "latency_ms": 1500}, tool="lookup", marker=mark)

    response = client.responses.create(model=MODEL, input=f"weather in Paris? {mark}")

    assert response.status == "completed"
    assert response.id.startswith("resp_") and response.model == MODEL
    assert [item.type for item in response.output] == [
        "function_call", "function_call", "function_call_output", "function_call_output",
        "message",
    ]  # fmt: skip
    outputs = {item.call_id: item.output for item in response.output if item.type == "function_call_output"}  # fmt: skip
    assert outputs == {"call_w": '{"temp_c":18}', "call_l": '{"found":true}'}
    assert response.output_text == f"It is 18C in Paris {mark}"
    # The round ran concurrently.
    weather, lookup = tools.received(marker=mark, tool="get_weather"), tools.received(marker=mark, tool="lookup")  # fmt: skip
    assert len(weather) == len(lookup) == 1
    assert abs(weather[0].at - lookup[0].at) < 1.0
    assert weather[0].headers["authorization"] == "Bearer tool-secret-get_weather"
    assert weather[0].body == {"city": "Paris", "m": mark}
    # The follow-up model call carries both results under their real call ids.
    first, follow_up = model_calls(upstream, mark)
    assert first.headers["authorization"] == "Bearer local-upstream-key"
    assert set(first.body) == {"model", "messages", "stream", "tools"}
    tool_turns = [m for m in follow_up.body["messages"] if m["role"] == "tool"]
    assert {(m["tool_call_id"], m["content"]) for m in tool_turns} == {
        ("call_w", '{"temp_c":18}'), ("call_l", '{"found":true}'),
    }  # fmt: skip
    # Retrieval reads the same chain from the read model.
    again = client.responses.retrieve(response.id)
    assert again.status == "completed" and again.output_text == response.output_text
    steps = steps_of(services, response.id)
    assert [(s["step_sequence"], s["step_kind"], s["state"]) for s in steps] == [
        (1, "model_call", "completed"), (2, "tool_call", "completed"),
        (3, "tool_call", "completed"), (4, "model_call", "completed"),
    ]  # fmt: skip
    assert all(s["response_payload"] is not None for s in steps)
    # The follow-up's own row is a completed chat completion of the same owner.
    [row] = db_rows(services, "SELECT state, path, owner FROM requests WHERE id = $1", steps[3]["request_id"])  # fmt: skip
    assert row["state"] == "completed" and row["path"] == "/v1/chat/completions"


def test_a_failing_tool_fails_the_response(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(calls(("call_1", "get_weather", {"m": mark})), marker=mark)
    tools.script({"status": 500, "text": "tool broke"}, tool="get_weather", marker=mark)

    with pytest.raises(openai.APIStatusError) as raised:
        client.responses.create(model=MODEL, input=f"weather? {mark}")

    assert raised.value.status_code == 502
    assert raised.value.body == {
        "type": "executor_error", "message": "executor error: HTTP 500: tool broke",
    }  # fmt: skip
    assert len(model_calls(upstream, mark)) == 1  # a failed round ends the chain


def test_a_model_call_failing_mid_chain_fails_the_response_and_its_row(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_1", "get_weather", {"m": mark})),
        {"status": 500, "message": "upstream is down"},
        marker=mark,
    )
    response = client.responses.create(model=MODEL, input=f"weather? {mark}", background=True)
    assert response.status == "in_progress" and response.background is True

    final = wait_for_response(client, response.id)

    assert final.status == "failed" and final.error is not None
    assert final.error.message.startswith("executor error: model call returned HTTP 500")
    steps = steps_of(services, response.id)
    assert [(s["step_kind"], s["state"]) for s in steps] == [
        ("model_call", "completed"), ("tool_call", "completed"), ("model_call", "failed"),
    ]  # fmt: skip
    assert json.loads(steps[2]["error"])["type"] == "executor_error"
    [row] = db_rows(services, "SELECT state, error_type FROM requests WHERE id = $1", steps[2]["request_id"])  # fmt: skip
    assert row == {"state": "failed", "error_type": "NonRetriableHttpStatus"}


def test_the_iteration_cap_allows_five_model_calls_and_five_tool_calls(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(calls(("call_x", "get_weather", {"m": mark})), marker=mark, repeat=True)

    with pytest.raises(openai.APIStatusError) as raised:
        client.responses.create(model=MODEL, input=f"loop forever {mark}")

    assert raised.value.status_code == 502
    assert raised.value.body == {
        "type": "loop_error", "message": "response loop exceeded max_response_iterations cap",
    }  # fmt: skip
    assert len(model_calls(upstream, mark)) == 5
    assert len(tools.received(marker=mark)) == 5


def test_a_round_with_a_client_side_function_passes_through_whole(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        {"content": "checking", **calls(("call_s", "get_weather", {"m": mark}),
                                        ("call_c", "client_fn", {"m": mark}))},
        marker=mark,
    )  # fmt: skip
    own_tools: Any = [
        {"type": "function", "name": "client_fn", "parameters": {"type": "object"}},
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
    ]

    response = client.responses.create(model=MODEL, input=f"hi {mark}", tools=own_tools)

    assert response.status == "completed"
    assert [(i.type, getattr(i, "name", None)) for i in response.output] == [
        ("message", None), ("function_call", "get_weather"), ("function_call", "client_fn"),
    ]  # fmt: skip
    assert tools.received(marker=mark) == []  # not even the server-side call ran
    assert len(model_calls(upstream, mark)) == 1


def test_streaming_sends_the_steps_as_they_land(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_1", "get_weather", {"m": mark})), {"content": f"sunny {mark}"}, marker=mark
    )

    events = list(client.responses.create(model=MODEL, input=f"weather? {mark}", stream=True))

    kinds: list[str] = [e.type for e in events]
    # The §7.4 events, in order (framed by item added/done events for the SDK's helper).
    spec = iter(kinds)
    assert all(kind in spec for kind in [
        "response.created", "response.function_call_arguments.delta",
        "response.output_item.done", "response.output_text.delta", "response.completed",
    ]), kinds  # fmt: skip
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    delta = next(e for e in events if e.type == "response.function_call_arguments.delta")
    assert getattr(delta, "call_id", None) == "call_1"  # §7.4 names the call
    [tool_output] = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call_output"]  # fmt: skip
    assert tool_output.call_id == "call_1"
    text = next(e for e in events if e.type == "response.output_text.delta")
    assert text.delta == f"sunny {mark}"
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == "completed" and final.output_text == f"sunny {mark}"
    # The model calls streamed too: the chain stores them reassembled.
    assert all(call.body["stream"] is True for call in model_calls(upstream, mark))


def test_the_sdk_stream_helper_accumulates_a_chain(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_1", "get_weather", {"m": mark})), {"content": f"sunny {mark}"}, marker=mark
    )
    with client.responses.stream(model=MODEL, input=f"weather? {mark}") as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert texts == [f"sunny {mark}"]
    assert final.output_text == f"sunny {mark}"
    assert [i.type for i in final.output] == ["function_call", "function_call_output", "message"]


def test_a_streamed_failure_ends_with_response_failed(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(calls(("call_1", "get_weather", {"m": mark})), marker=mark)
    tools.script({"status": 503, "text": "later"}, tool="get_weather", marker=mark)

    events = list(client.responses.create(model=MODEL, input=f"weather? {mark}", stream=True))

    assert [e.type for e in events][-1] == "response.failed"
    error = events[-1].response.error  # type: ignore[union-attr]
    assert error is not None and error.message == "executor error: HTTP 503: later"


def test_chain_content_never_lands_on_a_topic_that_is_not_compacted(
    client: OpenAI,
    stack_info: stack.StackInfo,
    tools: FakeToolsControl,
    upstream: FakeUpstreamControl,  # fmt: skip
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_1", "get_weather", {"secret": mark})), {"content": f"answer {mark}"},
        marker=mark,
    )  # fmt: skip
    tools.script({"result": {"secret": mark}}, tool="get_weather", marker=mark)
    response = client.responses.create(model=MODEL, input=f"prompt {mark}")
    assert response.output_text == f"answer {mark}"
    for topic in topics.ALL:
        if topic.compacted:
            continue
        records = run(read_topic(stack_info.kafka_bootstrap, topic))
        assert not any(mark.encode() in (r.value or b"") for r in records), topic.name


# -- workers dying mid-chain ----------------------------------------------------------------


def _recorded_steps(services: Services, response_id: str) -> dict[int, set[str]]:
    """Every StepRecorded on the chain log for the response: step ids per sequence."""
    head = response_id.removeprefix("resp_")
    records = run(read_topic(services.env["CANNONADE_KAFKA"], topics.RESPONSES))
    per_sequence: dict[int, set[str]] = {}
    for record in records:
        if record.key != head.encode():
            continue
        event = codec.chain_events.decode(record.value)
        if isinstance(event, StepRecorded):
            per_sequence.setdefault(event.sequence, set()).add(event.step_id)
    return per_sequence


def test_killing_the_chain_worker_while_a_tool_runs_never_repeats_a_step(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_s", "slow_tool", {"m": mark})), {"content": f"done {mark}"}, marker=mark
    )
    tools.script({"result": {"ok": True}, "latency_ms": 6000}, tool="slow_tool", marker=mark)
    response = client.responses.create(model=MODEL, input=f"be slow {mark}", background=True)
    eventually(lambda: tools.received(marker=mark), "the slow tool to be called")

    restarts = services.kill("chains-0")
    services.wait_restarted("chains-0", restarts)
    final = wait_for_response(client, response.id)

    if final.status == "failed":
        assert error_type(final) == "step_abandoned"
    else:
        assert final.status == "completed" and final.output_text == f"done {mark}"
    assert len(tools.received(marker=mark)) == 1
    assert len(model_calls(upstream, mark)) == (2 if final.status == "completed" else 1)
    # A step re-decided after the restart is the same step: one id per sequence.
    recorded = _recorded_steps(services, response.id)
    assert all(len(ids) == 1 for ids in recorded.values()), recorded
    assert sorted(recorded) == [s["step_sequence"] for s in steps_of(services, response.id)]


def test_killing_the_executors_while_a_tool_runs_abandons_the_step_instead_of_repeating_it(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_s", "slow_tool", {"m": mark})), {"content": f"done {mark}"}, marker=mark
    )
    tools.script({"result": {"ok": True}, "latency_ms": 8000}, tool="slow_tool", marker=mark)
    response = client.responses.create(model=MODEL, input=f"be slow {mark}", background=True)
    eventually(lambda: tools.received(marker=mark), "the slow tool to be called")

    names = [n for n in services.procs if n.startswith("executor-")]
    restarts = {name: services.kill(name) for name in names}
    for name, count in restarts.items():
        services.wait_restarted(name, count)
    final = wait_for_response(client, response.id)

    # Its work came back to a new executor, which found it started and never finished.
    assert final.status == "failed" and error_type(final) == "step_abandoned"
    assert len(tools.received(marker=mark)) == 1
    assert len(model_calls(upstream, mark)) == 1


# -- the read model -------------------------------------------------------------------------

_CHAIN_TABLES = {
    "response_steps": "SELECT * FROM response_steps ORDER BY id",
    "response_chains": "SELECT * FROM response_chains ORDER BY id",
    "step bodies": "SELECT * FROM bodies WHERE kind IN ('sreq', 'sres', 'serr') ORDER BY ref, kind",
}


async def _chain_snapshot(dsn: str) -> dict[str, list[dict[str, Any]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {name: [dict(r) for r in await conn.fetch(q)] for name, q in _CHAIN_TABLES.items()}
    finally:
        await conn.close()


def test_replaying_the_log_rebuilds_identical_response_steps(
    client: OpenAI,
    stack_info: stack.StackInfo,
    tools: FakeToolsControl,
    upstream: FakeUpstreamControl,  # fmt: skip
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_1", "get_weather", {"m": mark}), ("call_2", "lookup", {"m": mark})),
        {"content": f"ok {mark}"},
        marker=mark,
    )
    tools.script({"status": 500, "text": "no"}, tool="lookup", marker=mark)
    with pytest.raises(openai.APIStatusError):
        client.responses.create(model=MODEL, input=f"replay me {mark}")

    async def scenario() -> None:
        bootstrap = stack_info.kafka_bootstrap
        await caught_up(stack_info.database_url, bootstrap, "projector")
        rebuilt = await postgres.create_database(stack_info.admin_database_url, "replay_chains")
        try:
            await project_to_end(rebuilt, bootstrap)
            live, first = await _chain_snapshot(stack_info.database_url), await _chain_snapshot(rebuilt)  # fmt: skip
            for table in _CHAIN_TABLES:
                assert first[table] == live[table], f"{table} differs after a full replay"
            assert any(s["state"] == "failed" for s in first["response_steps"])
            conn = await asyncpg.connect(rebuilt)
            await conn.execute("UPDATE projection_offsets SET next_offset = 0")
            await conn.close()
            await project_to_end(rebuilt, bootstrap)
            assert await _chain_snapshot(rebuilt) == first
        finally:
            await postgres.drop_database(stack_info.admin_database_url, "replay_chains")

    run(scenario())


def test_a_step_that_breaks_an_invariant_is_dead_lettered(
    services: Services, stack_info: stack.StackInfo
) -> None:
    head = str(uuid.uuid4())
    bad = StepRecorded(
        event_id=str(uuid.uuid4()), occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        response_id=head, step_id=str(uuid.uuid4()), request_id=None, prev_step_id=head,
        parent_step_id=head, kind="model_call", sequence=2, payload=BodyRef(0, 0),
    )  # fmt: skip

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack_info.kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topics.RESPONSES.name, codec.encode(bad), key=head.encode())  # fmt: skip
        finally:
            await producer.stop()

    run(produce())

    def lettered() -> bool:
        letters = run(read_topic(stack_info.kafka_bootstrap, topics.DEADLETTER))
        return any(
            json.loads(r.value)["source_topic"] == topics.RESPONSES.name
            and r.key == head.encode()
            and "check constraint" in json.loads(r.value)["reason"]
            for r in letters
        )

    eventually(lettered, "the dead letter")
    assert db_rows(services, "SELECT 1 FROM response_steps WHERE id = $1", uuid.UUID(bad.step_id)) == []  # fmt: skip


# -- claimed heads: flex requests and batch lines (§7.9) ------------------------------------


def test_a_flex_chain_runs_after_the_claim_and_holds_it_past_the_stale_threshold(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_s", "slow_tool", {"m": mark})), {"content": f"flex done {mark}"}, marker=mark
    )
    # Longer than the gate's stale-worker threshold (6 s in the test configuration).
    tools.script({"result": {"ok": True}, "latency_ms": 8000}, tool="slow_tool", marker=mark)

    response = client.responses.create(model=MODEL, input=f"flex {mark}", service_tier="flex")

    assert response.status == "completed"
    assert response.output_text == f"flex done {mark}"
    assert [i.type for i in response.output] == ["function_call", "function_call_output", "message"]  # fmt: skip
    # The gate did not take the head back while the tool ran: no step ran twice.
    assert len(model_calls(upstream, mark)) == 2
    assert len(tools.received(marker=mark)) == 1
    head = response.id.removeprefix("resp_")
    [row] = db_rows(services, "SELECT state, retry_attempt, service_tier FROM requests WHERE id = $1", uuid.UUID(head))  # fmt: skip
    assert row == {"state": "completed", "retry_attempt": 0, "service_tier": "flex"}


def test_a_failed_flex_chain_is_failed_once_and_never_retried(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(calls(("call_1", "get_weather", {"m": mark})), marker=mark, repeat=False)
    tools.script({"status": 500, "text": "broken"}, tool="get_weather", marker=mark)

    response = client.responses.create(
        model=MODEL, input=f"flex {mark}", service_tier="flex", background=True
    )
    final = wait_for_response(client, response.id)

    assert final.status == "failed" and final.error is not None
    assert final.error.message == "executor error: HTTP 500: broken"
    assert len(model_calls(upstream, mark)) == 1
    assert len(tools.received(marker=mark)) == 1


def test_a_responses_batch_line_with_tools_runs_the_chain(
    client: OpenAI, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    marks = [marker() for _ in range(3)]
    for mark in marks:
        upstream.script(
            calls(("call_b", "get_weather", {"m": mark})), {"content": f"line {mark}"}, marker=mark
        )
    lines = [
        {"custom_id": mark, "method": "POST", "url": "/v1/responses",
         "body": {"model": MODEL, "input": f"weather {mark}"}}
        for mark in marks
    ]  # fmt: skip
    uploaded = client.files.create(file=("agentic.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h"
    )

    assert wait_for_batch(client, batch.id).status == "completed"

    output = [json.loads(line) for line in client.files.content(batch.output_file_id or "").text.splitlines()]  # fmt: skip
    assert sorted(o["custom_id"] for o in output) == sorted(marks)
    for line in output:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200
        assert body["id"] == f"resp_{line['id'].removeprefix('batch_req_')}"
        assert [i["type"] for i in body["output"]] == ["function_call", "function_call_output", "message"]  # fmt: skip
        assert body["output"][-1]["content"][0]["text"] == f"line {line['custom_id']}"
    for mark in marks:
        assert len(tools.received(marker=mark)) == 1


def test_cancelling_a_batch_mid_chain_cancels_its_line_and_stops_the_chain(
    client: OpenAI, services: Services, tools: FakeToolsControl, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script(
        calls(("call_c", "slow_tool", {"m": mark})), {"content": f"too late {mark}"}, marker=mark
    )
    tools.script({"result": {"ok": True}, "latency_ms": 4000}, tool="slow_tool", marker=mark)
    line = {"custom_id": mark, "method": "POST", "url": "/v1/responses", "body": {"model": MODEL, "input": f"slow {mark}"}}  # fmt: skip
    uploaded = client.files.create(file=("agentic.jsonl", jsonl([line])), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h"
    )
    eventually(lambda: tools.received(marker=mark) or None, "the chain's tool call")

    client.batches.cancel(batch.id)

    # Ended by the abort, not by the chain's answer once the tool returns.
    done = wait_for_batch(client, batch.id)
    assert done.status == "cancelled" and done.request_counts.completed == 0
    rows = db_rows(services, "SELECT state FROM requests WHERE batch_id = $1", uuid.UUID(batch.id))
    assert rows == [{"state": "canceled"}]
    tool_step = {"step_kind": "tool_call", "state": "completed"}

    def tool_ended() -> bool:
        head = db_rows(services, "SELECT id FROM requests WHERE batch_id = $1", uuid.UUID(batch.id))[0]["id"]  # fmt: skip
        steps = steps_of(services, f"resp_{head}")
        return any({k: s[k] for k in tool_step} == tool_step for s in steps)

    eventually(tool_ended, "the running tool to finish")
    assert len(model_calls(upstream, mark)) == 1  # the chain asked the model nothing more
