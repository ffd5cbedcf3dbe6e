"""The projector's fetch pacing against the real broker: what `set_fetch_min_bytes` sets is what
the consumer's next fetch requests ask the broker for (aiokafka takes the setting at
construction only; the pacing reaches into its fetcher)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from compose import stack
from projections.fetch_pacing import set_fetch_min_bytes
from schemas import topics
from tests.integration.conftest import run

pytestmark = pytest.mark.integration


def test_the_next_fetches_ask_the_broker_for_the_minimum_set(stack_info: stack.StackInfo) -> None:
    async def asked(minimum: int) -> set[int]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=stack_info.kafka_bootstrap, fetch_max_wait_ms=20,
            fetch_min_bytes=1, enable_auto_commit=False,
        )  # fmt: skip
        await consumer.start()
        try:
            sent: list[Any] = []
            send = consumer._client.send

            async def recording(node_id: int, request: Any, **kwargs: Any) -> Any:
                if request.API_KEY == 1:  # Fetch
                    sent.append(request)
                return await send(node_id, request, **kwargs)

            consumer._client.send = recording
            set_fetch_min_bytes(consumer, minimum)
            consumer.assign([TopicPartition(topics.WORKERS.name, 0)])
            async with asyncio.timeout(30):
                while len(sent) < 3:
                    await consumer.getmany(timeout_ms=100)
            return {request._min_bytes for request in sent}
        finally:
            await consumer.stop()

    assert run(asked(4321)) == {4321}
    assert run(asked(1)) == {1}
