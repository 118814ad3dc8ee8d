//! Tamper evidence: every row stores
//! `hash = HMAC-SHA-256(key, prev ‖ seq (8 bytes, big-endian) ‖ SHA-256(canonical logical row))`
//! with the per-install key ([`super::key`]); the logical row is [`StoredRow::content`] with every
//! lookup resolved, so editing a row, or a lookup value it uses, breaks its hash. [`verify`] walks
//! the chain in seq order and reports the first break.
//!
//! Pruning (retention) deletes from the oldest end and writes an anchor row naming the last pruned
//! seq and hash, so the oldest remaining row still links to something. Tail truncation is caught
//! against the chain head recorded in `meta` (itself MACed with the key), `--expect-head`, and the
//! Postgres copy. Without the key, `verify` still checks linkage (no gaps in seq, genesis or an
//! anchor at the start, the recorded head at the end) but not content. Someone holding both the
//! database and the key can rewrite everything: this is evidence, not prevention.

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::key::ChainKey;
pub use super::links::{Anchor, GENESIS, hex, unhex32};
use super::record::{StoredRow, event};
use super::store::{self, Names};

/// SHA-256 of `data` as lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The inner digest of a logical row: SHA-256 of its canonical content (computed on the
/// request thread).
pub fn content_digest(content: &str) -> [u8; 32] {
    Sha256::digest(content.as_bytes()).into()
}

/// The chain hash of the row at `seq` whose content digest is `digest`, following `prev`.
pub fn link(key: &ChainKey, prev: &[u8; 32], seq: i64, digest: &[u8; 32]) -> [u8; 32] {
    key.mac(&[prev, &seq.to_be_bytes(), digest])
}

/// The schema-v1/v2 (unkeyed) row hash: `SHA-256(prev_hash "\n" seq "\n" content)` in hex.
/// Only the upgrade and the Postgres copies of old rows still check it.
pub fn legacy_row_hash(prev_hash: &str, seq: i64, content: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(content.as_bytes());
    hex(&h.finalize())
}

/// The result of a walk over the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub rows: u64,
    /// Whether content was checked (the key was given); without it only linkage was.
    pub keyed: bool,
    /// The last row's hash (hex), for `--expect-head` next time.
    pub head: Option<String>,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// The anchor the oldest row was checked against, when rows were pruned.
    pub anchor: Option<Anchor>,
    /// The first break found; `None` means the chain is intact.
    pub broken: Option<Break>,
}

/// Where and how the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub seq: i64,
    pub id: String,
    pub problem: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {} (id {}): {}", self.seq, self.id, self.problem)
    }
}

/// The chain head as recorded in `meta`: `seq:hash:mac`, the MAC binding both to the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: String,
    pub mac: String,
}

fn head_mac(key: &ChainKey, seq: i64, hash: &[u8; 32]) -> [u8; 32] {
    key.mac(&[b"toolgate audit head\n", &seq.to_be_bytes(), hash])
}

/// The chain head the writer last committed (from `meta`).
pub fn recorded_head(conn: &Connection) -> rusqlite::Result<Option<Head>> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'head'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.and_then(|v| {
        let mut it = v.splitn(3, ':');
        let seq = it.next()?.parse().ok()?;
        let hash = it.next()?.to_string();
        let mac = it.next().unwrap_or("").to_string();
        Some(Head { seq, hash, mac })
    }))
}

/// Records the chain head in `meta` (inside the writer's transaction).
pub(crate) fn set_head(
    conn: &Connection,
    key: &ChainKey,
    seq: i64,
    hash: &[u8; 32],
) -> rusqlite::Result<()> {
    // `seq:hash:mac`, written into one buffer (no `format!`, no intermediate hex strings).
    let mut value = String::with_capacity(20 + 2 + 128);
    {
        use std::fmt::Write as _;
        let _ = write!(value, "{seq}:");
    }
    push_hex(&mut value, hash);
    value.push(':');
    push_hex(&mut value, &head_mac(key, seq, hash));
    // An UPDATE in place dirties the one `meta` table page; `INSERT OR REPLACE` (a delete and
    // an insert under a new rowid) also dirtied the key's index page, one more WAL page on
    // every commit.
    let updated = conn
        .prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'head'")?
        .execute(params![value])?;
    if updated == 0 {
        conn.prepare_cached("INSERT INTO meta (key, value) VALUES ('head', ?1)")?
            .execute(params![value])?;
    }
    Ok(())
}

