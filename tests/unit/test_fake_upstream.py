import asyncio
import json
import sys
import time
import urllib.error
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import make_mocked_request

from cannonade.testing.fake_upstream import (
    FakeReply,
    FakeUpstream,
    FakeUpstreamControl,
    Recorder,
    ToolCallSpec,
    UsageSpec,
    start_fake_upstream,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await start_fake_upstream()
    yield fake
    await fake.close()


@pytest.fixture
async def sdk(upstream: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{upstream.url}/v1", api_key="sk-fake", max_retries=0)
    yield client
    await client.close()


async def test_sdk_parses_chat_completion(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "hello there"}]
    )

    assert completion.object == "chat.completion"
    assert completion.model == "gpt-fake"
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo: hello there"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 3


async def test_sdk_parses_requested_tool_calls(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": "weather?"}],
        extra_body={"x_fake": {"tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]}},
    )

    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}


async def test_sdk_parses_embeddings_in_both_encodings(sdk: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 unless told otherwise.
    default = await sdk.embeddings.create(model="embed-fake", input=["alpha", "beta"])
    as_floats = await sdk.embeddings.create(
        model="embed-fake", input=["alpha"], encoding_format="float"
    )

    assert [item.index for item in default.data] == [0, 1]
    alpha, beta = (item.embedding for item in default.data)
    assert len(alpha) == len(beta) == 8
    assert alpha != beta
    assert as_floats.data[0].embedding == pytest.approx(alpha)
    assert default.usage.prompt_tokens == 2


async def test_sdk_parses_responses_object(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="gpt-fake", input="ping")

    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == "echo: ping"


async def test_sdk_sees_injected_status_as_openai_error(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as raised:
        await sdk.chat.completions.create(
            model="gpt-fake",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"x_fake": {"status": 429}},
        )

    assert raised.value.status_code == 429
    assert raised.value.type == "rate_limit_error"


async def post(
    session: aiohttp.ClientSession, upstream: FakeUpstream, request_id: str, x_fake: dict[str, Any]
) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "x_fake": x_fake}
    headers = {"X-Fusillade-Request-Id": request_id}
    async with session.post(
        f"{upstream.url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        await response.read()
        return response.status


async def test_fail_times_fails_the_first_attempts_of_each_request_id(
    upstream: FakeUpstream,
) -> None:
    controls = {"fail_times": 2, "fail_status": 503}
    async with aiohttp.ClientSession() as session:
        first = [await post(session, upstream, "req-a", controls) for _ in range(3)]
        other = await post(session, upstream, "req-b", controls)

    assert first == [503, 503, 200]
    assert other == 503
    stats = upstream.stats()
    assert stats.models["m"].statuses == {503: 3, 200: 1}
    assert [call.request_id for call in stats.calls] == ["req-a"] * 3 + ["req-b"]
    assert stats.calls[0].at <= stats.calls[1].at <= stats.calls[2].at


async def test_max_in_flight_is_recorded_per_model_under_concurrency(
    upstream: FakeUpstream,
) -> None:
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(post(session, upstream, f"r{i}", {"latency_ms": 200}) for i in range(20))
        )
        for i in range(3):
            await post(session, upstream, f"s{i}", {})

    stats = upstream.stats()
    assert stats.models["m"].max_in_flight == 20
    assert stats.models["m"].in_flight == 0
    assert stats.models["m"].calls == 23
    assert stats.max_in_flight == 20


async def test_time_at_each_level_shows_whether_the_upstream_was_kept_full(
    upstream: FakeUpstream,
) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(3):  # one at a time: never two in flight
            await post(session, upstream, f"one-{i}", {"latency_ms": 60})
    alone = upstream.stats()
    assert set(alone.seconds_at) <= {0, 1}
    assert alone.seconds_at[1] >= 3 * 0.06  # each call held at least its latency
    assert alone.models["m"].seconds_at == alone.seconds_at

    upstream.reset()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(post(session, upstream, f"r{i}", {"latency_ms": 300}) for i in range(4))
        )
    together = upstream.stats()
    assert max(together.seconds_at) == 4 == together.max_in_flight
    assert together.seconds_at[4] > 0
    assert sum(together.seconds_at.values()) >= 0.3  # first arrival to last answer


