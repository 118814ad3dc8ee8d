//! The one writer: requests hand finished rows to a bounded queue ([`AuditLog::submit`]); a
//! dedicated thread owns the only write connection (WAL) and commits them in batched
//! transactions, chaining each row to the previous one.
//!
//! Batching: the writer takes up to `batch_rows` rows per transaction. In `sync` mode it commits
//! as soon as the queue is empty (group commit: rows that arrive during a commit share the next
//! one), so a lone call never waits for a timer; it first yields its core once, so request
//! threads runnable there finish queuing their burst. In `async` mode it also waits up to
//! `batch_ms` for more rows. Each queued row is one [`CompactRow`] (one allocation, packed and
//! digested on the submitting thread); statements are prepared once per connection and lookups
//! are cached.
//!
//! Outcome rows (what happened after an allowed call) are never waited for, never get a
//! channel and never wake the writer: they go to a side buffer ([`OutcomeBuffer`], a mutex and a
//! vector) that the writer drains into its next transaction, so a tools/call costs the writer
//! one wake-up (its decision), not two. They never start a commit of their own while decisions
//! flow, so a call's decision commit never waits behind a separate outcome commit. On an idle
//! gateway the writer's timer tick ([`OUTCOME_FLUSH`], 50 ms) commits them, so no call stays
//! `pending` for more than about that. A kill -9 can lose uncommitted outcome rows (never an
//! acknowledged decision): the next start marks those calls `unknown`.
//!
//! Failure: a failed commit answers every waiting ticket of that batch with
//! [`AuditError::Unavailable`] (the gateway answers 503 and forwards nothing), marks the store
//! unhealthy and counts it; the next batch is tried as usual, and the first success marks it
//! healthy again. While unhealthy, `async` mode waits for commits like `sync` mode, so allowed
//! calls fail closed until writes succeed. A full queue is [`AuditError::QueueFull`] at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::oneshot;

use super::chain::{self, content_digest, link};
use super::compact::{CompactRow, Event};
use super::key::ChainKey;
use super::record::{Record, StoredRow, new_id, normalize_time, now_text, outcome};
use super::rollup::Rollups;
use super::store::{self, Lookups};
use super::{AuditError, Settings, migrate, postgres, retention};
use crate::config::{AuditMode, Durability};

/// What a resolved ticket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The row's chain position; `None` in `async` mode (queued, not yet committed).
    pub seq: Option<i64>,
}

type Reply0 = Result<Committed, AuditError>;
type Reply = oneshot::Sender<Reply0>;

/// The writer's timer tick while no row arrives: buffered outcome rows commit on it (an idle
/// gateway), well inside the 100 ms promised to readers.
pub const OUTCOME_FLUSH: Duration = Duration::from_millis(50);

/// The side buffer's bound is the queue's, but never below this: an outcome row is refused
/// (and its call left `pending`) only when this many wait for one commit.
const OUTCOME_BUFFER_MIN: usize = 4096;

/// Outcome rows waiting for the writer's next transaction. Submitting one takes the lock for a
/// push and wakes nobody; the writer swaps the vector out when it commits or on its tick.
struct OutcomeBuffer {
    rows: Mutex<Vec<Pending>>,
    cap: usize,
}

impl OutcomeBuffer {
    fn new(queue: usize) -> OutcomeBuffer {
        OutcomeBuffer {
            rows: Mutex::new(Vec::new()),
            cap: queue.max(OUTCOME_BUFFER_MIN),
        }
    }

    /// Queues `p`; false (and `p` dropped) when the buffer is full.
    fn push(&self, p: Pending) -> bool {
        let Ok(mut g) = self.rows.lock() else {
            return false;
        };
        if g.len() >= self.cap {
            return false;
        }
        g.push(p);
        true
    }

    /// Appends everything buffered to `into` (in submission order).
    fn drain_into(&self, into: &mut Vec<Pending>) {
        if let Ok(mut g) = self.rows.lock() {
            if into.is_empty() {
                std::mem::swap(&mut *g, into);
            } else {
                into.append(&mut g);
            }
        }
    }

    /// Puts rows taken by [`OutcomeBuffer::drain_into`] back in front of newer ones.
    fn put_back(&self, mut rows: Vec<Pending>) {
        if rows.is_empty() {
            return;
        }
        if let Ok(mut g) = self.rows.lock() {
            rows.append(&mut g);
            *g = rows;
        }
    }

    fn len(&self) -> usize {
        self.rows.lock().map(|g| g.len()).unwrap_or(0)
    }
}

enum TicketState {
    Ready(Result<Committed, AuditError>),
    Waiting(oneshot::Receiver<Result<Committed, AuditError>>),
}

/// A submitted row. In `sync` mode it resolves after the row's transaction committed (or failed).
pub struct Ticket {
    id: String,
    state: TicketState,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}

impl Ticket {
    /// The row's id (for a decision: the decision id).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the commit. Forward an allowed call only on `Ok`.
    pub async fn wait(self) -> Result<Committed, AuditError> {
        match self.state {
            TicketState::Ready(r) => r,
            TicketState::Waiting(rx) => rx.await.unwrap_or(Err(AuditError::Closed)),
        }
    }

    /// [`Ticket::wait`] for threads outside an async runtime (it must not be called inside one).
    pub fn wait_blocking(self) -> Result<Committed, AuditError> {
        match self.state {
            TicketState::Ready(r) => r,
            TicketState::Waiting(rx) => rx.blocking_recv().unwrap_or(Err(AuditError::Closed)),
        }
    }
}

