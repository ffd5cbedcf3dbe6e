"""The read path's metrics (projector, API, purge), and the hooks that feed them.

HTTP requests are labelled by their route's pattern (``/v1/batches/{batch_id}``), never the
raw path, so ids stay out of label values; an unrouted path is ``unmatched``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from cannonade.metrics import method_label, status_label

if TYPE_CHECKING:  # the purge imports this module
    from projections.purge import Round

UNMATCHED = "unmatched"

PROJECTOR_LAG = Gauge(
    "cannonade_projector_lag_records",
    "Records on a projected topic not yet in the read model (sum over its partitions)",
    ["topic"],
)
PROJECTOR_RECORDS = Counter(
    "cannonade_projector_records_total", "Records applied to the read model", ["topic"]
)
PROJECTOR_POLL = Histogram(
    "cannonade_projector_poll_duration_seconds",
    "Time to apply one poll of records in one transaction",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
HTTP_DURATION = Histogram(
    "cannonade_http_request_duration_seconds",
    "API requests by route pattern, method and status",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
PURGED = Counter(
    "cannonade_purged_total",
    "What the purge worker reaped: rows, templates and chunks (rows), model-filter events,"
    " webhook deliveries",
    ["what"],
)
# An answer never sent: the client went away while it was being made (nginx's convention).
_CLIENT_GONE = 499


def projector_applied(counts: Mapping[str, int], seconds: float) -> None:
    """One poll committed: records per topic, and how long it took."""
    PROJECTOR_POLL.observe(seconds)
    for topic, n in counts.items():
        PROJECTOR_RECORDS.labels(topic).inc(n)


def projector_lag(lags: Mapping[str, int]) -> None:
    for topic, lag in lags.items():
        PROJECTOR_LAG.labels(topic).set(lag)


def purged(reaped: Round) -> None:
    PURGED.labels("rows").inc(reaped.rows)
    PURGED.labels("model_filter_events").inc(reaped.model_filter_events)
    PURGED.labels("webhook_deliveries").inc(reaped.webhook_deliveries)


def route_label(request: web.Request) -> str:
    """The pattern of the route that matched (``/v1/files/{file_id}``), or ``unmatched``."""
    resource = request.match_info.route.resource
    return UNMATCHED if resource is None else resource.canonical


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def http_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every request, outermost, so the status is the one the client got."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = _CLIENT_GONE
        raise
    finally:
        HTTP_DURATION.labels(
            route_label(request), method_label(request.method), status_label(status)
        ).observe(time.perf_counter() - started)
