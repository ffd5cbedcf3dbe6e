-- Requests without a batch (flex, realtime, step sub-requests) carry what a batch gives batch
-- rows: the path they call, whether they were asked for in the background, and the key.
ALTER TABLE requests ADD COLUMN path text;
ALTER TABLE requests ADD COLUMN background boolean NOT NULL DEFAULT false;
ALTER TABLE requests ADD COLUMN api_key_id uuid;
CREATE INDEX requests_batchless_owner ON requests (owner, created_at DESC, id DESC) WHERE batch_id IS NULL;