struct Pending {
    /// The row, packed on the submitting thread (one allocation).
    row: CompactRow,
    /// Its chain position, set by the writer.
    seq: i64,
    /// SHA-256 of the row's canonical content, computed on the submitting thread.
    digest: [u8; 32],
    reply: Option<Reply>,
    /// `async` mode: the caller already went ahead.
    acked: bool,
}

#[allow(
    clippy::large_enum_variant,
    reason = "rows travel by value in the channel's preallocated slots: boxing would add an allocation per row"
)]
enum Msg {
    Write(Pending),
    Flush(oneshot::Sender<()>),
    Watermark(i64),
    SetMaxBytes(Option<u64>),
    Prune(oneshot::Sender<Result<u64, AuditError>>),
    Shutdown,
}

/// Counters and health, shared by the writer, the shipper and readers of metrics.
#[derive(Debug)]
pub(crate) struct Shared {
    pub healthy: AtomicBool,
    pub last_error: Mutex<String>,
    pub submitted: AtomicU64,
    pub committed_rows: AtomicU64,
    pub commits: AtomicU64,
    pub failed_rows: AtomicU64,
    pub rejected_full: AtomicU64,
    pub write_errors: AtomicU64,
    pub async_rows_lost: AtomicU64,
    pub queued: AtomicI64,
    pub pruned_rows: AtomicU64,
    pub head_seq: AtomicI64,
    pub commit_us_total: AtomicU64,
    /// Times the writer thread was woken by a queued message (not by its timer).
    pub woken: AtomicU64,
    pub shipping: AtomicBool,
    pub ship_healthy: AtomicBool,
    pub shipped_seq: AtomicI64,
    pub shipped_rows: AtomicU64,
    pub ship_errors: AtomicU64,
    pub ship_lag_ms: AtomicU64,
    pub stop: AtomicBool,
    pub stop_notify: tokio::sync::Notify,
    /// The chain head after each commit: readers (the dashboard's stream) wake on it.
    pub committed: tokio::sync::watch::Sender<i64>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(String::new()),
            submitted: AtomicU64::new(0),
            committed_rows: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            failed_rows: AtomicU64::new(0),
            rejected_full: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            async_rows_lost: AtomicU64::new(0),
            queued: AtomicI64::new(0),
            pruned_rows: AtomicU64::new(0),
            head_seq: AtomicI64::new(0),
            commit_us_total: AtomicU64::new(0),
            woken: AtomicU64::new(0),
            shipping: AtomicBool::new(false),
            ship_healthy: AtomicBool::new(true),
            shipped_seq: AtomicI64::new(0),
            shipped_rows: AtomicU64::new(0),
            ship_errors: AtomicU64::new(0),
            ship_lag_ms: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stop_notify: tokio::sync::Notify::new(),
            committed: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn set_error(&self, e: &str) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e.to_string();
        }
    }
}

/// Whether the store is taking writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// The last write error (kept after recovery, for the operator).
    pub last_error: Option<String>,
}

/// A snapshot of the counters (for `/metrics`; see [`Metrics::prometheus`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Metrics {
    pub healthy: bool,
    pub submitted: u64,
    pub committed_rows: u64,
    pub commits: u64,
    pub failed_rows: u64,
    pub rejected_queue_full: u64,
    pub write_errors: u64,
    pub async_rows_lost: u64,
    pub queue_depth: u64,
    pub queue_capacity: u64,
    pub pruned_rows: u64,
    pub head_seq: i64,
    pub commit_time_us: u64,
    /// Fleet shipping (all zero/true when no Postgres is configured).
    pub shipping: bool,
    pub ship_healthy: bool,
    pub shipped_seq: i64,
    pub shipped_rows: u64,
    pub ship_errors: u64,
    pub ship_lag_rows: u64,
    pub ship_lag_ms: u64,
}

impl Metrics {
    /// Prometheus text exposition of the audit metrics.
    pub fn prometheus(&self) -> String {
        let b = |x: bool| u64::from(x);
        use crate::metrics::{Exposition, Kind};
        let lines: [(&str, Kind, &str, String); 18] = [
            (
                "toolgate_audit_healthy",
                Kind::Gauge,
                "1 when audit writes succeed, 0 while they fail (allowed calls get 503)",
                b(self.healthy).to_string(),
            ),
            (
                "toolgate_audit_submitted_total",
                Kind::Counter,
                "Rows handed to the audit writer",
                self.submitted.to_string(),
            ),
            (
                "toolgate_audit_committed_rows_total",
                Kind::Counter,
                "Rows committed",
                self.committed_rows.to_string(),
            ),
            (
                "toolgate_audit_commits_total",
                Kind::Counter,
                "Audit transactions committed",
                self.commits.to_string(),
            ),
            (
                "toolgate_audit_failed_rows_total",
                Kind::Counter,
                "Rows whose transaction failed (their callers got errors)",
                self.failed_rows.to_string(),
            ),
            (
                "toolgate_audit_rejected_queue_full_total",
                Kind::Counter,
                "Submissions refused because the queue was full",
                self.rejected_queue_full.to_string(),
            ),
            (
                "toolgate_audit_write_errors_total",
                Kind::Counter,
                "Failed audit transactions",
                self.write_errors.to_string(),
            ),
            (
                "toolgate_audit_async_rows_lost_total",
                Kind::Counter,
                "async mode: acknowledged rows that failed to commit",
                self.async_rows_lost.to_string(),
            ),
            (
                "toolgate_audit_queue_depth",
                Kind::Gauge,
                "Rows waiting for the writer",
                self.queue_depth.to_string(),
            ),
            (
                "toolgate_audit_queue_capacity",
                Kind::Gauge,
                "Queue bound",
                self.queue_capacity.to_string(),
            ),
            (
                "toolgate_audit_pruned_rows_total",
                Kind::Counter,
                "Rows removed by retention",
                self.pruned_rows.to_string(),
            ),
            (
                "toolgate_audit_head_seq",
                Kind::Gauge,
                "Chain position of the last committed row",
                self.head_seq.to_string(),
            ),
            (
                "toolgate_audit_commit_seconds_total",
                Kind::Counter,
                "Time spent in audit transactions",
                format!("{:.6}", self.commit_time_us as f64 / 1e6),
            ),
            (
                "toolgate_audit_ship_healthy",
                Kind::Gauge,
                "1 when the Postgres shipper is keeping up (or not configured)",
                b(self.ship_healthy).to_string(),
            ),
            (
                "toolgate_audit_shipped_rows_total",
                Kind::Counter,
                "Rows shipped to Postgres",
                self.shipped_rows.to_string(),
            ),
            (
                "toolgate_audit_ship_lag_rows",
                Kind::Gauge,
                "Committed rows not yet in Postgres",
                self.ship_lag_rows.to_string(),
            ),
            (
                "toolgate_audit_ship_lag_seconds",
                Kind::Gauge,
                "Age of the oldest row not yet in Postgres",
                format!("{:.3}", self.ship_lag_ms as f64 / 1e3),
            ),
            (
                "toolgate_audit_ship_errors_total",
                Kind::Counter,
                "Failed attempts to ship to Postgres",
                self.ship_errors.to_string(),
            ),
        ];
        let mut e = Exposition::new();
        for (name, kind, help, value) in lines {
            e.single(name, kind, help, value);
        }
        e.finish()
    }
}

