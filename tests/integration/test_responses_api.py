"""Requests without a batch through the unmodified `openai` SDK (responses-and-api §4–§8):
realtime chat completions, embeddings and responses (whole, streamed, in the background), flex
chat completions and responses (blocking, background), error mappings, the poll timeout, a
caller that disconnects, and retrieval with its ownership rules."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from cannonade.testing.fake_upstream import FakeUpstreamControl
from compose import stack
from compose.services import Services
from projections.api.publisher import Publisher
from schemas import ids
from schemas.events import RequestCanceled, RequestTransitions
from tests.integration.conftest import (
    chat_line,
    content_lines,
    eventually,
    jsonl,
    run,
    wait_for_batch,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
Row = dict[str, Any]

_POLL_S = 0.1
_MODEL = "chat-b"
_KEY = "Bearer local-upstream-key"  # what conftest's services configure for every model
_PROCESSING = "SELECT model FROM requests WHERE id = $1 AND state = 'processing'"


@pytest.fixture(scope="module")
def upstream(services: Services) -> FakeUpstreamControl:
    control = FakeUpstreamControl(services.upstream_url)
    control.record(True)
    return control


@pytest.fixture(scope="module")
def alice(client_for: Callable[[str], OpenAI]) -> OpenAI:
    return client_for("responses-alice")


def marker() -> str:
    """A token that only one test's requests carry, for scripts and read-back."""
    return f"m{uuid.uuid4().hex[:16]}"


def say(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"say {text}"}]


def fetch(client: OpenAI, response_id: str) -> Row | None:
    """`GET /v1/responses/{id}` as the JSON the SDK received; None for a 404."""
    try:
        raw = client.responses.with_raw_response.retrieve(response_id)
    except openai.NotFoundError:
        return None
    row: Row = json.loads(raw.text)
    return row


def retrieved(client: OpenAI, response_id: str, until: Callable[[Row], bool]) -> Row:
    def check() -> Row | None:
        row = fetch(client, response_id)
        return row if row is not None and until(row) else None

    return eventually(check, f"{response_id} to be recorded as expected")


def answered(row: Row) -> bool:
    """Completed, with its response body projected (it travels on its own topic)."""
    return row["status"] == "completed" and bool(row["output"])


def status_is(status: str) -> Callable[[Row], bool]:
    return lambda row: row["status"] == status


def request_id_sent(upstream: FakeUpstreamControl, mark: str) -> str:
    """The request id of the one upstream call carrying `mark` (sent as a header)."""
    sent = eventually(lambda: upstream.received(marker=mark) or None, f"a call with {mark}")
    assert len(sent) == 1
    return sent[0].headers["x-fusillade-request-id"]


def error_body(error: openai.APIStatusError) -> dict[str, Any]:
    """The `error` object of the envelope, as the SDK hands it over."""
    assert isinstance(error.body, dict)
    return error.body


