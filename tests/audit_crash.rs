//! Crash durability (security.md §3.4 stage K, in-process form): a child process — this test
//! binary re-run with `TOOLGATE_AUDIT_CRASH_DB` set — writes decisions from 8 threads in `sync`
//! mode and appends each id to an ack file only after its commit resolved. The parent kills it
//! with SIGKILL at a random instant, 10 times over the same store, and checks after each kill:
//! `PRAGMA integrity_check` is ok, the hash chain verifies, and every acknowledged id is present.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use toolgate::audit::query::Reader;
use toolgate::audit::{AuditLog, Effect, Kind, Record, Settings};
use toolgate::config::Durability;

const DB_ENV: &str = "TOOLGATE_AUDIT_CRASH_DB";
const ACK_ENV: &str = "TOOLGATE_AUDIT_CRASH_ACKS";

/// The child: runs only when the parent sets the variables; writes until killed.
#[test]
fn crash_child() {
    let (Ok(db), Ok(acks)) = (std::env::var(DB_ENV), std::env::var(ACK_ENV)) else {
        return;
    };
    let mut s = Settings::for_path(&db);
    s.durability = Durability::Normal;
    s.gateway = "crash-child".into();
    let log = AuditLog::open(s).unwrap();
    let acks = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(acks)
            .unwrap(),
    ));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            let acks = acks.clone();
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let mut r = Record::new(
                        Kind::Mcp,
                        if i % 3 == 0 {
                            Effect::Deny
                        } else {
                            Effect::Allow
                        },
                    );
                    r.principal = format!("agent{t}@example.com");
                    r.tool = "create_issue".into();
                    r.reason = "load".into();
                    let id = r.id.clone();
                    let ticket = log.submit(r);
                    if let Ok(ticket) = ticket
                        && ticket.wait_blocking().is_ok()
                    {
                        // One write(2) per line: a kill leaves at most a partial last line.
                        let line = format!("{id}\n");
                        acks.lock().unwrap().write_all(line.as_bytes()).unwrap();
                        // As the gateway does after the upstream answered: never awaited, it
                        // rides with a later commit (a kill may lose it, not the decision).
                        if i % 3 != 0 {
                            let _ = log.record_outcome(&id, "forwarded", Some(5), "");
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// A cheap random number (no extra crate): time and pid mixed.
fn random_ms(lo: u64, hi: u64, salt: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let x = (n ^ (u64::from(std::process::id()) << 32) ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    lo + (x >> 7) % (hi - lo)
}

fn acked_ids(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.ends_with('\n');
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if !complete {
        lines.pop();
    }
    lines
}

#[test]
fn kill_9_at_random_instants_loses_no_acknowledged_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let acks = dir.path().join("acks.txt");
    let exe = std::env::current_exe().unwrap();
    let mut total_acked = 0usize;
    let mut total_outcomes = 0i64;
    for cycle in 0..10u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(DB_ENV, &db)
            .env(ACK_ENV, &acks)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until it is writing, then kill at a random instant in [100, 900) ms.
        let before = acked_ids(&acks).len();
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked_ids(&acks).len() == before {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the child never acknowledged a row"
            );
            if let Some(status) = child.try_wait().unwrap() {
                panic!("cycle {cycle}: the child exited early: {status}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(random_ms(100, 900, cycle)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let acked = acked_ids(&acks);
        assert!(acked.len() > before, "cycle {cycle}");
        {
            let c = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_WRITE).unwrap();
            let ok: String = c
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap();
            assert_eq!(ok, "ok", "cycle {cycle}");
            let mut stmt = c
                .prepare("SELECT lower(substr(hex(id),1,8)||'-'||substr(hex(id),9,4)||'-'||substr(hex(id),13,4)||'-'||substr(hex(id),17,4)||'-'||substr(hex(id),21)) FROM decisions")
                .unwrap();
            let present: HashSet<String> = stmt
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let missing: Vec<&String> = acked.iter().filter(|id| !present.contains(*id)).collect();
            assert!(
                missing.is_empty(),
                "cycle {cycle}: {} acknowledged rows lost, e.g. {:?}",
                missing.len(),
                missing.first()
            );
            // In flight at the kill: committed but not yet acknowledged, at most a few batches.
            assert!(present.len() >= acked.len());
            // Outcome rows (buffered, never awaited) only ever follow their decision.
            let (outcomes, orphans): (i64, i64) = c
                .query_row(
                    "SELECT count(*), count(*) FILTER (WHERE NOT EXISTS (SELECT 1 FROM decisions d WHERE d.id = o.decision AND d.seq < o.seq)) FROM outcomes o",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(
                orphans, 0,
                "cycle {cycle}: an outcome row before its decision"
            );
            total_outcomes = outcomes;
        }
        let rep = Reader::open(&db).unwrap().verify().unwrap();
        assert!(rep.broken.is_none(), "cycle {cycle}: {:?}", rep.broken);
        total_acked = acked.len();
    }
    assert!(total_outcomes > 0, "the children recorded outcome rows");
    eprintln!(
        "10 kill -9 cycles: {total_acked} acknowledged rows, none lost; {total_outcomes} outcome rows"
    );
}
