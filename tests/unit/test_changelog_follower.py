"""The gate's changelog follower: an input's changelog goes only after its decisions landed,
and the input is acknowledged only after its changelog went, in input order, while the agent
goes on to the next input."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streams.changelog_follower import ChangelogFollower
from streams.tables import Change


class Event:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def ack(self) -> None:
        self.log.append(f"ack {self.name}")


class World:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.failures: list[BaseException] = []
        self.follower = ChangelogFollower(self.send, self.failures.append, limit=2)

    async def send(self, partition: int, changes: list[Change]) -> None:
        self.log.append(f"changelog p{partition} {[k.decode() for k, _ in changes]}")

    def decision(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


async def test_the_changelog_waits_for_its_decisions_and_the_input_for_its_changelog() -> None:
    w = World()
    landed = w.decision()
    await w.follower.hand_over(Event("e1", w.log), 1, [landed], [(b"R:1", b"claimed")])
    await w.settle()
    assert w.log == []  # the decision is not acknowledged yet: nothing goes, nothing commits

    landed.set_result(None)
    await w.settle()
    assert w.log == ["changelog p1 ['R:1']", "ack e1"]


async def test_inputs_are_acknowledged_in_order_whatever_order_their_decisions_land_in() -> None:
    w = World()
    first, second = w.decision(), w.decision()
    await w.follower.hand_over(Event("e1", w.log), 0, [first], [(b"R:1", b"claimed")])
    await w.follower.hand_over(Event("e2", w.log), 0, [second], [(b"R:2", b"claimed")])
    second.set_result(None)
    await w.settle()
    assert w.log == []  # e2's changelog must not overtake e1's

    first.set_result(None)
    await w.settle()
    assert w.log == [
        "changelog p0 ['R:1']",
        "ack e1",
        "changelog p0 ['R:2']",
        "ack e2",
    ]


async def test_an_input_that_decided_nothing_still_waits_its_turn() -> None:
    w = World()
    pending = w.decision()
    await w.follower.hand_over(Event("e1", w.log), 0, [pending], [])
    await w.follower.hand_over(Event("dead letter", w.log), 0, (), [])
    await w.settle()
    assert w.log == []
    pending.set_result(None)
    await w.settle()
    assert w.log == ["changelog p0 []", "ack e1", "changelog p0 []", "ack dead letter"]


async def test_a_decision_that_did_not_land_sends_no_changelog_and_acknowledges_nothing() -> None:
    w = World()
    failed, later = w.decision(), w.decision()
    await w.follower.hand_over(Event("e1", w.log), 0, [failed], [(b"R:1", b"claimed")])
    await w.follower.hand_over(Event("e2", w.log), 0, [later], [(b"R:2", b"claimed")])
    later.set_result(None)
    failed.set_exception(ConnectionError("broker away"))
    await w.settle()
    assert w.log == []  # the worker must end; its successor takes both inputs again
    assert [type(e) for e in w.failures] == [ConnectionError]


async def test_an_agent_far_ahead_of_its_acknowledgements_waits() -> None:
    w = World()
    held = w.decision()
    await w.follower.hand_over(Event("e1", w.log), 0, [held], [])
    await w.settle()  # e1 taken off the queue, waiting for its decision
    await w.follower.hand_over(Event("e2", w.log), 0, [held], [])
    await w.follower.hand_over(Event("e3", w.log), 0, [held], [])
    fourth = asyncio.ensure_future(w.follower.hand_over(Event("e4", w.log), 0, [held], []))
    await w.settle()
    assert not fourth.done()  # the queue holds two

    held.set_result(None)
    await asyncio.wait_for(fourth, timeout=5)
    await w.settle()
    assert [line for line in w.log if line.startswith("ack")] == [
        "ack e1",
        "ack e2",
        "ack e3",
        "ack e4",
    ]


async def test_a_changelog_that_did_not_go_acknowledges_nothing_and_stops_the_follower() -> None:
    w = World()

    async def broker_away(partition: int, changes: list[Change]) -> None:
        raise TimeoutError("the broker is away")

    w.follower = ChangelogFollower(broker_away, w.failures.append)
    await w.follower.hand_over(Event("e1", w.log), 0, (), [(b"R:1", b"claimed")])
    await w.settle()
    assert w.log == [] and [type(e) for e in w.failures] == [TimeoutError]

    # Stopped, it refuses more: the agent would otherwise wait on a queue nobody empties.
    with pytest.raises(RuntimeError, match="stopped"):
        await w.follower.hand_over(Event("e2", w.log), 0, (), [])


async def test_a_cancelled_send_or_a_failing_acknowledgement_is_a_failure_not_a_silent_end() -> (
    None
):
    w = World()
    cancelled = w.decision()
    cancelled.cancel()
    await w.follower.hand_over(Event("e1", w.log), 0, [cancelled], [])
    await w.settle()
    assert [type(e) for e in w.failures] == [asyncio.CancelledError]

    class Unacknowledgeable(Event):
        def ack(self) -> None:
            raise ValueError("consumer gone")

    w = World()
    await w.follower.hand_over(Unacknowledgeable("e1", w.log), 0, (), [])
    await w.settle()
    assert [type(e) for e in w.failures] == [ValueError]
