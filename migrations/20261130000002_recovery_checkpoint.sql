-- The missed-event recovery poller's checkpoint (owned by `recovery`): how far, in Stripe's
-- `created`, Stripe's Events API has been read. The poller reads again from a little before
-- it (an overlap), because Stripe may write an event late.
CREATE TABLE recovery_checkpoint
(
    name            text PRIMARY KEY,
    created_through timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
