//! CEL: any text either fails to compile with a message or evaluates (bounded) to a value or
//! an error, against a fixed request. Never a panic, a hang or a stack overflow.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use toolgate::policy::cel::{CelEnv, EvalCtx, Request, Variables};
use toolgate::policy::input::{Principal, Resource};

fuzz_target!(|data: &[u8]| {
    static ENV: OnceLock<CelEnv> = OnceLock::new();
    let env = ENV.get_or_init(CelEnv::new);
    let Ok(src) = std::str::from_utf8(data) else { return };
    let Ok(expr) = env.compile(src) else { return };
    let principal = Principal {
        id: "alice".into(),
        roles: vec!["user".into()],
        attr: serde_json::json!({"tags": ["tag:ci"], "level": 3, "login": "alice@example.com"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        ..Default::default()
    };
    let resource = Resource {
        kind: "mcp_server".into(),
        id: "github".into(),
        attr: serde_json::json!({"arguments": {"path": "/srv/a", "n": [1, 2, 3]}})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        ..Default::default()
    };
    let globals = serde_json::Map::new();
    let aux = serde_json::Value::Null;
    let request = Request {
        principal: &principal,
        resource: &resource,
        aux_data: &aux,
        now: chrono::DateTime::UNIX_EPOCH,
        globals: &globals,
        clock_read: Default::default(),
    };
    let constants = Arc::new(serde_json::Map::new());
    let variables = Variables::default();
    let ctx = EvalCtx {
        env,
        request: &request,
        action: "tools/call::x",
        constants: &constants,
        variables: &variables,
        effective_derived_roles: &[],
        derived_roles_error: None,
    };
    let _ = expr.eval_bool(&ctx);
    let _ = expr.eval_json(&ctx);
});
