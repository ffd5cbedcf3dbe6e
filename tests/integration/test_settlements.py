"""The API's settlement listener against the real PostgreSQL: the projector's NOTIFY wakes
exactly the calls waiting on the ids it names."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from compose import stack
from projections.api.settlements import Settlements
from projections.projector import SETTLED_CHANNEL
from tests.integration.conftest import run

pytestmark = pytest.mark.integration


async def _notify(dsn: str, payload: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", SETTLED_CHANNEL, payload)
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
