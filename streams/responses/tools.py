"""Server-side tools as configuration, their resolution and their injection (§2.2).

Configured as `[tools.<name>]` tables. A tool resolves for a request when both the request's
model and the key owner are listed; resolution alone decides dispatch, whether or not the
tool's definition was injected into the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import msgspec


class ToolKind(StrEnum):
    HTTP = "http"
    AGENT = "agent"


def _object_schema() -> dict[str, Any]:
    return {"type": "object"}


class ToolConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[tools.<name>]` table; the name is the table key."""

    description: str
    url: str
    parameters: dict[str, Any] = msgspec.field(default_factory=_object_schema)
    api_key: str | None = None
    timeout_secs: float = 30.0
    kind: ToolKind = ToolKind.HTTP
    # Empty lists resolve for nobody: a tool is opt-in per model and per user.
    models: tuple[str, ...] = ()
    users: tuple[str, ...] = ()

    def __repr__(self) -> str:
        # The key is a credential for the tool's service; keep it out of logs and tracebacks.
        key = "set" if self.api_key else "none"
        return f"ToolConfig(url={self.url!r}, kind={self.kind.value}, api_key={key})"

    def resolves_for(self, model: str, user: str) -> bool:
        return model in self.models and user in self.users


class ToolHttpRequest(msgspec.Struct, frozen=True):
    """What a tool-call executor POSTs (§2.9): `args` as JSON, Bearer key when configured."""

    url: str
    headers: dict[str, str]
    body: bytes
    timeout_secs: float


def resolve_tools(tools: Mapping[str, ToolConfig], model: str, user: str) -> dict[str, ToolConfig]:
    """The tools available to (model, key owner), sorted by name."""
    return {name: tools[name] for name in sorted(tools) if tools[name].resolves_for(model, user)}


def resolved_tool_names(tools: Mapping[str, ToolConfig], model: str, user: str) -> frozenset[str]:
    return frozenset(resolve_tools(tools, model, user))


def tool_definitions(resolved: Mapping[str, ToolConfig]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": resolved[name].description,
                "parameters": resolved[name].parameters,
            },
        }
        for name in sorted(resolved)
    ]


def inject_tools(body: dict[str, Any], resolved: Mapping[str, ToolConfig]) -> dict[str, Any]:
    """`body` with the resolved tools as `tools`, if it has no `tools` key and any resolve.

    A body that names its own tools (even `[]` or null) is the caller's choice and is left
    alone; the input is never mutated.
    """
    if "tools" in body or not resolved:
        return body
    return {**body, "tools": tool_definitions(resolved)}


def tool_call_request(tool: ToolConfig, args: Any) -> ToolHttpRequest:
    headers = {"Content-Type": "application/json"}
    if tool.api_key:
        headers["Authorization"] = f"Bearer {tool.api_key}"
    return ToolHttpRequest(
        url=tool.url,
        headers=headers,
        body=msgspec.json.encode(args),
        timeout_secs=tool.timeout_secs,
    )
