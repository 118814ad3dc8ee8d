//! Aperture's `HookCallData`, read from an already strictly parsed JSON value.
//!
//! Aperture POSTs one `HookCallData` per hook call (<https://tailscale.com/docs/aperture>,
//! the aperture-recipes protocol reference): `metadata` always, the rest as the grant's
//! `send` list chooses. The body does not name its event; [`HookCall::looks_post_response`]
//! infers it for the shared URL. Unknown fields are ignored, as Aperture ignores them; a known
//! field of the wrong type is an error naming its path.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::tailnet::types::CapMap;

/// Which hook event a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Before the provider gets the request: answered with a `GuardrailResponse`.
    PreRequest,
    /// `entire_request` or `tool_call_entire_request`: after the response, fire-and-forget.
    PostResponse,
}

impl Event {
    /// The name the audit rows carry in `method`.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::PreRequest => "pre_request",
            Event::PostResponse => "post_response",
        }
    }
}

/// `HookCallData.metadata`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    pub login_name: String,
    pub user_agent: String,
    pub url: String,
    pub model: String,
    pub provider: String,
    pub tailnet_name: String,
    /// `tailcfg.StableNodeID` of the device that made the LLM request.
    pub stable_node_id: String,
    pub request_id: String,
    pub session_id: String,
    /// `metadata.grants`: the caller's app capabilities, exactly a WhoIs `CapMap`
    /// (capability name → grant objects; `null` lists read as empty).
    pub grants: CapMap,
}

/// One entry of `tool_calls` (post-response: the tool calls in the LLM's answer).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The call's arguments (`params`); absent or `null` reads as `{}`.
    pub params: Map<String, Value>,
}

/// One `HookCallData` body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HookCall {
    pub metadata: Metadata,
    /// `tool_calls` (`send: ["tools"]`; post-response events only).
    pub tool_calls: Option<Vec<ToolCall>>,
    /// `request_body`: the provider-native request.
    pub request_body: Option<Value>,
    /// `response_body` (post-response only).
    pub response_body: Option<Value>,
    /// `raw_responses`: parsed SSE messages (post-response only).
    pub raw_responses: Option<Value>,
    /// `user_message`: the last user message.
    pub user_message: Option<String>,
}

impl HookCall {
    /// Aperture fills `tool_calls`, `response_body` and `raw_responses` only after the
    /// response: a body carrying any of them is a post-response event.
    pub fn looks_post_response(&self) -> bool {
        self.tool_calls.is_some() || self.response_body.is_some() || self.raw_responses.is_some()
    }
}

/// Reads a `HookCallData` body.
pub fn parse(body: Value) -> Result<HookCall, String> {
    let Value::Object(mut top) = body else {
        return Err("the body is not a JSON object (want Aperture's HookCallData)".into());
    };
    let metadata = match top.remove("metadata") {
        Some(Value::Object(m)) => metadata(m)?,
        Some(Value::Null) | None => {
            return Err("$.metadata: missing (Aperture always sends it)".into());
        }
        Some(_) => return Err("$.metadata: not an object".into()),
    };
    let tool_calls = match top.remove("tool_calls") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| tool_call(i, item))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err("$.tool_calls: not a list".into()),
    };
    let non_null = |v: Option<Value>| v.filter(|v| !v.is_null());
    let user_message = match top.remove("user_message") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err("$.user_message: not a string".into()),
    };
    Ok(HookCall {
        metadata,
        tool_calls,
        request_body: non_null(top.remove("request_body")),
        response_body: non_null(top.remove("response_body")),
        raw_responses: non_null(top.remove("raw_responses")),
        user_message,
    })
}

fn metadata(mut m: Map<String, Value>) -> Result<Metadata, String> {
    let mut text = |key: &str| -> Result<String, String> {
        match m.remove(key) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(format!("$.metadata.{key}: not a string")),
        }
    };
    let mut md = Metadata {
        login_name: text("login_name")?,
        user_agent: text("user_agent")?,
        url: text("url")?,
        model: text("model")?,
        provider: text("provider")?,
        tailnet_name: text("tailnet_name")?,
        stable_node_id: text("stable_node_id")?,
        request_id: text("request_id")?,
        session_id: text("session_id")?,
        grants: CapMap::new(),
    };
    if let Some(g) = m.remove("grants") {
        md.grants = cap_map(g).map_err(|e| {
            format!("$.metadata.grants: {e} (want a capability map: name → list of grant objects)")
        })?;
    }
    Ok(md)
}

