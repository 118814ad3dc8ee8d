//! Bad inputs (reference/security.md §3.7; issue 5, part 8.3): each is refused with the right
//! HTTP status and JSON-RPC error, leaves an audit row (unless the HTTP layer refuses it before
//! any route runs, noted per case), makes ZERO upstream requests (the sample upstream counts
//! every HTTP request it receives, not only executions), and does not crash the gateway: it
//! still answers a valid call afterwards.
//!
//! The gateway runs in process with the static identity provider and the real SQLite audit
//! store (tests/peers/harness.rs). Every input is sent raw over TCP from a loopback source
//! address, so nothing a client library would normalise gets normalised.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

#[path = "peers/harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::{ALICE, BOB, CountingUpstream, Gateway, JSON_HEADERS, NOBODY, post, raw};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATH: &str = "/mcp/sample";
const LEGACY: (&str, &str) = ("MCP-Protocol-Version", "2025-11-25");
const MODERN: (&str, &str) = ("MCP-Protocol-Version", "2026-07-28");

/// An allowed call (alice may search): if a refusal leaked, the upstream would run it.
fn allowed_call() -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_repositories", "arguments": {"query": "x"}}}).to_string()
}

fn call_named(name: &str) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": {"query": "x"}}}).to_string()
}

/// An allowed call whose body is exactly `bytes` long (one long string argument).
fn sized_call(bytes: usize) -> String {
    let empty = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_repositories", "arguments": {"query": ""}}}).to_string();
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_repositories", "arguments": {"query": "x".repeat(bytes - empty.len())}}}).to_string()
}

/// An allowed call with 9 + `n` JSON values: the envelope's 8 and an array of `n` numbers.
fn values_call(n: usize) -> String {
    json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_repositories", "arguments": {"query": "x", "pages": vec![1; n]}}}).to_string()
}

/// What a case must produce.
struct Case {
    name: &'static str,
    from: &'static str,
    request: Vec<u8>,
    status: u16,
    /// The JSON-RPC error code, when the answer is a JSON-RPC error.
    code: Option<i64>,
    /// A decision row must exist (deny), with the response's `Toolgate-Decision-Id`.
    audited: bool,
}

fn case(name: &'static str, request: Vec<u8>, status: u16, code: i64) -> Case {
    Case {
        name,
        from: ALICE,
        request,
        status,
        code: Some(code),
        audited: true,
    }
}

/// A POST with the usual JSON headers plus `extra`.
fn json_post(addr: SocketAddr, extra: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut h: Vec<(&str, &str)> = JSON_HEADERS.to_vec();
    h.push(LEGACY);
    h.extend_from_slice(extra);
    post(addr, PATH, &h, body)
}

/// A 2026-07-28 POST: version header plus `extra` (Mcp-Method, Mcp-Name …).
fn modern_post(addr: SocketAddr, extra: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut h: Vec<(&str, &str)> = JSON_HEADERS.to_vec();
    h.push(MODERN);
    h.extend_from_slice(extra);
    post(addr, PATH, &h, body)
}

