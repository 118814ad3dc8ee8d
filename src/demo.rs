//! `toolgate demo`: the real code path end to end on loopback, with no tailscaled and no
//! network. The gateway runs with the static identity provider (two people and a tagged CI
//! node on 127.0.0.2–4), the built-in sample MCP upstream, the shipped example policies
//! (embedded in the binary) and a fresh audit database; a scripted agent session per identity
//! prints each decision as it happens, then the audit table.
//!
//! The demo checks its own verdicts: each scripted call names what it expects (allowed,
//! hidden, argument deny), and the run fails (`toolgate demo` exits non-zero) when a decision,
//! the error's shape, the call's audit row, a caller's tool list, the unknown machine's
//! refusal, the upstream's execution count or the audit chain differs from the script.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::Config;
use crate::daemon;
use crate::sample;

/// The shipped example policies, embedded so the demo needs no files.
pub const POLICIES: &[(&str, &str)] = &[
    (
        "common_roles.yaml",
        include_str!("../policies/common_roles.yaml"),
    ),
    ("constants.yaml", include_str!("../policies/constants.yaml")),
    (
        "mcp_server.yaml",
        include_str!("../policies/mcp_server.yaml"),
    ),
    (
        "toolgate_audit.yaml",
        include_str!("../policies/toolgate_audit.yaml"),
    ),
    (
        "toolgate_metrics.yaml",
        include_str!("../policies/toolgate_metrics.yaml"),
    ),
    (
        "toolgate_policy.yaml",
        include_str!("../policies/toolgate_policy.yaml"),
    ),
    (
        "toolgate_policy_test.yaml",
        include_str!("../policies/toolgate_policy_test.yaml"),
    ),
    (
        "toolgate_metrics_test.yaml",
        include_str!("../policies/toolgate_metrics_test.yaml"),
    ),
    (
        "mcp_server_test.yaml",
        include_str!("../policies/mcp_server_test.yaml"),
    ),
    (
        "toolgate_audit_test.yaml",
        include_str!("../policies/toolgate_audit_test.yaml"),
    ),
    (
        "testdata/principals.yaml",
        include_str!("../policies/testdata/principals.yaml"),
    ),
    (
        "testdata/resources.yaml",
        include_str!("../policies/testdata/resources.yaml"),
    ),
];

pub const IDENTITIES: &str = r#"# Source IP → tailnet identity (what WhoIs would say), for the demo only.
"127.0.0.2":
  login: alice@example.com
  display_name: Alice
  node: alice-laptop.example.ts.net
  node_id: nALICE1
  tailnet: example.ts.net
  caps: [{roles: [developer]}]
"127.0.0.3":
  login: bob@example.com
  display_name: Bob
  node: bob-desktop.example.ts.net
  node_id: nBOB1
  tailnet: example.ts.net
"127.0.0.4":
  node: ci-runner.example.ts.net
  node_id: nCI1
  tailnet: example.ts.net
  tags: ["tag:ci"]
"#;

/// The identity `--keep-running` adds for a browser on this machine (127.0.0.1): an admin, so
/// the dashboard at `/` shows every row.
pub const VIEWER: &str = r#""127.0.0.1":
  login: you@example.com
  display_name: You (the dashboard's viewer)
  node: localhost.example.ts.net
  node_id: nVIEWER1
  tailnet: example.ts.net
  caps: [{roles: [admin]}]
"#;

/// Writes the demo's files into `dir`; returns the config path.
pub fn write_files(dir: &Path, port: u16, upstream: SocketAddr) -> Result<PathBuf, String> {
    let w = |rel: &str, body: &str| -> Result<(), String> {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&p, body).map_err(|e| format!("{}: {e}", p.display()))
    };
    for (name, body) in POLICIES.iter().copied() {
        w(&format!("policies/{name}"), body)?;
    }
    w("identities.yaml", IDENTITIES)?;
    let config = format!(
        "# toolgate demo config: loopback only, static identities, the built-in sample upstream.\n\
         listen: [\"127.0.0.1:{port}\"]\n\
         tls: off\n\
         identity:\n  provider: static\n  static: identities.yaml\n\
         policies:\n  dir: policies\n\
         servers:\n  github: {{url: \"http://{upstream}/mcp\"}}\n  files: {{url: \"http://{upstream}/mcp\"}}\n  shell: {{url: \"http://{upstream}/mcp\"}}\n\
         audit:\n  sqlite: audit.db\n  mode: sync\n  arguments: redacted\n"
    );
    w("toolgate.yaml", &config)?;
    Ok(dir.join("toolgate.yaml"))
}

