//! `doctor`'s probe of one upstream: does it answer, and does it speak MCP?
//!
//! HTTP upstreams are asked as a 2026-07-28 client asks first, `server/discover` (with
//! `MCP-Protocol-Version` and `Mcp-Method`); a handshake-era server refuses that, and is then
//! asked `initialize` (its session is ended again with DELETE). Stdio upstreams are started
//! through the launcher, as `serve` would start them (a process group, no cgroup: the probe
//! leaves nothing behind), sent `initialize`, and stopped. Every probe is bounded by
//! [`PROBE_TIMEOUT`] (or the server's `timeout` when shorter).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::StdioConfig;

/// The longest one probe waits for an answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The handshake-era revision `initialize` asks for.
const HANDSHAKE_VERSION: &str = "2025-11-25";
/// The stateless revision `server/discover` is sent as.
const MODERN_VERSION: &str = "2026-07-28";
/// The largest answer a probe reads.
const MAX_ANSWER: usize = 1024 * 1024;

/// What an upstream answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `server/discover` or `initialize`.
    pub method: &'static str,
    /// The protocol version(s) it speaks: `initialize`'s `protocolVersion`, or
    /// `server/discover`'s `supportedVersions`.
    pub versions: Vec<String>,
    /// `serverInfo` as `name version`, when given.
    pub server: Option<String>,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.method == "initialize" {
            "protocol"
        } else {
            "versions"
        };
        write!(
            f,
            "{} answers {what} {}",
            self.method,
            self.versions.join(", ")
        )?;
        if let Some(s) = &self.server {
            write!(f, " ({s})")?;
        }
        Ok(())
    }
}

