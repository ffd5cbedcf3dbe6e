"""Sends each input's table changelog once its decisions are acknowledged, then acknowledges
the input: in input order, off the agent's path.

The gate's decisions must land before the changelog that records them (a gate killed in
between would recover sure of claims the read model never heard of), and its input must not be
committed before that changelog is with the producer (Faust flushes the producer before it
commits, so a committed input's changelog has landed). Waiting for each decision's
acknowledgement inside the agent kept both, but held every next input for a broker round
trip: two thirds of a busy gate's time in ``bench.claim_gate``, and the executors' reports
queued behind it. Now the agent hands each input over here and goes on.

A rebalance waits for every input taken to be acknowledged (Faust's ``stream_wait_empty``), so
a partition's changelog has all gone before another worker recovers it. A send that fails
(aiokafka retries until the producer's request timeout) leaves the table ahead of what landed:
``on_failure`` must end the worker, whose successor recovers from the changelog and takes the
unacknowledged inputs again. A follower that stopped so refuses any more inputs: the agent
would otherwise wait for good on a queue nobody empties, and a rebalance on its inputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from streams.tables import Change

SendChanges = Callable[[int, list[Change]], Awaitable[None]]


class _Handed(NamedTuple):
    event: Any  # a Faust event from a stream that does not acknowledge by itself
    partition: int
    decided: Sequence[Awaitable[Any]]
    changes: list[Change]


class ChangelogFollower:
    def __init__(
        self, send: SendChanges, on_failure: Callable[[BaseException], None], limit: int = 256
    ) -> None:
        self._send = send
        self._on_failure = on_failure
        # Bounded: an agent far ahead of its acknowledgements waits rather than holding an
        # ever longer tail of state the changelog does not have yet.
        self._queue: asyncio.Queue[_Handed] = asyncio.Queue(limit)
        self._task: asyncio.Task[None] | None = None

    async def hand_over(
        self,
        event: Any,
        partition: int,
        decided: Sequence[Awaitable[Any]],
        changes: list[Change],
    ) -> None:
        """``event`` made the decisions ``decided`` (sent, maybe not yet acknowledged) and the
        table writes ``changes``, to go to the changelog's ``partition``."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        elif self._task.done():
            raise RuntimeError("the changelog follower has stopped")
        await self._queue.put(_Handed(event, partition, decided, changes))

    async def _run(self) -> None:
        while True:
            handed = await self._queue.get()
            try:
                if handed.decided:
                    await asyncio.gather(*handed.decided)
                await self._send(handed.partition, handed.changes)
                handed.event.ack()
            except BaseException as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the worker is stopping
                # A decision's send cancelled is a failure too, not this task's end.
                self._on_failure(exc)
                return