def output_text(row: Row) -> str:
    return "".join(
        part["text"]
        for item in row["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part.get("type") == "output_text"
    )


# -- realtime --------------------------------------------------------------------------------


def test_realtime_chat_completion_is_proxied_recorded_and_retrievable(
    alice: OpenAI, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    completion = alice.chat.completions.create(model=_MODEL, messages=say(mark))
    assert completion.id.startswith("resp_")
    assert completion.choices[0].message.content == f"echo: say {mark}"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    [sent] = upstream.received(marker=mark)
    assert sent.path == "/v1/chat/completions"
    # The model's own credential goes upstream, never the caller's key.
    assert sent.headers["authorization"] == _KEY
    request_id = completion.id.removeprefix("resp_")
    assert sent.headers["x-fusillade-request-id"] == request_id

    row = retrieved(alice, completion.id, answered)
    assert (row["id"], row["object"], row["model"], row["background"]) == (
        completion.id, "response", _MODEL, False,
    )  # fmt: skip
    stored = row["output"][0]["content"]
    assert stored["id"] == completion.id
    assert stored["choices"][0]["message"]["content"] == f"echo: say {mark}"
    assert row["usage"]["input_tokens"] == completion.usage.prompt_tokens
    assert row["usage"]["output_tokens"] == completion.usage.completion_tokens
    assert isinstance(row["completed_at"], int)
    # `resp_<uuid>` and the bare uuid are the same response.
    assert fetch(alice, request_id) == row


def test_realtime_embeddings(alice: OpenAI, upstream: FakeUpstreamControl) -> None:
    mark = marker()
    result = alice.embeddings.create(model="embed-a", input=f"embed {mark}")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 8
    request_id = request_id_sent(upstream, mark)
    row = retrieved(alice, f"resp_{request_id}", status_is("completed"))
    assert row["model"] == "embed-a" and row["usage"]["input_tokens"] > 0
    # Flex is for chat models: a flex embedding runs in realtime.
    flex = alice.embeddings.create(
        model="embed-a", input="flex", extra_body={"service_tier": "flex"}
    )
    assert flex.data[0].embedding == alice.embeddings.create(model="embed-a", input="flex").data[0].embedding  # fmt: skip


def test_realtime_response_is_translated_to_chat_and_back(
    alice: OpenAI, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    response = alice.responses.create(
        model=_MODEL, input=f"say {mark}", instructions="be brief", temperature=0.5
    )
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == f"echo: say {mark}"
    assert response.usage is not None and response.usage.output_tokens > 0
    assert response.instructions == "be brief"
    [sent] = upstream.received(marker=mark)
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == _KEY
    assert sent.body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"say {mark}"},
    ]
    assert sent.body["temperature"] == 0.5

    row = retrieved(alice, response.id, answered)
    assert row["id"] == response.id and output_text(row) == response.output_text
    assert row["usage"]["total_tokens"] == response.usage.total_tokens


def test_streamed_chat_completion_passes_chunks_and_stores_their_reassembly(
    alice: OpenAI,
) -> None:
    mark = marker()
    stream = alice.chat.completions.create(
        model=_MODEL,
        messages=say(mark),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    [response_id] = {chunk.id for chunk in chunks}
    assert response_id.startswith("resp_")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"echo: say {mark}"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

    row = retrieved(alice, response_id, answered)
    stored = row["output"][0]["content"]
    assert (stored["id"], stored["object"]) == (response_id, "chat.completion")
    assert stored["choices"][0]["message"]["content"] == text
    assert row["usage"]["total_tokens"] == chunks[-1].usage.total_tokens


def test_streamed_response_sends_responses_events(alice: OpenAI) -> None:
    mark = marker()
    events = list(alice.responses.create(model=_MODEL, input=f"say {mark}", stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == f"echo: say {mark}"
    final = events[-1].response  # type: ignore[union-attr]
    assert final.id == events[0].response.id  # type: ignore[union-attr]
    assert final.output_text == deltas and final.usage is not None
    assert final.usage.output_tokens > 0

    # The SDK's stream helper checks that the events agree with one another.
    other = marker()
    with alice.responses.stream(model=_MODEL, input=f"say {other}") as helper:
        for _ in helper:
            pass
        assert helper.get_final_response().output_text == f"echo: say {other}"

    row = retrieved(alice, final.id, answered)
    assert output_text(row) == deltas and row["usage"]["output_tokens"] == final.usage.output_tokens


def test_realtime_background_response_is_in_progress_then_completed(
    alice: OpenAI, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script({"latency_ms": 5000}, marker=mark)
    accepted = alice.responses.create(model=_MODEL, input=f"say {mark}", background=True)
    assert (accepted.status, accepted.background, accepted.output) == ("in_progress", True, [])
    # The row is recorded before the 202, so the first read finds it.
    first = fetch(alice, accepted.id)
    assert first is not None and first["status"] == "in_progress" and first["background"] is True
    row = retrieved(alice, accepted.id, answered)
    assert output_text(row) == f"echo: say {mark}"
    assert row["background"] is True and row["usage"]["output_tokens"] > 0


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (400, openai.BadRequestError, "invalid_request_error"),
        (401, openai.AuthenticationError, "authentication_error"),
        (429, openai.RateLimitError, "rate_limit_error"),
        (500, openai.InternalServerError, "server_error"),
    ],
)
def test_upstream_errors_pass_through_and_read_back_failed(
    alice: OpenAI,
    upstream: FakeUpstreamControl,
    status: int,
    error: type[openai.APIStatusError],
    kind: str,
) -> None:
    mark = marker()
    fake = {"status": status, "message": f"refused {mark}"}
    with pytest.raises(error) as info:
        alice.chat.completions.create(
            model=_MODEL,
            messages=say(mark),
            extra_body={"x_fake": fake},
        )
    assert info.value.status_code == status
    assert error_body(info.value)["message"] == f"refused {mark}"
    request_id = request_id_sent(upstream, mark)
    row = retrieved(alice, request_id, status_is("failed"))
    assert row["error"] == {"type": kind, "code": status, "message": f"refused {mark}"}
    assert "usage" not in row and row["output"] == []


def test_upstream_error_on_a_response(alice: OpenAI, upstream: FakeUpstreamControl) -> None:
    mark = marker()
    upstream.script({"status": 429, "message": f"slow down {mark}"}, marker=mark)
    with pytest.raises(openai.RateLimitError) as info:
        alice.responses.create(model=_MODEL, input=f"say {mark}")
    assert error_body(info.value)["message"] == f"slow down {mark}"
    row = retrieved(alice, request_id_sent(upstream, mark), status_is("failed"))
    assert row["error"] == {"type": "rate_limit_error", "code": 429, "message": f"slow down {mark}"}


def test_an_upstream_failing_mid_stream_fails_the_row(
    alice: OpenAI, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    stream = alice.chat.completions.create(
        model=_MODEL,
        messages=say(mark),
        stream=True,
        extra_body={"x_fake": {"stream_error": 503}},
    )
    with pytest.raises(openai.APIError, match="injected stream error"):
        list(stream)
    row = retrieved(alice, request_id_sent(upstream, mark), status_is("failed"))
    assert row["error"] == {"type": "server_error", "code": 503, "message": "injected stream error"}


def test_a_caller_that_disconnects_leaves_a_499_row(
    alice: OpenAI, services: Services, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    impatient = alice.with_options(timeout=3.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model=_MODEL,
            messages=say(mark),
            extra_body={"x_fake": {"latency_ms": 15000}},
        )
    row = retrieved(alice, request_id_sent(upstream, mark), status_is("failed"))
    assert row["error"] == {
        "type": "client_disconnected",
        "code": 499,
        "message": "client cancelled request before upstream response",
    }


def test_requests_the_api_refuses(alice: OpenAI, services: Services) -> None:
    chat, responses = alice.chat.completions, alice.responses
    access = "You do not have access to '{}'. Please contact your administrator to request access."
    kind = "Model '{}' is a {} model but endpoint '{}' requires a {} model"
    cases: list[tuple[Callable[[], object], type[openai.APIStatusError], str]] = [
        (
            lambda: chat.create(model="nope", messages=say("x")),
            openai.PermissionDeniedError,
            access.format("nope"),
        ),
        (
            lambda: chat.create(model="chat-private", messages=say("x")),
            openai.PermissionDeniedError,
            access.format("chat-private"),
        ),
        (
            lambda: responses.create(model="chat-private", input="x", service_tier="flex"),
            openai.PermissionDeniedError,
            access.format("chat-private"),
        ),
        (
            lambda: chat.create(model="embed-a", messages=say("x")),
            openai.BadRequestError,
            kind.format("embed-a", "EMBEDDINGS", "/v1/chat/completions", "CHAT"),
        ),
        (
            lambda: alice.embeddings.create(model=_MODEL, input="x"),
            openai.BadRequestError,
            kind.format(_MODEL, "CHAT", "/v1/embeddings", "EMBEDDINGS"),
        ),
        (
            lambda: responses.create(model=_MODEL, extra_body={"input": 5}),
            openai.BadRequestError,
            "'input' must be string or array",
        ),
        (
            lambda: responses.create(model=_MODEL, extra_body={"input": [{"type": "message"}]}),
            openai.BadRequestError,
            "input[0]: 'message' item missing 'role'",
        ),
        (
            lambda: responses.create(model=_MODEL),
            openai.BadRequestError,
            "parent body missing 'input' or 'messages'",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as info:
            call()
        assert error_body(info.value)["message"] == message

    # What the SDK cannot send: bodies that are no JSON object, or lack a model; no key.
    key = {"Authorization": f"Bearer {alice.api_key}"}
    with httpx.Client(base_url=f"{services.api_url}/v1") as raw:
        for path in ("/chat/completions", "/embeddings", "/responses"):
            for body in (b"{", b"[1]", b'{"messages": []}'):
                answer = raw.post(path, content=body, headers=key)
                assert answer.status_code == 400, (path, body, answer.text)
                assert answer.json()["error"]["type"] == "invalid_request_error"
            anonymous = raw.post(path, json={"model": _MODEL})
            assert anonymous.status_code == 401
            assert anonymous.json()["error"]["code"] == "invalid_api_key"
        # Every body must fit one record on the bodies topic (conftest keeps the 10 MiB limit).
        large = raw.post("/responses", content=b" " * 10_485_761, headers=key)
        assert large.status_code == 413 and large.json()["error"]["code"] == "request_too_large"


# -- retrieval -------------------------------------------------------------------------------


def test_retrieval_is_by_owner_and_never_shows_batch_rows(
    alice: OpenAI, client_for: Callable[[str], OpenAI]
) -> None:
    completion = alice.chat.completions.create(model=_MODEL, messages=say(marker()))
    row = retrieved(alice, completion.id, answered)
    mallory = client_for("responses-mallory")
    for given in (completion.id, completion.id.removeprefix("resp_"), "resp_nonsense", "x"):
        with pytest.raises(openai.NotFoundError) as info:
            mallory.responses.retrieve(given)
        assert error_body(info.value)["message"] == f"response with ID {given} not found"
    assert fetch(alice, f"resp_{uuid.uuid4()}") is None
    assert fetch(alice, completion.id) == row

    uploaded = alice.files.create(file=("in.jsonl", jsonl([chat_line("b1", _MODEL)])), purpose="batch")  # fmt: skip
    batch = alice.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for_batch(alice, batch.id)
    assert done.output_file_id is not None
    [line] = content_lines(alice, done.output_file_id)
    batch_row = line["id"].removeprefix("batch_req_")
    assert fetch(alice, batch_row) is None and fetch(alice, f"resp_{batch_row}") is None


# -- flex ------------------------------------------------------------------------------------


def test_flex_chat_completion_blocks_until_the_engine_ran_it(
    alice: OpenAI, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    completion = alice.chat.completions.create(
        model=_MODEL,
        messages=say(mark),
        service_tier="flex",
    )
    assert completion.id.startswith("resp_")
    assert completion.choices[0].message.content == f"echo: say {mark}"
    [sent] = upstream.received(marker=mark)
    assert "service_tier" not in sent.body and sent.headers["authorization"] == _KEY
    row = retrieved(alice, completion.id, answered)
    assert row["output"][0]["content"]["id"] == completion.id
    # A flex answer is never streamed (§7.7): asked for a stream, it is still one JSON body.
    other = marker()
    whole = alice.chat.completions.create(
        model=_MODEL, messages=say(other), service_tier="flex", extra_body={"stream": True}
    )
    assert whole.choices[0].message.content == f"echo: say {other}"


def test_flex_chat_failures_answer_like_the_upstream(alice: OpenAI) -> None:
    mark = marker()
    with pytest.raises(openai.BadRequestError) as info:
        alice.chat.completions.create(
            model=_MODEL,
            messages=say(mark),
            service_tier="flex",
            extra_body={"x_fake": {"status": 400, "message": f"bad {mark}"}},
        )
    assert info.value.body == {"message": f"bad {mark}", "type": "invalid_request_error", "param": None, "code": 400}  # fmt: skip
    # The work was handed to the engine: the SDK must not send it again on a retryable status.
    assert info.value.response.headers["x-should-retry"] == "false"


def test_a_cancelled_flex_chat_answers_499(
    alice: OpenAI, upstream: FakeUpstreamControl, stack_info: stack.StackInfo
) -> None:
    mark = marker()
    upstream.script({"latency_ms": 20000}, marker=mark)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            lambda: alice.chat.completions.create(
                model=_MODEL, messages=say(mark), service_tier="flex"
            )
        )
        request_id = request_id_sent(upstream, mark)
        # Its upstream call is scripted to last: cancel it while it runs.
        model = eventually(lambda: run(_processing(stack_info, request_id)), "processing")
        run(_cancel(stack_info, request_id, model))
        with pytest.raises(openai.APIStatusError) as info:
            call.result(timeout=60)
    assert info.value.status_code == 499
    assert error_body(info.value) == {
        "message": "Request was canceled", "type": "request_canceled", "param": None, "code": 499,
    }  # fmt: skip
    assert retrieved(alice, request_id, status_is("cancelled"))["output"] == []


async def _processing(stack_info: stack.StackInfo, request_id: str) -> str | None:
    """The model of a request that is processing, else None."""
    conn = await asyncpg.connect(stack_info.database_url)
    try:
        model: str | None = await conn.fetchval(_PROCESSING, request_id)
        return model
    finally:
        await conn.close()


async def _cancel(stack_info: stack.StackInfo, request_id: str, model: str) -> None:
    """Ends a processing row as the engine's cancellation would: no endpoint cancels a single
    request."""
    event = RequestCanceled(
        event_id=ids.new_id(), occurred_at=datetime.now(UTC), request_id=request_id,
        batch_id=None, model=model, from_state="processing",
    )  # fmt: skip
    record = RequestTransitions(
        event_id=ids.new_id(), occurred_at=event.occurred_at, model=model, events=[event]
    )
    publisher = Publisher(stack_info.kafka_bootstrap)
    try:
        await publisher.transitions([record])
    finally:
        await publisher.stop()


def test_a_flex_response_cut_short_answers_200_incomplete(
    alice: OpenAI, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script({"finish_reason": "length"}, marker=mark)
    raw = alice.responses.with_raw_response.create(
        model=_MODEL, input=f"say {mark}", service_tier="flex"
    )
    assert raw.status_code == 200 and raw.headers["x-should-retry"] == "false"
    response = raw.parse()
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert alice.responses.retrieve(response.id).status == "incomplete"


def test_flex_response_blocks_until_completed(alice: OpenAI) -> None:
    mark = marker()
    response = alice.responses.create(model=_MODEL, input=f"say {mark}", service_tier="flex")
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == f"echo: say {mark}"
    assert response.usage is not None and response.usage.output_tokens > 0


def test_flex_background_response_is_queued_then_in_progress_then_completed(
    alice: OpenAI, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    upstream.script({"latency_ms": 3000}, marker=mark)
    accepted = alice.responses.create(
        model=_MODEL, input=f"say {mark}", service_tier="flex", background=True
    )
    assert (accepted.status, accepted.background, accepted.service_tier) == ("queued", True, "flex")
    seen: list[str] = []

    def progress(row: Row) -> bool:
        seen.append(row["status"])
        return answered(row)

    row = retrieved(alice, accepted.id, progress)
    assert "in_progress" in seen and set(seen) <= {"queued", "in_progress", "completed"}
    assert row["background"] is True and output_text(row) == f"echo: say {mark}"
    assert row["usage"]["output_tokens"] > 0


def test_a_flex_call_that_outlasts_the_poll_timeout_answers_504(
    alice: OpenAI, upstream: FakeUpstreamControl
) -> None:
    mark = marker()
    slow = {"latency_ms": 40000}  # conftest's poll timeout is 15 s
    upstream.script(slow, slow, marker=mark)

    def chat() -> object:
        return alice.chat.completions.create(model=_MODEL, messages=say(mark), service_tier="flex")

    def response() -> object:
        return alice.responses.create(model=_MODEL, input=f"say {mark}", service_tier="flex")

    with ThreadPoolExecutor(2) as pool:
        # Both at once: each waits out the whole timeout.
        calls: list[tuple[Future[object], int | None]] = [
            (pool.submit(chat), 504),
            (pool.submit(response), None),
        ]
        for call, code in calls:
            with pytest.raises(openai.APIStatusError) as info:
                call.result(timeout=120)
            assert info.value.status_code == 504
            body = error_body(info.value)
            assert body["type"] == "server_error" and body["code"] == code
            assert body["message"].startswith("Request timed out: Timeout waiting for request ")
            assert body["message"].endswith(" to complete after 15s")
