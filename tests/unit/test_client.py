import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime

import msgspec
import pytest

from cannonade.testing.fake_upstream import FakeUpstream, start_fake_upstream
from streams.execution.client import (
    AiohttpTransport,
    Timeouts,
    TransportError,
    TransportTimeout,
    UpstreamCall,
    UpstreamClient,
    UpstreamRequest,
    UpstreamResponse,
    batch_header_values,
    format_timestamp,
    stream_outcome,
)
from streams.execution.failure import (
    NetworkError,
    NonRetriableHttpStatus,
    RequestBuilderError,
    RetriableHttpStatus,
    Timeout,
)
from streams.execution.outcome import Failure, RetryPolicy, Success

REQUEST_ID = "0b9d2f0e-5f7a-4d43-9d1b-3c3f1f3b2a10"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


class ScriptedTransport:
    """Records what would go on the wire and answers from a script."""

    def __init__(self, answer: UpstreamResponse | Exception | None = None) -> None:
        self.answer = answer or UpstreamResponse(200, '{"ok":true}')
        self.sent: list[tuple[UpstreamRequest, Timeouts]] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        self.sent.append((request, timeouts))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class HangingTransport(ScriptedTransport):
    async def send(self, request: UpstreamRequest, timeouts: Timeouts) -> UpstreamResponse:
        self.sent.append((request, timeouts))
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")


def call(**overrides: object) -> UpstreamCall:
    fields: dict[str, object] = {
        "request_id": REQUEST_ID,
        "endpoint": "https://upstream.example",
        "path": "/v1/chat/completions",
        "method": "POST",
        "body": BODY,
        "api_key": "sk-test",
    }
    return UpstreamCall(**(fields | overrides))  # type: ignore[arg-type]


async def test_batch_call_sends_url_headers_and_body_exactly() -> None:
    transport = ScriptedTransport()
    batch = call(
        custom_id="line-7",
        batch_headers={"id": "batch-1", "completion_window": "24h"},
    )

    outcome = await UpstreamClient(transport).execute(batch)

    assert outcome == Success(200, '{"ok":true}')
    [(request, timeouts)] = transport.sent
    assert request.method == "POST"
    assert request.url == "https://upstream.example/v1/chat/completions"
    assert request.headers == {
        "Authorization": "Bearer sk-test",
        "X-Fusillade-Request-Id": REQUEST_ID,
        "x-fusillade-batch-id": "batch-1",
        "x-fusillade-batch-completion-window": "24h",
        "X-Fusillade-Custom-Id": "line-7",
        "Content-Type": "application/json",
    }
    assert request.body == BODY
    assert request.stream is False
    assert timeouts == Timeouts(first_chunk_ms=540_000, chunk_ms=540_000, body_ms=60_000)


async def test_no_authorization_without_key_and_no_body_for_get_or_empty_body() -> None:
    transport = ScriptedTransport()
    client = UpstreamClient(transport)

    await client.execute(call(api_key="", method="GET"))
    await client.execute(call(api_key="", body=b""))

    for request, _ in transport.sent:
        assert request.headers == {"X-Fusillade-Request-Id": REQUEST_ID}
        assert request.body is None


async def test_streaming_call_is_flagged_to_upstream() -> None:
    transport = ScriptedTransport()

    await UpstreamClient(transport).execute(call(stream=True))

    [(request, _)] = transport.sent
    assert request.stream is True
    assert request.headers["X-Fusillade-Stream"] == "true"


