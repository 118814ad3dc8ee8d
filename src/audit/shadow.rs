//! Shadow rows (schema v5, `policies.shadow`): how a row of kind `shadow` carries the live
//! decision it differs from ([`explain`]), and the difference readers list ([`ShadowDiff`],
//! `audit query --shadow-diff`, `/api/audit?shadow=diff`).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::record::Row;

/// One side of a difference: what a policy set decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub effect: String,
    pub policy: String,
    pub rule: String,
}

/// The explain trace of a shadow row: the live decision beside the shadow set's own trace.
pub fn explain(live: &Side, trace: Value) -> Value {
    json!({
        "live": {"effect": live.effect, "policy": live.policy, "rule": live.rule},
        "trace": trace,
    })
}

/// A decision the shadow set decides differently, as `--shadow-diff` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowDiff {
    /// The live decision's id.
    pub decision_id: String,
    /// When it was decided under the shadow set.
    pub time: String,
    pub principal: String,
    pub server: String,
    pub tool: String,
    pub action: String,
    pub live: Side,
    pub shadow: Side,
    /// The shadow row's own id, and the shadow snapshot that decided.
    pub shadow_id: String,
    pub shadow_policy_hash: String,
}

impl ShadowDiff {
    /// The difference a shadow row records; `None` for any other row.
    pub fn from_row(r: &Row) -> Option<ShadowDiff> {
        if r.kind != super::Kind::Shadow.as_str() {
            return None;
        }
        let live = r.explain.get("live");
        let text = |k: &str| {
            live.and_then(|l| l.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        Some(ShadowDiff {
            decision_id: r.decision_id.clone(),
            time: r.time.clone(),
            principal: r.principal.clone(),
            server: r.server.clone(),
            tool: r.tool.clone(),
            action: r.action.clone(),
            live: Side {
                effect: text("effect"),
                policy: text("policy"),
                rule: text("rule"),
            },
            shadow: Side {
                effect: r.effect.clone(),
                policy: r.policy.clone(),
                rule: r.rule.clone(),
            },
            shadow_id: r.id.clone(),
            shadow_policy_hash: r.policy_hash.clone(),
        })
    }

    /// The csv header of [`ShadowDiff::cells`].
    pub const KEYS: [&'static str; 12] = [
        "decision_id",
        "time",
        "principal",
        "server",
        "tool",
        "action",
        "live_effect",
        "live_policy",
        "live_rule",
        "shadow_effect",
        "shadow_policy",
        "shadow_rule",
    ];

    /// The values of [`ShadowDiff::KEYS`], in order.
    pub fn cells(&self) -> [&str; 12] {
        [
            &self.decision_id,
            &self.time,
            &self.principal,
            &self.server,
            &self.tool,
            &self.action,
            &self.live.effect,
            &self.live.policy,
            &self.live.rule,
            &self.shadow.effect,
            &self.shadow.policy,
            &self.shadow.rule,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shadow_row_reads_back_as_its_difference() {
        let live = Side {
            effect: "allow".into(),
            policy: "resource.mcp_server.vdefault".into(),
            rule: "read".into(),
        };
        let row = Row {
            id: "s1".into(),
            kind: "shadow".into(),
            decision_id: "d1".into(),
            effect: "deny".into(),
            policy: "resource.mcp_server.vdefault".into(),
            explain: explain(&live, Value::Null),
            ..Row::default()
        };
        let d = ShadowDiff::from_row(&row).unwrap();
        assert_eq!(d.live, live);
        assert_eq!(d.shadow.effect, "deny");
        assert_eq!(d.decision_id, "d1");
        assert!(
            ShadowDiff::from_row(&Row {
                kind: "mcp".into(),
                ..row
            })
            .is_none()
        );
    }
}
