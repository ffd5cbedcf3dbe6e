import asyncio
import sys
import time
import urllib.error
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cannonade.testing.fake_tools import FakeTools, FakeToolsControl, ToolReply, start_fake_tools

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def tools() -> AsyncIterator[FakeTools]:
    fake = await start_fake_tools()
    yield fake
    await fake.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def call(
    session: aiohttp.ClientSession,
    url: str,
    name: str,
    args: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """Like the engine: the args as JSON, optionally with a Bearer key."""
    async with session.post(f"{url}/tools/{name}", json=args, headers=headers) as response:
        return response.status, response.content_type, await response.text()


async def test_default_reply_echoes_and_the_call_is_recorded(
    tools: FakeTools, session: aiohttp.ClientSession
) -> None:
    answer = await call(
        session, tools.url, "weather", {"city": "Oslo"}, {"Authorization": "Bearer tk-1"}
    )

    assert answer == (200, "application/json", '{"tool":"weather","args":{"city":"Oslo"}}')
    [record] = tools.received()
    assert record.path == "/tools/weather"
    assert record.headers["authorization"] == "Bearer tk-1"
    assert record.body == {"city": "Oslo"}
    assert record.status == 200 and record.script is None
    assert record.at == pytest.approx(time.time(), abs=5)
    stats = tools.stats()
    assert stats.tools["weather"].calls == 1
    assert stats.tools["weather"].statuses == {200: 1}


async def test_scripted_replies_are_consumed_in_order_then_echo(
    tools: FakeTools, session: aiohttp.ClientSession
) -> None:
    tools.script(
        ToolReply(result={"temp": 21}),
        ToolReply(text="sunny, not JSON"),
        ToolReply(status=500, text="tool broke"),
        ToolReply(result=None),
        tool="weather",
    )

    answers = [await call(session, tools.url, "weather", {"n": n}) for n in range(5)]

    assert answers == [
        (200, "application/json", '{"temp":21}'),
        (200, "text/plain", "sunny, not JSON"),
        (500, "text/plain", "tool broke"),
        (200, "application/json", "null"),
        (200, "application/json", '{"tool":"weather","args":{"n":4}}'),
    ]
    assert tools.stats().tools["weather"].statuses == {200: 4, 500: 1}


async def test_scripts_match_tool_and_marker_and_can_repeat(
    tools: FakeTools, session: aiohttp.ClientSession
) -> None:
    tools.script(ToolReply(result="for tok-1"), marker="tok-1", repeat=True)
    tools.script(ToolReply(status=404, result={"error": "gone"}), tool="search")

    marked = [await call(session, tools.url, name, {"q": "tok-1"}) for name in ("a", "b", "a")]
    searched = await call(session, tools.url, "search", {"q": "other"})
    unmatched = await call(session, tools.url, "a", {"q": "other"})

    assert [answer[2] for answer in marked] == ['"for tok-1"'] * 3
    assert searched[:1] == (404,) and searched[2] == '{"error":"gone"}'
    assert unmatched[2] == '{"tool":"a","args":{"q":"other"}}'
    assert [r.path for r in tools.received(marker="tok-1")] == ["/tools/a", "/tools/b", "/tools/a"]
    assert [r.body for r in tools.received(tool="a")] == [{"q": "tok-1"}] * 2 + [{"q": "other"}]


async def test_non_json_args_are_recorded_as_text(
    tools: FakeTools, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{tools.url}/tools/raw", data=b"not json") as response:
        assert response.status == 200
        echoed = await response.json()

    assert echoed == {"tool": "raw", "args": "not json"}
    assert tools.received(tool="raw")[0].body == "not json"


async def test_latency_and_max_in_flight(tools: FakeTools, session: aiohttp.ClientSession) -> None:
    tools.script(ToolReply(latency_ms=200), tool="slow", repeat=True)

    started = time.monotonic()
    await asyncio.gather(*(call(session, tools.url, "slow", {}) for _ in range(5)))
    elapsed = time.monotonic() - started

    assert elapsed >= 0.2
    stats = tools.stats()
    assert stats.tools["slow"].max_in_flight == 5
    assert stats.max_in_flight == 5
    assert stats.in_flight == 0


async def test_hang_holds_the_call_until_the_client_times_out(tools: FakeTools) -> None:
    tools.script(ToolReply(hang=True), tool="stuck")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await call(session, tools.url, "stuck", {})

    await _until(lambda: tools.stats().in_flight == 0)
    [record] = tools.received(tool="stuck")
    assert record.status is None


async def test_control_client_scripts_reads_back_and_resets(
    tools: FakeTools, session: aiohttp.ClientSession
) -> None:
    control = FakeToolsControl(tools.url)

    script_id = await asyncio.to_thread(
        control.script, {"result": [1, 2]}, ToolReply(text="second"), tool="calc"
    )
    first = await call(session, tools.url, "calc", {"x": "tok-c"}, {"Authorization": "Bearer k"})
    second = await call(session, tools.url, "calc", {"x": "tok-c"})
    received = await asyncio.to_thread(control.received, tool="calc", marker="tok-c")
    stats = await asyncio.to_thread(control.stats)
    with pytest.raises(urllib.error.HTTPError) as rejected:
        await asyncio.to_thread(control.script, {"reslt": 1})
    await asyncio.to_thread(control.record, False)
    await call(session, tools.url, "calc", {})

    assert (first[2], second[2]) == ("[1,2]", "second")
    assert [(r.script, r.headers.get("authorization")) for r in received] == [
        (script_id, "Bearer k"),
        (script_id, None),
    ]
    assert stats.tools["calc"].calls == 2
    assert rejected.value.code == 400
    assert len(tools.received()) == 2  # the last call came with recording off

    await asyncio.to_thread(control.reset)

    assert tools.received() == [] and tools.stats().tools == {}
    await call(session, tools.url, "calc", {})
    assert len(tools.received()) == 1  # reset turns recording back on


async def test_runs_as_a_module_and_announces_its_url() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cannonade.testing.fake_tools",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        async with aiohttp.ClientSession() as session:
            answer = await call(session, line.removeprefix("listening on "), "t", [1])
        assert answer[2] == '{"tool":"t","args":[1]}'
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 2 s")
