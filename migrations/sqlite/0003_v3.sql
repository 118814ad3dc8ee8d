-- toolgate audit store, version 3: compact rows and a keyed chain. Append-only file.
--
-- A new store is created from this file alone; a v1/v2 store is rebuilt into these tables by
-- src/audit/migrate.rs (its chain verified first, then every row re-keyed) and `events` dropped.
--
-- The chain runs over three insert-only tables that share one sequence (`seq`, their rowid):
--   decisions  one authorization decision (the contract row of DESIGN.md §5);
--   outcomes   what happened after an allowed decision, keyed to the decision's seq;
--   anchors    written by retention after pruning: the last pruned row's seq and hash.
-- hash = HMAC-SHA-256(key, prev hash ‖ seq as 8 bytes big-endian ‖ SHA-256(canonical logical
-- row)), with the per-install key kept outside this file (audit.key_file). The logical row is
-- the one `audit query` prints, with every lookup resolved: editing a lookup row breaks the chain.
--
-- Strings live once in `names` (insert-only); rows hold their integer ids. Ids 1-7 are fixed,
-- so partial indexes can name the common values with ranges (a NOT IN list costs every insert).
--
-- Room for later migrations (additive: ADD COLUMN with a NULL default costs no bytes on old rows):
-- a caller and an asserted principal on `check` rows (two more name ids), replay inputs (a table of
-- deduplicated role/attribute sets, referenced by id), `shadow` rows (kind 'shadow' plus a link
-- to the decision they shadow), and rollup tables for the dashboard.

CREATE TABLE names (
  id   INTEGER PRIMARY KEY,
  text TEXT    NOT NULL UNIQUE
) STRICT;
INSERT INTO names (id, text) VALUES
  (1, ''), (2, 'pending'), (3, 'forwarded'), (4, 'denied'), (5, 'answered'), (6, '[]'), (7, 'mcp');

-- Explain traces (canonical JSON), deduplicated by SHA-256.
CREATE TABLE explains (
  id     INTEGER PRIMARY KEY,
  digest BLOB    NOT NULL UNIQUE,
  text   TEXT    NOT NULL
) STRICT;

CREATE TABLE decisions (
  seq         INTEGER PRIMARY KEY,  -- chain position
  id          ANY     NOT NULL,     -- the UUIDv7 as 16 bytes (text only for an id that is not one)
  time        INTEGER NOT NULL,     -- microseconds since 1970, UTC
  gateway     INTEGER NOT NULL,     -- names.id
  kind        INTEGER NOT NULL,     -- names.id: mcp | check | hook | identity | shadow
  principal   INTEGER NOT NULL,
  login       INTEGER NOT NULL,
  node        INTEGER NOT NULL,
  node_id     INTEGER NOT NULL,
  tags        INTEGER NOT NULL,     -- names.id of the canonical JSON array
  ip          INTEGER NOT NULL,
  server      INTEGER NOT NULL,
  method      INTEGER NOT NULL,
  tool        INTEGER NOT NULL,
  action      INTEGER NOT NULL,
  effect      INTEGER NOT NULL CHECK (effect IN (0, 1)),  -- 1 allow, 0 deny
  policy      INTEGER NOT NULL,
  rule        INTEGER NOT NULL,
  reason      INTEGER NOT NULL,
  args_digest ANY,                  -- SHA-256 as 32 bytes; NULL: none
  outcome     INTEGER NOT NULL,     -- names.id of the decision's own outcome (pending, denied, ...)
  latency_us  INTEGER,
  policy_hash INTEGER NOT NULL,
  explain     INTEGER,              -- explains.id; NULL: null
  arguments   TEXT,                 -- canonical JSON per audit.arguments; NULL: null
  hash        BLOB    NOT NULL
) STRICT;

CREATE TABLE outcomes (
  seq        INTEGER PRIMARY KEY,
  decision   ANY     NOT NULL,      -- the decision's seq (its id as text if that was not found)
  time       INTEGER NOT NULL,
  gateway    INTEGER NOT NULL,
  outcome    INTEGER NOT NULL,      -- names.id: forwarded, upstream_error:<kind>, ...
  latency_us INTEGER,
  detail     INTEGER NOT NULL,      -- names.id (the logical row's reason)
  hash       BLOB    NOT NULL
) STRICT;

CREATE TABLE anchors (
  seq          INTEGER PRIMARY KEY,
  time         INTEGER NOT NULL,
  gateway      INTEGER NOT NULL,
  through_seq  INTEGER NOT NULL,    -- every row with seq <= this was pruned
  through_hash BLOB    NOT NULL,    -- the hash of that row: the next row's prev
  pruned_rows  INTEGER NOT NULL,
  reason       TEXT    NOT NULL,
  hash         BLOB    NOT NULL
) STRICT;

-- Only what the queries need (each index costs every insert).
CREATE UNIQUE INDEX decisions_id    ON decisions (id);
CREATE INDEX decisions_time         ON decisions (time);
CREATE INDEX decisions_principal    ON decisions (principal, time);
CREATE INDEX decisions_tool         ON decisions (tool, time);
CREATE INDEX decisions_deny         ON decisions (time) WHERE effect < 1;
CREATE INDEX decisions_rare         ON decisions (outcome, time) WHERE outcome > 7;
CREATE INDEX outcomes_decision      ON outcomes (decision);
CREATE INDEX outcomes_rare          ON outcomes (outcome, time) WHERE outcome > 7;

CREATE TABLE IF NOT EXISTS meta (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS prune_permit (one INTEGER PRIMARY KEY CHECK (one = 1)) STRICT;

CREATE TRIGGER decisions_no_update BEFORE UPDATE ON decisions
BEGIN SELECT RAISE(ABORT, 'audit rows are insert-only'); END;
CREATE TRIGGER outcomes_no_update BEFORE UPDATE ON outcomes
BEGIN SELECT RAISE(ABORT, 'audit rows are insert-only'); END;
CREATE TRIGGER anchors_no_update BEFORE UPDATE ON anchors
BEGIN SELECT RAISE(ABORT, 'audit rows are insert-only'); END;
CREATE TRIGGER names_no_update BEFORE UPDATE ON names
BEGIN SELECT RAISE(ABORT, 'audit lookups are insert-only'); END;
CREATE TRIGGER explains_no_update BEFORE UPDATE ON explains
BEGIN SELECT RAISE(ABORT, 'audit lookups are insert-only'); END;
CREATE TRIGGER names_no_delete BEFORE DELETE ON names
BEGIN SELECT RAISE(ABORT, 'audit lookups are insert-only'); END;
CREATE TRIGGER explains_no_delete BEFORE DELETE ON explains
BEGIN SELECT RAISE(ABORT, 'audit lookups are insert-only'); END;
CREATE TRIGGER decisions_no_delete BEFORE DELETE ON decisions WHEN NOT EXISTS (SELECT 1 FROM prune_permit)
BEGIN SELECT RAISE(ABORT, 'audit rows are insert-only (only retention may prune)'); END;
CREATE TRIGGER outcomes_no_delete BEFORE DELETE ON outcomes WHEN NOT EXISTS (SELECT 1 FROM prune_permit)
BEGIN SELECT RAISE(ABORT, 'audit rows are insert-only (only retention may prune)'); END;
CREATE TRIGGER anchors_no_delete BEFORE DELETE ON anchors WHEN NOT EXISTS (SELECT 1 FROM prune_permit)
BEGIN SELECT RAISE(ABORT, 'audit rows are insert-only (only retention may prune)'); END;
