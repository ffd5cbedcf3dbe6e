"""Pending counts' pure rules (core §2.7): window validation and the result's shape."""

from __future__ import annotations

import pytest

from projections.pending_counts import Window, shape, validate
from schemas.errors import ApiError


def test_start_after_end_and_negative_decay_are_rejected() -> None:
    with pytest.raises(ApiError, match="start must not be after end"):
        validate([Window("x", 10, 5)], None)
    with pytest.raises(ApiError, match="priority_decay_window"):
        validate([Window("1h", None, 3600)], -1)


def test_a_present_model_lists_every_label_and_decay_adds_to_1h_only() -> None:
    windows = [Window("1h", None, 3600), Window("24h", 3600, 86400)]
    rows = [("a", [0, 3], True), ("b", [0, 0], False)]
    assert shape(windows, rows, {"a": 2, "b": 5}) == {"a": {"1h": 2, "24h": 3}}
