-- When a batch's latest retry was asked for: a cancel from before it belongs to the earlier
-- run, so replaying the log over the tables (the cancel met again) leaves the retried run be.
ALTER TABLE batches ADD COLUMN retried_at timestamptz;
