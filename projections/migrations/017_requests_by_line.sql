-- A batch's rows in line order: GET /v1/batches/{id}/results pages through them, and without
-- this every page read and sorted the whole batch (50,000 rows a page for a 50,000-line
-- batch). Built in the migration's transaction: writes to `requests` wait for it.
CREATE INDEX requests_batch_line ON requests (batch_id, line_number) WHERE batch_id IS NOT NULL;
