//! The aggregated endpoint `/mcp` as pure functions: names, routing and merged pagination
//! across every configured server. No I/O here; `mcp/multi.rs` does the calls.
//!
//! - **Names.** Tools and prompts appear as `<server><sep><name>` (`github__create_issue`;
//!   the separator is configurable). A server name never contains the separator (checked at
//!   start-up), so splitting at its first occurrence is unambiguous.
//! - **URIs** keep their text: `resources/read` goes to the one server that claims the URI, by
//!   listing it or by a template whose literal prefix it matches. A URI two servers claim (two
//!   listings, two templates, or one's listing and the other's template) is refused as
//!   ambiguous: guessing would send the read, and whatever it carries, to a server the caller
//!   did not mean.
//! - **Pages.** One aggregate page holds the next page of every server that has one, whole:
//!   nothing is truncated, and the aggregate `nextCursor` encodes every upstream's cursor, so
//!   no upstream `nextCursor` is dropped (agentgateway #3476 dropped them). A server that is
//!   down is left out of that page, with a warning, and does not fail the list.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::Engine as _;
use serde_json::Value;

/// The default separator between a server's name and a tool's or prompt's.
pub const DEFAULT_SEPARATOR: &str = "__";
/// The longest aggregate cursor we accept (it holds one cursor per server).
pub const MAX_CURSOR_BYTES: usize = 64 * 1024;
/// URIs remembered per aggregated session for routing `resources/read`.
pub const MAX_URIS: usize = 100_000;
const CURSOR_PREFIX: &str = "tg1.";

/// Why a name, URI or cursor could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No server prefix, an unknown server, or nothing after the separator.
    #[error("unknown name `{0}` (names on this endpoint are <server>{1}<name>)")]
    UnknownName(String, String),
    #[error("unknown resource `{0}`")]
    UnknownUri(String),
    #[error("resource `{uri}` is ambiguous: it is served by {}", servers.join(", "))]
    Ambiguous { uri: String, servers: Vec<String> },
    #[error("invalid cursor: {0}")]
    Cursor(String),
}

/// Name prefixing with a separator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub separator: String,
}

impl Default for Naming {
    fn default() -> Self {
        Naming {
            separator: DEFAULT_SEPARATOR.to_string(),
        }
    }
}

impl Naming {
    /// `Err` when some server name would make names ambiguous with this separator.
    pub fn new<'a>(
        separator: &str,
        servers: impl IntoIterator<Item = &'a str>,
    ) -> Result<Naming, String> {
        if separator.is_empty() {
            return Err("the separator must not be empty".into());
        }
        for s in servers {
            // Splitting `<s><sep>x` at the first separator must give back `s`.
            if format!("{s}{separator}").find(separator) != Some(s.len()) {
                return Err(format!(
                    "server name `{s}` contains the separator `{separator}` (or ends with part of it): its names could not be told apart"
                ));
            }
        }
        Ok(Naming {
            separator: separator.to_string(),
        })
    }

    pub fn prefixed(&self, server: &str, name: &str) -> String {
        let mut s = String::with_capacity(server.len() + self.separator.len() + name.len());
        s.push_str(server);
        s.push_str(&self.separator);
        s.push_str(name);
        s
    }

    /// `<server><sep><name>` → (server, name), if `known(server)`.
    pub fn split<'a>(
        &self,
        full: &'a str,
        known: impl Fn(&str) -> bool,
    ) -> Result<(&'a str, &'a str), RouteError> {
        let unknown = || RouteError::UnknownName(full.to_string(), self.separator.clone());
        let (server, name) = full
            .split_once(self.separator.as_str())
            .ok_or_else(unknown)?;
        if server.is_empty() || name.is_empty() || !known(server) {
            return Err(unknown());
        }
        Ok((server, name))
    }
}

/// Which server serves which resource URI, learned from the lists an aggregated session saw.
#[derive(Debug, Clone, Default)]
pub struct UriIndex {
    uris: HashMap<String, BTreeSet<String>>,
    /// (server, literal prefix of a URI template).
    templates: BTreeSet<(String, String)>,
}

