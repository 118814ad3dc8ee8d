//! One audit event: the decision row of DESIGN.md §5 ([`Record`], what callers build), its stored
//! form ([`StoredRow`], what the chain hashes), and the query form ([`Row`], what readers get).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An explain trace in the forms a row may store, rendered once per distinct trace (the
/// gateway caches it, see `crate::gateway::AuditRow::set_decision`) instead of once per row:
/// canonical JSON as evaluated (kept in `full` mode) and scrubbed of secret-looking values
/// (every other mode), each with its SHA-256 (the `explains` dedup key). Built by
/// `RenderedExplain::new` in `redact`, which owns the scrubbing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedExplain {
    pub(super) raw: Box<str>,
    pub(super) raw_digest: [u8; 32],
    /// `None`: scrubbing changed nothing (the raw text is stored).
    pub(super) scrubbed: Option<(Box<str>, [u8; 32])>,
}

impl RenderedExplain {
    /// The stored text and its SHA-256: as evaluated when `audit.arguments` is `full`,
    /// scrubbed otherwise (what `Redactor::scrub_record` makes of the trace's value).
    pub fn stored(&self, mode: crate::config::ArgumentsMode) -> (&str, [u8; 32]) {
        match &self.scrubbed {
            Some((t, d)) if mode != crate::config::ArgumentsMode::Full => (t, *d),
            _ => (&self.raw, self.raw_digest),
        }
    }

    /// Whether replacing `needles` could change the trace: one occurs in its text, or one
    /// would be escaped in JSON (then only the value can tell).
    pub fn may_contain(&self, needles: &[String]) -> bool {
        needles.iter().any(|n| {
            n.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) || self.raw.contains(n.as_str())
        })
    }

    /// The trace as a value again (for the per-row path).
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.raw).unwrap_or(Value::Null)
    }
}

/// What produced a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An MCP message through the gateway.
    #[default]
    Mcp,
    /// The Cerbos-compatible check API.
    Check,
    /// The LLM-gateway hook endpoint.
    Hook,
    /// An identity failure (no forward).
    Identity,
    /// A decision the shadow policy set (`policies.shadow`) decides differently; `decision_id`
    /// names the decision (schema v5).
    Shadow,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mcp => "mcp",
            Kind::Check => "check",
            Kind::Hook => "hook",
            Kind::Identity => "identity",
            Kind::Shadow => "shadow",
        }
    }
}

/// The decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    #[default]
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        }
    }
}

/// Conventional `outcome` values (free text otherwise, e.g. `upstream_error:timeout`).
pub mod outcome {
    /// An allowed call whose result is not known yet (an outcome row follows).
    pub const PENDING: &str = "pending";
    pub const FORWARDED: &str = "forwarded";
    pub const DENIED: &str = "denied";
    pub const UPSTREAM_ERROR: &str = "upstream_error";
    /// An allowed call whose caller hung up after it was sent upstream and before the answer
    /// reached them: the upstream may have acted on it.
    pub const CLIENT_DISCONNECTED: &str = "client_disconnected";
    /// An allowed call whose caller hung up before it was sent upstream: nothing was forwarded.
    pub const NOT_FORWARDED: &str = "not_forwarded";
    /// Check-API and hook decisions: answered to the caller.
    pub const ANSWERED: &str = "answered";
    /// Written at start for allowed calls still `pending` when the gateway stopped (crash or
    /// shutdown mid-call): whether the upstream ran them is not known.
    pub const UNKNOWN: &str = "unknown";
}

