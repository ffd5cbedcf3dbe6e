"""A model's prefetch lane in the executor (``gate.prefetch``, docs/design.md).

The gate gives each lane its running call and the claims queued behind it; the executor runs a
lane's claims one at a time, in the order they came. Whether a call that ends finds the next
claim already queued is what prefetch is for: if it does, the upstream slot goes straight to
that claim; if not, the slot waits for the gate to hear of the end and claim again (or for
more work). Each release says which.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Lane:
    """An async context manager: entering waits for the lane's turn (first come, first
    served); leaving calls ``released`` with whether another claim was waiting for it."""

    def __init__(self, released: Callable[[bool], None]) -> None:
        self._lock = asyncio.Lock()  # FIFO: waiters acquire in the order they asked
        self._waiting = 0
        self._released = released

    async def __aenter__(self) -> None:
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            # Also when cancelled while queued (an abort): that claim is waiting no more.
            self._waiting -= 1

    async def __aexit__(self, *exc_info: object) -> None:
        self._released(self._waiting > 0)
        self._lock.release()