/// Appends `bytes` as lower-case hex (what [`hex`] returns).
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// Rows read per step of a walk.
const WALK_ROWS: usize = 4096;

/// Walks every row in seq order. Reading errors are errors; chain problems are in the report.
/// `key`: check content too (without it, linkage only). `expect_head`: the head hash (or
/// `seq:hash`) seen earlier, e.g. from the log or the Postgres copy.
pub fn verify(
    conn: &Connection,
    key: Option<&ChainKey>,
    expect_head: Option<&str>,
) -> rusqlite::Result<Report> {
    // One read transaction: the recorded head and the rows come from the same snapshot. Read
    // apart, a commit landing between them (the writer commits outcome rows on its own timer)
    // shows rows past the head, which is a false "not written by toolgate".
    let tx = conn.unchecked_transaction()?;
    let report = verify_snapshot(&tx, key, expect_head);
    drop(tx);
    report
}

fn verify_snapshot(
    conn: &Connection,
    key: Option<&ChainKey>,
    expect_head: Option<&str>,
) -> rusqlite::Result<Report> {
    let head = recorded_head(conn)?;
    let mut names = Names::default();
    let mut report = Report {
        rows: 0,
        keyed: key.is_some(),
        head: None,
        first_seq: None,
        last_seq: None,
        anchor: None,
        broken: None,
    };
    let mut prev: Option<(i64, [u8; 32])> = None;
    let mut after = 0i64;
    'walk: loop {
        let rows = match store::read_after(conn, &mut names, after, WALK_ROWS) {
            Ok(r) => r,
            Err(e @ rusqlite::Error::FromSqlConversionFailure(..)) => {
                report.broken = Some(Break {
                    seq: after + 1,
                    id: String::new(),
                    problem: format!("a row after seq {after} cannot be read: {e}"),
                });
                break;
            }
            Err(e) => return Err(e),
        };
        let Some(last) = rows.last() else { break };
        after = last.seq;
        for row in rows {
            report.rows += 1;
            report.last_seq = Some(row.seq);
            let brk = |problem: String| Break {
                seq: row.seq,
                id: row.id.clone(),
                problem,
            };
            let expected_prev = match &prev {
                None => {
                    report.first_seq = Some(row.seq);
                    if row.seq == 1 {
                        GENESIS
                    } else {
                        match anchor_for(conn, row.seq - 1)? {
                            Some(a) => {
                                let h = unhex32(&a.pruned_through_hash).unwrap_or(GENESIS);
                                report.anchor = Some(a);
                                h
                            }
                            None => {
                                report.broken = Some(brk(format!(
                                    "rows before seq {} are missing and no retention anchor accounts for them",
                                    row.seq
                                )));
                                break 'walk;
                            }
                        }
                    }
                }
                Some((pseq, phash)) => {
                    if row.seq != pseq + 1 {
                        report.broken = Some(brk(format!(
                            "rows {}..{} are missing (deleted)",
                            pseq + 1,
                            row.seq - 1
                        )));
                        break 'walk;
                    }
                    *phash
                }
            };
            let hash = unhex32(&row.hash).unwrap_or(GENESIS);
            if let Some(k) = key {
                let want = link(k, &expected_prev, row.seq, &content_digest(&row.content()));
                if want != hash {
                    report.broken = Some(brk(
                        "the row's hash does not match its content and the previous row's hash: the row, a lookup value it uses, or the row before it was edited, or a row was inserted or deleted (or the key is not this store's)".to_string(),
                    ));
                    break 'walk;
                }
            }
            if row.event == event::ANCHOR && serde_json::from_str::<Anchor>(&row.explain).is_err() {
                report.broken = Some(brk("an anchor row without a readable anchor".to_string()));
                break 'walk;
            }
            prev = Some((row.seq, hash));
        }
    }
    report.head = prev.map(|(_, h)| hex(&h));
    if report.broken.is_some() {
        return Ok(report);
    }
    let (last_seq, last_hash) = prev.unwrap_or((0, GENESIS));
    let at_end = |problem: String| Break {
        seq: last_seq,
        id: String::new(),
        problem,
    };
    match &head {
        None if prev.is_some() => {
            report.broken = Some(at_end(
                "the store has rows but no recorded chain head (meta 'head' was removed): rows may have been removed from the end".to_string(),
            ));
        }
        None => {}
        Some(h) => {
            if let Some(k) = key
                && (unhex32(&h.hash).map(|x| hex(&head_mac(k, h.seq, &x))) != Some(h.mac.clone()))
            {
                report.broken = Some(at_end(format!(
                    "the recorded chain head (seq {}) does not carry this key's MAC: it was rewritten",
                    h.seq
                )));
            } else if h.seq == last_seq && h.hash == hex(&last_hash) {
            } else if last_seq > h.seq {
                report.broken = Some(Break {
                    seq: h.seq + 1,
                    id: String::new(),
                    problem: format!(
                        "rows after the recorded chain head (seq {}) were not written by toolgate",
                        h.seq
                    ),
                });
            } else {
                report.broken = Some(at_end(format!(
                    "the chain ends before the recorded head (seq {}, hash {}): rows were removed from the end",
                    h.seq, h.hash
                )));
            }
        }
    }
    if report.broken.is_none()
        && let Some(want) = expect_head
    {
        let (wseq, whash) = match want.split_once(':') {
            Some((s, h)) => (s.parse::<i64>().ok(), h),
            None => (None, want),
        };
        let ok_hash = whash.eq_ignore_ascii_case(&hex(&last_hash));
        let ok_seq = wseq.is_none_or(|s| s == last_seq);
        if !(ok_hash && ok_seq) {
            // The expected head may be an older row that is still in the chain.
            let older = match wseq {
                Some(s) if s < last_seq => {
                    store::hash_at(conn, s)?.is_some_and(|h| whash.eq_ignore_ascii_case(&hex(&h)))
                }
                _ => false,
            };
            if !older {
                report.broken = Some(at_end(format!(
                    "the chain head is seq {last_seq} hash {}, not the expected {want}: rows were removed from the end or the chain was rewritten",
                    hex(&last_hash)
                )));
            }
        }
    }
    Ok(report)
}