/// One decision as the gateway builds it. [`Record::new`] fills `id` and `time`; the gateway fills
/// the rest, and [`crate::audit::Redactor::apply_arguments`] sets `args_digest` and `arguments`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Sortable unique id (UUIDv7); the MCP `Toolgate-Decision-Id`.
    pub id: String,
    /// RFC 3339 UTC, fixed width (`2026-01-02T03:04:05.123456Z`).
    pub time: String,
    pub kind: Kind,
    pub principal: String,
    pub login: String,
    pub node: String,
    pub node_id: String,
    pub tags: Vec<String>,
    pub ip: String,
    pub server: String,
    pub method: String,
    pub tool: String,
    pub action: String,
    pub effect: Effect,
    pub policy: String,
    pub rule: String,
    pub reason: String,
    pub args_digest: String,
    pub outcome: String,
    pub latency_us: Option<u64>,
    pub policy_hash: String,
    /// The policy trace (scrubbed of secrets before storing).
    pub explain: Value,
    /// The arguments as `audit.arguments` allows (null for `none` and `digest`).
    pub arguments: Value,
    /// What `policy replay` needs to evaluate the decision again (schema v4); `None` for rows
    /// that were not one policy decision (identity refusals, check-API batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<ReplayInputs>,
    /// A shadow row's decision (the id of the decision it shadows); empty on every other row.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub decision_id: String,
    /// The explain trace rendered once for every row that carries it (used when `explain` is
    /// null); see [`RenderedExplain`].
    #[serde(skip)]
    pub explain_rendered: Option<std::sync::Arc<RenderedExplain>>,
}

/// The decision input beside the action and the arguments: the principal and the resource as
/// policy saw them, each as canonical JSON (`inputs` table, deduplicated by SHA-256). Not part
/// of the chained logical row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayInputs {
    /// `{"attr":{..},"id":..,"policyVersion":..,"roles":[..],"scope":..}`.
    pub principal: String,
    /// `{"attr":{..},"id":..,"kind":..,"policyVersion":..,"scope":..}`; its `arguments` and
    /// `uri` attributes are null placeholders (those are stored only as `audit.arguments`
    /// allows: `arguments`, `args_digest`, `tool`, `action`).
    pub resource: String,
}

impl Record {
    /// A new decision with a fresh id and the current time.
    pub fn new(kind: Kind, effect: Effect) -> Record {
        Record::with_id(new_id(), kind, effect)
    }

    /// [`Record::new`] for a decision whose id is known already (one UUID per call).
    pub fn with_id(id: String, kind: Kind, effect: Effect) -> Record {
        Record {
            id,
            time: now_text(),
            kind,
            effect,
            explain: Value::Null,
            arguments: Value::Null,
            inputs: None,
            ..Record::default()
        }
    }
}

/// A fresh decision id: a UUIDv7 (time-ordered, monotonic within this process).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The fixed-width RFC 3339 form every stored time uses (so text order is time order).
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::{Datelike, Timelike};
    // By hand, digit by digit: `format!`'s machinery cost ~2,400 instructions per time, and an
    // audited call formats four.
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    // Years outside 0..=9999 are not RFC 3339 times; they keep the old (wider) form.
    let year = t.year();
    if !(0..=9999).contains(&year) {
        let mut s = String::with_capacity(32);
        let _ = write!(
            s,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            year,
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            (t.nanosecond() % 1_000_000_000) / 1000
        );
        return s;
    }
    put(0, 4, year as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    // A leap second shows as nanosecond >= 1e9: keep the field six digits wide.
    put(20, 6, (t.nanosecond() % 1_000_000_000) / 1000);
    String::from_utf8_lossy(&b).into_owned()
}

pub fn now_text() -> String {
    format_time(chrono::Utc::now())
}

/// Parses any RFC 3339 time and returns the fixed-width UTC form.
pub fn normalize_time(s: &str) -> Option<String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| format_time(t.with_timezone(&chrono::Utc)))
}

/// Canonical JSON: object keys sorted (by UTF-8 bytes), no whitespace. Digests and the chain use it.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(&mut out, v);
    out
}

/// [`canonical_json`], appended to `out`.
pub(crate) fn write_canonical(out: &mut String, v: &Value) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, k);
                out.push(':');
                if let Some(x) = m.get(k) {
                    write_canonical(out, x);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, x);
            }
            out.push(']');
        }
        Value::String(s) => write_str(out, s),
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
    }
}

