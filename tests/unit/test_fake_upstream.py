import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from cannonade.testing.fake_upstream import FakeUpstream, start_fake_upstream

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
    session: aiohttp.ClientSession, upstream: FakeUpstream, request_id: str, x_fake: dict
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