struct Inner {
    tx: SyncSender<Msg>,
    outcomes: Arc<OutcomeBuffer>,
    shared: Arc<Shared>,
    mode: AuditMode,
    gateway: String,
    redactor: super::Redactor,
    path: PathBuf,
    queue: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stop_notify.notify_waiters();
        let _ = self.tx.send(Msg::Shutdown);
        let threads = match self.threads.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => Vec::new(),
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The audit store handle: cheap to clone; the writer stops (after committing what was queued)
/// when the last clone is dropped.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// The writer connection's page cache (KiB). Inserts touch the right edge of the table and of
/// the time index, and one leaf per distinct caller in the principal index. A 32 MiB
/// cache made no measurable difference to the insert rate at 1,000 callers (docs/benchmarks.md)
/// and grew the daemon's resident set by ~14 MiB under the load suite (its RSS-growth check
/// failed), so it stays at 8 MiB.
pub const WRITER_CACHE_KIB: u32 = 8 * 1024;

/// Opens the write connection with the store's pragmas.
pub(crate) fn open_write(
    path: &Path,
    durability: Durability,
    cache_kib: u32,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Before WAL mode, or it does not take: lets retention give pages back with
    // incremental_vacuum. Only a new, empty database changes; existing ones keep theirs.
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
    let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    let sync = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA journal_size_limit = 67108864; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -{cache_kib}; PRAGMA wal_autocheckpoint = {BACKSTOP_CHECKPOINT_PAGES};"
    ))?;
    conn.set_prepared_statement_cache_capacity(32);
    super::rollup::register(&conn)?;
    Ok(conn)
}

/// The writer checkpoints by itself only past this many WAL pages (a backstop): the
/// checkpoint thread normally does it, off the commit path.
const BACKSTOP_CHECKPOINT_PAGES: u32 = 32_768;
/// The checkpoint thread runs a passive checkpoint once the WAL is this large.
const CHECKPOINT_WAL_BYTES: u64 = 8 << 20;

/// Copies WAL pages back into the database from its own connection, so the writer's commits do
/// not pay for checkpoints (and their fsyncs); truncates the WAL when writes pause.
fn checkpointer(path: PathBuf, shared: Arc<Shared>) {
    let conn = match Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "audit checkpoint thread: cannot open the store");
            return;
        }
    };
    let _ = conn.busy_timeout(Duration::from_millis(100));
    let mut wal = path.clone().into_os_string();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    let mut last_head = shared.head_seq.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    let mut truncated = false;
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let head = shared.head_seq.load(Ordering::Relaxed);
        if head != last_head {
            last_head = head;
            quiet_since = Instant::now();
            truncated = false;
        }
        let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let mode = if !truncated && size > 0 && quiet_since.elapsed() >= Duration::from_secs(1) {
            truncated = true;
            "TRUNCATE"
        } else if size >= CHECKPOINT_WAL_BYTES {
            "PASSIVE"
        } else {
            continue;
        };
        if let Err(e) = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(())) {
            tracing::debug!(error = %e, "audit checkpoint");
        }
    }
}

fn set_max_bytes(conn: &Connection, max: Option<u64>) -> rusqlite::Result<()> {
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages = match max {
        Some(b) => i64::try_from(b).unwrap_or(i64::MAX) / page.max(512),
        None => 4_294_967_294,
    };
    let _: i64 = conn.query_row(
        &format!("PRAGMA max_page_count = {}", pages.max(1)),
        [],
        |r| r.get(0),
    )?;
    Ok(())
}

/// Takes the store's lock file: a second toolgate on the same database refuses to start.
fn take_lock(path: &Path) -> Result<Connection, String> {
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let lock = PathBuf::from(lock);
    let c = Connection::open(&lock).map_err(|e| format!("lock file {}: {e}", lock.display()))?;
    c.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT;")
        .map_err(|e| {
            format!(
                "another toolgate process holds the audit store ({}: {e})",
                lock.display()
            )
        })?;
    Ok(c)
}

fn restrict_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

