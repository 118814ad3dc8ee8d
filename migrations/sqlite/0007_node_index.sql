-- toolgate audit store, version 7: an index for `--node` filters (issue 14 part 6).
--
-- Without it, "newest N of one node" walked the time index until it had found N rows of that
-- node: 28.7 ms p50 over 1M rows with 2,000 nodes (docs/benchmarks.md). Like the principal and
-- tool indexes it is (name id, time), so a node's newest rows are one descending range scan.
-- Additive: an existing store gets it built from its rows at upgrade (a few seconds per
-- million rows, once, inside the migration's transaction).
CREATE INDEX decisions_node ON decisions (node, time);
