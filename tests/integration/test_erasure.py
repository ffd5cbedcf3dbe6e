"""A user's erasure end to end (core §5.3): after `cannonade users erase` and a forced
compaction, no byte of their prompt or completion text remains in any PostgreSQL table or on
any topic (changelogs included), and a full replay of the log into a fresh database does not
bring it back; another user's content is untouched, and a second erasure reports 0."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from openai import OpenAI

from cannonade.config import PurgeConfig
from cannonade.testing.fake_tools import FakeToolsControl
from cannonade.testing.fake_upstream import FakeUpstreamControl
from compose import postgres, stack
from compose.kafka import _topic_config
from compose.services import Services
from projections.purge import Purger, run_once
from schemas import bodies, topics
from tests.integration.conftest import (
    TOOL_USERS,
    caught_up,
    eventually,
    jsonl,
    project_to_end,
    read_topic,
    run,
    wait_for_batch,
)

pytestmark = pytest.mark.integration

ERASED = TOOL_USERS[-1]  # may use the server-side tools, so it can run a chain
BYSTANDER = "erasure-bystander"
MODEL = "chat-b"


def _line(custom_id: str, text: str, **fake: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    if fake:
        body["x_fake"] = fake
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def _batch(client: OpenAI, lines: list[dict[str, Any]], note: str = "erasure-test") -> Any:
    uploaded = client.files.create(file=("lines.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": note},
    )


async def _tables_holding(dsn: str, text: str) -> dict[str, int]:
    """Rows of every table whose text form holds ``text`` (bytea columns show as hex)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            )
        ]
        found = {}
        for table in tables:
            n = await conn.fetchval(
                f'SELECT count(*) FROM "{table}" t WHERE strpos(t::text, $1) > 0'
                " OR strpos(t::text, $2) > 0",
                text,
                text.encode().hex(),
            )
            if n:
                found[table] = n
        return found
    finally:
        await conn.close()


def _topics_holding(bootstrap: str, text: str) -> dict[str, int]:
    needle = text.encode()
    found = {}
    for topic in topics.ALL:
        records = run(read_topic(bootstrap, topic))
        n = sum(1 for r in records if needle in (r.value or b"") or needle in (r.key or b""))
        if n:
            found[topic.name] = n
    return found


def _erase(services: Services, user: str) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "cannonade.cli", "users", "erase", user],
        env=services.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    match = re.search(r"\(total (\d+)\)", done.stdout)
    assert match, done.stdout
    return int(match.group(1))


async def _alter(bootstrap: str, configs: dict[str, dict[str, str]]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, name, configs=c)
                for name, c in configs.items()
            ]  # fmt: skip
        )
    finally:
        await admin.close()


@contextmanager
def _eager_compaction(bootstrap: str) -> Iterator[None]:
    """Compacted topics clean at once (short segments, any dirt, no lag), until the end."""
    compacted = [t for t in topics.ALL if t.compacted]
    eager = {
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.01",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": "100",
    }
    run(_alter(bootstrap, {t.name: {**_topic_config(t), **eager} for t in compacted}))
    try:
        yield
    finally:
        run(_alter(bootstrap, {t.name: _topic_config(t) for t in compacted}))


