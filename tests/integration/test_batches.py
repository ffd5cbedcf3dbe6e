"""Files and batches end to end through the real broker and database, driven by the
unmodified ``openai`` SDK: HTTP → commands → Faust agents → fake upstream → projections."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import openai
import pytest
from openai import OpenAI

from compose.services import Services
from schemas import api, ids
from tests.integration.conftest import (
    barrier,
    chat_line,
    content_lines,
    eventually,
    jsonl,
    upstream_stats,
    wait_for_batch,
)

pytestmark = pytest.mark.integration


def test_batch_runs_to_completion_with_every_line_once(client_for: Callable[[str], OpenAI]) -> None:
    client = client_for("alice")
    lines = [chat_line(f"req-{i}") for i in range(40)]
    lines[7] = chat_line("req-7", status=400)  # the upstream rejects this one
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.filename == "input.jsonl"
    assert uploaded.bytes == len(jsonl(lines))

    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"job": "nightly"},
    )  # fmt: skip
    assert batch.status in ("validating", "in_progress")
    assert batch.metadata == {"job": "nightly"}
    done = wait_for_batch(client, batch.id)

    assert done.status == "completed"
    assert (
        done.request_counts.total,
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (40, 39, 1)
    assert done.completed_at is not None and done.in_progress_at is not None
    assert done.output_file_id and done.error_file_id

    output = content_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(
        f"req-{i}" for i in range(40) if i != 7
    )
    for line in output:
        msgspec.convert(line, api.OutputLine)
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200
        assert body["object"] == "chat.completion"
        # The id override: the stored id names the request, as the control layer does.
        assert body["id"] == "resp_" + line["id"].removeprefix("batch_req_")

    (error,) = content_lines(client, done.error_file_id)
    assert error["custom_id"] == "req-7" and error["response"] is None
    envelope = msgspec.json.decode(error["error"]["message"])
    assert envelope["type"] == "NonRetriableHttpStatus"
    assert envelope["details"]["status"] == 400
    assert "injected status 400" in envelope["details"]["body"]

    # The virtual files are listed with the caller's files and sized from their rows.
    listed = {f.id: f for f in client.files.list(limit=100).data}
    assert listed[done.output_file_id].purpose == "batch_output"
    assert listed[done.output_file_id].bytes > 0
    assert client.files.retrieve(done.error_file_id).filename == f"batch-{batch.id}-error.jsonl"


def test_input_file_content_round_trips(client_for: Callable[[str], OpenAI]) -> None:
    client = client_for("alice")
    lines = [chat_line("a"), chat_line("b", model="chat-b")]
    lines[0]["body"]["priority"] = 5  # dropped at upload, as the reference does
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    downloaded = content_lines(client, uploaded.id)
    del lines[0]["body"]["priority"]
    assert downloaded == lines


def test_embeddings_batch(client_for: Callable[[str], OpenAI]) -> None:
    client = client_for("erin")
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "embed-a", "input": f"text {i}"}}
        for i in range(5)
    ]  # fmt: skip
    uploaded = client.files.create(file=("emb.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait_for_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 5
    output = content_lines(client, done.output_file_id)
    assert {line["response"]["body"]["object"] for line in output} == {"list"}


def test_cancel_stops_unsent_requests(
    client_for: Callable[[str], OpenAI], services: Services
) -> None:
    client = client_for("bob")
    # chat-a runs 4 at a time; at 400 ms each, 60 lines take ~6 s, so most are unsent at cancel.
    lines = [chat_line(f"slow-{i}", latency_ms=400) for i in range(60)]
    uploaded = client.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for_batch(client, batch.id, {"in_progress"})
    eventually(lambda: _calls_for(services, batch.id, 60), "the first calls upstream")

    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    assert cancelled.cancelling_at is not None
    done = wait_for_batch(client, batch.id, {"cancelled"})
    calls_at_end = _calls_for(services, batch.id, 60)
    barrier(client, "chat-a")
    assert _calls_for(services, batch.id, 60) == calls_at_end, (
        "requests were sent after the batch ended"
    )

    counts = done.request_counts
    assert counts.total == 60
    assert 0 < calls_at_end < 60
    # Nothing unsent ran, and the calls in flight at the cancel were aborted: they end
    # canceled, never completed after the cancel (the fake saw them start, not finish).
    stats = upstream_stats(services)["models"]["chat-a"]
    assert stats["in_flight"] == 0
    assert counts.completed < calls_at_end
    assert len(content_lines(client, done.output_file_id)) == counts.completed
    assert content_lines(client, done.error_file_id) == []

    # Cancelling again answers the batch unchanged; a finished batch cannot be cancelled.
    assert client.batches.cancel(batch.id).status == "cancelled"


def _calls_for(services: Services, batch_id: str, lines: int) -> int:
    """Upstream calls the fake received for this batch's requests (ids derive from lines)."""
    wanted = {ids.request_id(batch_id, i) for i in range(lines)}
    return sum(1 for call in upstream_stats(services)["calls"] if call["request_id"] in wanted)


