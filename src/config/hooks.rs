//! `hooks:`: webhook endpoints for LLM gateways. Today one, `hooks.aperture` (Aperture by
//! Tailscale, <https://tailscale.com/docs/aperture>): `POST /hooks/aperture/pre_request`,
//! `/hooks/aperture/post_response` and `/hooks/aperture`.

use std::ops::RangeInclusive;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Cx, Problems};

/// `hooks:` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// The Aperture hook; absent: the hook routes answer 404.
    #[serde(default)]
    pub aperture: Option<ApertureHookConfig>,
}

/// `hooks.aperture`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApertureHookConfig {
    /// WhoIs tags of the Aperture node (`tag:aperture`): only a tagged caller holding one of
    /// them may call the hook.
    #[serde(default = "default_callers")]
    pub callers: Vec<String>,
    /// A file holding the API key Aperture sends (`Authorization: Bearer KEY` or
    /// `X-Api-Key: KEY`); absent: no key is asked for (the tag alone admits the caller).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The resource kind tools are checked under (default `aperture_tool`).
    #[serde(default = "default_resource_kind")]
    pub resource_kind: String,
    /// The resource scope (Cerbos scopes; default none).
    #[serde(default)]
    pub scope: String,
    /// `status_code` of a `block` answer for a denied tool (default 403).
    #[serde(default = "default_block_status")]
    pub block_status: u16,
    /// Bytes of one `HookCallData` body at most (default 16 MiB: `request_body` is the whole
    /// conversation).
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// JSON values in one body at most (default 1,000,000).
    #[serde(default = "default_max_nodes")]
    pub max_nodes: usize,
}

/// `hooks.aperture.callers` default.
pub const DEFAULT_CALLER: &str = "tag:aperture";
/// `hooks.aperture.resource_kind` default.
pub const DEFAULT_RESOURCE_KIND: &str = "aperture_tool";
/// `hooks.aperture.max_body` default and bounds.
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;
pub const MAX_BODY: RangeInclusive<usize> = 1024..=(256 * 1024 * 1024);
/// `hooks.aperture.max_nodes` default and bounds.
pub const DEFAULT_MAX_NODES: usize = 1_000_000;
pub const MAX_NODES: RangeInclusive<usize> = 100..=20_000_000;

fn default_callers() -> Vec<String> {
    vec![DEFAULT_CALLER.to_string()]
}
fn default_resource_kind() -> String {
    DEFAULT_RESOURCE_KIND.to_string()
}
fn default_block_status() -> u16 {
    403
}
fn default_max_body() -> usize {
    DEFAULT_MAX_BODY
}
fn default_max_nodes() -> usize {
    DEFAULT_MAX_NODES
}

pub(super) fn check_hooks(mut c: HooksConfig, cx: &Cx<'_>, p: &mut Problems) -> HooksConfig {
    let Some(a) = c.aperture.as_mut() else {
        return c;
    };
    if a.callers.is_empty() {
        p.add(
            "$.hooks.aperture.callers",
            "empty: name the Aperture node's tag (e.g. tag:aperture)",
        );
    }
    for (i, caller) in a.callers.iter().enumerate() {
        let name = caller.strip_prefix("tag:").unwrap_or("");
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            p.add(
                format_args!("$.hooks.aperture.callers[{i}]"),
                format_args!("{caller:?} must be tag:NAME (the Aperture node's tag)"),
            );
        }
    }
    if let Some(k) = a.key_file.as_mut() {
        cx.rebase(k);
    }
    if a.resource_kind.trim().is_empty() {
        p.add(
            "$.hooks.aperture.resource_kind",
            "empty (the default is aperture_tool)",
        );
    }
    if !(400..=599).contains(&a.block_status) {
        p.add(
            "$.hooks.aperture.block_status",
            "an HTTP error status between 400 and 599",
        );
    }
    if !MAX_BODY.contains(&a.max_body) {
        p.add(
            "$.hooks.aperture.max_body",
            format_args!("between {} and {}", MAX_BODY.start(), MAX_BODY.end()),
        );
    }
    if !MAX_NODES.contains(&a.max_nodes) {
        p.add(
            "$.hooks.aperture.max_nodes",
            format_args!("between {} and {}", MAX_NODES.start(), MAX_NODES.end()),
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn the_design_example_and_its_defaults() {
        let c = Config::parse(
            "t.yaml",
            b"hooks:\n  aperture:\n    callers: [tag:aperture]\n    key_file: aperture-hook.key\n    resource_kind: aperture_tool\n",
            Path::new("/etc/toolgate"),
        )
        .unwrap();
        let a = c.hooks.aperture.unwrap();
        assert_eq!(a.callers, vec!["tag:aperture"]);
        assert_eq!(
            a.key_file.unwrap(),
            Path::new("/etc/toolgate/aperture-hook.key")
        );
        assert_eq!(a.block_status, 403);
        assert_eq!(a.max_body, super::DEFAULT_MAX_BODY);
        let c = Config::parse("t.yaml", b"{}", Path::new("/")).unwrap();
        assert!(c.hooks.aperture.is_none());
        let c = Config::parse("t.yaml", b"hooks: {aperture: {}}", Path::new("/")).unwrap();
        assert_eq!(c.hooks.aperture.unwrap().resource_kind, "aperture_tool");
    }

    #[test]
    fn bad_values_name_their_path() {
        let e = Config::parse(
            "t.yaml",
            b"hooks: {aperture: {callers: [role:x, \"tag:\"], resource_kind: \"\", block_status: 200, max_body: 1}}",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        for want in [
            "$.hooks.aperture.callers[0]",
            "$.hooks.aperture.callers[1]",
            "$.hooks.aperture.resource_kind",
            "$.hooks.aperture.block_status",
            "$.hooks.aperture.max_body",
        ] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
        let e = Config::parse(
            "t.yaml",
            b"hooks: {aperture: {colour: red}}",
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
