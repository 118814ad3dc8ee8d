//! Schema migrations: plain SQL files under `migrations/`, embedded at build time, applied in
//! order at start, each in its own transaction. SQLite records the version in `PRAGMA
//! user_version`; Postgres in a `schema_migrations` table (under an advisory lock, so several
//! gateways starting together migrate once).

use rusqlite::Connection;

/// SQLite migrations, in order; version N is the N-th entry.
pub const SQLITE: &[(&str, &str)] = &[
    (
        "0001_events",
        include_str!("../../migrations/sqlite/0001_events.sql"),
    ),
    (
        "0002_outcome_index",
        include_str!("../../migrations/sqlite/0002_outcome_index.sql"),
    ),
];

/// Postgres migrations, in order.
pub const POSTGRES: &[(&str, &str)] = &[(
    "0001_events",
    include_str!("../../migrations/postgres/0001_events.sql"),
)];

/// `application_id` of toolgate audit databases ("TGAU").
pub const APPLICATION_ID: i64 = 0x5447_4155;

/// Brings a SQLite database to the latest version; returns the version it is at.
pub fn sqlite(conn: &mut Connection) -> Result<usize, String> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| format!("reading the schema version: {e}"))?;
    let app: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| format!("reading the application id: {e}"))?;
    if app != 0 && app != APPLICATION_ID {
        return Err(format!(
            "not a toolgate audit database (application_id {app:#x})"
        ));
    }
    let current = usize::try_from(current).map_err(|_| format!("bad schema version {current}"))?;
    if current > SQLITE.len() {
        return Err(format!(
            "the database is at schema version {current}, newer than this toolgate knows ({}); refusing to touch it",
            SQLITE.len()
        ));
    }
    for (i, (name, sql)) in SQLITE.iter().enumerate().skip(current) {
        let version = i + 1;
        let tx = conn
            .transaction()
            .map_err(|e| format!("migration {name}: {e}"))?;
        tx.execute_batch(sql)
            .map_err(|e| format!("migration {name}: {e}"))?;
        tx.execute_batch(&format!(
            "PRAGMA user_version = {version}; PRAGMA application_id = {APPLICATION_ID};"
        ))
        .map_err(|e| format!("migration {name}: {e}"))?;
        tx.commit().map_err(|e| format!("migration {name}: {e}"))?;
    }
    Ok(SQLITE.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_an_empty_database_and_is_idempotent() {
        let mut c = Connection::open_in_memory().unwrap();
        assert_eq!(sqlite(&mut c).unwrap(), SQLITE.len());
        assert_eq!(sqlite(&mut c).unwrap(), SQLITE.len());
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, SQLITE.len());
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'events'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn refuses_newer_and_foreign_databases() {
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        assert!(sqlite(&mut c).unwrap_err().contains("newer"));
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch("PRAGMA application_id = 7").unwrap();
        assert!(sqlite(&mut c).unwrap_err().contains("not a toolgate"));
    }

    #[test]
    fn updates_and_unpermitted_deletes_abort() {
        let mut c = Connection::open_in_memory().unwrap();
        sqlite(&mut c).unwrap();
        c.execute(
            "INSERT INTO events (seq, event, id, time, hash, prev_hash) VALUES (1, 'decision', 'a', 't', 'h', 'p')",
            [],
        )
        .unwrap();
        assert!(c.execute("UPDATE events SET principal = 'x'", []).is_err());
        assert!(c.execute("DELETE FROM events", []).is_err());
        c.execute_batch("BEGIN; INSERT INTO prune_permit VALUES (1); DELETE FROM events; DELETE FROM prune_permit; COMMIT;")
            .unwrap();
    }
}
