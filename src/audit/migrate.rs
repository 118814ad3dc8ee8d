//! Schema migrations: plain SQL files under `migrations/`, embedded at build time, applied in
//! order at start, each in its own transaction. SQLite records the version in `PRAGMA
//! user_version`; Postgres in a `schema_migrations` table (under an advisory lock, so several
//! gateways starting together migrate once).

use rusqlite::{Connection, OptionalExtension, params};

use super::chain::{self, Anchor, GENESIS, content_digest, hex, legacy_row_hash, link};
use super::key::{ChainKey, unhex32};
use super::record::{COLUMNS, StoredRow};
use super::store::{self, Lookups};

/// SQLite migrations, in order; version N is the N-th entry. Versions 1 and 2 are the old
/// `events` table; version 3 is created from its own file on a new store, and rebuilt from the
/// old table by [`upgrade_v2`] on an old one; versions after 3 are plain additive files applied
/// in order on top.
pub const SQLITE: &[(&str, &str)] = &[
    (
        "0001_events",
        include_str!("../../migrations/sqlite/0001_events.sql"),
    ),
    (
        "0002_outcome_index",
        include_str!("../../migrations/sqlite/0002_outcome_index.sql"),
    ),
    (
        "0003_v3",
        include_str!("../../migrations/sqlite/0003_v3.sql"),
    ),
    (
        "0004_replay_inputs",
        include_str!("../../migrations/sqlite/0004_replay_inputs.sql"),
    ),
    (
        "0005_shadow",
        include_str!("../../migrations/sqlite/0005_shadow.sql"),
    ),
    (
        "0006_rollups",
        include_str!("../../migrations/sqlite/0006_rollups.sql"),
    ),
    (
        "0007_node_index",
        include_str!("../../migrations/sqlite/0007_node_index.sql"),
    ),
    (
        "0008_node_principals",
        include_str!("../../migrations/sqlite/0008_node_principals.sql"),
    ),
];

/// The version that adds the rollups: a store below it gets them built from its rows.
const ROLLUPS: usize = 6;

/// The version the v1/v2 rebuild lands on; later migrations apply on top of it in order.
const V3: usize = 3;

/// Postgres migrations, in order.
pub const POSTGRES: &[(&str, &str)] = &[
    (
        "0001_events",
        include_str!("../../migrations/postgres/0001_events.sql"),
    ),
    (
        "0002_keyed_chain",
        include_str!("../../migrations/postgres/0002_keyed_chain.sql"),
    ),
];

/// `application_id` of toolgate audit databases ("TGAU").
pub const APPLICATION_ID: i64 = 0x5447_4155;

/// The schema version of an existing store (0: new).
pub fn version(conn: &Connection) -> Result<usize, String> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| format!("reading the schema version: {e}"))?;
    usize::try_from(current).map_err(|_| format!("bad schema version {current}"))
}

/// Brings a SQLite database to the latest version; returns the version it is at. An old store
/// is rebuilt in place with the keyed chain (`key`) after its old chain verifies.
pub fn sqlite(conn: &mut Connection, key: &ChainKey) -> Result<usize, String> {
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| format!("reading the application id: {e}"))?;
    if app != 0 && app != APPLICATION_ID {
        return Err(format!(
            "not a toolgate audit database (application_id {app:#x})"
        ));
    }
    let current = version(conn)?;
    if current > SQLITE.len() {
        return Err(format!(
            "the database is at schema version {current}, newer than this toolgate knows ({}); refusing to touch it",
            SQLITE.len()
        ));
    }
    if current == SQLITE.len() {
        return Ok(current);
    }
    let tx = conn.transaction().map_err(|e| format!("migration: {e}"))?;
    if current == 0 {
        tx.execute_batch(SQLITE[2].1)
            .map_err(|e| format!("migration 0003_v3: {e}"))?;
        after_v3(&tx, V3)?;
    } else if current < V3 {
        // An old store: finish the old migrations, then rebuild (up to the latest version).
        for (name, sql) in SQLITE.iter().take(2).skip(current) {
            tx.execute_batch(sql)
                .map_err(|e| format!("migration {name}: {e}"))?;
        }
        upgrade_v2(&tx, key)?;
    } else {
        after_v3(&tx, current)?;
    }
    if current < ROLLUPS {
        super::rollup::backfill(&tx).map_err(|e| format!("migration 0006_rollups: {e}"))?;
    }
    tx.execute_batch(&format!(
        "PRAGMA user_version = {}; PRAGMA application_id = {APPLICATION_ID};",
        SQLITE.len()
    ))
    .map_err(|e| format!("migration: {e}"))?;
    tx.commit().map_err(|e| format!("migration: {e}"))?;
    if (1..V3).contains(&current) {
        // Give the old table's pages back (auto_vacuum = INCREMENTAL stores).
        let _ = conn.execute_batch("PRAGMA incremental_vacuum");
        tracing::info!(
            from = current,
            "audit store rebuilt as schema v3 (keyed chain)"
        );
    }
    Ok(SQLITE.len())
}

