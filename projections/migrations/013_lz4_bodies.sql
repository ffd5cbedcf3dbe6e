-- Stored bodies are compressed with lz4 rather than the default pglz: TOAST compresses every
-- value over ~2 KB, and pglz spent ~0.1 s of server CPU on each 9 MB of uploaded chunks, on
-- the projector's path from upload to a visible file; lz4 takes a tenth of that. Values
-- already stored keep their compression. A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE template_chunks ALTER COLUMN body SET COMPRESSION lz4;
    ALTER TABLE bodies ALTER COLUMN body SET COMPRESSION lz4;
    ALTER TABLE response_steps ALTER COLUMN request_payload SET COMPRESSION lz4,
        ALTER COLUMN response_payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available on this server: bodies stay compressed with pglz';
END
$$;
