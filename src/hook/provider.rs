//! Tool activity inside LLM provider bodies: the tool uses a request carries, the tools it
//! offers the model, and the same body with some tools taken out.
//!
//! Formats (the providers' own API references):
//! - Anthropic Messages (<https://docs.anthropic.com/en/api/messages>): `messages[].content[]`
//!   blocks `{"type":"tool_use","name":..,"input":{..}}`; `tools[]` `{name, input_schema}` or
//!   server tools `{type, name}`; `tool_choice` `{"type":"tool","name":..}`.
//! - OpenAI Chat Completions (<https://platform.openai.com/docs/api-reference/chat>):
//!   assistant `messages[].tool_calls[]` `{"type":"function","function":{"name":..,"arguments":"<JSON text>"}}`;
//!   `tools[]` `{"type":"function","function":{"name":..}}`; `tool_choice`
//!   `{"type":"function","function":{"name":..}}`.
//! - OpenAI Responses (<https://platform.openai.com/docs/api-reference/responses>): `input[]`
//!   items `{"type":"function_call","name":..,"arguments":"<JSON text>"}`; `tools[]`
//!   `{"type":"function","name":..}` or built-ins `{"type":"web_search"}`; `tool_choice`
//!   `{"type":"function","name":..}`.
//!
//! A tool without a name (an OpenAI built-in) is named by its `type`. Anything else is an
//! error naming where it is: the hook refuses what it cannot read rather than pass it.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::call::{params, type_name};

/// The provider format a body was read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `messages` with Anthropic or OpenAI Chat tool syntax (both are read: a tool use in either
    /// syntax is checked, whatever the provider).
    Messages,
    /// OpenAI Responses `input`.
    Responses,
}

/// One tool use the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    pub name: String,
    pub params: Map<String, Value>,
}

/// Which format `body` is in, or why it is in none.
pub fn format(body: &Value) -> Result<Format, String> {
    let Value::Object(o) = body else {
        return Err(format!(
            "request_body is {}, not a provider request object",
            type_name(body)
        ));
    };
    match (o.get("messages"), o.get("input")) {
        (Some(Value::Array(_)), None) => Ok(Format::Messages),
        (None, Some(Value::Array(_) | Value::String(_))) => Ok(Format::Responses),
        (Some(_), Some(_)) => Err("request_body has both `messages` and `input`: \
             not one provider format"
            .into()),
        (Some(m), None) => Err(format!(
            "request_body.messages is {}, not a list",
            type_name(m)
        )),
        (None, Some(i)) => Err(format!(
            "request_body.input is {}, not a list or text",
            type_name(i)
        )),
        (None, None) => Err(
            "request_body is in no known provider format (want Anthropic \
             Messages or OpenAI Chat Completions `messages`, or OpenAI Responses `input`)"
                .into(),
        ),
    }
}

/// The latest tool uses of a request: those of the last assistant message (Anthropic
/// `tool_use` blocks, OpenAI `tool_calls`), or, for Responses, the `function_call` items after
/// the last user message.
pub fn latest_tool_uses(body: &Value) -> Result<Vec<ToolUse>, String> {
    match format(body)? {
        Format::Messages => {
            let messages = body
                .get("messages")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (i, m) in messages.iter().enumerate() {
                if !m.is_object() {
                    return Err(format!(
                        "request_body.messages[{i}] is {}, not a message object",
                        type_name(m)
                    ));
                }
            }
            let Some((i, last)) = messages
                .iter()
                .enumerate()
                .rev()
                .find(|(_, m)| m.get("role").and_then(Value::as_str) == Some("assistant"))
            else {
                return Ok(Vec::new());
            };
            message_tool_uses(last, &format!("request_body.messages[{i}]"))
        }
        Format::Responses => {
            let Some(items) = body.get("input").and_then(Value::as_array) else {
                return Ok(Vec::new());
            };
            let start = items
                .iter()
                .rposition(|it| it.get("role").and_then(Value::as_str) == Some("user"))
                .map_or(0, |p| p + 1);
            let mut out = Vec::new();
            for (i, it) in items.iter().enumerate().skip(start) {
                if let Some(u) = response_item(it, &format!("request_body.input[{i}]"))? {
                    out.push(u);
                }
            }
            Ok(out)
        }
    }
}

