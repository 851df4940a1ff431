-- The large values the ingest path writes for every event (the inbox's raw payload, the
-- log's event JSON, the customer's answer in `subscriptions`) are compressed with lz4
-- instead of pglz: pglz_compress was the largest single Postgres function in a profile of
-- the ingest benchmark, and lz4 compresses and decompresses several times faster at a
-- slightly lower ratio. Only values written from now on are affected; older ones stay
-- pglz and are read as before. A Postgres built without lz4 keeps pglz (the statement is
-- refused there with feature_not_supported, which is not an error for subledger).
DO $$
BEGIN
    ALTER TABLE inbox ALTER COLUMN payload SET COMPRESSION lz4;
    ALTER TABLE events ALTER COLUMN payload SET COMPRESSION lz4;
    ALTER TABLE subscriptions ALTER COLUMN info SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this Postgres has no lz4: values stay pglz-compressed';
END
$$;
