//! The queued form of a chained row ([`CompactRow`]): every text field of a logical
//! [`StoredRow`] in one buffer (one heap allocation per queued row), plus what the writer would
//! otherwise parse per row (time in microseconds, the id and argument digest as bytes, the
//! explain trace's dedup digest), all computed on the submitting thread. The writer thread only
//! resolves lookups, links the chain and inserts.

use sha2::{Digest, Sha256};

use super::links::{hex, time_to_us, unhex32, uuid_bytes};
use super::record::{StoredRow, event};

/// Which of the three chained tables a row goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Decision,
    Outcome,
    Anchor,
}

/// The text fields, in buffer order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Id,
    DecisionId,
    Gateway,
    Time,
    Kind,
    Principal,
    Login,
    Node,
    NodeId,
    Tags,
    Ip,
    Server,
    Method,
    Tool,
    Action,
    Effect,
    Policy,
    Rule,
    Reason,
    ArgsDigest,
    Outcome,
    PolicyHash,
    Explain,
    Arguments,
    /// Replay inputs (schema v4; not hashed by the chain): empty when absent.
    InputPrincipal,
    InputResource,
}

/// The number of [`Field`]s.
pub(crate) const FIELDS: usize = 26;

/// A logical row, ready for [`super::store::insert_compact`].
#[derive(Debug, Clone)]
pub struct CompactRow {
    pub event: Event,
    /// The fields' text, back to back.
    buf: Box<str>,
    /// Where each field ends in `buf` (field i is `ends[i-1]..ends[i]`).
    ends: [u32; FIELDS],
    pub latency_us: Option<i64>,
    /// `time` as microseconds since 1970.
    pub time_us: i64,
    /// The decision's id (or an outcome's decision id) as UUID bytes, when it is a canonical UUID.
    pub key_bytes: Option<[u8; 16]>,
    /// `args_digest` as bytes, when it is a lower-case SHA-256 hex digest.
    pub args_bytes: Option<[u8; 32]>,
    /// SHA-256 of the explain text (the `explains` dedup key); `None` for a null trace.
    pub explain_digest: Option<[u8; 32]>,
    /// Whether the row carries replay inputs ([`Field::InputPrincipal`], [`Field::InputResource`]).
    pub has_inputs: bool,
}

impl CompactRow {
    /// Packs a logical row (see [`super::store::to_logical`]). `None` when its event is unknown,
    /// its time unreadable, or it is larger than 4 GiB.
    pub fn new(r: &StoredRow) -> Option<CompactRow> {
        let ev = match r.event.as_str() {
            event::DECISION => Event::Decision,
            event::OUTCOME => Event::Outcome,
            event::ANCHOR => Event::Anchor,
            _ => return None,
        };
        let parts: [&str; FIELDS] = [
            &r.id,
            &r.decision_id,
            &r.gateway,
            &r.time,
            &r.kind,
            &r.principal,
            &r.login,
            &r.node,
            &r.node_id,
            &r.tags,
            &r.ip,
            &r.server,
            &r.method,
            &r.tool,
            &r.action,
            &r.effect,
            &r.policy,
            &r.rule,
            &r.reason,
            &r.args_digest,
            &r.outcome,
            &r.policy_hash,
            &r.explain,
            &r.arguments,
            r.inputs.as_ref().map_or("", |i| i.principal.as_str()),
            r.inputs.as_ref().map_or("", |i| i.resource.as_str()),
        ];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        u32::try_from(total).ok()?;
        let mut buf = String::with_capacity(total);
        let mut ends = [0u32; FIELDS];
        for (end, p) in ends.iter_mut().zip(parts) {
            buf.push_str(p);
            *end = u32::try_from(buf.len()).ok()?;
        }
        let key = if ev == Event::Outcome {
            &r.decision_id
        } else {
            &r.id
        };
        let explain_digest = match r.explain.as_str() {
            "" | "null" => None,
            t if ev == Event::Decision => r
                .explain_digest
                .or_else(|| Some(Sha256::digest(t.as_bytes()).into())),
            _ => None,
        };
        Some(CompactRow {
            event: ev,
            time_us: time_to_us(&r.time)?,
            key_bytes: uuid_bytes(key),
            args_bytes: unhex32(&r.args_digest).filter(|b| hex(b) == r.args_digest),
            explain_digest,
            latency_us: r.latency_us,
            has_inputs: r.inputs.is_some() && ev == Event::Decision,
            buf: buf.into_boxed_str(),
            ends,
        })
    }

    /// One field's text.
    pub fn get(&self, f: Field) -> &str {
        let i = f as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.buf.get(start..self.ends[i] as usize).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_through_one_buffer() {
        let id = uuid::Uuid::now_v7().to_string();
        let row = StoredRow {
            event: event::DECISION.into(),
            id: id.clone(),
            time: "2026-01-02T03:04:05.123456Z".into(),
            principal: "alice@example.com".into(),
            tool: "create_issue".into(),
            explain: "{\"a\":1}".into(),
            arguments: "null".into(),
            args_digest: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            ..StoredRow::default()
        };
        let c = CompactRow::new(&row).unwrap();
        assert_eq!(c.get(Field::Id), id);
        assert_eq!(c.get(Field::DecisionId), "");
        assert_eq!(c.get(Field::Principal), "alice@example.com");
        assert_eq!(c.get(Field::Tool), "create_issue");
        assert_eq!(c.get(Field::Arguments), "null");
        assert_eq!(c.get(Field::Explain), "{\"a\":1}");
        assert_eq!(
            c.key_bytes,
            Some(*uuid::Uuid::parse_str(&id).unwrap().as_bytes())
        );
        assert!(c.args_bytes.is_some());
        assert!(c.explain_digest.is_some());
        assert_eq!(c.time_us, 1_767_323_045_123_456);
        let bad = StoredRow {
            event: "other".into(),
            ..row
        };
        assert!(CompactRow::new(&bad).is_none());
    }
}
