"""The API's settlement listener against the real PostgreSQL: the projector's NOTIFYs wake
exactly the calls waiting on the ids they name, and every read-your-writes wait on a commit."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from compose import stack
from projections.api.settlements import Settlements
from projections.projector import PROJECTED_CHANNEL, SETTLED_CHANNEL
from tests.integration.conftest import run

pytestmark = pytest.mark.integration


async def _notify(dsn: str, payload: str, channel: str = SETTLED_CHANNEL) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
    finally:
        await conn.close()


async def _wakes(dsn: str) -> tuple[bool, bool]:
    settlements = Settlements(dsn)
    settlements.start()
    try:
        with settlements.watch("a") as a, settlements.watch("b") as b:
            # The listener may not be connected yet: it wakes every waiter once it is, so
            # wait for that first wake-up before the real notification.
            await asyncio.wait_for(a.wait(), 30)
            a.clear()
            b.clear()
            await _notify(dsn, "x,a,y")
            await asyncio.wait_for(a.wait(), 30)
            return a.is_set(), b.is_set()
    finally:
        await settlements.stop()


def test_a_notification_wakes_only_the_requests_it_names(stack_info: stack.StackInfo) -> None:
    assert run(_wakes(stack_info.database_url)) == (True, False)


async def _commits_wake(dsn: str) -> tuple[bool, bool]:
    settlements = Settlements(dsn)
    settlements.start()
    try:
        with settlements.watch("connected") as connected:
            await asyncio.wait_for(connected.wait(), 30)
        before = settlements.projected()
        await _notify(dsn, "", PROJECTED_CHANNEL)
        await asyncio.wait_for(before.wait(), 30)
        return before.is_set(), settlements.projected().is_set()
    finally:
        await settlements.stop()


def test_a_projector_commit_wakes_the_waits_taken_before_it_only(
    stack_info: stack.StackInfo,
) -> None:
    assert run(_commits_wake(stack_info.database_url)) == (True, False)
