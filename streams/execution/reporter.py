"""Coalesces an executor's news into one ExecutionReport per model and flush.

Calls that end within a couple of milliseconds of each other share one record to the gate, and
their result bodies are sent ahead of it in the same produce request, so a report that makes
rows terminal never lands without their bodies (a send that fails is retried whole). The call
that leaves the executor with nothing else running is reported at once: no other call will end
to share its record, and waiting would only delay its result (a lone flex request's answer).
A started call is reported only if it is still running a little later: at low upstream latency
most calls end first, and the finished report implies the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from schemas import ids
from schemas.events import ExecutionReport, FinishedItem, StartedItem
from streams.app import utcnow
from streams.emit import Out

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[Out]], Awaitable[None]]

#: Calls ending this close together share a report.
FINISHED_DELAY_S = 0.002
#: With prefetch a report is off the path to the next call (that one is queued already), so
#: reports may gather longer: at 200 ms upstream latency that took about 40 % of every
#: process's CPU per request away, at no cost in throughput.
QUEUED_FINISHED_DELAY_S = 0.02


class Reporter:
    def __init__(
        self,
        publish: Publish,
        worker_id: str,
        *,
        finished_delay_s: float = FINISHED_DELAY_S,
        started_delay_s: float = 0.05,
    ) -> None:
        self._publish = publish
        self.worker_id = worker_id
        self._finished_delay = finished_delay_s
        self._started_delay = started_delay_s
        self._started: dict[str, tuple[float, str, StartedItem]] = {}  # claim -> (t, model, item)
        self._finished: dict[str, list[FinishedItem]] = {}
        self._bodies: list[Out] = []
        self._wake = asyncio.Event()
        self._now = asyncio.Event()  # skip the gathering delay: nothing else is running
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Flush what is left, then stop."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # A send it had under way puts its records back when it ends: wait for that, or
            # the final flush would miss them.
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._flush(everything=True)

    def started(self, model: str, item: StartedItem) -> None:
        self._started[item.claim_id] = (time.monotonic(), model, item)
        self._wake.set()

    def handed_off(self, claim_id: str) -> None:
        """The claim is someone else's to report now (the chain agent took it over): its
        start must not arrive after theirs."""
        self._started.pop(claim_id, None)

    def finished(
        self, model: str, item: FinishedItem, bodies: Sequence[Out] = (), *, last: bool = False
    ) -> None:
        """``last``: the executor runs nothing else, so report without gathering."""
        self._started.pop(item.claim_id, None)
        self._finished.setdefault(model, []).append(item)
        self._bodies.extend(bodies)
        if last:
            self._now.set()
        self._wake.set()

    async def _loop(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._now.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._now.wait(), self._finished_delay)
            self._now.clear()
            try:
                await self._flush()
                backoff = 0.1
            except Exception:
                # The broker is away: keep everything buffered and try again.
                log.exception("could not send execution reports; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()
                continue
            if self._started:  # report still-running calls once they are old enough
                oldest = min(t for t, _, _ in self._started.values())
                wait = oldest + self._started_delay - time.monotonic()
                asyncio.get_running_loop().call_later(max(wait, 0.0), self._wake.set)

    async def _flush(self, *, everything: bool = False) -> None:
        cutoff = time.monotonic() - self._started_delay
        started: dict[str, list[StartedItem]] = {}
        for claim, (at, model, item) in list(self._started.items()):
            if everything or at <= cutoff:
                started.setdefault(model, []).append(item)
                del self._started[claim]
        finished, bodies = self._finished, self._bodies
        self._finished, self._bodies = {}, []
        reports = [
            Out(
                "gate",
                model,
                ExecutionReport(
                    event_id=ids.new_id(),
                    occurred_at=utcnow(),
                    worker_id=self.worker_id,
                    model=model,
                    started=started.get(model, []),
                    finished=finished.get(model, []),
                ),
            )
            for model in sorted(set(started) | set(finished))
        ]
        try:
            # One send, bodies first: they travel in the same produce request as the reports
            # that end their rows, and both are acknowledged before anything is forgotten.
            if bodies or reports:
                await self._publish([*bodies, *reports])
        except BaseException:
            # Put it all back, in order, for the next attempt.
            for model, done in finished.items():
                self._finished[model] = done + self._finished.get(model, [])
            self._bodies = bodies + self._bodies
            now = time.monotonic()
            for model, running in started.items():
                for item in running:
                    self._started.setdefault(
                        item.claim_id, (now - self._started_delay, model, item)
                    )
            raise