/// The anchor that accounts for rows through `seq`, if any.
fn anchor_for(conn: &Connection, seq: i64) -> rusqlite::Result<Option<Anchor>> {
    conn.prepare_cached(
        "SELECT through_seq, through_hash, pruned_rows FROM anchors WHERE through_seq = ?1 ORDER BY seq DESC LIMIT 1",
    )?
    .query_row([seq], |r| {
        let h: Vec<u8> = r.get(1)?;
        Ok(Anchor {
            pruned_through_seq: r.get(0)?,
            pruned_through_hash: hex(&h),
            pruned_rows: r.get(2)?,
        })
    })
    .optional()
}

/// The last committed row (seq, hash), or (0, genesis) for an empty chain.
pub fn tail(conn: &Connection) -> rusqlite::Result<(i64, [u8; 32])> {
    store::tail(conn)
}

/// Checks a stored row against the chain (Postgres copies).
pub fn check_row(key: &ChainKey, prev: &[u8; 32], row: &StoredRow) -> bool {
    unhex32(&row.hash)
        .is_some_and(|h| h == link(key, prev, row.seq, &content_digest(&row.content())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_depend_on_every_input() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let k = ChainKey::from_bytes(&[7; 32]);
        let d = content_digest("{}");
        let a = link(&k, &GENESIS, 1, &d);
        assert_ne!(a, link(&k, &GENESIS, 2, &d));
        assert_ne!(a, link(&k, &a, 1, &d));
        assert_ne!(a, link(&k, &GENESIS, 1, &content_digest("{ }")));
        assert_ne!(a, link(&ChainKey::from_bytes(&[8; 32]), &GENESIS, 1, &d));
        assert_eq!(legacy_row_hash("0", 12, "{}").len(), 64);
    }
}
