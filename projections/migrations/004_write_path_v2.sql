-- Read models for the batched write path (events v2). Everything here is rebuilt by replaying
-- the log, API keys included (cannonade.keys.v1), so the projector starts these tables over.

DELETE FROM projection_offsets;
DROP TABLE IF EXISTS requests, batch_counts, bodies, request_templates, batches, files,
    file_deletions, api_keys, users CASCADE;

CREATE TABLE users (
    id          text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Projected from cannonade.keys.v1: the secret's sha256 only; the secret is never stored.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    user_id     text NOT NULL REFERENCES users(id),
    key_hash    bytea NOT NULL UNIQUE,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL
);

CREATE TABLE files (
    id              uuid PRIMARY KEY,
    owner           text,
    filename        text NOT NULL,
    purpose         text NOT NULL,
    bytes           bigint NOT NULL DEFAULT 0,
    size_finalized  boolean NOT NULL DEFAULT true,
    status          text NOT NULL DEFAULT 'processed',
    batch_id        uuid,            -- set for a batch's virtual output/error file
    template_count  int NOT NULL DEFAULT 0,
    api_key_id      uuid,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    deleted_at      timestamptz
);
CREATE INDEX files_owner_created ON files (owner, created_at DESC, id DESC) WHERE deleted_at IS NULL;

-- File deletions, remembered independently of the file row: on a replay the FileDeleted of a
-- batch's input or output file may be projected before the BatchCreated that references it
-- (they travel on different topics), and the later insert must still see the deletion.
CREATE TABLE file_deletions (
    file_id     uuid PRIMARY KEY,
    deleted_at  timestamptz NOT NULL
);

-- One row per uploaded line; its body is line (line_number - first_line) of chunk body_key.
CREATE TABLE request_templates (
    file_id      uuid NOT NULL,
    line_number  int  NOT NULL,
    custom_id    text,
    method       text NOT NULL,
    path         text NOT NULL,
    model        text NOT NULL,
    body_size    int  NOT NULL,
    body_key     text NOT NULL,
    PRIMARY KEY (file_id, line_number)
);
CREATE INDEX request_templates_chunk ON request_templates (body_key);

-- Chunks of uploaded lines as they are on the bodies topic ({"lines": [[custom_id, body]]}).
CREATE TABLE template_chunks (
    body_key    text PRIMARY KEY,
    body        bytea NOT NULL
);

-- Single bodies: a batchless request's body (tpl), a response body (res), an error envelope
-- (err). bytea: an upstream may answer bytes that are not storable as text.
CREATE TABLE bodies (
    ref   uuid NOT NULL,
    kind  text NOT NULL CHECK (kind IN ('tpl', 'res', 'err')),
    body  bytea NOT NULL,
    PRIMARY KEY (ref, kind)
);

-- Identity columns are nullable: a batch's later events may be projected before its
-- BatchCreated (they come from different workers); such a row stays invisible until then.
CREATE TABLE batches (
    id                   uuid PRIMARY KEY,
    owner                text,
    input_file_id        uuid,
    endpoint             text,
    completion_window    text,
    metadata             jsonb,
    output_file_id       uuid,
    error_file_id        uuid,
    api_key_id           uuid,
    total_requests       int NOT NULL DEFAULT 0,
    models               jsonb NOT NULL DEFAULT '{}',
    created_at           timestamptz,
    expires_at           timestamptz,
    requests_started_at  timestamptz,
    cancelling_at        timestamptz,
    cancelled_at         timestamptz,
    finalizing_at        timestamptz,
    completed_at         timestamptz,
    failed_at            timestamptz,
    errors_message       text,
    deleted_at           timestamptz
);
CREATE INDEX batches_owner_created ON batches (owner, created_at DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX batches_input_file ON batches (input_file_id);
CREATE INDEX batches_output_file ON batches (output_file_id);
CREATE INDEX batches_error_file ON batches (error_file_id);

-- CreateBatch commands the commands agent refused, with the answer the API gives.
CREATE TABLE batch_rejections (
    batch_id  uuid PRIMARY KEY,
    owner     text NOT NULL,
    status    int NOT NULL,
    message   text NOT NULL,
    code      text,
    param     text
);

-- Counters folded from request transitions, in the same transaction as the rows.
CREATE TABLE batch_counts (
    batch_id       uuid PRIMARY KEY,
    pending        int NOT NULL DEFAULT 0,
    in_progress    int NOT NULL DEFAULT 0,
    completed      int NOT NULL DEFAULT 0,
    failed         int NOT NULL DEFAULT 0,
    canceled       int NOT NULL DEFAULT 0,
    response_bytes bigint NOT NULL DEFAULT 0,  -- Σ response_size of completed rows
    error_bytes    bigint NOT NULL DEFAULT 0,  -- Σ response_size of failed rows
    last_terminal_at timestamptz
);

CREATE TABLE requests (
    id              uuid PRIMARY KEY,
    batch_id        uuid,
    file_id         uuid,           -- the template is line line_number of this file
    line_number     int,
    model           text NOT NULL,
    owner           text NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending','claimed','processing','completed','failed','canceled')),
    retry_attempt   int NOT NULL DEFAULT 0,
    not_before      timestamptz,
    claim_id        uuid,
    daemon_id       text,
    claimed_at      timestamptz,
    started_at      timestamptz,
    response_status int,
    response_size   int NOT NULL DEFAULT 0,
    error_type      text,
    routed_model    text,
    service_tier    text,
    deadline        timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    completed_at    timestamptz,
    failed_at       timestamptz,
    canceled_at     timestamptz,
    projected_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Position of the last event applied to this row (its record's offset << 20 | its index
    -- in the record): a request's events share one partition, so an event at or below it is
    -- a replay and is skipped.
    last_offset     bigint NOT NULL
);
CREATE INDEX requests_batch_output ON requests (batch_id, completed_at, id) WHERE state = 'completed';
CREATE INDEX requests_batch_error ON requests (batch_id, failed_at, id) WHERE state = 'failed';
CREATE INDEX requests_batch_state ON requests (batch_id, state);
