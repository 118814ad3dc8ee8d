//! MCP message → policy check (DESIGN.md §4, compatible with cerbos-fastmcp policies).
//!
//! | message                         | action                 |
//! | ------------------------------- | ---------------------- |
//! | `tools/call` name=T             | `tools/call::T`        |
//! | `tools/list`, per listed tool T | `tools/list::T`        |
//! | `prompts/get` name=N / list     | `prompts/get::N` / `prompts/list::N` |
//! | `resources/read` uri=U / list   | `resources/read::U` / `resources/list::U` |
//! | `resources/templates/list`      | `resources/templates/list::<uriTemplate>` |
//! | anything else                   | the method name        |
//!
//! The resource is `{kind: <server's resource_kind>, id: <server name>, scope: <server scope>}`
//! with `attr` = `server`, `method`, and for tools `tool_name`, `arguments`, `annotations`.

use serde_json::{Map, Value};

use super::jsonrpc::Message;
use crate::policy::input::Resource;

/// The upstream a message is addressed to, as configured.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: String,
    pub resource_kind: String,
    pub scope: String,
}

/// What a message asks to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub action: String,
    /// The tool, prompt or resource named by the message, if any.
    pub name: Option<String>,
    /// `R.attr.arguments` is the message's arguments object (`{}` when it sent none):
    /// `tools/call` and `prompts/get`. The caller lends them to the resource
    /// ([`lend_arguments`]) rather than copying them.
    pub takes_arguments: bool,
}

/// The `params` keys of the methods that act upstream: the union of what every protocol
/// revision we speak defines for them (2025-03-26, 2025-06-18, 2025-11-25, 2026-07-28), plus
/// `_meta`. Anything else could carry what policy never saw to an upstream that reads it
/// (invariant I4): `task` is 2025-11-25's task augmentation, `inputResponses` and
/// `requestState` are 2026-07-28's multi-round-trip retry, `context` is 2025-06-18's.
pub fn params_allowed(method: &str) -> Option<&'static [&'static str]> {
    match method {
        "tools/call" => Some(&[
            "name",
            "arguments",
            "task",
            "inputResponses",
            "requestState",
            "_meta",
        ]),
        "prompts/get" => Some(&[
            "name",
            "arguments",
            "inputResponses",
            "requestState",
            "_meta",
        ]),
        "resources/read" => Some(&["uri", "inputResponses", "requestState", "_meta"]),
        "completion/complete" => Some(&["ref", "argument", "context", "_meta"]),
        _ => None,
    }
}

/// Refuses `params` keys outside the method's allowlist ([`params_allowed`]).
fn check_params(msg: &Message) -> Result<(), String> {
    let Some(allowed) = params_allowed(&msg.method) else {
        return Ok(());
    };
    let params = match msg.value.get("params") {
        None => return Ok(()),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(format!("{} \"params\" must be an object", msg.method)),
    };
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "{} params may not carry {k:?}; its keys are {}",
            msg.method,
            allowed
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => Ok(()),
    }
}

/// Maps a request or notification to its action. `arguments` is the message's
/// `params.arguments`, when the caller took it out of the message (see `payload`); otherwise
/// it is read from the message. `Err` is an invalid-params message.
pub fn check_for(msg: &Message, arguments: Option<&Value>) -> Result<Check, String> {
    check_params(msg)?;
    let arguments = arguments.or_else(|| msg.params().and_then(|p| p.get("arguments")));
    let named = |key: &str, prefix: &str| -> Result<Check, String> {
        let name = msg
            .param_str(key)
            .ok_or_else(|| format!("{} needs a string \"params.{key}\"", msg.method))?;
        if key != "uri" && !matches!(arguments, None | Some(Value::Null | Value::Object(_))) {
            return Err(format!(
                "{} \"params.arguments\" must be an object",
                msg.method
            ));
        }
        Ok(Check {
            action: format!("{prefix}::{name}"),
            name: Some(name.to_string()),
            takes_arguments: key != "uri",
        })
    };
    match msg.method.as_str() {
        "tools/call" => named("name", "tools/call"),
        "prompts/get" => named("name", "prompts/get"),
        "resources/read" => named("uri", "resources/read"),
        other => Ok(Check {
            action: other.to_string(),
            name: None,
            takes_arguments: false,
        }),
    }
}

/// Methods of the MCP revisions we speak (both eras); anything else is an extension.
pub fn is_known_method(method: &str) -> bool {
    const KNOWN: &[&str] = &[
        "initialize",
        "ping",
        "server/discover",
        "subscriptions/listen",
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "completion/complete",
        "logging/setLevel",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
    ];
    KNOWN.contains(&method) || method.starts_with("notifications/") || method.starts_with("tasks/")
}

/// The list action for one listed item.
pub fn list_action(method: &str, item: &Value) -> Option<String> {
    let (key, prefix) = match method {
        "tools/list" => ("name", "tools/list"),
        "prompts/list" => ("name", "prompts/list"),
        "resources/list" => ("uri", "resources/list"),
        "resources/templates/list" => ("uriTemplate", "resources/templates/list"),
        _ => return None,
    };
    item.get(key)
        .and_then(Value::as_str)
        .map(|n| format!("{prefix}::{n}"))
}

