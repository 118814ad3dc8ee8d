//! `toolgate audit query|stats|verify|export`: argument parsing and printing over [`super::query`],
//! [`super::chain`] and [`super::postgres`]. Human output escapes control and bidi characters
//! (names and reasons are caller-controlled); machine output is JSON- or CSV-encoded.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::postgres::{self, PgSettings};
use super::query::{Filter, Reader, Stats, parse_time_bound};
use super::record::{CONTRACT_KEYS, Row, outcome};
use super::shadow::ShadowDiff;
use super::{AuditError, chain};

const DEFAULT_DB: &str = "/var/lib/toolgate/audit.db";
use crate::exit::{
    CONFIG as EXIT_CONFIG, FAILURE as EXIT_BROKEN, UNKEYED as EXIT_UNKEYED, USAGE as EXIT_USAGE,
};
/// Rows the table format shows when no --limit is given.
const TABLE_DEFAULT_LIMIT: usize = 100;
/// Existing rows --follow prints first when no --limit is given.
const FOLLOW_DEFAULT_LIMIT: usize = 10;

/// `toolgate audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Query decisions (oldest first; with --limit N, the newest N).
    ///
    /// The machine formats (json, jsonl, csv) return every matching row unless --limit is given;
    /// the table shows the newest 100 by default. Each row carries its latest outcome.
    ///
    /// Examples: toolgate audit query --since 2h --effect deny
    ///   toolgate audit query --principal alice@example.com --tool create_issue --format jsonl
    ///   toolgate audit query --follow
    Query(QueryArgs),
    /// Totals, top principals and tools, denials and error outcomes over a window.
    Stats(StatsArgs),
    /// Walk the keyed hash chain; report the first break and exit 1 if there is one.
    ///
    /// Needs the chain key (audit.key_file; default audit.key next to the database). Without it,
    /// only linkage is checked (no gaps, genesis or an anchor at the start, the recorded head at
    /// the end) and the exit status is 6. --expect-head, and --against-postgres (the shipped
    /// copy), catch rows removed from the end together with the recorded head.
    Verify(VerifyArgs),
    /// Write a window of the store as a new audit SQLite file, for `policy replay --db`.
    ///
    /// The file has the store's schema, its rows redacted per audit.arguments (from --config,
    /// else the default `digest`; --arguments overrides), and an anchored chain: `audit verify
    /// --db FILE --key KEY` passes on it with the store's key. The source chain is checked while
    /// it is read; a broken source is refused. Needs the chain key.
    ///
    /// Example: toolgate audit export --config /etc/toolgate/toolgate.yaml --since 7d --out last-week.db
    Export(ExportArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArgumentsArg {
    None,
    Digest,
    Redacted,
    Full,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The audit database [default: audit.sqlite from --config, else /var/lib/toolgate/audit.db].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// Take the database, chain key, redaction and gateway name from this toolgate config file.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Decisions from this time: a duration back from now (2h, 30m, 7d), RFC 3339, or a date.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Decisions before this time (same forms as --since) [default: to the end of the store].
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// The file to write (a new audit SQLite database).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// The chain key [default: audit.key_file from --config, else audit.key next to the
    /// database].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// What to keep of call arguments in the file (overrides the config's audit.arguments; a row
    /// is never made less redacted than it was stored).
    #[arg(long, value_enum)]
    pub arguments: Option<ArgumentsArg>,
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// The audit database [default: audit.sqlite from --config, else /var/lib/toolgate/audit.db].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// Take the database path from this toolgate config file.
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Query the fleet database instead (postgres://USER@HOST/DB; ${NAME} reads the environment;
    /// PGPASSWORD is honoured).
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// The fleet database's schema.
    #[arg(long, value_name = "NAME", default_value = "toolgate")]
    pub postgres_schema: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EffectArg {
    Allow,
    Deny,
}

#[derive(Debug, Args)]
pub struct FilterArgs {
    /// From this time: a duration back from now (2h, 30m, 7d), RFC 3339, or a date.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Before this time (same forms as --since).
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// The principal id (a login, or a tagged node's name).
    #[arg(long)]
    pub principal: Option<String>,
    /// The caller's node name.
    #[arg(long)]
    pub node: Option<String>,
    /// A tag of the caller (tag:ci).
    #[arg(long)]
    pub tag: Option<String>,
    /// The upstream server name.
    #[arg(long)]
    pub server: Option<String>,
    /// The tool name (tools/call rows).
    #[arg(long)]
    pub tool: Option<String>,
    /// allow or deny.
    #[arg(long, value_enum)]
    pub effect: Option<EffectArg>,
    /// The outcome (forwarded, denied, upstream_error, ...); a prefix before ':' matches too.
    #[arg(long)]
    pub outcome: Option<String>,
    /// mcp, check, hook or identity.
    #[arg(long)]
    pub kind: Option<String>,
    /// One decision id.
    #[arg(long)]
    pub id: Option<String>,
    /// The gateway that wrote the row (fleet queries).
    #[arg(long)]
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryFormat {
    Table,
    Json,
    Jsonl,
    Csv,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Return the newest N matching rows.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// table (aligned; the default on a terminal), json (an array), jsonl (one object per line;
    /// the default otherwise), csv.
    #[arg(long, value_enum)]
    pub format: Option<QueryFormat>,
    /// Keep printing new rows as they are committed (starts with the newest --limit, default 10).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// List the decisions the shadow policies (`policies.shadow`) decide differently: the
    /// decision id, the live effect/policy/rule and the shadow effect/policy/rule.
    #[arg(long, conflicts_with = "follow")]
    pub shadow_diff: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatsFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Entries per top list.
    #[arg(long, default_value = "10")]
    pub top: usize,
    /// text (for people, fitted to the terminal) or json.
    #[arg(long, value_enum, default_value = "text")]
    pub format: StatsFormat,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// The chain key [default: audit.key_file from --config, else audit.key next to the
    /// database]. With --postgres: one key per gateway to check (repeat the flag).
    #[arg(long, value_name = "FILE")]
    pub key: Vec<PathBuf>,
    /// The chain head seen earlier (HASH or SEQ:HASH, e.g. from the "audit chain head" log
    /// line or the Postgres copy): the chain must still reach it.
    #[arg(long, value_name = "HASH")]
    pub expect_head: Option<String>,
    /// Also cross-check this store against its PostgreSQL copy (postgres://USER@HOST/DB, the
    /// schema from --postgres-schema): every shipped row must still be here with the same hash,
    /// and the chain must reach the last seq shipped. Catches rows removed from the end together
    /// with a rewritten or replayed head.
    #[arg(long, value_name = "URL")]
    pub against_postgres: Option<String>,
}

/// Runs one `toolgate audit` command. Every error names the command and the store it read:
/// `error: audit query (/var/lib/toolgate/audit.db): ...`. Malformed flags exit 2, a bad
/// config 5, anything that fails while reading the store 1.
pub fn run(cmd: AuditCommand) -> ExitCode {
    let (name, source, filter) = match &cmd {
        AuditCommand::Export(a) => return run_export(a),
        AuditCommand::Query(a) => ("audit query", &a.source, Some(&a.filter)),
        AuditCommand::Stats(a) => ("audit stats", &a.source, Some(&a.filter)),
        AuditCommand::Verify(a) => ("audit verify", &a.source, None),
    };
    if let Some(Err(e)) = filter.map(filter_from_args) {
        eprintln!("error: {name}: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if let Some(e) = misuse(&cmd) {
        eprintln!("error: {name}: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let store = match &source.postgres {
        Some(_) => format!("PostgreSQL schema {}", source.postgres_schema),
        None => match db_path(source) {
            Ok(p) => p.display().to_string(),
            Err(e) => {
                eprintln!("error: {name}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let r = match &cmd {
        AuditCommand::Query(a) => run_query(a),
        AuditCommand::Stats(a) => run_stats(a),
        AuditCommand::Verify(a) => run_verify(a),
        AuditCommand::Export(a) => return run_export(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {name} ({store}): {}", said_once(&e, &store));
            ExitCode::from(EXIT_BROKEN)
        }
    }
}

/// The error without the prefixes the line already carries (`audit query: `, the path).
fn said_once<'a>(e: &'a str, store: &str) -> &'a str {
    let e = e.strip_prefix("audit query: ").unwrap_or(e);
    let e = e.strip_prefix("audit store ").unwrap_or(e);
    e.strip_prefix(store)
        .and_then(|r| r.strip_prefix(": "))
        .unwrap_or(e)
}

/// Flags that do not go together.
fn misuse(cmd: &AuditCommand) -> Option<&'static str> {
    match cmd {
        AuditCommand::Query(a) if a.follow && a.format == Some(QueryFormat::Json) => {
            Some("--follow prints one row at a time: use --format jsonl, csv or table")
        }
        AuditCommand::Query(a) if a.follow && a.source.postgres.is_some() => {
            Some("--follow reads the local store; it does not work with --postgres")
        }
        AuditCommand::Verify(a) if a.against_postgres.is_some() && a.source.postgres.is_some() => {
            Some("--against-postgres checks a local store against its copy; drop --postgres")
        }
        AuditCommand::Stats(a) if a.source.postgres.is_some() => {
            Some("stats reads the local store; use `audit query --postgres` for the fleet")
        }
        _ => None,
    }
}

fn db_path(s: &SourceArgs) -> Result<PathBuf, String> {
    if let Some(db) = &s.db {
        return Ok(db.clone());
    }
    if let Some(cfg) = &s.config {
        let audit = crate::config::load_audit(cfg).map_err(|e| e.to_string())?;
        return Ok(audit.sqlite);
    }
    Ok(PathBuf::from(DEFAULT_DB))
}

fn pg_settings(s: &SourceArgs, url: &str) -> PgSettings {
    PgSettings {
        url: url.to_string(),
        schema: s.postgres_schema.clone(),
        batch_rows: 500,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// The filter the flags describe (limit not included).
pub fn filter_from_args(a: &FilterArgs) -> Result<Filter, String> {
    let now = chrono::Utc::now();
    let time = |flag: &str, v: &Option<String>| -> Result<Option<String>, String> {
        v.as_deref()
            .map(|s| parse_time_bound(s, now).map_err(|e| format!("--{flag}: {e}")))
            .transpose()
    };
    Ok(Filter {
        since: time("since", &a.since)?,
        until: time("until", &a.until)?,
        principal: a.principal.clone(),
        node: a.node.clone(),
        tag: a.tag.clone(),
        server: a.server.clone(),
        tool: a.tool.clone(),
        effect: a.effect.map(|e| match e {
            EffectArg::Allow => "allow".to_string(),
            EffectArg::Deny => "deny".to_string(),
        }),
        outcome: a.outcome.clone(),
        kind: a.kind.clone(),
        id: a.id.clone(),
        gateway: a.gateway.clone(),
        ..Filter::default()
    })
}

fn run_query(a: &QueryArgs) -> Result<ExitCode, String> {
    let format = a.format.unwrap_or(if std::io::stdout().is_terminal() {
        QueryFormat::Table
    } else {
        QueryFormat::Jsonl
    });
    let mut f = filter_from_args(&a.filter)?;
    f.limit = a.limit;
    if a.shadow_diff {
        f.kind = Some(super::Kind::Shadow.as_str().to_string());
        let rows = match &a.source.postgres {
            Some(url) => {
                let pg = pg_settings(&a.source, url);
                runtime()?
                    .block_on(async {
                        let mut c = postgres::connect_existing(&pg).await?;
                        postgres::query(&mut c, &f).await
                    })
                    .map_err(|e| e.to_string())?
            }
            None => Reader::open(&db_path(&a.source)?)
                .and_then(|r| r.query(&f))
                .map_err(|e| e.to_string())?,
        };
        let diffs: Vec<ShadowDiff> = rows.iter().filter_map(ShadowDiff::from_row).collect();
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        return match print_diffs(format, &diffs, &mut out).and_then(|()| out.flush()) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
            Err(e) => Err(e.to_string()),
        };
    }
    if a.follow {
        if format == QueryFormat::Json {
            return Err(
                "--follow prints one row at a time: use --format jsonl, csv or table".into(),
            );
        }
        if a.source.postgres.is_some() {
            return Err("--follow reads the local store; it does not work with --postgres".into());
        }
        f.limit = Some(a.limit.unwrap_or(FOLLOW_DEFAULT_LIMIT));
    } else if format == QueryFormat::Table && f.limit.is_none() {
        f.limit = Some(TABLE_DEFAULT_LIMIT);
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = |e: std::io::Error| e.to_string();
    if let Some(url) = &a.source.postgres {
        let pg = pg_settings(&a.source, url);
        let rows = runtime()?.block_on(async {
            let mut c = postgres::connect_existing(&pg).await?;
            postgres::query(&mut c, &f).await
        });
        let rows = rows.map_err(|e| e.to_string())?;
        let mut p = Printer::new(
            format,
            &rows,
            a.limit.is_none() && format == QueryFormat::Table,
            output_width(),
        );
        p.begin(&mut out).map_err(io)?;
        for r in &rows {
            p.row(&mut out, r).map_err(io)?;
        }
        p.end(&mut out).map_err(io)?;
        out.flush().map_err(io)?;
        return Ok(ExitCode::SUCCESS);
    }
    let path = db_path(&a.source)?;
    let reader = Reader::open(&path).map_err(|e| e.to_string())?;
    if !a.follow {
        if format == QueryFormat::Table {
            let rows = reader.query(&f).map_err(|e| e.to_string())?;
            let mut p = Printer::new(format, &rows, a.limit.is_none(), output_width());
            p.begin(&mut out).map_err(io)?;
            for r in &rows {
                p.row(&mut out, r).map_err(io)?;
            }
            p.end(&mut out).map_err(io)?;
        } else {
            let mut p = Printer::new(format, &[], false, output_width());
            p.begin(&mut out).map_err(io)?;
            let mut err = None;
            reader
                .for_each(&f, &mut |r| match p.row(&mut out, &r) {
                    Ok(()) => true,
                    Err(e) => {
                        err = Some(e);
                        false
                    }
                })
                .map_err(|e| e.to_string())?;
            if let Some(e) = err {
                // A closed pipe (| head) is not an error worth a message.
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(ExitCode::SUCCESS);
                }
                return Err(e.to_string());
            }
            p.end(&mut out).map_err(io)?;
        }
        out.flush().map_err(io)?;
        return Ok(ExitCode::SUCCESS);
    }
    follow(&reader, f, format, &mut out)
}

/// `--follow`: prints the newest rows, then polls for new ones. A just-committed allowed call
/// whose outcome is still pending is held back up to 2 s so its row shows the outcome.
fn follow(
    reader: &Reader,
    f: Filter,
    format: QueryFormat,
    out: &mut impl Write,
) -> Result<ExitCode, String> {
    let io = |e: std::io::Error| e.to_string();
    let first = reader.query(&f).map_err(|e| e.to_string())?;
    let mut p = Printer::new(format, &first, false, output_width());
    p.begin(out).map_err(io)?;
    let mut cursor = first
        .iter()
        .map(|r| r.seq)
        .max()
        .unwrap_or(0)
        .max(if first.is_empty() {
            reader.head_seq().map_err(|e| e.to_string())?
        } else {
            0
        });
    for r in &first {
        p.row(out, r).map_err(io)?;
    }
    out.flush().map_err(io)?;
    let mut next = f.clone();
    next.limit = None;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        next.after_seq = Some(cursor);
        let mut rows = reader.query(&next).map_err(|e| e.to_string())?;
        rows.sort_by_key(|r| r.seq);
        let young = super::record::format_time(chrono::Utc::now() - chrono::Duration::seconds(2));
        for r in rows {
            if r.outcome == outcome::PENDING && r.time > young {
                break;
            }
            match p.row(out, &r) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return Err(e.to_string()),
            }
            cursor = r.seq;
        }
        match out.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn run_stats(a: &StatsArgs) -> Result<ExitCode, String> {
    let mut f = filter_from_args(&a.filter)?;
    if f.since.is_none() && a.filter.since.is_none() {
        f.since = Some(parse_time_bound("24h", chrono::Utc::now())?);
    }
    if a.source.postgres.is_some() {
        return Err(
            "stats reads the local store; use `audit query --postgres` for the fleet".into(),
        );
    }
    let reader = Reader::open(&db_path(&a.source)?).map_err(|e| e.to_string())?;
    let st = reader.stats(&f, a.top).map_err(|e| e.to_string())?;
    match a.format {
        StatsFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?
        ),
        StatsFormat::Text => print!("{}", stats_text(&st, output_width())),
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit stats` as text, fitted to `width` (names cut with an ellipsis).
pub fn stats_text(st: &Stats, width: Option<usize>) -> String {
    use std::fmt::Write as _;
    let width = width.unwrap_or(usize::MAX);
    let mut s = String::new();
    let fit = |s: &mut String, line: String| {
        let _ = writeln!(s, "{}", cut(&line, width).trim_end());
    };
    fit(
        &mut s,
        format!(
            "window: {} .. {}",
            st.since.as_deref().unwrap_or("start"),
            st.until.as_deref().unwrap_or("now")
        ),
    );
    fit(
        &mut s,
        format!(
            "decisions: {} (allowed {}, denied {})",
            st.decisions, st.allowed, st.denied
        ),
    );
    let key = |k: &str| {
        if k.is_empty() {
            UNIDENTIFIED.to_string()
        } else {
            escape_human(k).into_owned()
        }
    };
    let list = |s: &mut String, title: &str, items: &[super::query::Count], empty: &str| {
        let _ = writeln!(s, "\n{title}:");
        if items.is_empty() {
            let _ = writeln!(s, "  (none)");
        }
        let tail = |c: &super::query::Count| format!("  {:>8}  ({} denied)", c.count, c.denied);
        let longest = items
            .iter()
            .map(|c| key_or(c, empty, &key).chars().count())
            .max();
        let room = items
            .iter()
            .map(|c| width.saturating_sub(2 + tail(c).chars().count()))
            .min()
            .unwrap_or(0);
        let w = longest.unwrap_or(0).min(room.max(4));
        for c in items {
            let name = clip(&key_or(c, empty, &key), w);
            fit(s, format!("  {name}{}", tail(c)));
        }
    };
    list(&mut s, "top principals", &st.top_principals, UNIDENTIFIED);
    list(&mut s, "top tools", &st.top_tools, "(none)");
    let _ = writeln!(s, "\ntop denials:");
    if st.top_denials.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    for d in &st.top_denials {
        fit(
            &mut s,
            format!(
                "  {:>8}  {} → {}  ({}#{})",
                d.count,
                key(&d.principal),
                escape_human(&d.tool),
                escape_human(&d.policy),
                escape_human(&d.rule)
            ),
        );
    }
    let _ = writeln!(s, "\nerror outcomes:");
    if st.error_outcomes.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    for c in &st.error_outcomes {
        fit(
            &mut s,
            format!("  {:>8}  {}", c.count, escape_human(&c.key)),
        );
    }
    s
}

/// A top-list key for humans; an empty one as `empty`.
fn key_or(c: &super::query::Count, empty: &str, key: &dyn Fn(&str) -> String) -> String {
    if c.key.is_empty() {
        empty.to_string()
    } else {
        key(&c.key)
    }
}

fn run_verify(a: &VerifyArgs) -> Result<ExitCode, String> {
    if let Some(url) = &a.source.postgres {
        let keys = a
            .key
            .iter()
            .map(|p| super::key::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        let pg = pg_settings(&a.source, url);
        let (n, breaks, unkeyed) = runtime()?
            .block_on(async {
                let mut c = postgres::connect_existing(&pg).await?;
                postgres::verify(&mut c, &keys).await
            })
            .map_err(|e: AuditError| e.to_string())?;
        for store in &unkeyed {
            eprintln!(
                "note: store {store}: no --key for its chain; checked linkage only, not content"
            );
        }
        if breaks.is_empty() {
            println!("ok: {n} rows; every shipped chain is intact");
            return Ok(if unkeyed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_UNKEYED)
            });
        }
        for (store, b) in breaks {
            println!("BROKEN: store {store}: {b}");
        }
        return Ok(ExitCode::from(EXIT_BROKEN));
    }
    let path = db_path(&a.source)?;
    let key_path = match (a.key.first(), &a.source.config) {
        (Some(k), _) => k.clone(),
        (None, Some(cfg)) => {
            let audit = crate::config::load_audit(cfg).map_err(|e| e.to_string())?;
            audit
                .key_file
                .unwrap_or_else(|| super::key::default_path(&audit.sqlite))
        }
        (None, None) => super::key::default_path(&path),
    };
    let key = match super::key::load(&key_path) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!(
                "warning: {e}\nwarning: without the chain key only linkage is checked (no gaps, genesis or anchor, head); an edited row is not detected"
            );
            None
        }
    };
    let reader = Reader::open(&path).map_err(|e| e.to_string())?;
    let rep = reader
        .verify_with(key.as_ref(), a.expect_head.as_deref())
        .map_err(|e| e.to_string())?;
    let code = print_report(&path.display().to_string(), &rep);
    let Some(url) = &a.against_postgres else {
        return Ok(code);
    };
    let pg = pg_settings(&a.source, url);
    let x = runtime()?
        .block_on(async {
            let mut c = postgres::connect_existing(&pg).await?;
            postgres::cross_check(&mut c, reader.connection()).await
        })
        .map_err(|e: AuditError| e.to_string())?;
    let copy = format!(
        "PostgreSQL copy ({}, schema {})",
        postgres::redact_url(url),
        pg.schema
    );
    match &x.broken {
        Some(b) => {
            println!("BROKEN: {} against its {copy}: {b}", path.display());
            Ok(ExitCode::from(EXIT_BROKEN))
        }
        None if x.shipped_through == 0 => {
            println!(
                "note: the {copy} holds no rows of store {}: nothing to cross-check",
                x.store_id
            );
            Ok(code)
        }
        None => {
            println!(
                "ok: matches its {copy} through seq {} ({} rows compared, {} pruned here, {} of the old unkeyed chain not comparable); local head seq {}",
                x.shipped_through, x.matched, x.pruned, x.legacy, x.local_head
            );
            Ok(code)
        }
    }
}

/// `audit export`: bad flags exit 2 (a bad --since, an existing --out without --force), a bad
/// config 5, anything else 1. A summary goes to stdout, a progress bar to a terminal's stderr.
fn run_export(a: &ExportArgs) -> ExitCode {
    let name = "audit export";
    let now = chrono::Utc::now();
    let bound = |flag: &str, v: &Option<String>| -> Result<Option<String>, String> {
        v.as_deref()
            .map(|s| parse_time_bound(s, now).map_err(|e| format!("--{flag}: {e}")))
            .transpose()
    };
    let bounds = bound("since", &a.since).and_then(|s| Ok((s, bound("until", &a.until)?)));
    let (since, until) = match bounds {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {name}: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let (Some(s), Some(u)) = (&since, &until)
        && s >= u
    {
        eprintln!("error: {name}: --since ({s}) is not before --until ({u})");
        return ExitCode::from(EXIT_USAGE);
    }
    if a.out.exists() && !a.force {
        eprintln!(
            "error: {name}: {} exists; pass --force to replace it",
            a.out.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let audit = match &a.config {
        Some(cfg) => match crate::config::load_audit(cfg) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {name}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => crate::config::AuditConfig::default(),
    };
    let db = a.db.clone().unwrap_or_else(|| {
        if a.config.is_some() {
            audit.sqlite.clone()
        } else {
            PathBuf::from(DEFAULT_DB)
        }
    });
    if a.out == db {
        eprintln!("error: {name}: --out is the store itself");
        return ExitCode::from(EXIT_USAGE);
    }
    let key_path = a.key.clone().unwrap_or_else(|| {
        audit
            .key_file
            .clone()
            .filter(|_| a.config.is_some())
            .unwrap_or_else(|| super::key::default_path(&db))
    });
    let fail = |e: &str| {
        eprintln!("error: {name} ({}): {e}", db.display());
        ExitCode::from(EXIT_BROKEN)
    };
    let key = match super::key::load(&key_path) {
        Ok(k) => k,
        Err(e) => {
            return fail(&format!(
                "{e}; the export needs the store's chain key to check the source chain and anchor the file (--key FILE)"
            ));
        }
    };
    let mut redaction = audit.clone();
    if let Some(m) = a.arguments {
        redaction.arguments = match m {
            ArgumentsArg::None => crate::config::ArgumentsMode::None,
            ArgumentsArg::Digest => crate::config::ArgumentsMode::Digest,
            ArgumentsArg::Redacted => crate::config::ArgumentsMode::Redacted,
            ArgumentsArg::Full => crate::config::ArgumentsMode::Full,
        };
    }
    let opts = super::export::Options {
        db: db.clone(),
        out: a.out.clone(),
        key,
        redactor: super::Redactor::from_config(&redaction),
        since,
        until,
        force: a.force,
        gateway: audit.gateway.clone().unwrap_or_else(super::host_name),
    };
    let bar = if std::io::stderr().is_terminal() {
        let total = match super::export::planned_rows(&opts) {
            Ok(n) => n,
            Err(e) => return fail(&e),
        };
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} rows ({per_sec}, {eta} left)",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let r = super::export::export(&opts, &|n| bar.inc(n));
    bar.finish_and_clear();
    match r {
        Ok(s) => {
            let hashes = match s.rechained_from {
                None => "every row keeps its source hash".to_string(),
                Some(seq) => format!(
                    "{} rows redacted further than stored; hashes match the source before seq {seq}",
                    s.redacted
                ),
            };
            println!(
                "exported {} rows ({} decisions), seq {}..{}, from {} to {}; {hashes}; head {}",
                s.rows,
                s.decisions,
                s.first_seq,
                s.last_seq,
                db.display(),
                a.out.display(),
                s.head
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn print_report(what: &str, rep: &chain::Report) -> ExitCode {
    match &rep.broken {
        None => {
            let range = match (rep.first_seq, rep.last_seq) {
                (Some(a), Some(b)) => format!("seq {a}..{b}"),
                _ => "empty".to_string(),
            };
            let anchor = rep
                .anchor
                .as_ref()
                .map(|a| {
                    format!(
                        "; older rows pruned through seq {} (anchored)",
                        a.pruned_through_seq
                    )
                })
                .unwrap_or_default();
            let head = rep
                .head
                .as_ref()
                .map(|h| format!("; head {h}"))
                .unwrap_or_default();
            if rep.keyed {
                println!(
                    "ok: {what}: {} rows, {range}, chain intact{anchor}{head}",
                    rep.rows
                );
                ExitCode::SUCCESS
            } else {
                println!(
                    "linkage ok, content NOT checked (no key): {what}: {} rows, {range}{anchor}{head}",
                    rep.rows
                );
                ExitCode::from(EXIT_UNKEYED)
            }
        }
        Some(b) => {
            println!("BROKEN: {what}: {b}");
            ExitCode::from(EXIT_BROKEN)
        }
    }
}

/// Escapes what must not reach a terminal raw: control characters, bidi overrides, zero-width
/// characters (caller-controlled names and reasons).
pub fn escape_human(s: &str) -> Cow<'_, str> {
    let bad = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
    };
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            o.push_str(&c.escape_unicode().to_string());
        } else {
            o.push(c);
        }
    }
    Cow::Owned(o)
}

fn csv_field(s: &str) -> Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

const TABLE_COLS: [(&str, usize); 10] = [
    ("TIME", 19),
    ("ID", 36),
    ("PRINCIPAL", 40),
    ("SERVER", 20),
    ("TOOL", 32),
    ("EFFECT", 6),
    ("OUTCOME", 24),
    ("LATENCY", 10),
    ("RULE", 40),
    ("REASON", 60),
];

/// How a caller without a tailnet identity shows in human output.
pub const UNIDENTIFIED: &str = "(unidentified)";

/// The width human output must fit: the terminal's, else `COLUMNS`, else none (no fitting).
pub fn output_width() -> Option<usize> {
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        if let Ok(ws) = rustix::termios::tcgetwinsize(&stdout) {
            if ws.ws_col > 0 {
                return Some(usize::from(ws.ws_col));
            }
        }
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|&c: &usize| c > 0)
}

/// Narrows the widest columns, one character at a time, until the line (with two spaces
/// between columns) fits `width`; no column goes below its header or 4 characters.
fn fit_widths(widths: &mut [usize], floors: &[usize], width: usize) {
    let line = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
    while line(widths) > width {
        let widest = widths
            .iter()
            .enumerate()
            .filter(|(i, w)| **w > floors[*i])
            .max_by_key(|(_, w)| **w)
            .map(|(i, _)| i);
        match widest {
            Some(i) => widths[i] -= 1,
            None => break,
        }
    }
}

fn table_cells(r: &Row) -> [String; 10] {
    let time = r.time.get(..19).unwrap_or(&r.time).replace('T', " ");
    let tool = if r.tool.is_empty() {
        r.method.clone()
    } else {
        r.tool.clone()
    };
    let latency = r
        .latency_us
        .map(|l| format!("{:.1}ms", l as f64 / 1000.0))
        .unwrap_or_default();
    let rule = match (r.policy.is_empty(), r.rule.is_empty()) {
        (true, true) => String::new(),
        (false, true) => r.policy.clone(),
        _ => format!("{}#{}", r.policy, r.rule),
    };
    let principal = if r.principal.is_empty() {
        UNIDENTIFIED.to_string()
    } else {
        r.principal.clone()
    };
    [
        time,
        r.id.clone(),
        principal,
        r.server.clone(),
        tool,
        r.effect.clone(),
        r.outcome.clone(),
        latency,
        rule,
        r.reason.clone(),
    ]
    .map(|c| escape_human(&c).into_owned())
}

/// `s` cut to `w` characters, the last one an ellipsis when anything was cut.
fn cut(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// `s` cut to `w` characters and padded with spaces to exactly `w` (a table cell). Padded by
/// hand: `format!("{s:<w$}")` panics for widths beyond `u16::MAX`.
fn clip(s: &str, w: usize) -> String {
    let mut t = cut(s, w);
    let n = t.chars().count();
    t.extend(std::iter::repeat_n(' ', w.saturating_sub(n)));
    t
}

/// `--shadow-diff`: the differences in one format (the table: one line per difference).
fn print_diffs(
    format: QueryFormat,
    diffs: &[ShadowDiff],
    out: &mut impl Write,
) -> std::io::Result<()> {
    let json = |d: &ShadowDiff| serde_json::to_string(d).map_err(std::io::Error::other);
    match format {
        QueryFormat::Jsonl => {
            for d in diffs {
                writeln!(out, "{}", json(d)?)?;
            }
        }
        QueryFormat::Json => {
            let all = serde_json::to_string_pretty(diffs).map_err(std::io::Error::other)?;
            writeln!(out, "{all}")?;
        }
        QueryFormat::Csv => {
            writeln!(out, "{}", ShadowDiff::KEYS.join(","))?;
            for d in diffs {
                let cells: Vec<String> = d
                    .cells()
                    .iter()
                    .map(|c| csv_field(c).into_owned())
                    .collect();
                writeln!(out, "{}", cells.join(","))?;
            }
        }
        QueryFormat::Table => {
            let side = |s: &super::shadow::Side| {
                let by = if s.rule.is_empty() {
                    s.policy.clone()
                } else {
                    format!("{}#{}", s.policy, s.rule)
                };
                format!("{:<5} {}", s.effect, escape_human(&by))
            };
            let lines: Vec<[String; 6]> = diffs
                .iter()
                .map(|d| {
                    [
                        d.time.clone(),
                        d.decision_id.clone(),
                        escape_human(&d.principal).into_owned(),
                        escape_human(&d.action).into_owned(),
                        side(&d.live),
                        side(&d.shadow),
                    ]
                })
                .collect();
            let head = ["TIME", "DECISION", "PRINCIPAL", "ACTION", "LIVE", "SHADOW"];
            let mut widths = head.map(str::len);
            for l in &lines {
                for (w, c) in widths.iter_mut().zip(l) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let print = |out: &mut dyn Write, cells: &[&str]| {
                let line: Vec<String> = cells.iter().zip(widths).map(|(c, w)| clip(c, w)).collect();
                writeln!(out, "{}", line.join("  ").trim_end())
            };
            print(out, &head)?;
            for l in &lines {
                print(out, &l.each_ref().map(String::as_str))?;
            }
        }
    }
    Ok(())
}

/// Streams rows in one format.
struct Printer {
    format: QueryFormat,
    widths: [usize; 10],
    count: usize,
    note_limit: bool,
}

impl Printer {
    /// `sample`: rows used to size the table's columns; `width`: the line's limit.
    fn new(format: QueryFormat, sample: &[Row], note_limit: bool, width: Option<usize>) -> Printer {
        let mut widths = [0usize; 10];
        for (i, (h, max)) in TABLE_COLS.iter().enumerate() {
            let w = sample
                .iter()
                .map(|r| table_cells(r)[i].chars().count())
                .max()
                .unwrap_or(0);
            widths[i] = w.max(h.len()).min(*max);
        }
        if let Some(width) = width {
            let floors = TABLE_COLS.map(|(h, _)| h.len().max(4));
            fit_widths(&mut widths, &floors, width);
        }
        Printer {
            format,
            widths,
            count: 0,
            note_limit: note_limit && sample.len() >= TABLE_DEFAULT_LIMIT,
        }
    }

    fn begin(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        match self.format {
            QueryFormat::Table => {
                let line: Vec<String> = TABLE_COLS
                    .iter()
                    .enumerate()
                    .map(|(i, (h, _))| clip(h, self.widths[i]))
                    .collect();
                writeln!(out, "{}", line.join("  ").trim_end())
            }
            QueryFormat::Csv => writeln!(out, "{}", CONTRACT_KEYS.join(",")),
            QueryFormat::Json => write!(out, "["),
            QueryFormat::Jsonl => Ok(()),
        }
    }

    fn row(&mut self, out: &mut impl Write, r: &Row) -> std::io::Result<()> {
        self.count += 1;
        match self.format {
            QueryFormat::Table => {
                let cells = table_cells(r);
                let line: Vec<String> = cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| clip(c, self.widths[i]))
                    .collect();
                writeln!(out, "{}", line.join("  ").trim_end())
            }
            QueryFormat::Csv => {
                let cells: Vec<String> = CONTRACT_KEYS
                    .iter()
                    .map(|k| csv_field(&r.text(k)).into_owned())
                    .collect();
                writeln!(out, "{}", cells.join(","))
            }
            QueryFormat::Json => {
                let sep = if self.count > 1 { ",\n" } else { "\n" };
                write!(
                    out,
                    "{sep}{}",
                    serde_json::to_string(r).map_err(std::io::Error::other)?
                )
            }
            QueryFormat::Jsonl => writeln!(
                out,
                "{}",
                serde_json::to_string(r).map_err(std::io::Error::other)?
            ),
        }
    }

    fn end(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        match self.format {
            QueryFormat::Json => writeln!(out, "{}]", if self.count > 0 { "\n" } else { "" }),
            QueryFormat::Table if self.note_limit => writeln!(
                out,
                "(the newest {TABLE_DEFAULT_LIMIT} rows; use --limit N or a machine format for more)"
            ),
            _ => Ok(()),
        }
    }
}

/// Rows as the aligned human table of `audit query --format table`, fitted to `width`.
pub fn table_text(rows: &[Row], width: Option<usize>) -> String {
    let mut out = Vec::new();
    let mut p = Printer::new(QueryFormat::Table, rows, false, width);
    let _ = p.begin(&mut out);
    for r in rows {
        let _ = p.row(&mut out, r);
    }
    let _ = p.end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_the_width_with_an_ellipsis_and_name_the_unidentified() {
        let row = Row {
            time: "2026-12-06T18:00:00.123Z".into(),
            id: "0193a0b1-0000-7000-8000-000000000001".into(),
            principal: String::new(),
            server: "github".into(),
            tool: "create_issue".into(),
            effect: "deny".into(),
            outcome: "denied".into(),
            policy: "resource.mcp_server.vdefault".into(),
            rule: "developers_read".into(),
            reason: "no rule allowed tools/call::create_issue for this principal".into(),
            ..Row::default()
        };
        let wide = table_text(std::slice::from_ref(&row), None);
        assert!(wide.contains(UNIDENTIFIED), "{wide}");
        assert!(wide.contains("no rule allowed tools/call::create_issue for this principal"));
        for width in [80, 100, 120] {
            let text = table_text(std::slice::from_ref(&row), Some(width));
            for line in text.lines() {
                assert!(line.chars().count() <= width, "{width}: {line:?}");
            }
            assert!(text.contains('…'), "{width}: {text}");
            assert!(text.starts_with("TIME"), "{text}");
        }
        let st = Stats {
            top_principals: vec![
                super::super::query::Count {
                    key: String::new(),
                    count: 3,
                    denied: 3,
                },
                super::super::query::Count {
                    key: "a-very-long-principal-name@an-even-longer-domain.example.com".into(),
                    count: 1,
                    denied: 0,
                },
            ],
            ..Stats::default()
        };
        let text = stats_text(&st, Some(50));
        assert!(text.contains(UNIDENTIFIED), "{text}");
        assert!(text.contains('…'), "{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= 50, "{line:?}");
        }
    }

    #[test]
    fn human_output_is_escaped() {
        assert_eq!(escape_human("Eve\u{202e}gnp.exe"), "Eve\\u{202e}gnp.exe");
        assert_eq!(escape_human("a\nb\x1b[31m"), "a\\u{a}b\\u{1b}[31m");
        assert_eq!(escape_human("plain"), "plain");
    }

    #[test]
    fn csv_quotes_when_needed() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