impl UriIndex {
    /// Remembers the URIs of a `resources/list` page from `server`.
    pub fn add_resources(&mut self, server: &str, items: &[Value]) {
        for uri in items
            .iter()
            .filter_map(|i| i.get("uri").and_then(Value::as_str))
        {
            if self.uris.len() >= MAX_URIS && !self.uris.contains_key(uri) {
                break;
            }
            self.uris
                .entry(uri.to_string())
                .or_default()
                .insert(server.to_string());
        }
    }

    /// Remembers the templates of a `resources/templates/list` page from `server`: their
    /// literal text before the first expression. A prefix without a scheme (`{+uri}`, `x`)
    /// would claim far too much and is ignored.
    pub fn add_templates(&mut self, server: &str, items: &[Value]) {
        for t in items
            .iter()
            .filter_map(|i| i.get("uriTemplate").and_then(Value::as_str))
        {
            let prefix = t.split('{').next().unwrap_or_default();
            if prefix.contains(':') && self.templates.len() < MAX_URIS {
                self.templates
                    .insert((server.to_string(), prefix.to_string()));
            }
        }
    }

    /// Is anything known at all (else the caller lists first)?
    pub fn is_empty(&self) -> bool {
        self.uris.is_empty() && self.templates.is_empty()
    }

    /// The one server that serves `uri`. Every server that claims it counts: those that listed
    /// it and those whose template's literal prefix it starts with. A listing does not outrank
    /// another server's template, or a server could take reads meant for another by listing
    /// that server's URIs.
    pub fn route(&self, uri: &str) -> Result<String, RouteError> {
        let mut claim: BTreeSet<&str> = self
            .uris
            .get(uri)
            .map(|s| s.iter().map(String::as_str).collect())
            .unwrap_or_default();
        claim.extend(
            self.templates
                .iter()
                .filter(|(_, prefix)| uri.starts_with(prefix.as_str()))
                .map(|(server, _)| server.as_str()),
        );
        let servers: Vec<String> = claim.into_iter().map(str::to_string).collect();
        match servers.as_slice() {
            [] => Err(RouteError::UnknownUri(uri.to_string())),
            [one] => Ok(one.clone()),
            _ => Err(RouteError::Ambiguous {
                uri: uri.to_string(),
                servers,
            }),
        }
    }
}

/// Where an aggregated listing stands: the servers that still have pages, with their cursors.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// server → the cursor to send it next.
    #[serde(rename = "s")]
    pub pending: BTreeMap<String, String>,
}

impl Cursor {
    /// The opaque text of the cursor (`tg1.` + base64url of JSON).
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut s = String::from(CURSOR_PREFIX);
        s.push_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json));
        s
    }

    /// Reads a cursor we issued; every server it names must be `known`.
    pub fn decode(text: &str, known: impl Fn(&str) -> bool) -> Result<Cursor, RouteError> {
        let bad = |why: &str| RouteError::Cursor(why.to_string());
        if text.len() > MAX_CURSOR_BYTES {
            return Err(bad("too long"));
        }
        let body = text
            .strip_prefix(CURSOR_PREFIX)
            .ok_or_else(|| bad("not a cursor from this endpoint"))?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad("not base64url"))?;
        let c: Cursor = serde_json::from_slice(&json).map_err(|_| bad("malformed"))?;
        if c.pending.is_empty() {
            return Err(bad("names no server"));
        }
        if let Some(s) = c.pending.keys().find(|s| !known(s)) {
            return Err(RouteError::Cursor(format!("names unknown server `{s}`")));
        }
        Ok(c)
    }
}

/// The upstream requests one aggregate page needs: (server, its cursor). Without a cursor,
/// the first page of every server in `servers`.
pub fn plan(
    cursor: Option<&str>,
    servers: &[String],
) -> Result<Vec<(String, Option<String>)>, RouteError> {
    match cursor {
        None => Ok(servers.iter().map(|s| (s.clone(), None)).collect()),
        Some(text) => {
            let c = Cursor::decode(text, |s| servers.iter().any(|k| k == s))?;
            Ok(c.pending
                .into_iter()
                .map(|(s, cur)| (s, Some(cur)))
                .collect())
        }
    }
}

