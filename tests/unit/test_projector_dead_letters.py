"""The projector's dead letters (projections/projector.py): one per refused event, each an
event of its own, so that a consumer that drops an event id it has seen keeps every reason."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiokafka.structs import ConsumerRecord

from projections.projector import Projector
from schemas import topics
from schemas.events import DeadLetter


class Producer:
    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[Any]:
        assert topic == topics.DEADLETTER.name
        self.sent.append(msgspec.json.decode(value, type=DeadLetter))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_two_events_refused_in_one_record_make_two_dead_letters() -> None:
    record = ConsumerRecord(topics.REQUESTS.name, 0, 7, 0, 0, b"k", b"{}", None, 1, 2, [])
    producer = Producer()
    refused = [(record, "RequestStarted does not apply to pending"), (record, "RequestCompleted does not apply to pending")]  # fmt: skip
    await Projector("", "")._dead_letter(producer, refused)
    assert [d.reason for d in producer.sent] == [f"projector: {r}" for _, r in refused]
    assert len({d.event_id for d in producer.sent}) == 2
    again = Producer()
    await Projector("", "")._dead_letter(again, refused)
    assert [d.event_id for d in again.sent] == [d.event_id for d in producer.sent]  # a replay
