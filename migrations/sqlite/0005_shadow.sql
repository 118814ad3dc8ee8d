-- toolgate audit store, version 5: shadow rows (issue 18 part 3, `policies.shadow`). Additive:
-- old rows keep NULL in the new column.
--
-- A decision the shadow policy set decides differently is written as a row of kind `shadow` in
-- `decisions`, chained like any other row. `shadows` links it to the decision it shadows: that
-- decision's id (16 bytes for a UUID, text otherwise), which the logical row carries as
-- `decision_id` (so `audit verify` covers the link). NULL on every other row.
-- The shadow row keeps the decision's principal, server, tool and action; its effect, policy,
-- rule, reason and policy_hash are the shadow set's; its explain is
-- {"live": {"effect", "policy", "rule"}, "trace": <the shadow set's trace>}.

ALTER TABLE decisions ADD COLUMN shadows ANY;  -- the shadowed decision's id; NULL: not a shadow row
