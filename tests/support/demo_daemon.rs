//! The demo's daemon in-process: the demo's files and static identities plus carol
//! (127.0.0.5) as an admin viewer, the sample upstream, a free port. Shared by the tests of
//! the HTTP read APIs (`/api/audit`, the dashboard).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use toolgate::{config::Config, daemon, demo, sample};

/// The demo's files written to a fresh folder and the daemon built from them (not started).
pub struct Built {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub daemon: daemon::Built,
}

/// carol (127.0.0.5), an admin viewer.
pub const CAROL_ADMIN: &str = "\"127.0.0.5\":\n  login: carol@example.com\n  node: carol.example.ts.net\n  caps: [{roles: [admin]}]\n";

/// Writes the demo's files (identities plus carol as admin) and builds the daemon.
pub async fn build() -> Built {
    build_with(CAROL_ADMIN).await
}

/// Writes the demo's files, with `extra` (YAML entries: address → identity) appended to the
/// demo's static identities, and builds the daemon.
pub async fn build_with(extra: &str) -> Built {
    let _ = toolgate::gateway::http_client();
    let dir = tempfile::tempdir().unwrap();
    let up = sample::spawn(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(sample::Counters::default()),
    )
    .await
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg_path = demo::write_files(dir.path(), port, up).unwrap();
    let ids = format!("{}{extra}", demo::IDENTITIES);
    std::fs::write(dir.path().join("identities.yaml"), ids).unwrap();
    let cfg = Config::load(&cfg_path).unwrap();
    let listen = daemon::resolve_listen(&cfg, &[]).unwrap();
    let identify = daemon::static_provider(&cfg, &listen).unwrap();
    let daemon = daemon::build(cfg, identify, &daemon::NodeInfo::default(), listen, None).unwrap();
    Built {
        dir,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        daemon,
    }
}

/// Waits, up to a deadline, until the daemon accepts connections at `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the daemon never listened at {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
