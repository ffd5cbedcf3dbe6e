"""Publishes what the API accepts: bodies to the bodies topic, commands to the commands topic,
and the lifecycle facts of realtime requests (which no worker records) to the requests topic.

Every send waits for the broker's acknowledgement within a short bound, so a caller hears
"could not record" in seconds when the broker is away instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas import codec, topics
from schemas.bodies import BodyRef
from schemas.commands import AnyCommand, aggregate_id
from schemas.errors import ApiError
from schemas.events import ApiKey, ChainEvent, RequestTransitions

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0


def unavailable() -> ApiError:
    return ApiError(
        503, "Cannonade could not record the request right now; try again", code="unavailable"
    )


class Publisher:
    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        """The producer, started on first use: the API serves reads while the broker is away."""
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    acks="all",
                    enable_idempotence=True,
                    max_request_size=topics.MAX_MESSAGE_BYTES,
                    linger_ms=2,
                    request_timeout_ms=int(SEND_TIMEOUT_S * 1000),
                )
                try:
                    async with asyncio.timeout(SEND_TIMEOUT_S):
                        await producer.start()
                except (KafkaError, TimeoutError, OSError) as exc:
                    await producer.stop()
                    log.warning("broker unavailable: %r", exc)
                    raise unavailable() from exc
                self._producer = producer
            return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def _send(self, sends: Sequence[tuple[str, bytes | None, bytes, int | None]]) -> list[BodyRef]:  # fmt: skip
        producer = await self._started()
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                futures = [
                    await producer.send(topic, value, key=key, partition=partition)
                    for topic, value, key, partition in sends
                ]
                metadata = await asyncio.gather(*futures)
        except (KafkaError, TimeoutError, OSError) as exc:
            log.warning("publishing failed: %r", exc)
            raise unavailable() from exc
        return [BodyRef(m.partition, m.offset) for m in metadata]

    async def bodies(self, records: Sequence[tuple[str, bytes | None, int]]) -> list[BodyRef]:
        """Write (key, value, partition) records to the bodies topic; a None value is a
        tombstone. Returns where each landed."""
        return await self._send(
            [(topics.BODIES.name, value, key.encode(), p) for key, value, p in records]
        )

    async def commands(self, commands: Sequence[AnyCommand]) -> None:
        """Send in order (one aggregate's commands share a partition) and await every ack."""
        await self._send(
            [
                (topics.COMMANDS.name, codec.encode(c), aggregate_id(c).encode(), None)
                for c in commands
            ]
        )

    async def transitions(self, records: Sequence[RequestTransitions]) -> None:
        """Lifecycle records, keyed by model like the gate's, so one request's facts share a
        partition and keep their order."""
        await self._send(
            [(topics.REQUESTS.name, codec.encode(r), r.model.encode(), None) for r in records]
        )

    async def chain(self, response_id: str, event: ChainEvent) -> None:
        """A chain fact, keyed by its response: every fact of one chain shares a partition."""
        await self._send([(topics.RESPONSES.name, codec.encode(event), response_id.encode(), None)])

    async def key(self, key: ApiKey) -> None:
        await self._send([(topics.KEYS.name, codec.encode(key), key.key_id.encode(), None)])

    async def events(self, topic: topics.Topic, records: Sequence[tuple[str, msgspec.Struct]]) -> None:  # fmt: skip
        """(key, event) records for one catalog topic, in order, every ack awaited."""
        await self._send([(topic.name, codec.encode(e), key.encode(), None) for key, e in records])
