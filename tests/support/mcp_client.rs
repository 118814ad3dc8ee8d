//! One MCP JSON-RPC POST through the gateway, as the replay and shadow tests make it.

use serde_json::Value;

/// POSTs `body` to `{base}/mcp/{server}`, reads the answer to its end, and returns the
/// `toolgate-decision-id` header ("" when absent).
pub async fn rpc(client: &reqwest::Client, base: &str, server: &str, body: Value) -> String {
    let r = client
        .post(format!("{base}/mcp/{server}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let id = r
        .headers()
        .get("toolgate-decision-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = r.text().await.unwrap();
    id
}