async def test_stats_endpoint_and_reset(upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        await post(session, upstream, "r1", {"status": 500})
        async with session.get(f"{upstream.url}/_stats") as response:
            stats = await response.json()
        async with session.post(f"{upstream.url}/_reset") as response:
            assert response.status == 204

    assert stats["models"]["m"]["statuses"] == {"500": 1}
    assert stats["models"]["m"]["calls"] == 1
    assert stats["calls"][0]["request_id"] == "r1"
    assert upstream.stats().calls == []
    assert upstream.stats().models == {}


async def test_server_wide_latency_delays_every_answer() -> None:
    fake = await start_fake_upstream(latency_ms=150)
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            assert await post(session, fake, "r1", {}) == 200
            elapsed = time.monotonic() - started
            assert await post(session, fake, "r2", {"latency_ms": 0}) == 200
    finally:
        await fake.close()

    assert elapsed >= 0.15


async def test_runs_as_a_module_and_announces_its_url() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cannonade.testing.fake_upstream",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/v1/embeddings", json={"model": "e", "input": "x"}
            ) as response:
                assert response.status == 200
                assert (await response.json())["object"] == "list"
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0


# Streaming, as the official SDK consumes it.


async def test_sdk_streams_chat_content_deltas_and_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": "a longer question"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    pieces = [c.choices[0].delta.content for c in chunks if c.choices]
    assert len([piece for piece in pieces if piece]) > 1
    assert "".join(piece or "" for piece in pieces) == "echo: a longer question"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_sdk_streams_scripted_tool_call_deltas(
    upstream: FakeUpstream, sdk: openai.AsyncOpenAI
) -> None:
    upstream.script(
        FakeReply(
            content="Looking up.",
            tool_calls=[
                ToolCallSpec("weather", {"city": "Oslo"}, id="call_1"),
                ToolCallSpec("time", '{"zone": "CET"}', id="call_2"),
            ],
        ),
        marker="tok-stream-tools",
    )

    async with sdk.chat.completions.stream(
        model="gpt-fake", messages=[{"role": "user", "content": "tok-stream-tools"}]
    ) as stream:
        deltas = [
            call
            async for event in stream
            if event.type == "chunk" and event.chunk.choices
            for call in event.chunk.choices[0].delta.tool_calls or []
        ]
        final = await stream.get_final_completion()

    # Like OpenAI: the id and name open each call, its arguments follow in pieces.
    opening = [(d.index, d.id, d.function and d.function.name) for d in deltas if d.id]
    assert opening == [(0, "call_1", "weather"), (1, "call_2", "time")]
    assert len([d for d in deltas if d.index == 0 and d.id is None]) > 1
    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Looking up."
    assert _calls(choice.message.tool_calls) == [
        ("call_1", "weather", {"city": "Oslo"}),
        ("call_2", "time", {"zone": "CET"}),
    ]


