-- Webhook endpoints (cannonade.webhooks.v1), batch notifications (BatchNotified on
-- cannonade.batches.v1, core §4.9) and their delivery attempts (cannonade.webhook-deliveries.v1),
-- plus the indexes the purge (core §2.9) walks.

CREATE TABLE webhooks (
    id             uuid PRIMARY KEY,
    owner          text NOT NULL,
    url            text NOT NULL,
    name           text NOT NULL,
    event_types    text[] NOT NULL,
    -- The signing secret sealed with a configured key (AES-256-GCM); NULL once deleted.
    secret_key_id  text,
    secret_sealed  text,
    secret_hint    text NOT NULL,
    created_at     timestamptz NOT NULL,
    deleted_at     timestamptz
);
CREATE INDEX webhooks_owner ON webhooks (owner, created_at DESC, id DESC) WHERE deleted_at IS NULL;

-- One endpoint's copy of one notification. The projector only ever inserts these rows: a
-- notifier holds one under a row lock while it delivers, and must not block the projector.
CREATE TABLE webhook_deliveries (
    id               uuid PRIMARY KEY,
    webhook_id       uuid NOT NULL,
    batch_id         uuid NOT NULL,
    owner            text NOT NULL,
    event_type       text NOT NULL,
    notification_id  text NOT NULL,
    terminal_at      timestamptz NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, created_at DESC, id DESC);

-- Deliveries still to make, with when the next attempt is due (projected from the attempts).
CREATE TABLE webhook_open (
    delivery_id  uuid PRIMARY KEY,
    attempts     int NOT NULL DEFAULT 0,
    due_at       timestamptz NOT NULL
);
CREATE INDEX webhook_open_due ON webhook_open (due_at);

CREATE TABLE webhook_attempts (
    delivery_id      uuid NOT NULL,
    attempt          int NOT NULL,
    webhook_id       uuid NOT NULL,
    attempted_at     timestamptz NOT NULL,
    outcome          text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'failed')),
    status_code      int,
    error            text,
    duration_ms      int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    PRIMARY KEY (delivery_id, attempt)
);

-- Batches the notifier still has to look at.
CREATE INDEX batches_to_notify ON batches (id) WHERE notification_sent_at IS NULL AND deleted_at IS NULL;
-- Soft-deleted parents, for the purge.
CREATE INDEX batches_deleted ON batches (id) WHERE deleted_at IS NOT NULL;
CREATE INDEX files_deleted ON files (id) WHERE deleted_at IS NOT NULL;
CREATE INDEX model_filters_id_model ON model_filters (model, id);