struct Agent {
    who: &'static str,
    ip: &'static str,
    /// The principal its audit rows carry.
    principal: &'static str,
    /// What `tools/list` on the github server shows it.
    sees: &'static [&'static str],
    calls: Vec<(&'static str, &'static str, Value, &'static str)>,
}

/// What the script expects of one call, from the words its note starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Forwarded: a result without `isError`; the row is `allow` / `forwarded`.
    Allowed,
    /// Not visible to the caller: JSON-RPC error -32602 `Unknown tool: NAME`; `deny` / `denied`.
    Hidden,
    /// Visible but refused for its arguments: a result with `isError: true`; `deny` / `denied`.
    ArgumentDeny,
}

impl Expect {
    fn of(note: &str) -> Option<Expect> {
        if note.starts_with("allowed") {
            Some(Expect::Allowed)
        } else if note.starts_with("hidden") {
            Some(Expect::Hidden)
        } else if note.starts_with("argument deny") {
            Some(Expect::ArgumentDeny)
        } else {
            None
        }
    }
}

/// Compares one scripted call's answer and its audit row (`row`, found by the decision id the
/// answer carried) with what the script expects. Returns what differs (empty: as scripted).
fn check_call(
    expect: Expect,
    tool: &str,
    principal: &str,
    answer: (u16, &str, &Value),
    row: Option<&crate::audit::Row>,
) -> Vec<String> {
    let (status, id, v) = answer;
    let mut out = Vec::new();
    if status != 200 {
        out.push(format!("HTTP {status}, want 200"));
    }
    let error = v.get("error");
    let is_error = v["result"]["isError"] == json!(true);
    match expect {
        Expect::Allowed => {
            if error.is_some() || is_error || v.get("result").is_none() {
                out.push(format!("want a result without isError, got {v}"));
            }
        }
        Expect::Hidden => {
            let want = format!("Unknown tool: {tool}");
            if error.map(|e| (&e["code"], e["message"].as_str()))
                != Some((&json!(-32602), Some(want.as_str())))
            {
                out.push(format!("want JSON-RPC error -32602 {want:?}, got {v}"));
            }
        }
        Expect::ArgumentDeny => {
            if error.is_some() || !is_error {
                out.push(format!("want a result with isError: true, got {v}"));
            }
        }
    }
    let (effect, outcome) = match expect {
        Expect::Allowed => ("allow", "forwarded"),
        Expect::Hidden | Expect::ArgumentDeny => ("deny", "denied"),
    };
    match row {
        _ if id.is_empty() => out.push("no toolgate-decision-id header".to_string()),
        None => out.push(format!("no audit row for decision {id}")),
        Some(r) => {
            if (
                r.effect.as_str(),
                r.outcome.as_str(),
                r.tool.as_str(),
                r.principal.as_str(),
            ) != (effect, outcome, tool, principal)
            {
                out.push(format!(
                    "audit row {id}: {} / {} / {} / {}, want {effect} / {outcome} / {tool} / {principal}",
                    r.effect, r.outcome, r.tool, r.principal
                ));
            }
        }
    }
    out
}