fn request(id: u64, method: &str) -> Value {
    let params = if method == "initialize" {
        json!({"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": {"name": "toolgate-doctor", "version": env!("CARGO_PKG_VERSION")}})
    } else {
        json!({})
    };
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// Reads the answer to request `id` out of a JSON-RPC response.
fn answer_of(method: &'static str, response: &Value) -> Result<Answer, String> {
    if let Some(e) = response.get("error") {
        let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
        let message = e.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(format!("{method} failed: error {code} {message:?}"));
    }
    let Some(result) = response.get("result") else {
        return Err(format!(
            "{method}: the answer is not a JSON-RPC response (no result, no error)"
        ));
    };
    let versions: Vec<String> = if method == "initialize" {
        result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .map(|v| vec![v.to_string()])
            .unwrap_or_default()
    } else {
        result
            .get("supportedVersions")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    if versions.is_empty() {
        return Err(format!(
            "{method} answered without a protocol version: not an MCP server?"
        ));
    }
    let server = result.get("serverInfo").map(|i| {
        let name = i.get("name").and_then(Value::as_str).unwrap_or("?");
        match i.get("version").and_then(Value::as_str) {
            Some(v) => format!("{name} {v}"),
            None => name.to_string(),
        }
    });
    Ok(Answer {
        method,
        versions,
        server,
    })
}

/// Probes an HTTP upstream.
pub async fn http(
    client: &reqwest::Client,
    url: &reqwest::Url,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Answer, String> {
    let timeout = timeout.min(PROBE_TIMEOUT);
    let why_not = match http_call(client, url, headers, timeout, "server/discover").await {
        Ok((response, _)) => match answer_of("server/discover", &response) {
            Ok(a) => return Ok(a),
            Err(e) => e,
        },
        // Not reachable at all: asking again would only wait again.
        Err(HttpError::Unreachable(e)) => return Err(e),
        Err(HttpError::Refused(e)) => e,
    };
    match http_call(client, url, headers, timeout, "initialize").await {
        Ok((response, session)) => {
            if let Some(sid) = session {
                // End the session the probe opened; an upstream that keeps it is no harm.
                let mut req = client.delete(url.clone()).timeout(timeout);
                for (k, v) in headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                let _ = req
                    .header("mcp-session-id", sid)
                    .header("mcp-protocol-version", HANDSHAKE_VERSION)
                    .send()
                    .await;
            }
            answer_of("initialize", &response)
                .map_err(|e| format!("{e} (server/discover: {why_not})"))
        }
        Err(e) => Err(format!("{e} (server/discover: {why_not})")),
    }
}

/// Why an HTTP probe got no answer.
#[derive(Debug)]
enum HttpError {
    /// No HTTP answer at all (connection refused, DNS, timeout).
    Unreachable(String),
    /// An HTTP answer that is not a JSON-RPC response.
    Refused(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Unreachable(e) | HttpError::Refused(e) => f.write_str(e),
        }
    }
}

/// One request; returns the response to it and the `Mcp-Session-Id` given, if any.
async fn http_call(
    client: &reqwest::Client,
    url: &reqwest::Url,
    headers: &[(String, String)],
    timeout: Duration,
    method: &'static str,
) -> Result<(Value, Option<String>), HttpError> {
    let version = if method == "initialize" {
        HANDSHAKE_VERSION
    } else {
        MODERN_VERSION
    };
    let body = crate::mcp::jsonrpc::canonical(&request(1, method));
    let mut req = client
        .post(url.clone())
        .timeout(timeout)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if method != "initialize" {
        req = req
            .header("mcp-protocol-version", version)
            .header("mcp-method", method);
    }
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.body(body).send().await.map_err(|e| {
        let what = if e.is_timeout() {
            format!("no answer within {timeout:?}")
        } else {
            // The innermost cause (`Connection refused`, a DNS failure) names no URL, which
            // may carry a secret.
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            let base = crate::mcp::transport::without_url(&e);
            if std::ptr::addr_eq(cause, &e as &dyn std::error::Error) {
                base
            } else {
                format!("{base} ({cause})")
            }
        };
        HttpError::Unreachable(format!("not reachable: {what}"))
    })?;
    let status = resp.status();
    if !status.is_success() {
        let hint = match status.as_u16() {
            401 | 403 => " (are its credentials in servers.<name>.headers right?)",
            404 => " (is the URL's path the MCP endpoint?)",
            _ => "",
        };
        return Err(HttpError::Refused(format!("{method}: HTTP {status}{hint}")));
    }
    let session = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    let read = read_answer(resp, sse);
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(v)) => Ok((v, session)),
        Ok(Err(e)) => Err(HttpError::Refused(format!("{method}: {e}"))),
        Err(_) => Err(HttpError::Refused(format!(
            "{method}: the answer did not arrive within {timeout:?}"
        ))),
    }
}

/// The JSON-RPC response to id 1 in a JSON body or an SSE stream (read until it arrives).
async fn read_answer(mut resp: reqwest::Response, sse: bool) -> Result<Value, String> {
    let mut parser = crate::mcp::sse::Parser::new(MAX_ANSWER);
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if !sse {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_ANSWER {
                return Err(format!("the answer is larger than {MAX_ANSWER} bytes"));
            }
            continue;
        }
        for event in parser.feed(&chunk)? {
            if let Ok(v) = serde_json::from_str::<Value>(&event.data) {
                if v.get("id") == Some(&json!(1)) {
                    return Ok(v);
                }
            }
        }
    }
    if sse {
        return Err("the event stream ended without an answer".to_string());
    }
    serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
}

/// Probes a stdio upstream: starts one child through `launcher`, sends `initialize`, stops it.
pub async fn stdio(
    name: &str,
    server: &crate::config::Server,
    cmd: &crate::config::StdioCommand,
    all: &StdioConfig,
    launcher: &std::path::Path,
) -> Result<Answer, String> {
    let pool = crate::stdio::Pool::new(
        launcher.to_path_buf(),
        crate::stdio::Isolation::ProcessGroup,
        1,
    )?;
    let timeout = server.timeout.min(PROBE_TIMEOUT);
    let settings = crate::stdio::Settings {
        name: name.to_string(),
        command: cmd.command.clone(),
        env: crate::stdio::Settings::child_env(std::env::vars(), &cmd.env),
        cwd: cmd.cwd.clone(),
        max_children: 1,
        limits: crate::stdio::ChildLimits {
            max_line: all.max_line,
            call_timeout: timeout,
            grace: all.grace.min(PROBE_TIMEOUT),
            idle_timeout: cmd.idle_timeout,
        },
    };
    let result = stdio_initialize(&pool, settings).await;
    pool.shutdown(all.grace.min(PROBE_TIMEOUT) * 2).await;
    result
}

