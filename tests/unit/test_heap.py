"""Garbage-collector hooks every long-running process installs (cannonade.heap)."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from cannonade import heap


def _full_collections() -> float:
    return REGISTRY.get_sample_value("cannonade_gc_pause_seconds_count", {"generation": "2"}) or 0.0


def test_every_full_collection_is_timed() -> None:
    heap.watch()
    heap.watch()  # a second call must not time each collection twice
    before = _full_collections()
    gc.collect()
    assert _full_collections() == before + 1


def test_startup_objects_leave_later_collections() -> None:
    try:
        heap.freeze_startup()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