async def test_sdk_streams_responses_events(sdk: openai.AsyncOpenAI) -> None:
    async with sdk.responses.stream(model="gpt-fake", input="stream me please") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()

    types = [event.type for event in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1
    assert "".join(deltas) == final.output_text == "echo: stream me please"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 4


async def test_sdk_streams_scripted_responses_function_calls(
    upstream: FakeUpstream, sdk: openai.AsyncOpenAI
) -> None:
    upstream.script(
        FakeReply(tool_calls=[ToolCallSpec("lookup", {"q": "cannonade"}, id="call_9")]),
        path="/v1/responses",
    )

    stream = await sdk.responses.create(model="gpt-fake", input="find it", stream=True)
    events = [event async for event in stream]

    arguments = "".join(
        event.delta for event in events if event.type == "response.function_call_arguments.delta"
    )
    assert json.loads(arguments) == {"q": "cannonade"}
    completed = events[-1]
    assert completed.type == "response.completed"
    [item] = completed.response.output
    assert item.type == "function_call"
    assert (item.call_id, item.name, item.arguments) == ("call_9", "lookup", arguments)


async def test_stream_error_reaches_the_sdk_on_every_endpoint(
    upstream: FakeUpstream, sdk: openai.AsyncOpenAI
) -> None:
    upstream.script(FakeReply(stream_error=503), repeat=True)

    chat = await sdk.chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    responses = await sdk.responses.create(model="gpt-fake", input="hi", stream=True)

    for stream in (chat, responses):
        with pytest.raises(openai.APIError, match="injected stream error"):
            async for _ in stream:
                pass


# Scripts: per-request replies for calls that carry no x_fake (step chains).


def chat_body(text: str, model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def chat(
    session: aiohttp.ClientSession, upstream: FakeUpstream, body: dict[str, Any]
) -> tuple[int, Any]:
    async with session.post(f"{upstream.url}/v1/chat/completions", json=body) as response:
        return response.status, await response.json()


async def test_script_answers_a_chain_in_order_then_falls_back(upstream: FakeUpstream) -> None:
    upstream.script(
        FakeReply(tool_calls=[ToolCallSpec("lookup", {"q": "x"}, id="call_a")]),
        FakeReply(content="final answer", usage=UsageSpec(prompt_tokens=7, completion_tokens=2)),
        marker="tok-chain",
    )
    follow_up = {"role": "tool", "tool_call_id": "call_a", "content": "{}"}

    async with aiohttp.ClientSession() as session:
        other = await chat(session, upstream, chat_body("no marker here"))
        first = await chat(session, upstream, chat_body("please tok-chain"))
        second_body = chat_body("please tok-chain")
        second_body["messages"] += [first[1]["choices"][0]["message"], follow_up]
        second = await chat(session, upstream, second_body)
        after = await chat(session, upstream, chat_body("again tok-chain"))

    assert other[1]["choices"][0]["message"]["content"] == "echo: no marker here"
    [choice] = first[1]["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["id"] == "call_a"
    assert second[1]["choices"][0]["message"]["content"] == "final answer"
    assert second[1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert after[1]["choices"][0]["message"]["content"] == "echo: again tok-chain"
    assert [r.script for r in upstream.received(marker="tok-chain")] == [
        "script-1",
        "script-1",
        None,
    ]


async def test_script_filters_by_model_and_path_and_repeats_its_last_reply(
    upstream: FakeUpstream,
) -> None:
    upstream.script(
        FakeReply(content="once"),
        FakeReply(tool_calls=[ToolCallSpec("loop")]),
        model="looper",
        path="/v1/chat/completions",
        repeat=True,
    )

    async with aiohttp.ClientSession() as session:
        replies = [await chat(session, upstream, chat_body("hi", "looper")) for _ in range(4)]
        other_model = await chat(session, upstream, chat_body("hi", "m"))
        async with session.post(
            f"{upstream.url}/v1/responses", json={"model": "looper", "input": "hi"}
        ) as response:
            other_path = await response.json()

    messages = [body["choices"][0]["message"] for _, body in replies]
    assert messages[0]["content"] == "once"
    assert all(m["tool_calls"][0]["function"]["name"] == "loop" for m in messages[1:])
    assert len({m["tool_calls"][0]["id"] for m in messages[1:]}) == 3
    assert other_model[1]["choices"][0]["message"]["content"] == "echo: hi"
    assert other_path["output"][0]["content"][0]["text"] == "echo: hi"


async def test_scripted_status_latency_and_finish_reason(upstream: FakeUpstream) -> None:
    upstream.script(
        FakeReply(status=503, message="overloaded", latency_ms=150),
        FakeReply(finish_reason="length", content="cut"),
        FakeReply(finish_reason="length", content="cut"),
        model="steer",
    )

    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        failed = await chat(session, upstream, chat_body("hi", "steer"))
        elapsed = time.monotonic() - started
        cut = await chat(session, upstream, chat_body("hi", "steer"))
        async with session.post(
            f"{upstream.url}/v1/responses", json={"model": "steer", "input": "hi"}
        ) as response:
            incomplete = await response.json()

    assert elapsed >= 0.15
    assert failed == (503, {"error": failed[1]["error"]})
    assert failed[1]["error"]["message"] == "overloaded"
    assert cut[1]["choices"][0]["finish_reason"] == "length"
    assert incomplete["status"] == "incomplete"
    assert incomplete["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_scripted_reply_can_answer_json_to_a_streaming_request(
    upstream: FakeUpstream,
) -> None:
    upstream.script(FakeReply(content="plain", stream=False), marker="tok-nostream")

    async with aiohttp.ClientSession() as session:
        status, body = await chat(session, upstream, chat_body("tok-nostream", stream=True))

    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "plain"


async def test_scripted_hang_holds_the_call_until_the_client_leaves(
    upstream: FakeUpstream,
) -> None:
    upstream.script(FakeReply(hang=True), marker="tok-hang")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await chat(session, upstream, chat_body("tok-hang"))

    await _until(lambda: upstream.stats().in_flight == 0)
    [record] = upstream.received(marker="tok-hang")
    assert record.status is None


async def test_concurrent_requests_each_take_their_own_reply(upstream: FakeUpstream) -> None:
    upstream.script(*(FakeReply(content=f"r{i}") for i in range(10)), model="many")

    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(
            *(chat(session, upstream, chat_body("hi", "many")) for _ in range(10))
        )

    contents = {body["choices"][0]["message"]["content"] for _, body in answers}
    assert contents == {f"r{i}" for i in range(10)}


async def test_received_records_only_when_enabled_and_filters(upstream: FakeUpstream) -> None:
    headers = {"Authorization": "Bearer sk-1", "X-Fusillade-Request-Id": "rid-1"}
    async with aiohttp.ClientSession() as session:
        await chat(session, upstream, chat_body("before recording"))
        upstream.record()
        async with session.post(
            f"{upstream.url}/v1/chat/completions", json=chat_body("tok-a", "m1"), headers=headers
        ):
            pass
        await chat(session, upstream, chat_body("tok-b", "m2", x_fake={"status": 429}))
        async with session.post(
            f"{upstream.url}/v1/embeddings", json={"model": "m1", "input": "tok-b"}
        ):
            pass

    everything = upstream.received()
    assert [r.body.get("model") for r in everything] == ["m1", "m2", "m1"]
    first = everything[0]
    assert first.path == "/v1/chat/completions"
    assert first.headers["authorization"] == "Bearer sk-1"
    assert first.headers["x-fusillade-request-id"] == "rid-1"
    assert first.body == chat_body("tok-a", "m1")
    assert first.status == 200 and first.script is None
    assert everything[1].body["x_fake"] == {"status": 429} and everything[1].status == 429
    assert everything[0].at <= everything[1].at <= everything[2].at
    assert [r.body["model"] for r in upstream.received(marker="tok-b")] == ["m2", "m1"]
    assert [r.path for r in upstream.received(model="m1", marker="tok-b")] == ["/v1/embeddings"]
    assert len(upstream.received(path="/v1/chat/completions")) == 2

    upstream.reset()

    assert upstream.received() == []
    async with aiohttp.ClientSession() as session:
        await chat(session, upstream, chat_body("after reset"))
    assert upstream.received() == []  # reset turns recording off again


def test_recording_keeps_only_the_latest_requests() -> None:
    recorder = Recorder(enabled=True, limit=2)
    for index in range(3):
        recorder.add(make_mocked_request("POST", f"/p{index}"), {}, None)

    assert [record.path for record in recorder.select(lambda _: True)] == ["/p1", "/p2"]


async def test_control_client_drives_the_http_endpoints(upstream: FakeUpstream) -> None:
    control = FakeUpstreamControl(upstream.url)

    script_id = await asyncio.to_thread(
        control.script,
        {"tool_calls": [{"name": "lookup", "arguments": {"q": 1}}]},
        FakeReply(content="done"),
        marker="tok-control",
    )
    async with aiohttp.ClientSession() as session:
        first = await chat(session, upstream, chat_body("tok-control"))
        second = await chat(session, upstream, chat_body("tok-control"))
    received = await asyncio.to_thread(control.received, marker="tok-control")
    stats = await asyncio.to_thread(control.stats)
    with pytest.raises(urllib.error.HTTPError) as rejected:
        await asyncio.to_thread(control.script, {"contnet": "typo"})
    await asyncio.to_thread(control.reset)

    assert first[1]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert second[1]["choices"][0]["message"]["content"] == "done"
    assert [(r.script, r.status) for r in received] == [(script_id, 200), (script_id, 200)]
    assert stats.models["m"].calls == 2
    assert rejected.value.code == 400
    assert upstream.received() == [] and upstream.stats().calls == []

    await asyncio.to_thread(control.record)
    async with aiohttp.ClientSession() as session:
        await chat(session, upstream, chat_body("recorded"))
    await asyncio.to_thread(control.record, False)
    async with aiohttp.ClientSession() as session:
        await chat(session, upstream, chat_body("not recorded"))
    assert [r.body["messages"][0]["content"] for r in upstream.received()] == ["recorded"]


def _calls(tool_calls: Any) -> list[tuple[str, str, Any]]:
    return [
        (call.id, call.function.name, json.loads(call.function.arguments)) for call in tool_calls
    ]


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 2 s")
