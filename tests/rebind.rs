//! `listen: [tailnet:PORT]` binds exactly this node's tailnet IPs and re-binds when they change
//! (learned from the IPN bus). `toolgate serve` runs in a network namespace of its own whose
//! loopback carries the tailnet addresses; the fake LocalAPI (a unix socket, reachable across
//! namespaces) reports the node's IPs and announces a new netmap.
//!
//! Needs root and `ip netns` (CI runs as root); otherwise it prints SKIPPED, or fails when
//! `TOOLGATE_REQUIRE_PEERS=1`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::fake_localapi::{FakeLocalApi, default_status};

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Listening TCP sockets inside the namespace, as `ip:port` strings.
fn listening(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Hltn"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

fn wait_for(ns: &str, want: &str, gone: Option<&str>) {
    let t = Instant::now();
    loop {
        let l = listening(ns);
        if l.iter().any(|a| a == want) && gone.is_none_or(|g| !l.iter().any(|a| a == g)) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "want {want} (gone: {gone:?}); listening: {l:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tailnet_listeners_follow_the_nodes_addresses() {
    let ns = format!("tgrebind{}", std::process::id());
    if !ip(&["netns", "add", &ns]) {
        support::peers::missing(
            "tailnet_listeners_follow_the_nodes_addresses",
            "a network namespace (root and iproute2)",
            &format!(
                "`ip netns add {ns}` failed (running as root: {})",
                support::peers::is_root()
            ),
            "run as root; apt-get install iproute2",
        );
        return;
    }
    let _ns = Netns(ns.clone());
    assert!(ip(&["-n", &ns, "link", "set", "lo", "up"]));
    assert!(ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        "100.64.0.7/32",
        "dev",
        "lo"
    ]));
    assert!(ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        "100.64.0.8/32",
        "dev",
        "lo"
    ]));

    let fake = FakeLocalApi::start().await;
    let mut status = default_status();
    status["TailscaleIPs"] = json!(["100.64.0.7"]);
    fake.set_status(status.clone());

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    // serve refuses to start without policies; one copied from the repository will do.
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policies/toolgate_metrics.yaml"
        ),
        dir.path().join("policies/toolgate_metrics.yaml"),
    )
    .unwrap();
    let cfg = dir.path().join("toolgate.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: [tailnet:8443]\ntls: off\nidentity: {{socket: {}}}\npolicies: {{dir: policies}}\naudit: {{sqlite: audit.db}}\n",
            fake.socket_path().display()
        ),
    )
    .unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            env!("CARGO_BIN_EXE_toolgate"),
            "serve",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _serve = Kill(child);
    wait_for(&ns, "100.64.0.7:8443", None);

    // The node's address changes: a new netmap on the bus, a new status.
    status["TailscaleIPs"] = json!(["100.64.0.8"]);
    fake.set_status(status);
    let t = Instant::now();
    // Two watchers: the WhoIs cache and the listener re-binder.
    while fake.bus_watchers() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "toolgate never watched the IPN bus"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.push_notify(&json!({"NetMap": {}}));
    wait_for(&ns, "100.64.0.8:8443", Some("100.64.0.7:8443"));
}
