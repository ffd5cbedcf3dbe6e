"""The write path's readers by offset, against the real broker: the executor's body reader
(template bodies by ``BodyRef``) and the step executors' chain ledger (what the chain log says
of a step). Each test reads a topic of its own, so nothing else writes there."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from aiokafka import AIOKafkaProducer
from msgspec.json import encode

from compose import kafka, stack
from schemas import bodies, topics
from schemas.bodies import BodyRef
from schemas.events import ResponseFinalized, StepCompleted, StepStarted
from streams.chains.ledger import KafkaLedger
from streams.chains.runner import StepStatus
from streams.execution.bodies import BodyGone, BodyReader, Template
from streams.paused_reader import PausedReader

pytestmark = pytest.mark.integration

PARTITIONS = 2
R = TypeVar("R", bound=PausedReader)


@pytest.fixture
def bootstrap(stack_info: stack.StackInfo) -> str:
    return stack_info.kafka_bootstrap


async def _fresh_topic(bootstrap: str, kind: str) -> str:
    name = f"test.{kind}.{uuid.uuid4().hex[:8]}"
    await kafka.create_topics(
        bootstrap, [topics.Topic(name, key="test", partitions=PARTITIONS, carries="test")]
    )
    return name


@contextlib.asynccontextmanager
async def _running(reader: R) -> AsyncIterator[R]:
    await reader.start()
    try:
        yield reader
    finally:
        await reader.stop()


async def _send(
    bootstrap: str, topic: str, records: list[tuple[int, bytes, bytes | None]]
) -> list[BodyRef]:
    """(partition, key, value) records in order; where each landed."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        landed = []
        for partition, key, value in records:
            meta = await producer.send_and_wait(topic, value, key=key, partition=partition)
            landed.append(BodyRef(meta.partition, meta.offset))
        return landed
    finally:
        await producer.stop()


async def test_the_body_reader_reads_lines_of_chunks_and_whole_bodies_on_any_partition(
    bootstrap: str,
) -> None:
    topic = await _fresh_topic(bootstrap, "bodies")
    chunk = bodies.encode_chunk([("a-0", b'{"n": 0}'), ("a-1", b'{"n": 1}'), (None, b"{}")])
    key = bodies.key(bodies.CHUNK, f"{uuid.uuid4()}:0").encode()
    raw = bodies.key(bodies.TEMPLATE, str(uuid.uuid4())).encode()
    at = await _send(
        bootstrap,
        topic,
        [(0, key, chunk), (1, raw, b'{"whole": true}'), (1, raw, None)],
    )
    reader = BodyReader(bootstrap, topic=topic, partitions=PARTITIONS, fetch_timeout_s=5)
    async with _running(reader):
        # Both partitions at once, each read its own record.
        first, whole = await asyncio.gather(
            reader.template(BodyRef(at[0].partition, at[0].offset, 1)),
            reader.template(at[1]),
        )
        assert first == Template("a-1", b'{"n": 1}')
        assert whole == Template(None, b'{"whole": true}')
        # The other lines of the chunk, one without an id.
        assert await reader.template(BodyRef(0, at[0].offset, 0)) == Template("a-0", b'{"n": 0}')  # fmt: skip
        assert await reader.template(BodyRef(0, at[0].offset, 2)) == Template(None, b"{}")
        with pytest.raises(BodyGone, match="line 3 is not in the chunk"):
            await reader.template(BodyRef(0, at[0].offset, 3))
        # A tombstone where a body was asked for: erased, not an empty body.
        with pytest.raises(BodyGone, match="erased"):
            await reader.template(at[2])


async def test_the_body_reader_says_gone_for_an_offset_never_written(bootstrap: str) -> None:
    topic = await _fresh_topic(bootstrap, "bodies")
    reader = BodyReader(bootstrap, topic=topic, partitions=PARTITIONS, fetch_timeout_s=2)
    async with _running(reader):
        with pytest.raises(BodyGone, match="no record at 1@5"):
            await reader.template(BodyRef(1, 5))
        # The reader is not stuck on that partition: a body written later reads.
        [at] = await _send(bootstrap, topic, [(1, b"tpl:x", b"{}")])
        assert await reader.template(at) == Template(None, b"{}")


async def test_the_ledger_tells_a_step_unseen_started_finished_and_its_chain_over(
    bootstrap: str,
) -> None:
    topic = await _fresh_topic(bootstrap, "responses")
    since = datetime.now(UTC) - timedelta(seconds=5)
    response, step, other = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    ledger = KafkaLedger(bootstrap, topic=topic, partitions=PARTITIONS, fetch_timeout_s=10)

    def head() -> dict[str, Any]:
        return {"event_id": str(uuid.uuid4()), "occurred_at": datetime.now(UTC)}

    async def status(step_id: str) -> StepStatus:
        return await ledger.status(0, response, step_id, since)

    async with _running(ledger):
        assert await status(step) is StepStatus.UNSEEN  # an empty partition
        key = response.encode()
        await _send(bootstrap, topic, [(0, key, encode(StepStarted(**head(), response_id=response, step_id=step)))])  # fmt: skip
        assert await status(step) is StepStatus.STARTED
        assert await status(other) is StepStatus.UNSEEN
        # Appended after the first question: the next one reads on from where it stopped.
        ref = BodyRef(1, 0)
        await _send(bootstrap, topic, [
            (0, key, b"not json"),  # the chain agent dead-letters it; it says nothing here
            (0, key, encode(StepCompleted(**head(), response_id=response, step_id=step, payload=ref))),
            (1, key, encode(StepStarted(**head(), response_id=response, step_id=other))),
        ])  # fmt: skip
        assert await status(step) is StepStatus.FINISHED
        assert await status(other) is StepStatus.UNSEEN  # written to another partition
        await _send(bootstrap, topic, [
            (0, key, encode(ResponseFinalized(**head(), response_id=response, status=200, body=ref))),
        ])  # fmt: skip
        assert await status(other) is StepStatus.CHAIN_OVER
