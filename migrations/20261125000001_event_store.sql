-- The cqrs-es / postgres-es event store, plus a global position.
--
-- postgres-es names its columns on INSERT, so the two extra columns are filled by their
-- defaults. `global_seq` orders events across aggregates; `tx_id` is the inserting
-- transaction, which lets projections read only what every older transaction has
-- finished writing (a bigserial alone can commit out of order and be skipped).
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    global_seq     bigserial                    NOT NULL,
    tx_id          xid8                         NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at    timestamptz                  NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE UNIQUE INDEX events_global_seq ON events (global_seq);
CREATE INDEX events_read_order ON events (tx_id, global_seq);

-- Every Stripe event we acknowledged, keyed by Stripe's event id, with its raw payload
-- and what processing made of it.
CREATE TABLE inbox
(
    event_id        text PRIMARY KEY,
    event_type      text        NOT NULL,
    api_version     text,
    livemode        boolean     NOT NULL DEFAULT false,
    stripe_created  timestamptz NOT NULL,
    customer_id     text,
    payload         text        NOT NULL,
    source          text        NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'dead')),
    outcome         text,
    detail          text,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz
);
CREATE INDEX inbox_pending ON inbox (next_attempt_at) WHERE state = 'pending';
CREATE INDEX inbox_customer ON inbox (customer_id, stripe_created);

-- Where each projection has read the log up to: (tx_id, global_seq) of the last event applied.
CREATE TABLE projection_checkpoints
(
    name       text PRIMARY KEY,
    tx_id      xid8        NOT NULL DEFAULT '0',
    global_seq bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The platform table: one row per customer, the SubscriptionInfo the API answers.
CREATE TABLE subscriptions
(
    customer_id          text PRIMARY KEY,
    org_id               text,
    user_id              text,
    subscription_id      text,
    status               text        NOT NULL,
    price_id             text,
    current_period_end   timestamptz,
    info                 jsonb       NOT NULL,
    version              bigint      NOT NULL,
    updated_at           timestamptz NOT NULL
);
CREATE INDEX subscriptions_org ON subscriptions (org_id, updated_at DESC);
CREATE INDEX subscriptions_user ON subscriptions (user_id, updated_at DESC);

-- A mirror of Stripe's own subscription objects, one row per subscription id.
CREATE TABLE merchant_subscriptions
(
    subscription_id      text PRIMARY KEY,
    customer_id          text        NOT NULL,
    status               text        NOT NULL,
    price_id             text,
    product_id           text,
    lookup_key           text,
    quantity             bigint,
    currency             text,
    created              timestamptz,
    current_period_start timestamptz,
    current_period_end   timestamptz,
    cancel_at_period_end boolean     NOT NULL,
    cancel_at            timestamptz,
    canceled_at          timestamptz,
    ended_at             timestamptz,
    trial_start          timestamptz,
    trial_end            timestamptz,
    latest_invoice_id    text,
    stripe_event_id      text        NOT NULL,
    stripe_created       timestamptz NOT NULL,
    version              bigint      NOT NULL
);
CREATE INDEX merchant_subscriptions_customer ON merchant_subscriptions (customer_id);
