-- toolgate audit store, version 1. Append-only file: never edit a released migration; add 0002_*.sql.
--
-- One insert-only table holds every chained event, in commit order (seq):
--   event = 'decision'  one authorization decision (the contract row of DESIGN.md §5);
--   event = 'outcome'   what happened after an allowed decision (forwarded, upstream_error, ...),
--                       pointing at its decision through decision_id;
--   event = 'anchor'    written by retention after pruning: records the last pruned row's hash so
--                       the chain still verifies from the oldest remaining row.
-- hash = SHA-256(prev_hash "\n" seq "\n" canonical JSON of every other column), see src/audit/chain.rs.

CREATE TABLE events (
  seq          INTEGER PRIMARY KEY,            -- chain position, 1, 2, 3, ... (never reused)
  event        TEXT    NOT NULL CHECK (event IN ('decision', 'outcome', 'anchor')),
  id           TEXT    NOT NULL UNIQUE,        -- decision id (UUIDv7), the MCP Toolgate-Decision-Id
  decision_id  TEXT    NOT NULL DEFAULT '',    -- outcome rows: the decision they complete
  gateway      TEXT    NOT NULL DEFAULT '',    -- the gateway (node) that wrote the row
  time         TEXT    NOT NULL,               -- RFC 3339 UTC, fixed width: 2026-01-02T03:04:05.123456Z
  kind         TEXT    NOT NULL DEFAULT '',    -- mcp | check | hook | identity
  principal    TEXT    NOT NULL DEFAULT '',    -- principal id (login or tagged node name)
  login        TEXT    NOT NULL DEFAULT '',
  node         TEXT    NOT NULL DEFAULT '',    -- caller's node name
  node_id      TEXT    NOT NULL DEFAULT '',    -- caller's node stable id
  tags         TEXT    NOT NULL DEFAULT '[]',  -- JSON array of the caller's tags
  ip           TEXT    NOT NULL DEFAULT '',
  server       TEXT    NOT NULL DEFAULT '',    -- upstream server name
  method       TEXT    NOT NULL DEFAULT '',    -- JSON-RPC method
  tool         TEXT    NOT NULL DEFAULT '',
  action       TEXT    NOT NULL DEFAULT '',    -- the checked action, e.g. tools/call::create_issue
  effect       TEXT    NOT NULL DEFAULT '',    -- allow | deny ('' for outcome and anchor rows)
  policy       TEXT    NOT NULL DEFAULT '',    -- matched policy
  rule         TEXT    NOT NULL DEFAULT '',    -- matched rule
  reason       TEXT    NOT NULL DEFAULT '',
  args_digest  TEXT    NOT NULL DEFAULT '',    -- SHA-256 hex of the canonical arguments JSON
  outcome      TEXT    NOT NULL DEFAULT '',    -- forwarded | denied | upstream_error:... | pending ...
  latency_us   INTEGER,
  policy_hash  TEXT    NOT NULL DEFAULT '',    -- policy snapshot hash
  explain      TEXT    NOT NULL DEFAULT 'null', -- JSON: the policy trace (scrubbed)
  arguments    TEXT    NOT NULL DEFAULT 'null', -- JSON: arguments per audit.arguments (none/digest: null)
  hash         TEXT    NOT NULL,
  prev_hash    TEXT    NOT NULL
) STRICT;

-- Common queries: time windows, per principal / tool / effect, newest first. Other filters
-- (node, tag, server, outcome) ride on one of these. Every index costs insert throughput: each
-- batch dirties index pages at random positions, so keep the set small.
-- Partial indexes: queries always say event = 'decision'. (seq, the rowid, ends every index.)
CREATE INDEX events_time      ON events (time)            WHERE event = 'decision';
CREATE INDEX events_principal ON events (principal, time) WHERE event = 'decision';
CREATE INDEX events_tool      ON events (tool, time)      WHERE event = 'decision';
CREATE INDEX events_effect    ON events (effect, time)    WHERE event = 'decision';
CREATE INDEX events_outcome_of ON events (decision_id)    WHERE event = 'outcome';

-- Small key/value state: chain head (checked by verify), Postgres shipping watermark.
CREATE TABLE meta (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
) STRICT;

-- Insert-only: updates always abort; deletes abort unless retention holds a permit in the same
-- transaction. This catches application bugs, not an attacker with the file (that is what the
-- hash chain is for).
CREATE TABLE prune_permit (one INTEGER PRIMARY KEY CHECK (one = 1)) STRICT;

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
  SELECT RAISE(ABORT, 'audit events are insert-only');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
WHEN NOT EXISTS (SELECT 1 FROM prune_permit)
BEGIN
  SELECT RAISE(ABORT, 'audit events are insert-only (only retention may prune)');
END;