/// One server's answer to its part of an aggregate page.
#[derive(Debug, Clone, PartialEq)]
pub enum Page {
    /// The (already policy-filtered) items and the server's `nextCursor`.
    Items {
        items: Vec<Value>,
        next: Option<String>,
    },
    /// The server could not be asked (down, refused, broken): left out of this page.
    Down(String),
}

/// One aggregate page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Merged {
    pub items: Vec<Value>,
    /// Set when any server has more pages.
    pub next_cursor: Option<String>,
    /// (server, why) for every server left out.
    pub down: Vec<(String, String)>,
}

/// The key of a list method's items, and whether they carry a name to prefix.
pub fn list_shape(method: &str) -> Option<(&'static str, bool)> {
    match method {
        "tools/list" => Some(("tools", true)),
        "prompts/list" => Some(("prompts", true)),
        "resources/list" => Some(("resources", false)),
        "resources/templates/list" => Some(("resourceTemplates", false)),
        _ => None,
    }
}

/// Merges the servers' pages (in the order given) into one aggregate page: names prefixed,
/// every item kept, every upstream cursor carried in the aggregate cursor.
pub fn merge(method: &str, naming: &Naming, pages: Vec<(String, Page)>) -> Merged {
    let prefix = list_shape(method).is_some_and(|(_, p)| p);
    let mut out = Merged::default();
    let mut next = Cursor::default();
    for (server, page) in pages {
        match page {
            Page::Down(why) => out.down.push((server, why)),
            Page::Items { items, next: cur } => {
                for mut item in items {
                    if prefix {
                        let Some(name) = item.get("name").and_then(Value::as_str) else {
                            continue;
                        };
                        let full = naming.prefixed(&server, name);
                        if let Some(o) = item.as_object_mut() {
                            o.insert("name".into(), Value::String(full));
                        }
                    }
                    out.items.push(item);
                }
                if let Some(c) = cur {
                    next.pending.insert(server, c);
                }
            }
        }
    }
    if !next.pending.is_empty() {
        out.next_cursor = Some(next.encode());
    }
    out
}

/// `notifications/*/list_changed` from many sources (every upstream, policy reloads) become
/// one notification per kind until the client has been told.
#[derive(Debug, Clone, Default)]
pub struct Coalescer {
    queued: BTreeSet<String>,
}

impl Coalescer {
    /// Notes a change of `method` (`notifications/tools/list_changed`, …); `true` if the client
    /// must now be told (nothing of this kind is queued yet).
    pub fn note(&mut self, method: &str) -> bool {
        self.queued.insert(method.to_string())
    }

    /// The notifications to send now; the queue is empty afterwards.
    pub fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.queued).into_iter().collect()
    }
}

