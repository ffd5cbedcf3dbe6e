"""Faust's service threads (its consumer thread) run on asyncio's own event loop, not uvloop.

Every service's loop comes from uvloop's policy (:mod:`cannonade.cli`), and mode's
``ServiceThread`` makes its thread's loop with ``asyncio.new_event_loop()``, so Faust's consumer
thread ran on uvloop too. Faust hands work between that thread and the main one all the time,
most of all while a worker stops during a rebalance, and there executors died of SIGSEGV
inside that thread's loop (faulthandler: ``mode/threads.py`` ``_start_thread``; stop 34's CI
once, the step-liveness drill once in 13 runs, ``bench/README.md`` for the stop drill). The main
loop, where the agents and the upstream calls run, keeps uvloop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mode.threads import ServiceThread

_init = ServiceThread.__init__


def _init_on_asyncio_loop(self: Any, *args: Any, thread_loop: Any = None, **kwargs: Any) -> None:
    _init(self, *args, thread_loop=thread_loop or asyncio.SelectorEventLoop(), **kwargs)
    if thread_loop is None:  # closed with the thread, as a loop mode made itself would be
        self._close_thread_loop_on_stop = True


def install() -> None:
    ServiceThread.__init__ = _init_on_asyncio_loop  # type: ignore[method-assign]
