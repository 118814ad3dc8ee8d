//! The Aperture hook: Aperture by Tailscale (<https://tailscale.com/docs/aperture>) calls
//! toolgate before each LLM request and after each response, and toolgate answers from the
//! same policies and the same audit trail as the MCP gateway.
//!
//! - [`call`]: `HookCallData` → typed, and the event a body is (pure).
//! - [`provider`]: tool uses and offered tools in Anthropic and OpenAI bodies; a body minus
//!   some tools (pure).
//! - [`check`]: the asserted principal and each tool's resource and actions (pure).
//! - [`http`]: the routes: who may call, the API key, the tagged-device lookup in tailscaled's
//!   status, decisions, audit rows and the `GuardrailResponse`.

pub mod call;
pub mod check;
pub mod http;
pub mod provider;
