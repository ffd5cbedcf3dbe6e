"""What must hold when things go wrong: bad messages on Kafka, replays, a worker killed."""

from __future__ import annotations

import signal
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from compose import postgres, stack
from compose.services import Services
from schemas import topics
from tests.integration.conftest import (
    caught_up,
    chat_line,
    content_lines,
    eventually,
    jsonl,
    project_to_end,
    read_topic,
    run,
    wait_for_batch,
)
from tests.integration.stuck import stuck

pytestmark = pytest.mark.integration


async def _produce(bootstrap: str, name: str, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(name, key=key, value=value)
    finally:
        await producer.stop()


def test_bad_commands_are_dead_lettered_and_the_agent_keeps_going(
    stack_info: stack.StackInfo, client_for: Callable[[str], OpenAI]
) -> None:
    bootstrap = stack_info.kafka_bootstrap
    batch_id = str(uuid.uuid4())
    run(_produce(bootstrap, topics.COMMANDS.name, b"junk", b"\x00not json"))
    bad_window = {
        "type": "CreateBatch", "command_id": str(uuid.uuid4()), "issued_at": "2026-01-01T00:00:00Z",
        "batch_id": batch_id, "owner": "mallory", "input_file_id": str(uuid.uuid4()),
        "endpoint": "/v1/chat/completions", "completion_window": "forever",
    }  # fmt: skip
    run(
        _produce(
            bootstrap, topics.COMMANDS.name, batch_id.encode(), msgspec.json.encode(bad_window)
        )
    )

    # The agent is still alive: a normal batch completes after the bad commands.
    client = client_for("henry")
    uploaded = client.files.create(
        file=("after.jsonl", jsonl([chat_line("after", model="chat-b")])), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for_batch(client, batch.id).status == "completed"

    letters = [msgspec.json.decode(r.value) for r in run(read_topic(bootstrap, topics.DEADLETTER))]
    junk = [x for x in letters if x["key"] == "junk"]
    window = [x for x in letters if x["key"] == batch_id]
    assert (
        junk
        and junk[0]["source_topic"] == topics.COMMANDS.name
        and "invalid message" in junk[0]["reason"]
    )
    assert window and "completion_window" in window[0]["reason"]
    with pytest.raises(Exception, match="not found"):
        client_for("mallory").batches.retrieve(batch_id)


# Columns that depend on when a row was written, not on the log.
_VOLATILE = {"projected_at"}
_TABLES = {
    "files": "id", "request_templates": "file_id, line_number", "template_chunks": "body_key",
    "bodies": "ref, kind", "batches": "id", "batch_counts": "batch_id", "requests": "id",
    "api_keys": "id", "batch_rejections": "batch_id",
}  # fmt: skip


async def _snapshot(dsn: str) -> dict[str, list[dict[str, Any]]]:
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for table, order in _TABLES.items():
            rows = await conn.fetch(f"SELECT * FROM {table} ORDER BY {order}")
            out[table] = [{k: v for k, v in dict(r).items() if k not in _VOLATILE} for r in rows]
        return out
    finally:
        await conn.close()


def test_replaying_the_log_rebuilds_identical_read_models(
    stack_info: stack.StackInfo, client_for: Callable[[str], OpenAI]
) -> None:
    client = client_for("ivy")
    lines = [chat_line(f"r{i}", model="chat-b") for i in range(20)] + [
        chat_line("bad", model="chat-b", status=400)
    ]
    uploaded = client.files.create(file=("replay.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for_batch(client, batch.id)
    _delete_and_erase(client)
    run(_replay_matches(stack_info, batch.id))


def test_replaying_retries_rebuilds_identical_read_models(
    stack_info: stack.StackInfo, client_for: Callable[[str], OpenAI]
) -> None:
    """A finished batch retried: its stamps, frozen counts and version replay identically."""
    client = client_for("ivy-retry")
    flaky = chat_line("again", model="chat-b", fail_times=1, fail_status=400)
    batch = _batch(client, [flaky, chat_line("fine", model="chat-b")])
    assert wait_for_batch(client, batch.id).request_counts.failed == 1
    headers = {"Authorization": f"Bearer {client.api_key}"}
    with httpx.Client(base_url=str(client.base_url), headers=headers, timeout=120) as http:
        assert http.post(f"batches/{batch.id}/retry").status_code == 200
    done = wait_for_batch(client, batch.id)
    assert (done.status, done.request_counts.completed) == ("completed", 2)
    run(_replay_matches(stack_info, batch.id))


def _diff(live: list[dict[str, Any]], rebuilt: list[dict[str, Any]]) -> str:
    """The fields that differ, row by row (live -> rebuilt), for a readable failure."""
    found = []
    for a, b in zip(live, rebuilt, strict=False):
        fields = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        if fields:
            found.append(f"{a.get('id')}: {fields}")
    if len(live) != len(rebuilt):
        found.append(f"{len(live)} rows live, {len(rebuilt)} rebuilt")
    return "; ".join(found)


async def _replay_matches(stack_info: stack.StackInfo, batch_id: str) -> None:
    """Replaying the whole log into an empty database rebuilds the live tables exactly, and
    replaying it again over them changes nothing."""
    bootstrap = stack_info.kafka_bootstrap
    await caught_up(stack_info.database_url, bootstrap, "projector")
    rebuilt = await postgres.create_database(stack_info.admin_database_url, "replay_check")
    try:
        await project_to_end(rebuilt, bootstrap)
        live, first = await _snapshot(stack_info.database_url), await _snapshot(rebuilt)
        for table in _TABLES:
            assert first[table] == live[table], f"{table} differs after a full replay: " + _diff(
                live[table], first[table]
            )
        assert any(r["id"] == uuid.UUID(batch_id) for r in first["batches"])
        # Replaying the same topics again over the rebuilt tables changes nothing.
        conn = await asyncpg.connect(rebuilt)
        await conn.execute("UPDATE projection_offsets SET next_offset = 0")
        await conn.close()
        await project_to_end(rebuilt, bootstrap)
        assert await _snapshot(rebuilt) == first
    finally:
        await postgres.drop_database(stack_info.admin_database_url, "replay_check")


def _delete_and_erase(client: OpenAI) -> None:
    """What deletions and erasures write must replay identically too: a batch deleted while it
    runs, and a flex and a realtime request erased (rows and bodies gone)."""
    headers = {"Authorization": f"Bearer {client.api_key}"}
    with httpx.Client(base_url=str(client.base_url), headers=headers, timeout=120) as http:
        doomed = _batch(client, [chat_line(f"gone{i}", latency_ms=500) for i in range(12)])
        wait_for_batch(client, doomed.id, {"in_progress"})
        assert http.delete(f"batches/{doomed.id}").status_code == 204

        say: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say erase me"}]
        client.chat.completions.create(model="chat-b", messages=say, service_tier="flex")
        client.chat.completions.create(model="chat-b", messages=say)

        def ended() -> list[dict[str, Any]] | None:  # a realtime outcome is recorded later
            rows: list[dict[str, Any]] = http.get("requests", params={"limit": 100}).json()["data"]
            return (
                rows if len(rows) == 2 and all(r["status"] == "completed" for r in rows) else None
            )

        listed = eventually(ended, "both requests to end", 60)
        assert {r["service_tier"] for r in listed} == {"flex", "priority"}
        for row in listed:
            assert http.delete(f"requests/{row['id']}").status_code == 204


def _batch(client: OpenAI, lines: list[dict[str, Any]]) -> Any:
    uploaded = client.files.create(file=("replay.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def test_killing_the_gate_mid_batch_still_ends_every_request_exactly_once(
    services: Services, stack_info: stack.StackInfo, client_for: Callable[[str], OpenAI]
) -> None:
    client = client_for("judy")
    lines = [chat_line(f"k{i}", latency_ms=150) for i in range(40)]  # chat-a: 4 at a time
    uploaded = client.files.create(file=("kill.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for_batch(client, batch.id, {"in_progress"})
    eventually(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4,  # type: ignore[union-attr]
        "the batch to be under way",
    )
    services.wait_restarted("gate-0", services.kill("gate-0", signal.SIGKILL))
    try:
        done = wait_for_batch(client, batch.id, timeout_s=180)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{stuck(services, stack_info, batch.id, 'chat-a')}") from exc

    assert done.status == "completed" and done.request_counts.completed == 40
    output = content_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"k{i}" for i in range(40))

    terminal: dict[str, set[str]] = defaultdict(set)
    for record in run(read_topic(stack_info.kafka_bootstrap, topics.REQUESTS)):
        events = msgspec.json.decode(record.value)["events"]
        for event in events:
            if (
                event["type"] in ("RequestCompleted", "RequestFailed", "RequestCanceled")
                and event["batch_id"] == batch.id
            ):
                terminal[event["request_id"]].add(event["event_id"])
    assert len(terminal) == 40
    assert all(len(ids) == 1 for ids in terminal.values()), (
        "a request has two different terminal events"
    )
