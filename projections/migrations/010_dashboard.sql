-- The dashboard's throughput and latency per minute read the rows that ended in the last hour
-- (projections/api/dashboard/stats.py), not the whole table.
CREATE INDEX requests_ended ON requests ((coalesce(completed_at, failed_at)))
    WHERE state IN ('completed', 'failed');
