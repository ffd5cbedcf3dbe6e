"""The projector's fetch pacing: full fetches while records pour in, none while quiet."""

from __future__ import annotations

import inspect

from aiokafka.consumer.fetcher import Fetcher

from projections.fetch_pacing import BUSY_FETCH_BYTES, WINDOW_S, FetchPacing


def test_a_quiet_stream_asks_for_no_minimum() -> None:
    pacing = FetchPacing(now=0.0)
    assert pacing.min_bytes == 1  # a fresh projector has heard nothing yet
    t = 0.0
    for _ in range(20):  # a lone flex request's few records, then nothing, for seconds
        t += 0.1
        assert pacing.observed(2 if t < 0.35 else 0, t) == 1


def test_a_busy_window_asks_for_full_fetches_and_a_quiet_one_ends_them() -> None:
    pacing = FetchPacing(now=0.0)
    # A batch running: a few hundred records every 20 ms poll.
    t = 0.0
    while t < WINDOW_S:
        t += 0.02
        pacing.observed(300, t)
    assert pacing.min_bytes == BUSY_FETCH_BYTES
    # Decided per window: one empty poll right after does not end it ...
    assert pacing.observed(0, t + 0.02) == BUSY_FETCH_BYTES
    # ... a window with next to nothing does.
    assert pacing.observed(3, t + 0.02 + WINDOW_S) == 1


def test_the_pinned_fetcher_reads_the_attribute_the_pacing_writes() -> None:
    """`set_fetch_min_bytes` writes aiokafka's private attribute; a fast guard beside the
    integration test (``tests/integration/test_fetch_pacing.py``) that the fetch requests
    carry it."""
    assert "self._fetch_min_bytes" in inspect.getsource(Fetcher._get_actions_per_node)