/// Tool uses in one message, in either syntax.
fn message_tool_uses(m: &Value, at: &str) -> Result<Vec<ToolUse>, String> {
    let mut out = Vec::new();
    if let Some(content) = m.get("content") {
        match content {
            Value::Array(blocks) => {
                for (j, b) in blocks.iter().enumerate() {
                    if b.get("type").and_then(Value::as_str) == Some("tool_use") {
                        let here = format!("{at}.content[{j}]");
                        let name = tool_name_field(b.get("name"), &here)?;
                        let params = params(b.get("input").cloned())
                            .map_err(|e| format!("{here}.input ({name}): {e}"))?;
                        out.push(ToolUse { name, params });
                    }
                }
            }
            Value::String(_) | Value::Null => {}
            other => {
                return Err(format!(
                    "{at}.content is {}, not text or a list of blocks",
                    type_name(other)
                ));
            }
        }
    }
    match m.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(calls)) => {
            for (j, c) in calls.iter().enumerate() {
                let here = format!("{at}.tool_calls[{j}]");
                let f = c.get("function").ok_or_else(|| {
                    format!("{here}: no `function` (only function tool calls are known)")
                })?;
                let name = tool_name_field(f.get("name"), &format!("{here}.function"))?;
                let params = arguments(f.get("arguments"))
                    .map_err(|e| format!("{here}.function.arguments ({name}): {e}"))?;
                out.push(ToolUse { name, params });
            }
        }
        Some(other) => {
            return Err(format!(
                "{at}.tool_calls is {}, not a list",
                type_name(other)
            ));
        }
    }
    Ok(out)
}

/// A Responses `function_call` item (others are not tool uses).
fn response_item(it: &Value, at: &str) -> Result<Option<ToolUse>, String> {
    if it.get("type").and_then(Value::as_str) != Some("function_call") {
        return Ok(None);
    }
    let name = tool_name_field(it.get("name"), at)?;
    let params =
        arguments(it.get("arguments")).map_err(|e| format!("{at}.arguments ({name}): {e}"))?;
    Ok(Some(ToolUse { name, params }))
}

fn tool_name_field(v: Option<&Value>, at: &str) -> Result<String, String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(format!("{at}.name: missing or not a string")),
    }
}

/// OpenAI `arguments`: JSON text of an object (an object itself is taken too; empty text is
/// `{}`). Duplicate or case-variant keys are refused, as everywhere in the hook body.
fn arguments(v: Option<&Value>) -> Result<Map<String, Value>, String> {
    match v {
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Map::new()),
        Some(Value::String(s)) => {
            let parsed = crate::mcp::jsonrpc::parse_value(
                s.as_bytes(),
                crate::mcp::jsonrpc::Limits {
                    max_bytes: s.len(),
                    max_depth: 64,
                    max_nodes: usize::MAX,
                },
            )
            .map_err(|e| format!("not JSON text of an object: {e}"))?;
            params(Some(parsed))
        }
        other => params(other.cloned()),
    }
}

/// The tool calls in a provider response body (post-response, when Aperture did not send
/// `tool_calls`): Anthropic `content[]` `tool_use`, OpenAI Chat `choices[].message.tool_calls`,
/// OpenAI Responses `output[]` `function_call`.
pub fn response_tool_uses(body: &Value) -> Result<Vec<ToolUse>, String> {
    let Value::Object(o) = body else {
        return Err(format!(
            "response_body is {}, not a provider response object",
            type_name(body)
        ));
    };
    if let Some(choices) = o.get("choices") {
        let Value::Array(choices) = choices else {
            return Err("response_body.choices is not a list".into());
        };
        let mut out = Vec::new();
        for (i, c) in choices.iter().enumerate() {
            if let Some(m) = c.get("message") {
                out.extend(message_tool_uses(
                    m,
                    &format!("response_body.choices[{i}].message"),
                )?);
            }
        }
        return Ok(out);
    }
    if let Some(output) = o.get("output") {
        let Value::Array(items) = output else {
            return Err("response_body.output is not a list".into());
        };
        let mut out = Vec::new();
        for (i, it) in items.iter().enumerate() {
            if let Some(u) = response_item(it, &format!("response_body.output[{i}]"))? {
                out.push(u);
            }
        }
        return Ok(out);
    }
    if o.contains_key("content") {
        return message_tool_uses(body, "response_body");
    }
    Err(
        "response_body is in no known provider format (want an Anthropic message, \
         OpenAI Chat `choices` or OpenAI Responses `output`)"
            .into(),
    )
}

