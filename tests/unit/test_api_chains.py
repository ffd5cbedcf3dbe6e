"""The warm path's pure parts (responses §7.4): the failure payload a 502 carries, and the SSE
events built from projected steps — in step order, waiting for in-flight siblings, with the
item ids of the assembled response (§3)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from projections.api import responses as api_responses
from projections.api.chains import ChainEvents, Ended, failure_payload
from streams.execution.failure import NonRetriableHttpStatus
from streams.responses.chain import Complete, HeadCompleted, assemble_output, conclude
from streams.responses.steps import Step, StepKind, StepState, step_id
from tests.unit.api_fakes import FakePool, FakePublisher, serve
from tests.unit.test_api_no_retry import TOOLS
from tests.unit.test_responses_chain import PARENT, Loop, completion, tool_call

HEAD = "0d9f1c7e-2b3a-4c5d-8e9f-0a1b2c3d4e5f"
T0 = datetime(2025, 6, 1, tzinfo=UTC)
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
MODEL_REPLY = {"choices": [{"message": {"role": "assistant", "content": "checking", "tool_calls": [CALL]}}]}  # fmt: skip
FINAL_REPLY = {"choices": [{"message": {"role": "assistant", "content": "sunny"}}]}


def row(sequence: int, kind: str, state: str, request: Any, response: Any = None) -> dict[str, Any]:
    return {
        "id": step_id(HEAD, sequence),
        "step_kind": kind,
        "step_sequence": sequence,
        "state": state,
        "request_payload": msgspec.json.encode(request),
        "response_payload": None if response is None else msgspec.json.encode(response),
    }


def parse(stream: bytes) -> list[tuple[str, str, dict[str, Any]]]:
    """(sse id, event, data) per event."""
    events = []
    for block in stream.decode().split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["id"], fields["event"], msgspec.json.decode(fields["data"])))
    return events


def test_a_502_carries_the_chain_failure_payload() -> None:
    payload = {"type": "executor_error", "message": "executor error: HTTP 500: boom"}
    envelope = NonRetriableHttpStatus(status=500, body=msgspec.json.encode(payload).decode())
    assert failure_payload("failed", envelope.to_json().encode()) == payload
    assert failure_payload("failed", b"not json")["message"] == "not json"
    assert failure_payload("canceled", None)["type"] == "request_canceled"
    assert Ended("failed", envelope.to_json().encode()).outcome() == (502, {"error": payload})


def test_steps_stream_in_order_and_wait_for_in_flight_siblings() -> None:
    events = ChainEvents(HEAD, {"id": f"resp_{HEAD}", "object": "response"})
    opening = parse(events.created())
    assert [(i, e) for i, e, _ in opening] == [("0", "response.created"), ("0", "response.in_progress")]  # fmt: skip
    assert opening[0][2]["status"] == "in_progress"
    tool_request = {"name": "get_weather", "args": {}, "call_id": "call_1"}
    rows = [
        row(1, "model_call", "completed", {}, MODEL_REPLY),
        row(2, "tool_call", "processing", tool_request),
        row(3, "tool_call", "completed", tool_request, {"ok": True}),
    ]
    first = parse(events.steps(rows, final=False))
    assert {i for i, _, _ in first} == {"1"}  # step 2 is in flight: step 3 waits behind it
    kinds = [e for _, e, _ in first]
    assert kinds == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
    ]  # fmt: skip
    rows[1] = row(2, "tool_call", "completed", tool_request, {"temp_c": 18})
    rest = parse(events.steps(rows[1:], final=False))
    assert [(i, e) for i, e, d in rest if e == "response.output_item.done"] == [
        ("2", "response.output_item.done"), ("3", "response.output_item.done"),
    ]  # fmt: skip
    numbers = [d["sequence_number"] for _, _, d in opening + first + rest]
    assert numbers == list(range(len(numbers)))
    # The streamed items are the assembled response's, by id and position.
    chain = [
        Step(id=r["id"], request_id=None, prev_step_id=None, parent_step_id=None,
             step_kind=StepKind(r["step_kind"]), step_sequence=r["step_sequence"],
             request_payload=msgspec.json.decode(r["request_payload"]), created_at=T0,
             updated_at=T0, state=StepState.COMPLETED,
             response_payload=msgspec.json.decode(r["response_payload"]))
        for r in rows
    ]  # fmt: skip
    output, _ = assemble_output(chain)
    done = [(d["output_index"], d["item"]) for _, e, d in first + rest if e == "response.output_item.done"]  # fmt: skip
    assert done == list(enumerate(output))


def test_a_chain_that_ended_skips_what_never_completed() -> None:
    events = ChainEvents(HEAD, {"id": f"resp_{HEAD}"})
    rows = [
        row(1, "model_call", "completed", {}, MODEL_REPLY),
        row(2, "tool_call", "failed", {"name": "get_weather", "call_id": "call_1"}),
        row(3, "model_call", "completed", {}, None),  # its payload never projected
    ]
    parse(events.steps(rows, final=True))
    assert events.next_step == 4
    [(sse_id, kind, data)] = parse(events.ended(Ended("completed", b'{"id":"x"}')))
    assert (sse_id, kind, data["response"]) == ("4", "response.completed", {"id": "x"})


def test_a_failed_chain_ends_with_response_failed() -> None:
    events = ChainEvents(HEAD, {"id": f"resp_{HEAD}", "object": "response"})
    payload = {"type": "loop_error", "message": "response loop exceeded max_response_iterations cap"}  # fmt: skip
    envelope = NonRetriableHttpStatus(status=500, body=msgspec.json.encode(payload).decode())
    [(_, kind, data)] = parse(events.ended(Ended("failed", envelope.to_json().encode())))
    assert kind == "response.failed"
    assert data["response"]["status"] == "failed"
    assert data["response"]["error"] == payload | {"code": "server_error"}
    assert "error" not in data  # the SDK raises on a top-level error; the event carries it inside


async def test_a_stream_whose_chain_failed_keeps_what_streamed() -> None:
    pool = FakePool()
    pool.steps = [row(1, "model_call", "completed", {}, MODEL_REPLY)]
    pool.chain_failed({"type": "executor_error", "message": "executor error: boom"})
    async with serve("http://127.0.0.1:9", pool, FakePublisher()) as sdk:
        async with sdk.responses.stream(model="m", input="weather?", tools=TOOLS) as stream:
            events = [event async for event in stream]
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.output_text == "checking"
    assert [item.type for item in failed.response.output] == ["message", "function_call"]
    assert failed.response.error is not None
    assert (failed.response.error.code, failed.response.error.message) == (
        "server_error", "executor error: boom",
    )  # fmt: skip


@pytest.mark.parametrize(
    "rounds",
    [
        [["call_0"], ["call_0"]],  # an upstream that counts from call_0 every round
        [[None, None]],  # calls without an id
    ],
)
async def test_every_tool_call_of_a_chain_has_an_id_of_its_own(
    rounds: list[list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = Loop()
    for ids in rounds:
        [model] = loop.record(loop.evaluate())
        loop.finish(model, completion(calls=[tool_call(call_id) for call_id in ids]))
        for tool in loop.record(loop.evaluate()):
            loop.finish(tool, {"temp_c": 18})
    [model] = loop.record(loop.evaluate())
    loop.finish(model, completion("done"))
    # What the last model call was sent: each tool message answers the call named before it.
    messages = loop.chain[-1].request_payload["messages"]
    called = [c.get("id") for m in messages if m["role"] == "assistant" for c in m["tool_calls"]]
    answered = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert answered == called and len(set(called)) == len(called)
    outcome = loop.evaluate()
    assert isinstance(outcome, Complete)
    head = conclude(outcome, HEAD, loop.chain, PARENT, created_at=1, completed_at=2)
    assert isinstance(head, HeadCompleted)
    pool = FakePool()
    pool.steps = [_row_of(step) for step in loop.chain]
    pool.head = {"state": "completed", "body": head.body.encode()}
    # The response the handler starts is the chain above.
    monkeypatch.setattr(api_responses, "uuid", SimpleNamespace(uuid4=lambda: HEAD))
    async with serve("http://127.0.0.1:9", pool, FakePublisher()) as sdk:
        async with sdk.responses.stream(model="m", input="weather?", tools=TOOLS) as stream:
            final = await stream.get_final_response()
    calls = [i.call_id for i in final.output if i.type == "function_call"]
    outputs = [i.call_id for i in final.output if i.type == "function_call_output"]
    assert calls == outputs == called


def _row_of(step: Step) -> dict[str, Any]:
    """A step as the read model lists it."""
    return row(step.step_sequence, step.step_kind.value, step.state.value, step.request_payload,
               step.response_payload) | {"id": step.id}  # fmt: skip
