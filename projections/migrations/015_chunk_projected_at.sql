-- When each chunk row arrived, so the purge can tell an upload that stopped part-way (its API
-- died before creating the file or abandoning the upload) from one still in progress. Rows
-- already here count from now.
ALTER TABLE template_chunks ADD COLUMN projected_at timestamptz NOT NULL DEFAULT now();
