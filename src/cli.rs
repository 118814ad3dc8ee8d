//! The `toolgate` command line: argument parsing and printing. The work lives in the modules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::policy::input::{CheckInput, Evaluation, Params, Principal, Resource};
use crate::policy::{eval, store, suite};

/// toolgate: authorize every AI-agent tool call by tailnet identity and Cerbos-compatible policy.
#[derive(Debug, Parser)]
#[command(name = "toolgate", version, about, long_about = None, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `toolgate --help`'s footer: the exit codes of [`exit`].
const EXIT_CODES: &str = "Exit codes: 0 success; 1 runtime failure (serve stopped on an error, a doctor FAIL, an \
unreadable audit store, a broken audit chain); 2 usage error; 3 policies do not compile (or none where \
serve needs them); 4 policy tests failed; policy replay: 1 when a decision would change, 3 on any error; 5 config file missing or invalid; 6 audit verify had no chain key (linkage only).";

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
enum Command {
    /// Run the gateway daemon.
    ///
    /// Reads the config, waits for tailscaled to be Running, binds this node's tailnet
    /// addresses and authorizes every MCP call. SIGHUP reloads policies; SIGTERM drains.
    Serve {
        /// The config file (YAML; see the README's config reference).
        #[arg(long, short, default_value = "/etc/toolgate/config.yaml")]
        config: PathBuf,
    },
    /// Run a self-contained demo on loopback: gateway, sample MCP server, three identities.
    ///
    /// No tailscaled and no network needed. Prints every decision and the audit table.
    Demo {
        /// Keep the files (config, policies, audit.db) here instead of a temporary folder.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the gateway running after the script, to try a real MCP client against it.
        #[arg(long)]
        keep_running: bool,
        /// The gateway's port on 127.0.0.1 (default: a free one), e.g. to point a client at a
        /// fixed address with --keep-running.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Print the principal (JSON) a peer address maps to, as the gateway would see it.
    Whois(crate::doctor::WhoisArgs),
    /// Check this machine: tailscaled, node, HTTPS certificates, policies, audit store.
    Doctor(crate::doctor::DoctorArgs),
    /// Compile, test and explain policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Query, summarize and verify the audit trail.
    #[command(subcommand)]
    Audit(Box<crate::audit::cli::AuditCommand>),
    /// Print a shell completion script.
    ///
    /// Example: toolgate completions bash > /etc/bash_completion.d/toolgate
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Internal: runs between toolgate and a stdio MCP server (see `stdio/launch.rs`).
    #[command(name = "__stdio-launch", hide = true)]
    StdioLaunch(crate::stdio::launch::LaunchArgs),
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
enum PolicyCommand {
    /// Compile every policy under DIR; print every error with its file and YAML path.
    ///
    /// Exit 0 when everything compiles, 3 on compile errors (as `cerbos compile`). An empty
    /// directory is a warning; with --config it is an error, as for `serve` (the unit's
    /// ExecReload runs `policy check --config` before it signals a reload).
    Check {
        /// The policy directory (read recursively; hidden files, testdata/ and *_test.yaml skipped).
        #[arg(required_unless_present = "config", conflicts_with = "config")]
        dir: Option<PathBuf>,
        /// Check the policies.dir of this config file, as `serve` would load it.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run the Cerbos test suites (*_test.yaml) under DIR.
    ///
    /// Exit 0 when every test passes, 3 on compile errors, 4 on test failures.
    Test(TestArgs),
    /// Explain a decision: which policies, scopes and rules decided each action, and why.
    ///
    /// Example: toolgate policy explain policies/ --principal '{"id":"alice","roles":["developer"]}'
    ///   --resource '{"kind":"mcp_server","id":"github","attr":{"tool_name":"create_issue"}}'
    ///   --action tools/call::create_issue
    Explain(ExplainArgs),
    /// Replay recorded decisions from an audit store under a candidate policy set.
    ///
    /// Every decision of the window is evaluated again (now() at its recorded time, globals
    /// from --config) and the changes are reported by direction, principal, tool and the rule
    /// that now decides. Exit 0 when nothing changes, 1 when something does, 3 on error.
    ///
    /// Example: toolgate policy replay --db audit.db --policies ./policies --since 7d
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The audit store (SQLite, schema v4 or later; `audit export` writes one).
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
    /// The candidate policy directory.
    #[arg(long, value_name = "DIR")]
    policies: PathBuf,
    /// A config file whose policies.globals, evaluation and schema_enforcement apply (default:
    /// no globals, strict, none).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Decisions at or after this time: a duration back (90s, 2h, 7d), RFC 3339, or a date.
    #[arg(long)]
    since: Option<String>,
    /// Decisions before this time (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Only this principal's decisions (its id, e.g. alice@example.com).
    #[arg(long)]
    principal: Option<String>,
    /// Only decisions on this server.
    #[arg(long)]
    server: Option<String>,
    /// Only decisions on this tool.
    #[arg(long)]
    tool: Option<String>,
    /// table (human), json (the whole report), jsonl (one line per changed or needs-arguments
    /// decision, then a summary line).
    #[arg(long, value_enum, default_value = "table")]
    format: ReplayFormat,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Evaluate every decision, even when one with identical inputs was evaluated before
    /// (checks the memo: the report is the same, only slower).
    #[arg(long, hide = true)]
    no_memo: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ReplayFormat {
    Table,
    Json,
    Jsonl,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TestFormat {
    Text,
    Json,
    Junit,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EvalMode {
    Strict,
    Lenient,
}

impl From<EvalMode> for Evaluation {
    fn from(m: EvalMode) -> Self {
        match m {
            EvalMode::Strict => Evaluation::Strict,
            EvalMode::Lenient => Evaluation::Lenient,
        }
    }
}

#[derive(Debug, Args)]
struct TestArgs {
    /// The policy directory holding policies and *_test.yaml suites.
    dir: PathBuf,
    /// Output format: text (human), json (Cerbos TestResults, as `cerbos compile --output=json`), junit.
    #[arg(long, value_enum, default_value = "text")]
    format: TestFormat,
    /// Also list the rules, conditions and actions that no test exercised.
    #[arg(long)]
    coverage: bool,
    /// Run only tests whose "suite/test" name matches this regex.
    #[arg(long, value_name = "REGEX")]
    run: Option<String>,
    /// strict: Cerbos's strictEvaluation, an evaluation error that reaches an action denies it
    /// (default). lenient: Cerbos's default handling, for compatibility runs.
    #[arg(long, value_enum, default_value = "strict")]
    evaluation: EvalMode,
}

#[derive(Debug, Args)]
struct ExplainArgs {
    /// The policy directory.
    dir: PathBuf,
    /// The principal as Cerbos JSON: {"id":..,"roles":[..],"attr":{..}}.
    #[arg(long)]
    principal: String,
    /// The resource as Cerbos JSON: {"kind":..,"id":..,"attr":{..}}.
    #[arg(long)]
    resource: String,
    /// An action to check (repeatable).
    #[arg(long = "action", required = true)]
    actions: Vec<String>,
    /// Auxiliary data as CEL sees it, e.g. {"jwt":{"sub":"x"}}.
    #[arg(long)]
    aux_data: Option<String>,
    /// The instant now() returns (RFC 3339); default: the current time.
    #[arg(long)]
    now: Option<String>,
    /// strict (default) or lenient, as for `policy test`.
    #[arg(long, value_enum, default_value = "strict")]
    evaluation: EvalMode,
    /// Print the full JSON (decision, outputs, errors, trace) instead of text.
    #[arg(long)]
    json: bool,
}

/// The command line's definition (help, completions, and the test that every flag has help).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Demo {
            dir,
            keep_running,
            port,
        } => demo(dir, keep_running, port),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "toolgate", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Whois(args) => crate::doctor::whois_cmd(&args),
        Command::Doctor(args) => crate::doctor::doctor_cmd(&args),
        Command::Policy(PolicyCommand::Check { dir, config }) => {
            policy_check(dir.as_deref(), config.as_deref())
        }
        Command::Policy(PolicyCommand::Test(args)) => policy_test(&args),
        Command::Policy(PolicyCommand::Explain(args)) => policy_explain(&args),
        Command::Policy(PolicyCommand::Replay(args)) => policy_replay(&args),
        Command::Audit(cmd) => crate::audit::cli::run(*cmd),
        Command::StdioLaunch(args) => crate::stdio::launch::run(&args),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn init_logs(format: Option<crate::config::LogFormat>, level: Option<&str>) {
    crate::logging::init(format, level);
}

fn serve(config: &std::path::Path) -> ExitCode {
    let cfg = match crate::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logs(cfg.log.format, cfg.log.level.as_deref());
    let result = runtime().and_then(|rt| rt.block_on(crate::daemon::serve(cfg)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(dir: Option<PathBuf>, keep_running: bool, port: Option<u16>) -> ExitCode {
    init_logs(Some(crate::config::LogFormat::Text), Some("warn"));
    let opts = crate::demo::Options {
        dir,
        keep_running,
        port,
    };
    match runtime().and_then(|rt| rt.block_on(crate::demo::run(opts))) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

use crate::exit::{
    COMPILE as EXIT_COMPILE, CONFIG as EXIT_CONFIG, TESTS as EXIT_TESTS, USAGE as EXIT_USAGE,
};

fn print_compile_errors(errors: &[crate::policy::compile::CompileError]) {
    for e in errors {
        eprintln!("error: {e}");
    }
    eprintln!("{} error(s)", errors.len());
}

fn policy_check(dir: Option<&std::path::Path>, config: Option<&std::path::Path>) -> ExitCode {
    let (dir, as_serve) = match (dir, config) {
        (Some(d), _) => (d.to_path_buf(), false),
        (None, Some(c)) => match crate::config::load_policies(c) {
            Ok(p) => (p.dir, true),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        (None, None) => {
            eprintln!("error: policy check needs DIR or --config FILE");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match store::load_dir(&dir) {
        Ok(set) if set.is_empty() => {
            if as_serve {
                eprintln!(
                    "error: {} holds no policies: `toolgate serve` refuses to start (or reload) with none",
                    dir.display()
                );
                return ExitCode::from(EXIT_COMPILE);
            }
            eprintln!(
                "warning: {} holds no policies (*.yaml, *.yml, *.json outside testdata/ and *_test files); every request would be denied",
                dir.display()
            );
            println!("ok: 0 policies compiled from {}", dir.display());
            ExitCode::SUCCESS
        }
        Ok(set) => {
            println!(
                "ok: {} policies compiled from {} (snapshot {})",
                set.len(),
                dir.display(),
                &set.hash[..12]
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_compile_errors(&errors);
            ExitCode::from(EXIT_COMPILE)
        }
    }
}

fn policy_test(args: &TestArgs) -> ExitCode {
    let set = match store::load_dir(&args.dir) {
        Ok(set) => set,
        Err(errors) => {
            print_compile_errors(&errors);
            return ExitCode::from(EXIT_COMPILE);
        }
    };
    let run = match args.run.as_deref().map(regex::Regex::new).transpose() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: --run: invalid regex: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let opts = suite::Options {
        evaluation: args.evaluation.into(),
        run,
    };
    let report = suite::run(&args.dir, &set, &opts);
    match args.format {
        TestFormat::Text => {
            print!("{}", report.to_text());
            if args.coverage {
                print!("{}", report.coverage_text());
            }
        }
        TestFormat::Json => {
            let mut v = report.results.clone();
            if args.coverage {
                if let serde_json::Value::Object(m) = &mut v {
                    m.insert("coverage".into(), report.coverage_json());
                }
            }
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        TestFormat::Junit => print!("{}", report.to_junit()),
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TESTS)
    }
}

/// `policy replay`: 0 unchanged, 1 changed, 3 error. `jsonl` streams the changed rows as the
/// replay finds them (oldest first), then the summary line.
fn policy_replay(a: &ReplayArgs) -> ExitCode {
    let lines: Option<Box<dyn std::io::Write + Send>> = match a.format {
        ReplayFormat::Jsonl => Some(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        _ => None,
    };
    match replay_report(a, lines) {
        Ok(r) => {
            let out = match a.format {
                ReplayFormat::Table => crate::replay::table(&r),
                ReplayFormat::Json => serde_json::to_string_pretty(&r).unwrap_or_default() + "\n",
                ReplayFormat::Jsonl => serde_json::json!({ "summary": &r }).to_string() + "\n",
            };
            print!("{out}");
            ExitCode::from(u8::from(r.changed > 0))
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

fn replay_report(
    a: &ReplayArgs,
    lines: Option<Box<dyn std::io::Write + Send>>,
) -> Result<crate::replay::Report, String> {
    use std::io::IsTerminal;
    let now = chrono::Utc::now();
    let bound = |v: &Option<String>| -> Result<Option<String>, String> {
        v.as_deref()
            .map(|s| crate::audit::query::parse_time_bound(s, now))
            .transpose()
    };
    let mut params = Params::default();
    if let Some(c) = &a.config {
        let p = crate::config::load_policies(c).map_err(|e| e.to_string())?;
        params.globals = p.globals;
        params.evaluation = p.evaluation;
        params.schema_enforcement = p.schema_enforcement;
    }
    let opts = crate::replay::Options {
        db: a.db.clone(),
        policies: a.policies.clone(),
        params,
        since: bound(&a.since)?,
        until: bound(&a.until)?,
        principal: a.principal.clone(),
        server: a.server.clone(),
        tool: a.tool.clone(),
        threads: a.threads,
        no_memo: a.no_memo,
    };
    let bar = if std::io::stderr().is_terminal() {
        let total = crate::replay::count(&opts.db, &opts)?;
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} decisions ({per_sec}, {eta} left)",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = crate::replay::run(&opts, &|n| bar.inc(n), lines);
    bar.finish_and_clear();
    report
}

fn parse_json<T: serde::de::DeserializeOwned>(flag: &str, s: &str) -> Result<T, String> {
    serde_json::from_str(s).map_err(|e| format!("--{flag}: {e}"))
}

fn policy_explain(args: &ExplainArgs) -> ExitCode {
    let inputs = (|| -> Result<(Principal, Resource, serde_json::Value, Params), String> {
        let principal: Principal = parse_json("principal", &args.principal)?;
        let resource: Resource = parse_json("resource", &args.resource)?;
        let aux = match &args.aux_data {
            Some(s) => parse_json("aux-data", s)?,
            None => serde_json::Value::Null,
        };
        let mut params = Params {
            evaluation: args.evaluation.into(),
            ..Params::default()
        };
        if let Some(now) = &args.now {
            params.now = chrono::DateTime::parse_from_rfc3339(now)
                .map_err(|e| format!("--now: {e}"))?
                .with_timezone(&chrono::Utc);
        }
        Ok((principal, resource, aux, params))
    })();
    let (principal, resource, aux_data, params) = match inputs {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let set = match store::load_dir(&args.dir) {
        Ok(set) => set,
        Err(errors) => {
            print_compile_errors(&errors);
            return ExitCode::from(EXIT_COMPILE);
        }
    };
    let input = CheckInput {
        principal,
        resource,
        actions: args.actions.clone(),
        aux_data,
    };
    let out = eval::check(&set, &input, &params);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    print!("{}", explain_text(&out));
    ExitCode::SUCCESS
}

/// The explain trace as text, one action after another.
pub fn explain_text(out: &eval::CheckOutput) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "policies consulted: {}",
        if out.trace.policies.is_empty() {
            "none".to_string()
        } else {
            out.trace.policies.join(", ")
        }
    );
    for d in &out.trace.derived_roles {
        let _ = writeln!(
            s,
            "derived role {} (scope {:?}): {}{}",
            d.name,
            d.scope,
            if d.active { "active" } else { "inactive" },
            d.error
                .as_ref()
                .map(|e| format!(" (error: {e})"))
                .unwrap_or_default()
        );
    }
    for a in &out.actions {
        let _ = writeln!(s, "\n{} → {}", a.action, eval::effect_name(a.effect));
        let _ = writeln!(s, "  {}", a.reason);
        for st in out.trace.steps.iter().filter(|st| st.action == a.action) {
            let _ = writeln!(
                s,
                "  - [{}{}] {}#{} {:?} → {:?}{}",
                st.pass,
                st.role
                    .as_ref()
                    .map(|r| format!(" role={r}"))
                    .unwrap_or_default(),
                st.policy,
                st.rule,
                st.effect,
                st.outcome,
                st.error
                    .as_ref()
                    .map(|e| format!(" (error: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    for e in &out.evaluation_errors {
        let _ = writeln!(
            s,
            "\nevaluation error in {}#{} ({}): {}: {}",
            e.policy, e.rule, e.action, e.expression, e.message
        );
    }
    for o in &out.outputs {
        let _ = writeln!(
            s,
            "output {} ({}): {}",
            o.src,
            o.action,
            o.val
                .as_ref()
                .map(|v| v.to_string())
                .or(o.error.clone())
                .unwrap_or_default()
        );
    }
    s
}
