"""Parsing `/v1/responses` bodies (§2.3–§2.5) and server-side tools as configuration (§2.2)."""

from __future__ import annotations

import tomllib
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cannonade.config import Config
from streams.responses.inputs import (
    InputError,
    ParentRequest,
    input_items_to_messages,
    normalize_tools,
    parse_parent,
)
from streams.responses.tools import (
    ToolConfig,
    ToolKind,
    inject_tools,
    resolve_tools,
    resolved_tool_names,
    tool_call_request,
)


def input_error(body: Any) -> str:
    with pytest.raises(InputError) as info:
        parse_parent(body)
    return str(info.value)


def items_error(items: list[Any]) -> str:
    with pytest.raises(InputError) as info:
        input_items_to_messages(items)
    return str(info.value)


# --- §2.3 the parent body --------------------------------------------------------------------


def test_string_input_is_one_user_message() -> None:
    parent = parse_parent(b'{"model":"llama","input":"hi"}')
    assert parent == ParentRequest(
        model="llama", messages=[{"role": "user", "content": "hi"}], stream=False, tools=None
    )


def test_messages_are_used_verbatim_when_there_is_no_input() -> None:
    messages = [{"role": "system", "content": "be brief", "name": "x"}, {"role": "user"}]
    assert parse_parent({"model": "m", "messages": messages}).messages == messages


def test_input_wins_over_messages() -> None:
    parent = parse_parent({"model": "m", "input": "a", "messages": [{"role": "user"}]})
    assert parent.messages == [{"role": "user", "content": "a"}]


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"input": "hi"}, "parent body missing 'model'"),
        ({"model": 7, "input": "hi"}, "parent body missing 'model'"),
        ({"model": None, "input": "hi"}, "parent body missing 'model'"),
        ([1, 2], "parent body missing 'model'"),
        ({"model": "m"}, "parent body missing 'input' or 'messages'"),
        ({"model": "m", "messages": "hi"}, "parent body missing 'input' or 'messages'"),
        ({"model": "m", "input": 3}, "'input' must be string or array"),
        ({"model": "m", "input": {"role": "user"}}, "'input' must be string or array"),
        ({"model": "m", "input": None}, "'input' must be string or array"),
    ],
)
def test_unusable_bodies_are_rejected_with_the_spec_texts(body: Any, text: str) -> None:
    assert input_error(body) == text


def test_rejections_are_intake_400s_in_the_openai_envelope() -> None:
    with pytest.raises(InputError) as info:
        parse_parent(b'{"model":"m","input":42}')
    error = info.value.api_error()
    assert error.status == 400
    assert error.envelope()["error"]["message"] == "'input' must be string or array"
    assert error.envelope()["error"]["type"] == "invalid_request_error"


def test_invalid_json_is_an_input_error() -> None:
    assert input_error(b'{"model":').startswith("parent body is not valid JSON")


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("true", False)])
def test_stream_is_read_as_a_strict_boolean(value: Any, expected: bool) -> None:
    assert parse_parent({"model": "m", "input": "x", "stream": value}).stream is expected
    assert parse_parent({"model": "m", "input": "x"}).stream is False


def test_tools_are_normalised_and_absence_is_remembered() -> None:
    parent = parse_parent({"model": "m", "input": "x", "tools": [{"name": "f"}]})
    assert parent.tools == [{"type": "function", "function": {"name": "f"}}]
    assert parse_parent({"model": "m", "input": "x"}).tools is None


def test_fields_only_echoed_on_the_response_are_kept() -> None:
    parent = parse_parent(
        {
            "model": "m",
            "input": "x",
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "background": True,
        }
    )
    assert (parent.tool_choice, parent.parallel_tool_calls, parent.background) == (
        "required",
        False,
        True,
    )


# --- §2.4 input items → chat messages --------------------------------------------------------


def test_message_items_keep_every_key_but_type() -> None:
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"role": "system", "content": "sys", "name": "n"},  # type defaults to message
    ]
    assert input_items_to_messages(items) == [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"role": "system", "content": "sys", "name": "n"},
    ]


def test_message_errors_name_the_item_index() -> None:
    assert items_error([{"role": "user"}, "hello"]) == (
        "input[1]: 'message' item must be a JSON object"
    )
    assert items_error([{"type": "message", "content": "x"}]) == (
        "input[0]: 'message' item missing 'role'"
    )
    assert items_error([{"role": 5}]) == "input[0]: 'message' item missing 'role'"


