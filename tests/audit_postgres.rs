//! The fleet sink against the real PostgreSQL at 127.0.0.1:5432, or `TOOLGATE_PG_ADDR` (database
//! `test`, trust auth):
//! rows ship in order; an outage (a TCP proxy in this test cuts every connection and refuses
//! new ones) and a restart during it lose nothing; a rewound watermark re-ships without
//! duplicates (exactly once in effect); two gateways share one schema; fleet query and verify.
//! Each run uses its own schema and drops it. Skips with a SKIPPED line only when nothing
//! listens there (fails instead when TOOLGATE_REQUIRE_PEERS=1).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod support;

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use sqlx::Row as _;
use toolgate::audit::key;
use toolgate::audit::postgres::{self, PgSettings};
use toolgate::audit::query::Filter;
use toolgate::audit::{AuditLog, Effect, Kind, Record, Settings};
use toolgate::config::Durability;

/// The PostgreSQL address: `TOOLGATE_PG_ADDR` (`scripts/test` sets it when it starts a private
/// cluster), else 127.0.0.1:5432.
fn pg() -> String {
    std::env::var("TOOLGATE_PG_ADDR")
        .ok()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "127.0.0.1:5432".to_string())
}

/// A v3 decision id (16 bytes) as its UUID text, in SQL.
const UUID_TEXT: &str = "lower(substr(hex(id),1,8)||'-'||substr(hex(id),9,4)||'-'||substr(hex(id),13,4)||'-'||substr(hex(id),17,4)||'-'||substr(hex(id),21))";

