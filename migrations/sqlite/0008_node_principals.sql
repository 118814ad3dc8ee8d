-- toolgate audit store, version 8: `--node` through the principal index (issue 14 part 6).
--
-- v7's `(node, time)` index was a second randomly ordered B-tree beside `(principal, time)`:
-- with many distinct callers in a batch, each dirtied about one leaf page per row per commit,
-- and the insert rate at 1,000 principals fell from 108k to 56k rows/s (docs/benchmarks.md).
-- A node's rows are nearly always one principal's (DESIGN.md §3: a user node's principal is its
-- user, a tagged node's is the node itself; only `check` and `hook` callers assert others), so
-- this table records which principals each node has carried, and a `--node` query with one
-- such principal is a range scan of `(principal, time)`. A node with several (a decision-API
-- caller) walks the time index, as before v7. The writer adds a pair the first time it sees
-- it (cached in memory), so the table costs nothing per row in steady state.
--
-- The pairs are an index, not audit data: they are outside the chain, like the indexes.
-- Deleting one could hide a node's rows from `--node` queries, never from `audit verify`.
DROP INDEX decisions_node;

CREATE TABLE node_principals (
  node      INTEGER NOT NULL,  -- names.id
  principal INTEGER NOT NULL,  -- names.id
  PRIMARY KEY (node, principal)
) STRICT, WITHOUT ROWID;

INSERT INTO node_principals (node, principal) SELECT DISTINCT node, principal FROM decisions;

CREATE TRIGGER node_principals_no_update BEFORE UPDATE ON node_principals
BEGIN SELECT RAISE(ABORT, 'audit lookups are insert-only'); END;
CREATE TRIGGER node_principals_no_delete BEFORE DELETE ON node_principals
BEGIN SELECT RAISE(ABORT, 'audit lookups are insert-only'); END;
