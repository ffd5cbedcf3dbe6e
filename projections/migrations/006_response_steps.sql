-- Steps of multi-step responses (responses-and-api §1, §9.5), projected from
-- cannonade.responses.v1. The §1.2 invariants are CHECK constraints: a row that breaks one is
-- refused and its event dead-lettered.
CREATE TABLE response_steps (
    id               uuid PRIMARY KEY,
    request_id       uuid,
    prev_step_id     uuid,
    parent_step_id   uuid,
    step_kind        text NOT NULL CHECK (step_kind IN ('model_call', 'tool_call')),
    step_sequence    bigint NOT NULL CHECK (step_sequence >= 1),
    tool             text,
    request_payload  bytea,       -- sreq:<id> on the bodies topic, copied when projected
    response_payload bytea,
    state            text NOT NULL CHECK (state IN ('pending', 'processing', 'completed', 'failed', 'canceled')),
    started_at       timestamptz,
    completed_at     timestamptz,
    failed_at        timestamptz,
    canceled_at      timestamptz,
    retry_attempt    int NOT NULL DEFAULT 0,
    error            bytea,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    last_offset      bigint NOT NULL,
    CHECK ((step_kind = 'model_call') = (request_id IS NOT NULL)),
    CHECK (state <> 'pending' OR (started_at IS NULL AND completed_at IS NULL AND failed_at IS NULL
           AND canceled_at IS NULL AND response_payload IS NULL AND error IS NULL)),
    CHECK (state <> 'processing' OR (started_at IS NOT NULL AND completed_at IS NULL
           AND failed_at IS NULL AND canceled_at IS NULL AND response_payload IS NULL AND error IS NULL)),
    CHECK (state <> 'completed' OR (started_at IS NOT NULL AND completed_at IS NOT NULL
           AND failed_at IS NULL AND canceled_at IS NULL AND error IS NULL)),
    CHECK (state <> 'failed' OR (failed_at IS NOT NULL AND error IS NOT NULL
           AND completed_at IS NULL AND canceled_at IS NULL AND response_payload IS NULL)),
    CHECK (state <> 'canceled' OR (canceled_at IS NOT NULL AND completed_at IS NULL
           AND failed_at IS NULL AND response_payload IS NULL))
);
CREATE UNIQUE INDEX response_steps_request ON response_steps (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX response_steps_chain ON response_steps (parent_step_id, step_sequence) WHERE parent_step_id IS NOT NULL;
CREATE INDEX response_steps_prev ON response_steps (prev_step_id) WHERE prev_step_id IS NOT NULL;

-- What a chain knows beyond its steps: who asked, and how it ended (for GET /v1/responses
-- while it runs, and the chain's own finalisation record).
CREATE TABLE response_chains (
    id             uuid PRIMARY KEY,   -- the response uuid = head step id = head request id
    owner          text NOT NULL,
    model          text NOT NULL,
    background     boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL,
    finalized_at   timestamptz,
    final_status   int,
    last_offset    bigint NOT NULL
);