def test_cancelling_a_completed_batch_is_a_conflict(client_for: Callable[[str], OpenAI]) -> None:
    client = client_for("carol")
    uploaded = client.files.create(
        file=("one.jsonl", jsonl([chat_line("only", model="chat-b")])), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for_batch(client, batch.id).status == "completed"
    with pytest.raises(openai.ConflictError) as info:
        client.batches.cancel(batch.id)
    assert info.value.body["message"] == "Cannot cancel a batch with status 'completed'"  # type: ignore[index]


@pytest.mark.parametrize(
    ("lines", "status", "message"),
    [
        (
            [chat_line("x"), chat_line("x")],
            400,
            "Line 2: duplicate custom_id 'x' (first seen on line 1)",
        ),
        (
            [
                chat_line("ok"),
                {
                    "custom_id": "bad",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"messages": []},
                },
            ],
            400,
            "Line 2: Missing 'model' field in request body",
        ),
        (
            [chat_line("m", model="no-such-model")],
            403,
            "Line 1: Model 'no-such-model' has not been configured or is not available to user",
        ),
        (
            [{**chat_line("g"), "method": "GET"}],
            400,
            "Line 1: Unsupported HTTP method 'GET'. Only POST is currently supported.",
        ),
        (
            [
                {
                    "custom_id": "e",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "embed-a", "input": "x"},
                }
            ],
            400,
            "Line 1: Model 'embed-a' is a EMBEDDINGS model but endpoint '/v1/chat/completions' requires a CHAT model",
        ),
    ],
)
def test_bad_uploads_are_rejected_and_leave_no_file(
    client_for: Callable[[str], OpenAI],
    lines: list[dict[str, Any]],
    status: int,
    message: str,
) -> None:
    client = client_for("dave")
    before = {f.id for f in client.files.list(limit=100).data}
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
    assert info.value.status_code == status
    assert info.value.body["message"] == message  # type: ignore[index]
    msgspec.convert({"error": info.value.body}, api.ErrorEnvelope)
    assert {f.id for f in client.files.list(limit=100).data} == before


def test_invalid_json_line_names_its_line(client_for: Callable[[str], OpenAI]) -> None:
    client = client_for("dave")
    raw = jsonl([chat_line("fine")]) + b"\n\n{not json\n"
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("broken.jsonl", raw), purpose="batch")
    assert info.value.body["message"].startswith("Invalid JSON on line 2:")  # type: ignore[index]


def test_a_filename_longer_than_the_contract_allows_is_refused(
    client_for: Callable[[str], OpenAI],
) -> None:
    client = client_for("dave")
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("n" * 1025, jsonl([chat_line("fine")])), purpose="batch")
    assert info.value.body["message"] == "Invalid 'filename': at most 1024 characters"  # type: ignore[index]


