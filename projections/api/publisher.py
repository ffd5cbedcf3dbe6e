"""Publishes commands to Kafka for the API, waiting for the broker's acknowledgement."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from schemas import codec, topics
from schemas.commands import AnyCommand, aggregate_id


class CommandPublisher:
    def __init__(self, bootstrap: str) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            max_request_size=topics.COMMANDS.max_message_bytes,
            linger_ms=2,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, commands: Sequence[AnyCommand]) -> None:
        """Send in order (one aggregate's commands share a partition) and await every ack."""
        futures = [
            await self._producer.send(
                topics.COMMANDS.name, key=aggregate_id(c).encode(), value=codec.encode(c)
            )
            for c in commands
        ]
        await asyncio.gather(*futures)
