//! The load and fault suite (security.md §3, issue 7 part 5) and the proxy benchmark (issue 5
//! part 9). Not part of the product: `scripts/load-suite` and `scripts/bench-proxy` build it in
//! release and run it.
//!
//! ```text
//! loadtest suite [--ci] [--only L,K,W,U,D,P,H,O]   # every scenario, a results table, exit 1 on a miss
//! loadtest bench                                   # direct vs nginx vs toolgate, 64 agents
//! loadtest passthrough PORT UPSTREAM               # (bench child) a bare hyper+reqwest proxy
//! ```
//!
//! Environment: `TOOLGATE_BIN` (default target/release/toolgate), `NGINX_BIN` (bench),
//! `LOAD_SECONDS` (60; --ci 20), `KILL_CYCLES` (10; --ci 3), `OVERLOAD_SECONDS` (10; --ci 5),
//! `STORM_SECONDS` (20; --ci 8), `BENCH_SECONDS` (10), `BENCH_AUDIT` (extra audit keys), `BENCH_AGENTS` (64), `IDLE_CONNS` (1000),
//! `LOAD_KEEP=1` keeps the per-scenario folders.
//!
//! Everything runs on 127.0.0.0/8. Every child process (`toolgate serve`, nginx) is stopped by
//! its pid. Agents bind their own source address `127.0.1.K` so each has its own identity.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "load tool"
)]

#[allow(
    dead_code,
    unused_imports,
    reason = "shared with tests; the suite uses a part"
)]
#[path = "../tests/support/fake_localapi.rs"]
mod fake_localapi;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use toolgate::sample;

// ------------------------------------------------------------------------------------------
// Settings and results

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn toolgate_bin() -> PathBuf {
    std::env::var_os("TOOLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/toolgate"))
}

/// One line of the results table. `pass: None` is information only.
struct Check {
    scenario: &'static str,
    metric: String,
    value: String,
    target: String,
    pass: Option<bool>,
    kind: Kind,
}

/// What a check proves, which decides whether CI may retry it (issue 20.1).
///
/// A correctness check (lost or unaudited calls, a denied canary allowed, executions that are
/// not forwarded allow rows, a crash, a wrong answer) fails CI in any attempt. A timing check
/// (a p99, a rate, a recovery bound) measures a shared 2-core VM that also runs the load
/// generator, so `.ci/run` reruns the stages whose only misses are timing ones, once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Correctness,
    Timing,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Correctness => "correctness",
            Kind::Timing => "timing",
        }
    }
}

/// The verdict of a whole run (the process exit code is derived from it).
enum Verdict {
    Pass,
    /// Only timing checks missed, in these stages (their letters, for `--only`).
    TimingOnly(Vec<String>),
    Correctness,
}

#[derive(Default)]
struct Report(std::sync::Mutex<Vec<Check>>);

impl Report {
    fn add(
        &self,
        scenario: &'static str,
        metric: &str,
        value: String,
        target: &str,
        pass: Option<bool>,
    ) {
        self.add_kind(scenario, metric, value, target, pass, Kind::Correctness);
    }
    fn add_kind(
        &self,
        scenario: &'static str,
        metric: &str,
        value: String,
        target: &str,
        pass: Option<bool>,
        kind: Kind,
    ) {
        let mark = match pass {
            Some(true) => "ok  ",
            Some(false) => "MISS",
            None => "    ",
        };
        let k = if pass.is_some() { kind.label() } else { "info" };
        println!("  [{mark}] ({k}) {scenario} {metric}: {value}  (target {target})");
        self.0.lock().unwrap().push(Check {
            scenario,
            metric: metric.to_string(),
            value,
            target: target.to_string(),
            pass,
            kind,
        });
    }
    /// A correctness check: never retried.
    fn check(&self, scenario: &'static str, metric: &str, value: String, target: &str, pass: bool) {
        self.add_kind(
            scenario,
            metric,
            value,
            target,
            Some(pass),
            Kind::Correctness,
        );
    }
    /// A timing figure (latency, rate, recovery time) that CI may retry once.
    fn timing(
        &self,
        scenario: &'static str,
        metric: &str,
        value: String,
        target: &str,
        pass: bool,
    ) {
        self.add_kind(scenario, metric, value, target, Some(pass), Kind::Timing);
    }
    fn info(&self, scenario: &'static str, metric: &str, value: String) {
        self.add(scenario, metric, value, "-", None);
    }
    fn print_table(&self) -> Verdict {
        let rows = self.0.lock().unwrap();
        println!(
            "\n| stage | metric | value | target | kind | result |\n|---|---|---|---|---|---|"
        );
        let (mut correctness, mut timing) = (false, Vec::<String>::new());
        for c in rows.iter() {
            let r = match c.pass {
                Some(true) => "pass",
                Some(false) => {
                    match c.kind {
                        Kind::Correctness => correctness = true,
                        Kind::Timing => {
                            let stage = c.scenario.chars().take(1).collect::<String>();
                            if !timing.contains(&stage) {
                                timing.push(stage);
                            }
                        }
                    }
                    "**MISS**"
                }
                None => "info",
            };
            let kind = if c.pass.is_some() {
                c.kind.label()
            } else {
                "-"
            };
            println!(
                "| {} | {} | {} | {} | {kind} | {r} |",
                c.scenario, c.metric, c.value, c.target
            );
        }
        if correctness {
            Verdict::Correctness
        } else if timing.is_empty() {
            Verdict::Pass
        } else {
            Verdict::TimingOnly(timing)
        }
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

// ------------------------------------------------------------------------------------------
// Files, processes

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn agent_ip(i: usize) -> IpAddr {
    // 127.0.1.1 ..= 127.0.1.250, then wraps (identities exist for all of them).
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, (1 + (i % 250)) as u8))
}

fn identities() -> String {
    let mut s = String::from("# 250 load agents (developers) on 127.0.1.1-250\n");
    for k in 1..=250 {
        s.push_str(&format!(
            "\"127.0.1.{k}\": {{login: agent{k}@example.com, display_name: Agent {k}, node: agent{k}.example.ts.net, node_id: nAGENT{k}, tailnet: example.ts.net, caps: [{{roles: [developer]}}]}}\n"
        ));
    }
    s
}

const ALLOW_ALL: &str = "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: mcp_server\n  version: default\n  rules:\n    - name: everything\n      actions: [\"*\"]\n      effect: EFFECT_ALLOW\n      roles: [\"*\"]\n";

/// A fresh scenario folder with identities and either the shipped policies or allow-all.
fn scenario_dir(name: &str, shipped: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("toolgate-load-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("identities.yaml"), identities()).unwrap();
    if shipped {
        for (rel, body) in toolgate::demo::POLICIES {
            let p = dir.join("policies").join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
    } else {
        std::fs::write(dir.join("policies/allow_all.yaml"), ALLOW_ALL).unwrap();
    }
    dir
}

fn cleanup(dir: &Path) {
    if std::env::var_os("LOAD_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

const STATIC_IDENTITY: &str = "identity:\n  provider: static\n  static: identities.yaml\n";

fn config(
    port: u16,
    servers: &[(&str, String, &str)],
    identity: &str,
    audit_extra: &str,
    extra: &str,
) -> String {
    let mut s = format!(
        "listen: [\"127.0.0.1:{port}\"]\ntls: off\nlog: {{level: warn, format: text}}\n{identity}policies:\n  dir: policies\n  watch: false\nservers:\n"
    );
    for (name, url, timeout) in servers {
        s.push_str(&format!(
            "  {name}: {{url: \"{url}\", timeout: {timeout}}}\n"
        ));
    }
    s.push_str(&format!(
        "audit:\n  sqlite: audit.db\n  mode: sync\n  arguments: full\n{audit_extra}{extra}"
    ));
    s
}

/// `toolgate serve` as a child process; killed by pid when dropped.
struct Serve {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Serve {
    fn start(dir: &Path, port: u16, cfg: &str) -> Serve {
        let path = dir.join("toolgate.yaml");
        std::fs::write(&path, cfg).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .unwrap();
        let child = Command::new(toolgate_bin())
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", toolgate_bin().display()));
        Serve {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
    /// Waits for `/readyz` (or `/healthz` when `ready_only` is false) to answer 200.
    async fn wait_ready(&mut self, within: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        let c = reqwest::Client::builder()
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        while t.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "toolgate exited: {st}; see {}/serve.log",
                    self.dir.display()
                ));
            }
            if let Ok(r) = c.get(format!("{}/readyz", self.base())).send().await {
                if r.status().is_success() {
                    return Ok(t.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!(
            "not ready within {within:?}; see {}/serve.log",
            self.dir.display()
        ))
    }
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }
    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL to this pid
        let _ = self.child.wait();
    }
    /// SIGTERM, then waits (SIGKILL after 25 s).
    fn stop(&mut self) -> bool {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return true;
        }
        self.signal("TERM");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(25) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        false
    }
    fn rss_mb(&self) -> f64 {
        rss_mb(self.pid())
    }
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            self.kill9();
        }
    }
}

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn start_upstream() -> (SocketAddr, Arc<sample::Counters>) {
    let counters = Arc::new(sample::Counters::default());
    let addr = sample::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), counters.clone())
        .await
        .unwrap();
    (addr, counters)
}

