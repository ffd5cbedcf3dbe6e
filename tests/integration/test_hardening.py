"""Issue 6's defects, each proven fixed against the running stack: slow readers, large and
retried uploads, bodies near the limit, out-of-range numbers, user content kept to compacted
topics, prompt cancels, expiry of in-flight work, batch headers upstream, commands published
straight to Kafka by an outside producer, key revocation."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import msgspec
import openai
import pytest
from aiokafka import AIOKafkaProducer
from openai import OpenAI
from openai.types import Batch

from compose import stack
from compose.services import Services
from projections.api.auth import create_key, revoke_key
from projections.api.publisher import Publisher
from schemas import bodies, ids, topics
from tests.integration.conftest import (
    chat_line,
    content_lines,
    eventually,
    jsonl,
    read_topic,
    run,
    upstream_stats,
    wait_for_batch,
)

pytestmark = pytest.mark.integration


def submit(client: OpenAI, lines: list[dict[str, object]], window: str = "24h") -> Batch:
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    )


def test_slow_readers_hold_no_database_connection(
    services: Services, client_for: Callable[[str], OpenAI], stack_info: stack.StackInfo
) -> None:
    client = client_for("slow-reader")
    lines = [chat_line(f"s{i}", model="chat-b") | {"pad": "x" * 200} for i in range(50_000)]
    uploaded = client.files.create(file=("big.jsonl", jsonl(lines)), purpose="batch")
    key = run(create_key(stack_info.kafka_bootstrap, stack_info.database_url, "slow-reader"))
    host, port = services.api_url.removeprefix("http://").split(":")
    readers = []
    for _ in range(10):  # more readers than the API has database connections
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            f"GET /v1/files/{uploaded.id}/content HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {key}\r\n\r\n".encode()
        )
        readers.append(sock)
    try:
        other = client_for("someone-else")
        started = time.monotonic()
        assert other.files.list().data == []
        done = wait_for_batch(other, submit(other, [chat_line("quick", model="chat-b")]).id)
        assert done.status == "completed"
        assert time.monotonic() - started < 30
        # The slow user's own extra downloads are refused rather than queued behind them.
        answer = httpx.get(
            f"{services.api_url}/v1/files/{uploaded.id}/content",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 429
        assert answer.json()["error"]["type"] == "rate_limit_error"
    finally:
        for sock in readers:
            sock.close()


def test_a_retried_upload_with_an_idempotency_key_names_the_same_file(
    client_for: Callable[[str], OpenAI],
) -> None:
    client = client_for("retrier")
    data = jsonl([chat_line(f"i{i}", model="chat-b") for i in range(3)])
    key = str(uuid.uuid4())
    first = client.files.create(
        file=("a.jsonl", data), purpose="batch", extra_headers={"Idempotency-Key": key}
    )
    again = client.files.create(
        file=("a.jsonl", data), purpose="batch", extra_headers={"Idempotency-Key": key}
    )
    assert again.id == first.id
    assert [f.id for f in client.files.list().data] == [first.id]
    # Once that file is deleted the key cannot name it again, nor bring it back.
    client.files.delete(first.id)
    with pytest.raises(openai.ConflictError) as refused:
        client.files.create(
            file=("a.jsonl", data), purpose="batch", extra_headers={"Idempotency-Key": key}
        )
    assert refused.value.code == "idempotency_key_reused"
    assert client.files.list().data == []


def test_a_body_near_the_limit_full_of_quotes_runs_and_comes_back_whole(
    client_for: Callable[[str], OpenAI],
) -> None:
    client = client_for("quoter")
    text = '"' * 4_500_000  # a 9 MB body once escaped: escaped again it would not fit a record
    line: dict[str, object] = {
        "custom_id": "quotes",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "chat-b", "messages": [{"role": "user", "content": text}]},
    }
    done = wait_for_batch(client, submit(client, [line]).id, timeout_s=180)
    assert done.status == "completed", done
    [output] = content_lines(client, done.output_file_id)
    assert output["response"]["body"]["choices"][0]["message"]["content"].count('"') >= len(text)
    [sent] = [json.loads(x) for x in client.files.content(done.input_file_id).text.splitlines()]
    assert sent["body"]["messages"][0]["content"] == text


def test_out_of_range_paging_numbers_are_client_errors(
    services: Services, client_for: Callable[[str], OpenAI], stack_info: stack.StackInfo
) -> None:
    client = client_for("pager")
    uploaded = client.files.create(file=("p.jsonl", jsonl([chat_line("p", model="chat-b")])), purpose="batch")  # fmt: skip
    key = run(create_key(stack_info.kafka_bootstrap, stack_info.database_url, "pager"))
    for params in ({"skip": "99999999999999999999"}, {"limit": "9999999999999999999"}, {"skip": "-1"}):  # fmt: skip
        answer = httpx.get(
            f"{services.api_url}/v1/files/{uploaded.id}/content",
            params=params,
            headers={"Authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] in params


def test_user_content_never_lands_on_a_topic_that_is_not_compacted(
    stack_info: stack.StackInfo, client_for: Callable[[str], OpenAI]
) -> None:
    client = client_for("private")
    marker = f"secret-{uuid.uuid4()}"
    line = chat_line("c-private", model="chat-b")
    line["body"]["messages"][0]["content"] = marker
    done = wait_for_batch(client, submit(client, [line]).id)
    assert done.status == "completed"
    assert marker in client.files.content(done.output_file_id).text  # the echo came back
    for topic in topics.ALL:
        if topic.compacted:
            continue
        records = run(read_topic(stack_info.kafka_bootstrap, topic))
        assert not any(marker.encode() in (r.value or b"") for r in records), topic.name


@pytest.mark.parametrize("after_calls", [1, 5, 9, 14, 22, 31])
def test_a_cancel_ends_a_running_batch_promptly_whenever_it_lands(
    client_for: Callable[[str], OpenAI], services: Services, after_calls: int
) -> None:
    client = client_for("canceller")

    def calls() -> int:
        return int(upstream_stats(services)["models"].get("chat-d", {}).get("calls", 0))

    before = calls()
    lines = [chat_line(f"c{i}", model="chat-d", latency_ms=200) for i in range(120)]
    batch = submit(client, lines)
    # Lands at a different moment of the claim/dispatch cycle each time.
    eventually(lambda: calls() >= before + after_calls, f"{after_calls} calls upstream", every_s=0.02)  # fmt: skip
    client.batches.cancel(batch.id)
    cancelled_at = time.monotonic()
    done = wait_for_batch(client, batch.id, {"cancelled"}, timeout_s=30)
    assert time.monotonic() - cancelled_at < 15, "a claim was left waiting for a report"
    assert done.request_counts.total == 120
    eventually(
        lambda: upstream_stats(services)["models"]["chat-d"]["in_flight"] == 0,
        "aborted calls to stop",
    )


def test_expiry_ends_in_flight_requests_and_the_files_stop_changing(
    client_for: Callable[[str], OpenAI],
) -> None:
    client = client_for("expirer")
    lines = [chat_line(f"e{i}", model="chat-d", latency_ms=40_000) for i in range(3)]
    batch = submit(client, lines, window="15s")
    done = wait_for_batch(client, batch.id, {"expired", "failed", "completed"}, timeout_s=60)
    assert done.status == "expired"
    eventually(lambda: len(content_lines(client, done.error_file_id)) == 3, "in-flight rows to end")
    errors = content_lines(client, done.error_file_id)
    assert {json.loads(e["error"]["message"])["type"] for e in errors} == {"BatchTerminated"}
    assert content_lines(client, done.output_file_id) == []


def test_batch_header_values_reach_the_upstream(
    services: Services, client_for: Callable[[str], OpenAI]
) -> None:
    from cannonade.testing.fake_upstream import FakeUpstreamControl

    control = FakeUpstreamControl(services.upstream_url)
    control.record(enabled=True)
    client = client_for("headers")
    marker = f"hdr-{uuid.uuid4()}"
    line = chat_line("h1", model="chat-b")
    line["body"]["messages"][0]["content"] = marker
    done = wait_for_batch(client, submit(client, [line]).id)
    [received] = control.received(marker=marker)
    headers = received.headers
    assert headers["x-fusillade-batch-id"] == done.id
    assert headers["x-fusillade-batch-completion-window"] == "24h"
    assert headers["x-fusillade-batch-endpoint"] == "/v1/chat/completions"
    assert headers["x-fusillade-custom-id"] == "h1"
    assert headers["x-fusillade-request-id"] == ids.request_id(done.id, 0)
    assert headers["authorization"] == "Bearer local-upstream-key"  # never the caller's key


async def _outside_producer(bootstrap: str, file_id: str, batch_id: str, owner: str) -> None:
    """What an upstream service does to run a batch without the HTTP API."""
    upload = str(uuid.uuid4())
    publisher = Publisher(bootstrap)
    try:
        body = b'{"model":"chat-b","messages":[{"role":"user","content":"from kafka"}]}'
        key = bodies.chunk_key(file_id, upload, 0)
        [ref] = await publisher.bodies(
            [
                (
                    key,
                    bodies.encode_chunk([("k1", body)]),
                    bodies.partition_for(file_id, topics.BODIES.partitions),
                )
            ]  # fmt: skip
        )
    finally:
        await publisher.stop()
    now = datetime.now(UTC).isoformat()
    commands = [
        (file_id, {"type": "AppendFileLines", "command_id": "a", "issued_at": now, "file_id": file_id,
                   "upload_id": upload, "first_line": 0, "body_key": key, "body": [ref.partition, ref.offset, -1],
                   "lines": [["k1", "POST", "/v1/chat/completions", "chat-b", len(body)]]}),
        (file_id, {"type": "CreateFile", "command_id": "b", "issued_at": now, "file_id": file_id,
                   "upload_id": upload, "owner": owner, "filename": "k.jsonl", "purpose": "batch",
                   "bytes": len(body), "line_count": 1, "expires_at": None}),
        (file_id, {"type": "CreateBatch", "command_id": "c", "issued_at": now, "batch_id": batch_id,
                   "owner": owner, "input_file_id": file_id, "endpoint": "/v1/chat/completions",
                   "completion_window": "24h"}),
    ]  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key_, command in commands:
            await producer.send_and_wait(
                topics.COMMANDS.name, msgspec.json.encode(command), key=key_.encode()
            )
    finally:
        await producer.stop()


async def _produce_commands(bootstrap: str, records: list[tuple[str, dict[str, object]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, command in records:
            await producer.send_and_wait(
                topics.COMMANDS.name, msgspec.json.encode(command), key=key.encode()
            )
    finally:
        await producer.stop()


def test_an_outside_producer_runs_a_batch_and_bad_commands_are_dead_lettered(
    stack_info: stack.StackInfo, client_for: Callable[[str], OpenAI]
) -> None:
    bootstrap = stack_info.kafka_bootstrap
    owner = "outsider"
    client = client_for(owner)
    file_id, batch_id = str(uuid.uuid4()), str(uuid.uuid4())
    run(_outside_producer(bootstrap, file_id, batch_id, owner))
    eventually(lambda: _exists(client, batch_id), "the outside producer's batch")
    done = wait_for_batch(client, batch_id)
    assert done.status == "completed"
    assert [line["custom_id"] for line in content_lines(client, done.output_file_id)] == ["k1"]

    now = datetime.now(UTC).isoformat()
    bad_batch, missing_file, bad_window = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    far_future = str(uuid.uuid4())  # decodes, then overflows the deadline arithmetic
    base: dict[str, object] = {"type": "CreateBatch", "command_id": "x", "issued_at": now, "owner": owner,
                               "endpoint": "/v1/chat/completions", "completion_window": "24h"}  # fmt: skip
    run(
        _produce_commands(
            bootstrap,
            [
                ("f", base | {"batch_id": "not-a-uuid", "input_file_id": "f"}),  # schema-invalid
                (file_id, base | {"batch_id": bad_batch, "input_file_id": file_id, "colour": 1}),
                (missing_file, base | {"batch_id": str(uuid.uuid4()), "input_file_id": missing_file}),
                (file_id, base | {"batch_id": bad_window, "input_file_id": file_id, "completion_window": "7d"}),
                (far_future, {"type": "SubmitRequest", "command_id": "y", "issued_at": now, "request_id": far_future,
                              "owner": owner, "model": "chat-b", "path": "/v1/chat/completions", "body": [0, 0],
                              "created_at": "9999-12-31T23:00:00Z"}),
            ],
        )
    )  # fmt: skip
    # No command stalls the stream: another user's upload goes straight through.
    started = time.monotonic()
    other = client_for("after-outsider")
    assert wait_for_batch(other, submit(other, [chat_line("after", model="chat-b")]).id).status == "completed"  # fmt: skip
    assert time.monotonic() - started < 20
    letters = [msgspec.json.decode(r.value) for r in run(read_topic(bootstrap, topics.DEADLETTER))]
    reasons = {x["key"]: x["reason"] for x in letters}
    assert "batch_id" in reasons["f"]
    assert "colour" in reasons[file_id]
    assert reasons[far_future].startswith("commands agent could not apply it: OverflowError")
    # Well-formed commands that break a rule get a verdict, as the API would answer it.
    rejections = run(_rejections(stack_info.database_url))
    assert rejections[bad_window][0] == 400 and "completion_window" in rejections[bad_window][1]
    assert any(status == 404 for status, _ in rejections.values())


def _exists(client: OpenAI, batch_id: str) -> bool:
    try:
        client.batches.retrieve(batch_id)
        return True
    except Exception:
        return False


async def _rejections(dsn: str) -> dict[str, tuple[int, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT batch_id::text, status, message FROM batch_rejections")
        return {r[0]: (r[1], r[2]) for r in rows}
    finally:
        await conn.close()


def test_a_revoked_key_stops_working(services: Services, stack_info: stack.StackInfo) -> None:
    async def scenario() -> str:
        publisher = Publisher(stack_info.kafka_bootstrap)
        conn = await asyncpg.connect(stack_info.database_url)
        try:
            from projections.api.auth import issue_key

            key_id, secret = await issue_key(publisher, conn, "revoked")
            assert await revoke_key(publisher, conn, key_id)
            return secret
        finally:
            await conn.close()
            await publisher.stop()

    secret = asyncio.run(scenario())
    answer = httpx.get(
        f"{services.api_url}/v1/files", headers={"Authorization": f"Bearer {secret}"}
    )
    assert answer.status_code == 401