/// The names of the tools a request offers the model (`tools[]`), in order.
pub fn offered_tools(body: &Value) -> Result<Vec<String>, String> {
    let Some(tools) = body.get("tools") else {
        return Ok(Vec::new());
    };
    let tools = match tools {
        Value::Null => return Ok(Vec::new()),
        Value::Array(t) => t,
        other => {
            return Err(format!(
                "request_body.tools is {}, not a list",
                type_name(other)
            ));
        }
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| offered_name(t).ok_or_else(|| format!("request_body.tools[{i}]: no tool name (want `name`, `function.name` or a built-in's `type`)")))
        .collect()
}

/// A `tools[]` entry's name: `function.name`, else `name`, else a built-in's `type`.
fn offered_name(t: &Value) -> Option<String> {
    fn text(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str).filter(|s| !s.is_empty())
    }
    let o = t.as_object()?;
    if let Some(f) = o.get("function") {
        return text(f.get("name")).map(str::to_string);
    }
    text(o.get("name"))
        .or_else(|| text(o.get("type")))
        .map(str::to_string)
}

/// The tool `tool_choice` forces, if it names one.
pub fn forced_tool(body: &Value) -> Option<String> {
    let c = body.get("tool_choice")?.as_object()?;
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    match c.get("type").and_then(Value::as_str)? {
        "tool" => text(c.get("name")),
        "function" => {
            text(c.get("function").and_then(|f| f.get("name"))).or_else(|| text(c.get("name")))
        }
        _ => None,
    }
}