// ------------------------------------------------------------------------------------------
// Agents

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// 80% allowed calls, 15% denied, 5% tools/list.
    Standard,
    /// Allowed calls only.
    Allowed,
    /// Half canary-allowed, half canary-denied.
    Canary,
    /// `search_repositories` only (the benchmark).
    Bench,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allow,
    Deny,
    List,
}

fn request(mix: Mix, agent: usize, seq: u64, tag: &str) -> (&'static str, Value, Expect) {
    let nonce = format!("{tag}-a{agent}-{seq}");
    let call = |server: &'static str, tool: &str, args: Value| {
        (
            server,
            json!({"jsonrpc": "2.0", "id": seq, "method": "tools/call", "params": {"name": tool, "arguments": args}}),
        )
    };
    let allowed = |k: u64| match k % 3 {
        0 => call(
            "github",
            "create_issue",
            json!({"owner": "example", "repo": "toolgate", "title": "load", "nonce": nonce}),
        ),
        1 => call(
            "github",
            "search_repositories",
            json!({"query": "toolgate", "nonce": nonce}),
        ),
        _ => call(
            "files",
            "read_file",
            json!({"path": "/srv/work/notes.md", "nonce": nonce}),
        ),
    };
    let r = (seq
        .wrapping_mul(2_654_435_761)
        .wrapping_add(agent as u64 * 97))
        % 100;
    match mix {
        Mix::Bench => {
            let (s, b) = call(
                "github",
                "search_repositories",
                json!({"query": "toolgate"}),
            );
            (s, b, Expect::Allow)
        }
        Mix::Allowed => {
            let (s, b) = allowed(seq);
            (s, b, Expect::Allow)
        }
        Mix::Canary => {
            if seq.is_multiple_of(2) {
                let (s, b) = call(
                    "github",
                    "create_issue",
                    json!({"owner": "example", "repo": "canary", "title": "c", "nonce": nonce}),
                );
                (s, b, Expect::Allow)
            } else {
                let (s, b) = call(
                    "github",
                    "delete_repository",
                    json!({"owner": "example", "repo": "canary", "nonce": nonce}),
                );
                (s, b, Expect::Deny)
            }
        }
        Mix::Standard => {
            if r < 80 {
                let (s, b) = allowed(seq);
                (s, b, Expect::Allow)
            } else if r < 95 {
                let (s, b) = if r.is_multiple_of(2) {
                    call(
                        "github",
                        "delete_repository",
                        json!({"owner": "example", "repo": "toolgate", "nonce": nonce}),
                    )
                } else {
                    call(
                        "github",
                        "create_issue",
                        json!({"owner": "evil-corp", "repo": "x", "title": "t", "nonce": nonce}),
                    )
                };
                (s, b, Expect::Deny)
            } else {
                (
                    "github",
                    json!({"jsonrpc": "2.0", "id": seq, "method": "tools/list"}),
                    Expect::List,
                )
            }
        }
    }
}

#[derive(Default)]
struct Stats {
    lat_us: Vec<u32>,
    lat_503_us: Vec<u32>,
    lat_ok_us: Vec<u32>,
    sent: u64,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    /// Answers that contradict the expected decision.
    wrong: u64,
    /// Canary-denied calls that were allowed (reload storm).
    denied_allowed: u64,
    /// Canary-allowed calls that were denied.
    allowed_denied: u64,
    /// Decision ids of every answer that carried one.
    ids: Vec<String>,
    /// Decision ids of allowed calls answered 200 with a result (acknowledged).
    acked: Vec<String>,
    retry_after_missing: u64,
    max_us: u32,
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.lat_us.extend(o.lat_us);
        self.lat_503_us.extend(o.lat_503_us);
        self.lat_ok_us.extend(o.lat_ok_us);
        self.sent += o.sent;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.transport_errors += o.transport_errors;
        self.wrong += o.wrong;
        self.denied_allowed += o.denied_allowed;
        self.allowed_denied += o.allowed_denied;
        self.ids.extend(o.ids);
        self.acked.extend(o.acked);
        self.retry_after_missing += o.retry_after_missing;
        self.max_us = self.max_us.max(o.max_us);
    }
    fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }
    fn sort(&mut self) {
        self.lat_us.sort_unstable();
        self.lat_503_us.sort_unstable();
        self.lat_ok_us.sort_unstable();
    }
    fn status_text(&self) -> String {
        let parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        format!(
            "{} (transport errors {})",
            parts.join(" "),
            self.transport_errors
        )
    }
}

fn client_for(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip)
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// What to call: the gateway (`/mcp/<server>`) or one fixed URL (direct, nginx).
#[derive(Clone)]
enum Target {
    Gateway(String),
    Fixed(String),
}

/// One closed-loop agent until `stop` (or `until`).
async fn agent(
    i: usize,
    target: Target,
    mix: Mix,
    tag: String,
    until: Instant,
    stop: Arc<AtomicBool>,
) -> Stats {
    let client = client_for(agent_ip(i));
    let mut st = Stats::default();
    let mut seq = 0u64;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        seq += 1;
        let (server, body, expect) = request(mix, i, seq, &tag);
        let url = match &target {
            Target::Gateway(base) => format!("{base}/mcp/{server}"),
            Target::Fixed(u) => u.clone(),
        };
        st.sent += 1;
        let t = Instant::now();
        let r = client
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25")
            .body(body.to_string())
            .send()
            .await;
        let r = match r {
            Ok(r) => r,
            Err(_) => {
                st.transport_errors += 1;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let status = r.status().as_u16();
        let id = r
            .headers()
            .get("toolgate-decision-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let retry_after = r.headers().contains_key("retry-after");
        let text = match r.text().await {
            Ok(t) => t,
            Err(_) => {
                st.transport_errors += 1;
                continue;
            }
        };
        let us = u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX);
        st.lat_us.push(us);
        st.max_us = st.max_us.max(us);
        *st.statuses.entry(status).or_default() += 1;
        if !id.is_empty() {
            st.ids.push(id.clone());
        }
        if status == 503 {
            st.lat_503_us.push(us);
            if !retry_after {
                st.retry_after_missing += 1;
            }
            continue;
        }
        if status != 200 {
            st.wrong += 1;
            continue;
        }
        st.lat_ok_us.push(us);
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let denied =
            v.get("error").is_some() || v.pointer("/result/isError") == Some(&Value::Bool(true));
        let allowed = !denied && v.get("result").is_some();
        match expect {
            Expect::Allow => {
                if allowed {
                    if !id.is_empty() {
                        st.acked.push(id);
                    }
                } else {
                    st.wrong += 1;
                    st.allowed_denied += 1;
                }
            }
            Expect::Deny => {
                if !denied {
                    st.wrong += 1;
                    st.denied_allowed += 1;
                }
            }
            Expect::List => {
                if v.pointer("/result/tools")
                    .and_then(Value::as_array)
                    .is_none()
                {
                    st.wrong += 1;
                }
            }
        }
    }
    st
}

async fn run_agents(
    n: usize,
    offset: usize,
    target: &Target,
    mix: Mix,
    tag: &str,
    dur: Duration,
    stop: Arc<AtomicBool>,
) -> Stats {
    let until = Instant::now() + dur;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        set.spawn(agent(
            offset + i,
            target.clone(),
            mix,
            tag.to_string(),
            until,
            stop.clone(),
        ));
    }
    let mut all = Stats::default();
    while let Some(r) = set.join_next().await {
        all.merge(r.unwrap());
    }
    all.sort();
    all
}

// ------------------------------------------------------------------------------------------
// Audit checks

struct DbView {
    decisions: usize,
    ids: HashSet<String>,
    /// nonce → outcome of allowed tools/call rows.
    allow_nonces: HashMap<String, String>,
    forwarded_calls: usize,
    unknown_calls: usize,
}

fn nonce_of(v: &Value) -> Option<String> {
    v.get("nonce").and_then(Value::as_str).map(str::to_string)
}

fn read_db(path: &Path) -> DbView {
    let rows =
        toolgate::audit::query::query(path, &toolgate::audit::query::Filter::default()).unwrap();
    let mut view = DbView {
        decisions: rows.len(),
        ids: HashSet::new(),
        allow_nonces: HashMap::new(),
        forwarded_calls: 0,
        unknown_calls: 0,
    };
    for r in rows {
        if r.method == "tools/call" && r.effect == "allow" {
            if r.outcome == "forwarded" {
                view.forwarded_calls += 1;
            }
            if r.outcome == "unknown" {
                view.unknown_calls += 1;
            }
            if let Some(n) = nonce_of(&r.arguments) {
                view.allow_nonces.insert(n, r.outcome.clone());
            }
        }
        view.ids.insert(r.id);
    }
    view
}

fn executed_nonces(c: &sample::Counters) -> Vec<String> {
    c.executed
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, a)| {
            serde_json::from_str::<Value>(a)
                .ok()
                .and_then(|v| nonce_of(&v))
        })
        .collect()
}

/// (executed calls without an allow row, forwarded rows the upstream never executed).
fn unaudited(view: &DbView, executed: &[String]) -> (usize, usize) {
    let ex: HashSet<&String> = executed.iter().collect();
    let without_row = executed
        .iter()
        .filter(|n| !view.allow_nonces.contains_key(*n))
        .count();
    let phantom = view
        .allow_nonces
        .iter()
        .filter(|(n, o)| o.as_str() == "forwarded" && !ex.contains(n))
        .count();
    (without_row, phantom)
}