def test_a_non_string_type_reads_as_a_message() -> None:
    assert input_items_to_messages([{"type": 3, "role": "user", "content": "x"}]) == [
        {"role": "user", "content": "x"}
    ]


def test_function_call_errors() -> None:
    assert items_error([{"type": "function_call", "name": "f"}]) == (
        "input[0]: 'function_call' missing 'call_id'"
    )
    assert items_error([{"role": "user"}, {"type": "function_call", "call_id": "c"}]) == (
        "input[1]: 'function_call' missing 'name'"
    )
    assert items_error([{"type": "function_call"}]) == (
        "input[0]: 'function_call' missing 'call_id'"
    )
    assert items_error([{"type": "function_call_output", "output": "x"}]) == (
        "input[0]: 'function_call_output' missing 'call_id'"
    )


def call(call_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "f", **extra}


@pytest.mark.parametrize(
    ("arguments", "sent"),
    [
        ('{"a": 1}', '{"a": 1}'),
        ("not json at all", "not json at all"),
        (None, "{}"),
        ({"a": [1, 2]}, '{"a":[1,2]}'),
        (5, "5"),
    ],
)
def test_function_call_arguments_become_a_string(arguments: Any, sent: str) -> None:
    messages = input_items_to_messages([call("c1", arguments=arguments)])
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == sent


def test_absent_arguments_are_an_empty_object() -> None:
    messages = input_items_to_messages([call("c1")])
    assert messages == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ]


def test_consecutive_calls_collapse_into_one_assistant_turn() -> None:
    messages = input_items_to_messages(
        [{"role": "user", "content": "q"}, call("c1"), call("c2"), call("c3")]
    )
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2", "c3"]


def test_assistant_text_absorbs_the_calls_that_follow_it() -> None:
    messages = input_items_to_messages(
        [{"role": "assistant", "content": "let me check"}, {"type": "reasoning"}, call("c1")]
    )
    assert messages == [
        {
            "role": "assistant",
            "content": "let me check",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ]


def test_a_call_after_a_tool_result_starts_a_new_assistant_turn() -> None:
    messages = input_items_to_messages(
        [
            call("c1"),
            {"type": "function_call_output", "call_id": "c1", "output": "18"},
            call("c2"),
        ]
    )
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"][0]["id"] == "c2"


@pytest.mark.parametrize(
    ("output", "content"),
    [("sunny", "sunny"), (None, ""), ({"temp_c": 18}, '{"temp_c":18}'), ([1], "[1]")],
)
def test_function_call_outputs_become_tool_messages(output: Any, content: str) -> None:
    item: dict[str, Any] = {"type": "function_call_output", "call_id": "c1"}
    if output is not None:
        item["output"] = output
    assert input_items_to_messages([item]) == [
        {"role": "tool", "tool_call_id": "c1", "content": content}
    ]


def test_reasoning_and_unknown_items_are_dropped() -> None:
    items = [
        {"type": "reasoning", "summary": []},
        {"type": "web_search_call", "id": "ws"},
        {"role": "user", "content": "x"},
    ]
    assert input_items_to_messages(items) == [{"role": "user", "content": "x"}]
    assert input_items_to_messages([]) == []


def test_the_input_document_is_not_modified() -> None:
    items = [{"role": "assistant", "content": "a", "type": "message"}, call("c1")]
    snapshot = msgspec.json.encode(items)
    input_items_to_messages(items)
    assert msgspec.json.encode(items) == snapshot


_items = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"])}),
        st.builds(call, st.sampled_from(["a", "b"])),
        st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.just("a")}),
        st.just({"type": "reasoning"}),
    ),
    max_size=10,
)


@given(_items)
def test_every_call_lands_exactly_once_on_an_assistant_message(items: list[Any]) -> None:
    messages = input_items_to_messages(items)
    sent_calls = [c for m in messages for c in m.get("tool_calls", [])]
    assert len(sent_calls) == sum(1 for i in items if i.get("type") == "function_call")
    for m in messages:
        if "tool_calls" in m:
            assert m["role"] == "assistant"
    # Two assistant turns are never adjacent when the second one only carries calls.
    for before, after in zip(messages, messages[1:], strict=False):
        assert not (before["role"] == "assistant" and after.get("content", "") is None)


# --- §2.5 tools ------------------------------------------------------------------------------