fn cases(addr: SocketAddr) -> Vec<Case> {
    let call = allowed_call();
    let b = call.as_bytes();
    let body = |s: &str| s.as_bytes().to_vec();
    let p = |extra: &[(&str, &str)], s: &str| json_post(addr, extra, s.as_bytes());
    let m = |extra: &[(&str, &str)], s: &str| modern_post(addr, extra, s.as_bytes());
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search_repositories","arguments":{{"query":{}1{}}}}}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let huge_id = format!(
        r#"{{"jsonrpc":"2.0","id":"{}","method":"tools/call","params":{{"name":"search_repositories","arguments":{{"query":"x"}}}}}}"#,
        "i".repeat(100_000)
    );
    let long_name = "a".repeat(129);
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"search_repositories","arguments":{{"query":"{}"}}}}}}"#,
        "x".repeat(5 * 1024 * 1024)
    );
    let mut invalid_utf8 = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","arguments":{"query":""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0x80]);
    invalid_utf8.extend_from_slice(br#""}}}"#);
    let mut bom = vec![0xef, 0xbb, 0xbf];
    bom.extend_from_slice(b);
    let ct = |v: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            ("Content-Type", v),
            ("Accept", "application/json, text/event-stream"),
            LEGACY,
        ]
    };
    let with_ct = |v: &'static str, body: &[u8]| post(addr, PATH, &ct(v), body);

    vec![
        // Media types and encodings (RPC-8).
        case("#1 Content-Type text/plain", with_ct("text/plain", b), 415, -32600),
        case(
            "#2 Content-Type application/x-www-form-urlencoded",
            with_ct("application/x-www-form-urlencoded", b"a=1"),
            415,
            -32600,
        ),
        case(
            "#2 Content-Type multipart/form-data",
            with_ct("multipart/form-data; boundary=x", b"--x\r\n\r\n--x--"),
            415,
            -32600,
        ),
        case(
            "#2 Content-Type text/event-stream",
            with_ct("text/event-stream", format!("data: {call}\n\n").as_bytes()),
            415,
            -32600,
        ),
        case(
            "no Content-Type at all",
            post(addr, PATH, &[("Accept", "application/json"), LEGACY], b),
            415,
            -32600,
        ),
        case(
            "#10 Content-Encoding: gzip",
            p(&[("Content-Encoding", "gzip")], &call),
            415,
            -32600,
        ),
        case(
            "Accept: text/html only",
            post(
                addr,
                PATH,
                &[("Content-Type", "application/json"), ("Accept", "text/html"), LEGACY],
                b,
            ),
            406,
            -32600,
        ),
        // DNS rebinding (I7): refused before any route runs.
        Case {
            name: "#3 Origin: https://evil.example (no route runs: no audit row)",
            from: ALICE,
            request: p(&[("Origin", "https://evil.example")], &call),
            status: 403,
            code: Some(-31001),
            audited: false,
        },
        Case {
            name: "#4 Host: evil.example (no route runs: no audit row)",
            from: ALICE,
            request: {
                let mut r = format!(
                    "POST {PATH} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                )
                .into_bytes();
                r.extend_from_slice(b);
                r
            },
            status: 403,
            code: Some(-31001),
            audited: false,
        },
        // Batches (RPC-1).
        case(
            "#20 batch [allowed, forbidden]",
            p(&[], &format!("[{call},{}]", call_named("delete_repository"))),
            400,
            -32600,
        ),
        case("#21 empty batch []", p(&[], "[]"), 400, -32600),
        case("nested batch [[call]]", p(&[], &format!("[[{call}]]")), 400, -32600),
        // Ambiguous JSON (RPC-2).
        case(
            "#22 duplicate \"method\"",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"search_repositories"}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "#23 duplicate params.name",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","name":"delete_repository"}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "#24 case-variant params name/NAME",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","NAME":"delete_repository"}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "case-variant envelope method/Method",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call"}"#,
            ),
            400,
            -32700,
        ),
        // Key smuggling (issue 13 item 1): keys a case-insensitive decoder (Go's encoding/json
        // folds ſ to s, K to k; Go 1.21+ also ı and İ to i) would take for another key, and
        // keys outside the envelope or the method's params.
        case(
            "paramſ beside params (a second call for Go)",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","arguments":{}},"paramſ":{"name":"delete_repository","arguments":{}}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "paramſ alone (an unknown envelope key)",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","paramſ":{"name":"delete_repository","arguments":{}}}"#,
            ),
            400,
            -32600,
        ),
        case(
            "an unknown envelope key beside a valid call",
            p(&[], &call.replacen('{', r#"{"extra":{"name":"delete_repository"},"#, 1)),
            400,
            -32600,
        ),
        case(
            "argumentſ beside arguments",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"create_issue","arguments":{"owner":"example"},"argumentſ":{"owner":"victim"}}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "argumentſ alone (a params key tools/call does not have)",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","argumentſ":{"query":"x"}}}"#,
            ),
            200,
            -32602,
        ),
        case(
            "an argument twin with the Kelvin sign",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","arguments":{"query":"x","kind":"a","\u212aind":"b"}}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "a resources/read uri twin with a dotless i",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"repo://public","urı":"file:///etc/shadow"}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "completion/complete with a params key no protocol revision defines",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"p"},"argument":{"name":"a","value":"b"},"arguments":{"name":"c"}}}"#,
            ),
            200,
            -32602,
        ),
        case(
            "an answer carrying METHOD and PARAMS",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":"s1","result":{},"METHOD":"tools/call","PARAMS":{"name":"delete_repository"}}"#,
            ),
            400,
            -32600,
        ),
        // Malformed bytes (RPC-7).
        case(
            "#41 invalid UTF-8",
            json_post(addr, &[], &invalid_utf8),
            400,
            -32700,
        ),
        case(
            "#40 lone surrogate \\ud800",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","arguments":{"query":"\ud800"}}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "#42 NaN literal",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","arguments":{"query":NaN}}}"#,
            ),
            400,
            -32700,
        ),
        case(
            "#43 trailing data after the object",
            p(&[], &format!("{call} {{}}")),
            400,
            -32700,
        ),
        case("#44 leading UTF-8 BOM", json_post(addr, &[], &bom), 400, -32700),
        case("#38 arguments nested 10,000 deep", p(&[], &deep), 400, -32700),
        case("malformed JSON", p(&[], r#"{"jsonrpc":"2.0","id":1,"#), 400, -32700),
        case("empty body", p(&[], ""), 400, -32700),
        case("a JSON string, not an object", p(&[], "\"tools/call\""), 400, -32600),
        // Size (HTTP-2).
        case("#9 body over the limit (5 MiB)", p(&[], &big), 413, -32600),
        case(
            "#8 Content-Length: 10485760 with a short body (413 before reading)",
            {
                let mut r = format!(
                    "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: 10485760\r\n\r\n"
                )
                .into_bytes();
                r.extend_from_slice(b);
                r
            },
            413,
            -32600,
        ),
        // Memory per request (issue 13 item 4): the default body limit is 1 MiB, and the
        // number of JSON values is bounded (their parsed form costs far more than their bytes).
        case("body of 1 MiB + 1 byte (the default limit)", p(&[], &sized_call(1024 * 1024 + 1)), 413, -32600),
        case(
            "#39 a 100,000-element array (over the 10,000 value limit)",
            p(&[], &values_call(100_000)),
            413,
            -32600,
        ),
        case(
            "10,001 JSON values (one over the limit)",
            p(&[], &values_call(10_001 - 9)),
            413,
            -32600,
        ),
        // Method variants (RPC-3): never forwarded; no policy allows them.
        case(
            "#25 method Tools/Call",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"search_repositories","arguments":{}}}"#,
            ),
            200,
            -31002,
        ),
        case(
            "#26 method \"tools/call \"",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call ","params":{"name":"search_repositories","arguments":{}}}"#,
            ),
            200,
            -31002,
        ),
        case(
            "#26 method \"tools/call\\u0000\"",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call\u0000","params":{"name":"search_repositories","arguments":{}}}"#,
            ),
            200,
            -31002,
        ),
        // Ids and envelope (RPC-5).
        case(
            "#27 tools/call without id (a notification)",
            p(
                &[],
                r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"search_repositories","arguments":{"query":"x"}}}"#,
            ),
            400,
            -32600,
        ),
        case(
            "#28 id null",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"search_repositories","arguments":{"query":"x"}}}"#,
            ),
            400,
            -32600,
        ),
        case(
            "#29 id object",
            p(&[], &call.replace("\"id\":1", "\"id\":{\"a\":1}")),
            400,
            -32600,
        ),
        case(
            "#29 id array",
            p(&[], &call.replace("\"id\":1", "\"id\":[1]")),
            400,
            -32600,
        ),
        case(
            "#29 id 1.5",
            p(&[], &call.replace("\"id\":1", "\"id\":1.5")),
            400,
            -32600,
        ),
        case(
            "#30 id 1e400",
            p(&[], &call.replace("\"id\":1", "\"id\":1e400")),
            400,
            -32700,
        ),
        case(
            "#30 id of 40 digits",
            p(
                &[],
                &call.replace("\"id\":1", "\"id\":1234567890123456789012345678901234567890"),
            ),
            400,
            -32600,
        ),
        case("huge string id (100 KB)", p(&[], &huge_id), 400, -32600),
        case(
            "#31 jsonrpc 1.0",
            p(&[], &call.replace("\"2.0\"", "\"1.0\"")),
            400,
            -32600,
        ),
        case(
            "#31 jsonrpc missing",
            p(&[], &call.replace("\"jsonrpc\":\"2.0\",", "")),
            400,
            -32600,
        ),
        case(
            "params a string",
            p(&[], r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"search_repositories"}"#),
            400,
            -32600,
        ),
        case(
            "params an array",
            p(&[], r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["search_repositories"]}"#),
            200,
            -32602,
        ),
        case(
            "arguments an array",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_repositories","arguments":["x"]}}"#,
            ),
            200,
            -32602,
        ),
        // Protocol version (RPC-10).
        case(
            "#19 MCP-Protocol-Version: 1999-01-01",
            post(
                addr,
                PATH,
                &[
                    JSON_HEADERS[0],
                    JSON_HEADERS[1],
                    ("MCP-Protocol-Version", "1999-01-01"),
                ],
                b,
            ),
            400,
            -32022,
        ),
        case(
            "MCP-Protocol-Version: latest (malformed)",
            post(
                addr,
                PATH,
                &[JSON_HEADERS[0], JSON_HEADERS[1], ("MCP-Protocol-Version", "latest")],
                b,
            ),
            400,
            -32022,
        ),
        // 2026-07-28 header/body checks (-32020).
        case(
            "Mcp-Method tools/list, body tools/call",
            m(&[("Mcp-Method", "tools/list"), ("Mcp-Name", "search_repositories")], &call),
            400,
            -32020,
        ),
        case(
            "Mcp-Name search_repositories, body delete_repository",
            m(
                &[("Mcp-Method", "tools/call"), ("Mcp-Name", "search_repositories")],
                &call_named("delete_repository"),
            ),
            400,
            -32020,
        ),
        case(
            "missing Mcp-Name on a modern tools/call",
            m(&[("Mcp-Method", "tools/call")], &call),
            400,
            -32020,
        ),
        case(
            "missing Mcp-Method on a modern request",
            m(&[("Mcp-Name", "search_repositories")], &call),
            400,
            -32020,
        ),
        case(
            "Mcp-Name on tools/list (the body names nothing)",
            m(
                &[("Mcp-Method", "tools/list"), ("Mcp-Name", "search_repositories")],
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            ),
            400,
            -32020,
        ),
        case(
            "Mcp-Name mismatch in the handshake era too",
            p(&[("Mcp-Name", "search_repositories")], &call_named("delete_repository")),
            400,
            -32020,
        ),
        // Tool names (RPC-4): hidden, exactly as an unknown tool.
        case(
            "#32 confusable name (Cyrillic е)",
            p(&[], &call_named("search_r\u{0435}positories")),
            200,
            -32602,
        ),
        case(
            "#33 fullwidth letters",
            p(&[], &call_named("\u{ff53}earch_repositories")),
            200,
            -32602,
        ),
        case(
            "#33 zero-width joiner",
            p(&[], &call_named("search\u{200d}_repositories")),
            200,
            -32602,
        ),
        case(
            "#33 trailing space",
            p(&[], &call_named("search_repositories ")),
            200,
            -32602,
        ),
        case(
            "#34 NUL inside the name",
            p(&[], &call_named("search_repositories\u{0}delete_repository")),
            200,
            -32602,
        ),
        case("#35 name of 129 characters", p(&[], &call_named(&long_name)), 200, -32602),
        case(
            "#37 a tool no policy names",
            p(&[], &call_named("launch_missiles")),
            200,
            -32602,
        ),
        case(
            "#49 resources/read file:///etc/shadow",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///etc/shadow"}}"#,
            ),
            200,
            -32602,
        ),
        case(
            "prompts/get without a rule",
            p(
                &[],
                r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"exfiltrate","arguments":{}}}"#,
            ),
            200,
            -32602,
        ),
        // Routing and identity.
        case(
            "unknown server name",
            post(addr, "/mcp/no-such-server", &[JSON_HEADERS[0], JSON_HEADERS[1], LEGACY], b),
            404,
            -32600,
        ),
        Case {
            name: "#61 unknown caller",
            from: NOBODY,
            request: p(&[], &call),
            status: 403,
            code: Some(-31001),
            audited: true,
        },
        Case {
            name: "#15 unknown caller claiming Tailscale-User-Login: alice",
            from: NOBODY,
            request: p(
                &[
                    ("Tailscale-User-Login", "alice@example.com"),
                    ("Tailscale-User-Name", "Alice"),
                ],
                &call,
            ),
            status: 403,
            code: Some(-31001),
            audited: true,
        },
        Case {
            name: "#14 unknown caller with X-Forwarded-For/X-Real-IP/Forwarded of alice",
            from: NOBODY,
            request: p(
                &[
                    ("X-Forwarded-For", "127.0.0.2"),
                    ("X-Real-IP", "127.0.0.2"),
                    ("Forwarded", "for=127.0.0.2"),
                ],
                &call,
            ),
            status: 403,
            code: Some(-31001),
            audited: true,
        },
        case(
            "#13 GET with a tools/call body and no session",
            {
                let mut r = format!(
                    "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                )
                .into_bytes();
                r.extend_from_slice(b);
                r
            },
            400,
            -32600,
        ),
        // HTTP framing (HTTP-1, HTTP-2): hyper refuses these before any route runs.
        Case {
            name: "#6 two different Content-Length values (HTTP layer: no audit row)",
            from: ALICE,
            request: {
                let mut r = format!(
                    "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\nContent-Length: 5\r\n\r\n",
                    b.len()
                )
                .into_bytes();
                r.extend_from_slice(b);
                r
            },
            status: 400,
            code: None,
            audited: false,
        },
        Case {
            name: "#7 Transfer-Encoding: gzip, not ending in chunked (HTTP layer: no audit row)",
            from: ALICE,
            request: {
                let mut r = format!(
                    "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip\r\n\r\n"
                )
                .into_bytes();
                r.extend_from_slice(b);
                r
            },
            status: 400,
            code: None,
            audited: false,
        },
        Case {
            name: "#12 64 KiB of headers (HTTP layer: no audit row)",
            from: ALICE,
            request: {
                let filler: String = (0..2000)
                    .map(|i| format!("X-Filler-{i}: {}\r\n", "y".repeat(24)))
                    .collect();
                let mut r = format!(
                    "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{filler}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                )
                .into_bytes();
                r.extend_from_slice(b);
                r
            },
            status: 431,
            code: None,
            audited: false,
        },
        // Body-only variants that must not confuse the parser into a second message.
        case(
            "two objects back to back",
            p(&[], &format!("{call}{call}")),
            400,
            -32700,
        ),
        Case {
            name: "#16 Tailscale-App-Capabilities injected by a known caller (ignored; hidden tool stays hidden)",
            from: BOB,
            request: p(
                &[(
                    "Tailscale-App-Capabilities",
                    r#"{"toolgate.dev/cap/toolgate":[{"roles":["developer"]}]}"#,
                )],
                &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "create_issue", "arguments": {"owner": "example"}}}).to_string(),
            ),
            status: 200,
            code: Some(-32602),
            audited: true,
        },
    ]
    .into_iter()
    .map(|mut c| {
        if c.request.is_empty() {
            c.request = body("");
        }
        c
    })
    .collect()
}

