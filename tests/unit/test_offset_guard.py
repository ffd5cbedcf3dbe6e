"""Faust's commit and seek, as streams.offset_guard leaves them (no Kafka)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP
from intervaltree import IntervalTree

from streams import offset_guard

GATE = TP("cannonade.gate.v1", 0)  # no holes by design
FILTERS = TP("cannonade.model-filters.v1", 0)  # compacted

# The functions as Faust ships them and as the guard replaces them (installed or not).
FAUST_NEW_OFFSET = offset_guard._new_offset
GUARDED_NEW_OFFSET = offset_guard._committable


class Consumer:
    """The state Faust's commit reads and writes, for one partition."""

    def __init__(self, tp: TP, committed: int | None, acked: list[int]) -> None:
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self._committed_offset[tp] = committed
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._acked[tp] = list(acked)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._acked_index[tp] = set(acked)
        self._gap: defaultdict[TP, IntervalTree] = defaultdict(IntervalTree)


def commit_of(new_offset: Any, tp: TP, committed: int | None, acked: list[int], gap: tuple[int, int] | None = None) -> Any:  # fmt: skip
    consumer = Consumer(tp, committed, acked)
    if gap is not None:
        consumer._gap[tp].addi(*gap)
    return new_offset(consumer, tp)


def test_a_record_never_acknowledged_at_the_committed_offset_is_not_committed_past() -> None:
    # Record 10 was dropped; 11 and 12 were taken: Faust commits 13, passing 10 for good.
    assert commit_of(FAUST_NEW_OFFSET, GATE, 10, [11, 12]) == 13
    assert commit_of(GUARDED_NEW_OFFSET, GATE, 10, [11, 12]) is None
    # Once 10 is taken (read again by streams.gapless, or on a later assignment), all go.
    assert commit_of(GUARDED_NEW_OFFSET, GATE, 10, [12, 10, 11]) == 13


def test_a_commit_stops_before_the_first_offset_not_acknowledged() -> None:
    assert commit_of(GUARDED_NEW_OFFSET, GATE, 10, [10, 11, 13]) == 12
    assert commit_of(GUARDED_NEW_OFFSET, GATE, None, [4, 5]) == 6  # no commit yet
    assert commit_of(GUARDED_NEW_OFFSET, GATE, 10, []) is None


def test_offsets_missing_from_the_fetched_sequence_do_not_count_as_done() -> None:
    # Faust counts a jump in the offsets it fetched as acknowledged; on a topic without holes
    # the jump is a dropped record.
    assert commit_of(FAUST_NEW_OFFSET, GATE, 10, [10, 13], gap=(11, 13)) == 14
    assert commit_of(GUARDED_NEW_OFFSET, GATE, 10, [10, 13], gap=(11, 13)) == 11


def test_a_compacted_topic_keeps_fausts_rule() -> None:
    for case in ((10, [11, 12], None), (10, [10, 13], (11, 13))):
        assert commit_of(GUARDED_NEW_OFFSET, FILTERS, *case) == commit_of(FAUST_NEW_OFFSET, FILTERS, *case)  # fmt: skip


async def test_a_seek_stops_the_flow_before_it_moves_the_partitions() -> None:
    """Records fetched between the seek's start and the recovery's emptying of the queues
    would reach the agents and then be thrown away with the queues."""
    steps: list[str] = []

    class Seeking:
        _read_offset: dict[TP, int | None] = {}
        _committed_offset: dict[TP, int | None] = {}

        def stop_flow(self) -> None:
            steps.append("flow stopped")

        async def seek_to_committed(self) -> dict[TP, int]:
            steps.append("sought")
            return {GATE: 10}

    await offset_guard._perform_seek(Seeking())
    assert steps == ["flow stopped", "sought"]
    assert Seeking._committed_offset == {GATE: 10} and Seeking._read_offset == {GATE: 10}


def test_installed_in_fausts_consumer() -> None:
    offset_guard.install()
    assert FaustConsumer._new_offset is GUARDED_NEW_OFFSET
    assert FaustConsumer.perform_seek is offset_guard._perform_seek
