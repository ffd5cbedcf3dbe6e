"""Faust's service threads get asyncio's own loop under uvloop's policy
(streams/thread_loop.py); a loop handed in is kept."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop
from mode.threads import ServiceThread

from streams import thread_loop


@pytest.fixture
def uvloop_policy() -> Iterator[None]:
    # as cannonade/cli.py sets it for every service
    before = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(before)


def test_a_service_thread_runs_on_asyncio_s_loop_under_uvloop_s_policy(uvloop_policy: None) -> None:
    thread_loop.install()
    main = asyncio.new_event_loop()
    asyncio.set_event_loop(main)
    try:
        assert isinstance(main, uvloop.Loop)  # the main loop keeps uvloop
        made = ServiceThread()
        assert type(made.thread_loop) is asyncio.SelectorEventLoop
        given = asyncio.SelectorEventLoop()
        assert ServiceThread(thread_loop=given).thread_loop is given
        given.close()
        made.thread_loop.close()
    finally:
        asyncio.set_event_loop(None)
        main.close()