fn script() -> Vec<Agent> {
    vec![
        Agent {
            who: "alice (developer)",
            ip: "127.0.0.2",
            principal: "alice@example.com",
            sees: &[
                "search_repositories",
                "get_issue",
                "create_issue",
                "read_file",
            ],
            calls: vec![
                (
                    "github",
                    "create_issue",
                    json!({"owner": "example", "repo": "toolgate", "title": "Demo issue"}),
                    "allowed: her organisation",
                ),
                (
                    "github",
                    "delete_repository",
                    json!({"owner": "example", "repo": "toolgate"}),
                    "hidden: admins only",
                ),
                (
                    "github",
                    "create_issue",
                    json!({"owner": "evil-corp", "repo": "x", "title": "Hi"}),
                    "argument deny: another organisation",
                ),
            ],
        },
        Agent {
            who: "bob (user)",
            ip: "127.0.0.3",
            principal: "bob@example.com",
            sees: &["search_repositories", "get_issue", "read_file"],
            calls: vec![
                (
                    "files",
                    "read_file",
                    json!({"path": "/srv/work/notes.md"}),
                    "allowed: inside the workspace",
                ),
                (
                    "github",
                    "create_issue",
                    json!({"owner": "example", "repo": "toolgate", "title": "x"}),
                    "hidden: developers only",
                ),
                (
                    "files",
                    "read_file",
                    json!({"path": "/srv/work/../../etc/shadow"}),
                    "argument deny: escapes the workspace",
                ),
            ],
        },
        Agent {
            who: "ci-runner (tag:ci)",
            ip: "127.0.0.4",
            principal: "ci-runner.example.ts.net",
            sees: &["search_repositories", "get_issue"],
            calls: vec![
                (
                    "github",
                    "search_repositories",
                    json!({"query": "toolgate"}),
                    "allowed: CI may read",
                ),
                (
                    "files",
                    "read_file",
                    json!({"path": "/srv/work/notes.md"}),
                    "hidden: people only",
                ),
                (
                    "github",
                    "get_issue",
                    json!({"owner": "example", "repo": "toolgate", "number": "not-a-number"}),
                    "allowed: reads need no argument check",
                ),
            ],
        },
    ]
}

