"""The stall watchdog: a gate that owns a partition but stops taking its records is ended."""

from __future__ import annotations

from typing import NoReturn

import pytest
from faust.types import TP

from streams.recovery_watch import EXIT_CODE
from streams.stall_watch import Intake, StallWatchdog

GATE = TP("cannonade.gate.v1", 1)
FILTERS = TP("cannonade.model-filters.v1", 1)
CHANGELOG = TP("cannonade-gate-gate-changelog", 1)


def _intake() -> Intake:
    return Intake(stall_s=60, max_gap_s=120)


def test_records_arriving_untaken_for_the_bound_are_a_stall() -> None:
    intake = _intake()
    assert intake.stalled({GATE: (41, 42)}, now=0) == []
    assert intake.stalled({GATE: (41, 50)}, now=59) == []
    assert intake.stalled({GATE: (41, 51)}, now=60) == [GATE]


def test_any_record_taken_restarts_the_bound() -> None:
    intake = _intake()
    intake.stalled({GATE: (41, 42)}, now=0)
    assert intake.stalled({GATE: (49, 60)}, now=50) == []  # behind, but moving
    assert intake.stalled({GATE: (49, 70)}, now=109) == []
    assert intake.stalled({GATE: (49, 71)}, now=110) == [GATE]


def test_a_partition_where_nothing_arrives_is_never_stalled() -> None:
    # A partition with no model on it, or everything read: nothing to take is no stall.
    intake = _intake()
    assert intake.stalled({GATE: (None, 0), FILTERS: (7, 8)}, now=0) == []
    assert intake.stalled({GATE: (None, 0), FILTERS: (7, 8)}, now=600) == []


def test_a_partition_never_taken_from_while_records_arrive_is_stalled() -> None:
    intake = _intake()
    intake.stalled({GATE: (None, 100)}, now=0)
    assert intake.stalled({GATE: (None, 160)}, now=60) == [GATE]


def test_an_unanswered_observation_starts_every_partition_afresh() -> None:
    # The broker away: nothing arrives, and once it is back the agent must fetch again first.
    intake = _intake()
    intake.stalled({GATE: (41, 42)}, now=0)
    assert intake.stalled(None, now=30) == []
    assert intake.stalled({GATE: (41, 90)}, now=70) == []
    assert intake.stalled({GATE: (41, 95)}, now=129) == []
    assert intake.stalled({GATE: (41, 96)}, now=130) == [GATE]


def test_a_process_that_did_not_run_between_two_checks_starts_afresh() -> None:
    # Stopped or suspended for longer than the bound: its agent has not had its turn yet.
    intake = _intake()
    intake.stalled({GATE: (41, 42)}, now=0)
    assert intake.stalled({GATE: (41, 90)}, now=300) == []
    assert intake.stalled({GATE: (41, 95)}, now=359) == []
    assert intake.stalled({GATE: (41, 96)}, now=360) == [GATE]


def test_a_partition_given_up_is_forgotten() -> None:
    intake = _intake()
    intake.stalled({GATE: (41, 42)}, now=0)
    intake.stalled({}, now=30)
    # Owned again later: measured from its return, not from the first sighting.
    assert intake.stalled({GATE: (41, 50)}, now=40) == []
    assert intake.stalled({GATE: (41, 60)}, now=99) == []
    assert intake.stalled({GATE: (41, 61)}, now=100) == [GATE]


class Exited(Exception):
    pass


def _exit(code: int) -> NoReturn:
    raise Exited(code)


class FakeConsumer:
    def __init__(self, ends: dict[TP, int]) -> None:
        self.ends = ends
        self.answers = True
        self.started = True

    def assignment(self) -> set[TP]:
        if not self.started:
            raise RuntimeError("consumer not started")  # as Faust's ConsumerNotStarted
        return set(self.ends)

    async def highwaters(self, *partitions: TP) -> dict[TP, int]:
        if not self.answers:
            raise ConnectionError("broker away")
        return {tp: self.ends[tp] for tp in partitions}


class FakeApp:
    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer
        self.rebalancing = False
        self.in_recovery = False


def _watchdog(app: FakeApp) -> StallWatchdog:
    # stall_s=0: any two observations in a row span the bound.
    return StallWatchdog(app, [GATE.topic, FILTERS.topic], stall_s=0, exit_with=_exit)  # type: ignore[arg-type]


async def test_a_gate_that_stops_taking_its_records_exits_to_be_restarted() -> None:
    consumer = FakeConsumer({GATE: 10, FILTERS: 5, CHANGELOG: 900})
    watch = _watchdog(FakeApp(consumer))
    watch.took(GATE, 9)
    watch.took(FILTERS, 4)
    await watch.check()
    await watch.check()  # nothing new arrived: nothing to take
    consumer.ends[GATE] = 11  # the next tick
    watch.took(GATE, 10)
    consumer.ends[CHANGELOG] = 2000  # not the agent's to read: never counted
    await watch.check()
    consumer.ends[GATE] = 12
    with pytest.raises(Exited) as exited:
        await watch.check()
    assert exited.value.args == (EXIT_CODE,)


async def test_no_verdict_while_starting_the_broker_is_away_or_the_group_rebalances() -> None:
    consumer = FakeConsumer({GATE: 10})
    app = FakeApp(consumer)
    watch = _watchdog(app)
    consumer.started = False  # a worker still starting
    await watch.check()
    consumer.started = True
    await watch.check()
    consumer.answers = False
    consumer.ends[GATE] = 20
    await watch.check()
    consumer.answers = True
    await watch.check()  # back: the bound starts again here
    for flag in ("rebalancing", "in_recovery"):  # the streams wait for these, as they should
        setattr(app, flag, True)
        consumer.ends[GATE] += 10
        await watch.check()
        setattr(app, flag, False)
        await watch.check()
    consumer.ends[GATE] += 1
    with pytest.raises(Exited):
        await watch.check()
