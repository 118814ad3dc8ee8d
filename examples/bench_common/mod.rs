//! What the pinned benchmarks (`bench_pdp`, `bench_proxy`, `bench_stdio`) share: knobs from the
//! environment, CPU time from `/proc`, the statistics they print, and the port a child server
//! prints. Included with
//! `#[path = "bench_common/mod.rs"] mod bench_common;` (a folder, so Cargo does not build it as an
//! example of its own).

#![allow(dead_code, reason = "each benchmark uses its own subset")]

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of `pid` and its threads, in microseconds (USER_HZ is 100 on Linux).
pub fn cpu_us(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let tail = text.rsplit_once(')').map(|(_, t)| t).unwrap_or_default();
    let f: Vec<&str> = tail.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10_000
}

pub fn pct(sorted: &[u32], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn spread(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The loopback address a child server printed as its first stdout line (its port).
pub fn printed_addr(child: &mut std::process::Child) -> std::net::SocketAddr {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    std::net::SocketAddr::from(([127, 0, 0, 1], line.trim().parse::<u16>().unwrap()))
}

/// A loopback listener on a free port, announced as this process's first stdout line (what
/// [`printed_addr`] reads in the parent).
pub async fn announced_listener() -> tokio::net::TcpListener {
    use std::io::Write as _;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    l
}
