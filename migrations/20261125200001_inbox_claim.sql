-- Claiming inbox rows cheaply under load (issue 6).
--
-- Workers claim `ORDER BY next_attempt_at, stripe_created LIMIT n`. With an index on
-- `next_attempt_at` alone the planner chose a bitmap scan, which visits the heap page of
-- every entry, including the thousands of rows processed since the last vacuum (a
-- processed row leaves a dead entry in this partial index), and sorts them: 10-35 ms per
-- claim during a burst. An index in the claim's own order lets the claim stop after n
-- rows, and a plain index scan marks the dead entries it meets so later scans skip them.
DROP INDEX inbox_pending;
CREATE INDEX inbox_pending ON inbox (next_attempt_at, stripe_created) WHERE state = 'pending';

-- The inbox is a queue: every row is inserted, updated once or twice, then only read.
-- Vacuum it after a few thousand changes rather than after 20 % of the table.
ALTER TABLE inbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
                       autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 5000);
