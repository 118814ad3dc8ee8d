//! What a check is asked about: the principal, the resource, the actions, and the request-wide
//! parameters (time, globals, evaluation mode). Shapes follow Cerbos's protojson
//! (`cerbos.engine.v1.Principal`/`Resource`), so the check API can deserialize straight into them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `cerbos.engine.v1.Principal`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Principal {
    pub id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attr: Map<String, Value>,
    #[serde(
        default,
        alias = "policy_version",
        skip_serializing_if = "String::is_empty"
    )]
    pub policy_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
}

/// `cerbos.engine.v1.Resource`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resource {
    pub kind: String,
    #[serde(default)]
    pub id: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attr: Map<String, Value>,
    #[serde(
        default,
        alias = "policy_version",
        skip_serializing_if = "String::is_empty"
    )]
    pub policy_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
}

/// How CEL runtime errors are treated (DESIGN.md §2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Evaluation {
    /// Cerbos's `strictEvaluation`: an evaluation error that reaches an action (a rule's
    /// condition, a derived role a rule uses, `runtime.effectiveDerivedRoles` after a derived
    /// role failed, a role policy's condition) denies that action outright; no other role's
    /// ALLOW can win. A CEL error never allows.
    #[default]
    Strict,
    /// Cerbos's default: an erroring condition is "not satisfied", whatever the rule's effect.
    Lenient,
}

/// Cerbos `schema.enforcement`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaEnforcement {
    #[default]
    None,
    Warn,
    Reject,
}

/// Engine parameters fixed for one request (Cerbos `engine.*` config, test-suite `options`).
#[derive(Debug, Clone)]
pub struct Params {
    /// The single `now()` of this request.
    pub now: chrono::DateTime<chrono::Utc>,
    /// CEL `globals` / `G`.
    pub globals: std::sync::Arc<Map<String, Value>>,
    pub evaluation: Evaluation,
    pub schema_enforcement: SchemaEnforcement,
    /// Used when a principal or resource has no `policyVersion` (Cerbos default: `default`).
    pub default_policy_version: String,
    /// Used when a request has an empty scope.
    pub default_scope: String,
    /// Cerbos `lenientScopeSearch`: skip missing leaf scopes instead of answering NO_MATCH.
    pub lenient_scope_search: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            now: chrono::Utc::now(),
            globals: Default::default(),
            evaluation: Evaluation::Strict,
            schema_enforcement: SchemaEnforcement::None,
            default_policy_version: "default".to_string(),
            default_scope: String::new(),
            lenient_scope_search: false,
        }
    }
}

/// One check: a principal, one resource and the actions asked about.
#[derive(Debug, Clone, Default)]
pub struct CheckInput {
    pub principal: Principal,
    pub resource: Resource,
    pub actions: Vec<String>,
    /// Decoded auxiliary data as CEL sees it under `request.auxData` (`{"jwt": {claims}}` or
    /// `{"jwts": {name: {"claims": {..}}}}`), or null. Absent `jwt`/`jwts` read as empty maps.
    pub aux_data: Value,
}