async fn stdio_initialize(
    pool: &crate::stdio::Pool,
    settings: crate::stdio::Settings,
) -> Result<Answer, String> {
    let server = pool.server(settings);
    let child: Arc<crate::stdio::Child> = server.spawn().await.map_err(|e| e.to_string())?;
    let value = request(1, "initialize");
    let canonical = crate::mcp::jsonrpc::canonical(&value);
    let msg = crate::mcp::jsonrpc::parse(&canonical, crate::mcp::jsonrpc::Limits::default())
        .map_err(|e| format!("internal: the probe's request does not parse: {e}"))?;
    let answer = child.request(&msg, &canonical, false).await;
    child.stop("doctor's probe is done");
    match answer {
        Ok(crate::stdio::Answer::Json(bytes)) => {
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("initialize: the answer is not JSON: {e}"))?;
            answer_of("initialize", &v)
        }
        Ok(crate::stdio::Answer::Stream(_)) => {
            Err("initialize: unexpected stream answer".to_string())
        }
        Err(e) => Err(format!("initialize failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use std::sync::Mutex;

    /// A handshake-era upstream: `server/discover` is refused as "not initialized" (400), and
    /// `initialize` is answered as an SSE stream with a session; it records what it is sent.
    async fn handshake_only(seen: Arc<Mutex<Vec<String>>>) -> reqwest::Url {
        let post_seen = seen.clone();
        let app = axum::Router::new().route(
            "/mcp",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let seen = post_seen.clone();
                async move {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    let method = v["method"].as_str().unwrap_or("").to_string();
                    let auth = headers
                        .get("authorization")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push(format!("POST {method} {auth}"));
                    if method != "initialize" {
                        let e = json!({"jsonrpc": "2.0", "id": v["id"], "error": {"code": -32600, "message": "not initialized"}});
                        return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
                    }
                    let note = json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hello"}});
                    let result = json!({"jsonrpc": "2.0", "id": v["id"], "result": {"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "old-server", "version": "0.9"}}});
                    let body = format!("event: message\ndata: {note}\n\nevent: message\ndata: {result}\n\n");
                    (
                        [("content-type", "text/event-stream"), ("mcp-session-id", "s-1")],
                        body,
                    )
                        .into_response()
                }
            })
            .delete(move |headers: HeaderMap| {
                let seen = seen.clone();
                async move {
                    let sid = headers
                        .get("mcp-session-id")
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push(format!("DELETE {sid}"));
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/mcp").parse().unwrap()
    }

    #[tokio::test]
    async fn a_handshake_era_server_is_asked_initialize_and_its_session_ended() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let url = handshake_only(seen.clone()).await;
        let client = crate::gateway::http_client().unwrap();
        let headers = vec![("Authorization".to_string(), "Bearer t".to_string())];
        let a = http(&client, &url, &headers, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            a.to_string(),
            "initialize answers protocol 2025-06-18 (old-server 0.9)"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                "POST server/discover Bearer t",
                "POST initialize Bearer t",
                "DELETE s-1"
            ]
        );
    }

    #[test]
    fn answers_that_are_not_mcp_are_named() {
        let e = answer_of(
            "initialize",
            &json!({"jsonrpc": "2.0", "id": 1, "result": {}}),
        )
        .unwrap_err();
        assert!(e.contains("without a protocol version"), "{e}");
        let e = answer_of(
            "server/discover",
            &json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32601, "message": "Method not found"}}),
        )
        .unwrap_err();
        assert!(e.contains("-32601"), "{e}");
    }
}
