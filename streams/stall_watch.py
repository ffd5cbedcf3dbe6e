"""Ends a gate or executor whose stream has stopped taking the records of a partition it owns.

A gate is the only place its models' claims are decided, and an executor the only reader of its
dispatch partitions; one that holds a partition but no longer reads it stops that work silently:
it stays in its group and nobody else may take the partition. Faust has had bugs that stop a
consumer so (see :mod:`streams.fetch_guard`; :mod:`streams.recovery_watch` covers a stuck table
recovery). Neither agent waits on anything in its loop but the broker, and every model's gate
partition gets the leader's tick each second, so a partition whose end moves on while the agent
takes none of its records for ``STALL_S`` is stuck. Exiting then is as safe as a crash: a gate
re-decides from its table, an executor's running claims are taken back, and the supervisor (or
``restart: unless-stopped``) starts the worker again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn

import faust
import mode
from faust.types import TP

from streams.recovery_watch import end_worker

log = logging.getLogger(__name__)

STALL_S = 60.0
CHECK_INTERVAL_S = 10.0
ASK_TIMEOUT_S = 10.0  # for the end offsets; no answer by then is no verdict


class Intake:
    """Whether a partition's end offset has moved on while the agent took none of its records
    for ``stall_s``, over one unbroken run of observations.

    An observation that cannot be made (a broker that does not answer, a rebalance or a
    recovery under way) starts every partition afresh: while the broker is away nothing
    arrives, and when it is back the agent needs a moment to fetch again. So does a gap of
    more than ``max_gap_s`` since the last one: the process itself was not running (stopped,
    suspended), and its agent has not had its turn yet."""

    def __init__(self, stall_s: float, max_gap_s: float) -> None:
        self.stall_s, self.max_gap_s = stall_s, max_gap_s
        # partition -> (since, offset taken then, end offset then)
        self._since: dict[TP, tuple[float, int | None, int]] = {}
        self._last: float | None = None

    def stalled(self, observed: Mapping[TP, tuple[int | None, int]] | None, now: float) -> list[TP]:  # fmt: skip
        """``observed`` maps each owned partition to (last offset the agent took, or None,
        end offset); returns the stuck ones."""
        resumed = self._last is not None and now - self._last > self.max_gap_s
        self._last = now
        if observed is None or resumed:
            self._since.clear()
        if observed is None:
            return []
        self._since = {tp: seen for tp, seen in self._since.items() if tp in observed}
        stuck = []
        for tp, (taken, end) in observed.items():
            seen = self._since.get(tp)
            if seen is None or seen[1] != taken:
                self._since[tp] = (now, taken, end)
            elif end > seen[2] and now - seen[0] >= self.stall_s:
                stuck.append(tp)
        return stuck


class StallWatchdog(mode.Service):
    """Checks every few seconds that the agent reading ``topics`` takes what arrives on the
    partitions this worker owns; the agent reports each record it takes to :meth:`took`."""

    def __init__(
        self,
        app: faust.App,
        topics: Collection[str],
        *,
        stall_s: float = STALL_S,
        interval_s: float = CHECK_INTERVAL_S,
        exit_with: Callable[[int], NoReturn] = os._exit,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.app, self.topics, self.exit_with = app, frozenset(topics), exit_with
        self.interval_s = interval_s
        self.intake = Intake(stall_s, max_gap_s=3 * interval_s + ASK_TIMEOUT_S)
        self.taken: dict[TP, int] = {}

    def took(self, tp: TP, offset: int) -> None:
        self.taken[tp] = offset

    async def observe(self) -> dict[TP, tuple[int | None, int]] | None:
        app = self.app
        if app.rebalancing or app.in_recovery:  # the streams wait, as they should
            return None
        try:
            owned = [tp for tp in app.consumer.assignment() if tp.topic in self.topics]
            if not owned:
                return {}
            async with asyncio.timeout(ASK_TIMEOUT_S):
                ends = await app.consumer.highwaters(*owned)
        except Exception:  # a consumer not started yet, a broker that did not answer
            return None
        return {tp: (self.taken.get(tp), ends[tp]) for tp in owned if tp in ends}

    @mode.Service.task
    async def _watch(self) -> None:
        while not self.should_stop:
            await self.sleep(self.interval_s)
            await self.check()

    async def check(self) -> None:
        stuck = self.intake.stalled(await self.observe(), time.monotonic())
        if stuck:
            log.error(
                "the stream took no record of %s for %.0f s while records arrived: exiting so"
                " that a fresh process takes the partitions",
                ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(stuck)),
                self.intake.stall_s,
            )
            end_worker(self.exit_with)
