-- toolgate audit store, version 4: what a decision needs to be evaluated again (issue 18 part 1,
-- `toolgate policy replay`). Additive: old rows keep NULL in the new columns and are reported by
-- replay as "not replayable".
--
-- inputs  the principal (id, roles, attributes, policy version, scope) and the resource (kind,
--         id, scope, policy version, attributes, `arguments` and `uri` as null placeholders) as canonical
--         JSON, deduplicated by SHA-256 like `explains`: a caller's principal and a tool's
--         resource repeat on almost every row, so a row costs two integers.
-- The arguments stay where `audit.arguments` puts them (`decisions.arguments`, `args_digest`);
-- a URI (`resources/read`) is kept only in `tool`/`action`, as `audit.arguments` allows.
--
-- These columns are NOT part of the chained logical row (the Postgres fleet store does not carry
-- them): they feed what-if analysis, not evidence. `audit verify` does not cover them.

CREATE TABLE inputs (
  id     INTEGER PRIMARY KEY,
  digest BLOB    NOT NULL UNIQUE,
  text   TEXT    NOT NULL
) STRICT;

ALTER TABLE decisions ADD COLUMN principal_input INTEGER;  -- inputs.id; NULL: not recorded
ALTER TABLE decisions ADD COLUMN resource_input  INTEGER;  -- inputs.id; NULL: not recorded

CREATE TRIGGER inputs_no_update BEFORE UPDATE ON inputs
BEGIN SELECT RAISE(ABORT, 'audit lookups are insert-only'); END;
CREATE TRIGGER inputs_no_delete BEFORE DELETE ON inputs
BEGIN SELECT RAISE(ABORT, 'audit lookups are insert-only'); END;
