"""Integration fixtures: one real Kafka broker and PostgreSQL per test session (the project's
own stack), and every Cannonade service as a subprocess against them."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from openai import OpenAI

from cannonade.testing.fake_tools import FakeToolsControl
from cannonade.testing.fake_upstream import FakeUpstreamControl
from compose import postgres, stack
from compose.services import ModelSpec, Services
from projections import writers
from projections.api.auth import create_key
from projections.projector import TOPICS, Projector
from schemas import codec, topics
from schemas.events import BatchlessFacts, RequestCreated, RequestEvent, RequestTransitions

T = TypeVar("T")

# chat-a is small on purpose so that capacity and cancellation are observable; chat-c is the
# model whose liveness the tests change; chat-d carries the retry test.
MODELS = {
    "chat-a": ModelSpec("chat", 4),
    "chat-b": ModelSpec("chat", 16),
    "chat-c": ModelSpec("chat", 8),
    "chat-d": ModelSpec("chat", 8),
    "embed-a": ModelSpec("embeddings", 4),
}
# Users of the server-side tools (tools resolve only for listed users and models).
TOOL_USERS = [f"tool-user-{n}" for n in range(24)]
# Server-side tools on the fake tool server (its address is filled in at start).
TOOLS_CONFIG = "".join(
    f"""
[tools.{name}]
description = "{description}"
url = "{{tools_url}}/tools/{name}"
api_key = "tool-secret-{name}"
timeout_secs = {timeout}
models = ["chat-b"]
users = {json.dumps(TOOL_USERS)}
"""
    for name, description, timeout in (
        ("get_weather", "Current weather of a city", 20),
        ("lookup", "Looks a term up", 20),
        ("slow_tool", "Takes its time", 120),
    )
)
# Short liveness limits so that recovery is observable within a test; few retries so that
# exhausting them is.
TEST_CONFIG = """
[executor]
max_retries = 3
heartbeat_interval_ms = 1000
streamable_endpoints = ["/v1/completions"]

[liveness]
claim_timeout_ms = 20000
stale_daemon_threshold_ms = 6000

# A blocking flex call answers 504 after this long: short, so that the timeout is observable.
[responses]
poll_timeout_s = 15.0

# The purge worker runs (compose.services) but reaps nothing on its own during a session:
# test_resilience compares the live read model with a replay of the log, which a purge of
# rows under deleted batches would make differ.
[purge]
interval_ms = 0

# A model no test user may use (access is per user).
[models."chat-private"]
kind = "chat"
users = ["nobody"]
"""


def own_stack(run_dir: Path) -> Iterator[stack.StackInfo]:
    """Kafka and PostgreSQL in ``run_dir`` for a fixture's lifetime (``yield from``)."""
    info = asyncio.run(stack.up(run_dir))
    yield info
    stack.down(run_dir)


def own_database(info: stack.StackInfo, name: str, *, migrate_schema: bool = True) -> Iterator[str]:
    """A database of its own on the session's PostgreSQL for a fixture's lifetime (``yield
    from``): a suite that feeds the projector by hand, or listens for its notifications, must
    not share the running services' database."""
    url = run(postgres.create_database(info.admin_database_url, name, migrate_schema=migrate_schema))  # fmt: skip
    yield url
    run(postgres.drop_database(info.admin_database_url, name))


def own_services(
    run_dir: Path, info: stack.StackInfo, models: dict[str, ModelSpec], **options: Any
) -> Iterator[Services]:
    """Every Cannonade process on ``info``, with two gate and two executor processes: tests
    also check that capacity and exactly-once hold across workers sharing partitions."""
    svc = Services(run_dir, info.kafka_bootstrap, info.database_url, models, gates=2, executors=2, **options)  # fmt: skip
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def stack_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackInfo]:
    yield from own_stack(tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="session")
def services(
    stack_info: stack.StackInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Services]:
    yield from own_services(
        tmp_path_factory.mktemp("services"), stack_info, MODELS,
        extra_config=TEST_CONFIG + TOOLS_CONFIG,
        windows=("24h", "1h", "15s"),  # 15s: a batch that expires within a test
    )  # fmt: skip


@pytest.fixture
def tools(services: Services) -> FakeToolsControl:
    """The fake tool server of ``services`` (a module's own ``services`` when it has one)."""
    return FakeToolsControl(services.tools_url)


@pytest.fixture
def upstream(services: Services) -> FakeUpstreamControl:
    return FakeUpstreamControl(services.upstream_url)


def consumer_record(topic: str, offset: int, key: bytes, value: bytes | None) -> ConsumerRecord:
    """A record as a consumer hands it over (partition 0): the projector fed by hand."""
    return ConsumerRecord(topic, 0, offset, 0, 0, key, value, None, len(key), len(value or b""), [])  # fmt: skip


def requests_record(offset: int, key: bytes, *events: RequestEvent) -> ConsumerRecord:
    """``events`` as the gate writes one decision's: one record on the requests topic."""
    first = events[0]
    record = RequestTransitions(event_id=first.event_id, occurred_at=first.occurred_at, model=first.model, events=list(events))  # fmt: skip
    return consumer_record(topics.REQUESTS.name, offset, key, codec.encode(record))


def flex_created(request_id: str, at: datetime) -> RequestCreated:
    """A flex chat request without a batch, pending, due an hour after ``at``."""
    facts = BatchlessFacts(owner="u", path="/v1/chat/completions", service_tier="flex", created_at=at, deadline=at + timedelta(hours=1))  # fmt: skip
    return RequestCreated(event_id=f"created-{request_id}", occurred_at=at, request_id=request_id, model="m", state="pending", facts=facts)  # fmt: skip


