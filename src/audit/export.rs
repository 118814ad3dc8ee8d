//! `toolgate audit export`: a window of the audit store written as a new audit SQLite file of
//! the same schema, for use away from the gateway (`policy replay --db` in a policy repository's
//! CI, issue 18 part 4).
//!
//! The slice is the contiguous run of chained rows from the window's first decision to its last
//! (to the end of the store without `--until`), so the chain has no gaps. The source chain is
//! checked with the key as it is read: a broken source is refused, never re-signed. Rows are
//! redacted per `audit.arguments` ([`Redactor::apply_stored`]), re-linked with the same key (a
//! row left as stored keeps its source hash), and an anchor row after the slice records the
//! source hash the first row follows, so `audit verify` passes on the file. Replay inputs are
//! copied. The file is written beside the target and renamed into place when complete.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, params};

use super::chain::{self, content_digest, link};
use super::key::ChainKey;
use super::links::{Anchor, GENESIS, hex, unhex32};
use super::record::{ReplayInputs, StoredRow, event, new_id, now_text};
use super::redact::Redactor;
use super::store::{self, Lookups, Names, time_to_us};

/// Chained rows read (and written) per step.
const STEP_ROWS: usize = 4096;

/// What to export.
#[derive(Debug, Clone)]
pub struct Options {
    pub db: PathBuf,
    pub out: PathBuf,
    /// The store's chain key: checks the source, links the export.
    pub key: ChainKey,
    pub redactor: Redactor,
    /// Stored-form bounds (fixed-width RFC 3339): decisions at or after `since`, before `until`.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Replace an existing `out`.
    pub force: bool,
    /// The gateway name on the anchor row.
    pub gateway: String,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Chained rows copied (decisions, outcomes, retention anchors), not counting the export's
    /// own anchor.
    pub rows: u64,
    pub decisions: u64,
    /// The source seq range copied.
    pub first_seq: i64,
    pub last_seq: i64,
    /// Rows this export redacted further than they were stored.
    pub redacted: u64,
    /// The first row whose hash differs from the source's (the first redacted one); `None`:
    /// every copied row keeps its source hash.
    pub rechained_from: Option<i64>,
    /// The export's chain head (`SEQ:HASH`, for `audit verify --expect-head`).
    pub head: String,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The source seq range of the window: from its first decision to its last (to the store's last
/// row without `until`), and the number of decisions in it. `None`: no decision in the window.
fn window(c: &Connection, o: &Options) -> Result<Option<(i64, i64)>, String> {
    let us = |t: &Option<String>| -> Result<Option<i64>, String> {
        t.as_deref()
            .map(|t| time_to_us(t).ok_or_else(|| format!("bad time bound {t:?}")))
            .transpose()
    };
    let since = us(&o.since)?.unwrap_or(i64::MIN);
    let until = us(&o.until)?.unwrap_or(i64::MAX);
    let first: Option<i64> = c
        .query_row(
            "SELECT min(seq) FROM decisions WHERE time >= ?1 AND time < ?2",
            params![since, until],
            |r| r.get(0),
        )
        .map_err(err)?;
    let Some(first) = first else { return Ok(None) };
    let last = if o.until.is_some() {
        c.query_row(
            "SELECT max(seq) FROM decisions WHERE time >= ?1 AND time < ?2",
            params![since, until],
            |r| r.get::<_, Option<i64>>(0),
        )
        .map_err(err)?
        .unwrap_or(first)
    } else {
        store::tail(c).map_err(err)?.0
    };
    Ok(Some((first, last.max(first))))
}

/// The number of chained rows the export will copy (for a progress bar); 0 when the window
/// holds no decision.
pub fn planned_rows(o: &Options) -> Result<u64, String> {
    let reader = super::query::Reader::open(&o.db).map_err(err)?;
    Ok(window(reader.connection(), o)?
        .map(|(a, b)| u64::try_from(b - a + 1).unwrap_or(0))
        .unwrap_or(0))
}

/// The replay inputs of the decisions with seq in `from..=to`.
fn inputs_between(
    c: &Connection,
    from: i64,
    to: i64,
) -> Result<std::collections::HashMap<i64, ReplayInputs>, String> {
    let mut st = c
        .prepare_cached(
            "SELECT d.seq, p.text, r.text FROM decisions d \
             JOIN inputs p ON p.id = d.principal_input JOIN inputs r ON r.id = d.resource_input \
             WHERE d.seq BETWEEN ?1 AND ?2",
        )
        .map_err(err)?;
    let rows = st
        .query_map(params![from, to], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                ReplayInputs {
                    principal: r.get(1)?,
                    resource: r.get(2)?,
                },
            ))
        })
        .map_err(err)?;
    rows.collect::<Result<_, _>>().map_err(err)
}

/// The partial file written before the rename: `OUT.partial` beside `OUT`.
fn partial_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Creates the export database at `path` (schema of this toolgate, private to this user).
fn create_out(path: &Path, key: &ChainKey) -> Result<Connection, String> {
    let _ = std::fs::remove_file(path);
    let mut c = Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    // Built in one go and renamed into place: no journal needed until then.
    c.execute_batch(
        "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;",
    )
    .map_err(err)?;
    super::migrate::sqlite(&mut c, key)?;
    Ok(c)
}

