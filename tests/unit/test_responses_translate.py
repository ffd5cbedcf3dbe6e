"""Single-step Responses ↔ Chat Completions translation (§7.8) and the §8.8 id override."""

from __future__ import annotations

from typing import Any

import msgspec
import pydantic
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from streams.execution.outcome import override_response_id
from streams.responses.inputs import InputError
from streams.responses.translate import (
    chat_to_responses,
    responses_to_chat,
    responses_tools,
    responses_usage,
    status_from_choices,
)

REQUEST_ID = "3c9a4f1e-7b2d-4e8a-9c6f-1d2e3f4a5b6c"


def chat(
    content: str | None = "Hello!",
    finish_reason: str | None = "stop",
    calls: list[Any] | None = None,
    **message_extra: Any,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, **message_extra}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1_717_000_000,
        "model": "llama-3.1-8b-instruct-upstream-name",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 4,
            "total_tokens": 16,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
    }


# --- request ---------------------------------------------------------------------------------


def test_request_translation_forwards_the_documented_parameters() -> None:
    body = {
        "model": "llama",
        "instructions": "Answer in French.",
        "input": "Hi",
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "max_output_tokens": 64,
        "user": "u-1",
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        # Not chat parameters: never forwarded.
        "background": False,
        "service_tier": "flex",
        "store": True,
        "metadata": {"k": "v"},
        "previous_response_id": "resp_x",
    }
    assert responses_to_chat(body) == {
        "model": "llama",
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hi"},
        ],
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "max_tokens": 64,
        "user": "u-1",
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
    }


def test_streaming_asks_the_upstream_for_usage() -> None:
    sent = responses_to_chat({"model": "m", "input": "x", "stream": True})
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    quiet = responses_to_chat({"model": "m", "input": "x", "stream": False})
    assert quiet["stream"] is False
    assert "stream_options" not in quiet


def test_array_input_goes_through_the_item_rules() -> None:
    sent = responses_to_chat(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18"},
            ],
        }
    )
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "c1", "content": "18"}


def test_no_system_message_without_instructions() -> None:
    for instructions in (None, ""):
        sent = responses_to_chat({"model": "m", "input": "x", "instructions": instructions})
        assert sent["messages"] == [{"role": "user", "content": "x"}]


def test_a_responses_style_function_choice_is_sent_in_chat_form() -> None:
    sent = responses_to_chat(
        {"model": "m", "input": "x", "tool_choice": {"type": "function", "name": "f"}}
    )
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    nested = {"type": "function", "function": {"name": "f"}}
    assert responses_to_chat({"model": "m", "input": "x", "tool_choice": nested})[
        "tool_choice"
    ] == (nested)


def test_unusable_input_is_refused() -> None:
    with pytest.raises(InputError, match="'input' must be string or array"):
        responses_to_chat({"model": "m", "input": 5})


# --- response --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finish_reason", "status"),
    [
        ("stop", "completed"),
        ("length", "incomplete"),
        ("tool_calls", "requires_action"),
        ("content_filter", "failed"),
        ("function_call", "completed"),
        (None, "completed"),
    ],
)
def test_status_follows_the_first_finish_reason(finish_reason: str | None, status: str) -> None:
    assert status_from_choices(chat(finish_reason=finish_reason)["choices"]) == status


def test_no_choices_is_a_failed_response() -> None:
    assert status_from_choices([]) == "failed"
    assert status_from_choices(None) == "failed"
    response = chat_to_responses({"id": "c", "created": 5, "choices": []}, {"model": "m"})
    assert response["status"] == "failed"
    assert response["output"] == []
    assert response["completed_at"] is None


def test_a_plain_answer() -> None:
    response = chat_to_responses(chat(), {"model": "llama", "input": "Hi"})

    assert response["id"] == "chatcmpl-abc"
    assert response["object"] == "response"
    assert response["created_at"] == 1_717_000_000
    assert response["completed_at"] == 1_717_000_000
    assert response["status"] == "completed"
    assert response["model"] == "llama"  # the requested name, not the upstream's
    assert response["background"] is False
    assert response["service_tier"] == "default"
    [item] = response["output"]
    assert item["type"] == "message"
    assert item["role"] == "assistant"
    assert item["status"] == "completed"
    assert item["content"] == [{"type": "output_text", "text": "Hello!", "annotations": []}]
    assert response["usage"] == {
        "input_tokens": 12,
        "output_tokens": 4,
        "total_tokens": 16,
        "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 2},
    }

    parsed = Response.model_validate(response)
    assert parsed.output_text == "Hello!"
    assert parsed.usage is not None and parsed.usage.input_tokens_details.cached_tokens == 8


def test_reasoning_message_and_calls_become_items_in_that_order() -> None:
    upstream = chat(
        content="Checking.",
        finish_reason="stop",
        calls=[
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"a":1}'}},
            {"id": "c2", "type": "function", "function": {"name": "v", "arguments": {"b": 2}}},
        ],
        reasoning_content="The user wants weather.",
    )
    output = chat_to_responses(upstream, {"model": "m"})["output"]
    assert [i["type"] for i in output] == ["reasoning", "message", "function_call", "function_call"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "The user wants weather."}]
    assert [(i["call_id"], i["name"], i["arguments"]) for i in output[2:]] == [
        ("c1", "w", '{"a":1}'),
        ("c2", "v", '{"b":2}'),
    ]
    assert len({i["id"] for i in output}) == 4
    Response.model_validate(chat_to_responses(upstream, {"model": "m"}))