/// Whether `s` has a byte JSON escapes (`"`, `\\`, or a control byte below 0x20), eight
/// bytes at a time: the "has a byte less than n" and "has a zero byte" word tests of Sean
/// Eron Anderson's Bit Twiddling Hacks (public domain), exact as a yes/no answer.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        let w = u64::from_ne_bytes(word);
        let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
        if control | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\'))) != 0 {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b == b'"' || b == b'\\' || b < 0x20)
}

/// A JSON string literal (serde_json's escaping, which is deterministic).
pub(crate) fn write_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    if !needs_escape(s.as_bytes()) {
        // The common case: nothing to escape, one copy.
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The three kinds of chained rows.
pub mod event {
    pub const DECISION: &str = "decision";
    pub const OUTCOME: &str = "outcome";
    pub const ANCHOR: &str = "anchor";
}

/// A row exactly as stored (JSON columns as canonical text), in the chain's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredRow {
    pub seq: i64,
    pub event: String,
    pub id: String,
    pub decision_id: String,
    pub gateway: String,
    pub time: String,
    pub kind: String,
    pub principal: String,
    pub login: String,
    pub node: String,
    pub node_id: String,
    pub tags: String,
    pub ip: String,
    pub server: String,
    pub method: String,
    pub tool: String,
    pub action: String,
    pub effect: String,
    pub policy: String,
    pub rule: String,
    pub reason: String,
    pub args_digest: String,
    pub outcome: String,
    pub latency_us: Option<i64>,
    pub policy_hash: String,
    pub explain: String,
    pub arguments: String,
    pub hash: String,
    pub prev_hash: String,
    /// Replay inputs (schema v4; decisions only). Not hashed by the chain.
    pub inputs: Option<ReplayInputs>,
    /// SHA-256 of `explain` when the submitter knows it already (a rendered trace).
    pub explain_digest: Option<[u8; 32]>,
}

/// The stored columns in `StoredRow` field order (SELECT lists and INSERTs use it).
pub const COLUMNS: [&str; 29] = [
    "seq",
    "event",
    "id",
    "decision_id",
    "gateway",
    "time",
    "kind",
    "principal",
    "login",
    "node",
    "node_id",
    "tags",
    "ip",
    "server",
    "method",
    "tool",
    "action",
    "effect",
    "policy",
    "rule",
    "reason",
    "args_digest",
    "outcome",
    "latency_us",
    "policy_hash",
    "explain",
    "arguments",
    "hash",
    "prev_hash",
];

fn clamp_i64(v: Option<u64>) -> Option<i64> {
    v.map(|x| i64::try_from(x).unwrap_or(i64::MAX))
}

impl StoredRow {
    /// The stored form of a decision (seq, hash and prev_hash are the writer's).
    pub fn decision(r: &Record, gateway: &str) -> StoredRow {
        StoredRow::from_record(r.clone(), gateway)
    }

    /// [`StoredRow::decision`], taking the record apart instead of copying it.
    pub fn from_record(r: Record, gateway: &str) -> StoredRow {
        let mut tags = String::with_capacity(2 + r.tags.iter().map(|t| t.len() + 3).sum::<usize>());
        tags.push('[');
        for (i, t) in r.tags.iter().enumerate() {
            if i > 0 {
                tags.push(',');
            }
            write_str(&mut tags, t);
        }
        tags.push(']');
        StoredRow {
            seq: 0,
            event: event::DECISION.to_string(),
            decision_id: r.decision_id,
            gateway: gateway.to_string(),
            kind: r.kind.as_str().to_string(),
            tags,
            effect: r.effect.as_str().to_string(),
            latency_us: clamp_i64(r.latency_us),
            explain: canonical_json(&r.explain),
            arguments: canonical_json(&r.arguments),
            id: r.id,
            time: r.time,
            principal: r.principal,
            login: r.login,
            node: r.node,
            node_id: r.node_id,
            ip: r.ip,
            server: r.server,
            method: r.method,
            tool: r.tool,
            action: r.action,
            policy: r.policy,
            rule: r.rule,
            reason: r.reason,
            args_digest: r.args_digest,
            outcome: r.outcome,
            policy_hash: r.policy_hash,
            hash: String::new(),
            prev_hash: String::new(),
            inputs: r.inputs,
            explain_digest: None,
        }
    }

