//! The Cerbos-compatible decision API (`/api/check/resources`, `/api/plan/resources`,
//! `/api/server_info`, `/_cerbos/health`): the same policies and the same audit trail as the
//! MCP path, answered in Cerbos's exact JSON so its SDKs work unchanged.
//!
//! - [`request`]: the request bodies, parsed and validated as Cerbos does (pure).
//! - [`response`]: the response bodies from the engine's output (pure).
//! - [`status`]: `google.rpc.Status` errors and their HTTP statuses (pure).
//! - [`jwt`]: `auxData` tokens verified against the configured key sets.
//! - [`access`]: who may ask, and for whom (`pdp.callers`, `pdp.self_only`).
//! - [`http`]: the axum routes: identity, access, limits, evaluation, audit, answer.

pub mod access;
pub mod http;
pub mod jwt;
pub mod request;
pub mod response;
pub mod status;