async def _roll(bootstrap: str, topic: topics.Topic) -> None:
    """Append to every partition: once its active segment is older than ``segment.ms`` the
    append closes it, and the records and tombstones in it become cleanable."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition in range(topic.partitions):
            key = bodies.key(bodies.TEMPLATE, str(uuid.uuid4())).encode()
            await producer.send_and_wait(topic.name, None, key=key, partition=partition)
    finally:
        await producer.stop()


def test_erasing_a_user_leaves_none_of_their_text_in_the_read_model_or_on_any_topic(
    services: Services, stack_info: stack.StackInfo, client_for: Callable[[str], OpenAI]
) -> None:
    mark = f"erase{uuid.uuid4().hex}"  # only ever in the user's prompts and completions
    keep = f"keep{uuid.uuid4().hex}"
    bootstrap, dsn = stack_info.kafka_bootstrap, stack_info.database_url
    user, other = client_for(ERASED), client_for(BYSTANDER)
    upstream, tools = FakeUpstreamControl(services.upstream_url), FakeToolsControl(services.tools_url)  # fmt: skip

    # Everything a user can leave behind: a finished batch, a batch still running, realtime
    # and flex chat completions, and a chain with a server-side tool.
    done = _batch(user, [_line(f"c{i}", f"say {mark} {i}") for i in range(3)])
    assert wait_for_batch(user, done.id).status == "completed"
    # A batch they deleted themselves keeps its metadata until the erasure (metadata is not
    # content: it stays on the batches topic, the read model forgets it).
    meta = f"meta{uuid.uuid4().hex}"
    deleted = _batch(user, [_line("d0", "say nothing")], note=f"about {meta}")
    assert wait_for_batch(user, deleted.id).status == "completed"
    assert user.delete(f"/batches/{deleted.id}", cast_to=httpx.Response).status_code == 204
    running = _batch(user, [_line(f"s{i}", f"slowly {mark}", latency_ms=120_000) for i in range(2)])  # fmt: skip
    wait_for_batch(user, running.id, {"in_progress"})
    user.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"rt {mark}"}])
    user.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"flex {mark}"}],
        extra_body={"service_tier": "flex"},
    )  # fmt: skip
    upstream.script(
        {"tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"q": mark}}]},
        {"content": f"answer {mark}"},
        marker=f"chain {mark}",
    )
    tools.script({"result": {"echo": mark}}, tool="get_weather", marker=mark)
    assert user.responses.create(model=MODEL, input=f"chain {mark}").output_text == f"answer {mark}"  # fmt: skip
    kept = _batch(other, [_line("k0", f"say {keep}")])
    assert wait_for_batch(other, kept.id).status == "completed"

    run(caught_up(dsn, bootstrap, "projector"))
    before = run(_tables_holding(dsn, mark))
    assert {"template_chunks", "bodies", "response_steps"} <= set(before), before
    assert "batches" in run(_tables_holding(dsn, meta))  # the deleted batch's metadata
    assert topics.BODIES.name in _topics_holding(bootstrap, mark)

    assert _erase(services, ERASED) > 0
    assert _erase(services, ERASED) == 0  # idempotent: nothing left to do

    # The read model holds none of it at once; the other user's content is untouched.
    assert run(_tables_holding(dsn, mark)) == {}
    assert run(_tables_holding(dsn, meta)) == {}
    assert "bodies" in run(_tables_holding(dsn, keep))
    assert user.batches.list().data == [] and user.files.list().data == []
    assert [b.id for b in other.batches.list().data][:1] == [kept.id]

    # After compaction no topic holds it (changelogs included), and a replay of the whole log
    # into a fresh database does not bring it back.
    with _eager_compaction(bootstrap):

        def compacted() -> bool:
            run(_roll(bootstrap, topics.BODIES))  # rolls once the segment is old enough
            return not _topics_holding(bootstrap, mark)

        eventually(compacted, "the erased records to be compacted away", 180, every_s=1.0)
    assert topics.BODIES.name in _topics_holding(bootstrap, keep)

    async def replay() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        name = f"erasure_replay_{uuid.uuid4().hex[:8]}"
        rebuilt = await postgres.create_database(stack_info.admin_database_url, name)
        try:
            await project_to_end(rebuilt, bootstrap)
            erased, survived = await _tables_holding(rebuilt, mark), await _tables_holding(rebuilt, keep)  # fmt: skip
            # The purge reaps the rows left under the deleted batches and files (run on the
            # rebuilt copy: the session's read model must keep matching a replay of the log).
            pool = await asyncpg.create_pool(rebuilt, min_size=1, max_size=2)
            try:
                held: list[str] = []
                abandoned: list[tuple[str, str]] = []

                async def tombstone(keys: Sequence[str]) -> None:
                    held.extend(keys)

                async def abandon(uploads: Sequence[tuple[str, str]]) -> None:
                    abandoned.extend(uploads)

                await run_once(
                    Purger(pool, tombstone, abandon, timedelta(days=1)),
                    PurgeConfig(throttle_ms=1),
                )
            finally:
                await pool.close()
            assert not [k for k in held if k.split(":")[1] in owned_ids], held
            assert not abandoned  # every upload of the log made its file
            return erased, survived, await _rows_owned(rebuilt, ERASED)
        finally:
            await postgres.drop_database(stack_info.admin_database_url, name)

    owned_ids = run(_ids_owned(dsn, ERASED))
    assert owned_ids  # rows and files of the erased user are left for the purge
    erased, survived, left = run(replay())
    assert erased == {}
    assert "bodies" in survived
    assert left == {"batch rows": 0, "templates": 0}, left


async def _rows_owned(dsn: str, user: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "batch rows": await conn.fetchval(
                "SELECT count(*) FROM requests r JOIN batches b ON b.id = r.batch_id"
                " WHERE b.owner = $1",
                user,
            ),
            "templates": await conn.fetchval(
                "SELECT count(*) FROM request_templates t JOIN files f ON f.id = t.file_id"
                " WHERE f.owner = $1",
                user,
            ),
        }
    finally:
        await conn.close()


async def _ids_owned(dsn: str, user: str) -> set[str]:
    """Ids of the user's rows under batches and of their files (the ids in their body keys)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT r.id::text AS id FROM requests r JOIN batches b ON b.id = r.batch_id"
            " WHERE b.owner = $1 UNION SELECT id::text FROM files WHERE owner = $1",
            user,
        )
        return {r["id"] for r in rows}
    finally:
        await conn.close()