/// `metadata.grants` read exactly as tailscaled's WhoIs `CapMap` is: `null` → empty, a `null`
/// list → empty, anything else that is not a map of lists is an error.
fn cap_map(v: Value) -> Result<CapMap, String> {
    let raw: Option<std::collections::BTreeMap<String, Option<Vec<Value>>>> =
        Option::deserialize(v).map_err(|e| e.to_string())?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, vals)| (k, vals.unwrap_or_default()))
        .collect())
}

fn tool_call(i: usize, item: Value) -> Result<ToolCall, String> {
    let Value::Object(mut o) = item else {
        return Err(format!("$.tool_calls[{i}]: not an object"));
    };
    let name = match o.remove("name") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => return Err(format!("$.tool_calls[{i}].name: missing or not a string")),
    };
    let params = params(o.remove("params"))
        .map_err(|what| format!("$.tool_calls[{i}].params ({name}): {what}"))?;
    Ok(ToolCall { name, params })
}

/// A tool call's arguments: an object; absent or `null` is `{}` (a tool without parameters).
pub fn params(v: Option<Value>) -> Result<Map<String, Value>, String> {
    match v {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(other) => Err(format!(
            "tool params must be a JSON object, not {}",
            type_name(&other)
        )),
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_documented_fields() {
        let c = parse(json!({
            "metadata": {"login_name": "alice@example.com", "user_agent": "claude-code/1.0",
                "url": "https://aperture.tail1234.ts.net/v1/messages", "model": "claude-sonnet-4-20250514",
                "provider": "anthropic", "tailnet_name": "example.ts.net", "stable_node_id": "nSTABLE123",
                "request_id": "req_abc123", "session_id": "sess_xyz789",
                "grants": {"toolgate.dev/cap/toolgate": [{"roles": ["developer"]}], "other/cap": null},
                "estimated_cost": {"dollars": 0.0042}, "something_new": 1},
            "user_message": "hi",
            "request_body": {"model": "m", "messages": []}
        }))
        .unwrap();
        assert_eq!(c.metadata.login_name, "alice@example.com");
        assert_eq!(c.metadata.stable_node_id, "nSTABLE123");
        assert_eq!(c.metadata.grants["toolgate.dev/cap/toolgate"].len(), 1);
        assert!(c.metadata.grants["other/cap"].is_empty());
        assert!(!c.looks_post_response());
        let c =
            parse(json!({"metadata": {}, "tool_calls": [{"name": "t", "params": null}]})).unwrap();
        assert!(c.looks_post_response());
        assert!(c.tool_calls.unwrap()[0].params.is_empty());
        assert!(
            parse(json!({"metadata": {}, "raw_responses": []}))
                .unwrap()
                .looks_post_response()
        );
        assert!(
            !parse(json!({"metadata": {}, "response_body": null}))
                .unwrap()
                .looks_post_response()
        );
    }

    #[test]
    fn wrong_types_name_their_path() {
        let e = |v: Value| parse(v).unwrap_err();
        assert!(e(json!([])).contains("not a JSON object"));
        assert!(e(json!({})).contains("$.metadata: missing"));
        assert!(e(json!({"metadata": {"login_name": 5}})).contains("$.metadata.login_name"));
        assert!(
            e(json!({"metadata": {"grants": {"c": {"roles": ["admin"]}}}}))
                .contains("$.metadata.grants")
        );
        assert!(e(json!({"metadata": {"grants": [1]}})).contains("$.metadata.grants"));
        assert!(e(json!({"metadata": {}, "tool_calls": {}})).contains("$.tool_calls: not a list"));
        assert!(
            e(json!({"metadata": {}, "tool_calls": [{"params": {}}]}))
                .contains("$.tool_calls[0].name")
        );
        let m = e(json!({"metadata": {}, "tool_calls": [{"name": "rm", "params": "rm -rf /"}]}));
        assert!(
            m.contains("$.tool_calls[0].params (rm)") && m.contains("not a string"),
            "{m}"
        );
        assert!(
            e(json!({"metadata": {}, "tool_calls": [{"name": "t", "params": [1]}]}))
                .contains("not a list")
        );
    }
}
