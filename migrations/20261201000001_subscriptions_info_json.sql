-- `subscriptions.info` becomes `json` (issue 13, faster ingestion and replay). The answer
-- is written for every projected event and read back whole; nothing in Postgres looks
-- inside it except `info->>'deleted'` on the cache-miss path, which `json` answers too.
-- `jsonb` parsed each 2 KB answer into its binary form on every write and printed it back
-- to text on every read; `json` only checks the text is JSON and keeps it as written
-- (serde's compact form, as the Redis cache holds it). On a log of 1.87 M events,
-- `subledger replay` took 15.9-16.0 s with `json` against 16.2-16.9 s with `jsonb`.
ALTER TABLE subscriptions ALTER COLUMN info TYPE json USING info::json;

-- The type change rewrites the column: keep it lz4-compressed (see 20261130300001).
DO $$
BEGIN
    ALTER TABLE subscriptions ALTER COLUMN info SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this Postgres has no lz4: values stay pglz-compressed';
END
$$;