/// Writes the export; `progress` is told how many chained rows were copied, as they are.
pub fn export(o: &Options, progress: &dyn Fn(u64)) -> Result<Summary, String> {
    if o.out.exists() && !o.force {
        return Err(format!(
            "{} exists; pass --force to replace it",
            o.out.display()
        ));
    }
    let reader = super::query::Reader::open(&o.db).map_err(err)?;
    let src = reader.connection();
    // One read transaction: the whole slice comes from one snapshot while the gateway writes.
    let snapshot = src.unchecked_transaction().map_err(err)?;
    let Some((first, last)) = window(&snapshot, o)? else {
        return Err(format!(
            "no decisions in the window ({} .. {}): nothing to export",
            o.since.as_deref().unwrap_or("the beginning"),
            o.until.as_deref().unwrap_or("now")
        ));
    };
    let Some(src_prev) = store::prev_of(&snapshot, first).map_err(err)? else {
        return Err(format!(
            "rows before seq {first} are missing and no retention anchor accounts for them: run `toolgate audit verify`; nothing exported"
        ));
    };
    let tmp = partial_path(&o.out);
    let r = write(o, &snapshot, &tmp, (first, last, src_prev), progress);
    drop(snapshot);
    let summary = match r {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if o.force {
        for ext in ["-wal", "-shm", "-journal"] {
            let mut p = o.out.as_os_str().to_owned();
            p.push(ext);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
    std::fs::rename(&tmp, &o.out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}: {e}", tmp.display(), o.out.display())
    })?;
    Ok(summary)
}

fn write(
    o: &Options,
    src: &Connection,
    tmp: &Path,
    (first, last, src_prev): (i64, i64, [u8; 32]),
    progress: &dyn Fn(u64),
) -> Result<Summary, String> {
    let mut out = create_out(tmp, &o.key)?;
    let tx = out.transaction().map_err(err)?;
    let source_store = super::postgres::store_id(src).map_err(err)?;
    let mut lookups = Lookups::default();
    let mut names = Names::default();
    let mut summary = Summary {
        rows: 0,
        decisions: 0,
        first_seq: first,
        last_seq: last,
        redacted: 0,
        rechained_from: None,
        head: String::new(),
    };
    // The source chain (checked) and the export's (written) run side by side.
    let mut prev_src = src_prev;
    let mut prev_out = src_prev;
    let mut after = first - 1;
    while after < last {
        let rows = store::read_after(src, &mut names, after, STEP_ROWS).map_err(err)?;
        let rows: Vec<StoredRow> = rows.into_iter().take_while(|r| r.seq <= last).collect();
        let (Some(a), Some(b)) = (rows.first(), rows.last()) else {
            break;
        };
        let mut inputs = inputs_between(src, a.seq, b.seq)?;
        let n = rows.len() as u64;
        for mut row in rows {
            if row.seq != after + 1 {
                return Err(format!(
                    "the source chain has a gap before seq {} (rows {}..{} are missing): run `toolgate audit verify`; nothing exported",
                    row.seq,
                    after + 1,
                    row.seq - 1
                ));
            }
            after = row.seq;
            let src_hash = unhex32(&row.hash).unwrap_or(GENESIS);
            if link(&o.key, &prev_src, row.seq, &content_digest(&row.content())) != src_hash {
                return Err(format!(
                    "the source chain breaks at seq {} (id {}): the row or one before it was edited, or the key is not this store's; run `toolgate audit verify`; nothing exported",
                    row.seq, row.id
                ));
            }
            if row.event == event::DECISION {
                summary.decisions += 1;
                row.inputs = inputs.remove(&row.seq);
            }
            let changed = o.redactor.apply_stored(&mut row);
            // A row left as stored, following the same hash as in the source, keeps its hash.
            let hash = if !changed && prev_out == prev_src {
                src_hash
            } else {
                summary.redacted += u64::from(changed);
                summary.rechained_from.get_or_insert(row.seq);
                link(&o.key, &prev_out, row.seq, &content_digest(&row.content()))
            };
            prev_src = src_hash;
            store::insert(&tx, &mut lookups, row.seq, &row, &hash).map_err(err)?;
            prev_out = hash;
            summary.rows += 1;
        }
        progress(n);
    }
    if after != last {
        return Err(format!(
            "the source chain ends at seq {after}, before seq {last}: run `toolgate audit verify`; nothing exported"
        ));
    }
    let mut head = (last, prev_out);
    if first > 1 {
        let anchor = Anchor {
            pruned_through_seq: first - 1,
            pruned_through_hash: hex(&src_prev),
            pruned_rows: first - 1,
        };
        let window = format!(
            "{} .. {}",
            o.since.as_deref().unwrap_or("the beginning"),
            o.until.as_deref().unwrap_or("the end")
        );
        let mut row = StoredRow {
            event: event::ANCHOR.to_string(),
            gateway: o.gateway.clone(),
            time: now_text(),
            reason: format!(
                "export of seq {first}..{last} of store {source_store} ({window}): rows before seq {first} are not in this file"
            ),
            explain: store::anchor_explain(&anchor),
            ..StoredRow::default()
        };
        store::to_logical(&mut row);
        let seq = last + 1;
        let hash = link(&o.key, &prev_out, seq, &content_digest(&row.content()));
        store::insert(&tx, &mut lookups, seq, &row, &hash).map_err(err)?;
        head = (seq, hash);
    }
    chain::set_head(&tx, &o.key, head.0, &head.1).map_err(err)?;
    let export_note = serde_json::json!({
        "source_store": source_store,
        "first_seq": first,
        "last_seq": last,
        "since": o.since,
        "until": o.until,
        "arguments": format!("{:?}", o.redactor.mode()).to_lowercase(),
        "exported_at": now_text(),
    });
    for (k, v) in [
        ("key_id", o.key.id().to_string()),
        ("store_id", new_id()),
        ("export", export_note.to_string()),
    ] {
        super::retention::set_meta(&tx, k, &v).map_err(err)?;
    }
    tx.commit().map_err(err)?;
    lookups.commit();
    out.execute_batch("PRAGMA journal_mode = DELETE")
        .map_err(err)?;
    drop(out);
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    summary.head = format!("{}:{}", head.0, hex(&head.1));
    Ok(summary)
}