def test_batch_header_values_format_known_fields_and_fall_back_to_metadata() -> None:
    created = datetime(2025, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    batch: dict[str, str | int | datetime | dict[str, str] | None] = {
        "id": "b1",
        "created_at": created,
        "total_requests": 12,
        "metadata": {"team": "search"},
        "output_file_id": None,
    }
    metadata = {"team": "search", "output_file_id": "from-metadata", "cost_center": 7}

    values = batch_header_values(
        ["id", "created_at", "total_requests", "metadata", "output_file_id", "team", "cost_center"],
        batch,
        metadata,
    )

    assert values == {
        "id": "b1",
        "created_at": "2025-01-02T03:04:05.000006Z",
        "total_requests": "12",
        "metadata": '{"team":"search"}',
        "output_file_id": "from-metadata",
        "team": "search",
    }
    assert format_timestamp(datetime(2025, 1, 2, tzinfo=UTC)) == "2025-01-02T00:00:00.000000Z"


@pytest.mark.parametrize(
    "overrides",
    [
        {"custom_id": "line\r\nX-Injected: 1"},
        {"custom_id": "delete\x7f"},
        {"batch_headers": {"bad field": "x"}},
        {"endpoint": "not a url"},
        {"endpoint": "ftp://upstream.example"},
        {"method": "PO ST"},
    ],
)
async def test_unbuildable_request_fails_for_good_without_calling_upstream(
    overrides: dict[str, object],
) -> None:
    transport = ScriptedTransport()

    outcome = await UpstreamClient(transport).execute(call(**overrides))

    assert isinstance(outcome, Failure)
    assert isinstance(outcome.reason, RequestBuilderError)
    assert not outcome.reason.retriable
    assert transport.sent == []


async def test_tabs_and_non_ascii_text_are_valid_header_values() -> None:
    transport = ScriptedTransport()

    await UpstreamClient(transport).execute(call(custom_id="caf\u00e9\tline 1"))

    request, _ = transport.sent[0]
    assert request.headers["X-Fusillade-Custom-Id"] == "caf\u00e9\tline 1"


async def test_transport_timeout_becomes_timeout_envelope() -> None:
    transport = ScriptedTransport(TransportTimeout("no first event within 5ms"))

    outcome = await UpstreamClient(transport).execute(call())

    assert isinstance(outcome, Failure)
    assert outcome.reason.to_json() == (
        '{"type":"Timeout","details":{"error":"no first event within 5ms"}}'
    )


async def test_transport_error_becomes_network_error_with_message_and_sources() -> None:
    transport = ScriptedTransport(TransportError("connection reset", ["os error 104"]))

    outcome = await UpstreamClient(transport).execute(call())

    assert outcome == Failure(NetworkError.of("connection reset", ["os error 104"]))
    assert isinstance(outcome.reason, NetworkError)
    assert msgspec.json.decode(outcome.reason.error) == {
        "message": "connection reset",
        "sources": ["os error 104"],
    }


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Success(200, "b")),
        (500, Failure(RetriableHttpStatus(500, "b"))),
        (429, Failure(RetriableHttpStatus(429, "b"))),
        (499, Failure(RetriableHttpStatus(499, "b"))),
        (400, Failure(NonRetriableHttpStatus(400, "b"))),
    ],
)
async def test_statuses_are_classified(status: int, expected: object) -> None:
    outcome = await UpstreamClient(ScriptedTransport(UpstreamResponse(status, "b"))).execute(call())

    assert outcome == expected


async def test_retry_policy_is_applied_to_statuses() -> None:
    client = UpstreamClient(
        ScriptedTransport(UpstreamResponse(499, "b")), RetryPolicy(additional_retryable_statuses=())
    )

    assert await client.execute(call()) == Failure(NonRetriableHttpStatus(499, "b"))


async def test_cancelling_execute_propagates_and_aborts_the_transport_call() -> None:
    transport = HangingTransport()
    task = asyncio.create_task(UpstreamClient(transport).execute(call()))
    await transport.started.wait()

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.cancelled.is_set()


def test_stream_error_event_decides_status_and_body() -> None:
    error = '{"error":{"message":"slow down","code":429}}'

    assert stream_outcome(200, ['{"a":1}', error, "[DONE]"]) == (429, error)
    odd = '{"error":{"message":"x","code":"rate_limited"}}'
    assert stream_outcome(200, [odd]) == (500, odd)
    assert stream_outcome(200, ['{"error":{"code":200}}']) == (500, '{"error":{"code":200}}')


def test_failed_stream_joins_its_non_empty_data() -> None:
    assert stream_outcome(503, ["overloaded", "", "retry later", "[DONE]"]) == (
        503,
        "overloaded\nretry later",
    )


def test_chat_stream_reassembles_into_a_chat_completion() -> None:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    deltas = [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get", "arguments": '{"a"'},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
    ]
    chunks = [head | {"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append(head | {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    chunks.append(head | {"choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 5}})
    events = [msgspec.json.encode(c).decode() for c in chunks] + ["[DONE]"]

    status, body = stream_outcome(200, events)

    assert status == 200
    assert msgspec.json.decode(body) == {
        "id": "c1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get", "arguments": '{"a":1}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 3, "total_tokens": 5},
    }
    # A blank metadata chunk first (Azure OpenAI's prompt filter results) changes nothing.
    opening = '{"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[]}'
    assert stream_outcome(200, [opening, *events]) == (status, body)


def test_unrecognised_successful_stream_keeps_its_data() -> None:
    assert stream_outcome(200, ["hello", "world"]) == (200, "hello\nworld")


def test_a_stream_nested_deeper_than_the_decoder_goes_is_kept_as_data() -> None:
    deep = "[" * 5000 + "]" * 5000
    assert stream_outcome(200, [deep]) == (200, deep)
    assert stream_outcome(200, ['{"error":' + deep + "}"]) == (200, '{"error":' + deep + "}")


# Through the real transport, against the fake upstream on loopback.


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await start_fake_upstream()
    yield fake
    await fake.close()


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    async with AiohttpTransport() as transport:
        yield transport


