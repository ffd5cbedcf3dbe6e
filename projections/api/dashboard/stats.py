"""The dashboard's figures, read from the request rows of the read model."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from schemas.api_dashboard import ModelQueue, ThroughputPoint

BUCKET_S = 60
BUCKETS = 60  # the last hour, the current minute included

# A user's unfinished rows: those of their batches that still count some (batch_counts, so
# only live batches' rows are read, by the (batch_id, state) index), and their batchless rows.
_QUEUES = """
WITH live AS (
    SELECT b.id FROM batches b JOIN batch_counts c ON c.batch_id = b.id
    WHERE b.owner = $1 AND b.deleted_at IS NULL AND c.pending + c.in_progress > 0
), unfinished AS (
    SELECT r.model, r.state FROM requests r
    WHERE r.batch_id IN (SELECT id FROM live) AND r.state IN ('pending', 'claimed', 'processing')
    UNION ALL
    SELECT r.model, r.state FROM requests r
    WHERE r.batch_id IS NULL AND r.owner = $1 AND r.state IN ('pending', 'claimed', 'processing')
)
SELECT model, count(*) FILTER (WHERE state = 'pending') AS pending,
       count(*) FILTER (WHERE state <> 'pending') AS in_flight
FROM unfinished GROUP BY model ORDER BY model
"""

# Rows that ended since $1, per minute (the requests_ended index of migration 010). Latency is
# from the row's last claim (its creation for a row never claimed: realtime) to completion.
_THROUGHPUT = """
SELECT (floor(extract(epoch FROM t.ended) / 60) * 60)::bigint AS minute,
       count(*) FILTER (WHERE t.state = 'completed') AS completed,
       count(*) FILTER (WHERE t.state = 'failed') AS failed,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY t.latency) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY t.latency) AS p99
FROM (
    SELECT r.state, coalesce(r.completed_at, r.failed_at) AS ended,
           CASE WHEN r.state = 'completed'
                THEN extract(epoch FROM r.completed_at - coalesce(r.claimed_at, r.created_at))
           END AS latency
    FROM requests r
    WHERE r.state IN ('completed', 'failed') AND coalesce(r.completed_at, r.failed_at) >= $1
) t
GROUP BY 1
"""


async def queue_depths(pool: asyncpg.Pool, owner: str) -> list[ModelQueue]:
    rows = await pool.fetch(_QUEUES, owner)
    return [ModelQueue(r["model"], int(r["pending"]), int(r["in_flight"])) for r in rows]


def first_minute(now: datetime) -> int:
    """Unix time of the oldest minute shown at ``now``."""
    return (int(now.timestamp()) // BUCKET_S - (BUCKETS - 1)) * BUCKET_S


def series(rows: Sequence[Any], now: datetime) -> list[ThroughputPoint]:
    """Every minute of the window, oldest first; a minute with no row is idle."""
    by_minute = {int(r["minute"]): r for r in rows}
    start = first_minute(now)
    points = []
    for minute in range(start, start + BUCKETS * BUCKET_S, BUCKET_S):
        r = by_minute.get(minute)
        if r is None:
            points.append(ThroughputPoint(minute, 0, 0, None, None))
            continue
        p50, p99 = r["p50"], r["p99"]
        points.append(
            ThroughputPoint(
                minute,
                int(r["completed"]),
                int(r["failed"]),
                None if p50 is None else round(float(p50), 4),
                None if p99 is None else round(float(p99), 4),
            )
        )
    return points


async def throughput(pool: asyncpg.Pool, now: datetime) -> list[ThroughputPoint]:
    since = datetime.fromtimestamp(first_minute(now), UTC)
    return series(await pool.fetch(_THROUGHPUT, since), now)