async fn rpc(
    client: &reqwest::Client,
    base: &str,
    server: &str,
    body: Value,
) -> Result<(u16, String, Value), String> {
    let r = client
        .post(format!("{base}/mcp/{server}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get("toolgate-decision-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = r.text().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        id,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

fn verdict(v: &Value) -> String {
    if let Some(e) = v.get("error") {
        return format!("DENIED  {}", e["message"].as_str().unwrap_or(""));
    }
    let r = &v["result"];
    if r["isError"] == json!(true) {
        let text = r["content"][0]["text"].as_str().unwrap_or("");
        let reason = text.split("): ").nth(1).unwrap_or(text);
        return format!("DENIED  isError: {reason}");
    }
    "ALLOWED".to_string()
}

/// Options of `toolgate demo`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where to put the config, policies and audit database (default: a new temporary folder).
    pub dir: Option<PathBuf>,
    /// Leave the gateway running after the script.
    pub keep_running: bool,
    /// The gateway's loopback port (default: a free one).
    pub port: Option<u16>,
}

/// Runs the demo; returns the folder it used.
pub async fn run(opts: Options) -> Result<PathBuf, String> {
    let dir = match &opts.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("toolgate-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join("audit.db"));
    let counters = Arc::new(sample::Counters::default());
    let upstream = sample::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), counters.clone())
        .await
        .map_err(|e| format!("cannot start the sample MCP server: {e}"))?;
    let port = match opts.port {
        Some(p) => p,
        None => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.local_addr().map_err(|e| e.to_string())?.port()
        }
    };
    let config_path = write_files(&dir, port, upstream)?;
    if opts.keep_running {
        // A browser on this machine connects from 127.0.0.1: make it an admin viewer of the
        // dashboard (it sees every row), in the kept-running demo only.
        let ids = format!("{IDENTITIES}{VIEWER}");
        std::fs::write(dir.join("identities.yaml"), ids)
            .map_err(|e| format!("{}: {e}", dir.join("identities.yaml").display()))?;
    }
    let cfg = Config::load(&config_path).map_err(|e| e.to_string())?;
    let listen = daemon::resolve_listen(&cfg, &[])?;
    let identify = daemon::static_provider(&cfg, &listen)?;
    let db = cfg.audit.sqlite.clone();
    let built = daemon::build(cfg, identify, &daemon::NodeInfo::default(), listen, None)?;
    let audit = built.audit.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(daemon::run(built, stop_rx));
    let base = format!("http://127.0.0.1:{port}");
    println!(
        "toolgate demo: gateway on {base}, sample MCP server on {upstream}, files in {}\n",
        dir.display()
    );
    // Wait until the listener answers.
    for _ in 0..100 {
        if reqwest::get(format!("{base}/healthz")).await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // What differs from the script; checked once the audit rows are committed.
    let mut mismatches: Vec<String> = Vec::new();
    let mut answers = Vec::new();
    let mut allowed = 0u64;
    for agent in script() {
        let ip: IpAddr = agent.ip.parse().map_err(|_| "bad demo ip".to_string())?;
        let client = reqwest::Client::builder()
            .local_address(ip)
            .build()
            .map_err(|e| e.to_string())?;
        println!("── {} connects from {}", agent.who, agent.ip);
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "toolgate-demo", "version": "1"}}});
        let (s, _, _) = rpc(&client, &base, "github", init).await?;
        println!("   initialize                      → HTTP {s}");
        let (_, _, list) = rpc(
            &client,
            &base,
            "github",
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        )
        .await?;
        let names: Vec<&str> = list["result"]["tools"]
            .as_array()
            .map(|t| t.iter().filter_map(|x| x["name"].as_str()).collect())
            .unwrap_or_default();
        if names != agent.sees {
            mismatches.push(format!(
                "{}: tools/list shows {names:?}, the script expects {:?}",
                agent.who, agent.sees
            ));
        }
        println!(
            "   tools/list (github)             → sees {}",
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        );
        for (i, (server, tool, args, expect)) in agent.calls.iter().enumerate() {
            let body = json!({"jsonrpc": "2.0", "id": i + 2, "method": "tools/call", "params": {"name": tool, "arguments": args}});
            let (status, id, v) = rpc(&client, &base, server, body).await?;
            println!(
                "   {:<32} → {}   [{expect}; decision {id}]",
                format!("{server}: {tool}"),
                verdict(&v)
            );
            let want = Expect::of(expect)
                .ok_or_else(|| format!("the demo script's note {expect:?} names no expectation"))?;
            if want == Expect::Allowed {
                allowed += 1;
            }
            answers.push((agent.who, *tool, agent.principal, want, status, id, v));
        }
        println!();
    }
    println!("── an unknown machine (127.0.0.9, no identity)");
    let client = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 9]))
        .build()
        .map_err(|e| e.to_string())?;
    let (s, _, v) = rpc(
        &client,
        &base,
        "github",
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await?;
    println!(
        "   tools/list                      → HTTP {s} {}\n",
        v["error"]["message"].as_str().unwrap_or("")
    );
    if s != 403 {
        mismatches.push(format!(
            "the unknown machine's tools/list answered HTTP {s}, want 403"
        ));
    }
    audit.flush().await.map_err(|e| e.to_string())?;
    let executed = counters
        .tool_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    let rows = crate::audit::query::query(&db, &crate::audit::query::Filter::default())
        .map_err(|e| e.to_string())?;
    for (who, tool, principal, want, status, id, v) in &answers {
        let row = rows.iter().find(|r| &r.id == id);
        for m in check_call(*want, tool, principal, (*status, id, v), row) {
            mismatches.push(format!("{who}: {tool}: {m}"));
        }
    }
    if executed != allowed {
        mismatches.push(format!(
            "the sample upstream executed {executed} tool call(s), the script allows {allowed}"
        ));
    }
    let forwarded = rows
        .iter()
        .filter(|r| r.method == "tools/call" && r.outcome == "forwarded")
        .count() as u64;
    if forwarded != executed {
        mismatches.push(format!(
            "{forwarded} forwarded tools/call rows for {executed} upstream executions"
        ));
    }
    match crate::audit::query::Reader::open(&db).and_then(|r| r.verify()) {
        Ok(report) if report.broken.is_none() => {}
        Ok(report) => mismatches.push(format!("audit verify: chain broken: {:?}", report.broken)),
        Err(e) => mismatches.push(format!("audit verify: {e}")),
    }
    if mismatches.is_empty() {
        println!(
            "The sample upstream executed {executed} tool call(s); every one has a committed audit row,\n\
             and every decision, error and audit row is the one the script expects.\n"
        );
    }
    println!("Audit trail ({}):", db.display());
    print!(
        "{}",
        crate::audit::cli::table_text(&rows, crate::audit::cli::output_width())
    );
    println!(
        "\nQuery it again:\n  toolgate audit query --db {}\n  toolgate audit query --db {} --effect deny --format jsonl\n  toolgate audit verify --db {}",
        db.display(),
        db.display(),
        db.display()
    );
    if opts.keep_running {
        println!(
            "\nDashboard: {base}/ (open it in a browser on this machine: 127.0.0.1 is an admin viewer)\n\
             The gateway keeps running on {base} (Ctrl-C to stop). Point an MCP client at {base}/mcp/github\n\
             from 127.0.0.2 (alice), 127.0.0.3 (bob) or 127.0.0.4 (ci); other addresses have no identity. Example:\n  \
             curl --interface 127.0.0.2 -s {base}/mcp/github -H 'content-type: application/json' \\\n    \
             -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}}'"
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    audit.flush().await.map_err(|e| e.to_string())?;
    if !mismatches.is_empty() {
        for m in &mismatches {
            eprintln!("demo: NOT AS SCRIPTED: {m}");
        }
        return Err(format!(
            "{} result(s) differ from the script (see above)",
            mismatches.len()
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(effect: &str, outcome: &str, tool: &str) -> crate::audit::Row {
        crate::audit::Row {
            id: "d1".into(),
            effect: effect.into(),
            outcome: outcome.into(),
            tool: tool.into(),
            principal: "alice@example.com".into(),
            ..Default::default()
        }
    }

    fn check(expect: Expect, v: &Value, r: Option<&crate::audit::Row>) -> Vec<String> {
        check_call(
            expect,
            "create_issue",
            "alice@example.com",
            (200, "d1", v),
            r,
        )
    }

    #[test]
    fn every_note_in_the_script_names_an_expectation() {
        for agent in script() {
            for (_, _, _, note) in agent.calls {
                assert!(Expect::of(note).is_some(), "{note}");
            }
        }
    }

    #[test]
    fn a_call_as_scripted_passes() {
        let ok = json!({"result": {"content": []}});
        assert!(
            check(
                Expect::Allowed,
                &ok,
                Some(&row("allow", "forwarded", "create_issue"))
            )
            .is_empty()
        );
        let hidden = json!({"error": {"code": -32602, "message": "Unknown tool: create_issue"}});
        assert!(
            check(
                Expect::Hidden,
                &hidden,
                Some(&row("deny", "denied", "create_issue"))
            )
            .is_empty()
        );
        let arg = json!({"result": {"isError": true, "content": []}});
        assert!(
            check(
                Expect::ArgumentDeny,
                &arg,
                Some(&row("deny", "denied", "create_issue"))
            )
            .is_empty()
        );
    }

    #[test]
    fn a_wrong_decision_error_shape_or_audit_row_is_a_mismatch() {
        let denied = json!({"result": {"isError": true, "content": []}});
        let allowed_row = row("allow", "forwarded", "create_issue");
        // The decision differs.
        assert_eq!(check(Expect::Allowed, &denied, Some(&allowed_row)).len(), 1);
        // The error's shape differs: an isError result where -32602 is scripted, another code.
        let wrong_code =
            json!({"error": {"code": -32600, "message": "Unknown tool: create_issue"}});
        assert_eq!(
            check(
                Expect::Hidden,
                &denied,
                Some(&row("deny", "denied", "create_issue"))
            )
            .len(),
            1
        );
        assert_eq!(
            check(
                Expect::Hidden,
                &wrong_code,
                Some(&row("deny", "denied", "create_issue"))
            )
            .len(),
            1
        );
        // The audit row differs or is missing.
        let ok = json!({"result": {"content": []}});
        assert_eq!(
            check(
                Expect::Allowed,
                &ok,
                Some(&row("allow", "pending", "create_issue"))
            )
            .len(),
            1
        );
        assert_eq!(check(Expect::Allowed, &ok, None).len(), 1);
        assert_eq!(
            check_call(
                Expect::Allowed,
                "create_issue",
                "alice@example.com",
                (200, "", &ok),
                None
            )
            .len(),
            1
        );
        // The status differs.
        assert_eq!(
            check_call(
                Expect::Allowed,
                "create_issue",
                "alice@example.com",
                (502, "d1", &ok),
                Some(&allowed_row)
            )
            .len(),
            1
        );
    }
}