def fake_call(
    upstream: FakeUpstream, x_fake: Mapping[str, object], **overrides: object
) -> UpstreamCall:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "x_fake": x_fake}
    return call(endpoint=upstream.url, body=msgspec.json.encode(body), **overrides)


async def test_aiohttp_transport_classifies_real_answers(
    upstream: FakeUpstream, transport: AiohttpTransport
) -> None:
    client = UpstreamClient(transport)

    ok = await client.execute(fake_call(upstream, {}))
    bad = await client.execute(fake_call(upstream, {"status": 400}))
    down = await client.execute(fake_call(upstream, {"status": 500}))

    assert isinstance(ok, Success) and ok.status == 200
    assert msgspec.json.decode(ok.body)["choices"][0]["message"]["content"] == "echo: hi"
    assert isinstance(bad, Failure) and isinstance(bad.reason, NonRetriableHttpStatus)
    assert bad.reason.status == 400
    assert msgspec.json.decode(bad.reason.body)["error"]["type"] == "invalid_request_error"
    assert isinstance(down, Failure) and isinstance(down.reason, RetriableHttpStatus)
    assert down.reason.status == 500
    assert [c.request_id for c in upstream.stats().calls] == [REQUEST_ID] * 3


async def test_aiohttp_transport_times_out_a_hanging_upstream_and_hangs_up(
    upstream: FakeUpstream, transport: AiohttpTransport
) -> None:
    client = UpstreamClient(transport, timeouts=Timeouts(first_chunk_ms=50, body_ms=50))

    outcome = await client.execute(fake_call(upstream, {"hang": True}))

    assert isinstance(outcome, Failure) and isinstance(outcome.reason, Timeout)
    assert "100ms" in outcome.reason.error
    await _until(lambda: upstream.stats().in_flight == 0)


async def test_aiohttp_transport_unreachable_upstream_is_network_error(
    transport: AiohttpTransport,
) -> None:
    outcome = await UpstreamClient(transport).execute(call(endpoint="http://127.0.0.1:9"))

    assert isinstance(outcome, Failure) and isinstance(outcome.reason, NetworkError)
    described = msgspec.json.decode(outcome.reason.error)
    assert "127.0.0.1:9" in described["message"]
    assert described["sources"]


async def test_aiohttp_streaming_reassembles_the_same_completion(
    upstream: FakeUpstream, transport: AiohttpTransport
) -> None:
    client = UpstreamClient(transport)
    tools = {"tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]}

    plain = await client.execute(fake_call(upstream, tools))
    streamed = await client.execute(fake_call(upstream, tools, stream=True))

    assert isinstance(plain, Success) and isinstance(streamed, Success)
    plain_body, streamed_body = msgspec.json.decode(plain.body), msgspec.json.decode(streamed.body)
    assert streamed_body["object"] == "chat.completion"
    assert streamed_body["usage"] == plain_body["usage"]
    assert streamed_body["choices"][0]["finish_reason"] == "tool_calls"
    [plain_call] = plain_body["choices"][0]["message"]["tool_calls"]
    [streamed_call] = streamed_body["choices"][0]["message"]["tool_calls"]
    assert (
        streamed_call["function"]
        == plain_call["function"]
        == {
            "name": "lookup",
            "arguments": '{"q":"x"}',
        }
    )


async def test_aiohttp_streaming_error_event_and_stall(
    upstream: FakeUpstream, transport: AiohttpTransport
) -> None:
    client = UpstreamClient(transport, timeouts=Timeouts(first_chunk_ms=2000, chunk_ms=50))

    embedded = await client.execute(fake_call(upstream, {"stream_error": 429}, stream=True))
    stalled = await client.execute(fake_call(upstream, {"chunk_delay_ms": 500}, stream=True))
    rejected = await client.execute(fake_call(upstream, {"status": 401}, stream=True))

    assert isinstance(embedded, Failure) and isinstance(embedded.reason, RetriableHttpStatus)
    assert embedded.reason.status == 429
    assert msgspec.json.decode(embedded.reason.body)["error"]["code"] == 429
    assert isinstance(stalled, Failure) and isinstance(stalled.reason, Timeout)
    assert "stalled" in stalled.reason.error
    assert isinstance(rejected, Failure) and isinstance(rejected.reason, NonRetriableHttpStatus)
    assert msgspec.json.decode(rejected.reason.body)["error"]["type"] == "authentication_error"


async def test_cancelling_a_real_call_hangs_up_on_upstream(
    upstream: FakeUpstream, transport: AiohttpTransport
) -> None:
    task = asyncio.create_task(
        UpstreamClient(transport).execute(fake_call(upstream, {"hang": True}))
    )
    await _until(lambda: upstream.stats().in_flight == 1)

    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    await _until(lambda: upstream.stats().in_flight == 0)


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 2 s")
