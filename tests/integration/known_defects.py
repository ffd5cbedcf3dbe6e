"""Markers for tests that show engine defects still open (each says where and what)."""

from __future__ import annotations

import pytest

# Engine defect (projections/writers.py, reported with issue 9): the projector applies a
# BatchRetried before the rows' RequestRetried events (they come through the gate) and
# re-finalises the batch at once from counts in which every row is still terminal, so a retried
# finished batch keeps stale stamps and frozen counts (and a replay, which may see both in one
# poll, differs). Strict: once the projector is fixed these pass, and the marker must go.
RETRY_REFINALISES = pytest.mark.xfail(
    raises=AssertionError,
    strict=True,
    reason="engine: a retried finished batch is re-finalised before its rows re-pend",
)
