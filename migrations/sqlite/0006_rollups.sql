-- toolgate audit store, version 6: per-minute rollups for the dashboard (issue 16), kept by the
-- writer in the same transaction as the rows they count (src/audit/rollup.rs), so a committed
-- row is always counted once and a rolled-back batch never is.
--
-- One row per minute × (kind, principal, node, server, tool, method, effect), all names.id
-- (effect 1 allow, 0 deny). `latency` is a log-bucket histogram of the calls' latency (the
-- decision's own latency_us, or its outcome's: the latency a query row shows), encoded by
-- rollup::Hist (pairs of a one-byte bucket and a four-byte little-endian count, by bucket);
-- NULL when no latency was recorded. Not chained: derived data, rebuilt from the rows on
-- upgrade, pruned with them by retention.

CREATE TABLE rollups (
  minute    INTEGER NOT NULL,  -- minutes since 1970, UTC (decisions.time / 60,000,000)
  kind      INTEGER NOT NULL,
  principal INTEGER NOT NULL,
  node      INTEGER NOT NULL,
  server    INTEGER NOT NULL,
  tool      INTEGER NOT NULL,
  method    INTEGER NOT NULL,
  effect    INTEGER NOT NULL,
  calls     INTEGER NOT NULL,
  latency   BLOB,
  PRIMARY KEY (minute, kind, principal, node, server, tool, method, effect)
) STRICT, WITHOUT ROWID;