impl AuditLog {
    /// Opens (creating and migrating) the store, starts the writer thread and, when configured,
    /// the Postgres shipper. Fails when the database cannot be opened, is locked by another
    /// toolgate, or is of a newer schema.
    pub fn open(settings: Settings) -> Result<AuditLog, AuditError> {
        let path = settings.path.clone();
        let err = |message: String| AuditError::Open {
            path: path.display().to_string(),
            message,
        };
        super::prepare_dir(&path).map_err(err)?;
        let lock = take_lock(&path).map_err(err)?;
        let key = super::key::load_or_create(&settings.key_file).map_err(err)?;
        let mut conn = open_write(&path, settings.durability, settings.cache_kib)
            .map_err(|e| err(e.to_string()))?;
        restrict_file(&path);
        migrate::sqlite(&mut conn, &key).map_err(err)?;
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('key_id', ?1)",
            params![key.id()],
        )
        .map_err(|e| err(e.to_string()))?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?1)",
            params![new_id()],
        )
        .map_err(|e| err(e.to_string()))?;
        set_max_bytes(&conn, settings.max_db_bytes).map_err(|e| err(e.to_string()))?;
        let (head_seq, head_hash) = chain::tail(&conn).map_err(|e| err(e.to_string()))?;
        let shipped = retention::meta_i64(&conn, "shipped").map_err(|e| err(e.to_string()))?;

        let shared = Arc::new(Shared::new());
        shared.head_seq.store(head_seq, Ordering::Relaxed);
        shared.committed.send_replace(head_seq);
        shared
            .shipped_seq
            .store(shipped.unwrap_or(0), Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(settings.queue);
        let outcomes = Arc::new(OutcomeBuffer::new(settings.queue));
        let writer = Writer {
            conn,
            outcomes: outcomes.clone(),
            _lock: lock,
            path: path.clone(),
            durability: settings.durability,
            cache_kib: settings.cache_kib,
            max_bytes: settings.max_db_bytes,
            rx,
            shared: shared.clone(),
            sync: settings.mode == AuditMode::Sync,
            batch_rows: settings.batch_rows,
            batch_wait: settings.batch_wait,
            head_seq,
            head_hash,
            key,
            lookups: Lookups::default(),
            rollups: Rollups::default(),
            gateway: settings.gateway.clone(),
            watermark: None,
            shipped: if settings.postgres.is_some() {
                Some(shipped.unwrap_or(0))
            } else {
                None
            },
            retention: settings.retention,
            prune_every: settings.prune_every,
            next_prune: Instant::now() + Duration::from_secs(5),
            prune_more: false,
            last_head_log: Instant::now(),
            logged_head: head_seq,
        };
        let mut writer = writer;
        writer.mark_unfinished();
        let mut threads = Vec::new();
        threads.push(
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || writer.run())
                .map_err(|e| err(format!("starting the writer thread: {e}")))?,
        );
        {
            let (p, sh) = (path.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("audit-checkpoint".into())
                    .spawn(move || checkpointer(p, sh))
                    .map_err(|e| err(format!("starting the checkpoint thread: {e}")))?,
            );
        }
        if let Some(pg) = settings.postgres.clone() {
            shared.shipping.store(true, Ordering::Relaxed);
            let wtx = tx.clone();
            let ship = postgres::Shipper {
                db: path.clone(),
                pg,
                shared: shared.clone(),
                report: Box::new(move |w| wtx.try_send(Msg::Watermark(w)).is_ok()),
            };
            threads.push(
                std::thread::Builder::new()
                    .name("audit-shipper".into())
                    .spawn(move || ship.run())
                    .map_err(|e| err(format!("starting the shipper thread: {e}")))?,
            );
        }
        Ok(AuditLog {
            inner: Arc::new(Inner {
                tx,
                outcomes,
                shared,
                mode: settings.mode,
                gateway: settings.gateway,
                redactor: settings.redactor,
                path,
                queue: settings.queue,
                threads: Mutex::new(threads),
            }),
        })
    }

    /// The redaction settings (`audit.arguments`): use
    /// [`super::Redactor::apply_arguments`] to fill a record's digest and arguments.
    pub fn redactor(&self) -> &super::Redactor {
        &self.inner.redactor
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn gateway(&self) -> &str {
        &self.inner.gateway
    }

    pub fn mode(&self) -> AuditMode {
        self.inner.mode
    }

    /// Queues a decision. `Err` (queue full, writer stopped) means: answer 503, forward nothing.
    /// Otherwise await the ticket before forwarding an allowed call.
    pub fn submit(&self, mut rec: Record) -> Result<Ticket, AuditError> {
        if rec.id.is_empty() {
            rec.id = new_id();
        }
        if rec.time.len() != 27 || !rec.time.ends_with('Z') {
            rec.time = normalize_time(&rec.time).unwrap_or_else(now_text);
        }
        let rendered = rec
            .explain_rendered
            .take()
            .filter(|_| rec.explain.is_null());
        self.inner.redactor.scrub_record(&mut rec);
        let mut row = StoredRow::from_record(rec, &self.inner.gateway);
        match rendered {
            // Rendered (scrubbed, capped, digested) once per distinct trace.
            Some(r) => {
                let (text, digest) = r.stored(self.inner.redactor.mode());
                row.explain = text.to_string();
                row.explain_digest = Some(digest);
            }
            None => super::Redactor::cap_explain(&mut row.explain),
        }
        if !store::to_logical(&mut row) {
            row.time = now_text();
            store::to_logical(&mut row);
        }
        let id = row.id.clone();
        let rx = self.enqueue(row)?;
        Ok(Ticket {
            id,
            state: match rx {
                Some(r) => TicketState::Waiting(r),
                None => TicketState::Ready(Ok(Committed { seq: None })),
            },
        })
    }

    /// Records what happened to an allowed decision once the upstream answered (`forwarded`,
    /// `upstream_error:<kind>`, ...), as its own chained row; queries merge the latest outcome
    /// into the decision. `detail` is scrubbed of secrets and capped.
    ///
    /// Nothing waits for an outcome row and it wakes no thread: it commits with the next
    /// decision's transaction, or on the writer's tick ([`OUTCOME_FLUSH`]) when no decision
    /// comes (an idle gateway), so no call stays `pending`. `Err` only when the outcome buffer
    /// is full or the writer has stopped.
    pub fn record_outcome(
        &self,
        decision_id: &str,
        outcome: &str,
        latency_us: Option<u64>,
        detail: &str,
    ) -> Result<(), AuditError> {
        let detail = self.inner.redactor.scrub_text(detail);
        let mut row = StoredRow::outcome(
            decision_id,
            outcome,
            latency_us,
            &detail,
            &self.inner.gateway,
        );
        store::to_logical(&mut row);
        self.enqueue(row).map(|_| ())
    }

    /// [`AuditLog::record_outcome`] with a given time (fixed-width RFC 3339), for building
    /// realistic histories in benchmarks and tests; the gateway always records "now".
    #[doc(hidden)]
    pub fn record_outcome_at(
        &self,
        decision_id: &str,
        outcome: &str,
        latency_us: Option<u64>,
        time: String,
    ) -> Result<(), AuditError> {
        let mut row = StoredRow::outcome(decision_id, outcome, latency_us, "", &self.inner.gateway);
        row.time = time;
        if !store::to_logical(&mut row) {
            return Err(AuditError::Unavailable(format!(
                "outcome time {:?} is not RFC 3339",
                row.time
            )));
        }
        self.enqueue(row).map(|_| ())
    }

    /// Packs `row` and queues it. Decisions get a ticket (a channel in `sync` mode); outcome
    /// rows get neither: nothing waits for them.
    fn enqueue(&self, row: StoredRow) -> Result<Option<oneshot::Receiver<Reply0>>, AuditError> {
        let inner = &*self.inner;
        let digest = content_digest(&row.content());
        let compact = CompactRow::new(&row).ok_or_else(|| {
            AuditError::Unavailable(format!("audit row time {:?} is not RFC 3339", row.time))
        })?;
        drop(row);
        let decision = compact.event == Event::Decision;
        let wait = decision
            && (inner.mode == AuditMode::Sync || !inner.shared.healthy.load(Ordering::Relaxed));
        let (reply, rx) = if wait {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let pending = Pending {
            row: compact,
            seq: 0,
            digest,
            reply,
            acked: !wait && decision,
        };
        if !decision {
            if inner.shared.stop.load(Ordering::Relaxed) {
                return Err(AuditError::Closed);
            }
            if !inner.outcomes.push(pending) {
                inner.shared.rejected_full.fetch_add(1, Ordering::Relaxed);
                return Err(AuditError::QueueFull);
            }
            inner.shared.submitted.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        inner.shared.queued.fetch_add(1, Ordering::Relaxed);
        match inner.tx.try_send(Msg::Write(pending)) {
            Ok(()) => {
                inner.shared.submitted.fetch_add(1, Ordering::Relaxed);
                Ok(rx)
            }
            Err(e) => {
                inner.shared.queued.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => {
                        inner.shared.rejected_full.fetch_add(1, Ordering::Relaxed);
                        Err(AuditError::QueueFull)
                    }
                    TrySendError::Disconnected(_) => Err(AuditError::Closed),
                }
            }
        }
    }

    /// Waits until everything queued before this call is committed (or failed).
    pub fn flush_blocking(&self) -> Result<(), AuditError> {
        let (t, r) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Flush(t))
            .map_err(|_| AuditError::Closed)?;
        r.blocking_recv().map_err(|_| AuditError::Closed)
    }

    /// [`AuditLog::flush_blocking`] for async callers.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (t, r) = oneshot::channel();
        let tx = self.inner.tx.clone();
        // `send` blocks only while the queue is full; keep that off the async workers.
        tokio::task::spawn_blocking(move || tx.send(Msg::Flush(t)).map_err(|_| ()))
            .await
            .map_err(|_| AuditError::Closed)?
            .map_err(|_| AuditError::Closed)?;
        r.await.map_err(|_| AuditError::Closed)
    }

    /// Runs retention now (normally hourly); returns the rows pruned.
    pub fn prune_now_blocking(&self) -> Result<u64, AuditError> {
        let (t, r) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Prune(t))
            .map_err(|_| AuditError::Closed)?;
        r.blocking_recv().map_err(|_| AuditError::Closed)?
    }

    /// Changes the database size cap (`max_page_count`) at run time.
    pub fn set_max_db_bytes(&self, max: Option<u64>) -> Result<(), AuditError> {
        self.inner
            .tx
            .send(Msg::SetMaxBytes(max))
            .map_err(|_| AuditError::Closed)
    }

    /// The chain head, updated right after each commit: wait on it to see new rows at once.
    pub fn head_watch(&self) -> tokio::sync::watch::Receiver<i64> {
        self.inner.shared.committed.subscribe()
    }

    /// Outcome rows waiting for the writer's next transaction (not counted in
    /// [`AuditLog::queue_depth`]: they never hold a call back).
    pub fn outcomes_buffered(&self) -> usize {
        self.inner.outcomes.len()
    }

    /// How often the writer thread was woken by a queued message so far (a decision, a flush,
    /// ...; not its timer ticks): outcome rows never wake it.
    #[doc(hidden)]
    pub fn writer_wakeups(&self) -> u64 {
        self.inner.shared.woken.load(Ordering::Relaxed)
    }

    /// Decision rows waiting for the writer now.
    pub fn queue_depth(&self) -> usize {
        usize::try_from(self.inner.shared.queued.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The queue bound (`audit.queue`).
    pub fn queue_capacity(&self) -> usize {
        self.inner.queue
    }

    pub fn health(&self) -> Health {
        let s = &self.inner.shared;
        let e = s.last_error.lock().map(|g| g.clone()).unwrap_or_default();
        Health {
            healthy: s.healthy.load(Ordering::Relaxed),
            last_error: if e.is_empty() { None } else { Some(e) },
        }
    }

    pub fn metrics(&self) -> Metrics {
        let s = &self.inner.shared;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let head = s.head_seq.load(Ordering::Relaxed);
        let shipping = s.shipping.load(Ordering::Relaxed);
        let shipped = s.shipped_seq.load(Ordering::Relaxed);
        Metrics {
            healthy: s.healthy.load(Ordering::Relaxed),
            submitted: l(&s.submitted),
            committed_rows: l(&s.committed_rows),
            commits: l(&s.commits),
            failed_rows: l(&s.failed_rows),
            rejected_queue_full: l(&s.rejected_full),
            write_errors: l(&s.write_errors),
            async_rows_lost: l(&s.async_rows_lost),
            queue_depth: u64::try_from(s.queued.load(Ordering::Relaxed)).unwrap_or(0),
            queue_capacity: self.inner.queue as u64,
            pruned_rows: l(&s.pruned_rows),
            head_seq: head,
            commit_time_us: l(&s.commit_us_total),
            shipping,
            ship_healthy: !shipping || s.ship_healthy.load(Ordering::Relaxed),
            shipped_seq: shipped,
            shipped_rows: l(&s.shipped_rows),
            ship_errors: l(&s.ship_errors),
            ship_lag_rows: if shipping {
                u64::try_from(head - shipped).unwrap_or(0)
            } else {
                0
            },
            ship_lag_ms: if shipping { l(&s.ship_lag_ms) } else { 0 },
        }
    }
}

struct Writer {
    conn: Connection,
    _lock: Connection,
    path: PathBuf,
    durability: Durability,
    cache_kib: u32,
    max_bytes: Option<u64>,
    rx: Receiver<Msg>,
    /// Outcome rows submitted since the last drain.
    outcomes: Arc<OutcomeBuffer>,
    shared: Arc<Shared>,
    sync: bool,
    batch_rows: usize,
    batch_wait: Duration,
    head_seq: i64,
    head_hash: [u8; 32],
    key: ChainKey,
    lookups: Lookups,
    /// This batch's rollup aggregate and the calls awaiting an outcome.
    rollups: Rollups,
    gateway: String,
    /// A shipped watermark to persist with the next transaction.
    watermark: Option<i64>,
    /// With Postgres: the highest seq known to be shipped (retention never prunes past it).
    shipped: Option<i64>,
    retention: Option<Duration>,
    prune_every: Duration,
    next_prune: Instant,
    prune_more: bool,
    last_head_log: Instant,
    logged_head: i64,
}

enum After {
    Flush(oneshot::Sender<()>),
    Prune(oneshot::Sender<Result<u64, AuditError>>),
}

/// Rows taken from the queue and not committed yet, in arrival order.
#[derive(Default)]
struct Batch {
    rows: Vec<Pending>,
    /// Decisions among `rows`: any one makes the batch commit now.
    decisions: usize,
    /// Flush and prune requests, answered after the commit.
    after: Vec<After>,
}

/// Errors after which the connection is reopened (not disk-full or busy).
fn needs_reopen(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(SystemIoFailure | DatabaseCorrupt | CannotOpen | NotADatabase | ReadOnly)
    )
}

