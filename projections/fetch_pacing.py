"""How much the projector's fetches wait for: full fetches when busy, none when quiet.

Under load a fetch that waits for 64 KiB (within the consumer's 20 ms) gives the projector
fewer, fuller transactions, which cost it and PostgreSQL less per record (`bench.claim_gate`:
the projector at 17-18 % of a core against 20 %). When the system is quiet the same wait only
holds back what someone is waiting on: a blocking flex request's answer, an API call reading its
own write. So the fetches wait for 64 KiB only while records arrive faster than
``BUSY_RECORDS_PER_S``, judged over windows of ``WINDOW_S``.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer

BUSY_FETCH_BYTES = 64 * 1024
# A few flex requests a second bring tens of records; a batch running at a few hundred
# requests a second brings hundreds, a saturated engine thousands.
BUSY_RECORDS_PER_S = 200.0
WINDOW_S = 0.5


class FetchPacing:
    """The fetch size to ask for next, from the records the polls brought."""

    def __init__(self, now: float) -> None:
        self.min_bytes = 1
        self._since = now
        self._records = 0

    def observed(self, records: int, now: float) -> int:
        """Count a poll's records (none, too) and return the fetch size to use from now on."""
        self._records += records
        elapsed = now - self._since
        if elapsed >= WINDOW_S:
            busy = self._records / elapsed >= BUSY_RECORDS_PER_S
            self.min_bytes = BUSY_FETCH_BYTES if busy else 1
            self._since, self._records = now, 0
        return self.min_bytes


def set_fetch_min_bytes(consumer: AIOKafkaConsumer, min_bytes: int) -> None:
    """aiokafka takes ``fetch_min_bytes`` at construction only; its fetcher reads the value
    for every fetch request it builds (aiokafka 0.14, pinned), so the next fetch uses it."""
    consumer._fetcher._fetch_min_bytes = min_bytes