def test_another_users_resources_answer_404(client_for: Callable[[str], OpenAI]) -> None:
    owner, stranger = client_for("olivia"), client_for("sam")
    uploaded = owner.files.create(
        file=("mine.jsonl", jsonl([chat_line("p", model="chat-b")])), purpose="batch"
    )
    batch = owner.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    for call in (
        lambda: stranger.files.retrieve(uploaded.id),
        lambda: stranger.files.content(uploaded.id),
        lambda: stranger.files.delete(uploaded.id),
        lambda: stranger.batches.retrieve(batch.id),
        lambda: stranger.batches.cancel(batch.id),
        lambda: stranger.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["message"] in (  # type: ignore[index]
            f"File with ID {uploaded.id} not found",
            f"Batch with ID {batch.id} not found",
        )
    assert uploaded.id not in {f.id for f in stranger.files.list(limit=100).data}
    assert batch.id not in {b.id for b in stranger.batches.list(limit=100).data}
    assert batch.id in {b.id for b in owner.batches.list(limit=100).data}


def test_deleting_every_listed_file_page_by_page_deletes_them_all(
    client_for: Callable[[str], OpenAI],
) -> None:
    client = client_for("tidy")
    made = {
        client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line("x")])), purpose="batch").id
        for i in range(3)
    }
    deleted = []
    # The SDK asks for each next page after the last file listed, which is deleted by then.
    for listed in client.files.list(limit=1):
        client.files.delete(listed.id)
        deleted.append(listed.id)
    assert sorted(deleted) == sorted(made)
    assert client.files.list(limit=100).data == []


def test_missing_or_bad_key_is_401(services: Services) -> None:
    client = OpenAI(base_url=f"{services.api_url}/v1", api_key="cn-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.files.list()
    assert info.value.body["message"] == "Invalid API key"  # type: ignore[index]
    unkeyed = httpx.post(f"{services.api_url}/v1/chat/completions", json={"model": "chat-a"})
    assert unkeyed.status_code == 401
    assert unkeyed.json()["error"]["message"] == "API key required"


def test_deleting_an_input_file_cancels_its_running_batch(
    client_for: Callable[[str], OpenAI],
) -> None:
    client = client_for("frank")
    lines = [chat_line(f"d{i}", latency_ms=300) for i in range(30)]
    uploaded = client.files.create(file=("del.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for_batch(client, batch.id, {"in_progress"})

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted is True and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    done = wait_for_batch(client, batch.id, {"cancelled"})
    assert done.input_file_id == ""
    assert done.request_counts.completed < 30
    # Its canceled lines are gone with the file: a retry cannot run them.
    with pytest.raises(openai.BadRequestError) as info:
        client.post(f"/batches/{batch.id}/retry", cast_to=object)
    assert info.value.body["message"] == (  # type: ignore[index]
        f"The input file of batch {batch.id} was deleted; its requests cannot run again"
    )


def test_batch_validation_errors(client_for: Callable[[str], OpenAI]) -> None:
    client = client_for("gina")
    uploaded = client.files.create(file=("v.jsonl", jsonl([chat_line("v")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="7d",  # type: ignore[arg-type]
        )
    assert info.value.body["message"].startswith("Unsupported completion_window")  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    assert (
        info.value.body["message"]  # type: ignore[index]
        == "Line 1: url '/v1/chat/completions' does not match batch endpoint '/v1/embeddings'"
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.retrieve("not-a-uuid")
    assert info.value.body["message"] == "Invalid batch ID format"  # type: ignore[index]


def test_a_streamable_endpoint_is_read_as_sse_and_stored_reassembled(
    client_for: Callable[[str], OpenAI],
) -> None:
    client = client_for("sid")
    lines = [
        {"custom_id": f"s{i}", "method": "POST", "url": "/v1/completions", "body": {"model": "chat-b", "prompt": f"count {i}"}}
        for i in range(3)
    ]  # fmt: skip
    uploaded = client.files.create(file=("stream.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    done = wait_for_batch(client, batch.id)
    assert done.status == "completed"
    for line in content_lines(client, done.output_file_id):
        body = line["response"]["body"]
        # Stored as one JSON completion (rebuilt from the event stream), not raw SSE text.
        assert isinstance(body, dict) and body["choices"][0]["text"]
