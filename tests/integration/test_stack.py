"""The no-Docker stack itself: real Kafka and PostgreSQL up, used, restarted on their data,
and torn down; and the service supervisor bringing back a killed process."""

from __future__ import annotations

import asyncio
import signal
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from compose import kafka, postgres, stack
from compose.services import ModelSpec, Services
from schemas.topics import (
    ALL,
    BATCHES,
    COMMANDS,
    FILES,
    REQUESTS,
    RESPONSES,
    WEBHOOK_DELIVERIES,
    Topic,
)
from tests.integration.conftest import own_stack, read_topic, until

pytestmark = pytest.mark.integration


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port.split("/", 1)[0])), timeout=1):
            return True
    except OSError:
        return False


async def _topic_settings(bootstrap: str) -> dict[str, tuple[int, str, str, str]]:
    """name -> (partitions, cleanup.policy, max.message.bytes, retention.ms) as the broker
    reports them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t.name for t in ALL]
        partitions = {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names)}
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
        )
    finally:
        await admin.close()
    settings: dict[str, tuple[int, str, str, str]] = {}
    for response in responses:
        # Positional: field names differ between DescribeConfigs versions.
        for _err, _msg, _type, name, entries, *_ in response.resources:
            config = {entry[0]: entry[1] for entry in entries}
            settings[name] = (
                partitions.get(name, 0),
                config["cleanup.policy"],
                config["max.message.bytes"],
                config["retention.ms"],
            )
    return settings


async def _produce_and_consume(bootstrap: str) -> None:
    key, value = uuid.uuid4().hex.encode(), b"hello from test_stack"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(COMMANDS.name, value, key=key)
    finally:
        await producer.stop()
    # A consumer group, not a bare assignment: the workers depend on group coordination.
    consumer = AIOKafkaConsumer(
        COMMANDS.name,
        bootstrap_servers=bootstrap,
        group_id=f"test-stack-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while True:
                msg = await consumer.getone()
                if msg.key == key:
                    break
        assert (msg.value, msg.partition, msg.offset) == (value, sent.partition, sent.offset)
        await consumer.commit()
    finally:
        await consumer.stop()


async def _query_postgres(info: stack.StackInfo) -> None:
    conn = await asyncpg.connect(info.database_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == postgres.DATABASE
        await conn.execute("CREATE TEMP TABLE probe (n int)")
        await conn.executemany("INSERT INTO probe VALUES ($1)", [(i,) for i in range(100)])
        assert await conn.fetchval("SELECT sum(n) FROM probe") == sum(range(100))
    finally:
        await conn.close()
    # The per-session database helpers the other suites use.
    name = f"test_stack_{uuid.uuid4().hex[:8]}"
    url = await postgres.create_database(info.admin_database_url, name, migrate_schema=True)
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT current_database()") == name
    finally:
        await conn.close()
    await postgres.drop_database(info.admin_database_url, name)
    conn = await asyncpg.connect(info.admin_database_url)
    try:
        assert await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name) is None
    finally:
        await conn.close()


async def test_stack_up_use_down(tmp_path: Path) -> None:
    run_dir = tmp_path / "stack"
    info = await stack.up(run_dir)
    addresses = [info.kafka_bootstrap, info.database_url.split("@", 1)[1]]
    pg_dir = (run_dir / "pg").resolve()  # may be a /tmp dir behind a symlink
    try:
        assert (run_dir / stack.STACK_FILE).is_file()
        assert all(_port_open(a) for a in addresses)
        # A second `up` on a live run dir reuses it instead of starting another stack.
        again = await stack.up(run_dir)
        assert (again.kafka_bootstrap, again.pids) == (info.kafka_bootstrap, info.pids)

        await _produce_and_consume(info.kafka_bootstrap)
        settings = await _topic_settings(info.kafka_bootstrap)
        for topic in ALL:
            policy = "compact" if topic.compacted else "delete"
            # What a replay rebuilds the read models from never expires; the rest keeps the
            # broker's default (seven days).
            kept = topic in (FILES, BATCHES, REQUESTS, RESPONSES, WEBHOOK_DELIVERIES)
            assert settings[topic.name] == (
                topic.partitions,
                policy,
                str(topic.max_message_bytes),
                "-1" if kept else topic.config.get("retention.ms", "604800000"),
            ), topic.name
        await _query_postgres(info)
    finally:
        await asyncio.to_thread(stack.down, run_dir)

    assert not run_dir.exists()
    assert not pg_dir.exists()
    assert not any(_port_open(a) for a in addresses)
    # Zombies count as gone: pg_ctl returns as the postmaster exits, before init reaps it.
    assert not any(kafka.is_running(pid) for pid in info.pids.values())


@pytest.fixture(scope="module")
def drill_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackInfo]:
    """A stack of its own for the restart drills, so the session stack is never disturbed."""
    yield from own_stack(tmp_path_factory.mktemp("drill") / "stack")


async def _cluster_id(bootstrap: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return str((await admin.describe_cluster())["cluster_id"])
    finally:
        await admin.close()


Record = tuple[bytes | None, bytes | None, int, int]  # key, value, partition, offset


async def _read_all(bootstrap: str, topic: Topic) -> set[Record]:
    """Every record of topic, as (key, value, partition, offset)."""
    return {(r.key, r.value, r.partition, r.offset) for r in await read_topic(bootstrap, topic)}


async def _committed(bootstrap: str, group: str, tp: TopicPartition) -> int:
    """The group's committed offset for tp. After a restart the group coordinator reloads
    __consumer_offsets once the broker is ready, and answers "no offset" meanwhile."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:

        async def known() -> tuple[int] | None:  # a tuple: offset 0 is an answer too
            offset = await consumer.committed(tp)
            return None if offset is None else (int(offset),)

        return (await until(known, f"{group}'s committed offset", 30))[0]
    finally:
        await consumer.stop()


