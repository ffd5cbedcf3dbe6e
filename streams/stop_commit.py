"""A stopping worker does not wait for ever on a commit.

Faust commits while a worker stops (as it waits for the agents' last acknowledgements, and
again as its consumer stops), and aiokafka retries a commit for as long as the group's
coordinator cannot be reached, with no deadline. An executor stopped just as its coordinator
connection dropped spun there for good (the step-liveness drill: heartbeats failing every
100 ms, 45 s without progress, its stop never reaching the point where it reports the steps it
abandons). Losing a stop's last commit is harmless under at-least-once: the next owner of the
partitions reads those records again, and every agent takes a record twice safely, as after a
kill. So a commit made while the worker stops gives up after :data:`STOP_COMMIT_S`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faust.transport.consumer import Consumer

log = logging.getLogger(__name__)

#: Far above a healthy commit (milliseconds), and small beside the supervisors' stop timeouts
#: (Docker's 10 s), which must still leave the step executor its grace (5 s) after it.
STOP_COMMIT_S = 2.0

_commit = Consumer.commit


async def _commit_while_stopping_is_bounded(self: Any, *args: Any, **kwargs: Any) -> bool:
    if not self.app.should_stop:
        return await _commit(self, *args, **kwargs)
    try:
        return await asyncio.wait_for(_commit(self, *args, **kwargs), STOP_COMMIT_S)
    except TimeoutError:
        log.warning(
            "a commit while stopping took over %.0fs (the group coordinator is unreachable):"
            " stopping without it; the next owner reads the uncommitted records again",
            STOP_COMMIT_S,
        )
        return False


def install() -> None:
    Consumer.commit = _commit_while_stopping_is_bounded  # type: ignore[method-assign]
