-- Read models projected from the Kafka log. Every table is rebuilt by replaying the log;
-- users and api_keys are the exception: they are administered here, not event-sourced.

CREATE TABLE users (
    id          text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    user_id     text NOT NULL REFERENCES users(id),
    -- sha256 of the secret; the secret itself is shown once and never stored or published.
    key_hash    bytea NOT NULL UNIQUE,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Where each projector has got to, written in the same transaction as its rows, so a
-- restarted projector resumes exactly after the last applied batch.
CREATE TABLE projection_offsets (
    consumer    text NOT NULL,
    topic       text NOT NULL,
    partition   int  NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
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

CREATE TABLE request_templates (
    id           uuid PRIMARY KEY,
    file_id      uuid NOT NULL,
    line_number  int  NOT NULL,
    custom_id    text,
    method       text NOT NULL,
    path         text NOT NULL,
    model        text NOT NULL,
    body_size    int  NOT NULL,
    UNIQUE (file_id, line_number)
);

CREATE TABLE bodies (
    ref   uuid NOT NULL,
    kind  text NOT NULL CHECK (kind IN ('tpl', 'res', 'err')),
    body  text NOT NULL,
    PRIMARY KEY (ref, kind)
);

CREATE TABLE batches (
    id                   uuid PRIMARY KEY,
    owner                text NOT NULL,
    input_file_id        uuid,
    endpoint             text NOT NULL,
    completion_window    text NOT NULL,
    metadata             jsonb,
    output_file_id       uuid,
    error_file_id        uuid,
    api_key_id           uuid,
    total_requests       int NOT NULL DEFAULT 0,
    models               jsonb NOT NULL DEFAULT '{}',
    created_at           timestamptz NOT NULL,
    expires_at           timestamptz NOT NULL,
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

-- Counters folded from request transitions. Kept apart from `batches` because a batch's
-- request events may be projected before its BatchCreated (they travel on other topics).
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
    template_id     uuid,
    line_number     int,
    custom_id       text,
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
    -- Kafka offset of the last event applied to this row: a request's events share one
    -- partition, so an event at or below it is a replay and is skipped.
    last_offset     bigint NOT NULL
);
CREATE INDEX requests_batch_output ON requests (batch_id, completed_at, id) WHERE state = 'completed';
CREATE INDEX requests_batch_error ON requests (batch_id, failed_at, id) WHERE state = 'failed';
CREATE INDEX requests_batch_state ON requests (batch_id, state);
