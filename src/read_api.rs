//! The shared pieces of the HTTP read APIs (`/api/audit` in [`crate::server`] and the
//! dashboard): who may read which audit row, the query-string decoding, and the 403 answer.
//! Both APIs sit above this module, so neither imports the other.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::gateway::Gateway;
use crate::mcp::jsonrpc::{self, code};

/// May `principal` read `row`? The `toolgate_audit`/`read` policy, with `R.attr.principal`,
/// `R.attr.node` and `R.attr.server` from the row. Every reader of rows over HTTP
/// (`/api/audit`, the dashboard's stream) asks this per row, so rows a viewer may not see never
/// leave the daemon.
pub(crate) fn may_read(
    gw: &Gateway,
    principal: &crate::policy::input::Principal,
    row: &crate::audit::record::Row,
) -> bool {
    let mut attr = serde_json::Map::new();
    attr.insert("principal".into(), row.principal.clone().into());
    attr.insert("node".into(), row.node.clone().into());
    attr.insert("server".into(), row.server.clone().into());
    let resource = crate::policy::input::Resource {
        kind: "toolgate_audit".into(),
        id: row.id.clone(),
        attr,
        ..Default::default()
    };
    gw.decide(principal, resource, vec!["read".into()])
        .effect("read")
        == crate::policy::model::Effect::Allow
}

/// `application/x-www-form-urlencoded` query pairs, decoded by the WHATWG URL standard's
/// parser (the `url` crate's): `+` is a space, `%XX` a byte, and a `%` not followed by two hex
/// digits stays literal (`%+A` is `%`, ` `, `A`, never a byte made from `+A`).
pub(crate) fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub(crate) fn forbidden(msg: &str) -> Response {
    let body = jsonrpc::error_body(None, code::UNIDENTIFIED, &format!("forbidden: {msg}"), None);
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