/// Is the request a POST whose body parses as one JSON-RPC message with `params.arguments`?
fn sent_arguments(request: &[u8]) -> bool {
    if !request.starts_with(b"POST ") {
        return false;
    }
    let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&request[at + 4..])
        .is_ok_and(|v| v["params"]["arguments"].is_object())
}

async fn check(gw: &Gateway, up: &CountingUpstream, c: &Case) -> Result<(), String> {
    let before = up.requests();
    let r = raw(c.from, gw.addr, &c.request, Duration::from_secs(15))
        .await
        .map_err(|e| format!("{}: {e}", c.name))?;
    let after = up.requests();
    let mut errs = Vec::new();
    if r.status != c.status {
        errs.push(format!(
            "status {} (want {}); body {}",
            r.status,
            c.status,
            String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
        ));
    }
    if let Some(code) = c.code {
        let v = r.json();
        if v["error"]["code"] != json!(code) {
            errs.push(format!(
                "JSON-RPC error code {} (want {code}); body {}",
                v["error"]["code"],
                String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
            ));
        }
        if v["jsonrpc"] != "2.0" || v.get("result").is_some() {
            let t = v.to_string();
            errs.push(format!("not a JSON-RPC error: {}", &t[..t.len().min(300)]));
        }
    }
    if after != before {
        errs.push(format!(
            "the upstream received {} request(s)",
            after - before
        ));
    }
    if c.audited {
        let id = r.decision();
        if id.is_empty() {
            errs.push("no Toolgate-Decision-Id".into());
        } else {
            match gw.row(&id).await {
                None => errs.push(format!("no audit row {id}")),
                Some(row) => {
                    if row.effect != "deny" {
                        errs.push(format!("audit row effect {} (want deny)", row.effect));
                    }
                    if row.outcome == "forwarded" || row.outcome == "pending" {
                        errs.push(format!("audit row outcome {}", row.outcome));
                    }
                    if row.ip != c.from {
                        errs.push(format!("audit row ip {} (want {})", row.ip, c.from));
                    }
                    if row.policy_hash.is_empty() {
                        errs.push("audit row has no policy hash".into());
                    }
                    // A parsed call's arguments are digested even when it is refused (a body
                    // the strict parser refused has no method and nothing to digest).
                    if !row.method.is_empty()
                        && sent_arguments(&c.request)
                        && row.args_digest.is_empty()
                    {
                        errs.push("audit row has no args digest for a call with arguments".into());
                    }
                }
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {}", c.name, errs.join("; ")))
    }
}

/// Sends `head` then trickles one byte every `gap`, never finishing the headers; returns how
/// long the server kept the connection open.
async fn slowloris(addr: SocketAddr, gap: Duration, give_up: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind("127.0.0.2:0".parse().unwrap())
        .map_err(|e| e.to_string())?;
    let mut s = sock.connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(format!("POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1024];
    loop {
        if started.elapsed() > give_up {
            return Err(format!("connection still open after {give_up:?}"));
        }
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Ok(started.elapsed()),
                Ok(_) => {
                    // A 408 is fine too; wait for the close.
                }
            },
            _ = tokio::time::sleep(gap) => {
                if s.write_all(b"a").await.is_err() {
                    return Ok(started.elapsed());
                }
            }
        }
    }
}

/// Sends complete headers promising 100 bytes, then 10 bytes, then stalls.
async fn slow_body(addr: SocketAddr, give_up: Duration) -> Result<(Duration, u16), String> {
    let started = Instant::now();
    let req = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: 100\r\n\r\n{{\"jsonrpc\""
    );
    let r = raw(ALICE, addr, req.as_bytes(), give_up).await?;
    Ok((started.elapsed(), r.status))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_audited_and_never_forwarded() {
    let up = CountingUpstream::start().await;
    let gw = Gateway::start(&[("sample", up.url())], "").await;
    let addr = gw.addr;

    // The slow attacks run alongside everything else: the gateway keeps serving meanwhile.
    let slow = tokio::spawn(async move {
        tokio::join!(
            slowloris(addr, Duration::from_millis(500), Duration::from_secs(20)),
            slow_body(addr, Duration::from_secs(20)),
        )
    });

    let all = cases(addr);
    assert!(all.len() >= 30, "only {} cases", all.len());
    let mut failures = Vec::new();
    for c in &all {
        if let Err(e) = check(&gw, &up, c).await {
            failures.push(e);
        }
    }

    // Sessions belong to the identity that opened them (#17): bob presents alice's session.
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let r = raw(
        ALICE,
        addr,
        &json_post(addr, &[], init.to_string().as_bytes()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let session = [("Mcp-Session-Id", sid.as_str())];
    let hijacks = [
        Case {
            name: "#17 another identity's Mcp-Session-Id on POST",
            from: BOB,
            request: json_post(addr, &session, allowed_call().as_bytes()),
            status: 403,
            code: Some(-31001),
            audited: true,
        },
        Case {
            name: "#17 another identity's Mcp-Session-Id on GET",
            from: BOB,
            request: format!(
                "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n\r\n"
            )
            .into_bytes(),
            status: 403,
            code: Some(-31001),
            audited: true,
        },
        Case {
            name: "#17 another identity's Mcp-Session-Id on DELETE",
            from: BOB,
            request: format!(
                "DELETE {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nMcp-Session-Id: {sid}\r\n\r\n"
            )
            .into_bytes(),
            status: 403,
            code: Some(-31001),
            audited: true,
        },
        Case {
            name: "a second initialize on a live session",
            from: ALICE,
            request: json_post(addr, &session, init.to_string().as_bytes()),
            status: 400,
            code: Some(-32600),
            audited: true,
        },
        Case {
            name: "an unknown Mcp-Session-Id on POST (never initialized here)",
            from: ALICE,
            request: json_post(
                addr,
                &[("Mcp-Session-Id", "made-up-session")],
                allowed_call().as_bytes(),
            ),
            status: 404,
            code: Some(-32600),
            audited: true,
        },
        Case {
            name: "an unknown Mcp-Session-Id on GET",
            from: BOB,
            request: format!(
                "GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/event-stream\r\nMcp-Session-Id: not-a-session\r\n\r\n"
            )
            .into_bytes(),
            status: 404,
            code: Some(-32600),
            audited: true,
        },
    ];
    for c in &hijacks {
        if let Err(e) = check(&gw, &up, c).await {
            failures.push(e);
        }
    }
    // Bob's DELETE did not end alice's session: she still uses it.
    let r = raw(
        ALICE,
        addr,
        &json_post(addr, &session, list.as_bytes()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["result"]["tools"].is_array(), "{:?}", r.json());

    let (lo, body) = tokio::time::timeout(Duration::from_secs(45), slow)
        .await
        .expect("slow attacks did not finish")
        .unwrap();
    match lo {
        // hyper's header timeout is 10 s (server::HEADER_TIMEOUT).
        Ok(d) => assert!(d <= Duration::from_secs(13), "slowloris held {d:?}"),
        Err(e) => failures.push(format!("#11 slowloris: {e}")),
    }
    match body {
        Ok((d, status)) => {
            if status != 408 || d > Duration::from_secs(13) {
                failures.push(format!(
                    "slow body: status {status} after {d:?} (want 408 within 13 s)"
                ));
            }
        }
        Err(e) => failures.push(format!("slow body: {e}")),
    }

    // Nothing ran upstream, and the gateway still answers a valid call, which runs once.
    if up.tool_calls() != 0 {
        failures.push(format!("the upstream executed {:?}", up.executed()));
    }
    let ran_before = up.tool_calls();
    let r = raw(
        ALICE,
        addr,
        &json_post(addr, &[], allowed_call().as_bytes()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["result"]["isError"], false, "{:?}", r.json());
    assert_eq!(up.tool_calls(), ran_before + 1);
    let row = gw.row(&r.decision()).await.unwrap();
    assert_eq!(
        (row.effect.as_str(), row.outcome.as_str()),
        ("allow", "forwarded")
    );
    // At the limits exactly: accepted and run.
    for (what, body) in [
        ("a body of exactly 1 MiB", sized_call(1024 * 1024)),
        ("exactly 10,000 JSON values", values_call(10_000 - 9)),
    ] {
        let r = raw(
            ALICE,
            addr,
            &json_post(addr, &[], body.as_bytes()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(
            r.status,
            200,
            "{what}: {}",
            String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
        );
        assert_eq!(r.json()["result"]["isError"], false, "{what}");
    }
    let health = harness::client_from(ALICE)
        .get(format!("{}/healthz", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);

    // The chain is intact after all of it.
    let report = toolgate::audit::query::Reader::open(&gw.db)
        .unwrap()
        .verify()
        .unwrap();
    assert!(report.broken.is_none(), "{report:?}");

    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were mishandled:\n  {}",
        failures.len(),
        all.len() + hijacks.len() + 2,
        failures.join("\n  ")
    );
    eprintln!(
        "bad inputs: {} cases + slowloris + slow body, all refused, 0 upstream calls",
        all.len() + hijacks.len()
    );
    gw.stop().await;
}

/// Every byte of every file the audit store wrote (the database, its WAL and shared memory).
fn audit_files_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Issue 13 item 7: a key in a `resources/read` URI's query string (the URI is the row's
/// `tool` and `action`, which are chained and can never be removed) and a completion's typed
/// value never reach the audit store's files in clear, in `digest` and in `redacted` mode;
/// each row still names the resource (scheme, host, path) and digests what was sent. Policy
/// saw the real URI: a rule on the exact URI still decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_uris_and_completions_never_reach_the_audit_files() {
    let up = CountingUpstream::start().await;
    for mode in ["digest", "redacted"] {
        let servers = format!("  sample: {{url: \"{}\", timeout: 20s}}\n", up.url());
        let gw = Gateway::start_with(
            &harness::repo_root().join("tests/peers/policies"),
            &servers,
            &format!("audit:\n  sqlite: audit.db\n  mode: sync\n  arguments: {mode}\n"),
        )
        .await;
        let addr = gw.addr;
        let key = format!("sk-live-{mode}4f9a8b7c6d5e4f3a2b1c0d");
        let typed = format!("hunter2-{mode}-typed-secret");
        let uri = format!("https://api.example.com/v1/report.pdf?api_key={key}&page=2");
        let read =
            json!({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": uri}});
        let complete = json!({"jsonrpc": "2.0", "id": 2, "method": "completion/complete", "params": {
            "ref": {"type": "ref/resource", "uri": uri},
            "argument": {"name": "password", "value": typed},
            "context": {"arguments": {"token": key}}}});
        let mut ids = Vec::new();
        for body in [read, complete] {
            let r = raw(
                ALICE,
                addr,
                &json_post(addr, &[LEGACY], body.to_string().as_bytes()),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            assert_eq!(
                r.status,
                200,
                "{mode}: {}",
                String::from_utf8_lossy(&r.body)
            );
            ids.push(r.decision());
        }
        let rows = gw.rows().await;
        let read_row = rows.iter().find(|r| r.id == ids[0]).unwrap();
        assert_eq!(read_row.method, "resources/read");
        assert!(
            read_row
                .tool
                .starts_with("https://api.example.com/v1/report.pdf?"),
            "{mode}: {}",
            read_row.tool
        );
        assert_eq!(
            read_row.action,
            format!("resources/read::{}", read_row.tool)
        );
        assert_eq!(
            read_row.args_digest,
            toolgate::audit::Redactor::digest(&json!({"uri": uri})),
            "{mode}: the digest covers the URI as sent"
        );
        let complete_row = rows.iter().find(|r| r.id == ids[1]).unwrap();
        assert_eq!(complete_row.method, "completion/complete");
        assert!(
            !complete_row.args_digest.is_empty(),
            "{mode}: completion arguments get a digest"
        );
        // The rows are committed (flushed above): grep the files' bytes.
        let files = audit_files_bytes(gw.dir.path());
        assert!(
            files.iter().any(|(n, _)| n == "audit.db"),
            "{mode}: no audit.db"
        );
        for (name, bytes) in &files {
            for secret in [key.as_str(), typed.as_str()] {
                assert!(
                    !contains(bytes, secret),
                    "{mode}: {name} holds the secret {secret:?} in clear"
                );
            }
        }
        // And the rows do say what was read.
        assert!(
            files
                .iter()
                .any(|(_, b)| contains(b, "api.example.com/v1/report.pdf"))
        );
        gw.stop().await;
    }
    assert_eq!(up.requests(), 0, "denied: nothing reached the upstream");
}

/// A connection from `from` that declares a body of `len` bytes, sends 10, and stalls: it
/// holds its share of the in-flight budget until the body timeout.
async fn stalled_body(from: &str, addr: SocketAddr, len: usize) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {len}\r\n\r\n{{\"jsonrpc\""
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Issue 13 item 4: the daemon-wide in-flight byte budget (`limits.in_flight_bytes`). Calls
/// whose bodies are still arriving hold it; the next call that does not fit is answered 503
/// with `Retry-After` and the gateway's overload code, before any policy decision, audited
/// (outcome `overloaded`) and counted, and nothing reaches the upstream. Once the budget
/// frees, the same call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_in_flight_budget_answers_503_and_forwards_nothing() {
    let up = CountingUpstream::start().await;
    let max_body = 64 * 1024;
    let max_nodes = 1000;
    let capacity = toolgate::budget::largest_call(max_body, max_nodes);
    let servers = format!(
        "  sample: {{url: \"{}\", timeout: 20s, max_body: {max_body}, max_nodes: {max_nodes}}}\n",
        up.url()
    );
    let gw = Gateway::start_with(
        &harness::repo_root().join("tests/peers/policies"),
        &servers,
        &format!(
            "audit:\n  sqlite: audit.db\n  mode: sync\nlimits:\n  in_flight_bytes: {capacity}\n"
        ),
    )
    .await;
    let addr = gw.addr;
    let budget = gw.gateway.budget.clone();
    assert_eq!(budget.capacity(), capacity);
    // Fill it with bodies that never finish, until less than one full body fits.
    let mut stalls = Vec::new();
    while budget.capacity() - budget.used() >= max_body {
        let before = budget.used();
        stalls.push(stalled_body(ALICE, addr, max_body).await);
        let deadline = Instant::now() + Duration::from_secs(5);
        while budget.used() == before {
            assert!(Instant::now() < deadline, "a stalled body reserved nothing");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(stalls.len() >= 2, "{} stalls", stalls.len());
    let call = sized_call(max_body);
    let r = raw(
        BOB,
        addr,
        &json_post(addr, &[], call.as_bytes()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], json!(-31005), "{:?}", r.json());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.in_flight_bytes"),
        "{:?}",
        r.json()
    );
    assert_eq!(up.requests(), 0, "nothing was forwarded");
    assert!(budget.refused() >= 1);
    let row = gw.row(&r.decision()).await.expect("the refusal is audited");
    assert_eq!(
        (row.effect.as_str(), row.outcome.as_str()),
        ("deny", "overloaded")
    );
    assert!(
        gw.gateway
            .prometheus()
            .contains("toolgate_in_flight_refusals_total 1"),
        "counted on /metrics"
    );
    // The stalled callers hang up: their shares come back, and the same call runs.
    drop(stalls);
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget.used() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} bytes still held",
            budget.used()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = raw(
        BOB,
        addr,
        &json_post(addr, &[], call.as_bytes()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_ne!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(budget.used(), 0, "an answered call gives its share back");
    gw.stop().await;
}
