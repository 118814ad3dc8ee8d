//! toolgate: a tool-call authorization gateway for AI agents on a Tailscale tailnet.
//!
//! The crate is one package with a thin binary (`src/main.rs`). Modules:
//! - [`policy`]: the Cerbos-compatible policy engine. Pure: no I/O on the evaluation path,
//!   no tokio, no HTTP, no SQL (the store reads files only when asked to load).
//! - [`cli`]: the `toolgate` command line.
//! - [`replay`]: `toolgate policy replay`, the audit history evaluated under candidate policies.
//! - [`shadow`]: `policies.shadow`, a second policy set evaluated beside every live decision,
//!   off the request path; differences become audit rows of kind `shadow`.

pub mod audit;
pub mod backoff;
pub mod budget;
pub mod caller;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dashboard;
pub mod demo;
pub mod doctor;
pub mod exit;
pub mod gateway;
pub mod hook;
pub mod identity;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod pdp;
pub mod policy;
pub mod read_api;
pub mod replay;
pub mod sample;
pub mod server;
pub mod shadow;
pub mod stdio;
pub mod systemd;
pub mod tailnet;
