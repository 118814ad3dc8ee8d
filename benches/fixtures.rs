//! Generated policy sets for the benches: N resource policies (one per MCP server kind), each
//! importing derived roles and guarding tools with CEL conditions on the call's arguments.

use std::path::Path;

use serde_json::json;
use toolgate::policy::input::{CheckInput, Principal, Resource};

pub const DERIVED: &str = r#"apiVersion: api.cerbos.dev/v1
derivedRoles:
  name: bench_roles
  definitions:
    - name: person
      parentRoles: [user]
      condition:
        match:
          expr: P.attr.login != "" && size(P.attr.tags) == 0
    - name: ci_runner
      parentRoles: [tagged]
      condition:
        match:
          expr: '"tag:ci" in P.attr.tags'
"#;

pub fn resource_policy(i: usize) -> String {
    format!(
        r#"apiVersion: api.cerbos.dev/v1
resourcePolicy:
  resource: server_{i}
  version: default
  importDerivedRoles: [bench_roles]
  rules:
    - actions: [initialize, ping, "tools/list::*"]
      effect: EFFECT_ALLOW
      roles: [user, tagged]
    - actions: ["tools/call::get_*", "tools/call::search_*"]
      effect: EFFECT_ALLOW
      derivedRoles: [person, ci_runner]
    - name: write_own_org
      actions: ["tools/call::create_issue"]
      effect: EFFECT_ALLOW
      roles: [developer]
      condition:
        match:
          all:
            of:
              - expr: R.attr.arguments.owner == "example"
              - expr: R.attr.arguments.path.startsWith("/srv/work/")
    - actions: ["tools/call::delete_*"]
      effect: EFFECT_DENY
      roles: ["*"]
      condition:
        match:
          expr: '!("admin" in P.roles)'
"#
    )
}

/// Writes `n` resource policies plus the derived roles into `dir`.
pub fn write_set(dir: &Path, n: usize) {
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join("derived.yaml"), DERIVED);
    for i in 0..n {
        let _ = std::fs::write(dir.join(format!("server_{i:05}.yaml")), resource_policy(i));
    }
}

/// One allowed `tools/call` with a CEL condition on its arguments.
pub fn tool_call(n: usize) -> CheckInput {
    let attr = json!({"login": "alice@example.com", "tags": [], "node": "alice.example.ts.net"});
    let rattr = json!({
        "server": "github", "tool_name": "create_issue", "method": "tools/call",
        "arguments": {"owner": "example", "repo": "toolgate", "path": "/srv/work/a.md", "title": "t"}
    });
    CheckInput {
        principal: Principal {
            id: "alice@example.com".into(),
            roles: vec!["user".into(), "developer".into()],
            attr: attr.as_object().cloned().unwrap_or_default(),
            ..Default::default()
        },
        resource: Resource {
            kind: format!("server_{}", n / 2),
            id: "github".into(),
            attr: rattr.as_object().cloned().unwrap_or_default(),
            ..Default::default()
        },
        actions: vec!["tools/call::create_issue".into()],
        aux_data: serde_json::Value::Null,
    }
}
