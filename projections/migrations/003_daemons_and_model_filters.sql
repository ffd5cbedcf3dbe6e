-- Workers as the reference's daemon records (core §1.5), folded from cannonade.workers.v1.
CREATE TABLE daemons (
    id                  text PRIMARY KEY,
    role                text NOT NULL,
    status              text NOT NULL CHECK (status IN ('initializing', 'running', 'dead')),
    hostname            text,
    pid                 int,
    version             text,
    config_snapshot     jsonb,
    started_at          timestamptz,
    last_heartbeat      timestamptz,
    stopped_at          timestamptz,
    requests_processed  bigint NOT NULL DEFAULT 0,
    requests_failed     bigint NOT NULL DEFAULT 0,
    requests_in_flight  int NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL
);

-- The model-filters log (core §1.6): one row per event; the current state of a model is its
-- latest row.
CREATE TABLE model_filters (
    id                 bigserial PRIMARY KEY,
    event_id           text NOT NULL UNIQUE,
    model              text NOT NULL,
    state              text NOT NULL CHECK (state IN ('live', 'coming', 'absent', 'leaving')),
    expected_ready_at  timestamptz,
    created_at         timestamptz NOT NULL
);
CREATE INDEX model_filters_latest ON model_filters (model, created_at DESC, id DESC);
