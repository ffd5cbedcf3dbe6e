"""Retry, delete, results and requests without a batch over HTTP (core §2.3, §2.4; responses-and-
api §8.3–§8.4), end to end through the real broker and database: the unmodified ``openai`` SDK
where it has the call, raw HTTP (httpx) for the extensions it does not know."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import httpx
import openai
import pytest
from openai import OpenAI

from cannonade.testing.fake_upstream import FakeUpstreamControl
from compose import stack
from compose.services import Services
from schemas import ids
from tests.integration.conftest import (
    barrier,
    chat_line,
    content_lines,
    eventually,
    jsonl,
    run,
    upstream_stats,
    wait_for_batch,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
Json = dict[str, Any]


# -- helpers ---------------------------------------------------------------------------------


class Caller:
    """One user: the SDK client and a raw HTTP client with the same key."""

    def __init__(self, client: OpenAI, api_url: str) -> None:
        self.sdk = client
        self.http = httpx.Client(
            base_url=f"{api_url}/v1",
            headers={"Authorization": f"Bearer {client.api_key}"},
            timeout=120,
        )

    def batch(self, lines: list[Json], window: str = "24h") -> Any:
        uploaded = self.sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        return self.sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window=window,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def caller_for(
    client_for: Callable[[str], OpenAI], services: Services
) -> Iterator[Callable[[str], Caller]]:
    made: list[Caller] = []

    def make(user: str) -> Caller:
        made.append(Caller(client_for(user), services.api_url))
        return made[-1]

    yield make
    for caller in made:
        caller.http.close()


@pytest.fixture(scope="module")
def upstream(services: Services) -> FakeUpstreamControl:
    control = FakeUpstreamControl(services.upstream_url)
    control.record(True)
    return control


def user() -> str:
    return f"life-{uuid.uuid4().hex[:8]}"


def marker() -> str:
    return f"m{uuid.uuid4().hex[:16]}"


def error_of(response: httpx.Response) -> Json:
    body: Json = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def results(caller: Caller, batch_id: str, **params: Any) -> list[Json]:
    response = caller.http.get(f"/batches/{batch_id}/results", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def calls_per_request(services: Services, batch_id: str, lines: int) -> Counter[str]:
    """Upstream calls the fake received per request of this batch (ids derive from lines)."""
    wanted = {ids.request_id(batch_id, i) for i in range(lines)}
    return Counter(
        call["request_id"]
        for call in upstream_stats(services)["calls"]
        if call["request_id"] in wanted
    )


def counts_of(caller: Caller, batch_id: str) -> Any:
    return caller.sdk.batches.retrieve(batch_id).request_counts


def failed_count(caller: Caller, batch_id: str) -> int:
    return int(counts_of(caller, batch_id).failed)


def custom_ids(client: OpenAI, file_id: str | None) -> list[str]:
    assert file_id
    return [line["custom_id"] for line in content_lines(client, file_id)]


# -- retry -----------------------------------------------------------------------------------


def test_retry_runs_failed_and_cancelled_rows_again(
    caller_for: Callable[[str], Caller], services: Services
) -> None:
    ann = caller_for(user())
    # chat-a runs 4 at a time, in line order: the first four fail at once (a 400, once per
    # request id), the slow rest is still running or unsent when the batch is cancelled.
    lines = [chat_line(f"flaky-{i}", fail_times=1, fail_status=400) for i in range(4)]
    lines += [chat_line(f"slow-{i}", latency_ms=700) for i in range(8)]
    lines.append(chat_line("doomed", status=400))  # fails on every attempt
    batch = ann.batch(lines)
    eventually(lambda: failed_count(ann, batch.id) >= 4 or None, "the first failures")
    ann.sdk.batches.cancel(batch.id)
    cancelled = wait_for_batch(ann.sdk, batch.id, {"cancelled"})
    assert cancelled.request_counts.failed == 4
    shown = Counter(line["status"] for line in results(ann, batch.id))
    assert shown["failed"] == 4 and shown["canceled"] >= 1
    assert sum(shown.values()) == len(lines)

    answer = ann.http.post(f"/batches/{batch.id}/retry")
    assert answer.status_code == 200, answer.text
    retried = answer.json()
    assert retried["id"] == batch.id and retried["object"] == "batch"
    assert retried["status"] == "in_progress"
    assert retried["cancelling_at"] is None and retried["cancelled_at"] is None
    assert retried["request_counts"]["total"] == len(lines)
    assert retried["request_counts"]["failed"] == 0

    done = wait_for_batch(ann.sdk, batch.id)
    assert done.status == "completed"
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (13, 12, 1)
    output, errors = (
        custom_ids(ann.sdk, done.output_file_id),
        custom_ids(ann.sdk, done.error_file_id),
    )
    assert sorted(output) == sorted(line["custom_id"] for line in lines[:12])
    assert errors == ["doomed"]
    assert Counter(line["status"] for line in results(ann, batch.id)) == {
        "completed": 12, "failed": 1,
    }  # fmt: skip
    # The flaky rows were sent twice (failed, then retried), the doomed one at most twice.
    calls = calls_per_request(services, batch.id, len(lines))
    assert all(calls[ids.request_id(batch.id, i)] == 2 for i in range(4))

    # The doomed row can always run again (and fail again).
    assert ann.http.post(f"/batches/{batch.id}/retry").status_code == 200
    assert wait_for_batch(ann.sdk, batch.id).request_counts.failed == 1


def test_retry_answers_errors_for_nothing_to_retry_and_unknown_batches(
    caller_for: Callable[[str], Caller],
) -> None:
    bea, eve = caller_for(user()), caller_for(user())
    batch = bea.batch([chat_line("fine", model="chat-b")])
    assert wait_for_batch(bea.sdk, batch.id).status == "completed"
    nothing = bea.http.post(f"/batches/{batch.id}/retry")
    assert nothing.status_code == 400
    assert error_of(nothing)["message"] == "No failed requests to retry in this batch"
    for who, batch_id in ((eve, batch.id), (bea, str(uuid.uuid4()))):
        missing = who.http.post(f"/batches/{batch_id}/retry")
        assert missing.status_code == 404
        assert error_of(missing)["message"] == f"Batch with ID {batch_id} not found"
    assert bea.http.post("/batches/not-a-uuid/retry").status_code == 400


def test_retry_while_rows_are_in_flight(
    caller_for: Callable[[str], Caller], services: Services
) -> None:
    cid = caller_for(user())
    lines = [chat_line(f"quick-{i}", model="chat-b", fail_times=1, fail_status=400) for i in range(2)]  # fmt: skip
    lines += [chat_line(f"long-{i}", model="chat-b", latency_ms=4000) for i in range(4)]
    batch = cid.batch(lines)
    eventually(lambda: failed_count(cid, batch.id) == 2 or None, "the quick rows to fail")
    answer = cid.http.post(f"/batches/{batch.id}/retry")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "in_progress"
    assert answer.json()["request_counts"]["failed"] == 0

    done = wait_for_batch(cid.sdk, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 6
    assert sorted(custom_ids(cid.sdk, done.output_file_id)) == sorted(x["custom_id"] for x in lines)
    assert custom_ids(cid.sdk, done.error_file_id) == []
    # Rows that were running were left alone: one call each; the failed ones ran twice.
    calls = calls_per_request(services, batch.id, len(lines))
    assert [calls[ids.request_id(batch.id, i)] for i in range(6)] == [2, 2, 1, 1, 1, 1]


def test_retry_of_chosen_requests(caller_for: Callable[[str], Caller]) -> None:
    dan, eve = caller_for(user()), caller_for(user())
    lines = [chat_line(f"f{i}", model="chat-b", fail_times=1, fail_status=400) for i in range(3)]
    lines += [chat_line(f"ok{i}", model="chat-b") for i in range(2)]
    batch = dan.batch(lines)
    done = wait_for_batch(dan.sdk, batch.id)
    assert (done.status, done.request_counts.failed) == ("completed", 3)
    failed = {line["custom_id"]: line["id"] for line in results(dan, batch.id, status="failed")}
    completed = results(dan, batch.id, status="completed")
    assert sorted(failed) == ["f0", "f1", "f2"] and len(completed) == 2
    path = f"/batches/{batch.id}/retry-requests"

    stranger = str(uuid.uuid4())
    missing = dan.http.post(path, json={"request_ids": [failed["f0"], stranger]})
    assert missing.status_code == 404
    assert error_of(missing)["message"] == f"Request with ID {stranger} not found"
    not_failed = dan.http.post(path, json={"request_ids": [completed[0]["id"]]})
    assert not_failed.status_code == 400
    assert error_of(not_failed)["message"] == (
        f"Request {completed[0]['id']} is not in a failed state"
    )
    bodies: list[Json] = [{}, {"request_ids": []}, {"request_ids": ["nope"]}]
    for body in bodies:
        assert dan.http.post(path, json=body).status_code == 400
    assert dan.http.post(path, content=b"{not json").status_code == 400
    assert eve.http.post(path, json={"request_ids": [failed["f0"]]}).status_code == 404

    # An id as the error file shows it (batch_req_…) names the row too.
    chosen = {"request_ids": [f"batch_req_{failed['f0']}", failed["f1"]]}
    answer = dan.http.post(path, json=chosen)
    assert answer.status_code == 200, answer.text
    assert answer.json()["request_counts"]["failed"] == 1
    assert answer.json()["status"] in ("in_progress", "completed")

    done = wait_for_batch(dan.sdk, batch.id)
    assert done.status == "completed"
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (5, 4, 1)
    assert sorted(custom_ids(dan.sdk, done.output_file_id)) == ["f0", "f1", "ok0", "ok1"]
    assert custom_ids(dan.sdk, done.error_file_id) == ["f2"]


def test_retry_of_an_expired_batch_gets_a_new_deadline(
    caller_for: Callable[[str], Caller], upstream: FakeUpstreamControl
) -> None:
    eli = caller_for(user())
    mark = marker()
    # The first call of each row never answers: at the 15 s deadline they are aborted.
    upstream.script(*[{"hang": True}] * 4, marker=mark)
    lines = [chat_line(f"{mark}-{i}", model="chat-b") for i in range(4)]
    batch = eli.batch(lines, window="15s")

    def expired() -> Any:
        # Expired at the deadline; its calls in flight end failed once aborted.
        seen = eli.sdk.batches.retrieve(batch.id)
        return seen if seen.status == "expired" and failed_count(eli, batch.id) == 4 else None

    before = eventually(expired, "the batch to expire")
    assert before.expired_at is not None

    answer = eli.http.post(f"/batches/{batch.id}/retry")
    assert answer.status_code == 200, answer.text
    retried = answer.json()
    assert retried["status"] in ("in_progress", "completed") and retried["expired_at"] is None
    assert retried["expires_at"] > before.expires_at
    assert retried["expires_at"] >= int(time.time()) + 10

    done = wait_for_batch(eli.sdk, batch.id, timeout_s=60)
    assert done.status == "completed" and done.request_counts.completed == 4
    assert sorted(custom_ids(eli.sdk, done.output_file_id)) == sorted(x["custom_id"] for x in lines)
    assert custom_ids(eli.sdk, done.error_file_id) == []


# -- delete ----------------------------------------------------------------------------------


def test_delete_during_a_run_stops_it_and_hides_it_with_its_files(
    caller_for: Callable[[str], Caller], services: Services
) -> None:
    fay, eve = caller_for(user()), caller_for(user())
    lines = [chat_line(f"d{i}", latency_ms=400) for i in range(40)]  # chat-a: 4 at a time
    batch = fay.batch(lines)
    eventually(lambda: counts_of(fay, batch.id).completed >= 4 or None, "some progress")
    assert eve.http.delete(f"/batches/{batch.id}").status_code == 404
    answer = fay.http.delete(f"/batches/{batch.id}")
    assert answer.status_code == 204 and answer.content == b""
    calls = sum(calls_per_request(services, batch.id, 40).values())
    assert 0 < calls < 40

    for path in (f"/batches/{batch.id}", f"/batches/{batch.id}/results"):
        gone = fay.http.get(path)
        assert gone.status_code == 404
        assert error_of(gone)["message"] == f"Batch with ID {batch.id} not found"
    for method, path in (("POST", "cancel"), ("POST", "retry"), ("DELETE", "")):
        url = f"/batches/{batch.id}/{path}".rstrip("/")
        assert fay.http.request(method, url).status_code == 404
    for file_id in (batch.output_file_id, batch.error_file_id):
        assert file_id
        for path in (f"/files/{file_id}", f"/files/{file_id}/content"):
            assert fay.http.get(path).status_code == 404
    assert batch.id not in {b.id for b in fay.sdk.batches.list(limit=100)}
    listed = {f.id for f in fay.sdk.files.list(limit=100)}
    assert batch.input_file_id in listed
    assert not listed & {batch.output_file_id, batch.error_file_id}

    # Nothing starts upstream after the answer: the call count holds past a later batch.
    barrier(fay.sdk, "chat-a")
    assert sum(calls_per_request(services, batch.id, 40).values()) == calls


def test_deleting_a_finished_batch(caller_for: Callable[[str], Caller]) -> None:
    gus = caller_for(user())
    batch = gus.batch([chat_line("x", model="chat-b")])
    wait_for_batch(gus.sdk, batch.id)
    assert gus.http.delete(f"/batches/{batch.id}").status_code == 204
    with pytest.raises(openai.NotFoundError):
        gus.sdk.batches.retrieve(batch.id)
    assert gus.http.delete("/batches/bad-id").status_code == 400


# -- results ---------------------------------------------------------------------------------


def test_results_stream_filters_and_pages(caller_for: Callable[[str], Caller]) -> None:
    hal, eve = caller_for(user()), caller_for(user())
    lines = [chat_line(f"row-{i}", model="chat-b") for i in range(5)]
    lines[3] = chat_line("row-3", model="chat-b", status=400)
    lines.append(chat_line("other", model="chat-b"))
    batch = hal.batch(lines)
    wait_for_batch(hal.sdk, batch.id)

    every = results(hal, batch.id)
    assert [line["custom_id"] for line in every] == [line["custom_id"] for line in lines]
    for line, sent in zip(every, lines, strict=True):
        assert set(line) == {"id", "custom_id", "model", "input_body", "response_body", "error", "status"}  # fmt: skip
        assert line["input_body"] == sent["body"] and line["model"] == "chat-b"
        assert uuid.UUID(line["id"])
    ok, bad = every[0], every[3]
    assert ok["status"] == "completed" and ok["error"] is None
    assert ok["response_body"]["object"] == "chat.completion"
    assert bad["status"] == "failed" and bad["response_body"] is None
    envelope = json.loads(bad["error"])  # the raw error text
    assert envelope["type"] == "NonRetriableHttpStatus" and envelope["details"]["status"] == 400

    assert [x["custom_id"] for x in results(hal, batch.id, status="failed")] == ["row-3"]
    assert len(results(hal, batch.id, status="completed")) == 5
    assert results(hal, batch.id, status="pending") == []
    assert [x["custom_id"] for x in results(hal, batch.id, search="ROW-", status="completed")] == [
        "row-0", "row-1", "row-2", "row-4",
    ]  # fmt: skip

    page = hal.http.get(f"/batches/{batch.id}/results", params={"limit": 2})
    assert [json.loads(x)["custom_id"] for x in page.text.splitlines()] == ["row-0", "row-1"]
    assert (page.headers["X-Incomplete"], page.headers["X-Last-Line"]) == ("true", "2")
    last = hal.http.get(f"/batches/{batch.id}/results", params={"skip": 4, "limit": 5})
    assert [json.loads(x)["custom_id"] for x in last.text.splitlines()] == ["row-4", "other"]
    assert (last.headers["X-Incomplete"], last.headers["X-Last-Line"]) == ("false", "6")
    whole = hal.http.get(f"/batches/{batch.id}/results")
    assert whole.headers["X-Incomplete"] == "false" and "X-Last-Line" not in whole.headers

    for params in ({"status": "cancelled"}, {"skip": -1}, {"limit": "x"}, {"status": "claimed"}):
        assert hal.http.get(f"/batches/{batch.id}/results", params=params).status_code == 400
    assert eve.http.get(f"/batches/{batch.id}/results").status_code == 404
    assert hal.http.get("/batches/nope/results").status_code == 400


def test_results_while_the_batch_runs(caller_for: Callable[[str], Caller]) -> None:
    ivy = caller_for(user())
    lines = [chat_line(f"r{i}", latency_ms=1500) for i in range(12)]  # chat-a: 4 at a time
    batch = ivy.batch(lines)
    wait_for_batch(ivy.sdk, batch.id, {"in_progress"})

    def running() -> list[Json] | None:
        shown = results(ivy, batch.id)
        statuses = {line["status"] for line in shown}
        return shown if len(shown) == 12 and {"pending", "in_progress"} <= statuses else None

    shown = eventually(running, "rows pending and in progress")
    assert [line["custom_id"] for line in shown] == [f"r{i}" for i in range(12)]
    assert all(line["response_body"] is None for line in shown if line["status"] != "completed")
    page = ivy.http.get(f"/batches/{batch.id}/results", params={"limit": 100})
    assert page.headers["X-Incomplete"] == "true"
    wait_for_batch(ivy.sdk, batch.id)
    assert {line["status"] for line in results(ivy, batch.id)} == {"completed"}


# -- requests without a batch ------------------------------------------------------------------


def _flex(caller: Caller, mark: str, **fake: Any) -> None:
    extra = {"x_fake": fake} if fake else None
    caller.sdk.chat.completions.create(
        model="chat-b",
        messages=[{"role": "user", "content": f"say {mark}"}],
        service_tier="flex",
        extra_body=extra,
    )


def _sent_id(upstream: FakeUpstreamControl, mark: str) -> str:
    sent = eventually(lambda: upstream.received(marker=mark) or None, f"a call with {mark}")
    return sent[0].headers["x-fusillade-request-id"]


async def _bodies_of(stack_info: stack.StackInfo, request_id: str) -> int:
    conn = await asyncpg.connect(stack_info.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM bodies WHERE ref = $1", request_id))
    finally:
        await conn.close()


def test_requests_without_a_batch(
    caller_for: Callable[[str], Caller],
    upstream: FakeUpstreamControl,
    stack_info: stack.StackInfo,
) -> None:
    jo, eve = caller_for(user()), caller_for(user())
    start = datetime.now(UTC) - timedelta(seconds=1)
    flex_ok, flaky, realtime = marker(), marker(), marker()
    _flex(jo, flex_ok)
    with pytest.raises(openai.BadRequestError):
        _flex(jo, flaky, fail_times=1, fail_status=400)
    jo.sdk.chat.completions.create(
        model="chat-b", messages=[{"role": "user", "content": f"say {realtime}"}]
    )
    ok_id, flaky_id, rt_id = (_sent_id(upstream, m) for m in (flex_ok, flaky, realtime))
    batch = jo.batch([chat_line("in-a-batch", model="chat-b")])
    wait_for_batch(jo.sdk, batch.id)

    def listed(**params: Any) -> Json:
        response = jo.http.get("/requests", params=params)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def settled() -> Json | None:
        page = listed()
        ended = [r for r in page["data"] if r["status"] in ("completed", "failed")]
        return page if len(ended) == page["total_count"] == 3 else None

    every = eventually(settled, "three ended rows")
    assert every["object"] == "list" and every["has_more"] is False
    assert [r["id"] for r in every["data"]] == [rt_id, flaky_id, ok_id]  # newest first
    row = {r["id"]: r for r in every["data"]}
    assert set(row[ok_id]) == {
        "id", "object", "model", "status", "created_at", "completed_at", "failed_at",
        "duration_ms", "response_status", "service_tier",
    }  # fmt: skip
    assert (row[ok_id]["status"], row[ok_id]["service_tier"]) == ("completed", "flex")
    assert row[ok_id]["duration_ms"] >= 0 and row[ok_id]["response_status"] == 200
    assert row[flaky_id]["status"] == "failed" and row[flaky_id]["failed_at"] is not None
    assert row[rt_id]["service_tier"] == "priority"
    assert [r["id"] for r in listed(status="failed")["data"]] == [flaky_id]
    assert [r["id"] for r in listed(service_tiers="priority")["data"]] == [rt_id]
    assert listed(service_tiers="flex,priority", models="chat-b")["total_count"] == 3
    assert listed(models="chat-a")["total_count"] == 0
    assert listed(created_after=start.isoformat())["total_count"] == 3
    assert listed(created_before=start.isoformat())["total_count"] == 0
    second = listed(skip=1, limit=1)
    assert [r["id"] for r in second["data"]] == [flaky_id] and second["has_more"] is True
    assert second["total_count"] == 3
    for params, message in (
        ({"skip": -1}, "skip must be >= 0"),
        ({"limit": 0}, "limit must be > 0"),
        ({"status": "done"}, None),
        ({"service_tiers": "gold"}, None),
        ({"active_first": "maybe"}, None),
        ({"created_after": "yesterday"}, None),
    ):
        bad = jo.http.get("/requests", params=params)
        assert bad.status_code == 400, params
        assert message is None or error_of(bad)["message"] == message
    assert eve.http.get("/requests").json()["total_count"] == 0

    # Detail: bodies parsed, the raw error text; batch rows and other users' rows are not here.
    ok = jo.http.get(f"/requests/{ok_id}").json()
    assert ok["body"]["messages"][0]["content"] == f"say {flex_ok}"
    assert ok["response_body"]["object"] == "chat.completion" and ok["error"] is None
    failed = jo.http.get(f"/requests/resp_{flaky_id}").json()
    assert failed["status"] == "failed" and json.loads(failed["error"])["details"]["status"] == 400
    batch_row = ids.request_id(batch.id, 0)
    for who, request_id in ((jo, batch_row), (eve, ok_id), (jo, str(uuid.uuid4()))):
        for method, tail in (("GET", ""), ("POST", "/cancel"), ("POST", "/retry"), ("DELETE", "")):
            missing = who.http.request(method, f"/requests/{request_id}{tail}")
            assert missing.status_code == 404, (method, tail)
            assert error_of(missing)["message"] == f"Request with ID {request_id} not found"
    assert jo.http.get("/requests/nope").status_code == 400

    # Retry: failed flex rows only; it runs again (and this time the fake answers).
    for request_id in (ok_id, rt_id):
        refused = jo.http.post(f"/requests/{request_id}/retry")
        assert refused.status_code == 400
    assert error_of(jo.http.post(f"/requests/{ok_id}/retry"))["message"] == (
        f"Request {ok_id} is not in a failed state"
    )
    retried = jo.http.post(f"/requests/{flaky_id}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] in ("pending", "claimed", "processing", "completed")
    assert retried.json()["error"] is None
    eventually(
        lambda: jo.http.get(f"/requests/{flaky_id}").json()["status"] == "completed" or None,
        "the retried row to complete",
    )

    # Cancel: ended rows are a conflict.
    for request_id in (ok_id, rt_id):
        conflict = jo.http.post(f"/requests/{request_id}/cancel")
        assert conflict.status_code == 409
    assert error_of(jo.http.post(f"/requests/{ok_id}/cancel"))["message"] == (
        "Cannot cancel a request with status 'completed'"
    )

    # Erasure: the row and its bodies go, flex and realtime alike.
    for request_id in (ok_id, rt_id):
        assert run(_bodies_of(stack_info, request_id)) > 0
        assert jo.http.delete(f"/requests/{request_id}").status_code == 204
        assert jo.http.get(f"/requests/{request_id}").status_code == 404
        assert run(_bodies_of(stack_info, request_id)) == 0
    assert [r["id"] for r in listed()["data"]] == [flaky_id]
    assert jo.http.delete(f"/requests/{ok_id}").status_code == 404


def test_cancelling_a_running_flex_request(
    caller_for: Callable[[str], Caller], upstream: FakeUpstreamControl
) -> None:
    kim = caller_for(user())
    mark = marker()
    upstream.script({"latency_ms": 30000}, marker=mark)
    accepted = kim.sdk.responses.create(
        model="chat-b", input=f"say {mark}", service_tier="flex", background=True
    )
    request_id = accepted.id.removeprefix("resp_")
    _sent_id(upstream, mark)  # its call is running upstream
    eventually(
        lambda: kim.http.get(f"/requests/{request_id}").json()["status"] == "processing" or None,
        "the call to be recorded as running",
    )
    # A newer request that has ended: listed first, unless active ones go first.
    newer = marker()
    _flex(kim, newer)
    newer_id = _sent_id(upstream, newer)
    by_age = kim.http.get("/requests").json()["data"]
    assert [r["id"] for r in by_age] == [newer_id, request_id]
    active = kim.http.get("/requests", params={"active_first": "true"}).json()["data"]
    assert [r["id"] for r in active] == [request_id, newer_id]

    answer = kim.http.post(f"/requests/{request_id}/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "canceled"
    assert kim.http.post(f"/requests/{request_id}/cancel").status_code == 409
    assert kim.sdk.responses.retrieve(accepted.id).status == "cancelled"
    assert kim.http.post(f"/requests/{request_id}/retry").status_code == 400
    assert kim.http.delete(f"/requests/{request_id}").status_code == 204


# -- listings --------------------------------------------------------------------------------


def test_listing_extras(caller_for: Callable[[str], Caller]) -> None:
    lee, eve = caller_for(user()), caller_for(user())
    first = lee.batch([chat_line("a", model="chat-b")])
    wait_for_batch(lee.sdk, first.id)
    running = lee.batch([chat_line(f"s{i}", latency_ms=3000) for i in range(8)])
    last = lee.batch([chat_line("c", model="chat-b")])
    wait_for_batch(lee.sdk, last.id)

    def page(**params: Any) -> list[str]:
        response = lee.http.get("/batches", params=params)
        assert response.status_code == 200, response.text
        return [b["id"] for b in response.json()["data"]]

    assert page() == [last.id, running.id, first.id]
    assert page(active_first="true") == [running.id, last.id, first.id]
    assert page(active_first="true", limit=1) == [running.id]
    assert page(active_first="true", after=running.id) == [last.id, first.id]
    assert page(active_first="true", after=last.id) == [first.id]
    assert page(after=running.id) == [first.id]
    assert page(after=str(uuid.uuid4())) == []  # unknown cursor: an empty page
    other = eve.batch([chat_line("e", model="chat-b")])
    assert page(after=other.id) == []  # another user's cursor too
    assert lee.http.get("/batches", params={"active_first": "x"}).status_code == 400
    lee.sdk.batches.cancel(running.id)

    files = lee.http.get("/files", params={"search": "in.json", "limit": 100}).json()["data"]
    assert {f["filename"] for f in files} == {"in.jsonl"} and len(files) == 3
    outputs = lee.http.get("/files", params={"search": f"{last.id}-OUTPUT"}).json()["data"]
    assert [f["id"] for f in outputs] == [last.output_file_id]
    assert lee.http.get("/files", params={"after": str(uuid.uuid4())}).json()["data"] == []
