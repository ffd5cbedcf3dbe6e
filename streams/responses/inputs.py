"""Reading a `/v1/responses` body: the parent request (§2.3), input items (§2.4), tools (§2.5).

**Deviation** (accepted): the §2.3/§2.4 errors are raised at intake and answered with 400
(§8.6), so a stored body always parses; the chain agent re-parses it on every evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from schemas.errors import ApiError, invalid_request


class InputError(ValueError):
    """A body the Responses API rejects; `str(error)` is the spec's text."""

    def api_error(self) -> ApiError:
        return invalid_request(str(self))


class ParentRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a multi-step chain uses of the parent body.

    Only `model`, `messages`, `stream` and `tools` reach model calls (Q6); the other fields
    are echoed on the assembled Responses object.
    """

    model: str
    messages: list[Any]
    stream: bool = False
    tools: Any = None  # normalised (§2.5); None when the body has no `tools` key
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    background: bool = False


def decode_body(body: bytes | str) -> Any:
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InputError(f"parent body is not valid JSON: {exc}") from None


def parse_parent(body: bytes | str | dict[str, Any]) -> ParentRequest:
    """§2.3. Accepts the raw body or an already-decoded document."""
    document = decode_body(body) if isinstance(body, bytes | str) else body
    if not isinstance(document, dict) or not isinstance(document.get("model"), str):
        raise InputError("parent body missing 'model'")
    messages = initial_messages(document)
    tools = normalize_tools(document["tools"]) if "tools" in document else None
    parallel = document.get("parallel_tool_calls")
    return ParentRequest(
        model=document["model"],
        messages=messages,
        stream=_flag(document.get("stream")),
        tools=tools,
        tool_choice=document.get("tool_choice", "auto"),
        parallel_tool_calls=parallel if isinstance(parallel, bool) else True,
        background=_flag(document.get("background")),
    )


def initial_messages(document: dict[str, Any]) -> list[Any]:
    """`input` string or array, else a `messages` array verbatim (§2.3)."""
    if "input" in document:
        value = document["input"]
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if isinstance(value, list):
            return input_items_to_messages(value)
        raise InputError("'input' must be string or array")
    messages = document.get("messages")
    if isinstance(messages, list):
        return list(messages)
    raise InputError("parent body missing 'input' or 'messages'")


def input_items_to_messages(items: Sequence[Any]) -> list[dict[str, Any]]:
    """§2.4: Responses input items as chat messages, in order."""
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        kind = item.get("type") if isinstance(item, dict) else None
        # A non-string `type` reads as absent, as the reference's `as_str().unwrap_or(...)`.
        kind = kind if isinstance(kind, str) else "message"
        if kind == "message":
            messages.append(_message(index, item))
        elif kind == "function_call":
            _append_call(messages, _function_call(index, item))
        elif kind == "function_call_output":
            messages.append(_function_call_output(index, item))
        # `reasoning` and unknown types carry nothing a chat model accepts: dropped.
    return messages


def _message(index: int, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InputError(f"input[{index}]: 'message' item must be a JSON object")
    if not isinstance(item.get("role"), str):
        raise InputError(f"input[{index}]: 'message' item missing 'role'")
    return {key: value for key, value in item.items() if key != "type"}


def _function_call(index: int, item: dict[str, Any]) -> dict[str, Any]:
    for field in ("call_id", "name"):
        if not isinstance(item.get(field), str):
            raise InputError(f"input[{index}]: 'function_call' missing '{field}'")
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": _text(item.get("arguments"), "{}")},
    }


def _append_call(messages: list[dict[str, Any]], call: dict[str, Any]) -> None:
    # Consecutive calls, and calls right after assistant text, belong to one assistant turn.
    previous = messages[-1] if messages else None
    if previous is not None and previous.get("role") == "assistant":
        calls = previous.get("tool_calls")
        previous["tool_calls"] = [*calls, call] if isinstance(calls, list) else [call]
        return
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _function_call_output(index: int, item: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(item.get("call_id"), str):
        raise InputError(f"input[{index}]: 'function_call_output' missing 'call_id'")
    return {
        "role": "tool",
        "tool_call_id": item["call_id"],
        "content": _text(item.get("output"), ""),
    }


def _text(value: Any, when_absent: str) -> str:
    """Strings as they are, absent/null as `when_absent`, other JSON compactly serialised."""
    if value is None:
        return when_absent
    if isinstance(value, str):
        return value
    return compact_json(value)


def compact_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else False


def normalize_tools(tools: Any) -> Any:
    """§2.5: flat function tools become chat-style `{"type":"function","function":{…}}`."""
    if not isinstance(tools, list):
        return tools
    return [_normalize_tool(tool) for tool in tools]


def _normalize_tool(tool: Any) -> Any:
    if not isinstance(tool, dict) or "function" in tool:
        return tool
    if "type" not in tool or tool["type"] == "function":
        return {
            "type": "function",
            "function": {key: value for key, value in tool.items() if key != "type"},
        }
    return tool
