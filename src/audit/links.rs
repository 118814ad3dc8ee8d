//! The chain's shared vocabulary, below both the store and the chain walk: the genesis
//! `prev`, hex in and out, what a pruning anchor records, and the stored forms of times (µs) and
//! UUIDs (16 bytes). ([`super::chain`] verifies, the
//! store ([`super::store`]) reads and writes; both speak these.)

/// The `prev` of the very first row.
pub const GENESIS: [u8; 32] = [0; 32];

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

/// 64 hex digits → 32 bytes.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (b[2 * i] as char).to_digit(16)?;
        let lo = (b[2 * i + 1] as char).to_digit(16)?;
        *o = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
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

/// A stored time (fixed-width RFC 3339) as microseconds since 1970.
pub fn time_to_us(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc).timestamp_micros())
}

/// The 16 bytes of `id` when it is a canonical (lower-case, hyphenated) UUID.
pub fn uuid_bytes(id: &str) -> Option<[u8; 16]> {
    if id.len() != 36 {
        return None;
    }
    let u = uuid::Uuid::try_parse(id).ok()?;
    let mut canon = [0u8; 36];
    (u.hyphenated().encode_lower(&mut canon).as_bytes() == id.as_bytes()).then(|| *u.as_bytes())
}
