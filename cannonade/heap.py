"""The garbage collector in long-running processes: what a full collection costs, and
keeping startup's objects out of it.

CPython's full (generation 2) collection walks every tracked object, and most of a
worker's are the modules, classes and Faust/aiokafka machinery built while starting.
Measured in ``bench.claim_gate``, each full collection stalled an executor or a gate for
100-250 ms: the tail of claim latency. Freezing the heap once the process has started
moves those objects to the permanent generation, so a full collection walks only what
the process allocated since, which is its live work.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Histogram

GC_PAUSE = Histogram(
    "cannonade_gc_pause_seconds",
    "Wall time of each garbage collection, by generation (2 = full)",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

_started = 0.0


def _observe(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
    else:
        GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _started)


def watch() -> None:
    """Time every collection of this process (``cannonade_gc_pause_seconds``)."""
    if _observe not in gc.callbacks:
        gc.callbacks.append(_observe)


def freeze_startup() -> None:
    """Call once the process has started: collect what starting left behind, then move
    every surviving object to the permanent generation, out of later collections' reach."""
    gc.collect()
    gc.freeze()
