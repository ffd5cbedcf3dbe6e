"""HTTP API objects behind the dashboard (``/v1/dashboard/...``), computed from the read model."""

from __future__ import annotations

from typing import Literal

import msgspec


class DashboardUser(msgspec.Struct, forbid_unknown_fields=True):
    """Who the key belongs to, and whether they see the operator views."""

    object: Literal["dashboard.user"]
    user: str
    key_id: str
    operator: bool


class ModelQueue(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    pending: int
    in_flight: int  # claimed or processing


class QueueDepths(msgspec.Struct, forbid_unknown_fields=True):
    """The caller's unfinished requests per model, batch rows and batchless rows alike."""

    object: Literal["dashboard.queues"]
    data: list[ModelQueue]


class ThroughputPoint(msgspec.Struct, forbid_unknown_fields=True):
    """One minute of the whole engine: requests that ended in it, and how long completed
    ones took from their (last) claim to completion. Latencies are null for an idle minute."""

    minute: int  # unix time of the minute's start
    completed: int
    failed: int
    latency_p50_s: float | None
    latency_p99_s: float | None


class Throughput(msgspec.Struct, forbid_unknown_fields=True):
    """The last hour, oldest minute first, every minute present (operators only)."""

    object: Literal["dashboard.throughput"]
    bucket_s: int
    data: list[ThroughputPoint]
