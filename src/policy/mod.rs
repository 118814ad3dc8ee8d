//! The policy engine: Cerbos-compatible policies, compiled once, evaluated purely.
//!
//! - [`model`]: the policy files' serde types.
//! - [`input`]: what a check asks about (principal, resource, actions, params).
//! - [`cel`]: the CEL environment (Cerbos's functions, load-time checks, bounded evaluation).
//! - [`glob`]: Cerbos's `:`-separated globs for actions, roles and kinds.
//! - [`compile`]: policy files → an indexed, immutable [`compile::PolicySet`].
//! - [`eval`]: the Cerbos evaluation algorithm over a `PolicySet`, with an explain trace.
//! - [`plan`]: query planning (Cerbos `PlanResources`) by partial evaluation of conditions.
//! - [`replay`]: one recorded decision evaluated again under a candidate set (`policy replay`).
//! - [`store`]: loading a policy directory and swapping snapshots atomically.
//! - [`yaml_merge`]: YAML merge keys, applied with positions kept (used by [`parse`]).
//!
//! This module does no network I/O and knows nothing of tokio, HTTP or SQL.

pub mod cel;
pub mod compile;
pub mod eval;
pub mod glob;
pub mod input;
pub mod model;
pub mod parse;
pub mod plan;
pub mod replay;
pub mod store;
pub mod suite;
pub mod yaml_merge;