async def apply_polls(conn: asyncpg.Connection, *polls: list[ConsumerRecord]) -> None:
    """Each poll applied in a transaction of its own, as the projector applies a poll; the
    read model must refuse none of the records."""
    for records in polls:
        async with conn.transaction():
            assert (await writers.apply(conn, records)).rejected == []


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def client_for(services: Services, stack_info: stack.StackInfo) -> Callable[[str], OpenAI]:
    """An unmodified ``openai`` client authenticated as ``user`` (a fresh key each call)."""

    def make(user: str) -> OpenAI:
        key = run(create_key(stack_info.kafka_bootstrap, stack_info.database_url, user))
        return OpenAI(base_url=f"{services.api_url}/v1", api_key=key, max_retries=0, timeout=60)

    return make


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode()


def chat_line(custom_id: str, model: str = "chat-a", **fake: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"say {custom_id}"}],
    }
    if fake:
        body["x_fake"] = fake
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


TERMINAL = {"completed", "failed", "cancelled", "expired"}


def wait_for_batch(
    client: OpenAI, batch_id: str, statuses: set[str] = TERMINAL, timeout_s: float = 120
) -> Any:
    seen: list[Any] = []

    def reached() -> Any:
        seen[:] = [client.batches.retrieve(batch_id)]
        return seen[0] if seen[0].status in statuses else None

    try:
        return eventually(reached, f"batch {batch_id} to reach {sorted(statuses)}", timeout_s, 0.2)
    except TimeoutError:
        raise TimeoutError(
            f"batch {batch_id} still {seen[0].status}: {seen[0].request_counts}"
        ) from None


def eventually(
    check: Callable[[], T | None], what: str, timeout_s: float = 120, every_s: float = 0.1
) -> T:
    """Poll ``check`` until it returns something truthy, and return that: tests wait on
    conditions, never on guesses of how long something takes."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every_s)
    return found


async def until(
    check: Callable[[], Awaitable[T | None]],
    what: str,
    timeout_s: float = 120,
    every_s: float = 0.2,
) -> T:
    """`eventually` for a coroutine ``check``, inside a running event loop."""
    deadline = time.monotonic() + timeout_s
    while not (found := await check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(every_s)
    return found


def barrier(client: OpenAI, model: str) -> None:
    """Run a one-line batch on ``model`` to completion. The engine has then claimed, sent and
    recorded work for the model after everything before it, so a check that nothing more
    happened (no late sends) needs no guessed quiet period."""
    uploaded = client.files.create(
        file=("barrier.jsonl", jsonl([chat_line("barrier", model=model)])), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for_batch(client, batch.id).status == "completed"


def upstream_stats(services: Services) -> dict[str, Any]:
    with urllib.request.urlopen(f"{services.upstream_url}/_stats") as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def content_lines(client: OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def log_path(services: Services, name: str) -> Path:
    return services.logs / f"{name}.log"


# -- reading the log and waiting on the projection --------------------------------------


async def read_topic(bootstrap: str, topic: topics.Topic, within_s: float = 60.0) -> list[Any]:
    """Every record now on ``topic`` (to the end offsets when the read began), within
    ``within_s``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=topics.MAX_MESSAGE_BYTES,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        records: list[Any] = []
        async with asyncio.timeout(within_s):
            while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def caught_up(dsn: str, bootstrap: str, name: str) -> None:
    """Wait until the projector ``name`` has applied everything now on its topics.

    The projector stores the offset after the last record it applied. Compaction (the erasure
    test forces it) can remove a partition's last records, so a partition whose stored offset
    stays short of its end for a while is checked for records past it: none means done."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    conn = await asyncpg.connect(dsn)
    try:
        end = await consumer.end_offsets(
            [TopicPartition(t.name, p) for t in TOPICS for p in range(t.partitions)]
        )
        seen: dict[TopicPartition, int] = {}
        since = time.monotonic()

        async def done() -> bool:
            nonlocal seen, since
            stored = {
                (r["topic"], r["partition"]): r["next_offset"]
                for r in await conn.fetch(
                    "SELECT * FROM projection_offsets WHERE consumer = $1", name
                )
            }
            lagging = {
                tp: at
                for tp, off in end.items()
                if (at := stored.get((tp.topic, tp.partition), 0)) < off
            }
            if not lagging:
                return True
            if lagging != seen:
                seen, since = lagging, time.monotonic()
                return False
            return time.monotonic() - since > 5 and not await _records_past(consumer, lagging)

        # Generous: the whole session's log is replayed, on a 2-core box shared with Kafka.
        await until(done, f"projector {name} to catch up", 300)
    finally:
        await conn.close()
        await consumer.stop()


async def _records_past(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> bool:
    """Whether any partition holds a record at or past its offset. Fetches until every
    partition has answered once (its high watermark is known): a fetch still under way on a
    loaded box must not pass for an empty partition and end the wait early."""
    consumer.assign(list(offsets))
    for tp, offset in offsets.items():
        consumer.seek(tp, offset)
    answered, give_up = False, time.monotonic() + 30
    while not answered:
        if time.monotonic() > give_up:
            return True  # unknown counts as "not caught up": the caller's own timeout decides
        answered = all(consumer.highwater(tp) is not None for tp in offsets)
        if any((await consumer.getmany(timeout_ms=500)).values()):
            return True
    return False


async def project_to_end(dsn: str, bootstrap: str) -> None:
    projector = Projector(dsn, bootstrap)
    task = asyncio.create_task(projector.run())
    try:
        await caught_up(dsn, bootstrap, "projector")
    finally:
        projector.stop()
        await task


def http_get(url: str) -> tuple[int, bytes, str]:
    """Status, body and content type of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")