async def test_kafka_stops_and_starts_on_its_data(drill_stack: stack.StackInfo) -> None:
    run_dir, bootstrap = drill_stack.run_dir, drill_stack.kafka_bootstrap
    cluster_id = await _cluster_id(bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent: set[Record] = set()
        for i in range(20):
            key, value = f"k{i}".encode(), uuid.uuid4().bytes
            meta = await producer.send_and_wait(COMMANDS.name, value, key=key)
            sent.add((key, value, meta.partition, meta.offset))
        # A consumer group's progress lives in __consumer_offsets: the workers resume from it.
        group, tp = f"drill-{uuid.uuid4().hex[:8]}", TopicPartition(COMMANDS.name, 0)
        committer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        await committer.start()
        try:
            committer.assign([tp])
            await committer.commit({tp: 7})
        finally:
            await committer.stop()

        restarted = await stack.restart_kafka(run_dir)
        assert restarted.kafka_bootstrap == bootstrap
        assert restarted.pids["kafka"] != drill_stack.pids["kafka"]
        assert await _cluster_id(bootstrap) == cluster_id
        assert await _read_all(bootstrap, COMMANDS) == sent
        assert await _committed(bootstrap, group, tp) == 7
        # A client connected before the restart carries on at the same address.
        async with asyncio.timeout(60):
            meta = await producer.send_and_wait(COMMANDS.name, b"after", key=b"after")
        sent.add((b"after", b"after", meta.partition, meta.offset))
    finally:
        await producer.stop()

    await stack.stop_kafka(run_dir)
    assert not _port_open(bootstrap)
    assert not kafka.is_running(restarted.pids["kafka"])
    # `up` on a stopped stack resumes it on its data rather than wiping it.
    resumed = await stack.up(run_dir)
    assert "resumed" in resumed.timings
    assert (resumed.kafka_bootstrap, resumed.database_url) == (bootstrap, drill_stack.database_url)
    assert await _cluster_id(bootstrap) == cluster_id
    assert await _read_all(bootstrap, COMMANDS) == sent


async def _drill_rows(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT sum(n) FROM drill_rows"))
    finally:
        await conn.close()


async def test_postgres_restarts_on_its_data(drill_stack: stack.StackInfo) -> None:
    run_dir, url = drill_stack.run_dir, drill_stack.database_url
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE drill_rows (n int)")
        await conn.executemany("INSERT INTO drill_rows VALUES ($1)", [(i,) for i in range(100)])
    finally:
        await conn.close()
    total = sum(range(100))

    before = stack.load(run_dir)
    assert before is not None
    restarted = await stack.restart_postgres(run_dir)
    assert restarted.database_url == url
    assert restarted.pids["postgres"] != before.pids["postgres"]
    assert await _drill_rows(url) == total

    await stack.stop_postgres(run_dir)
    assert not _port_open(url.split("@", 1)[1])
    started = await stack.start_postgres(run_dir)
    assert started.database_url == url
    assert await _drill_rows(url) == total


def test_the_supervisor_brings_back_a_killed_service(
    drill_stack: stack.StackInfo, tmp_path: Path
) -> None:
    services = Services(
        tmp_path / "services",
        drill_stack.kafka_bootstrap,
        drill_stack.database_url,
        {"chat-a": ModelSpec()},
    )
    # The fake upstream alone: it needs nothing from the engine, and its readiness is HTTP.
    stats = f"{services.upstream_url}/_stats"
    try:
        services.start_service(
            "upstream", "-m", "cannonade.testing.fake_upstream",
            "--port", str(services.upstream_port), "--latency-ms", "0",
        )  # fmt: skip
        services.wait_ready("upstream", timeout_s=60)
        for _ in range(2):
            killed = services.procs["upstream"]
            since = services.kill("upstream")
            assert killed.returncode == -signal.SIGKILL
            services.wait_restarted("upstream", since, timeout_s=60)
            assert services.procs["upstream"].pid != killed.pid
            with urllib.request.urlopen(stats, timeout=5) as response:
                assert response.status == 200
        assert services.restarts == {"upstream": 2}
        log = (services.logs / "upstream.log").read_text()
        # Back-to-back exits double the backoff.
        assert "restarting in 0.5s" in log and "restarting in 1.0s" in log
        assert "upstream restart #2" in log
    finally:
        services.stop()
    assert services.procs["upstream"].poll() is not None
    assert services.restarts == {"upstream": 2}