def test_tool_normalisation() -> None:
    chat_style = {"type": "function", "function": {"name": "a"}}
    web = {"type": "web_search"}
    assert normalize_tools(
        [
            chat_style,
            {"type": "function", "name": "b", "parameters": {"type": "object"}},
            {"name": "c", "description": "d"},
            web,
            {"function": {"name": "e"}},
        ]
    ) == [
        chat_style,
        {"type": "function", "function": {"name": "b", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "c", "description": "d"}},
        web,
        {"function": {"name": "e"}},
    ]
    assert normalize_tools({"not": "a list"}) == {"not": "a list"}
    assert normalize_tools(None) is None


# --- §2.2 server-side tools ------------------------------------------------------------------

CONFIG = """
[tools.get_weather]
description = "Current weather for a city"
url = "http://tools.internal/weather"
api_key = "secret-weather-key"
timeout_secs = 5
models = ["llama", "qwen"]
users = ["alice"]

[tools.calculator]
description = "Arithmetic"
url = "http://tools.internal/calc"
parameters = {type = "object", properties = {expr = {type = "string"}}}
models = ["llama"]
users = ["alice", "bob"]

[tools.researcher]
description = "Sub-agent"
url = "http://tools.internal/research"
kind = "agent"
models = ["qwen"]
users = ["alice"]
"""


def tools() -> dict[str, ToolConfig]:
    """The `[tools]` tables as the service's configuration reads them."""
    return msgspec.convert(tomllib.loads(CONFIG), Config).tools


def test_configuration_tables_load_with_defaults() -> None:
    loaded = tools()
    weather, calc = loaded["get_weather"], loaded["calculator"]
    assert weather.parameters == {"type": "object"}
    assert weather.kind is ToolKind.HTTP
    assert weather.timeout_secs == 5
    assert calc.parameters["properties"] == {"expr": {"type": "string"}}
    assert calc.api_key is None
    assert loaded["researcher"].kind is ToolKind.AGENT


def test_a_misspelt_option_is_a_configuration_error() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(
            {"tools": {"t": {"description": "d", "url": "u", "model": ["llama"]}}}, Config
        )


def test_tool_keys_stay_out_of_reprs() -> None:
    assert "secret-weather-key" not in repr(tools()["get_weather"])
    assert "secret-weather-key" not in repr(tools())


def test_a_tool_resolves_only_when_model_and_user_are_both_listed() -> None:
    assert resolved_tool_names(tools(), "llama", "alice") == {"get_weather", "calculator"}
    assert resolved_tool_names(tools(), "llama", "bob") == {"calculator"}
    assert resolved_tool_names(tools(), "qwen", "bob") == frozenset()
    assert resolved_tool_names(tools(), "mistral", "alice") == frozenset()
    assert list(resolve_tools(tools(), "qwen", "alice")) == ["get_weather", "researcher"]


def test_injection_adds_resolved_tools_sorted_by_name() -> None:
    body = {"model": "llama", "input": "weather in Paris?"}
    injected = inject_tools(body, resolve_tools(tools(), "llama", "alice"))
    assert injected["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Arithmetic",
                "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}},
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {"type": "object"},
            },
        },
    ]
    assert "tools" not in body  # the caller's document is untouched
    # The injected body runs the loop, with tools a chat model understands.
    assert parse_parent(injected).tools == injected["tools"]


@pytest.mark.parametrize("own", [[{"type": "function", "name": "mine"}], [], None])
def test_a_body_naming_its_own_tools_is_left_alone(own: Any) -> None:
    body = {"model": "llama", "input": "x", "tools": own}
    assert inject_tools(body, resolve_tools(tools(), "llama", "alice")) == body
    # …but resolution still decides what would be dispatched server-side.
    assert "get_weather" in resolved_tool_names(tools(), "llama", "alice")


def test_nothing_is_injected_when_no_tool_resolves() -> None:
    body = {"model": "mistral", "input": "x"}
    assert inject_tools(body, resolve_tools(tools(), "mistral", "alice")) == body


def test_tool_call_request_posts_args_with_the_configured_key() -> None:
    request = tool_call_request(tools()["get_weather"], {"city": "Paris"})
    assert request.url == "http://tools.internal/weather"
    assert request.headers["Authorization"] == "Bearer secret-weather-key"
    assert msgspec.json.decode(request.body) == {"city": "Paris"}
    assert request.timeout_secs == 5

    keyless = tool_call_request(tools()["calculator"], {})
    assert "Authorization" not in keyless.headers
    assert keyless.timeout_secs == 30
