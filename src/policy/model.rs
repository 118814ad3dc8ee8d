//! The policy language as written on disk: serde types for Cerbos policy files
//! (`api.cerbos.dev/v1`), read from YAML or JSON with unknown keys rejected.
//!
//! Field names are protojson camelCase; snake_case spellings are accepted as aliases, as
//! Cerbos accepts them. Nothing here is validated beyond shape: `compile` checks meaning.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// One policy file: the envelope plus exactly one policy body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyFile {
    #[serde(alias = "api_version")]
    pub api_version: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// Deprecated top-level variables, merged into `variables.local`.
    #[serde(default)]
    pub variables: Option<BTreeMap<String, String>>,
    #[serde(default, alias = "resource_policy")]
    pub resource_policy: Option<ResourcePolicy>,
    #[serde(default, alias = "principal_policy")]
    pub principal_policy: Option<PrincipalPolicy>,
    #[serde(default, alias = "derived_roles")]
    pub derived_roles: Option<DerivedRoles>,
    #[serde(default, alias = "export_variables")]
    pub export_variables: Option<ExportVariables>,
    #[serde(default, alias = "export_constants")]
    pub export_constants: Option<ExportConstants>,
    #[serde(default, alias = "role_policy")]
    pub role_policy: Option<RolePolicy>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default, alias = "source_file")]
    pub source_file: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub hash: Option<Value>,
    #[serde(default, alias = "store_identifier")]
    pub store_identifier: Option<String>,
    #[serde(default, alias = "source_attributes")]
    pub source_attributes: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Effect {
    #[default]
    #[serde(rename = "EFFECT_ALLOW")]
    Allow,
    #[serde(rename = "EFFECT_DENY")]
    Deny,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ScopePermissions {
    #[default]
    #[serde(rename = "SCOPE_PERMISSIONS_UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "SCOPE_PERMISSIONS_OVERRIDE_PARENT")]
    OverrideParent,
    #[serde(rename = "SCOPE_PERMISSIONS_REQUIRE_PARENTAL_CONSENT_FOR_ALLOWS")]
    RequireParentalConsentForAllows,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Variables {
    #[serde(default)]
    pub import: Vec<String>,
    #[serde(default)]
    pub local: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Constants {
    #[serde(default)]
    pub import: Vec<String>,
    #[serde(default)]
    pub local: BTreeMap<String, Value>,
}

/// `condition: {match: ...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    #[serde(rename = "match")]
    pub match_: Match,
}

/// One node of a `match` tree: exactly one of `expr`, `all`, `any`, `none`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub expr: Option<String>,
    #[serde(default)]
    pub all: Option<MatchList>,
    #[serde(default)]
    pub any: Option<MatchList>,
    #[serde(default)]
    pub none: Option<MatchList>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchList {
    #[serde(default)]
    pub of: Vec<Match>,
}

/// `output: {when: {ruleActivated, conditionNotMet}}` (the deprecated `expr` form is accepted).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    #[serde(default)]
    pub expr: Option<String>,
    #[serde(default)]
    pub when: Option<OutputWhen>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutputWhen {
    #[serde(default, alias = "rule_activated")]
    pub rule_activated: Option<String>,
    #[serde(default, alias = "condition_not_met")]
    pub condition_not_met: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourcePolicy {
    pub resource: String,
    pub version: String,
    #[serde(default)]
    pub scope: String,
    #[serde(default, alias = "scope_permissions")]
    pub scope_permissions: ScopePermissions,
    #[serde(default, alias = "import_derived_roles")]
    pub import_derived_roles: Vec<String>,
    #[serde(default)]
    pub variables: Option<Variables>,
    #[serde(default)]
    pub constants: Option<Constants>,
    #[serde(default)]
    pub schemas: Option<Schemas>,
    #[serde(default)]
    pub rules: Vec<ResourceRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourceRule {
    pub actions: Vec<String>,
    pub effect: Effect,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default, alias = "derived_roles")]
    pub derived_roles: Vec<String>,
    #[serde(default)]
    pub condition: Option<Condition>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub output: Option<Output>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Schemas {
    #[serde(default, alias = "principal_schema")]
    pub principal_schema: Option<SchemaRef>,
    #[serde(default, alias = "resource_schema")]
    pub resource_schema: Option<SchemaRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SchemaRef {
    #[serde(rename = "ref")]
    pub ref_: String,
    #[serde(default, alias = "ignore_when")]
    pub ignore_when: Option<IgnoreWhen>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IgnoreWhen {
    #[serde(default)]
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PrincipalPolicy {
    pub principal: String,
    pub version: String,
    #[serde(default)]
    pub scope: String,
    #[serde(default, alias = "scope_permissions")]
    pub scope_permissions: ScopePermissions,
    #[serde(default)]
    pub variables: Option<Variables>,
    #[serde(default)]
    pub constants: Option<Constants>,
    #[serde(default)]
    pub rules: Vec<PrincipalRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalRule {
    pub resource: String,
    pub actions: Vec<PrincipalAction>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalAction {
    pub action: String,
    pub effect: Effect,
    #[serde(default)]
    pub condition: Option<Condition>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub output: Option<Output>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedRoles {
    pub name: String,
    pub definitions: Vec<DerivedRoleDef>,
    #[serde(default)]
    pub variables: Option<Variables>,
    #[serde(default)]
    pub constants: Option<Constants>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DerivedRoleDef {
    pub name: String,
    #[serde(alias = "parent_roles")]
    pub parent_roles: Vec<String>,
    #[serde(default)]
    pub condition: Option<Condition>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportVariables {
    pub name: String,
    #[serde(default)]
    pub definitions: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConstants {
    pub name: String,
    #[serde(default)]
    pub definitions: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolePolicy {
    pub role: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub scope: String,
    #[serde(default, alias = "scope_permissions")]
    pub scope_permissions: ScopePermissions,
    #[serde(default, alias = "parent_roles")]
    pub parent_roles: Vec<String>,
    #[serde(default)]
    pub variables: Option<Variables>,
    #[serde(default)]
    pub constants: Option<Constants>,
    #[serde(default)]
    pub rules: Vec<RoleRule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoleRule {
    pub resource: String,
    #[serde(alias = "allow_actions")]
    pub allow_actions: Vec<String>,
    #[serde(default)]
    pub condition: Option<Condition>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub output: Option<Output>,
}
