-- Chain steps' payloads (sreq:/sres:/serr:<step_id> on the bodies topic) are projected into
-- `bodies` like request bodies, keyed by step id, so a step row can copy its payload whichever
-- of the two (the body, the step event) the projector meets first.
ALTER TABLE bodies DROP CONSTRAINT IF EXISTS bodies_kind_check;
ALTER TABLE bodies ADD CONSTRAINT bodies_kind_check
    CHECK (kind IN ('tpl', 'res', 'err', 'sreq', 'sres', 'serr'));