/// Applies the additive migrations after version `from` (at least 3), in order.
fn after_v3(tx: &Connection, from: usize) -> Result<(), String> {
    for (name, sql) in SQLITE.iter().skip(from.max(V3)) {
        tx.execute_batch(sql)
            .map_err(|e| format!("migration {name}: {e}"))?;
    }
    Ok(())
}

/// Checks the old unkeyed chain of `events` from end to end; `Err` names the first break.
fn verify_legacy(conn: &Connection) -> Result<Option<(i64, String)>, String> {
    let err = |e: rusqlite::Error| format!("reading the old store: {e}");
    let anchor: Option<Anchor> = conn
        .query_row(
            "SELECT explain FROM events WHERE event = 'anchor' ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(err)?
        .and_then(|t| serde_json::from_str(&t).ok());
    let head: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'head'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(err)?;
    let mut st = conn
        .prepare(&format!(
            "SELECT {} FROM events ORDER BY seq",
            COLUMNS.join(", ")
        ))
        .map_err(err)?;
    let mut rows = st.query([]).map_err(err)?;
    let mut prev: Option<(i64, String)> = None;
    while let Some(r) = rows.next().map_err(err)? {
        let row = StoredRow::from_sqlite(r, 0).map_err(err)?;
        let want_prev = match &prev {
            None if row.seq == 1 => hex(&GENESIS),
            None => match &anchor {
                Some(a) if a.pruned_through_seq + 1 == row.seq => a.pruned_through_hash.clone(),
                _ => return Err(format!("rows before seq {} are missing", row.seq)),
            },
            Some((pseq, _)) if row.seq != pseq + 1 => {
                return Err(format!("rows {}..{} are missing", pseq + 1, row.seq - 1));
            }
            Some((_, h)) => h.clone(),
        };
        if row.prev_hash != want_prev {
            return Err(format!("seq {}: prev_hash does not link", row.seq));
        }
        if legacy_row_hash(&row.prev_hash, row.seq, &row.content()) != row.hash {
            return Err(format!("seq {}: the row was edited", row.seq));
        }
        prev = Some((row.seq, row.hash));
    }
    match (&prev, head) {
        (Some((s, h)), Some(v)) if v == format!("{s}:{h}") => {}
        (None, None) => {}
        (None, Some(v)) if v.starts_with("0:") => {}
        (_, v) => {
            return Err(format!(
                "the chain's end does not match the recorded head {}",
                v.unwrap_or_else(|| "(none)".into())
            ));
        }
    }
    Ok(prev)
}

/// A v1/v2 store rebuilt as v3 inside `tx`: its chain verified (a broken one is refused:
/// re-keying would launder the break), every row copied in seq order with its logical content
/// and hashed with the key, the old head kept in `meta` as `v2_head`, the old table dropped.
fn upgrade_v2(tx: &Connection, key: &ChainKey) -> Result<(), String> {
    let old_head = verify_legacy(tx).map_err(|e| {
        format!(
            "the schema-v2 audit chain is broken ({e}); refusing to upgrade it, since re-keying would hide the break. Keep the file as evidence (`toolgate audit verify` with the old version shows the break) and move it aside to start a new store"
        )
    })?;
    let err = |e: rusqlite::Error| format!("rebuilding the store as v3: {e}");
    tx.execute_batch(SQLITE[2].1).map_err(err)?;
    after_v3(tx, V3)?;
    let first_prev: Option<[u8; 32]> = {
        let first: Option<i64> = tx
            .query_row("SELECT min(seq) FROM events", [], |r| r.get(0))
            .map_err(err)?;
        match first {
            None | Some(1) => Some(GENESIS),
            Some(f) => tx
                .query_row(
                    "SELECT explain FROM events WHERE event = 'anchor' ORDER BY seq DESC LIMIT 1",
                    [],
                    |r| r.get::<_, String>(0),
                )
                .optional()
                .map_err(err)?
                .and_then(|t| serde_json::from_str::<Anchor>(&t).ok())
                .filter(|a| a.pruned_through_seq + 1 == f)
                .and_then(|a| unhex32(&a.pruned_through_hash)),
        }
    };
    let mut prev = first_prev.unwrap_or(GENESIS);
    let mut lookups = Lookups::default();
    let mut last: Option<(i64, [u8; 32])> = None;
    {
        let mut st = tx
            .prepare(&format!(
                "SELECT {} FROM events ORDER BY seq",
                COLUMNS.join(", ")
            ))
            .map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let mut row = StoredRow::from_sqlite(r, 0).map_err(err)?;
            store::to_logical(&mut row);
            let hash = link(key, &prev, row.seq, &content_digest(&row.content()));
            store::insert(tx, &mut lookups, row.seq, &row, &hash).map_err(err)?;
            prev = hash;
            last = Some((row.seq, hash));
        }
    }
    if let Some((seq, hash)) = last {
        chain::set_head(tx, key, seq, &hash).map_err(err)?;
    }
    if let Some((s, h)) = old_head {
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('v2_head', ?1)",
            params![format!("{s}:{h}")],
        )
        .map_err(err)?;
    }
    tx.execute_batch("DROP TABLE events;").map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_an_empty_database_and_is_idempotent() {
        let k = ChainKey::from_bytes(&[1; 32]);
        let mut c = Connection::open_in_memory().unwrap();
        assert_eq!(sqlite(&mut c, &k).unwrap(), SQLITE.len());
        assert_eq!(sqlite(&mut c, &k).unwrap(), SQLITE.len());
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, SQLITE.len());
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name IN ('decisions', 'outcomes', 'anchors', 'names', 'explains')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 5);
    }

    #[test]
    fn refuses_newer_and_foreign_databases() {
        let k = ChainKey::from_bytes(&[1; 32]);
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        assert!(sqlite(&mut c, &k).unwrap_err().contains("newer"));
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch("PRAGMA application_id = 7").unwrap();
        assert!(sqlite(&mut c, &k).unwrap_err().contains("not a toolgate"));
    }

    #[test]
    fn updates_and_unpermitted_deletes_abort() {
        let mut c = Connection::open_in_memory().unwrap();
        sqlite(&mut c, &ChainKey::from_bytes(&[1; 32])).unwrap();
        c.execute(
            "INSERT INTO decisions (seq, id, time, gateway, kind, principal, login, node, node_id, tags, ip, server, method, tool, action, effect, policy, rule, reason, outcome, policy_hash, hash) VALUES (1, x'00', 0, 1, 7, 1, 1, 1, 1, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, x'00')",
            [],
        )
        .unwrap();
        assert!(c.execute("UPDATE decisions SET principal = 2", []).is_err());
        assert!(c.execute("DELETE FROM decisions", []).is_err());
        assert!(
            c.execute("UPDATE names SET text = 'x' WHERE id = 2", [])
                .is_err()
        );
        assert!(c.execute("DELETE FROM names WHERE id = 2", []).is_err());
        c.execute_batch("BEGIN; INSERT INTO prune_permit VALUES (1); DELETE FROM decisions; DELETE FROM prune_permit; COMMIT;")
            .unwrap();
    }
}
