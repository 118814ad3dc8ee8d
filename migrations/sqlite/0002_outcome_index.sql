-- toolgate audit store, version 2: an index for `--outcome` filters.
--
-- A decision's outcome is either its own (denied, refused, pending, ...) or, for allowed calls,
-- the latest outcome row's (forwarded, upstream_error:...). Without this index an outcome
-- filter merged the latest outcome into every decision in the window (48 ms over 1M rows);
-- with it, the query finds candidate rows by outcome value first (src/audit/query.rs).
-- Partial: 'pending' (every allowed call's decision row) and 'forwarded' (its usual outcome)
-- are most rows, so they stay out of it, and most inserts never touch it. Queries for those
-- two values ride the time index instead; their matches are everywhere.
CREATE INDEX events_outcome ON events (outcome, time) WHERE outcome NOT IN ('pending', 'forwarded');
