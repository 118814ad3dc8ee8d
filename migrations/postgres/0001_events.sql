-- toolgate fleet audit store (PostgreSQL), version 1. Append-only file: add 0002_*.sql for changes.
-- Gateways ship their committed SQLite rows here, in order, idempotent by id; every row names its
-- gateway and its store's id (one SQLite file), and (store_id, seq) is that store's chain position,
-- so each chain verifies here too.

CREATE TABLE events (
  id           TEXT        PRIMARY KEY,
  store_id     TEXT        NOT NULL,
  gateway      TEXT        NOT NULL,
  seq          BIGINT      NOT NULL,
  event        TEXT        NOT NULL CHECK (event IN ('decision', 'outcome', 'anchor')),
  decision_id  TEXT        NOT NULL DEFAULT '',
  time         TIMESTAMPTZ NOT NULL,
  kind         TEXT        NOT NULL DEFAULT '',
  principal    TEXT        NOT NULL DEFAULT '',
  login        TEXT        NOT NULL DEFAULT '',
  node         TEXT        NOT NULL DEFAULT '',
  node_id      TEXT        NOT NULL DEFAULT '',
  tags         JSONB       NOT NULL DEFAULT '[]',
  ip           TEXT        NOT NULL DEFAULT '',
  server       TEXT        NOT NULL DEFAULT '',
  method       TEXT        NOT NULL DEFAULT '',
  tool         TEXT        NOT NULL DEFAULT '',
  action       TEXT        NOT NULL DEFAULT '',
  effect       TEXT        NOT NULL DEFAULT '',
  policy       TEXT        NOT NULL DEFAULT '',
  rule         TEXT        NOT NULL DEFAULT '',
  reason       TEXT        NOT NULL DEFAULT '',
  args_digest  TEXT        NOT NULL DEFAULT '',
  outcome      TEXT        NOT NULL DEFAULT '',
  latency_us   BIGINT,
  policy_hash  TEXT        NOT NULL DEFAULT '',
  explain      TEXT        NOT NULL DEFAULT 'null', -- canonical JSON text, byte-exact for the chain
  arguments    TEXT        NOT NULL DEFAULT 'null', -- canonical JSON text, byte-exact for the chain
  tags_text    TEXT        NOT NULL DEFAULT '[]',   -- canonical JSON text of tags, byte-exact
  hash         TEXT        NOT NULL,
  prev_hash    TEXT        NOT NULL,
  received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
  UNIQUE (store_id, seq)
);

CREATE INDEX events_time      ON events (time)            WHERE event = 'decision';
CREATE INDEX events_principal ON events (principal, time) WHERE event = 'decision';
CREATE INDEX events_tool      ON events (tool, time)      WHERE event = 'decision';
CREATE INDEX events_node      ON events (node, time)      WHERE event = 'decision';
CREATE INDEX events_outcome_of ON events (decision_id)    WHERE event = 'outcome';
CREATE INDEX events_tags      ON events USING GIN (tags)  WHERE event = 'decision';
