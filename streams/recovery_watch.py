"""Ends a worker whose table recovery has stopped making progress, so that it is restarted.

Faust recovers a table partition by reading its changelog up to the high watermark it noted
when the partition was assigned. A fetch that outlived a rebalance once made Faust drop the
changelog records recovery waited for, past which the consumer had already moved (the cause,
now guarded against by :mod:`streams.fetch_guard`); the worker then stayed "recovering" for
good and its models' work stood still, while a fresh process recovered the same partition in
a second. This watchdog stays as the backstop for any other way recovery can stop moving.
Our changelogs hold live state only, so a healthy recovery moves within seconds: no progress
for ``STALL_S`` means it is stuck.
Exiting is safe there: the streams are paused during recovery, nothing past the committed
offsets is lost, and the supervisor (or ``restart: unless-stopped``) starts the worker again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import NoReturn, cast

import faust
import mode
from faust.tables.manager import TableManager

log = logging.getLogger(__name__)

STALL_S = 60.0
CHECK_INTERVAL_S = 5.0
EXIT_CODE = 75  # EX_TEMPFAIL: try again


def end_worker(exit_with: Callable[[int], NoReturn] = os._exit) -> NoReturn:
    """End a stuck worker at once, its log flushed, with :data:`EXIT_CODE`: the supervisor (or
    ``restart: unless-stopped``) starts a fresh process. Every watchdog ends a worker so."""
    logging.shutdown()
    exit_with(EXIT_CODE)


class Progress:
    """Whether recovery has gone ``stall_s`` with records left to read and their count
    unchanged (any change is progress, or a new recovery after a rebalance).

    Nothing left to read is never a stall: that is Faust still noting the high watermarks, or
    waiting for a broker that is away, which a fresh process would wait for too (exiting then
    only churns the group's rebalances)."""

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self._since: float | None = None
        self._remaining = 0

    def stalled(self, in_recovery: bool, remaining: int, now: float) -> bool:
        if not in_recovery or remaining == 0:
            self._since = None
            return False
        if self._since is None or remaining != self._remaining:
            self._since, self._remaining = now, remaining
            return False
        return now - self._since >= self.stall_s


class RecoveryWatchdog(mode.Service):
    """Checks the app's recovery every few seconds, from the worker's start (so a recovery
    that hangs at start-up is caught too)."""

    def __init__(self, app: faust.App) -> None:
        super().__init__()
        self.app = app
        self.progress = Progress()

    @mode.Service.timer(CHECK_INTERVAL_S)
    async def _check(self) -> None:
        recovery = cast(TableManager, self.app.tables).recovery
        remaining = recovery.active_remaining_total()
        if self.progress.stalled(self.app.in_recovery, remaining, time.monotonic()):
            log.error(
                "table recovery made no progress for %.0f s (%d records still to read): "
                "exiting so that a fresh process recovers",
                self.progress.stall_s,
                remaining,
            )
            end_worker()
