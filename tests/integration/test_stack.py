"""The no-Docker stack itself: real Kafka and PostgreSQL up, used, and torn down."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from compose import kafka, postgres, stack
from schemas.topics import ALL, COMMANDS

pytestmark = pytest.mark.integration


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port.split("/", 1)[0])), timeout=1):
            return True
    except OSError:
        return False


async def _topic_settings(bootstrap: str) -> dict[str, tuple[int, str, str]]:
    """name -> (partitions, cleanup.policy, max.message.bytes) as the broker reports them."""
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
    settings: dict[str, tuple[int, str, str]] = {}
    for response in responses:
        # Positional: field names differ between DescribeConfigs versions.
        for _err, _msg, _type, name, entries, *_ in response.resources:
            config = {entry[0]: entry[1] for entry in entries}
            settings[name] = (
                partitions.get(name, 0),
                config["cleanup.policy"],
                config["max.message.bytes"],
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
            assert settings[topic.name] == (
                topic.partitions,
                policy,
                str(topic.max_message_bytes),
            ), topic.name
        await _query_postgres(info)
    finally:
        await asyncio.to_thread(stack.down, run_dir)

    assert not run_dir.exists()
    assert not pg_dir.exists()
    assert not any(_port_open(a) for a in addresses)
    # Zombies count as gone: pg_ctl returns as the postmaster exits, before init reaps it.
    assert not any(kafka.is_running(pid) for pid in info.pids.values())
