-- The error envelope of a failure the engine decided itself (`RequestFailed.error`), kept on its
-- row: in `bodies` it shared the `err` slot with an upstream failure's envelope, which arrives on
-- the bodies topic, so after a retry which of the two a replay kept depended on which topic it
-- read first. The row's last `RequestFailed` sets or clears it, in the requests topic's order.
-- Envelopes projected before this stay in `bodies`, where the reads still find them.
ALTER TABLE requests ADD COLUMN error_envelope bytea;