fn integrity(path: &Path) -> String {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .unwrap_or_else(|e| e.to_string())
}

fn audit_verify(path: &Path) -> (bool, String) {
    let out = Command::new(toolgate_bin())
        .args(["audit", "verify", "--db"])
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        text.trim().lines().last().unwrap_or("").to_string(),
    )
}

// ------------------------------------------------------------------------------------------
// Raw HTTP (for inputs and timings no client library gives)

async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(dst).await
}

/// Writes `req`, reads to EOF; (status, head, body).
async fn raw(
    stream: &mut tokio::net::TcpStream,
    req: &[u8],
    within: Duration,
) -> Result<(u16, String, String), String> {
    let go = async {
        stream.write_all(req).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        stream
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(within, go)
        .await
        .map_err(|_| "timed out".to_string())??;
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> Result<(u16, String, String), String> {
    let text = String::from_utf8_lossy(buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {:?}", &head[..head.len().min(80)]))?;
    Ok((status, head.to_string(), body.to_string()))
}

fn post_bytes(port: u16, path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ------------------------------------------------------------------------------------------
// L: load

async fn stage_load(rep: &Report, secs: u64) {
    const S: &str = "L load";
    println!("\n== L: load, 50 agents, {secs} s (80% allowed / 15% denied / 5% lists)");
    let dir = scenario_dir("load", true);
    let (up, counters) = start_upstream().await;
    let port = free_port();
    let url = format!("http://{up}/mcp");
    let cfg = config(
        port,
        &[("github", url.clone(), "10s"), ("files", url, "10s")],
        STATIC_IDENTITY,
        "",
        "",
    );
    let mut gw = Serve::start(&dir, port, &cfg);
    if let Err(e) = gw.wait_ready(Duration::from_secs(20)).await {
        rep.check(S, "start", e, "ready", false);
        return;
    }
    let pid = gw.pid();
    let rss_samples = Arc::new(std::sync::Mutex::new(Vec::<(f64, f64)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let samples = rss_samples.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                samples
                    .lock()
                    .unwrap()
                    .push((t.elapsed().as_secs_f64(), rss_mb(pid)));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let fds_before = gw.fds();
    let t = Instant::now();
    let st = run_agents(
        50,
        0,
        &Target::Gateway(gw.base()),
        Mix::Standard,
        "L",
        Duration::from_secs(secs),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    let elapsed = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds_after = gw.fds();
    let graceful = gw.stop();
    let rate = st.answered() as f64 / elapsed;
    rep.timing(
        S,
        "decisions/s",
        format!("{rate:.0} ({} answers in {elapsed:.1} s)", st.answered()),
        ">= 2000",
        rate >= 2000.0,
    );
    let (p50, p99, max) = (
        pct(&st.lat_us, 50.0),
        pct(&st.lat_us, 99.0),
        f64::from(st.max_us) / 1000.0,
    );
    rep.add(
        S,
        "latency p50 (info: §3.3 wants <= 10 ms; closed loop, p50 ≈ 50 agents / rate)",
        format!("{p50:.2} ms"),
        "-",
        None,
    );
    rep.timing(
        S,
        "latency p99",
        format!("{p99:.2} ms"),
        "<= 50 ms",
        p99 <= 50.0,
    );
    rep.timing(
        S,
        "latency max",
        format!("{max:.1} ms"),
        "<= 1000 ms",
        max <= 1000.0,
    );
    let non2xx = st.answered() - st.statuses.get(&200).copied().unwrap_or(0);
    rep.check(
        S,
        "errors (non-2xx, transport, wrong decision)",
        format!(
            "{non2xx} / {} / {}  [{}]",
            st.transport_errors,
            st.wrong,
            st.status_text()
        ),
        "0 / 0 / 0",
        non2xx == 0 && st.transport_errors == 0 && st.wrong == 0,
    );
    let view = read_db(&dir.join("audit.db"));
    let lost = st.ids.iter().filter(|id| !view.ids.contains(*id)).count();
    rep.check(
        S,
        "lost (answered decision ids missing from the audit)",
        format!("{lost} of {}", st.ids.len()),
        "0",
        lost == 0,
    );
    rep.check(
        S,
        "audit rows vs answers",
        format!(
            "{} rows, {} answers with an id",
            view.decisions,
            st.ids.len()
        ),
        "equal",
        view.decisions == st.ids.len(),
    );
    let exec = executed_nonces(&counters);
    let (without, phantom) = unaudited(&view, &exec);
    let calls = counters.tool_calls.load(Ordering::SeqCst) as usize;
    rep.check(
        S,
        "unaudited (executed without allow row / forwarded rows != executions)",
        format!(
            "{without} / {} forwarded rows vs {calls} executions (phantom {phantom})",
            view.forwarded_calls
        ),
        "0 / equal",
        without == 0 && view.forwarded_calls == calls && phantom == 0,
    );
    let samples = rss_samples.lock().unwrap().clone();
    let peak = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    let third = samples
        .iter()
        // §3.3: growth between t=20 s and the end of a 60 s run; shorter runs: from the middle.
        .find(|s| s.0 >= (secs as f64 / 2.0).min(20.0))
        .map_or(0.0, |s| s.1);
    let last = samples.last().map_or(0.0, |s| s.1);
    let growth = if third > 0.0 {
        (last - third) / third * 100.0
    } else {
        0.0
    };
    rep.check(
        S,
        "RSS peak",
        format!("{peak:.1} MiB"),
        "<= 150 MiB",
        peak <= 150.0 && peak > 0.0,
    );
    rep.check(
        S,
        "RSS growth t=min(20 s, T/2) → end",
        format!("{third:.1} → {last:.1} MiB ({growth:+.1}%)"),
        "<= 10%",
        growth <= 10.0,
    );
    rep.check(
        S,
        "fds 2 s after load (upstream keep-alive pool may hold <= 50)",
        format!("{fds_before} before, {fds_after} after"),
        "baseline + 5 + 50",
        fds_after <= fds_before + 55,
    );
    rep.check(
        S,
        "graceful stop (SIGTERM)",
        format!("exit ok: {graceful}"),
        "exit 0",
        graceful,
    );
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------
// O: overload

async fn stage_overload(rep: &Report, secs: u64) {
    const S: &str = "O overload";
    println!("\n== O: overload, 250 agents, audit.queue 8, {secs} s");
    let dir = scenario_dir("overload", true);
    let (up, counters) = start_upstream().await;
    let port = free_port();
    let url = format!("http://{up}/mcp");
    let cfg = config(
        port,
        &[("github", url.clone(), "10s"), ("files", url, "10s")],
        STATIC_IDENTITY,
        "  queue: 8\n",
        "",
    );
    let mut gw = Serve::start(&dir, port, &cfg);
    if let Err(e) = gw.wait_ready(Duration::from_secs(20)).await {
        rep.check(S, "start", e, "ready", false);
        return;
    }
    let st = run_agents(
        250,
        0,
        &Target::Gateway(gw.base()),
        Mix::Allowed,
        "O",
        Duration::from_secs(secs),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    let alive = matches!(gw.child.try_wait(), Ok(None));
    let rss = gw.rss_mb();
    gw.stop();
    let n503 = st.lat_503_us.len();
    rep.info(S, "answers", st.status_text());
    rep.timing(
        S,
        "503 answered (audit queue full) p99 / max",
        format!(
            "{:.2} / {:.2} ms over {n503} answers",
            pct(&st.lat_503_us, 99.0),
            pct(&st.lat_503_us, 100.0)
        ),
        "p99 <= 50 ms, some 503",
        n503 > 0 && pct(&st.lat_503_us, 99.0) <= 50.0,
    );
    rep.check(
        S,
        "503 without Retry-After",
        st.retry_after_missing.to_string(),
        "0",
        st.retry_after_missing == 0,
    );
    rep.timing(
        S,
        "admitted p99",
        format!(
            "{:.2} ms over {} answers",
            pct(&st.lat_ok_us, 99.0),
            st.lat_ok_us.len()
        ),
        "<= 200 ms",
        pct(&st.lat_ok_us, 99.0) <= 200.0,
    );
    rep.check(
        S,
        "transport errors / wrong answers",
        format!("{} / {}", st.transport_errors, st.wrong),
        "0 / 0",
        st.transport_errors == 0 && st.wrong == 0,
    );
    let view = read_db(&dir.join("audit.db"));
    let exec = executed_nonces(&counters);
    let (without, phantom) = unaudited(&view, &exec);
    let lost = st.acked.iter().filter(|id| !view.ids.contains(*id)).count();
    rep.check(
        S,
        "unaudited / lost acked",
        format!(
            "{without} (phantom {phantom}) / {lost}; {} executions",
            exec.len()
        ),
        "0 / 0",
        without == 0 && phantom == 0 && lost == 0,
    );
    rep.check(
        S,
        "no crash, RSS",
        format!("alive {alive}, {rss:.1} MiB"),
        "alive",
        alive,
    );
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------
// K: kill -9 mid-load

async fn stage_kill(rep: &Report, cycles: u64) {
    const S: &str = "K kill -9";
    println!("\n== K: kill -9 mid-load, {cycles} cycles, 32 agents");
    let dir = scenario_dir("kill", true);
    let (up, counters) = start_upstream().await;
    let port = free_port();
    let url = format!("http://{up}/mcp");
    let cfg = config(
        port,
        &[("github", url.clone(), "10s"), ("files", url, "10s")],
        STATIC_IDENTITY,
        "",
        "",
    );
    let db = dir.join("audit.db");
    let mut acked: Vec<String> = Vec::new();
    let (mut worst_ready, mut integrity_bad, mut verify_bad, mut acked_total) =
        (Duration::ZERO, 0, 0, 0usize);
    let mut failures = Vec::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    for cycle in 0..cycles {
        let mut gw = Serve::start(&dir, port, &cfg);
        let ready = match gw.wait_ready(Duration::from_secs(20)).await {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("cycle {cycle}: {e}"));
                break;
            }
        };
        if cycle > 0 {
            worst_ready = worst_ready.max(ready);
        }
        let before_unknown = read_db(&db).unknown_calls;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = Duration::from_millis(500 + seed % 2000);
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn({
            let stop = stop.clone();
            let base = gw.base();
            async move {
                run_agents(
                    32,
                    0,
                    &Target::Gateway(base),
                    Mix::Allowed,
                    &format!("K{cycle}"),
                    Duration::from_secs(30),
                    stop,
                )
                .await
            }
        });
        tokio::time::sleep(at).await;
        gw.kill9();
        stop.store(true, Ordering::Relaxed);
        let st = load.await.unwrap();
        acked_total += st.acked.len();
        acked.extend(st.acked);
        let ic = integrity(&db);
        if ic != "ok" {
            integrity_bad += 1;
            failures.push(format!("cycle {cycle}: integrity_check {ic}"));
        }
        let (ok, line) = audit_verify(&db);
        if !ok {
            verify_bad += 1;
            failures.push(format!("cycle {cycle}: audit verify: {line}"));
        }
        println!(
            "   cycle {cycle}: killed at {at:?}, {} acknowledged, restart-to-ready {ready:?}",
            acked.len()
        );
        let _ = before_unknown;
    }
    // A last start marks the in-flight calls of the last kill `unknown`.
    let mut gw = Serve::start(&dir, port, &cfg);
    let last_ready = gw.wait_ready(Duration::from_secs(20)).await;
    if let Ok(d) = last_ready {
        worst_ready = worst_ready.max(d);
    }
    gw.stop();
    let view = read_db(&db);
    let lost = acked.iter().filter(|id| !view.ids.contains(*id)).count();
    let exec = executed_nonces(&counters);
    let (without, phantom) = unaudited(&view, &exec);
    rep.check(
        S,
        "acknowledged decisions missing from the DB",
        format!("{lost} of {acked_total}"),
        "0",
        lost == 0 && acked_total > 0,
    );
    rep.check(S, "upstream executions without an allow row", format!("{without} ({} executions, {} forwarded + {} unknown rows; phantom forwarded {phantom})", exec.len(), view.forwarded_calls, view.unknown_calls), "0", without == 0 && phantom == 0);
    let extra = view.forwarded_calls + view.unknown_calls
        - acked_total.min(view.forwarded_calls + view.unknown_calls);
    rep.check(
        S,
        "allow rows without acknowledgement (in flight at kill)",
        format!(
            "{extra} over {cycles} cycles ({} marked unknown)",
            view.unknown_calls
        ),
        "<= 32 per cycle",
        extra as u64 <= 32 * cycles,
    );
    rep.check(
        S,
        "integrity_check / audit verify failures",
        format!("{integrity_bad} / {verify_bad}"),
        "0 / 0",
        integrity_bad == 0 && verify_bad == 0 && integrity(&db) == "ok" && audit_verify(&db).0,
    );
    rep.timing(
        S,
        "restart to ready (worst)",
        format!("{worst_ready:?}"),
        "<= 1 s",
        worst_ready <= Duration::from_secs(1),
    );
    rep.check(
        S,
        "cycles completed",
        format!(
            "{}",
            cycles as usize
                - failures
                    .iter()
                    .filter(|f| f.contains("not ready") || f.contains("exited"))
                    .count()
        ),
        &cycles.to_string(),
        failures.is_empty(),
    );
    for f in failures {
        println!("   {f}");
    }
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------
// W: LocalAPI faults

async fn stage_localapi(rep: &Report) {
    use fake_localapi::{FakeLocalApi, Fault, user_whois};
    const S: &str = "W LocalAPI";
    println!("\n== W: LocalAPI faults (identity.provider tailscale against the fake tailscaled)");
    let fake = FakeLocalApi::start().await;
    let dir = scenario_dir("whois", false);
    let (up, counters) = start_upstream().await;
    let port = free_port();
    let identity = format!(
        "identity:\n  provider: tailscale\n  socket: {}\n  whois_timeout: 1s\n",
        fake.socket_path().display()
    );
    let cfg = config(
        port,
        &[("github", format!("http://{up}/mcp"), "10s")],
        &identity,
        "",
        "",
    );
    let mut gw = Serve::start(&dir, port, &cfg);
    if let Err(e) = gw.wait_ready(Duration::from_secs(20)).await {
        rep.check(S, "start", e, "ready", false);
        return;
    }
    let fake = Arc::new(fake);
    let src: IpAddr = "127.0.2.1".parse().unwrap();
    let addr = gw.addr();
    // One call on a new connection from a registered 127.0.2.1:port → (status, allowed, time).
    let call = {
        let fake = fake.clone();
        move || {
            let fake = fake.clone();
            async move {
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.bind(SocketAddr::new(src, 0)).unwrap();
                let local = sock.local_addr().unwrap();
                fake.add_identity(
                    &local.to_string(),
                    user_whois(
                        "100.64.0.5",
                        "agent",
                        "agent@example.com",
                        "Agent",
                        json!(null),
                    ),
                );
                let t = Instant::now();
                let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_repositories", "arguments": {"query": "w"}}}).to_string();
                let r = match sock.connect(addr).await {
                    Ok(mut s) => {
                        raw(
                            &mut s,
                            &post_bytes(port, "/mcp/github", &body),
                            Duration::from_secs(10),
                        )
                        .await
                    }
                    Err(e) => Err(e.to_string()),
                };
                fake.remove_identity(&local.to_string());
                let el = t.elapsed();
                match r {
                    Ok((status, _, body)) => (
                        status,
                        status == 200
                            && body.contains("\"result\"")
                            && !body.contains("\"isError\":true"),
                        el,
                    ),
                    Err(e) => {
                        println!("   transport: {e}");
                        (0, false, el)
                    }
                }
            }
        }
    };
    let (s, ok, _) = call().await;
    rep.check(
        S,
        "baseline call",
        format!("HTTP {s}, allowed {ok}"),
        "allowed",
        ok,
    );
    let faults: Vec<(&str, Option<Fault>)> = vec![
        ("slow 5 s", Some(Fault::Slow(Duration::from_secs(5)))),
        ("500", Some(Fault::internal())),
        ("garbage", Some(Fault::Garbage)),
        ("hang", Some(Fault::Hang)),
        ("socket gone", None),
    ];
    for (name, fault) in faults {
        match &fault {
            Some(f) => fake.set_fault("whois", f.clone()),
            None => fake.stop(),
        }
        let before = counters.tool_calls.load(Ordering::SeqCst);
        let mut statuses = BTreeMap::new();
        let (mut allowed, mut worst) = (0, Duration::ZERO);
        for _ in 0..4 {
            let (s, ok, el) = call().await;
            *statuses.entry(s).or_insert(0) += 1;
            allowed += usize::from(ok);
            worst = worst.max(el);
        }
        let ran = counters.tool_calls.load(Ordering::SeqCst) - before;
        match &fault {
            Some(_) => fake.clear_faults(),
            None => fake.restart(),
        }
        let t = Instant::now();
        let mut recovered = None;
        while t.elapsed() < Duration::from_secs(5) {
            if call().await.1 {
                recovered = Some(t.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let st: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}×{v}")).collect();
        rep.check(
            S,
            &format!("{name}: allowed / upstream calls during fault"),
            format!("{allowed} / {ran} (HTTP {})", st.join(" ")),
            "0 / 0",
            allowed == 0 && ran == 0,
        );
        rep.timing(
            S,
            &format!("{name}: deny latency (worst)"),
            format!("{worst:?}"),
            "<= 1.1 s (whois_timeout 1 s)",
            worst <= Duration::from_millis(1100),
        );
        rep.check(
            S,
            &format!("{name}: allows again after recovery (within 5 s)"),
            format!("{recovered:?}"),
            "yes",
            recovered.is_some(),
        );
        rep.timing(
            S,
            &format!("{name}: first allow after recovery"),
            format!("{recovered:?}"),
            "<= 1 s",
            recovered.is_some_and(|d| d <= Duration::from_secs(1)),
        );
    }
    let rss = gw.rss_mb();
    rep.info(S, "RSS after faults", format!("{rss:.1} MiB"));
    gw.stop();
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------
// U: upstream faults

async fn fault_upstream() -> SocketAddr {
    use axum::body::Body;
    use axum::extract::Path as AxPath;
    use axum::response::IntoResponse;
    async fn handle(
        AxPath(mode): AxPath<String>,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        let id = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("id").cloned())
            .unwrap_or(Value::Null);
        let ok = json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "ok"}], "isError": false}}).to_string();
        match mode.as_str() {
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                ([("content-type", "application/json")], ok).into_response()
            }
            "e500" => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
            "garbage" => (
                [("content-type", "application/json")],
                "{\"jsonrpc\": \"2.0\", garbage",
            )
                .into_response(),
            "sse" => {
                let s = futures_util::stream::unfold(0u64, |n| async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((
                        Ok::<_, std::io::Error>(bytes::Bytes::from(format!(
                            "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progress\":{n}}}}}\n\n"
                        ))),
                        n + 1,
                    ))
                });
                (
                    [("content-type", "text/event-stream")],
                    Body::from_stream(s),
                )
                    .into_response()
            }
            _ => ([("content-type", "application/json")], ok).into_response(),
        }
    }
    let app = axum::Router::new().route("/mcp/{mode}", axum::routing::post(handle));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    a
}

async fn stage_upstream(rep: &Report) {
    const S: &str = "U upstream";
    println!("\n== U: upstream faults (timeout 2 s), a healthy upstream under load meanwhile");
    let dir = scenario_dir("upstream", false);
    let (up, _counters) = start_upstream().await;
    let fu = fault_upstream().await;
    let down = free_port();
    let port = free_port();
    let servers = vec![
        ("healthy", format!("http://{up}/mcp"), "2s"),
        ("down", format!("http://127.0.0.1:{down}/mcp"), "2s"),
        ("slow", format!("http://{fu}/mcp/slow"), "2s"),
        ("e500", format!("http://{fu}/mcp/e500"), "2s"),
        ("garbage", format!("http://{fu}/mcp/garbage"), "2s"),
        ("sse", format!("http://{fu}/mcp/sse"), "2s"),
    ];
    let cfg = config(port, &servers, STATIC_IDENTITY, "", "");
    let mut gw = Serve::start(&dir, port, &cfg);
    if let Err(e) = gw.wait_ready(Duration::from_secs(20)).await {
        rep.check(S, "start", e, "ready", false);
        return;
    }
    // Healthy baseline: 8 agents for 2 s on `healthy`.
    let healthy = Target::Fixed(format!("{}/mcp/healthy", gw.base()));
    let base = run_agents(
        8,
        100,
        &healthy,
        Mix::Bench,
        "U",
        Duration::from_secs(2),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let bg = tokio::spawn({
        let stop = stop.clone();
        let healthy = healthy.clone();
        async move {
            run_agents(
                8,
                100,
                &healthy,
                Mix::Bench,
                "U",
                Duration::from_secs(120),
                stop,
            )
            .await
        }
    });
    let mut ids = Vec::new();
    for mode in ["down", "slow", "e500", "garbage", "sse"] {
        let (mut worst, mut errors, mut n) = (Duration::ZERO, 0, 0);
        let mut statuses = Vec::new();
        for k in 0..3 {
            let mut s = connect_from(agent_ip(k), gw.addr()).await.unwrap();
            let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "search_repositories", "arguments": {"query": "u"}}}).to_string();
            let t = Instant::now();
            let r = raw(
                &mut s,
                &post_bytes(port, &format!("/mcp/{mode}"), &body),
                Duration::from_secs(15),
            )
            .await;
            let el = t.elapsed();
            worst = worst.max(el);
            n += 1;
            match r {
                Ok((st, head, body)) => {
                    statuses.push(st);
                    if body.contains("\"error\"") {
                        errors += 1;
                    }
                    if let Some(l) = head
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("toolgate-decision-id:"))
                    {
                        ids.push((mode, l.split_once(':').unwrap().1.trim().to_string()));
                    }
                }
                Err(e) => {
                    statuses.push(0);
                    println!("   {mode}: {e}");
                }
            }
        }
        rep.check(
            S,
            &format!("{mode}: JSON-RPC error answers"),
            format!("{errors}/{n} (HTTP {statuses:?})"),
            "all",
            errors == n,
        );
        rep.timing(
            S,
            &format!("{mode}: worst error answer time"),
            format!("{worst:.2?}"),
            "<= 2.2 s",
            worst <= Duration::from_millis(2200),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let during = bg.await.unwrap();
    let alive = matches!(gw.child.try_wait(), Ok(None));
    let healthz = reqwest::get(format!("{}/healthz", gw.base()))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    gw.stop();
    let view = toolgate::audit::query::query(
        &dir.join("audit.db"),
        &toolgate::audit::query::Filter::default(),
    )
    .unwrap();
    let by_id: HashMap<&str, &str> = view
        .iter()
        .map(|r| (r.id.as_str(), r.outcome.as_str()))
        .collect();
    let bad: Vec<String> = ids
        .iter()
        .filter(|(_, id)| {
            !by_id
                .get(id.as_str())
                .is_some_and(|o| o.starts_with("upstream_error"))
        })
        .map(|(m, id)| format!("{m}:{}", by_id.get(id.as_str()).unwrap_or(&"missing")))
        .collect();
    rep.check(
        S,
        "audit outcome upstream_error for every fault call",
        format!(
            "{} of {} ({})",
            ids.len() - bad.len(),
            ids.len(),
            bad.join(", ")
        ),
        "all",
        bad.is_empty() && ids.len() == 15,
    );
    let (b99, d99) = (pct(&base.lat_us, 99.0), pct(&during.lat_us, 99.0));
    rep.timing(
        S,
        "healthy upstream p99 baseline → during faults",
        format!(
            "{b99:.2} → {d99:.2} ms ({} non-200)",
            during.answered() - during.statuses.get(&200).copied().unwrap_or(0)
        ),
        "<= 1.5× (or +5 ms)",
        d99 <= b99 * 1.5 || d99 <= b99 + 5.0,
    );
    rep.check(
        S,
        "gateway healthy after",
        format!("alive {alive}, /healthz {healthz}"),
        "alive, 200",
        alive && healthz == 200,
    );
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------
// D: disk full (max_page_count), in process so the cap can be lifted without a restart

async fn stage_disk(rep: &Report) {
    const S: &str = "D disk full";
    println!("\n== D: disk full via audit.max_db_bytes (SQLite max_page_count), in process");
    let dir = scenario_dir("disk", true);
    let (up, counters) = start_upstream().await;
    let port = free_port();
    let url = format!("http://{up}/mcp");
    let cfg = config(
        port,
        &[("github", url.clone(), "10s"), ("files", url, "10s")],
        STATIC_IDENTITY,
        "  max_db_bytes: 1048576\n",
        "",
    );
    std::fs::write(dir.join("toolgate.yaml"), &cfg).unwrap();
    let config = toolgate::config::Config::load(&dir.join("toolgate.yaml")).unwrap();
    let listen = toolgate::daemon::resolve_listen(&config, &[]).unwrap();
    let identify = toolgate::daemon::static_provider(&config, &listen).unwrap();
    let built = toolgate::daemon::build(
        config,
        identify,
        &toolgate::daemon::NodeInfo::default(),
        listen,
        None,
    )
    .unwrap();
    let audit = built.audit.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(toolgate::daemon::run(built, stop_rx));
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if reqwest::get(format!("{base}/healthz")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Fill: 16 agents until a 503 shows up (at most 60 s), then 2 s more.
    let stop = Arc::new(AtomicBool::new(false));
    let first_503: Arc<std::sync::Mutex<Option<(Instant, u64)>>> = Arc::default();
    let watcher = {
        let stop = stop.clone();
        let first = first_503.clone();
        let counters = counters.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let c = client_for(agent_ip(200));
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < Duration::from_secs(60) {
                n += 1;
                let body = json!({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {"name": "search_repositories", "arguments": {"query": "probe", "nonce": format!("probe-{n}")}}}).to_string();
                if let Ok(r) = c
                    .post(format!("{base}/mcp/github"))
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .body(body)
                    .send()
                    .await
                {
                    if r.status().as_u16() == 503 {
                        *first.lock().unwrap() =
                            Some((Instant::now(), counters.tool_calls.load(Ordering::SeqCst)));
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let st = run_agents(
        16,
        0,
        &Target::Gateway(base.clone()),
        Mix::Allowed,
        "D",
        Duration::from_secs(70),
        stop.clone(),
    )
    .await;
    let _ = watcher.await;
    let first = *first_503.lock().unwrap();
    let Some((t503, calls_at_503)) = first else {
        rep.check(
            S,
            "store became full",
            "no 503 within 60 s".into(),
            "503",
            false,
        );
        let _ = stop_tx.send(true);
        return;
    };
    // Settle 200 ms for calls already committed before the store filled, then nothing may run.
    let settle_calls = {
        let _ = t503;
        tokio::time::sleep(Duration::from_millis(200)).await;
        counters.tool_calls.load(Ordering::SeqCst)
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later_calls = counters.tool_calls.load(Ordering::SeqCst);
    let readyz = reqwest::get(format!("{base}/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    rep.info(S, "answers while filling", st.status_text());
    rep.timing(
        S,
        "503 latency p99 once full",
        format!(
            "{:.2} ms over {} answers",
            pct(&st.lat_503_us, 99.0),
            st.lat_503_us.len()
        ),
        "<= 100 ms",
        !st.lat_503_us.is_empty() && pct(&st.lat_503_us, 99.0) <= 100.0,
    );
    rep.check(
        S,
        "calls forwarded after full (+200 ms settle)",
        format!(
            "{} (at first 503: {calls_at_503}, +200 ms: {settle_calls}, +1.2 s: {later_calls})",
            later_calls - settle_calls
        ),
        "0",
        later_calls == settle_calls,
    );
    rep.check(
        S,
        "/readyz while full",
        format!("HTTP {readyz}"),
        "503",
        readyz == 503,
    );
    rep.check(
        S,
        "wrong answers / transport errors",
        format!("{} / {}", st.wrong, st.transport_errors),
        "0 / 0",
        st.wrong == 0 && st.transport_errors == 0,
    );
    // Lift the cap (the ballast is gone): the next allow within 5 s, no restart.
    audit.set_max_db_bytes(None).unwrap();
    let t = Instant::now();
    let c = client_for(agent_ip(201));
    let mut recovered = None;
    while t.elapsed() < Duration::from_secs(10) {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_repositories", "arguments": {"query": "after", "nonce": format!("after-{}", t.elapsed().as_micros())}}}).to_string();
        if let Ok(r) = c
            .post(format!("{base}/mcp/github"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body)
            .send()
            .await
        {
            if r.status().as_u16() == 200 {
                recovered = Some(t.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rep.check(
        S,
        "allows again after the cap is lifted (within 10 s, no restart)",
        format!("{recovered:?}"),
        "yes",
        recovered.is_some(),
    );
    rep.timing(
        S,
        "first allow after the cap is lifted",
        format!("{recovered:?}"),
        "<= 5 s, no restart",
        recovered.is_some_and(|d| d <= Duration::from_secs(5)),
    );
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
    let _ = audit.flush().await;
    let db = dir.join("audit.db");
    let view = read_db(&db);
    let lost = st.acked.iter().filter(|id| !view.ids.contains(*id)).count();
    let (without, phantom) = unaudited(&view, &executed_nonces(&counters));
    rep.check(
        S,
        "acknowledged missing / unaudited executions",
        format!(
            "{lost} of {} / {without} (phantom {phantom})",
            st.acked.len()
        ),
        "0 / 0",
        lost == 0 && without == 0,
    );
    rep.check(
        S,
        "integrity_check / audit verify",
        format!("{} / {}", integrity(&db), audit_verify(&db).1),
        "ok / exit 0",
        integrity(&db) == "ok" && audit_verify(&db).0,
    );
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------
// P: policy reload storm

async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The policy snapshot `/readyz` reports (the first 12 hex digits of the live set's hash).
async fn readyz_snapshot(base: &str) -> Option<String> {
    let text = reqwest::get(format!("{base}/readyz"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("policy_snapshot")?.as_str().map(str::to_string)
}

/// Polls the reload counters until the daemon has counted `want` reloads (ok + failed), or
/// `within` passes. More than `want` is an error too: a reload nobody asked for.
async fn wait_reloads(mport: u16, want: u64, within: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let ok = metric(mport, "toolgate_policy_reloads_total").await;
        let failed = metric(mport, "toolgate_policy_reload_failures_total").await;
        let got = ok.unwrap_or(0.0) + failed.unwrap_or(0.0);
        if got == want as f64 {
            return Ok(t.elapsed());
        }
        if got > want as f64 {
            return Err(format!("{got} reloads counted after {want} SIGHUPs"));
        }
        if t.elapsed() > within {
            return Err(format!(
                "{got} reloads counted {:.1} s after SIGHUP #{want}",
                t.elapsed().as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn stage_storm(rep: &Report, secs: u64) {
    const S: &str = "P reload storm";
    println!("\n== P: policy reload storm, {secs} s, SIGHUP after every write, 16 canary agents");
    let dir = scenario_dir("storm", true);
    let (up, _counters) = start_upstream().await;
    let port = free_port();
    let mport = free_port();
    let url = format!("http://{up}/mcp");
    let cfg = config(
        port,
        &[("github", url.clone(), "10s"), ("files", url, "10s")],
        STATIC_IDENTITY,
        "",
        &format!("metrics:\n  listen: \"127.0.0.1:{mport}\"\n"),
    );
    let mut gw = Serve::start(&dir, port, &cfg);
    if let Err(e) = gw.wait_ready(Duration::from_secs(20)).await {
        rep.check(S, "start", e, "ready", false);
        return;
    }
    let pol = dir.join("policies");
    let original = std::fs::read_to_string(pol.join("mcp_server.yaml")).unwrap();
    let broken: Vec<(&str, String)> = vec![
        ("syntax error", "apiVersion: api.cerbos.dev/v1\nresourcePolicy: [\n  resource: x\n".into()),
        ("unknown key", "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: other\n  version: default\n  bogusKey: 1\n  rules: []\n".into()),
        ("duplicate key", "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: other\n  resource: other2\n  version: default\n  rules: []\n".into()),
        ("billion laughs", "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n".into()),
        ("CEL compile error", "apiVersion: api.cerbos.dev/v1\nresourcePolicy:\n  resource: other\n  version: default\n  rules:\n    - actions: [x]\n      effect: EFFECT_ALLOW\n      roles: [user]\n      condition:\n        match:\n          expr: P.attr.((( ==\n".into()),
        ("half-written mcp_server.yaml", String::new()),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        let base = gw.base();
        async move {
            run_agents(
                16,
                0,
                &Target::Gateway(base),
                Mix::Canary,
                "P",
                Duration::from_secs(600),
                stop,
            )
            .await
        }
    });
    // SIGHUP is a level, not a queue: signals that arrive while the reload task is busy or not
    // yet scheduled are delivered as one (POSIX signals are not queued, and tokio's `recv`
    // reports "at least one since the last poll"), so one reload then picks up several
    // writes at once. That coalescing is by design; what must hold is that every reload the
    // daemon makes is counted and that the last write always goes live. So each step waits,
    // against a deadline, until the daemon has counted the reload for this write, and then
    // checks what is live on /readyz: a valid write's snapshot is new, a broken write's leaves
    // the last good one. The counters then equal the steps exactly, independent of timing.
    let base = gw.base();
    let mut live = readyz_snapshot(&base).await;
    let mut seen = 0u64; // reloads the daemon has counted (ok + failed)
    let mut lapses: Vec<String> = Vec::new();
    let mut slowest = Duration::ZERO; // SIGHUP to the reload counted
    let t = Instant::now();
    let (mut invalid, mut valid, mut k) = (0u64, 0u64, 0usize);
    let step = Duration::from_millis(75);
    let observe = Duration::from_secs(10);
    while t.elapsed() < Duration::from_secs(secs) && lapses.is_empty() {
        // valid
        let t_step = Instant::now();
        let _ = std::fs::remove_file(pol.join("zz_broken.yaml"));
        std::fs::write(
            pol.join("mcp_server.yaml"),
            format!("{original}\n# rev {k}\n"),
        )
        .unwrap();
        gw.signal("HUP");
        valid += 1;
        seen += 1;
        if let Err(e) = wait_reloads(mport, seen, observe)
            .await
            .map(|d| slowest = slowest.max(d))
        {
            lapses.push(format!("valid rev {k}: {e}"));
            break;
        }
        let now = readyz_snapshot(&base).await;
        if now.is_none() || now == live {
            lapses.push(format!(
                "valid rev {k}: snapshot {now:?} still the previous {live:?}"
            ));
        }
        live = now;
        tokio::time::sleep(step.saturating_sub(t_step.elapsed())).await;
        // broken
        let t_step = Instant::now();
        let (name, body) = &broken[k % broken.len()];
        if name.starts_with("half-written") {
            std::fs::write(pol.join("mcp_server.yaml"), &original[..original.len() / 2]).unwrap();
        } else {
            std::fs::write(pol.join("zz_broken.yaml"), body).unwrap();
        }
        gw.signal("HUP");
        invalid += 1;
        seen += 1;
        if let Err(e) = wait_reloads(mport, seen, observe)
            .await
            .map(|d| slowest = slowest.max(d))
        {
            lapses.push(format!("broken {name}: {e}"));
            break;
        }
        let now = readyz_snapshot(&base).await;
        if now != live {
            lapses.push(format!(
                "broken {name}: snapshot {now:?} replaced the last good {live:?}"
            ));
        }
        tokio::time::sleep(step.saturating_sub(t_step.elapsed())).await;
        k += 1;
    }
    let _ = std::fs::remove_file(pol.join("zz_broken.yaml"));
    std::fs::write(pol.join("mcp_server.yaml"), &original).unwrap();
    gw.signal("HUP");
    seen += 1;
    if let Err(e) = wait_reloads(mport, seen, observe)
        .await
        .map(|d| slowest = slowest.max(d))
    {
        lapses.push(format!("final restore: {e}"));
    } else {
        let now = readyz_snapshot(&base).await;
        if now.is_none() || now == live {
            lapses.push(format!("final restore: snapshot {now:?} still {live:?}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let st = load.await.unwrap();
    let failures = metric(mport, "toolgate_policy_reload_failures_total").await;
    let reloads = metric(mport, "toolgate_policy_reloads_total").await;
    let alive = matches!(gw.child.try_wait(), Ok(None));
    let rss = gw.rss_mb();
    gw.stop();
    rep.info(
        S,
        "reloads written",
        format!(
            "{} ({valid} valid, {invalid} invalid) in {:.1} s; {} canary calls; slowest SIGHUP to reload counted {slowest:.0?}",
            valid + invalid,
            t.elapsed().as_secs_f64(),
            st.answered()
        ),
    );
    rep.check(
        S,
        "canary-denied call allowed",
        st.denied_allowed.to_string(),
        "0",
        st.denied_allowed == 0,
    );
    rep.check(
        S,
        "canary-allowed call denied",
        st.allowed_denied.to_string(),
        "0",
        st.allowed_denied == 0,
    );
    rep.check(
        S,
        "other errors (non-200, transport)",
        format!(
            "{} / {}",
            st.wrong - st.denied_allowed - st.allowed_denied,
            st.transport_errors
        ),
        "0 / 0",
        st.wrong == st.denied_allowed + st.allowed_denied && st.transport_errors == 0,
    );
    rep.check(
        S,
        "reload counters = steps (failures = invalid, reloads = valid + restore)",
        format!(
            "{failures:?} vs {invalid} (reloads_total {reloads:?} vs {} valid)",
            valid + 1
        ),
        "equal",
        failures == Some(invalid as f64) && reloads == Some((valid + 1) as f64),
    );
    rep.check(
        S,
        "each write observed (counted, live snapshot right)",
        if lapses.is_empty() {
            format!("{} of {}", valid + invalid + 1, valid + invalid + 1)
        } else {
            lapses.join("; ")
        },
        "all",
        lapses.is_empty(),
    );
    rep.check(
        S,
        "alive after storm, RSS",
        format!("{alive}, {rss:.1} MiB"),
        "alive",
        alive,
    );
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------
// H: slowloris and oversize bodies

async fn stage_http_abuse(rep: &Report) {
    const S: &str = "H HTTP abuse";
    println!("\n== H: slowloris (500 connections) and oversize bodies while 20 agents run");
    let dir = scenario_dir("abuse", true);
    let (up, _counters) = start_upstream().await;
    let port = free_port();
    let url = format!("http://{up}/mcp");
    let cfg = config(
        port,
        &[("github", url.clone(), "10s"), ("files", url, "10s")],
        STATIC_IDENTITY,
        "",
        "",
    );
    let mut gw = Serve::start(&dir, port, &cfg);
    if let Err(e) = gw.wait_ready(Duration::from_secs(20)).await {
        rep.check(S, "start", e, "ready", false);
        return;
    }
    let target = Target::Gateway(gw.base());
    let base = run_agents(
        20,
        0,
        &target,
        Mix::Standard,
        "Hb",
        Duration::from_secs(3),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let legit = tokio::spawn({
        let stop = stop.clone();
        let target = target.clone();
        async move {
            run_agents(
                20,
                0,
                &target,
                Mix::Standard,
                "H",
                Duration::from_secs(60),
                stop,
            )
            .await
        }
    });
    // Slowloris: 500 connections, a partial header, one more header line every second.
    let addr = gw.addr();
    let mut slow = tokio::task::JoinSet::new();
    for i in 0..500 {
        slow.spawn(async move {
            let Ok(mut s) = connect_from(agent_ip(20 + i), addr).await else {
                return None;
            };
            let t = Instant::now();
            let _ = s.write_all(format!("POST /mcp/github HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n", addr.port()).as_bytes()).await;
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    r = s.read(&mut buf) => {
                        if matches!(r, Ok(0) | Err(_)) { return Some(t.elapsed()); }
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if s.write_all(b"X-Slow: 1\r\n").await.is_err() { return Some(t.elapsed()); }
                        if t.elapsed() > Duration::from_secs(20) { return None; }
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fds_peak = gw.fds();
    // Oversize with Content-Length: 413 before the body is read.
    let mut s = connect_from(agent_ip(1), addr).await.unwrap();
    let head = format!(
        "POST /mcp/github HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: 10485760\r\n\r\n{{\"jsonrpc\":"
    );
    let t = Instant::now();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    let cl_time = t.elapsed();
    let cl_status = parse_response(&buf[..n]).map(|r| r.0).unwrap_or(0);
    rep.check(
        S,
        "10 MiB Content-Length body refused",
        format!("HTTP {cl_status}"),
        "413",
        cl_status == 413,
    );
    rep.timing(
        S,
        "10 MiB Content-Length body, time to 413",
        format!("{cl_time:.2?}"),
        "<= 50 ms",
        cl_time <= Duration::from_millis(50),
    );
    // Chunked over the 4 MiB cap: 413 once crossed.
    let mut s = connect_from(agent_ip(2), addr).await.unwrap();
    let head = format!(
        "POST /mcp/github HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("10000\r\n{}\r\n", "a".repeat(65536));
    let (mut sent, mut status, mut out) = (0usize, 0u16, Vec::new());
    let t = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut b = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(15), rd.read(&mut b))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        b.truncate(n);
        b
    });
    while sent < 8 * 1024 * 1024 && !reader.is_finished() {
        if wr.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += 65536;
    }
    if let Ok(b) = reader.await {
        out = b;
        status = parse_response(&out).map(|r| r.0).unwrap_or(0);
    }
    let _ = out;
    rep.check(
        S,
        "chunked body over the 4 MiB cap",
        format!(
            "HTTP {status} after {:.1} MiB sent, {:.2?}",
            sent as f64 / 1048576.0,
            t.elapsed()
        ),
        "413",
        status == 413,
    );
    // Slowloris outcome.
    let mut closes = Vec::new();
    let mut never = 0;
    while let Some(r) = slow.join_next().await {
        match r.unwrap() {
            Some(d) => closes.push(d),
            None => never += 1,
        }
    }
    closes.sort();
    let worst = closes.last().copied().unwrap_or_default();
    rep.check(
        S,
        "slowloris connections closed",
        format!("{} closed, {never} not closed/connected", closes.len()),
        "all",
        never == 0,
    );
    rep.timing(
        S,
        "slowloris connections closed, worst time",
        format!("{worst:.1?}"),
        "<= 11 s",
        worst <= Duration::from_secs(11),
    );
    rep.check(
        S,
        "open fds at the attack's peak",
        fds_peak.to_string(),
        "<= 1074",
        fds_peak <= 1074,
    );
    stop.store(true, Ordering::Relaxed);
    let during = legit.await.unwrap();
    let (b99, d99) = (pct(&base.lat_us, 99.0), pct(&during.lat_us, 99.0));
    rep.timing(
        S,
        "legitimate p99 baseline → during attack",
        format!("{b99:.2} → {d99:.2} ms"),
        "<= 2× (or +5 ms)",
        d99 <= 2.0 * b99 || d99 <= b99 + 5.0,
    );
    rep.check(
        S,
        "legitimate errors during attack",
        format!(
            "wrong {} transport {}",
            during.wrong, during.transport_errors
        ),
        "0",
        during.wrong == 0 && during.transport_errors == 0,
    );
    let healthz = reqwest::get(format!("{}/healthz", gw.base()))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    let after = run_agents(
        4,
        0,
        &target,
        Mix::Allowed,
        "Ha",
        Duration::from_millis(500),
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    rep.check(
        S,
        "healthy after",
        format!(
            "/healthz {healthz}, {} allowed calls ok, {} wrong",
            after.acked.len(),
            after.wrong
        ),
        "200, calls ok",
        healthz == 200 && !after.acked.is_empty() && after.wrong == 0,
    );
    gw.stop();
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------
// Bench: direct vs nginx vs toolgate

fn nginx_conf(prefix: &Path, port: u16, upstream: SocketAddr) -> String {
    format!(
        "daemon off;\nmaster_process on;\nworker_processes auto;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n  upstream up {{ server {upstream}; keepalive 128; }}\n  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n    location /mcp/ {{\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n      proxy_pass http://up/mcp/;\n    }}\n  }}\n}}\n",
        p = prefix.display()
    )
}

struct Nginx(Child);
impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master's pid: it stops its workers; SIGKILL if it lingers.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_port(addr: SocketAddr) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{addr} never accepted");
}

/// The bench's fourth path, a floor for the Rust stack toolgate is built on: the same axum/hyper
/// server and the same reqwest client (`toolgate::gateway::http_client`), forwarding each POST's
/// bytes to the upstream and the answer back. No identity, no parsing, no policy, no audit. It
/// runs as its own process, like toolgate and nginx.
async fn passthrough(port: u16, upstream: String) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;

    let client = toolgate::gateway::http_client().unwrap();
    let url: reqwest::Url = format!("http://{upstream}/mcp").parse().unwrap();
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let mut req = client.post(url).body(body);
            for (name, v) in &headers {
                if ![header::HOST, header::CONNECTION, header::CONTENT_LENGTH].contains(name) {
                    req = req.header(name, v);
                }
            }
            match req.send().await {
                Ok(r) => {
                    let status = r.status();
                    let ctype = r.headers().get(header::CONTENT_TYPE).cloned();
                    let body = r.bytes().await.unwrap_or_default();
                    let mut out = (status, body).into_response();
                    if let Some(c) = ctype {
                        out.headers_mut().insert(header::CONTENT_TYPE, c);
                    }
                    out
                }
                Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            }
        }
    });
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    axum::serve(l, app).await.unwrap();
}

struct Passthrough(Child);
impl Drop for Passthrough {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn bench(rep: &Report) {
    const S: &str = "bench";
    let secs = env_u64("BENCH_SECONDS", 10);
    let agents = env_u64("BENCH_AGENTS", 64) as usize;
    let idle = env_u64("IDLE_CONNS", 1000) as usize;
    let nginx_bin = std::env::var("NGINX_BIN").unwrap_or_else(|_| "/usr/sbin/nginx".into());
    println!("== bench: tools/call round trips, {agents} agents, {secs} s each (1 s warm-up)");
    let dir = scenario_dir("bench", true);
    let (up, _counters) = start_upstream().await;
    // nginx
    let nport = free_port();
    let ndir = dir.join("nginx");
    std::fs::create_dir_all(&ndir).unwrap();
    std::fs::write(ndir.join("nginx.conf"), nginx_conf(&ndir, nport, up)).unwrap();
    let nginx = Nginx(
        Command::new(&nginx_bin)
            .arg("-p")
            .arg(&ndir)
            .arg("-c")
            .arg(ndir.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {nginx_bin}: {e}")),
    );
    wait_port(SocketAddr::from(([127, 0, 0, 1], nport))).await;
    // the bare Rust proxy
    let pport = free_port();
    let _passthrough = Passthrough(
        Command::new(std::env::current_exe().unwrap())
            .arg("passthrough")
            .arg(pport.to_string())
            .arg(up.to_string())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(SocketAddr::from(([127, 0, 0, 1], pport))).await;
    // toolgate
    let port = free_port();
    let url = format!("http://{up}/mcp");
    let cfg = config(
        port,
        &[("github", url.clone(), "10s")],
        STATIC_IDENTITY,
        // BENCH_AUDIT: extra `audit:` keys, e.g. "durability: normal" (default: sync + FULL).
        &std::env::var("BENCH_AUDIT")
            .map(|v| format!("  {v}\n"))
            .unwrap_or_default(),
        "",
    )
    .replace("arguments: full", "arguments: digest");
    // BENCH_AUDIT may set the mode itself ("mode: async"): then it replaces the default one.
    let cfg = if std::env::var("BENCH_AUDIT").is_ok_and(|v| v.contains("mode:")) {
        cfg.replacen("  mode: sync\n", "", 1)
    } else {
        cfg
    };
    // BENCH_METRICS=ip:port serves /metrics there (rows per commit, queue depth) for a look.
    let cfg = match std::env::var("BENCH_METRICS") {
        Ok(m) => format!("{cfg}metrics:\n  listen: \"{m}\"\n"),
        Err(_) => cfg,
    };
    let mut gw = Serve::start(&dir, port, &cfg);
    gw.wait_ready(Duration::from_secs(20)).await.unwrap();
    let ways = [
        ("direct", Target::Fixed(format!("http://{up}/mcp"))),
        (
            "nginx",
            Target::Fixed(format!("http://127.0.0.1:{nport}/mcp/github")),
        ),
        (
            "hyper+reqwest passthrough",
            Target::Fixed(format!("http://127.0.0.1:{pport}/mcp/github")),
        ),
        ("toolgate", Target::Gateway(gw.base())),
    ];
    let mut results = HashMap::new();
    println!(
        "\n| path | requests | throughput (req/s) | p50 (ms) | p99 (ms) | max (ms) | non-200 / errors |\n|---|---|---|---|---|---|---|"
    );
    for (name, target) in &ways {
        let _ = run_agents(
            agents,
            0,
            target,
            Mix::Bench,
            "B",
            Duration::from_secs(1),
            Arc::new(AtomicBool::new(false)),
        )
        .await;
        let t = Instant::now();
        let st = run_agents(
            agents,
            0,
            target,
            Mix::Bench,
            "B",
            Duration::from_secs(secs),
            Arc::new(AtomicBool::new(false)),
        )
        .await;
        let el = t.elapsed().as_secs_f64();
        let rps = st.answered() as f64 / el;
        let (p50, p99) = (pct(&st.lat_us, 50.0), pct(&st.lat_us, 99.0));
        let bad = st.answered() - st.statuses.get(&200).copied().unwrap_or(0);
        println!(
            "| {name} | {} | {rps:.0} | {p50:.2} | {p99:.2} | {:.1} | {bad} / {} |",
            st.answered(),
            f64::from(st.max_us) / 1000.0,
            st.transport_errors + st.wrong
        );
        results.insert(*name, (rps, p50, p99, bad + st.transport_errors + st.wrong));
    }
    println!();
    let (n, g) = (results["nginx"], results["toolgate"]);
    let d = results["direct"];
    let h = results["hyper+reqwest passthrough"];
    rep.info(
        S,
        "direct",
        format!("{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms", d.0, d.1, d.2),
    );
    rep.info(
        S,
        "nginx",
        format!("{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms", n.0, n.1, n.2),
    );
    rep.info(
        S,
        "hyper+reqwest passthrough",
        format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms: {:.2}× nginx's throughput (the floor of toolgate's HTTP stack)",
            h.0,
            h.1,
            h.2,
            h.0 / n.0
        ),
    );
    rep.info(
        S,
        "toolgate",
        format!("{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms", g.0, g.1, g.2),
    );
    rep.timing(
        S,
        "p50 toolgate/nginx",
        format!("{:.2}×", g.1 / n.1),
        "<= 1.3×",
        g.1 / n.1 <= 1.3,
    );
    rep.timing(
        S,
        "p99 toolgate/nginx",
        format!("{:.2}×", g.2 / n.2),
        "<= 2×",
        g.2 / n.2 <= 2.0,
    );
    rep.timing(
        S,
        "throughput toolgate/nginx",
        format!("{:.2}×", g.0 / n.0),
        ">= 0.7×",
        g.0 / n.0 >= 0.7,
    );
    rep.check(
        S,
        "errors (all paths)",
        format!(
            "direct {} nginx {} passthrough {} toolgate {}",
            d.3, n.3, h.3, g.3
        ),
        "0",
        d.3 + n.3 + h.3 + g.3 == 0,
    );
    // 1,000 idle keep-alive agent connections.
    let before = gw.rss_mb();
    let mut conns = Vec::new();
    let mut failed = 0;
    for i in 0..idle {
        match connect_from(agent_ip(i), gw.addr()).await {
            Ok(mut s) => {
                let req = format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
                let mut buf = [0u8; 512];
                let ok = s.write_all(req.as_bytes()).await.is_ok()
                    && matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await, Ok(Ok(n)) if n > 0);
                if ok {
                    conns.push(s);
                } else {
                    failed += 1;
                }
            }
            Err(_) => failed += 1,
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with = gw.rss_mb();
    let fds = gw.fds();
    rep.check(
        S,
        &format!("RSS with {idle} idle keep-alive connections"),
        format!(
            "{with:.1} MiB (before {before:.1} MiB; {} open, {failed} failed; {fds} fds)",
            conns.len()
        ),
        "< 100 MiB",
        with < 100.0 && failed == 0,
    );
    drop(conns);
    gw.stop();
    drop(nginx);
    cleanup(&dir);
}

// ------------------------------------------------------------------------------------------

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ci = args.iter().any(|a| a == "--ci");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(|x| x.trim().to_uppercase()).collect());
    let want = |k: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == k));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rep = Report::default();
    let t = Instant::now();
    match args.first().map(String::as_str) {
        Some("suite") => rt.block_on(async {
            let (load, cycles, over, storm) = if ci {
                (
                    env_u64("LOAD_SECONDS", 20),
                    env_u64("KILL_CYCLES", 3),
                    env_u64("OVERLOAD_SECONDS", 5),
                    env_u64("STORM_SECONDS", 8),
                )
            } else {
                (
                    env_u64("LOAD_SECONDS", 60),
                    env_u64("KILL_CYCLES", 10),
                    env_u64("OVERLOAD_SECONDS", 10),
                    env_u64("STORM_SECONDS", 20),
                )
            };
            println!(
                "toolgate load and fault suite{} — binary {}",
                if ci { " (CI mode)" } else { "" },
                toolgate_bin().display()
            );
            if want("L") {
                stage_load(&rep, load).await;
            }
            if want("O") {
                stage_overload(&rep, over).await;
            }
            if want("K") {
                stage_kill(&rep, cycles).await;
            }
            if want("W") {
                stage_localapi(&rep).await;
            }
            if want("U") {
                stage_upstream(&rep).await;
            }
            if want("D") {
                stage_disk(&rep).await;
            }
            if want("P") {
                stage_storm(&rep, storm).await;
            }
            if want("H") {
                stage_http_abuse(&rep).await;
            }
        }),
        Some("bench") => rt.block_on(bench(&rep)),
        Some("passthrough") => {
            let port = args.get(1).and_then(|p| p.parse().ok()).unwrap();
            let upstream = args.get(2).cloned().unwrap();
            rt.block_on(passthrough(port, upstream));
        }
        _ => {
            eprintln!("usage: loadtest suite [--ci] [--only L,O,K,W,U,D,P,H] | loadtest bench");
            std::process::exit(2);
        }
    }
    // Exit codes: 0 pass; 1 a correctness check missed (CI fails, no retry); 3 only timing
    // checks missed (CI reruns those stages once; the stages' letters are printed and, with
    // LOAD_SUITE_TIMING_MISSES=FILE, written there).
    let (summary, code) = match rep.print_table() {
        Verdict::Pass => ("PASS".to_string(), 0),
        Verdict::Correctness => (
            "FAIL: a correctness check missed (see the MISS rows of kind correctness); never retried"
                .to_string(),
            1,
        ),
        Verdict::TimingOnly(stages) => {
            let list = stages.join(",");
            if let Some(f) = std::env::var_os("LOAD_SUITE_TIMING_MISSES") {
                let _ = std::fs::write(f, &list);
            }
            (
                format!("FAIL (timing only): timing figures missed in stages {list}; every correctness check passed"),
                3,
            )
        }
    };
    println!("\n{summary} in {:.0} s", t.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}