/// The array of items in a list result.
pub fn list_key(method: &str) -> Option<&'static str> {
    match method {
        "tools/list" => Some("tools"),
        "prompts/list" => Some("prompts"),
        "resources/list" => Some("resources"),
        "resources/templates/list" => Some("resourceTemplates"),
        _ => None,
    }
}

/// Puts a call's arguments (moved, not copied) into `R.attr.arguments`; `{}` for none.
pub fn lend_arguments(resource: &mut Resource, arguments: Option<Value>) {
    let args = match arguments {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v) => v,
    };
    resource.attr.insert("arguments".into(), args);
}

/// Takes a call's arguments back out of `R.attr.arguments` after the check.
pub fn return_arguments(resource: &mut Resource) -> Option<Value> {
    resource.attr.remove("arguments")
}

/// The policy resource for a message to `target` (without `arguments`: see
/// [`lend_arguments`]).
pub fn resource(
    target: &Target,
    method: &str,
    check: &Check,
    annotations: Option<&Value>,
) -> Resource {
    let mut attr = Map::new();
    attr.insert("server".into(), Value::String(target.server.clone()));
    attr.insert("method".into(), Value::String(method.to_string()));
    if let Some(name) = &check.name {
        let key = if method == "resources/read" {
            "uri"
        } else {
            "tool_name"
        };
        attr.insert(key.into(), Value::String(name.clone()));
        if method == "prompts/get" {
            attr.insert("prompt_name".into(), Value::String(name.clone()));
        }
    }
    if let Some(a) = annotations {
        attr.insert("annotations".into(), a.clone());
    }
    Resource {
        kind: target.resource_kind.clone(),
        id: target.server.clone(),
        attr,
        policy_version: String::new(),
        scope: target.scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::{Limits, parse};

    fn msg(s: &str) -> Message {
        parse(s.as_bytes(), Limits::default()).unwrap()
    }

    #[test]
    fn actions_follow_the_design_table() {
        let c = check_for(&msg(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"create_issue","arguments":{"owner":"x"}}}"#), None).unwrap();
        assert_eq!(c.action, "tools/call::create_issue");
        assert!(c.takes_arguments);
        let c = check_for(
            &msg(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}}"#),
            None,
        )
        .unwrap();
        assert!(c.takes_arguments);
        let c = check_for(&msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///a"}}"#,
        ), None)
        .unwrap();
        assert_eq!(c.action, "resources/read::file:///a");
        assert!(!c.takes_arguments);
        // Arguments taken out of the message are checked as if they were in it.
        let bare = msg(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}}"#);
        assert!(check_for(&bare, Some(&serde_json::json!([1]))).is_err());
        assert_eq!(
            check_for(
                &msg(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#),
                None
            )
            .unwrap()
            .action,
            "initialize"
        );
        assert!(
            check_for(
                &msg(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#),
                None
            )
            .is_err()
        );
        assert!(check_for(&msg(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":[1]}}"#), None).is_err());
        assert_eq!(
            list_action("tools/list", &serde_json::json!({"name": "echo"})).unwrap(),
            "tools/list::echo"
        );
        assert_eq!(
            list_action(
                "resources/templates/list",
                &serde_json::json!({"uriTemplate": "f://{x}"})
            )
            .unwrap(),
            "resources/templates/list::f://{x}"
        );
    }

    #[test]
    fn resource_attributes() {
        let t = Target {
            server: "github".into(),
            resource_kind: "mcp_server".into(),
            scope: "".into(),
        };
        let m = msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"create_issue","arguments":{"owner":"x"}}}"#,
        );
        let c = check_for(&m, None).unwrap();
        let mut r = resource(
            &t,
            &m.method,
            &c,
            Some(&serde_json::json!({"readOnlyHint": false})),
        );
        lend_arguments(&mut r, m.params().and_then(|p| p.get("arguments")).cloned());
        assert_eq!(r.kind, "mcp_server");
        assert_eq!(r.id, "github");
        assert_eq!(r.attr["tool_name"], "create_issue");
        assert_eq!(r.attr["arguments"]["owner"], "x");
        assert_eq!(r.attr["annotations"]["readOnlyHint"], false);
        assert_eq!(r.attr["method"], "tools/call");
    }

    #[test]
    fn acting_methods_carry_only_their_params() {
        for body in [
            // A fold-equal twin is the parser's refusal; alone, it is an unknown key here.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_issue","argumentſ":{"owner":"victim"}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_issue","Arguments":{}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_issue","tool":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p","task":{}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a://b","url":"file:///etc/shadow"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{},"argument":{},"arguments":{}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":[1]}"#,
        ] {
            let e = check_for(&msg(body), None).unwrap_err();
            assert!(
                e.contains("may not carry") || e.contains("must be an object"),
                "{body}: {e}"
            );
        }
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{},"task":{"ttl":1},"_meta":{"progressToken":1}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","inputResponses":{},"requestState":"s"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p","arguments":{"a":"b"},"_meta":{}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a://b","requestState":"s"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"p"},"argument":{"name":"a","value":"v"},"context":{"arguments":{}}}}"#,
            // Methods without an allowlist keep their params as they are.
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"c","x":1}}"#,
        ] {
            check_for(&msg(body), None).unwrap();
        }
    }
}
