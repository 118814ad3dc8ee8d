//! Tamper evidence: every row stores `hash = SHA-256(prev_hash "\n" seq "\n" content)` and the
//! previous row's hash. [`verify`] walks the chain in seq order and reports the first break.
//!
//! Pruning (retention) deletes from the oldest end and writes an anchor row naming the last pruned
//! seq and hash, so the oldest remaining row still links to something. Tail truncation is caught
//! against the chain head recorded in `meta` (and the head logged periodically, and the Postgres
//! copy); a full rewrite by someone holding the file is not: this is evidence, not prevention.

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::record::{COLUMNS, StoredRow, event};

/// The `prev_hash` of the very first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// SHA-256 of `data` as lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The hash of a row at `seq` whose content is `content`, following `prev_hash`.
pub fn row_hash(prev_hash: &str, seq: i64, content: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    let mut buf = [0u8; 20];
    h.update(decimal(seq, &mut buf));
    h.update(b"\n");
    h.update(content.as_bytes());
    hex(&h.finalize())
}

/// `n` in decimal, without allocating.
fn decimal(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let neg = n < 0;
    let mut v = n.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg && i > 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// What an anchor row records (as its `explain` JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Anchor {
    /// Every row with seq ≤ this was pruned.
    pub pruned_through_seq: i64,
    /// The hash of the row at `pruned_through_seq`: the oldest remaining row's `prev_hash`.
    pub pruned_through_hash: String,
    pub pruned_rows: i64,
}

/// The result of a walk over the whole chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub rows: u64,
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

/// The latest anchor row, if any.
fn latest_anchor(conn: &Connection) -> rusqlite::Result<Option<Anchor>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT explain FROM events WHERE event = 'anchor' ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}

/// The chain head the writer last committed (from `meta`).
pub fn recorded_head(conn: &Connection) -> rusqlite::Result<Option<(i64, String)>> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'head'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.and_then(|v| {
        let (s, h) = v.split_once(':')?;
        Some((s.parse().ok()?, h.to_string()))
    }))
}

/// Walks every row in seq order. Reading errors are errors; chain problems are in the report.
pub fn verify(conn: &Connection) -> rusqlite::Result<Report> {
    verify_rows(conn, latest_anchor(conn)?, recorded_head(conn)?)
}

fn verify_rows(
    conn: &Connection,
    anchor: Option<Anchor>,
    head: Option<(i64, String)>,
) -> rusqlite::Result<Report> {
    let sql = format!("SELECT {} FROM events ORDER BY seq", COLUMNS.join(", "));
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    let mut report = Report {
        rows: 0,
        first_seq: None,
        last_seq: None,
        anchor: None,
        broken: None,
    };
    let mut prev: Option<(i64, String)> = None;
    while let Some(r) = rows.next()? {
        let row = StoredRow::from_sqlite(r, 0)?;
        report.rows += 1;
        report.last_seq = Some(row.seq);
        let brk = |problem: String| Break {
            seq: row.seq,
            id: row.id.clone(),
            problem,
        };
        match &prev {
            None => {
                report.first_seq = Some(row.seq);
                let expected = match &anchor {
                    _ if row.seq == 1 => Some((GENESIS.to_string(), "the genesis hash")),
                    Some(a) if a.pruned_through_seq + 1 == row.seq => {
                        report.anchor = Some(a.clone());
                        Some((a.pruned_through_hash.clone(), "the retention anchor's hash"))
                    }
                    _ => None,
                };
                match expected {
                    None => {
                        report.broken = Some(brk(format!(
                            "rows before seq {} are missing and no retention anchor accounts for them",
                            row.seq
                        )));
                        break;
                    }
                    Some((h, what)) if h != row.prev_hash => {
                        report.broken = Some(brk(format!(
                            "prev_hash {} does not match {what} {h}",
                            row.prev_hash
                        )));
                        break;
                    }
                    Some(_) => {}
                }
            }
            Some((pseq, phash)) => {
                if row.seq != pseq + 1 {
                    report.broken = Some(brk(format!(
                        "rows {}..{} are missing (deleted)",
                        pseq + 1,
                        row.seq - 1
                    )));
                    break;
                }
                if &row.prev_hash != phash {
                    report.broken = Some(brk(format!(
                        "prev_hash {} does not match the previous row's hash {phash} (a row was deleted, inserted or edited)",
                        row.prev_hash
                    )));
                    break;
                }
            }
        }
        let want = row_hash(&row.prev_hash, row.seq, &row.content());
        if want != row.hash {
            report.broken = Some(brk(format!(
                "hash {} does not match the row's content (expected {want}): the row was edited",
                row.hash
            )));
            break;
        }
        if row.event == event::ANCHOR && serde_json::from_str::<Anchor>(&row.explain).is_err() {
            report.broken = Some(brk("an anchor row without a readable anchor".to_string()));
            break;
        }
        prev = Some((row.seq, row.hash.clone()));
    }
    if report.broken.is_none()
        && let Some((hseq, hhash)) = head
    {
        match &prev {
            Some((pseq, phash)) if *pseq == hseq && *phash == hhash => {}
            Some((pseq, _)) if *pseq > hseq => {
                // Rows past the recorded head: the head is written in the same transaction as
                // the rows, so this only happens when rows were appended by something else.
                report.broken = Some(Break {
                    seq: hseq + 1,
                    id: String::new(),
                    problem: format!(
                        "rows after the recorded chain head (seq {hseq}) were not written by toolgate"
                    ),
                });
            }
            last => {
                report.broken = Some(Break {
                    seq: last.as_ref().map(|(s, _)| *s).unwrap_or(0),
                    id: String::new(),
                    problem: format!(
                        "the chain ends before the recorded head (seq {hseq}, hash {hhash}): rows were removed from the end"
                    ),
                });
            }
        }
    }
    Ok(report)
}

/// The last committed row (seq, hash), or (0, genesis) for an empty chain.
pub fn tail(conn: &Connection) -> rusqlite::Result<(i64, String)> {
    let last: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(last.unwrap_or((0, GENESIS.to_string())))
}

/// Records the chain head in `meta` (inside the writer's transaction).
pub(crate) fn set_head(conn: &Connection, seq: i64, hash: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES ('head', ?1)")?
        .execute(params![format!("{seq}:{hash}")])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let a = row_hash(GENESIS, 1, "{}");
        assert_eq!(a.len(), 64);
        assert_ne!(a, row_hash(GENESIS, 2, "{}"));
        assert_ne!(a, row_hash(&a, 1, "{}"));
        let mut b = [0u8; 20];
        for n in [0i64, 7, 10, 123_456_789, i64::MAX, -5] {
            assert_eq!(decimal(n, &mut b), n.to_string().as_bytes());
        }
    }
}
