//! The real-tailnet test (reference/tailnet-lab.md): `scripts/tailnet-lab run` brings up rscale,
//! a private PostgreSQL and real tailscaled 1.96.4 nodes inside a fresh network namespace,
//! runs `toolgate serve` as its own sidecar node (joined with a tag:toolgate auth key through
//! the LocalAPI), makes MCP calls from an agent node (tag:ci) and an intruder node
//! (tag:intruder) by toolgate's tailnet name, and tears everything down by pid. This test
//! checks what it recorded.
//!
//! Env-gated: runs only with `TOOLGATE_TAILNET_LAB=1` (root and `ip netns` needed; `.ci/run`
//! sets it); otherwise prints SKIP. Limits of the control server: CapMap is always null (capability
//! grants stay covered by the fake-LocalAPI tests) and identities are synthetic (`<host>@local`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn read_json(dir: &Path, name: &str) -> Value {
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", p.display()))
}

#[test]
fn toolgate_as_its_own_node_on_a_real_tailnet() {
    if std::env::var("TOOLGATE_TAILNET_LAB").as_deref() != Ok("1") {
        // Straight to the process's stderr (libtest captures eprintln!): the skip must show.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED toolgate_as_its_own_node_on_a_real_tailnet: the real-tailnet lab is opt-in; set TOOLGATE_TAILNET_LAB=1 (root, ip netns; .ci/run sets it) to run it"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(root.join("scripts/tailnet-lab"))
        .arg("run")
        .arg(out.path())
        .env("TOOLGATE_BIN", env!("CARGO_BIN_EXE_toolgate"))
        .current_dir(root)
        .status()
        .unwrap();
    let dump = || {
        for f in ["toolgate.log", "timings.txt"] {
            if let Ok(t) = std::fs::read_to_string(out.path().join(f)) {
                eprintln!("--- {f}\n{t}");
            }
        }
    };
    if !status.success() {
        dump();
        panic!("scripts/tailnet-lab failed: {status}");
    }
    let tg = read_json(out.path(), "status-toolgate.json");
    let agent = read_json(out.path(), "status-agent.json");
    let intruder = read_json(out.path(), "status-intruder.json");
    // toolgate joined as its own tagged node.
    assert_eq!(tg["BackendState"], "Running");
    assert_eq!(tg["Self"]["DNSName"], "toolgate.lab.ts.net.");
    assert_eq!(tg["Self"]["Tags"], serde_json::json!(["tag:toolgate"]));
    assert_eq!(tg["TUN"], false, "sidecar runs in userspace mode");
    let agent_ip = agent["Self"]["TailscaleIPs"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let intruder_ip = intruder["Self"]["TailscaleIPs"][0]
        .as_str()
        .unwrap()
        .to_owned();

    // The allowed call reached the upstream (itself on the tailnet, through SOCKS5).
    let allowed = read_json(out.path(), "call-agent-allowed.json");
    assert_eq!(allowed["code"], 200, "{allowed}");
    assert_eq!(allowed["body"]["result"]["isError"], false, "{allowed}");
    assert_eq!(
        allowed["body"]["result"]["content"][0]["text"],
        "ran search_repositories"
    );
    // The intruder reaches toolgate (tailnet ACL) but policy hides and denies the tool.
    let denied = read_json(out.path(), "call-intruder-denied.json");
    assert_eq!(denied["code"], 200, "{denied}");
    assert!(denied["body"]["result"].is_null(), "{denied}");
    assert!(
        denied["body"]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("search_repositories"),
        "{denied}"
    );
    // Exactly one execution upstream: the allowed one.
    let executed = std::fs::read_to_string(out.path().join("upstream-calls.jsonl")).unwrap();
    assert_eq!(executed.lines().count(), 1, "{executed}");

    // The audit rows name the real nodes, with their tags and tailnet IPs (never 127.0.0.1).
    let audit = read_json(out.path(), "audit.json");
    let rows = audit.as_array().unwrap();
    let row = |node: &str| {
        rows.iter()
            .find(|r| r["node"] == node && r["method"] == "tools/call")
            .unwrap_or_else(|| panic!("no tools/call row for {node}: {audit}"))
    };
    let a = row("agent.lab.ts.net");
    assert_eq!(a["principal"], "agent.lab.ts.net");
    assert_eq!(a["tags"], serde_json::json!(["tag:ci"]));
    assert_eq!(a["ip"], agent_ip.as_str());
    assert_eq!(a["effect"], "allow");
    assert_eq!(a["outcome"], "forwarded");
    assert_eq!(a["tool"], "search_repositories");
    let i = row("intruder.lab.ts.net");
    assert_eq!(i["tags"], serde_json::json!(["tag:intruder"]));
    assert_eq!(i["ip"], intruder_ip.as_str());
    assert_eq!(i["effect"], "deny");
    for r in rows {
        assert_ne!(r["ip"], "127.0.0.1", "{r}");
    }
    // SIGTERM to toolgate stopped its tailscaled too.
    let after = std::fs::read_to_string(out.path().join("sidecar-after-stop.txt")).unwrap();
    assert_eq!(after.trim(), "stopped");
    let timings = std::fs::read_to_string(out.path().join("timings.txt")).unwrap();
    eprintln!("tailnet lab timings:\n{timings}");
}
