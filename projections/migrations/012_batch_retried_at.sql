-- When a batch's latest retry was asked for (batches topic), and the latest retry version its
-- rows were reopened under (requests topic; kept with the counters, which exist whichever
-- topic a replay reads first): a cancel belongs to the run it was asked in, so replaying the
-- log, in whatever order it reads the two topics, never cancels a later run.
ALTER TABLE batches ADD COLUMN retried_at timestamptz;
ALTER TABLE batch_counts ADD COLUMN reopened_version int;