impl Writer {
    fn run(mut self) {
        let mut shutdown = false;
        let mut b = Batch::default();
        // Outcome rows taken from the side buffer for the next transaction.
        let mut outcomes: Vec<Pending> = Vec::new();
        while !shutdown {
            let tick = if self.prune_more {
                Duration::ZERO
            } else {
                OUTCOME_FLUSH
            };
            let first = self.rx.recv_timeout(tick);
            // Take the buffered outcome rows before draining the queue: each was submitted after
            // its decision was queued, so once the queue has been seen empty below, every
            // decision these rows refer to is in this batch or already committed, and the chain
            // never holds an outcome before its decision.
            self.outcomes.drain_into(&mut outcomes);
            match first {
                Ok(m) => {
                    self.shared.woken.fetch_add(1, Ordering::Relaxed);
                    shutdown = self.take(m, &mut b);
                }
                Err(RecvTimeoutError::Timeout) => {
                    if outcomes.is_empty() {
                        self.idle();
                        continue;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => shutdown = true,
            }
            // Group commit: take what else is queued (and, in `async` mode, linger for more
            // decisions). Outcome rows alone never start a commit while a message keeps coming.
            // `sync` mode commits as soon as the queue is empty. Before taking the rest of it,
            // let the threads runnable on this core (the request threads that just woke this
            // one) finish queuing: on a busy core a commit then carries their burst, not its
            // first rows (32 connections on one core: about 30 calls per commit instead of 5;
            // docs/benchmarks.md, "The writer yields before draining"). With nothing else
            // runnable the yield returns at once, so a lone call still waits for no timer.
            if self.sync {
                std::thread::yield_now();
            }
            let started = Instant::now();
            let mut drained = false;
            while !shutdown && b.rows.len() < self.batch_rows && b.after.is_empty() {
                let m = match self.rx.try_recv() {
                    Ok(m) => m,
                    Err(TryRecvError::Disconnected) => {
                        shutdown = true;
                        break;
                    }
                    Err(TryRecvError::Empty) => {
                        let linger = if self.sync {
                            Duration::ZERO
                        } else {
                            self.batch_wait
                        };
                        let waited = started.elapsed();
                        if b.decisions == 0 || waited >= linger {
                            drained = true;
                            break;
                        }
                        match self.rx.recv_timeout(linger - waited) {
                            Ok(m) => {
                                self.shared.woken.fetch_add(1, Ordering::Relaxed);
                                m
                            }
                            Err(RecvTimeoutError::Timeout) => {
                                drained = true;
                                break;
                            }
                            Err(RecvTimeoutError::Disconnected) => {
                                shutdown = true;
                                break;
                            }
                        }
                    }
                };
                shutdown = self.take(m, &mut b);
            }
            if shutdown || !b.after.is_empty() {
                // A flush (or the last commit) covers every outcome row submitted before it:
                // all queued messages ahead of it are taken, so their decisions are here too.
                self.outcomes.drain_into(&mut outcomes);
            } else if !drained {
                // The batch filled up with the queue not seen empty: some of these rows'
                // decisions may still be queued. They go with the next transaction.
                self.outcomes.put_back(std::mem::take(&mut outcomes));
            }
            let commit_now = shutdown
                || b.decisions > 0
                || !b.after.is_empty()
                || !outcomes.is_empty()
                || b.rows.len() >= self.batch_rows;
            if !commit_now {
                continue;
            }
            let mut rows = std::mem::take(&mut b.rows);
            b.decisions = 0;
            rows.append(&mut outcomes);
            self.commit(rows);
            for a in std::mem::take(&mut b.after) {
                match a {
                    After::Flush(t) => {
                        let _ = t.send(());
                    }
                    After::Prune(t) => {
                        let r = self.prune_all();
                        let _ = t.send(r);
                    }
                }
            }
            if self.prune_more || Instant::now() >= self.next_prune {
                self.prune_step();
            }
        }
        self.outcomes.drain_into(&mut outcomes);
        if !b.rows.is_empty() || !outcomes.is_empty() || self.watermark.is_some() {
            let mut rows = std::mem::take(&mut b.rows);
            rows.append(&mut outcomes);
            self.commit(rows);
        }
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
        self.log_head(true);
    }

    /// Allowed calls still `pending` from before this start (the last 10,000 rows) get an
    /// `unknown` outcome row, so they do not look in flight forever.
    fn mark_unfinished(&mut self) {
        let from = self.head_seq - 10_000;
        let found = (|| -> rusqlite::Result<Vec<String>> {
            let mut st = self.conn.prepare(
                "SELECT d.id FROM decisions d WHERE d.seq > ?1 AND +d.outcome = ?2 \
                 AND NOT EXISTS (SELECT 1 FROM outcomes o WHERE o.decision = d.id) ORDER BY d.seq",
            )?;
            let ids = st.query_map(params![from, store::NAME_PENDING], |r| {
                Ok(store::id_text(r.get_ref(0)?))
            })?;
            ids.collect()
        })();
        let ids = match found {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "audit: looking for unfinished calls failed");
                return;
            }
        };
        if ids.is_empty() {
            return;
        }
        let n = ids.len();
        let batch = ids
            .iter()
            .filter_map(|id| {
                let mut row = StoredRow::outcome(
                    id,
                    outcome::UNKNOWN,
                    None,
                    "the gateway stopped before this call's outcome was recorded",
                    &self.gateway,
                );
                store::to_logical(&mut row);
                Some(Pending {
                    digest: content_digest(&row.content()),
                    row: CompactRow::new(&row)?,
                    seq: 0,
                    reply: None,
                    acked: false,
                })
            })
            .collect();
        self.commit(batch);
        tracing::warn!(
            rows = n,
            "audit: allowed calls in flight at the last stop are marked outcome=unknown"
        );
    }

