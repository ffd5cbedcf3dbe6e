-- Which retry_version a batch's notification_sent_at belongs to, so that a replay applying the
-- notification of a retried run before the rows' retries rebuilds the same stamp.
ALTER TABLE batches ADD COLUMN notified_version int;
UPDATE batches SET notified_version = retry_version WHERE notification_sent_at IS NOT NULL;