fn pg_reachable() -> bool {
    let addr: SocketAddr = pg().parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// A TCP proxy to Postgres that can go down (cut every connection, refuse new ones) and up.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start() -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (u, c, s) = (up.clone(), conns.clone(), stop.clone());
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let (client, _) = match l.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                if !u.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(pg()) else {
                    continue;
                };
                let mut g = c.lock().unwrap();
                g.push(client.try_clone().unwrap());
                g.push(server.try_clone().unwrap());
                drop(g);
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy {
            addr,
            up,
            conns,
            stop,
        }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.down();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if std::io::Write::write_all(&mut to, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

fn settings(db: &Path, gateway: &str, url: &str, schema: &str) -> Settings {
    let mut s = Settings::for_path(db);
    s.durability = Durability::Normal;
    s.gateway = gateway.into();
    s.postgres = Some(PgSettings {
        url: url.into(),
        schema: schema.into(),
        batch_rows: 100,
    });
    s
}

fn write(log: &AuditLog, n: usize, principal: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let effect = if i % 4 == 0 {
            Effect::Deny
        } else {
            Effect::Allow
        };
        let mut r = Record::new(Kind::Mcp, effect);
        r.principal = principal.into();
        r.tool = format!("tool{}", i % 3);
        r.tags = vec!["tag:fleet".into()];
        r.explain = serde_json::json!({"i": i});
        let id = r.id.clone();
        log.submit(r).unwrap().wait_blocking().unwrap();
        if effect == Effect::Allow {
            log.record_outcome(&id, "forwarded", Some(i as u64), "")
                .unwrap();
        }
        ids.push(id);
    }
    log.flush_blocking().unwrap();
    ids
}

fn wait_shipped(log: &AuditLog, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = log.metrics();
        if m.ship_lag_rows == 0 && m.shipped_seq == m.head_seq {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: shipping stalled: {m:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until the shipper has met the outage (a failed attempt: unhealthy) while rows wait to
/// ship (lag), and returns those metrics (30 s deadline).
fn wait_outage_seen(log: &AuditLog, what: &str) -> toolgate::audit::Metrics {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = log.metrics();
        if !m.ship_healthy && m.ship_lag_rows > 0 {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the shipper never reported it: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sqlite_ids(db: &Path) -> (String, BTreeSet<String>, i64) {
    let c = Connection::open(db).unwrap();
    let store: String = c
        .query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
            r.get(0)
        })
        .unwrap();
    // Decisions by their UUID; outcome and anchor rows (no UUID in v3) as "<store>:<seq>".
    let mut stmt = c
        .prepare(&format!(
            "SELECT {UUID_TEXT} FROM decisions UNION ALL SELECT ?1 || ':' || seq FROM outcomes UNION ALL SELECT ?1 || ':' || seq FROM anchors"
        ))
        .unwrap();
    let ids = stmt
        .query_map([&store], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let head: i64 = c
        .query_row(
            "SELECT max(s) FROM (SELECT max(seq) s FROM decisions UNION ALL SELECT max(seq) FROM outcomes UNION ALL SELECT max(seq) FROM anchors)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (store, ids, head)
}

#[test]
fn shipper_is_exactly_once_in_effect_across_an_outage_and_restarts() {
    if !pg_reachable() {
        support::peers::missing(
            "shipper_is_exactly_once_in_effect_across_an_outage_and_restarts",
            "PostgreSQL",
            &format!("nothing listens at {} (TOOLGATE_PG_ADDR)", pg()),
            "scripts/test starts a private cluster from Debian's postgresql (apt-get install postgresql)",
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!(
        "tg_audit_test_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000
    );
    let direct = PgSettings {
        url: format!("postgres://postgres@{}/test", pg()),
        schema: schema.clone(),
        batch_rows: 100,
    };
    let result = std::panic::catch_unwind(|| run(&rt, &schema, &direct));
    // Clean up whatever happened.
    rt.block_on(async {
        if let Ok(mut c) = postgres::connect_existing(&direct).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
            )))
            .execute(&mut c)
            .await;
        }
    });
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn run(rt: &tokio::runtime::Runtime, schema: &str, direct: &PgSettings) {
    let dir = tempfile::tempdir().unwrap();
    let a_db = dir.path().join("a.db");
    let proxy = Proxy::start();
    let via_proxy = format!("postgres://postgres@{}/test", proxy.addr);

    // 1. Ships in order while Postgres is up.
    let log = AuditLog::open(settings(&a_db, "gw-a", &via_proxy, schema)).unwrap();
    write(&log, 200, "alice@example.com");
    wait_shipped(&log, "initial");
    assert!(log.metrics().ship_healthy);

    // 2. Outage: local commits go on (sync mode does not wait for Postgres); lag grows.
    proxy.down();
    write(&log, 150, "bob@example.com");
    let m = wait_outage_seen(&log, "the outage");
    assert!(m.ship_lag_rows > 0, "{m:?}");
    assert!(m.prometheus().contains("toolgate_audit_ship_lag_rows"));

    // 3. A restart during the outage, more rows, then Postgres comes back: all caught up.
    drop(log);
    let log = AuditLog::open(settings(&a_db, "gw-a", &via_proxy, schema)).unwrap();
    write(&log, 50, "carol@example.com");
    let m = wait_outage_seen(&log, "the outage after a restart");
    assert!(m.ship_lag_rows >= 50, "{m:?}");
    proxy.up();
    wait_shipped(&log, "after the outage");
    assert!(log.metrics().ship_healthy);
    drop(log);

    // 4. Re-delivery: rewind the persisted watermark (as if a crash lost it); the re-shipped
    // rows are ignored by id.
    let persisted: i64 = {
        let c = Connection::open(&a_db).unwrap();
        let w: String = c
            .query_row("SELECT value FROM meta WHERE key = 'shipped'", [], |r| {
                r.get(0)
            })
            .unwrap();
        c.execute("UPDATE meta SET value = '40' WHERE key = 'shipped'", [])
            .unwrap();
        w.parse().unwrap()
    };
    let (store_a, ids_a, head_a) = sqlite_ids(&a_db);
    assert_eq!(persisted, head_a, "the watermark is persisted in SQLite");
    let log = AuditLog::open(settings(&a_db, "gw-a", &via_proxy, schema)).unwrap();
    wait_shipped(&log, "re-delivery");
    assert!(log.metrics().shipped_rows >= (head_a - 40) as u64);
    drop(log);

    // 5. A second gateway ships into the same schema.
    let b_db = dir.path().join("b.db");
    let log_b = AuditLog::open(settings(
        &b_db,
        "gw-b",
        &format!("postgres://postgres@{}/test", pg()),
        schema,
    ))
    .unwrap();
    let b_ids = write(&log_b, 30, "alice@example.com");
    wait_shipped(&log_b, "gateway b");
    drop(log_b);
    let (store_b, ids_b, head_b) = sqlite_ids(&b_db);
    assert_ne!(store_a, store_b);

    rt.block_on(async {
        let mut c = postgres::connect_existing(direct).await.unwrap();
        for (store, ids, head) in [(&store_a, &ids_a, head_a), (&store_b, &ids_b, head_b)] {
            let rows = sqlx::query("SELECT id, seq FROM events WHERE store_id = $1 ORDER BY seq")
                .bind(store.clone())
                .fetch_all(&mut c)
                .await
                .unwrap();
            let got: BTreeSet<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
            assert_eq!(
                rows.len(),
                ids.len(),
                "no duplicates, nothing missing ({store})"
            );
            assert_eq!(&got, ids);
            let seqs: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
            assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "in order, contiguous");
        }
        // Fleet queries: the same filters as locally, across gateways.
        let all = postgres::query(&mut c, &Filter::default()).await.unwrap();
        assert_eq!(all.len(), 200 + 150 + 50 + 30);
        let f = Filter {
            principal: Some("alice@example.com".into()),
            ..Filter::default()
        };
        let alice = postgres::query(&mut c, &f).await.unwrap();
        assert_eq!(alice.len(), 230);
        let gws: BTreeSet<&str> = alice.iter().map(|r| r.gateway.as_str()).collect();
        assert_eq!(gws, BTreeSet::from(["gw-a", "gw-b"]));
        let f = Filter {
            gateway: Some("gw-b".into()),
            effect: Some("allow".into()),
            tag: Some("tag:fleet".into()),
            limit: Some(5),
            ..Filter::default()
        };
        let b = postgres::query(&mut c, &f).await.unwrap();
        assert_eq!(b.len(), 5);
        assert!(
            b.iter()
                .all(|r| r.outcome == "forwarded" && r.latency_us.is_some())
        );
        assert_eq!(
            b.last().unwrap().id,
            b_ids[29],
            "the newest rows, oldest first"
        );
        let one = postgres::query(
            &mut c,
            &Filter {
                id: Some(b_ids[0].clone()),
                ..Filter::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(one[0].time.len(), 27, "{}", one[0].time);
        // Every shipped chain verifies in Postgres too (times and JSON are byte-exact).
        let key = |db: &Path| key::load(&key::default_path(db)).unwrap();
        let keys = [key(&a_db), key(&b_db)];
        let (n, breaks, unkeyed) = postgres::verify(&mut c, &keys).await.unwrap();
        assert_eq!(n as i64, head_a + head_b);
        assert!(breaks.is_empty(), "{breaks:?}");
        assert!(unkeyed.is_empty(), "{unkeyed:?}");
        // Without the keys: linkage only, said so.
        let (_, breaks, unkeyed) = postgres::verify(&mut c, &[]).await.unwrap();
        assert!(breaks.is_empty(), "{breaks:?}");
        assert_eq!(unkeyed.len(), 2);
        // Tampering in the fleet copy: each case in a transaction that is rolled back.
        let mid = head_b / 2;
        let cases: [(&str, String, &str); 5] = [
            (
                "edited row",
                format!("UPDATE events SET principal = 'mallory' WHERE store_id = '{store_b}' AND seq = {mid}"),
                "content",
            ),
            (
                "deleted middle row",
                format!("DELETE FROM events WHERE store_id = '{store_b}' AND seq = {mid}"),
                "missing",
            ),
            (
                "deleted last rows",
                format!("DELETE FROM events WHERE store_id = '{store_b}' AND seq > {}", head_b - 3),
                "recorded head",
            ),
            (
                "deleted last rows and the head",
                format!("DELETE FROM events WHERE store_id = '{store_b}' AND seq > {}; DELETE FROM heads WHERE store_id = '{store_b}'", head_b - 3),
                "no recorded head",
            ),
            (
                "deleted first row",
                format!("DELETE FROM events WHERE store_id = '{store_b}' AND seq = 1"),
                "missing",
            ),
        ];
        for (what, sql, want) in cases {
            let mut tx = sqlx::Connection::begin(&mut c).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.unwrap();
            let (_, breaks, _) = postgres::verify(&mut tx, &keys).await.unwrap();
            tx.rollback().await.unwrap();
            assert_eq!(breaks.len(), 1, "{what}: {breaks:?}");
            assert_eq!(breaks[0].0, store_b, "{what}");
            assert!(breaks[0].1.problem.contains(want), "{what}: {}", breaks[0].1);
        }
        let (_, breaks, _) = postgres::verify(&mut c, &keys).await.unwrap();
        assert!(breaks.is_empty(), "rolled back: {breaks:?}");
        // Migrations recorded once, even though several connections ran them.
        let v: i64 = sqlx::query("SELECT count(*) FROM schema_migrations")
            .fetch_one(&mut c)
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 2);
    });
}

/// Runs `toolgate audit verify` with `args`; (exit code, stdout + stderr).
fn verify_cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["audit", "verify"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn verify_against_postgres_catches_truncation_with_a_replayed_head() {
    if !pg_reachable() {
        support::peers::missing(
            "verify_against_postgres_catches_truncation_with_a_replayed_head",
            "PostgreSQL",
            &format!("nothing listens at {} (TOOLGATE_PG_ADDR)", pg()),
            "scripts/test starts a private cluster from Debian's postgresql (apt-get install postgresql)",
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!(
        "tg_audit_x_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000
    );
    let url = format!("postgres://postgres@{}/test", pg());
    let direct = PgSettings {
        url: url.clone(),
        schema: schema.clone(),
        batch_rows: 100,
    };
    let result = std::panic::catch_unwind(|| cross_check_cases(&url, &schema));
    rt.block_on(async {
        if let Ok(mut c) = postgres::connect_existing(&direct).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
            )))
            .execute(&mut c)
            .await;
        }
    });
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn cross_check_cases(url: &str, schema: &str) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let log = AuditLog::open(settings(&db, "gw-x", url, schema)).unwrap();
    let alice = write(&log, 20, "alice@example.com");
    // A shadow row (schema v5) ships like any decision, its link to the decision included.
    let mut shadow = Record::new(Kind::Shadow, Effect::Allow);
    shadow.principal = "alice@example.com".into();
    shadow.decision_id = alice[0].clone();
    shadow.rule = "candidate_rule".into();
    let live = toolgate::audit::shadow::Side {
        effect: "deny".into(),
        policy: "resource.mcp_server.vdefault".into(),
        rule: String::new(),
    };
    shadow.explain = toolgate::audit::shadow::explain(&live, serde_json::Value::Null);
    log.submit(shadow).unwrap().wait_blocking().unwrap();
    log.flush_blocking().unwrap();
    // The head record as it was at this point (what an attacker could have saved).
    let meta_head = |db: &Path| -> String {
        Connection::open(db)
            .unwrap()
            .query_row("SELECT value FROM meta WHERE key = 'head'", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let old_head = meta_head(&db);
    let old_seq: i64 = old_head.split(':').next().unwrap().parse().unwrap();
    write(&log, 10, "bob@example.com");
    wait_shipped(&log, "all rows");
    drop(log);
    let db_s = db.to_str().unwrap();
    let args = |db: &str| -> Vec<String> {
        [
            "--db",
            db,
            "--against-postgres",
            url,
            "--postgres-schema",
            schema,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |db: &str| {
        let a = args(db);
        verify_cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // The intact store matches its copy.
    let (code, out) = run(db_s);
    assert_eq!(code, 0, "{out}");
    // The fleet lists the shadow row's difference.
    let diff = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"))
        .args(["audit", "query", "--shadow-diff", "--format", "csv"])
        .args(["--postgres", url, "--postgres-schema", schema])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&diff.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "{text}{}",
        String::from_utf8_lossy(&diff.stderr)
    );
    assert!(
        lines[1].starts_with(&format!("{},", alice[0]))
            && lines[1].ends_with(
                ",alice@example.com,,,,deny,resource.mcp_server.vdefault,,allow,,candidate_rule"
            ),
        "{text}"
    );
    assert!(out.contains("ok: matches its PostgreSQL copy ("), "{out}");
    assert!(out.contains("local head seq"), "{out}");

    // Rows removed from the end, and the head saved earlier put back: the file alone verifies,
    // the PostgreSQL copy does not agree.
    let t = {
        let d = dir.path().join("truncated");
        std::fs::create_dir(&d).unwrap();
        d.join("audit.db")
    };
    std::fs::copy(&db, &t).unwrap();
    std::fs::copy(key::default_path(&db), key::default_path(&t)).unwrap();
    {
        let c = Connection::open(&t).unwrap();
        c.execute_batch(&format!(
            "INSERT INTO prune_permit (one) VALUES (1);
             DELETE FROM decisions WHERE seq > {old_seq}; DELETE FROM outcomes WHERE seq > {old_seq};
             DELETE FROM prune_permit;"
        ))
        .unwrap();
        c.execute("UPDATE meta SET value = ?1 WHERE key = 'head'", [&old_head])
            .unwrap();
    }
    let t_s = t.to_str().unwrap();
    let (code, out) = verify_cli(&["--db", t_s]);
    assert_eq!(code, 0, "the file alone cannot tell: {out}");
    let (code, out) = run(t_s);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rows were removed from the end"), "{out}");
    assert!(out.contains(&format!("ends at seq {old_seq}")), "{out}");

    // A row rewritten in place after shipping (its stored hash changed): caught by hash.
    let e = {
        let d = dir.path().join("edited");
        std::fs::create_dir(&d).unwrap();
        d.join("audit.db")
    };
    std::fs::copy(&db, &e).unwrap();
    std::fs::copy(key::default_path(&db), key::default_path(&e)).unwrap();
    {
        let c = Connection::open(&e).unwrap();
        c.execute_batch(
            "DROP TRIGGER decisions_no_update;
             UPDATE decisions SET hash = zeroblob(32) WHERE seq = (SELECT min(seq) FROM decisions WHERE seq > 4);",
        )
        .unwrap();
    }
    let (code, out) = run(e.to_str().unwrap());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("differs from its PostgreSQL copy"), "{out}");

    // --against-postgres with --postgres is a usage error.
    let (code, out) = verify_cli(&["--postgres", url, "--against-postgres", url]);
    assert_eq!(code, 2, "{out}");
}
