-- toolgate fleet audit store (PostgreSQL), version 2: the keyed chain of SQLite schema v3.
-- chain: 1 = rows hashed with the old unkeyed SHA-256 chain, 3 = HMAC-SHA-256 with the
-- gateway's key, named by key_id (verifying takes that gateway's key file). Outcome and anchor
-- rows have no UUID in v3: their id here is "<store_id>:<seq>".
-- heads: each store's chain head, written with every shipped batch, so `audit verify --postgres`
-- catches rows removed from the end.
ALTER TABLE events ADD COLUMN chain SMALLINT NOT NULL DEFAULT 1;
ALTER TABLE events ADD COLUMN key_id TEXT NOT NULL DEFAULT '';

CREATE TABLE heads (
  store_id   TEXT        PRIMARY KEY,
  gateway    TEXT        NOT NULL,
  seq        BIGINT      NOT NULL,
  hash       TEXT        NOT NULL,
  key_id     TEXT        NOT NULL DEFAULT '',
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
