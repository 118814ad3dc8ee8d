//! No stdio child or grandchild outlives toolgate: the real `toolgate serve` in a process of
//! its own, with stdio servers that leave two grandchildren each (one in their process group,
//! one in a session of its own), stopped by SIGTERM and by SIGKILL, in both containment modes
//! (process group + PR_SET_PDEATHSIG + subreaper; cgroup where this machine allows it, else
//! a loud SKIPPED line, or a failure under `TOOLGATE_REQUIRE_PEERS=1`).
//!
//! This test process makes itself a child subreaper, so the launchers orphaned by `kill -9`
//! are re-parented to it and reaped here (this machine's init does not reap): a process
//! "survives" only if it is still running, and the check reaps before it looks.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toolgate::stdio::procfs;

const IDENTITIES: &str = "\"127.0.0.2\": {login: alice@example.com, node: a.example.ts.net, node_id: nA, caps: [{roles: [developer]}]}\n";

/// toolgate in a process of its own; killed (by pid) if a test fails before it stops it.
struct Toolgate {
    child: std::process::Child,
    addr: SocketAddr,
    pids: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Toolgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(isolation: &str) -> Toolgate {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    std::fs::write(dir.path().join("ids.yaml"), IDENTITIES).unwrap();
    let port = free_port();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/stdio_fixture.py");
    let cfg = format!(
        "listen: [\"127.0.0.1:{port}\"]\ntls: off\nidentity: {{provider: static, static: ids.yaml}}\n\
         policies: {{dir: {}, watch: false}}\naudit: {{sqlite: audit.db}}\n\
         stdio: {{isolation: {isolation}, grace: 500ms}}\n\
         servers:\n  forks:\n    command: [python3, \"{}\", \"fork\", \"{}\"]\n",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/peers/stdio_policies")
            .display(),
        fixture.display(),
        pids.display()
    );
    std::fs::write(dir.path().join("toolgate.yaml"), cfg).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("toolgate.yaml"))
        .env("TOOLGATE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Toolgate {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        pids,
        _dir: dir,
    }
}

async fn wait_port(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "toolgate did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens `n` sessions (each a child of its own) and returns every pid below toolgate plus
/// the grandchildren the fixtures recorded.
async fn spawn_children(t: &Toolgate, n: usize) -> Vec<u32> {
    wait_port(t.addr).await;
    let _ = toolgate::gateway::http_client();
    let http = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    for _ in 0..n {
        let r = http
            .post(format!("http://{}/mcp/forks", t.addr))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let files = std::fs::read_dir(&t.pids).unwrap().count();
        if files == n {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fixtures did not write their pids"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut pids: Vec<u32> = procfs::descendants(t.child.id())
        .iter()
        .map(|s| s.pid)
        .collect();
    for f in std::fs::read_dir(&t.pids).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        pids.extend(text.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    pids.sort_unstable();
    pids.dedup();
    // n launchers, n servers, 2n grandchildren
    assert!(pids.len() >= 4 * n, "{pids:?}");
    pids
}

/// Reaps whatever was re-parented to us, then says which of `pids` still run.
fn survivors(pids: &[u32]) -> Vec<procfs::Stat> {
    // `wait`, not `waitpid(None)`: the latter is waitpid(0), our process group only.
    while let Ok(Some(_)) = rustix::process::wait(rustix::process::WaitOptions::NOHANG) {}
    pids.iter()
        .filter_map(|p| procfs::stat(*p))
        .filter(|s| !s.is_zombie())
        .collect()
}

async fn all_gone(pids: &[u32], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = survivors(pids);
        // Gone entirely: reaped by their launcher, or (orphaned launchers) by us. A zombie
        // whose parent is not us would stay, and fail here.
        let there: Vec<_> = pids.iter().filter_map(|p| procfs::stat(*p)).collect();
        if there.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still running: {left:?}; still there: {there:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn modes() -> Vec<&'static str> {
    let mut m = vec!["process_group"];
    match toolgate::stdio::cgroup::own_dir() {
        Some(d)
            if std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
                .is_ok() =>
        {
            m.push("cgroup")
        }
        // A missing capability, like a missing peer: loud, and a failure under
        // TOOLGATE_REQUIRE_PEERS=1 (CI runs as root, where the cgroup half runs).
        _ => support::peers::missing(
            "the cgroup half of the stdio kill tests",
            "cgroup delegation (a capability)",
            "this process may not create cgroups here",
            "run as root, or as a user with a delegated cgroup v2 subtree",
        ),
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_survives_kill_9_of_toolgate() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    for mode in modes() {
        let mut t = start(mode);
        let pids = spawn_children(&t, 2).await;
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(t.child.id() as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        t.child.wait().unwrap();
        all_gone(&pids, &format!("{mode}: after kill -9")).await;
        if mode == "cgroup" {
            // The children's cgroups went with them (the base is left for the next start to
            // remove: its toolgate is gone).
            let base = toolgate::stdio::cgroup::own_dir()
                .unwrap()
                .join(format!("toolgate-stdio.{}", t.child.id()));
            let populated = toolgate::stdio::cgroup::populated(&base);
            assert!(!populated, "{}", base.display());
            toolgate::stdio::cgroup::remove_tree(&base);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_survives_sigterm_of_toolgate() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    for mode in modes() {
        let mut t = start(mode);
        let pids = spawn_children(&t, 2).await;
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(t.child.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = t.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "toolgate did not exit on SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{mode}: {status:?}");
        // toolgate stopped and reaped them itself before it exited.
        let left: Vec<_> = pids.iter().filter_map(|p| procfs::stat(*p)).collect();
        assert!(left.is_empty(), "{mode}: left after SIGTERM: {left:?}");
        if mode == "cgroup" {
            let base = toolgate::stdio::cgroup::own_dir()
                .unwrap()
                .join(format!("toolgate-stdio.{}", t.child.id()));
            assert!(!base.exists(), "{mode}: {} is left", base.display());
        }
    }
}
