-- Inbox retention (issue 13): a processed row's raw payload is dropped after a while; the
-- row itself (event id, type, customer, outcome, times) stays, so a late redelivery of the
-- event is still recognised as a duplicate and `inspect` still shows the event's place in
-- the customer's timeline. The log keeps every fact the payload gave; it is never pruned.
ALTER TABLE inbox ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE inbox ADD COLUMN payload_pruned_at timestamptz;

-- Only a processed row may lose its payload: a pending row must still be processed and a
-- dead letter may be re-driven. NOT VALID: existing rows all have their payload, and
-- checking them would hold the table locked for a scan; new writes are checked.
ALTER TABLE inbox ADD CONSTRAINT inbox_payload_kept
    CHECK (payload IS NOT NULL OR (state = 'done' AND payload_pruned_at IS NOT NULL)) NOT VALID;

-- What the pruner walks, oldest processed first: only rows that still hold a payload,
-- so the index shrinks as rows are pruned and a prune batch never scans pruned rows.
CREATE INDEX inbox_prunable ON inbox (processed_at) WHERE state = 'done' AND payload IS NOT NULL;