/// The `list_changed` notifications this endpoint understands.
pub fn is_list_changed(method: &str) -> bool {
    matches!(
        method,
        "notifications/tools/list_changed"
            | "notifications/prompts/list_changed"
            | "notifications/resources/list_changed"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn names_are_prefixed_and_split_back() {
        let n = Naming::new("__", ["github", "files"]).unwrap();
        assert_eq!(n.prefixed("github", "create_issue"), "github__create_issue");
        let known = |s: &str| s == "github" || s == "files";
        assert_eq!(
            n.split("github__create__issue", known).unwrap(),
            ("github", "create__issue")
        );
        for bad in ["create_issue", "gitlab__x", "__x", "github__"] {
            assert!(
                matches!(n.split(bad, known), Err(RouteError::UnknownName(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_server_name_that_holds_the_separator_is_refused() {
        assert!(Naming::new("__", ["my__server"]).is_err());
        assert!(Naming::new("__", ["trailing_"]).is_err());
        assert!(Naming::new("_", ["a_b"]).is_err());
        assert!(Naming::new("", ["a"]).is_err());
        assert!(Naming::new(".", ["a_b", "c-d"]).is_ok());
    }

    #[test]
    fn uris_route_to_the_server_that_listed_them() {
        let mut ix = UriIndex::default();
        ix.add_resources(
            "a",
            &[
                json!({"uri": "file:///a.txt"}),
                json!({"uri": "shared://x"}),
            ],
        );
        ix.add_resources(
            "b",
            &[
                json!({"uri": "file:///b.txt"}),
                json!({"uri": "shared://x"}),
            ],
        );
        ix.add_templates("b", &[json!({"uriTemplate": "repo://{owner}/{name}"})]);
        ix.add_templates("a", &[json!({"uriTemplate": "{+anything}"})]);
        assert_eq!(ix.route("file:///a.txt").unwrap(), "a");
        assert_eq!(ix.route("file:///b.txt").unwrap(), "b");
        assert_eq!(ix.route("repo://me/toolgate").unwrap(), "b");
        assert_eq!(
            ix.route("shared://x"),
            Err(RouteError::Ambiguous {
                uri: "shared://x".into(),
                servers: vec!["a".into(), "b".into()]
            })
        );
        assert_eq!(
            ix.route("file:///c.txt"),
            Err(RouteError::UnknownUri("file:///c.txt".into()))
        );
    }

    #[test]
    fn two_templates_with_the_same_prefix_are_ambiguous() {
        let mut ix = UriIndex::default();
        ix.add_templates("a", &[json!({"uriTemplate": "git://{repo}"})]);
        ix.add_templates("b", &[json!({"uriTemplate": "git://{r}/{path}"})]);
        assert!(matches!(
            ix.route("git://x"),
            Err(RouteError::Ambiguous { .. })
        ));
    }

    #[test]
    fn a_listing_does_not_outrank_another_servers_template() {
        // `notes` lists a URI that only `files` should serve: neither wins.
        let mut ix = UriIndex::default();
        ix.add_templates("files", &[json!({"uriTemplate": "file:///{+path}"})]);
        ix.add_resources("notes", &[json!({"uri": "file:///home/a/.ssh/id_rsa"})]);
        assert_eq!(
            ix.route("file:///home/a/.ssh/id_rsa"),
            Err(RouteError::Ambiguous {
                uri: "file:///home/a/.ssh/id_rsa".into(),
                servers: vec!["files".into(), "notes".into()]
            })
        );
        assert_eq!(ix.route("file:///etc/hosts").unwrap(), "files");
        // A server's own listing under its own template is still one claim.
        ix.add_resources("files", &[json!({"uri": "file:///srv/readme"})]);
        assert_eq!(ix.route("file:///srv/readme").unwrap(), "files");
    }

    #[test]
    fn cursors_refuse_what_we_did_not_issue() {
        let known = |s: &str| s == "a";
        for bad in [
            "",
            "abc",
            "tg1.!!!",
            "tg1.e30",
            &format!("tg1.{}", "A".repeat(MAX_CURSOR_BYTES)),
        ] {
            assert!(Cursor::decode(bad, known).is_err(), "{bad}");
        }
        let mut c = Cursor::default();
        c.pending.insert("z".into(), "1".into());
        let e = Cursor::decode(&c.encode(), known).unwrap_err();
        assert_eq!(e, RouteError::Cursor("names unknown server `z`".into()));
    }

    #[test]
    fn a_down_server_is_left_out_and_the_rest_merged() {
        let n = Naming::default();
        let m = merge(
            "tools/list",
            &n,
            vec![
                (
                    "a".into(),
                    Page::Items {
                        items: vec![json!({"name": "t1"}), json!({"nameless": 1})],
                        next: Some("c2".into()),
                    },
                ),
                ("b".into(), Page::Down("connection refused".into())),
                (
                    "c".into(),
                    Page::Items {
                        items: vec![json!({"name": "t9", "x": {"y": 1}})],
                        next: None,
                    },
                ),
            ],
        );
        assert_eq!(
            m.items,
            vec![
                json!({"name": "a__t1"}),
                json!({"name": "c__t9", "x": {"y": 1}})
            ]
        );
        assert_eq!(
            m.down,
            vec![("b".to_string(), "connection refused".to_string())]
        );
        let c = Cursor::decode(m.next_cursor.as_deref().unwrap(), |_| true).unwrap();
        assert_eq!(
            c.pending,
            BTreeMap::from([("a".to_string(), "c2".to_string())])
        );
        assert_eq!(
            plan(
                m.next_cursor.as_deref(),
                &["a".into(), "b".into(), "c".into()]
            )
            .unwrap(),
            vec![("a".to_string(), Some("c2".to_string()))]
        );
    }

    #[test]
    fn resources_keep_their_uris() {
        let m = merge(
            "resources/list",
            &Naming::default(),
            vec![(
                "a".into(),
                Page::Items {
                    items: vec![json!({"uri": "file:///x", "name": "x"})],
                    next: None,
                },
            )],
        );
        assert_eq!(m.items, vec![json!({"uri": "file:///x", "name": "x"})]);
        assert_eq!(m.next_cursor, None);
    }

    #[test]
    fn list_changed_is_told_once_until_taken() {
        let mut c = Coalescer::default();
        assert!(c.note("notifications/tools/list_changed"));
        assert!(!c.note("notifications/tools/list_changed"));
        assert!(c.note("notifications/prompts/list_changed"));
        assert_eq!(c.take().len(), 2);
        assert!(c.note("notifications/tools/list_changed"));
    }

    /// A server's pages: `pages[i]` is the list of item names on page i.
    fn arb_servers() -> impl Strategy<Value = Vec<(String, Vec<Vec<String>>)>> {
        prop::collection::vec(
            (
                "[a-z][a-z0-9-]{0,6}",
                prop::collection::vec(prop::collection::vec("[a-z_]{1,8}", 0..4), 1..5),
            ),
            1..5,
        )
        .prop_map(|v| {
            let mut seen = BTreeSet::new();
            v.into_iter()
                .filter(|(s, _)| seen.insert(s.clone()))
                .collect()
        })
    }

    proptest! {
        /// Walking the aggregate cursor collects every item of every server exactly once, in
        /// as many pages as the longest server has, and never drops a cursor.
        #[test]
        fn aggregate_pagination_loses_nothing(servers in arb_servers(), down in 0usize..6) {
            let n = Naming::default();
            let names: Vec<String> = servers.iter().map(|(s, _)| s.clone()).collect();
            let down = names.get(down).cloned();
            let mut cursor: Option<String> = None;
            let mut got = Vec::new();
            let mut pages = 0;
            loop {
                let asks = plan(cursor.as_deref(), &names).unwrap();
                let answers = asks.into_iter().map(|(s, cur)| {
                    if Some(&s) == down.as_ref() {
                        return (s, Page::Down("down".into()));
                    }
                    let (_, ps) = servers.iter().find(|(n, _)| *n == s).unwrap();
                    let i: usize = cur.map(|c| c.parse().unwrap()).unwrap_or(0);
                    let items = ps[i].iter().map(|t| json!({"name": t})).collect();
                    let next = (i + 1 < ps.len()).then(|| (i + 1).to_string());
                    (s, Page::Items { items, next })
                }).collect();
                let m = merge("tools/list", &n, answers);
                got.extend(m.items.iter().map(|i| i["name"].as_str().unwrap().to_string()));
                pages += 1;
                match m.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            let mut want = Vec::new();
            for (s, ps) in &servers {
                if Some(s) == down.as_ref() { continue; }
                for p in ps { for t in p { want.push(n.prefixed(s, t)); } }
            }
            got.sort(); want.sort();
            prop_assert_eq!(got, want);
            let longest = servers.iter().filter(|(s, _)| Some(s) != down.as_ref()).map(|(_, p)| p.len()).max().unwrap_or(1);
            prop_assert_eq!(pages, longest.max(1));
        }

        #[test]
        fn cursors_round_trip(pending in prop::collection::btree_map("[a-z]{1,8}", ".{0,40}", 1..6)) {
            let c = Cursor { pending };
            let back = Cursor::decode(&c.encode(), |_| true).unwrap();
            prop_assert_eq!(back, c);
        }

        #[test]
        fn split_inverts_prefixed(server in "[A-Za-z0-9-]{1,12}", name in ".{1,30}") {
            let n = Naming::new("__", [server.as_str()]).unwrap();
            let full = n.prefixed(&server, &name);
            let (s, t) = n.split(&full, |s| s == server).unwrap();
            prop_assert_eq!(s, server.as_str());
            prop_assert_eq!(t, name.as_str());
        }
    }
}
