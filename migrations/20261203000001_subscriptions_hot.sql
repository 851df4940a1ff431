-- Rewriting a customer's answer touches no index when its owners did not change (issue 13,
-- faster ingestion). Each projection batch upserts the `subscriptions` row of every
-- customer it saw; the owner indexes held `updated_at`, which every upsert changes, so
-- every upsert was a new row version with an entry in all three indexes. No query orders
-- by `updated_at` (an owner's rows are read by `org_id`/`user_id`, ordered by
-- `customer_id`), so the owner indexes name the customer instead, which a row never
-- changes; and each page keeps room for a new version of its rows, so that Postgres can
-- write it beside the old one (a HOT update: no index entries, the old version pruned
-- from the page when it fills).
DROP INDEX subscriptions_org;
DROP INDEX subscriptions_user;
CREATE INDEX subscriptions_org ON subscriptions (org_id, customer_id);
CREATE INDEX subscriptions_user ON subscriptions (user_id, customer_id);
ALTER TABLE subscriptions SET (fillfactor = 70);
