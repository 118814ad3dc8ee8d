//! The audit trail: every decision as an insert-only, hash-chained row in SQLite, written by one
//! batching writer thread off the request path, queried read-only, pruned by retention, and
//! optionally shipped to PostgreSQL for a fleet (DESIGN.md §1 step 6, I2, I5, I6).
//!
//! - [`record`]: the row ([`Record`], built by the gateway) and its stored/query forms.
//! - [`writer`]: [`AuditLog`] (open, submit → [`Ticket`], outcomes, health, metrics).
//! - [`chain`]: the keyed hash chain and `audit verify`; [`key`]: the per-install chain key.
//! - [`store`]: the v3 tables (decisions, outcomes, anchors, lookups) ↔ logical rows.
//! - [`redact`]: `audit.arguments` and secret scrubbing.
//! - [`query`]: filters, `audit query`/`stats`, the `/api/audit` reader.
//! - [`retention`]: pruning from the oldest end, with anchors.
//! - [`export`]: a window of the store as a new, verifiable audit file (`audit export`).
//! - [`shadow`]: shadow rows (`policies.shadow`) and the differences they record.
//! - [`summary`]: the dashboard's aggregates over a window, from rollups or an indexed scan.
//! - [`rollup`]: per-minute counts and latency histograms the writer keeps for the dashboard.
//! - [`postgres`]: the fleet shipper and fleet queries.
//! - [`migrate`]: embedded SQL migrations; [`cli`]: `toolgate audit ...`.

pub mod chain;
pub mod cli;
pub mod compact;
pub mod export;
pub mod key;
pub mod links;
pub mod migrate;
pub mod postgres;
pub mod query;
pub mod record;
pub mod redact;
pub mod retention;
pub mod rollup;
pub mod shadow;
pub mod store;
pub mod summary;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

pub use record::{Effect, Kind, Record, Row, outcome};
pub use redact::Redactor;
pub use writer::{AuditLog, Committed, Health, Metrics, Ticket};

use crate::config::{AuditConfig, AuditMode, Durability};

/// Why an audit write or read failed. The gateway maps [`AuditError::retry_after`] errors to
/// `503` with `Retry-After` and forwards nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The writer's queue is full: the store is falling behind.
    #[error("audit queue full")]
    QueueFull,
    /// The row could not be committed (disk full, I/O error, ...).
    #[error("audit store unavailable: {0}")]
    Unavailable(String),
    /// The writer has stopped.
    #[error("audit writer stopped")]
    Closed,
    /// Opening or migrating the store failed.
    #[error("audit store {path}: {message}")]
    Open { path: String, message: String },
    /// A read failed.
    #[error("audit query: {0}")]
    Query(String),
    /// Postgres (fleet) errors; never contain the password.
    #[error("audit postgres: {0}")]
    Postgres(String),
}

impl AuditError {
    /// `Some` when the caller should answer 503 with this `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AuditError::QueueFull | AuditError::Unavailable(_) | AuditError::Closed => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for AuditError {
    fn from(e: rusqlite::Error) -> Self {
        AuditError::Query(e.to_string())
    }
}

/// Everything [`AuditLog::open`] needs (the runtime form of [`AuditConfig`]).
#[derive(Debug, Clone)]
pub struct Settings {
    pub path: PathBuf,
    pub mode: AuditMode,
    pub durability: Durability,
    pub batch_rows: usize,
    pub batch_wait: Duration,
    pub queue: usize,
    pub retention: Option<Duration>,
    /// How often retention runs (default hourly).
    pub prune_every: Duration,
    pub max_db_bytes: Option<u64>,
    /// This gateway's name in every row.
    pub gateway: String,
    pub postgres: Option<postgres::PgSettings>,
    pub redactor: Redactor,
    /// The chain key file (`audit.key_file`; default `audit.key` next to the database).
    pub key_file: PathBuf,
    /// The writer connection's page cache, KiB ([`writer::WRITER_CACHE_KIB`]; benchmarks vary
    /// it).
    #[doc(hidden)]
    pub cache_kib: u32,
}

impl Settings {
    pub fn from_config(cfg: &AuditConfig) -> Settings {
        Settings {
            path: cfg.sqlite.clone(),
            mode: cfg.mode,
            durability: cfg.durability,
            batch_rows: cfg.batch_rows.max(1),
            batch_wait: Duration::from_millis(cfg.batch_ms),
            queue: cfg.queue.max(1),
            retention: cfg.retention,
            prune_every: Duration::from_secs(3600),
            max_db_bytes: cfg.max_db_bytes,
            gateway: cfg.gateway.clone().unwrap_or_else(host_name),
            postgres: cfg.postgres.as_ref().map(|url| postgres::PgSettings {
                url: url.clone(),
                schema: cfg.postgres_schema.clone(),
                batch_rows: 500,
            }),
            redactor: Redactor::from_config(cfg),
            key_file: cfg
                .key_file
                .clone()
                .unwrap_or_else(|| key::default_path(&cfg.sqlite)),
            cache_kib: writer::WRITER_CACHE_KIB,
        }
    }

    /// Defaults for a database at `path` (tests, tools).
    pub fn for_path(path: impl Into<PathBuf>) -> Settings {
        let cfg = AuditConfig {
            sqlite: path.into(),
            ..AuditConfig::default()
        };
        Settings::from_config(&cfg)
    }
}

/// The machine's host name (the default gateway name).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "toolgate".to_string())
}

/// Creates the folder that will hold `path` (a database or key file), private to this user
/// (0700), when it is missing. Shared by the store and the chain key.
pub(crate) fn prepare_dir(path: &std::path::Path) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    Ok(())
}
