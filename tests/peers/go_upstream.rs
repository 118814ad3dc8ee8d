//! toolgate in front of a real case-insensitive decoder: tests/peers/go, an MCP server on Go's
//! standard library, whose `encoding/json` matches object keys to struct fields
//! case-insensitively with Unicode folding (`paramſ` fills `Params`, Kelvin sign `K` matches
//! `k`) and lets the last matching key win. It logs every call, prompt, read, completion,
//! notification and client answer it acts on, with what Go decoded.
//!
//! - Key smuggling (issue 13, item 1; invariant I4): each attack is first sent straight to a
//!   second instance of the peer, to show it is a real attack there (the Go server runs the
//!   smuggled tool or value); then through toolgate, where it must be refused with nothing
//!   executed. The allowed calls around them run exactly as authorized.
//! - A full audit store (issue 13, item 6; invariant I2): with the real SQLite store at its
//!   size cap, no message of any kind reaches the peer.
//!
//! Built by `scripts/peers-mcp go` (Debian `golang-go`, offline); without it the tests print a
//! SKIP line, or fail when `TOOLGATE_REQUIRE_PEERS=1`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::strategy::{Strategy, ValueTree};
use serde_json::{Value, json};
use sha2::Digest;

use super::harness::{
    ALICE, Gateway, JSON_HEADERS, Proc, free_port, post, raw, repo_root, wait_port,
};

/// The Go peer's binary, built from the current sources, or `None` after saying why not.
fn go_peer(test: &str) -> Option<PathBuf> {
    let bin = std::env::var_os("TOOLGATE_GO_PEER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("TOOLGATE_PEERS")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/toolgate-peers")
                });
            cache.join("go-mcp-peer/go-mcp-peer")
        });
    // The build stamp's first line is the sources' hash: a stale binary does not count.
    let src = repo_root().join("tests/peers/go");
    let mut h = sha2::Sha256::new();
    for f in ["go.mod", "main.go"] {
        h.update(std::fs::read(src.join(f)).unwrap());
    }
    let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let stamp = bin
        .parent()
        .map(|d| std::fs::read_to_string(d.join(".installed")).unwrap_or_default())
        .unwrap_or_default();
    let fresh = bin.exists() && stamp.lines().next() == Some(want.as_str());
    if fresh {
        return Some(bin);
    }
    let why = format!(
        "the Go MCP peer {} is missing or older than tests/peers/go; run scripts/peers-mcp go (needs Debian golang-go)",
        bin.display()
    );
    if std::env::var("TOOLGATE_REQUIRE_PEERS").as_deref() == Ok("1") {
        panic!("{test}: {why} (TOOLGATE_REQUIRE_PEERS=1)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIP {test}: {why}; set TOOLGATE_REQUIRE_PEERS=1 to fail instead"
    );
    None
}

/// One running Go peer and its execution log.
struct GoPeer {
    addr: SocketAddr,
    log: PathBuf,
    _proc: Proc,
}

