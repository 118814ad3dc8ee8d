//! Cerbos `*_test.yaml` suites: discovery, fixtures, running, and Cerbos `TestResults` output
//! (reference: cerbos.md §4; Cerbos's `internal/verify`).
//!
//! - Every `*_test.{yaml,yml,json}` under the directory is a suite (hidden files and
//!   `testdata/` directories are skipped). Fixtures come from a `testdata/` directory next to
//!   the suite file; the suite's own definitions win.
//! - The test matrix is principals × resources × actions; an action or (principal, resource)
//!   pair without an expectation expects `EFFECT_DENY`.
//! - A suite that cannot be read, parsed or validated becomes one `RESULT_ERRORED` entry with
//!   its `error`; nothing here panics.
//! - Coverage comes from the engine's explain traces of every check the tests made.
//!
//! Submodules: `model` (file shapes and validation), `runner` (matrix and checks),
//! [`results`] (JSON, text, JUnit), [`coverage`].

use std::path::Path;

use super::compile::PolicySet;
use super::input::Evaluation;
use super::store;

pub mod coverage;
mod model;
pub mod results;
mod runner;
#[cfg(test)]
mod tests;

pub use coverage::Coverage;
pub use results::{Outcome, Results};

/// How to run the suites.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Default evaluation mode; a suite's `options.strictEvaluation: true` forces strict.
    pub evaluation: Evaluation,
    /// Only tests whose `suite name/test name` matches run (others are skipped).
    pub run: Option<regex::Regex>,
}

/// The outcome of running every suite under a directory.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Cerbos `cerbos.policy.v1.TestResults` JSON.
    pub results: serde_json::Value,
    pub passed: bool,
    /// The results tree behind `results`, with the engine's reasons and evaluation errors.
    pub tree: Results,
    pub coverage: Coverage,
}

impl Report {
    /// Suites, tests and failures (expected vs actual, the engine's reason, CEL errors),
    /// ending with `N passed, M failed[, K skipped]`.
    pub fn to_text(&self) -> String {
        self.tree.to_text()
    }

    /// JUnit XML, one `testcase` per action checked.
    pub fn to_junit(&self) -> String {
        self.tree.to_junit()
    }

    /// Rules, conditions and actions that no test exercised, as text.
    pub fn coverage_text(&self) -> String {
        self.coverage.to_text()
    }

    pub fn coverage_json(&self) -> serde_json::Value {
        self.coverage.to_json()
    }
}

/// Runs every suite under `dir` against `set`.
pub fn run(dir: &Path, set: &PolicySet, opts: &Options) -> Report {
    let ctx = runner::RunCtx {
        root: dir,
        set,
        opts,
        now: chrono::Utc::now(),
    };
    let mut tree = Results::default();
    let mut collector = coverage::Collector::new(set);
    match store::read_dir(dir) {
        Ok(contents) => {
            let mut fixtures = runner::FixtureCache::new();
            for path in &contents.tests {
                tree.push(runner::run_suite(&ctx, path, &mut fixtures, &mut collector));
            }
        }
        Err(errors) => {
            let msg: Vec<String> = errors.iter().map(ToString::to_string).collect();
            tree.push(results::SuiteResult::errored(
                "",
                "Unknown",
                "",
                format!("failed to read {}: {}", dir.display(), msg.join("; ")),
            ));
        }
    }
    let mut coverage = collector.finish();
    coverage.locate(|file| std::fs::read_to_string(dir.join(file)).ok());
    Report {
        results: tree.to_json(),
        passed: tree.passed(),
        tree,
        coverage,
    }
}
