-- toolgate audit store, version 2: an index for `--outcome` filters.
--
-- A decision's outcome is either its own (denied, refused, pending, ...) or, for allowed calls,
-- the latest outcome row's (forwarded, upstream_error:...). Without this index an outcome
-- filter merged the latest outcome into every decision in the window (48 ms over 1M rows);
-- with it, the query finds candidate rows by outcome value first (src/audit/query.rs).
-- Outcome values are few and times grow, so inserts append to a handful of index pages.
CREATE INDEX events_outcome ON events (outcome, time);