    /// An outcome row completing decision `decision_id`.
    pub fn outcome(
        decision_id: &str,
        outcome: &str,
        latency_us: Option<u64>,
        detail: &str,
        gateway: &str,
    ) -> StoredRow {
        StoredRow {
            event: event::OUTCOME.to_string(),
            id: String::new(),
            decision_id: decision_id.to_string(),
            gateway: gateway.to_string(),
            time: now_text(),
            outcome: outcome.to_string(),
            latency_us: clamp_i64(latency_us),
            reason: detail.to_string(),
            tags: "[]".to_string(),
            explain: "null".to_string(),
            arguments: "null".to_string(),
            ..StoredRow::default()
        }
    }

    /// The canonical content the chain hashes: every column except seq, hash and prev_hash, as
    /// one JSON object with sorted keys; JSON columns are embedded as their stored text.
    pub fn content(&self) -> String {
        let mut o = String::with_capacity(512 + self.explain.len() + self.arguments.len());
        let text = |o: &mut String, k: &str, v: &str, first: bool| {
            if !first {
                o.push(',');
            }
            write_str(o, k);
            o.push(':');
            write_str(o, v);
        };
        let raw = |o: &mut String, k: &str, v: &str| {
            o.push(',');
            write_str(o, k);
            o.push(':');
            o.push_str(if v.is_empty() { "null" } else { v });
        };
        o.push('{');
        text(&mut o, "action", &self.action, true);
        text(&mut o, "args_digest", &self.args_digest, false);
        raw(&mut o, "arguments", &self.arguments);
        text(&mut o, "decision_id", &self.decision_id, false);
        text(&mut o, "effect", &self.effect, false);
        text(&mut o, "event", &self.event, false);
        raw(&mut o, "explain", &self.explain);
        text(&mut o, "gateway", &self.gateway, false);
        text(&mut o, "id", &self.id, false);
        text(&mut o, "ip", &self.ip, false);
        text(&mut o, "kind", &self.kind, false);
        match self.latency_us {
            Some(l) => {
                let _ = write!(o, ",\"latency_us\":{l}");
            }
            None => o.push_str(",\"latency_us\":null"),
        }
        text(&mut o, "login", &self.login, false);
        text(&mut o, "method", &self.method, false);
        text(&mut o, "node", &self.node, false);
        text(&mut o, "node_id", &self.node_id, false);
        text(&mut o, "outcome", &self.outcome, false);
        text(&mut o, "policy", &self.policy, false);
        text(&mut o, "policy_hash", &self.policy_hash, false);
        text(&mut o, "principal", &self.principal, false);
        text(&mut o, "reason", &self.reason, false);
        text(&mut o, "rule", &self.rule, false);
        text(&mut o, "server", &self.server, false);
        raw(&mut o, "tags", &self.tags);
        text(&mut o, "time", &self.time, false);
        text(&mut o, "tool", &self.tool, false);
        o.push('}');
        o
    }

