//! Retention (`audit.retention`): rows older than the window are deleted from the oldest end, in
//! bounded transactions run by the writer between batches (so writers wait at most one chunk).
//! Each chunk records an anchor row — the last pruned seq and hash — so `audit verify` still
//! checks the chain from the oldest remaining row. With a Postgres sink, rows not yet shipped are
//! never pruned. Freed pages go back to the file system with `incremental_vacuum`.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::chain::{Anchor, content_digest, hex, link};
use super::key::ChainKey;
use super::record::{StoredRow, event, now_text};
use super::store::{self, Lookups};

/// Rows deleted per transaction at most.
pub const CHUNK_ROWS: i64 = 5000;
/// Pages given back per chunk at most.
const VACUUM_PAGES: i64 = 2000;

pub(crate) fn meta_text(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
        r.get(0)
    })
    .optional()
}

pub(crate) fn meta_i64(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    Ok(meta_text(conn, key)?.and_then(|v| v.parse().ok()))
}

pub(crate) fn set_meta(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
        .execute(params![key, value])?;
    Ok(())
}

/// Gives up to `VACUUM_PAGES` free pages back to the file system (the pragma frees one page per
/// result row, so every row must be stepped).
fn incremental_vacuum(conn: &Connection) -> rusqlite::Result<()> {
    let mut st = conn.prepare(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))?;
    let mut rows = st.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// What one chunk did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub pruned: u64,
    /// More rows are due.
    pub more: bool,
    /// The anchor row's (seq, hash) when one was written.
    pub new_head: Option<(i64, [u8; 32])>,
}

/// Deletes up to `chunk` of the oldest rows whose time (µs) is before `cutoff` (and, with a
/// shipper, at most through `shipped`), then appends an anchor row after `head`.
#[allow(
    clippy::too_many_arguments,
    reason = "the writer's state, passed explicitly"
)]
pub(crate) fn prune_chunk(
    conn: &mut Connection,
    key: &ChainKey,
    lookups: &mut Lookups,
    cutoff: i64,
    shipped: Option<i64>,
    chunk: i64,
    head: (i64, [u8; 32]),
    gateway: &str,
) -> rusqlite::Result<Step> {
    let none = Step {
        pruned: 0,
        more: false,
        new_head: None,
    };
    // The longest run of old rows at the oldest end, at most `chunk` long.
    let mut through: Option<(i64, [u8; 32])> = None;
    let mut hit_limit = false;
    let chunk_rows = usize::try_from(chunk).unwrap_or(usize::MAX);
    for (count, (seq, time, hash)) in store::seq_time_hash_after(conn, 0, chunk + 1)?
        .into_iter()
        .enumerate()
    {
        if time >= cutoff || shipped.is_some_and(|s| seq > s) || seq >= head.0 {
            break;
        }
        if count == chunk_rows {
            hit_limit = true;
            break;
        }
        through = Some((seq, hash));
    }
    let Some((last_seq, last_hash)) = through else {
        return Ok(none);
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("INSERT OR IGNORE INTO prune_permit (one) VALUES (1)", [])?;
    let mut pruned = 0usize;
    for t in ["decisions", "outcomes", "anchors"] {
        pruned += tx.execute(
            &format!("DELETE FROM {t} WHERE seq <= ?1"),
            params![last_seq],
        )?;
    }
    tx.execute("DELETE FROM prune_permit", [])?;
    let anchor = Anchor {
        pruned_through_seq: last_seq,
        pruned_through_hash: hex(&last_hash),
        pruned_rows: i64::try_from(pruned).unwrap_or(i64::MAX),
    };
    let mut row = StoredRow {
        event: event::ANCHOR.to_string(),
        gateway: gateway.to_string(),
        time: now_text(),
        reason: format!(
            "retention pruned {pruned} rows through seq {last_seq} (older than {})",
            store::us_to_time(cutoff)
        ),
        explain: store::anchor_explain(&anchor),
        ..StoredRow::default()
    };
    store::to_logical(&mut row);
    let seq = head.0 + 1;
    let hash = link(key, &head.1, seq, &content_digest(&row.content()));
    let r = store::insert(&tx, lookups, seq, &row, &hash)
        .and_then(|()| super::chain::set_head(&tx, key, seq, &hash))
        .and_then(|()| tx.commit());
    match r {
        Ok(()) => lookups.commit(),
        Err(e) => {
            lookups.rollback();
            return Err(e);
        }
    }
    if let Err(e) = incremental_vacuum(conn) {
        tracing::debug!(error = %e, "audit: incremental vacuum");
    }
    tracing::info!(target: "toolgate::audit", pruned, through = last_seq, "audit retention");
    Ok(Step {
        pruned: pruned as u64,
        more: hit_limit,
        new_head: Some((seq, hash)),
    })
}
