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


def _tracked(obj: object) -> bool:
    """Whether a collection of any generation would walk ``obj``."""
    return any(any(o is obj for o in gc.get_objects(generation)) for generation in range(3))


def test_startup_objects_leave_later_collections() -> None:
    started_with = [object()]  # a container the collector tracks, made before the freeze
    assert _tracked(started_with)
    try:
        heap.freeze_startup()
        assert not _tracked(started_with)
        made_after = [object()]
        assert _tracked(made_after)  # what the process allocates later is still collected
    finally:
        gc.unfreeze()
    assert _tracked(started_with)