    /// Reads a row selected with [`COLUMNS`] (in that order, from index `at`).
    pub(crate) fn from_sqlite(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<StoredRow> {
        Ok(StoredRow {
            seq: r.get(at)?,
            event: r.get(at + 1)?,
            id: r.get(at + 2)?,
            decision_id: r.get(at + 3)?,
            gateway: r.get(at + 4)?,
            time: r.get(at + 5)?,
            kind: r.get(at + 6)?,
            principal: r.get(at + 7)?,
            login: r.get(at + 8)?,
            node: r.get(at + 9)?,
            node_id: r.get(at + 10)?,
            tags: r.get(at + 11)?,
            ip: r.get(at + 12)?,
            server: r.get(at + 13)?,
            method: r.get(at + 14)?,
            tool: r.get(at + 15)?,
            action: r.get(at + 16)?,
            effect: r.get(at + 17)?,
            policy: r.get(at + 18)?,
            rule: r.get(at + 19)?,
            reason: r.get(at + 20)?,
            args_digest: r.get(at + 21)?,
            outcome: r.get(at + 22)?,
            latency_us: r.get(at + 23)?,
            policy_hash: r.get(at + 24)?,
            explain: r.get(at + 25)?,
            arguments: r.get(at + 26)?,
            hash: r.get(at + 27)?,
            prev_hash: r.get(at + 28)?,
            inputs: None,
            explain_digest: None,
        })
    }
}

/// A decision as readers see it (`audit query`, `GET /api/audit`): the contract keys of DESIGN.md
/// §5 first, in that order, with the latest outcome row merged into `outcome` and `latency_us`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub time: String,
    pub kind: String,
    pub principal: String,
    pub login: String,
    pub node: String,
    pub node_id: String,
    pub tags: Vec<String>,
    pub ip: String,
    pub server: String,
    pub method: String,
    pub tool: String,
    pub action: String,
    pub effect: String,
    pub policy: String,
    pub rule: String,
    pub reason: String,
    pub args_digest: String,
    pub outcome: String,
    pub latency_us: Option<i64>,
    pub policy_hash: String,
    pub hash: String,
    pub prev_hash: String,
    /// Chain position on the gateway that wrote it.
    pub seq: i64,
    pub gateway: String,
    pub explain: Value,
    pub arguments: Value,
    /// A shadow row's decision: the id of the decision it shadows (absent on other rows).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub decision_id: String,
}

/// The contract keys, in order (csv header and table columns draw from these).
pub const CONTRACT_KEYS: [&str; 23] = [
    "id",
    "time",
    "kind",
    "principal",
    "login",
    "node",
    "node_id",
    "tags",
    "ip",
    "server",
    "method",
    "tool",
    "action",
    "effect",
    "policy",
    "rule",
    "reason",
    "args_digest",
    "outcome",
    "latency_us",
    "policy_hash",
    "hash",
    "prev_hash",
];

impl Row {
    /// A decision row, with the merged outcome (`None`: no outcome row yet).
    pub fn from_stored(s: StoredRow, merged: Option<(String, Option<i64>)>) -> Row {
        let (outcome, latency_us) = match merged {
            Some((o, l)) => (o, l.or(s.latency_us)),
            None => (s.outcome, s.latency_us),
        };
        Row {
            tags: serde_json::from_str(&s.tags).unwrap_or_default(),
            explain: serde_json::from_str(&s.explain).unwrap_or(Value::Null),
            arguments: serde_json::from_str(&s.arguments).unwrap_or(Value::Null),
            id: s.id,
            time: s.time,
            kind: s.kind,
            principal: s.principal,
            login: s.login,
            node: s.node,
            node_id: s.node_id,
            ip: s.ip,
            server: s.server,
            method: s.method,
            tool: s.tool,
            action: s.action,
            effect: s.effect,
            policy: s.policy,
            rule: s.rule,
            reason: s.reason,
            args_digest: s.args_digest,
            outcome,
            latency_us,
            policy_hash: s.policy_hash,
            hash: s.hash,
            prev_hash: s.prev_hash,
            seq: s.seq,
            gateway: s.gateway,
            decision_id: s.decision_id,
        }
    }

