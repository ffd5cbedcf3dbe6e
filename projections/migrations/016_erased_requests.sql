-- Requests erased from the read model: a body of one that arrives later (a result that raced
-- its erasure, or a replay that meets the bodies topic first) is dropped and tombstoned again.
CREATE TABLE erased_requests (
    id uuid PRIMARY KEY
);