impl GoPeer {
    async fn start(bin: &Path, dir: &Path, name: &str) -> GoPeer {
        let port = free_port();
        let log = dir.join(format!("{name}.jsonl"));
        let proc = Proc::spawn(
            name,
            std::process::Command::new(bin)
                .arg("-listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("-log")
                .arg(&log)
                .stdout(std::process::Stdio::null()),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_port(addr, Duration::from_secs(10)).await.unwrap();
        GoPeer {
            addr,
            log,
            _proc: proc,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    /// What it executed so far, one JSON object per action.
    fn executed(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Sends `body` straight to the peer (no gateway) and returns what it executed for it.
    async fn direct(&self, body: &str) -> Vec<Value> {
        let before = self.executed().len();
        let r = raw(
            ALICE,
            self.addr,
            &post(self.addr, "/mcp", &JSON_HEADERS, body.as_bytes()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(r.status < 300, "direct {body}: {}", r.status);
        self.executed().split_off(before)
    }
}

/// A handshake-era POST to the Go server through toolgate.
fn through(gw: &Gateway, body: &str) -> Vec<u8> {
    let mut h = JSON_HEADERS.to_vec();
    h.push(("MCP-Protocol-Version", "2025-11-25"));
    post(gw.addr, "/mcp/go", &h, body.as_bytes())
}

async fn send(gw: &Gateway, body: &str) -> (u16, Value, String) {
    let r = raw(ALICE, gw.addr, &through(gw, body), Duration::from_secs(10))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&r.body).to_string();
    // An SSE answer: the last event's data is the response.
    let v = if r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream"))
    {
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        json!(events)
    } else {
        r.json()
    };
    (r.status, v, r.decision())
}

fn call(id: u64, tool: &str, arguments: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}).to_string()
}

/// Attacks with a fixed shape: (what, body). Each smuggles a tool, an argument or a request
/// past a check that reads the first (or exact) key, to a decoder that reads the last folded one.
fn attacks() -> Vec<(&'static str, String)> {
    vec![
        (
            "a second params as paramſ (the issue's example)",
            r#"{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"name":"get_issue","arguments":{}},"paramſ":{"name":"delete_repository","arguments":{"owner":"victim","repo":"prod"}}}"#.into(),
        ),
        (
            "paramſ alone",
            r#"{"jsonrpc":"2.0","id":11,"method":"tools/call","paramſ":{"name":"delete_repository","arguments":{"owner":"victim","repo":"prod"}}}"#.into(),
        ),
        (
            "a second arguments as argumentſ",
            r#"{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{"name":"set_visibility","arguments":{"repo":"r","visibility":"private"},"argumentſ":{"repo":"r","visibility":"public"}}}"#.into(),
        ),
        (
            "an argument twin with a long s",
            r#"{"jsonrpc":"2.0","id":13,"method":"tools/call","params":{"name":"set_visibility","arguments":{"repo":"r","visibility":"private","viſibility":"public"}}}"#.into(),
        ),
        (
            "an argument twin with the Kelvin sign",
            r#"{"jsonrpc":"2.0","id":14,"method":"tools/call","params":{"name":"set_visibility","arguments":{"repo":"r","visibility":"private","keep_forks":false,"\u212aeep_forks":true}}}"#.into(),
        ),
        (
            "an argument twin with dotless i (Go 1.21+ folds it)",
            r#"{"jsonrpc":"2.0","id":15,"method":"tools/call","params":{"name":"set_visibility","arguments":{"repo":"r","visibility":"private","vısıbılıty":"public"}}}"#.into(),
        ),
        (
            "a tool name twin in upper case",
            r#"{"jsonrpc":"2.0","id":16,"method":"tools/call","params":{"name":"get_issue","NAME":"delete_repository"}}"#.into(),
        ),
        (
            "a second method in an envelope",
            r#"{"jsonrpc":"2.0","id":17,"method":"ping","METHOD":"tools/call","params":{"name":"delete_repository","arguments":{}}}"#.into(),
        ),
        (
            "a resource URI twin",
            r#"{"jsonrpc":"2.0","id":18,"method":"resources/read","params":{"uri":"repo://public/readme","URI":"repo://secret/keys"}}"#.into(),
        ),
        (
            "a prompt name twin",
            r#"{"jsonrpc":"2.0","id":19,"method":"prompts/get","params":{"name":"summary","Name":"exfiltrate"}}"#.into(),
        ),
        (
            "a completion argument twin",
            r#"{"jsonrpc":"2.0","id":20,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"summary"},"argument":{"name":"a","value":"x"},"ARGUMENT":{"name":"secret","value":"y"}}}"#.into(),
        ),
    ]
}

/// One spelling of `key` a case-insensitive decoder may take for it: each character becomes
/// itself, its other ASCII case, or a Unicode character that folds to it.
fn variant_of(key: &'static str) -> impl Strategy<Value = String> {
    let per_char: Vec<proptest::strategy::BoxedStrategy<char>> = key
        .chars()
        .map(|c| {
            let mut options = vec![c, c.to_ascii_uppercase()];
            match c {
                's' => options.push('\u{17f}'),
                'k' => options.push('\u{212a}'),
                'i' => options.extend(['\u{131}', '\u{130}']),
                _ => {}
            }
            proptest::sample::select(options).boxed()
        })
        .collect();
    per_char.prop_map(|cs| cs.into_iter().collect::<String>())
}

/// A generated attack: the smuggled key, its position, and the body.
fn generated_attack() -> impl Strategy<Value = (String, String)> {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    proptest::prop_oneof![
        variant_of("params").prop_map(move |v| (v.clone(), format!(
            r#"{{"jsonrpc":"2.0","id":30,"method":"tools/call","params":{{"name":"get_issue","arguments":{{}}}},{}:{{"name":"delete_repository","arguments":{{"repo":"prod"}}}}}}"#,
            q(&v)
        ))),
        variant_of("arguments").prop_map(move |v| (v.clone(), format!(
            r#"{{"jsonrpc":"2.0","id":31,"method":"tools/call","params":{{"name":"set_visibility","arguments":{{"visibility":"private"}},{}:{{"visibility":"public"}}}}}}"#,
            q(&v)
        ))),
        variant_of("name").prop_map(move |v| (v.clone(), format!(
            r#"{{"jsonrpc":"2.0","id":32,"method":"tools/call","params":{{"name":"get_issue",{}:"delete_repository"}}}}"#,
            q(&v)
        ))),
        variant_of("visibility").prop_map(move |v| (v.clone(), format!(
            r#"{{"jsonrpc":"2.0","id":33,"method":"tools/call","params":{{"name":"set_visibility","arguments":{{"visibility":"private",{}:"public"}}}}}}"#,
            q(&v)
        ))),
        variant_of("keep_forks").prop_map(move |v| (v.clone(), format!(
            r#"{{"jsonrpc":"2.0","id":34,"method":"tools/call","params":{{"name":"set_visibility","arguments":{{"visibility":"private","keep_forks":false,{}:true}}}}}}"#,
            q(&v)
        ))),
        variant_of("method").prop_map(move |v| (v.clone(), format!(
            r#"{{"jsonrpc":"2.0","id":35,"method":"ping",{}:"tools/call","params":{{"name":"delete_repository"}}}}"#,
            q(&v)
        ))),
    ]
}

/// The rune pairs the installed Go's `encoding/json` folds together all share a fold key in
/// toolgate, so no key Go would take for another passes as a different key.
pub async fn go_folds_are_covered() {
    let Some(bin) = go_peer("go_folds_are_covered") else {
        return;
    };
    let out = std::process::Command::new(&bin)
        .arg("-folds")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut pairs = 0;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(' ').collect();
        let ch = |h: &str| char::from_u32(u32::from_str_radix(h, 16).unwrap()).unwrap();
        let (a, b) = (ch(f[1]), ch(f[2]));
        assert_eq!(
            toolgate::mcp::jsonrpc::fold_key(&a.to_string()),
            toolgate::mcp::jsonrpc::fold_key(&b.to_string()),
            "Go's encoding/json takes U+{:04X} for U+{:04X} ({}), toolgate does not",
            a as u32,
            b as u32,
            f[0]
        );
        pairs += 1;
    }
    assert!(
        pairs > 2800,
        "only {pairs} fold pairs from {}",
        text.lines().next().unwrap_or("")
    );
    eprintln!(
        "go folds: {pairs} rune pairs ({}) all share toolgate's fold key",
        text.lines().next().unwrap_or("")
    );
}

/// Smuggled keys never execute on the case-insensitive Go upstream; allowed calls run exactly.
pub async fn smuggled_keys_never_execute() {
    let Some(bin) = go_peer("smuggled_keys_never_execute") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let behind = GoPeer::start(&bin, dir.path(), "behind-toolgate").await;
    let bare = GoPeer::start(&bin, dir.path(), "bare").await;
    let gw = Gateway::start_configured(
        &[(
            "go",
            format!(
                "{{url: \"{}\", timeout: 20s, resource_kind: go_mcp}}",
                behind.url()
            ),
        )],
        "",
    )
    .await;

    // Allowed calls run, with exactly the authorized arguments.
    let (s, v, _) = send(
        &gw,
        &call(
            1,
            "get_issue",
            json!({"owner": "o", "repo": "r", "number": 7}),
        ),
    )
    .await;
    assert_eq!(
        (s, v["result"]["isError"].clone()),
        (200, json!(false)),
        "{v}"
    );
    let (s, v, _) = send(
        &gw,
        &call(
            2,
            "set_visibility",
            json!({"repo": "r", "visibility": "private"}),
        ),
    )
    .await;
    assert_eq!(
        (s, v["result"]["isError"].clone()),
        (200, json!(false)),
        "{v}"
    );
    // Denied ones do not.
    let (_, v, _) = send(
        &gw,
        &call(
            3,
            "set_visibility",
            json!({"repo": "r", "visibility": "public"}),
        ),
    )
    .await;
    assert_eq!(v["result"]["isError"], true, "{v}");
    let (_, v, _) = send(
        &gw,
        &call(4, "delete_repository", json!({"owner": "o", "repo": "r"})),
    )
    .await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let expected_runs = vec![
        json!({"kind": "call", "tool": "get_issue", "arguments": {"owner": "o", "repo": "r", "number": 7}}),
        json!({"kind": "call", "tool": "set_visibility", "arguments": {"repo": "r", "visibility": "private", "keep_forks": false}}),
    ];
    assert_eq!(behind.executed(), expected_runs);

    let mut failures = Vec::new();
    let mut real_attacks = 0;
    let mut check = |what: &str,
                     body: &str,
                     direct: Vec<Value>,
                     s: u16,
                     v: &Value,
                     decision: &str,
                     ran: &[Value]| {
        // A real attack on the bare Go server: it ran something other than the checked call.
        if direct.iter().any(|e| {
            e["tool"] == "delete_repository"
                || e["arguments"]["visibility"] == "public"
                || e["arguments"]["keep_forks"] == true
                || e["uri"].as_str().is_some_and(|u| u.contains("secret"))
                || e["name"] == "exfiltrate"
                || e["argument"]["name"] == "secret"
        }) {
            real_attacks += 1;
        }
        let refused = v.get("error").is_some() && (s == 400 || s == 200);
        if !refused || !ran.is_empty() || decision.is_empty() {
            failures.push(format!(
                "{what}: status {s}, answer {v}, executed {ran:?}\n    body {body}"
            ));
        }
    };

    for (what, body) in attacks() {
        let direct = bare.direct(&body).await;
        let before = behind.executed().len();
        let (s, v, decision) = send(&gw, &body).await;
        let ran = behind.executed().split_off(before);
        check(what, &body, direct, s, &v, &decision, &ran);
    }

    // Generated variants (case, long s, Kelvin sign, dotless and dotted i), in every position.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = generated_attack();
    let mut generated = 0;
    while generated < 96 {
        let (variant, body) = strategy.new_tree(&mut runner).unwrap().current();
        if [
            "params",
            "arguments",
            "name",
            "visibility",
            "keep_forks",
            "method",
        ]
        .contains(&variant.as_str())
        {
            continue;
        }
        generated += 1;
        let direct = bare.direct(&body).await;
        let before = behind.executed().len();
        let (s, v, decision) = send(&gw, &body).await;
        let ran = behind.executed().split_off(before);
        check(
            &format!("generated variant {variant:?}"),
            &body,
            direct,
            s,
            &v,
            &decision,
            &ran,
        );
    }

    // An answer to a server request that carries a request of its own (METHOD/PARAMS): the
    // Go server would read it as a new tools/call.
    let (s, v, _) = send(&gw, &call(5, "ask_roots", json!({}))).await;
    assert_eq!(s, 200, "{v}");
    let asked = v
        .as_array()
        .and_then(|evs| evs.iter().find(|e| e["method"] == "roots/list"))
        .unwrap_or_else(|| panic!("no roots/list request delivered: {v}"))["id"]
        .clone();
    let smuggling_answer = json!({"jsonrpc": "2.0", "id": asked, "result": {"roots": []}, "METHOD": "tools/call", "PARAMS": {"name": "delete_repository", "arguments": {"owner": "victim"}}}).to_string();
    let direct = bare.direct(&smuggling_answer).await;
    assert!(
        direct.iter().any(|e| e["tool"] == "delete_repository"),
        "{direct:?}"
    );
    let before = behind.executed().len();
    let (s, v, decision) = send(&gw, &smuggling_answer).await;
    let ran = behind.executed().split_off(before);
    check(
        "an answer carrying METHOD/PARAMS",
        &smuggling_answer,
        direct,
        s,
        &v,
        &decision,
        &ran,
    );
    assert!(
        failures.is_empty(),
        "{} of {} attacks got through:\n  {}",
        failures.len(),
        attacks().len() + 96 + 1,
        failures.join("\n  ")
    );
    // The honest answer still goes through, once.
    let answer = json!({"jsonrpc": "2.0", "id": asked, "result": {"roots": []}}).to_string();
    let (s, _, _) = send(&gw, &answer).await;
    assert_eq!(s, 202);
    // Most attacks are real against Go (dotted/dotless i variants need Go 1.21+).
    let total = attacks().len() + 96 + 1;
    assert!(
        real_attacks * 2 > total,
        "only {real_attacks} of {total} attacks worked on the bare Go server"
    );
    let runs = behind.executed();
    assert_eq!(runs.len(), 4, "{runs:?}");
    assert_eq!(runs[..2], expected_runs[..]);
    assert_eq!(runs[2]["tool"], "ask_roots");
    assert_eq!(
        (runs[3]["kind"].clone(), runs[3]["id"].clone()),
        (json!("answer"), asked)
    );
    eprintln!(
        "smuggling: {total} attacks ({real_attacks} ran the smuggled call on the bare Go server), all refused by toolgate, 0 executed"
    );
    gw.stop().await;
}

/// I2 for every message (issue 13 item 6), against the real SQLite store: once it is full
/// (its size cap reached, as a full disk), a completion, a notification and an answer to a
/// server request all get 503 and none reaches the Go peer; when space comes back, the same
/// answer goes through.
pub async fn a_full_audit_store_forwards_nothing() {
    let Some(bin) = go_peer("a_full_audit_store_forwards_nothing") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let peer = GoPeer::start(&bin, dir.path(), "behind-toolgate").await;
    let gw = Gateway::start_configured(
        &[(
            "go",
            format!(
                "{{url: \"{}\", timeout: 20s, resource_kind: go_mcp}}",
                peer.url()
            ),
        )],
        "",
    )
    .await;
    // A server request delivered to alice, before the fault.
    let (s, v, _) = send(&gw, &call(1, "ask_roots", json!({}))).await;
    assert_eq!(s, 200, "{v}");
    let asked = v
        .as_array()
        .and_then(|evs| evs.iter().find(|e| e["method"] == "roots/list"))
        .unwrap_or_else(|| panic!("no roots/list request delivered: {v}"))["id"]
        .clone();
    assert_eq!(peer.executed().len(), 1);

    // Fill the store to its cap.
    gw.audit.set_max_db_bytes(Some(1)).unwrap();
    let mut filled = false;
    for i in 0..20_000 {
        let mut r =
            toolgate::audit::Record::new(toolgate::audit::Kind::Mcp, toolgate::audit::Effect::Deny);
        r.reason = format!("filler {i} {}", "x".repeat(400));
        if gw.audit.submit(r).unwrap().wait().await.is_err() {
            filled = true;
            break;
        }
    }
    assert!(filled, "the store never filled");
    // Schema v3 rows are compact: the last page may still hold a small row after a large one
    // failed. Fill that too, with the smallest row there is, so no row of the calls below fits.
    let mut filled = false;
    for _ in 0..20_000 {
        let r =
            toolgate::audit::Record::new(toolgate::audit::Kind::Mcp, toolgate::audit::Effect::Deny);
        if gw.audit.submit(r).unwrap().wait().await.is_err() {
            filled = true;
            break;
        }
    }
    assert!(filled, "the store never filled with small rows");

    let answer = json!({"jsonrpc": "2.0", "id": asked, "result": {"roots": []}}).to_string();
    let messages = [
        ("completion/complete", json!({"jsonrpc": "2.0", "id": 2, "method": "completion/complete", "params": {"ref": {"type": "ref/prompt", "name": "summary"}, "argument": {"name": "a", "value": "b"}}}).to_string()),
        ("a notification", json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string()),
        ("an answer to a server request", answer.clone()),
        ("tools/call", call(3, "get_issue", json!({"owner": "o"}))),
    ];
    for (what, body) in &messages {
        let (s, v, _) = send(&gw, body).await;
        assert_eq!(s, 503, "{what}: {v}");
        assert_eq!(v["error"]["code"], -31003, "{what}: {v}");
    }
    assert_eq!(peer.executed().len(), 1, "{:?}", peer.executed());

    // Space comes back: the answer (not used up by the failed attempt) goes through.
    gw.audit.set_max_db_bytes(None).unwrap();
    let mut delivered = false;
    for _ in 0..50 {
        let (s, _, _) = send(&gw, &answer).await;
        if s == 202 {
            delivered = true;
            break;
        }
        assert_eq!(s, 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        delivered,
        "the answer was not accepted after the store recovered"
    );
    let runs = peer.executed();
    assert_eq!(
        (runs.len(), runs[1]["kind"].clone()),
        (2, json!("answer")),
        "{runs:?}"
    );
    gw.stop().await;
}