    /// The value of a contract key as display text (csv and table).
    pub fn text(&self, key: &str) -> String {
        match key {
            "id" => self.id.clone(),
            "time" => self.time.clone(),
            "kind" => self.kind.clone(),
            "principal" => self.principal.clone(),
            "login" => self.login.clone(),
            "node" => self.node.clone(),
            "node_id" => self.node_id.clone(),
            "tags" => self.tags.join(" "),
            "ip" => self.ip.clone(),
            "server" => self.server.clone(),
            "method" => self.method.clone(),
            "tool" => self.tool.clone(),
            "action" => self.action.clone(),
            "effect" => self.effect.clone(),
            "policy" => self.policy.clone(),
            "rule" => self.rule.clone(),
            "reason" => self.reason.clone(),
            "args_digest" => self.args_digest.clone(),
            "outcome" => self.outcome.clone(),
            "latency_us" => self.latency_us.map(|l| l.to_string()).unwrap_or_default(),
            "policy_hash" => self.policy_hash.clone(),
            "hash" => self.hash.clone(),
            "prev_hash" => self.prev_hash.clone(),
            "seq" => self.seq.to_string(),
            "gateway" => self.gateway.clone(),
            "decision_id" => self.decision_id.clone(),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_and_compacts() {
        let v: Value =
            serde_json::from_str(r#"{"b": [1, {"z": 1, "a": "x\n"}], "a": null}"#).unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":null,"b":[1,{"a":"x\n","z":1}]}"#
        );
    }

    #[test]
    fn format_time_matches_chronos_pattern() {
        for s in [
            "2026-01-02T03:04:05.123456789Z",
            "1999-12-31T23:59:59Z",
            "2026-11-30T00:00:00.000001Z",
            "0042-07-04T12:30:00.5Z",
        ] {
            let t = chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc);
            assert_eq!(
                format_time(t),
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                "{s}"
            );
        }
    }

    #[test]
    fn times_are_fixed_width_and_normalized() {
        let t = now_text();
        assert_eq!(t.len(), 27, "{t}");
        assert_eq!(
            normalize_time("2026-01-02T04:04:05+01:00").as_deref(),
            Some("2026-01-02T03:04:05.000000Z")
        );
        assert!(normalize_time("yesterday").is_none());
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = new_id();
        let b = new_id();
        assert!(a < b, "{a} {b}");
    }

    #[test]
    fn strings_escape_like_serde_json() {
        for s in [
            "plain",
            "q\"uote",
            "back\\slash",
            "nl\n cr\r tab\t",
            "\u{1}\u{1f}\u{7f}",
            "é ü 😀",
            "\u{8}\u{c}",
            "",
        ] {
            let mut o = String::new();
            write_str(&mut o, s);
            assert_eq!(o, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    /// The word-at-a-time test agrees with the byte test for every byte value at every
    /// position of a word and of the tail, and `write_str` with serde_json around it.
    #[test]
    fn escapes_are_found_at_every_position() {
        let slow = |s: &[u8]| s.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20);
        for len in [1usize, 7, 8, 9, 16, 17, 23] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut v = vec![b'a'; len];
                    v[at] = b;
                    assert_eq!(needs_escape(&v), slow(&v), "{b:#x} at {at} of {len}");
                    if let Ok(s) = std::str::from_utf8(&v) {
                        let mut o = String::new();
                        write_str(&mut o, s);
                        assert_eq!(o, serde_json::to_string(s).unwrap(), "{s:?}");
                    }
                }
            }
        }
        // Neighbours of the escaped bytes, multi-byte characters, and words whose bytes
        // borrow from each other in the subtraction.
        for s in [
            "\u{1f}\u{20}!#[]\u{7f}",
            "é€😀\u{80}ÿ",
            "\u{100}\u{1fff}\u{fffd}\u{10ffff}",
            "\u{0}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}\u{1}",
            "!!!!!!!!\u{21}\u{21}",
        ] {
            assert_eq!(needs_escape(s.as_bytes()), slow(s.as_bytes()), "{s:?}");
            let mut o = String::new();
            write_str(&mut o, s);
            assert_eq!(o, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn content_is_valid_sorted_json() {
        let mut r = Record::new(Kind::Mcp, Effect::Allow);
        r.tags = vec!["tag:ci".into()];
        r.explain = serde_json::json!({"b": 1, "a": [true]});
        r.latency_us = Some(12);
        let s = StoredRow::decision(&r, "gw1");
        let c = s.content();
        let v: Value = serde_json::from_str(&c).unwrap();
        assert_eq!(v["tags"][0], "tag:ci");
        assert_eq!(v["latency_us"], 12);
        // Re-canonicalizing the parsed content gives the same bytes: keys are sorted.
        assert_eq!(canonical_json(&v), c);
    }
}
