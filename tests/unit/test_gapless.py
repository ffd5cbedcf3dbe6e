"""An agent's input with records the consumer dropped (streams.gapless), without Kafka."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from faust.types import TP

from streams.gapless import CONTIGUOUS, Gapless, Record, Refetched

TOPIC = "cannonade.gate.v1"
COMPACTED = "cannonade.model-filters.v1"
TP0 = TP(TOPIC, 0)


class Message:
    def __init__(self, topic: str, offset: int, generation: int) -> None:
        self.topic, self.partition, self.offset = topic, 0, offset
        self.generation_id = generation
        self.tp = TP(topic, 0)


class Event:
    def __init__(self, topic: str, offset: int, generation: int = 1) -> None:
        self.message = Message(topic, offset, generation)
        self.value = f"v{offset}".encode()
        self.acked = False

    def ack(self) -> None:
        self.acked = True


class Consumer:
    """What Gapless reads and writes of Faust's consumer."""

    def __init__(self, committed: int | None = None) -> None:
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        if committed is not None:
            self._committed_offset[TP0] = committed
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self.generation = 1  # the group generation now


class Broker:
    """The partition's log; fails the first ``failures`` reads (the broker away)."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.reads: list[tuple[int, int]] = []

    async def fetch(self, tp: TP, start: int, end: int) -> list[Record]:
        self.reads.append((start, end))
        if self.failures:
            self.failures -= 1
            raise OSError("broker away")
        return [
            Record(tp.topic, tp.partition, o, b"k", f"v{o}".encode()) for o in range(start, end)
        ]


async def _events(events: list[Event]) -> AsyncIterator[Any]:
    for event in events:
        yield event


async def taken(gapless: Gapless, events: list[Event], acks: bool = True) -> list[Any]:
    return [event async for event in gapless.events(_events(events), acks=acks)]


def offsets(items: list[Any]) -> list[int]:
    return [item.message.offset for item in items]


def gapless(consumer: Consumer, broker: Broker, **options: Any) -> Gapless:
    return Gapless(consumer, lambda: consumer.generation, broker.fetch, **options)


async def test_a_record_dropped_mid_stream_is_read_again_and_handed_over_in_order() -> None:
    consumer, broker = Consumer(committed=10), Broker()
    got = await taken(gapless(consumer, broker), [Event(TOPIC, o) for o in (10, 11, 14, 15)])
    assert offsets(got) == [10, 11, 12, 13, 14, 15]
    assert [item.value for item in got[2:4]] == [b"v12", b"v13"]
    assert broker.reads == [(12, 14)]
    # Acknowledged as Faust would have, so its commits move past them.
    assert consumer._acked[TP0] == [12, 13]


async def test_the_first_record_after_an_assignment_is_checked_against_the_committed_offset() -> None:  # fmt: skip
    consumer, broker = Consumer(committed=10), Broker()
    got = await taken(gapless(consumer, broker), [Event(TOPIC, 11), Event(TOPIC, 12)])
    assert offsets(got) == [10, 11, 12]


async def test_a_dropped_record_that_comes_again_is_handed_over_again() -> None:
    """Taking an input twice is what every agent survives; skipping one is not."""
    consumer, broker = Consumer(committed=10), Broker()
    late = Event(TOPIC, 11)
    got = await taken(gapless(consumer, broker), [Event(TOPIC, 10), Event(TOPIC, 12), late])
    assert offsets(got) == [10, 11, 12, 11]
    assert isinstance(got[1], Refetched) and got[3] is late
    assert broker.reads == [(11, 12)]  # and the late copy does not move the expectation back


async def test_by_hand_the_agent_acknowledges_what_was_read_again() -> None:
    consumer, broker = Consumer(committed=10), Broker()
    got = await taken(gapless(consumer, broker), [Event(TOPIC, 12)], acks=False)
    assert offsets(got) == [10, 11, 12] and consumer._acked[TP0] == []
    got[0].ack()
    got[1].ack()
    assert consumer._acked[TP0] == [10, 11]


async def test_after_a_rebalance_records_read_before_are_handed_over_again() -> None:
    """At least once: a new assignment starts again from the committed offset."""
    consumer, broker = Consumer(committed=10), Broker()
    reader = gapless(consumer, broker)
    await taken(reader, [Event(TOPIC, 10), Event(TOPIC, 11), Event(TOPIC, 12)])
    again = [Event(TOPIC, 11, generation=2), Event(TOPIC, 12, generation=2)]
    consumer._committed_offset[TP0], consumer.generation = 11, 2
    assert offsets(await taken(reader, again)) == [11, 12]
    assert broker.reads == []


async def test_without_a_committed_offset_the_first_record_starts_the_partition() -> None:
    broker = Broker()
    got = await taken(gapless(Consumer(), broker), [Event(TOPIC, 7), Event(TOPIC, 8)])
    assert offsets(got) == [7, 8] and broker.reads == []


async def test_holes_in_a_compacted_topic_are_left_alone() -> None:
    assert TOPIC in CONTIGUOUS and COMPACTED not in CONTIGUOUS
    consumer, broker = Consumer(), Broker()
    consumer._committed_offset[TP(COMPACTED, 0)] = 3
    events = [Event(COMPACTED, 5), Event(COMPACTED, 9)]
    reader = gapless(consumer, broker, contiguous=frozenset({TOPIC}))
    assert offsets(await taken(reader, events)) == [5, 9] and broker.reads == []


async def test_while_the_broker_is_away_the_agent_waits_rather_than_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("streams.gapless._BACKOFF_FIRST_S", 0.0)
    consumer, broker = Consumer(committed=10), Broker(failures=2)
    got = await taken(gapless(consumer, broker), [Event(TOPIC, 12)])
    assert offsets(got) == [10, 11, 12] and broker.reads == [(10, 12)] * 3


async def test_a_late_acknowledgement_after_a_rebalance_changes_nothing() -> None:
    """The partition may be another worker's now; its commit is the new owner's to move."""
    consumer = Consumer(committed=10)
    again = Refetched(Record(TOPIC, 0, 11, None, None), gapless(consumer, Broker()), 1)
    consumer.generation = 2
    again.ack()
    assert consumer._acked[TP0] == []
