-- Retry, deletion, frozen counts and notification (core §1.3, §2.3, §4.9, §5.2.5).
ALTER TABLE batches ADD COLUMN retry_version int NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN counts_frozen_at timestamptz;
ALTER TABLE batches ADD COLUMN completed_requests int;
ALTER TABLE batches ADD COLUMN failed_requests int;
ALTER TABLE batches ADD COLUMN canceled_requests int;
ALTER TABLE batches ADD COLUMN notification_sent_at timestamptz;