def test_reasoning_under_its_newer_name_and_empty_content_is_no_message() -> None:
    output = chat_to_responses(chat(content="", reasoning="thinking"), {"model": "m"})["output"]
    assert [i["type"] for i in output] == ["reasoning"]
    assert chat_to_responses(chat(content=None), {"model": "m"})["output"] == []


def test_a_tool_calling_turn_requires_action() -> None:
    upstream = chat(
        content=None,
        finish_reason="tool_calls",
        calls=[{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
    )
    response = chat_to_responses(upstream, {"model": "m"})
    assert response["status"] == "requires_action"
    assert response["completed_at"] is None
    # `requires_action` is the spec's status but not one the SDK's strict type lists; the SDK's
    # client parses leniently, and nothing else about the object is out of shape.
    with pytest.raises(pydantic.ValidationError) as info:
        Response.model_validate(response)
    assert [e["loc"] for e in info.value.errors()] == [("status",)]


def test_a_truncated_answer_is_incomplete() -> None:
    response = chat_to_responses(chat(finish_reason="length"), {"model": "m"})
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
    assert Response.model_validate(response).status == "incomplete"


def test_request_parameters_are_echoed() -> None:
    request = {
        "model": "m",
        "instructions": "be brief",
        "max_output_tokens": 50,
        "temperature": 0.1,
        "top_p": 0.5,
        "user": "u",
        "metadata": {"team": "a"},
        "tools": [{"type": "function", "function": {"name": "f", "description": "d"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
    }
    response = chat_to_responses(chat(), request)
    assert {k: response[k] for k in request if k != "model"} == {
        "instructions": "be brief",
        "max_output_tokens": 50,
        "temperature": 0.1,
        "top_p": 0.5,
        "user": "u",
        "metadata": {"team": "a"},
        "tools": [
            {
                "type": "function",
                "name": "f",
                "description": "d",
                "parameters": None,
                "strict": None,
            }
        ],
        "tool_choice": {"type": "function", "name": "f"},
        "parallel_tool_calls": False,
    }
    parsed = Response.model_validate(response)
    assert parsed.instructions == "be brief"
    assert parsed.max_output_tokens == 50


def test_defaults_when_the_request_names_nothing() -> None:
    response = chat_to_responses(chat(), {"model": "m"})
    assert response["tools"] == []
    assert response["tool_choice"] == "auto"
    assert response["parallel_tool_calls"] is True
    assert response["metadata"] == {}


def test_upstream_service_tier_is_kept() -> None:
    assert chat_to_responses({**chat(), "service_tier": "flex"}, {})["service_tier"] == "flex"


def test_a_chat_body_without_created_uses_the_given_time() -> None:
    upstream = {k: v for k, v in chat().items() if k != "created"}
    response = chat_to_responses(upstream, {"model": "m"}, created_at=42)
    assert response["created_at"] == response["completed_at"] == 42


def test_translation_is_deterministic() -> None:
    assert chat_to_responses(chat(), {"model": "m"}) == chat_to_responses(chat(), {"model": "m"})


def test_usage_conversion_from_either_style() -> None:
    assert responses_usage({"prompt_tokens": 3, "completion_tokens": 2}) == {
        "input_tokens": 3,
        "output_tokens": 2,
        "total_tokens": 5,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    native = {
        "input_tokens": 9,
        "output_tokens": 1,
        "total_tokens": 10,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 1},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    assert responses_usage(native) == native
    assert responses_usage(None) is None
    assert responses_usage("n/a") is None


def test_non_function_tools_are_echoed_unchanged() -> None:
    assert responses_tools([{"type": "web_search"}, {"name": "f"}]) == [
        {"type": "web_search"},
        {"type": "function", "name": "f", "description": None, "parameters": None, "strict": None},
    ]
    assert responses_tools(None) == []


# --- §8.8 id override on translated and chat bodies ------------------------------------------


def test_the_stored_and_returned_id_is_resp_of_the_request() -> None:
    translated = msgspec.json.encode(chat_to_responses(chat(), {"model": "m"})).decode()
    stored = override_response_id(translated, REQUEST_ID, "/v1/responses")
    response = Response.model_validate_json(stored)
    assert response.id == f"resp_{REQUEST_ID}"

    chat_body = override_response_id(
        msgspec.json.encode(chat()).decode(), REQUEST_ID, "/v1/chat/completions"
    )
    completion = ChatCompletion.model_validate_json(chat_body)
    assert completion.id == f"resp_{REQUEST_ID}"
    assert completion.choices[0].message.content == "Hello!"


def test_a_refusal_is_kept_as_the_message_s_refusal_part() -> None:
    response = chat_to_responses(chat(None, refusal="I can't help with that."), {"model": "m"})
    [message] = response["output"]
    assert message["content"] == [{"type": "refusal", "refusal": "I can't help with that."}]
    parsed = Response.model_validate(response)
    assert parsed.status == "completed" and parsed.output_text == ""
    assert parsed.output[0].content[0].type == "refusal"  # type: ignore[union-attr, index]


def test_calls_without_an_id_or_with_a_repeated_one_are_named_apart() -> None:
    def call(call_id: str | None) -> dict[str, Any]:
        return {"id": call_id, "type": "function", "function": {"name": "w", "arguments": "{}"}}

    upstream = chat(
        content=None,
        finish_reason="tool_calls",
        calls=[call(None), call(None), call("call_0"), call("call_0"), call("call_0_1")],
    )
    response = chat_to_responses(upstream, {"model": "m"})
    ids = [item["call_id"] for item in response["output"]]
    # The SDK's own function-call outputs name the call they answer: each must name one.
    assert ids == ["call_0_0", "call_0_1", "call_0", "call_0_3", "call_0_4"]
    assert chat_to_responses(upstream, {"model": "m"}) == response  # a replay names them alike
