"""A fake tool server on loopback, for step-chain tests.

The engine calls a server-side tool by POSTing the call's args as JSON to the tool's url, with
`Authorization: Bearer <api_key>` when the tool has a key (responses spec §2.9). Here every tool
lives at `POST /tools/<name>` and answers `{"tool": <name>, "args": <args>}` unless scripted.

`POST /_script` with `{"replies": [<reply>...], "tool"?, "marker"?, "repeat"?}` queues replies
for calls to `tool` whose raw body contains the substring `marker` (each filter optional). A
reply has:

- `result`: any JSON (null included), answered as `application/json`;
- `text`: answered as `text/plain`, so the engine sees a non-JSON result;
- `status` (default 200): the answer's status; the body is `text`, else `result`, else the echo;
- `latency_ms`: wait before answering; `hang`: never answer (for timeout tests).

Scripts are tried in registration order; each matching call takes the next reply, and a script
is dropped once used up, unless `repeat` keeps answering with its last reply. The answer is
`{"id": "script-N"}`.

`GET /_received[?tool=&marker=]` lists the calls received (path, headers with lowercased names,
body, arrival time, answering script and status), oldest first, at most the latest 10 000.
Recording is on by default; `POST /_record` `{"enabled": bool}` sets it. `GET /_stats` reports
`{"tools": {<name>: {"calls", "in_flight", "max_in_flight", "statuses", "seconds_at"}},
"in_flight", "max_in_flight", "seconds_at"}` (`seconds_at`: the seconds spent with each number
of calls in flight, from the first call to the last change). `POST /_reset` clears stats,
scripts and calls and turns recording back on.

`FakeToolsControl(url)` drives these endpoints from synchronous tests.

Run: `python -m cannonade.testing.fake_tools --port 8090`.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web

from cannonade.testing.fake_upstream import (
    CallStats,
    ControlClient,
    Gauge,
    LoopbackServer,
    ReceivedRequest,
    Recorder,
    ScriptBook,
    body_contains,
    in_flight,
    json_response,
    post_record,
    serve_until_signalled,
)


class ToolReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    result: Any = msgspec.UNSET  # UNSET, not None: null is a result a test may want
    text: str | None = None
    status: int = 200
    latency_ms: float = 0
    hang: bool = False


class ToolScript(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    replies: list[ToolReply]
    tool: str | None = None
    marker: str | None = None
    repeat: bool = False


class ToolsStats(Gauge):
    tools: dict[str, CallStats] = {}


class FakeTools(LoopbackServer):
    def __init__(self) -> None:
        super().__init__(web.Application())
        self._stats = ToolsStats()
        self._scripts: ScriptBook[ToolReply] = ScriptBook()
        self._recorder = Recorder(enabled=True)
        self.app.router.add_post("/tools/{name}", self._call)
        self.app.router.add_get("/_stats", self._get_stats)
        self.app.router.add_post("/_reset", self._post_reset)
        self.app.router.add_post("/_script", self._post_script)
        self.app.router.add_post("/_record", self._post_record)
        self.app.router.add_get("/_received", self._get_received)

    def stats(self) -> ToolsStats:
        """A snapshot, safe to keep while calls continue."""
        return msgspec.convert(msgspec.to_builtins(self._stats), ToolsStats)

    def reset(self) -> None:
        self._stats = ToolsStats()
        self._scripts.clear()
        self._recorder.reset()

    def script(
        self,
        *replies: ToolReply,
        tool: str | None = None,
        marker: str | None = None,
        repeat: bool = False,
    ) -> str:
        """Queues replies for matching calls (see the module docstring); returns the id."""
        script_id = self._scripts.add(replies, key=tool, marker=marker, repeat=repeat)
        self._recorder.enabled = True
        return script_id

    def record(self, enabled: bool = True) -> None:
        self._recorder.enabled = enabled

    def received(
        self, *, tool: str | None = None, marker: str | None = None
    ) -> list[ReceivedRequest]:
        path = None if tool is None else f"/tools/{tool}"
        return self._recorder.select(
            lambda record: (path is None or record.path == path) and body_contains(record, marker)
        )

    async def _call(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        raw = await request.read()
        args: Any
        try:
            args = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            args = raw.decode(errors="replace")
        scripted = self._scripts.take(name, request.path, raw) if self._scripts else None
        script_id, reply = (None, ToolReply()) if scripted is None else scripted
        record = self._recorder.add(request, args, script_id) if self._recorder.enabled else None
        per_tool = self._stats.tools.setdefault(name, CallStats())
        per_tool.calls += 1
        with in_flight(per_tool, self._stats):
            if reply.hang:
                await asyncio.Event().wait()
            if reply.latency_ms:
                await asyncio.sleep(reply.latency_ms / 1000)
            response = _answer(name, args, reply)
            per_tool.count(response.status)
            if record is not None:
                record.status = response.status
            return response

    async def _get_stats(self, _: web.Request) -> web.Response:
        return json_response(200, self._stats)

    async def _post_reset(self, _: web.Request) -> web.Response:
        self.reset()
        return web.Response(status=204)

    async def _post_script(self, request: web.Request) -> web.Response:
        try:
            script = msgspec.json.decode(await request.read(), type=ToolScript)
            script_id = self.script(
                *script.replies, tool=script.tool, marker=script.marker, repeat=script.repeat
            )
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            return json_response(400, {"error": {"message": f"invalid script: {exc}"}})
        return json_response(201, {"id": script_id})

    async def _post_record(self, request: web.Request) -> web.Response:
        return await post_record(request, self._recorder)

    async def _get_received(self, request: web.Request) -> web.Response:
        query = request.query
        return json_response(200, self.received(tool=query.get("tool"), marker=query.get("marker")))


async def start_fake_tools(host: str = "127.0.0.1", port: int = 0) -> FakeTools:
    tools = FakeTools()
    await tools.start(host, port)
    return tools


def _answer(name: str, args: Any, reply: ToolReply) -> web.Response:
    if reply.text is not None:
        return web.Response(status=reply.status, text=reply.text)
    result = {"tool": name, "args": args} if reply.result is msgspec.UNSET else reply.result
    return json_response(reply.status, result)


class FakeToolsControl(ControlClient):
    def script(
        self,
        *replies: ToolReply | Mapping[str, Any],
        tool: str | None = None,
        marker: str | None = None,
        repeat: bool = False,
    ) -> str:
        document = {"replies": list(replies), "repeat": repeat}
        filters = {"tool": tool, "marker": marker}
        return self._script(document | {k: v for k, v in filters.items() if v is not None})

    def received(
        self, *, tool: str | None = None, marker: str | None = None
    ) -> list[ReceivedRequest]:
        return self._received({"tool": tool, "marker": marker})

    def stats(self) -> ToolsStats:
        return msgspec.json.decode(self._call("GET", "/_stats"), type=ToolsStats)


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake tool server on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    asyncio.run(serve_until_signalled(FakeTools(), args.host, args.port))


if __name__ == "__main__":
    main()
