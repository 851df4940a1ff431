-- Signed outbound notifications (issue 14 item 3): the notifier's place in the log, the
-- last answer it notified per owner, and the outbox the sender delivers from.

-- One row: how far the notifier has read the log (never past the platform tables).
CREATE TABLE notification_checkpoint
(
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    tx_id      xid8        NOT NULL DEFAULT '0',
    global_seq bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO notification_checkpoint DEFAULT VALUES;

-- The answer last notified for each org and user (the notified fields and the customers
-- it was computed from), so that only a change is sent and a time-based end is found.
CREATE TABLE notification_state
(
    owner_kind   text        NOT NULL CHECK (owner_kind IN ('org', 'user')),
    owner_id     text        NOT NULL,
    answer       jsonb       NOT NULL,
    customers    text[]      NOT NULL,
    access       boolean     NOT NULL,
    access_until timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_kind, owner_id)
);
CREATE INDEX notification_state_customers ON notification_state USING gin (customers);
CREATE INDEX notification_state_ending ON notification_state (access_until) WHERE access;

-- The outbox: one row per (notification, endpoint). `body` is the exact JSON signed and
-- sent, so a retry or a replay sends the same bytes under the same webhook-id.
CREATE TABLE notifications
(
    id              bigserial PRIMARY KEY,
    msg_id          text        NOT NULL,
    endpoint        text        NOT NULL,
    owner_kind      text        NOT NULL,
    owner_id        text        NOT NULL,
    log_position    bigint      NOT NULL,
    body            text        NOT NULL,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (msg_id, endpoint)
);
-- The sender's claim: the oldest pending row of each (endpoint, owner).
CREATE INDEX notifications_pending ON notifications (endpoint, owner_kind, owner_id, id) WHERE state = 'pending';
CREATE INDEX notifications_dead ON notifications (id) WHERE state = 'dead';
CREATE INDEX notifications_position ON notifications (log_position);
