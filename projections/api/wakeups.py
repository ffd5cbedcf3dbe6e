"""Wakes the API's waiting handlers when the projector commits.

Every projector transaction sends ``NOTIFY cannonade_projected``, and one that ends requests
without a batch ``NOTIFY cannonade_settled, '<id>,<id>,…'`` too. One LISTEN connection per API
process turns those into wake-ups: a read-your-writes wait (:meth:`Context.wait_for`) looks
again as soon as the projection moved, and a flex or background call answers as soon as its
row is readable, instead of on their next poll. The notifications are a hint: a waiter still
polls (slowly) and checks the row itself, so a lost connection or a missed NOTIFY only makes an
answer later, never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import asyncpg

from projections.projector import PROJECTED_CHANNEL, SETTLED_CHANNEL

log = logging.getLogger(__name__)

_RECONNECT_MIN_S = 0.5
_RECONNECT_MAX_S = 10.0


class Wakeups:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._projected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="wakeups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``request_id`` is announced as ended while inside."""
        event = asyncio.Event()
        self._waiters.setdefault(request_id, set()).add(event)
        try:
            yield event
        finally:
            waiting = self._waiters.get(request_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiters[request_id]

    def projected(self) -> asyncio.Event:
        """An event set by the projector's next commit (take it before looking, so a commit
        between the look and the wait is not missed)."""
        return self._projected

    def _moved(self, *_: object) -> None:
        self._projected.set()
        self._projected = asyncio.Event()

    def _wake(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for request_id in payload.split(","):
            for event in self._waiters.get(request_id, ()):
                event.set()

    async def _listen(self) -> None:
        delay = _RECONNECT_MIN_S
        while True:
            try:
                await self._session()
                log.warning("wake-up listener lost its connection; reconnecting")
                delay = _RECONNECT_MIN_S
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("wake-up listener failed (retrying): %r", exc)
                delay = min(delay * 2, _RECONNECT_MAX_S)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """Listen on one connection until it is lost."""
        conn = await asyncpg.connect(self._dsn)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(SETTLED_CHANNEL, self._wake)
            await conn.add_listener(PROJECTED_CHANNEL, self._moved)
            # Whatever happened while no one listened is found by the waiters' own checks.
            self._moved()
            for waiting in self._waiters.values():
                for event in waiting:
                    event.set()
            await lost.wait()
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