/// `body` without the offered tools named in `hidden`. When none is left, `tools`,
/// `tool_choice` and `parallel_tool_calls` go too (providers refuse an empty `tools` list or a
/// `tool_choice` without tools).
pub fn without_tools(body: &Value, hidden: &BTreeSet<String>) -> Value {
    let mut out = body.clone();
    let Some(o) = out.as_object_mut() else {
        return out;
    };
    let empty = match o.get_mut("tools") {
        Some(Value::Array(tools)) => {
            tools.retain(|t| offered_name(t).is_none_or(|n| !hidden.contains(&n)));
            tools.is_empty()
        }
        _ => false,
    };
    if empty {
        o.remove("tools");
        o.remove("tool_choice");
        o.remove("parallel_tool_calls");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(u: &[ToolUse]) -> Vec<&str> {
        u.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn anthropic_latest_tool_uses_are_the_last_assistant_turns() {
        let body = json!({"model": "claude", "messages": [
            {"role": "user", "content": "fix it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "old_tool", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "ok"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "running"},
                {"type": "tool_use", "id": "b", "name": "run_shell", "input": {"cmd": "ls"}},
                {"type": "tool_use", "id": "c", "name": "read_file", "input": {"path": "/etc/hosts"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "b", "content": "x"}]}
        ]});
        let u = latest_tool_uses(&body).unwrap();
        assert_eq!(names(&u), ["run_shell", "read_file"]);
        assert_eq!(u[0].params["cmd"], "ls");
        let none = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(latest_tool_uses(&none).unwrap().is_empty());
    }

    #[test]
    fn openai_chat_and_responses_tool_uses() {
        let chat = json!({"model": "gpt", "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
                {"id": "2", "type": "function", "function": {"name": "noargs", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "1", "content": "sunny"}
        ]});
        let u = latest_tool_uses(&chat).unwrap();
        assert_eq!(names(&u), ["get_weather", "noargs"]);
        assert_eq!(u[0].params["city"], "Oslo");
        let responses = json!({"model": "gpt", "input": [
            {"role": "user", "content": "a"},
            {"type": "function_call", "call_id": "0", "name": "stale", "arguments": "{}"},
            {"role": "user", "content": "b"},
            {"type": "function_call", "call_id": "1", "name": "search", "arguments": "{\"q\":1}"},
            {"type": "function_call_output", "call_id": "1", "output": "r"}
        ]});
        assert_eq!(names(&latest_tool_uses(&responses).unwrap()), ["search"]);
        assert!(
            latest_tool_uses(&json!({"input": "hello"}))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn unreadable_bodies_are_errors_naming_where() {
        let e = |v: Value| latest_tool_uses(&v).unwrap_err();
        assert!(e(json!({"model": "x", "prompt": "hi"})).contains("no known provider format"));
        assert!(e(json!("text")).contains("not a provider request"));
        assert!(e(json!({"messages": {}})).contains("not a list"));
        assert!(e(json!({"messages": [], "input": []})).contains("both"));
        let m = e(
            json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "rm", "input": "rm -rf /"}]}]}),
        );
        assert!(
            m.contains("messages[0].content[0].input (rm)") && m.contains("not a string"),
            "{m}"
        );
        let m = e(
            json!({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "rm", "arguments": "[1]"}}]}]}),
        );
        assert!(m.contains("tool_calls[0].function.arguments (rm)"), "{m}");
        let m = e(
            json!({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "rm", "arguments": "{\"a\":1,\"a\":2}"}}]}]}),
        );
        assert!(m.contains("not JSON text"), "{m}");
        assert!(e(json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": {}}]}]})).contains(".name"));
        assert!(e(json!({"messages": [7]})).contains("messages[0]"));
    }

    #[test]
    fn offered_tools_and_removal() {
        let anthropic = json!({"tools": [
            {"name": "read_file", "input_schema": {}},
            {"name": "run_shell", "input_schema": {}},
            {"type": "web_search_20250305", "name": "web_search"}],
            "tool_choice": {"type": "auto"}});
        assert_eq!(
            offered_tools(&anthropic).unwrap(),
            ["read_file", "run_shell", "web_search"]
        );
        let hidden: BTreeSet<String> = ["run_shell".to_string()].into();
        let out = without_tools(&anthropic, &hidden);
        assert_eq!(offered_tools(&out).unwrap(), ["read_file", "web_search"]);
        assert_eq!(out["tool_choice"], json!({"type": "auto"}));
        let openai = json!({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "web_search_preview"}],
            "tool_choice": {"type": "function", "function": {"name": "a"}}, "parallel_tool_calls": true});
        assert_eq!(offered_tools(&openai).unwrap(), ["a", "web_search_preview"]);
        assert_eq!(forced_tool(&openai).as_deref(), Some("a"));
        let all: BTreeSet<String> = ["a".to_string(), "web_search_preview".to_string()].into();
        let out = without_tools(&openai, &all);
        assert!(
            out.get("tools").is_none()
                && out.get("tool_choice").is_none()
                && out.get("parallel_tool_calls").is_none()
        );
        assert_eq!(
            forced_tool(&json!({"tool_choice": {"type": "tool", "name": "x"}})).as_deref(),
            Some("x")
        );
        assert_eq!(forced_tool(&json!({"tool_choice": "auto"})), None);
        assert!(
            offered_tools(&json!({"tools": [{"description": "x"}]}))
                .unwrap_err()
                .contains("tools[0]")
        );
        assert!(
            offered_tools(&json!({"tools": {}}))
                .unwrap_err()
                .contains("not a list")
        );
    }

    #[test]
    fn response_bodies() {
        let a = json!({"type": "message", "role": "assistant", "content": [{"type": "tool_use", "name": "x", "input": {"k": 1}}]});
        assert_eq!(names(&response_tool_uses(&a).unwrap()), ["x"]);
        let o = json!({"choices": [{"message": {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "y", "arguments": "{}"}}]}}]});
        assert_eq!(names(&response_tool_uses(&o).unwrap()), ["y"]);
        let r = json!({"output": [{"type": "message"}, {"type": "function_call", "name": "z", "arguments": "{}"}]});
        assert_eq!(names(&response_tool_uses(&r).unwrap()), ["z"]);
        assert!(response_tool_uses(&json!({"x": 1})).is_err());
    }
}
