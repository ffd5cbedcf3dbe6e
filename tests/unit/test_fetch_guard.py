"""The fetch guard takes records out of the consumer's buffer only for partitions Faust will
accept, so a rebalance never makes Faust drop records whose position the consumer has already
passed (the table-recovery hang: a changelog read past by a fetch that outlived its
generation). The fakes stand in for aiokafka's fetcher at the seam the guard uses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from streams import fetch_guard

CHANGELOG = ("cannonade-gate-state-changelog", 2)
STREAM = ("cannonade.gate.v1", 2)


class Subscriptions:
    reassignment_in_progress = False

    @contextlib.contextmanager
    def fetch_context(self) -> Iterator[None]:
        yield


class Fetcher:
    """aiokafka's buffer of fetched records: draining a partition moves past its records,
    and an empty partition set drains every partition."""

    def __init__(self) -> None:
        self._closed = False
        self._subscriptions = Subscriptions()
        self.buffered: dict[Any, list[str]] = {}
        self._waiters: list[asyncio.Future[None]] = []

    async def fetched_records(self, partitions: Any, timeout: float = 0, max_records: Any = None) -> dict[Any, list[str]]:  # noqa: ASYNC109  # fmt: skip
        assert timeout == 0  # the guard does its own waiting
        taken = {tp: r for tp, r in self.buffered.items() if not partitions or tp in partitions}
        for tp in taken:
            del self.buffered[tp]
        return taken

    def _create_fetch_waiter(self) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def arrive(self, tp: Any, records: list[str]) -> None:
        self.buffered[tp] = records
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


def _thread() -> Any:
    return SimpleNamespace(
        consumer=SimpleNamespace(flow_active=True), app=SimpleNamespace(consumer_generation_id=7)
    )


def _fetch(thread: Any, fetcher: Fetcher, active: set[Any], timeout: float = 5.0) -> Any:
    consumer = SimpleNamespace(_closed=False, _fetcher=fetcher)
    return fetch_guard._fetch_records(thread, consumer, active, timeout=timeout, max_records=None)


async def test_only_the_active_partitions_records_are_taken() -> None:
    fetcher, thread = Fetcher(), _thread()
    fetcher.arrive(STREAM, ["s1"])
    fetcher.arrive(CHANGELOG, ["c1"])
    assert await _fetch(thread, fetcher, {STREAM}) == {STREAM: ["s1"]}
    assert fetcher.buffered == {CHANGELOG: ["c1"]}


async def test_a_call_waits_for_records_and_returns_them() -> None:
    fetcher, thread = Fetcher(), _thread()
    call = asyncio.ensure_future(_fetch(thread, fetcher, {STREAM}))
    await asyncio.sleep(0)
    fetcher.arrive(STREAM, ["s1"])
    assert await call == {STREAM: ["s1"]}


async def test_a_call_that_outlives_its_generation_takes_nothing() -> None:
    # The hang: a call waiting when a rebalance comes; the new generation's recovery seeks the
    # changelog and its records arrive while Faust's partition set is empty (everything
    # paused) and its flow stopped. They must stay buffered for recovery to read.
    fetcher, thread = Fetcher(), _thread()
    active = {STREAM}
    call = asyncio.ensure_future(_fetch(thread, fetcher, active))
    await asyncio.sleep(0)
    active.clear()
    thread.app.consumer_generation_id = 8
    fetcher.arrive(CHANGELOG, ["c1", "c2"])
    assert await call == {}
    assert fetcher.buffered == {CHANGELOG: ["c1", "c2"]}


async def test_an_emptied_partition_set_is_not_every_partition() -> None:
    fetcher, thread = Fetcher(), _thread()
    active = {STREAM}
    call = asyncio.ensure_future(_fetch(thread, fetcher, active))
    await asyncio.sleep(0)
    active.clear()  # paused by a revoke, same generation so far
    fetcher.arrive(CHANGELOG, ["c1"])
    assert await call == {}
    assert fetcher.buffered == {CHANGELOG: ["c1"]}


async def test_nothing_is_taken_while_the_flow_is_stopped_or_a_rejoin_is_under_way() -> None:
    fetcher, thread = Fetcher(), _thread()
    fetcher.arrive(STREAM, ["s1"])
    thread.consumer.flow_active = False
    assert await _fetch(thread, fetcher, {STREAM}) == {}
    thread.consumer.flow_active = True
    fetcher._subscriptions.reassignment_in_progress = True
    assert await _fetch(thread, fetcher, {STREAM}, timeout=0.01) == {}
    assert fetcher.buffered == {STREAM: ["s1"]}
