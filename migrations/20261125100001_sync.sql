-- Syncs with Stripe's API (issue 3).
--
-- `sync_attempts` records every attempt to sync a customer from Stripe's API: why it ran
-- (source), how it ended, how long it took and how many HTTP attempts it made.
-- `sync_customers` is the per-customer schedule: a pending request (from an ambiguous
-- webhook, a failed sync's retry, the periodic reconciler), the run of consecutive
-- failures, and the flag raised when that run passes three.
CREATE TABLE sync_attempts
(
    id          bigserial PRIMARY KEY,
    sync_id     text        NOT NULL,
    customer_id text        NOT NULL,
    source      text        NOT NULL CHECK (source IN ('webhook', 'success_page', 'portal_return', 'reconciler', 'operator')),
    outcome     text        NOT NULL CHECK (outcome IN ('applied', 'unchanged', 'ambiguous', 'failed')),
    detail      text,
    -- HTTP attempts made to Stripe (retries of safe failures included).
    attempts    integer     NOT NULL,
    duration_ms integer     NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sync_attempts_customer ON sync_attempts (customer_id, started_at DESC);

CREATE TABLE sync_customers
(
    customer_id          text PRIMARY KEY,
    -- When the next sync is due; NULL when none is pending.
    next_attempt_at      timestamptz,
    pending_source       text,
    requested_at         timestamptz,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    flagged_at           timestamptz,
    last_outcome         text,
    last_error           text,
    last_synced_at       timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sync_customers_due ON sync_customers (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX sync_customers_flagged ON sync_customers (customer_id) WHERE flagged_at IS NOT NULL;
