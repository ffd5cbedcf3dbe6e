"""The API's wake-up listener against the real PostgreSQL: the projector's NOTIFYs wake
exactly the calls waiting on the ids they name, and every read-your-writes wait on a commit.

NOTIFY is per database: these tests get one of their own, so that a projector running on the
shared stack cannot wake a wait that must stay asleep."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from compose import stack
from projections.api.wakeups import Wakeups
from projections.projector import notify_waiters
from tests.integration.conftest import own_database, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dsn(stack_info: stack.StackInfo) -> Iterator[str]:
    yield from own_database(stack_info, "wakeups", migrate_schema=False)


async def _commit(dsn: str, settled: set[str]) -> None:
    """A transaction that notifies as the projector's do."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await notify_waiters(conn, settled)
    finally:
        await conn.close()


async def _woken(event: asyncio.Event) -> bool:
    """Whether ``event`` is set within the wait's bound (False, not an error, if it is not)."""
    try:
        await asyncio.wait_for(event.wait(), 30)
    except TimeoutError:
        return False
    return True


async def _wakes(dsn: str) -> tuple[bool, bool]:
    wakeups = Wakeups(dsn)
    wakeups.start()
    try:
        with wakeups.watch("a") as a, wakeups.watch("b") as b:
            # The listener may not be connected yet: it wakes every waiter once it is, so
            # wait for that first wake-up before the real notification.
            await asyncio.wait_for(a.wait(), 30)
            a.clear()
            b.clear()
            await _commit(dsn, {"x", "a", "y"})
            return await _woken(a), b.is_set()
    finally:
        await wakeups.stop()


def test_a_notification_wakes_only_the_requests_it_names(dsn: str) -> None:
    assert run(_wakes(dsn)) == (True, False)


async def _commits_wake(dsn: str) -> tuple[bool, bool]:
    wakeups = Wakeups(dsn)
    wakeups.start()
    try:
        with wakeups.watch("connected") as connected:
            await asyncio.wait_for(connected.wait(), 30)
        before = wakeups.projected()
        await _commit(dsn, set())
        return await _woken(before), wakeups.projected().is_set()
    finally:
        await wakeups.stop()


def test_a_projector_commit_wakes_the_waits_taken_before_it_only(dsn: str) -> None:
    assert run(_commits_wake(dsn)) == (True, False)