    /// Returns true on shutdown.
    fn take(&mut self, m: Msg, b: &mut Batch) -> bool {
        match m {
            Msg::Write(p) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                if p.row.event == Event::Decision {
                    b.decisions += 1;
                }
                b.rows.push(p);
            }
            Msg::Flush(t) => b.after.push(After::Flush(t)),
            Msg::Prune(t) => b.after.push(After::Prune(t)),
            Msg::Watermark(w) => {
                self.shipped = Some(w);
                self.watermark = Some(w);
            }
            Msg::SetMaxBytes(max) => {
                self.max_bytes = max;
                if let Err(e) = set_max_bytes(&self.conn, max) {
                    tracing::warn!(error = %e, "audit: setting the size cap failed");
                }
            }
            Msg::Shutdown => return true,
        }
        false
    }

    fn idle(&mut self) {
        if self.watermark.is_some() {
            self.commit(Vec::new());
        }
        if self.prune_more || Instant::now() >= self.next_prune {
            self.prune_step();
        }
        self.log_head(false);
    }

    /// Logs the chain head now and then: an external record that makes truncation detectable.
    fn log_head(&mut self, force: bool) {
        if self.head_seq != self.logged_head
            && (force || self.last_head_log.elapsed() >= Duration::from_secs(60))
        {
            tracing::info!(target: "toolgate::audit", seq = self.head_seq, hash = %chain::hex(&self.head_hash), "audit chain head");
            self.logged_head = self.head_seq;
            self.last_head_log = Instant::now();
        }
    }

    /// Writes `batch` in one transaction. `BEGIN` and `COMMIT` are cached statements like the
    /// inserts: `execute_batch` (what rusqlite's `Transaction` runs) parses them on every
    /// commit, which at one connection is every call.
    fn write_batch(&mut self, batch: &mut [Pending]) -> rusqlite::Result<(i64, [u8; 32])> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let written = self.write_rows(batch).and_then(|head| {
            self.conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(head)
        });
        if written.is_err() && !self.conn.is_autocommit() {
            // What dropping an uncommitted `Transaction` does.
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "audit: rolling back a failed batch failed");
            }
        }
        written
    }

    /// The body of [`Writer::write_batch`], inside its transaction.
    fn write_rows(&mut self, batch: &mut [Pending]) -> rusqlite::Result<(i64, [u8; 32])> {
        let tx = &self.conn;
        let mut seq = self.head_seq;
        let mut hash = self.head_hash;
        for p in batch.iter_mut() {
            seq += 1;
            p.seq = seq;
            hash = link(&self.key, &hash, seq, &p.digest);
            store::insert_compact(
                tx,
                &mut self.lookups,
                seq,
                &p.row,
                &hash,
                Some(&mut self.rollups),
            )?;
        }
        self.rollups.flush(tx)?;
        if seq != self.head_seq {
            chain::set_head(tx, &self.key, seq, &hash)?;
        }
        if let Some(w) = self.watermark {
            retention::set_meta(tx, "shipped", &w.to_string())?;
        }
        Ok((seq, hash))
    }

    fn commit(&mut self, mut batch: Vec<Pending>) {
        if batch.is_empty() && self.watermark.is_none() {
            return;
        }
        let t0 = Instant::now();
        let result = self.write_batch(&mut batch);
        match &result {
            Ok(_) => self.lookups.commit(),
            Err(_) => {
                self.lookups.rollback();
                self.rollups.rollback();
            }
        }
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.shared.commit_us_total.fetch_add(us, Ordering::Relaxed);
        let n = batch.len() as u64;
        match result {
            Ok((seq, hash)) => {
                self.head_seq = seq;
                self.head_hash = hash;
                self.watermark = None;
                self.shared.head_seq.store(seq, Ordering::Relaxed);
                self.shared.committed.send_replace(seq);
                self.shared.committed_rows.fetch_add(n, Ordering::Relaxed);
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                if !self.shared.healthy.swap(true, Ordering::SeqCst) {
                    tracing::warn!("audit store recovered: writes succeed again");
                }
                for p in batch {
                    if let Some(r) = p.reply {
                        let _ = r.send(Ok(Committed { seq: Some(p.seq) }));
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                self.shared.set_error(&msg);
                self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                self.shared.failed_rows.fetch_add(n, Ordering::Relaxed);
                if self.shared.healthy.swap(false, Ordering::SeqCst) {
                    tracing::error!(error = %msg, "audit store failing: allowed calls are refused until writes succeed");
                }
                let mut lost = 0u64;
                let mut outcomes = 0u64;
                for p in batch {
                    match p.reply {
                        Some(r) => {
                            let _ = r.send(Err(AuditError::Unavailable(msg.clone())));
                        }
                        None if p.acked => lost += 1,
                        None if p.row.event == Event::Outcome => outcomes += 1,
                        None => {}
                    }
                }
                if outcomes > 0 {
                    tracing::error!(rows = outcomes, error = %msg, "audit: outcome rows could not be committed (their calls stay pending until the next start marks them unknown)");
                }
                if lost > 0 {
                    self.shared
                        .async_rows_lost
                        .fetch_add(lost, Ordering::Relaxed);
                    tracing::error!(rows = lost, error = %msg, "audit (async mode): acknowledged rows could not be committed");
                }
                if needs_reopen(&e) {
                    self.reopen();
                }
            }
        }
    }

    fn reopen(&mut self) {
        match open_write(&self.path, self.durability, self.cache_kib) {
            Ok(c) => {
                if set_max_bytes(&c, self.max_bytes).is_ok()
                    && let Ok((s, h)) = chain::tail(&c)
                {
                    self.head_seq = s;
                    self.head_hash = h;
                    self.conn = c;
                }
            }
            Err(e) => tracing::warn!(error = %e, "audit: reopening the store failed"),
        }
    }

    fn prune_cutoff(&self) -> Option<i64> {
        let keep = self.retention?;
        let keep = chrono::Duration::from_std(keep).ok()?;
        Some((chrono::Utc::now() - keep).timestamp_micros())
    }

    /// One bounded retention transaction; schedules the next.
    fn prune_step(&mut self) {
        self.prune_more = false;
        self.next_prune = Instant::now() + self.prune_every;
        let Some(cutoff) = self.prune_cutoff() else {
            return;
        };
        match self.prune_chunk(cutoff) {
            Ok((_, more)) => self.prune_more = more,
            Err(e) => tracing::warn!(error = %e, "audit retention failed"),
        }
    }

    fn prune_all(&mut self) -> Result<u64, AuditError> {
        let Some(cutoff) = self.prune_cutoff() else {
            return Ok(0);
        };
        let mut total = 0;
        loop {
            let (n, more) = self
                .prune_chunk(cutoff)
                .map_err(|e| AuditError::Unavailable(e.to_string()))?;
            total += n;
            if !more {
                return Ok(total);
            }
        }
    }

    fn prune_chunk(&mut self, cutoff: i64) -> rusqlite::Result<(u64, bool)> {
        let step = retention::prune_chunk(
            &mut self.conn,
            &self.key,
            &mut self.lookups,
            cutoff,
            self.shipped,
            retention::CHUNK_ROWS,
            (self.head_seq, self.head_hash),
            &self.gateway,
        )?;
        if let Some((seq, hash)) = step.new_head {
            self.head_seq = seq;
            self.head_hash = hash;
            self.shared.head_seq.store(seq, Ordering::Relaxed);
        }
        if step.pruned > 0 {
            super::rollup::prune(&self.conn, cutoff)?;
        }
        self.shared
            .pruned_rows
            .fetch_add(step.pruned, Ordering::Relaxed);
        Ok((step.pruned, step.more))
    }
}
