//! The Cerbos-compatible decision API through the real daemon: health, server info, checks
//! with Cerbos's exact JSON, who may ask (`pdp.callers`, `pdp.self_only`), the audit rows, and
//! bad input answered with Cerbos's error shape and status (issue 15 parts 1, 2 and 5).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde_json::{Value, json};
use toolgate::{audit, config::Config, daemon};

/// 127.0.0.2 is a policy enforcement point (tag:pep); 127.0.0.3 is Alice, a user with no
/// caller role; 127.0.0.9 has no identity.
const IDENTITIES: &str = r#"
"127.0.0.2":
  node: pep.example.ts.net
  node_id: nPEP1
  tags: [tag:pep]
"127.0.0.3":
  login: alice@example.com
  node: alice-laptop.example.ts.net
  node_id: nALICE1
  caps: [{roles: [user]}]
"#;

/// HS256 key shared by the JWKS file and the tests' tokens.
pub const HS_SECRET: &[u8] = b"secret-key-for-tests-0123456789ab";

pub fn policies() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pdp/policies")
}

pub fn write_jwks(dir: &Path) -> std::path::PathBuf {
    use base64::Engine as _;
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(HS_SECRET);
    let p = dir.join("keys.jwks");
    std::fs::write(
        &p,
        json!({"keys": [{"kty": "oct", "k": k, "kid": "hs1", "alg": "HS256"}]}).to_string(),
    )
    .unwrap();
    p
}

pub fn token(claims: Value, secret: &[u8]) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("hs1".into());
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Daemon {
    base: String,
    db: std::path::PathBuf,
    audit: audit::AuditLog,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), String>>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(pdp: &str) -> Daemon {
        let _ = toolgate::gateway::http_client();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(dir.path().join("identities.yaml"), IDENTITIES).unwrap();
        write_jwks(dir.path());
        let cfg = format!(
            "listen: [\"127.0.0.1:{port}\"]\ntls: off\nidentity:\n  provider: static\n  static: identities.yaml\n\
             policies:\n  dir: {}\naudit:\n  sqlite: audit.db\n  mode: sync\npdp:\n{pdp}\n",
            policies().display()
        );
        let cfg_path = dir.path().join("toolgate.yaml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let cfg = Config::load(&cfg_path).unwrap();
        let listen = daemon::resolve_listen(&cfg, &[]).unwrap();
        let identify = daemon::static_provider(&cfg, &listen).unwrap();
        let built =
            daemon::build(cfg, identify, &daemon::NodeInfo::default(), listen, None).unwrap();
        let audit = built.audit.clone();
        let (stop, rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(daemon::run(built, rx));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon never listened at {addr}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Daemon {
            base: format!("http://127.0.0.1:{port}"),
            db: dir.path().join("audit.db"),
            audit,
            stop,
            server,
            _dir: dir,
        }
    }

    async fn send(
        &self,
        from: [u8; 4],
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let c = reqwest::Client::builder()
            .local_address(IpAddr::from(from))
            .build()
            .unwrap();
        let mut rq = c.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(b) = body {
            rq = rq.header("content-type", "application/json").body(b);
        }
        let r = rq.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, from: [u8; 4], path: &str, body: &Value) -> (u16, Value) {
        self.send(from, "POST", path, Some(body.to_string().into_bytes()))
            .await
    }

    async fn rows(&self, kind: &str) -> Vec<audit::record::Row> {
        self.audit.flush().await.unwrap();
        let f = audit::query::Filter::from_pairs(vec![("kind", kind)]).unwrap();
        audit::query::query(&self.db, &f).unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
    }
}

const PEP: [u8; 4] = [127, 0, 0, 2];
const ALICE: [u8; 4] = [127, 0, 0, 3];
const NOBODY: [u8; 4] = [127, 0, 0, 9];

fn principal() -> Value {
    json!({"id": "alice", "roles": ["user"], "attr": {"team": "core", "org": "example"}})
}

fn resource() -> Value {
    json!({"kind": "mcp_tool", "id": "read_file", "attr": {"org": "example", "team": "core", "owner": "bob", "arguments": {"path": "/src/a"}}})
}

fn without_call_id(mut v: Value) -> Value {
    let id = v.as_object_mut().and_then(|m| m.remove("cerbosCallId"));
    assert!(
        id.as_ref()
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty()),
        "cerbosCallId must be a non-empty string: {id:?}"
    );
    v
}

#[tokio::test]
async fn check_answers_cerbos_json_and_audits_caller_and_principal() {
    let d =
        Daemon::start("  callers: [tag:pep]\n  jwt_keysets: [{id: hs, local: {file: keys.jwks}}]")
            .await;

    // Health and server info.
    let (s, v) = d.send(NOBODY, "GET", "/_cerbos/health", None).await;
    assert_eq!((s, v), (200, json!({"status": "SERVING"})));
    let (s, v) = d
        .send(
            NOBODY,
            "GET",
            "/_cerbos/health?service=cerbos.svc.v1.CerbosAdminService",
            None,
        )
        .await;
    assert_eq!(
        (s, v),
        (404, json!({"code": 5, "message": "unknown service"}))
    );
    let (s, v) = d.send(PEP, "GET", "/api/server_info", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    // The exchange captured from Cerbos 0.55.0 on the same policies and request.
    let body = json!({
        "requestId": "r1", "includeMeta": true, "principal": principal(),
        "resources": [{"resource": resource(), "actions": ["tools/call::read_file", "tools/call::write_file", "tools/call::delete_x"]}]
    });
    let (s, v) = d.post(PEP, "/api/check/resources", &body).await;
    assert_eq!(s, 200, "{v}");
    let call_id = v["cerbosCallId"].as_str().unwrap_or("").to_string();
    let want = json!({"requestId":"r1", "results":[{"resource":{"id":"read_file", "kind":"mcp_tool"}, "actions":{"tools/call::delete_x":"EFFECT_DENY", "tools/call::read_file":"EFFECT_ALLOW", "tools/call::write_file":"EFFECT_ALLOW"}, "meta":{"actions":{"tools/call::delete_x":{"matchedPolicy":"resource.mcp_tool.vdefault"}, "tools/call::read_file":{"matchedPolicy":"resource.mcp_tool.vdefault"}, "tools/call::write_file":{"matchedPolicy":"resource.mcp_tool.vdefault"}}, "effectiveDerivedRoles":["team_member"]}, "outputs":[{"src":"resource.mcp_tool.vdefault#write-tools", "val":{"by":"alice", "kind":"write", "tool":"read_file"}, "action":"tools/call::write_file"}]}]});
    assert_eq!(without_call_id(v), want);

    // snake_case input, as protojson accepts it.
    let snake = json!({"request_id":"r2","include_meta":true,"principal":{"id":"a","roles":["user"],"policy_version":"default"},"resources":[{"resource":{"kind":"mcp_tool","id":"x","policy_version":"default"},"actions":["tools/list::x"]}]});
    let (s, v) = d.post(PEP, "/api/check/resources", &snake).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        without_call_id(v),
        json!({"requestId":"r2", "results":[{"resource":{"id":"x", "kind":"mcp_tool", "policyVersion":"default"}, "actions":{"tools/list::x":"EFFECT_ALLOW"}, "meta":{"actions":{"tools/list::x":{"matchedPolicy":"resource.mcp_tool.vdefault"}}}}]})
    );

    // A verified JWT's claims reach CEL (acme scope: readers may read).
    let good = token(
        json!({"sub": "alice", "groups": ["readers"], "exp": now() + 3600}),
        HS_SECRET,
    );
    let jwt_body = |t: &str| json!({"principal": principal(), "resources": [{"resource": {"kind": "mcp_tool", "id": "read_file", "scope": "acme", "attr": {"org": "other"}}, "actions": ["tools/call::read_file"]}], "auxData": {"jwt": {"token": t}}});
    let (s, v) = d.post(PEP, "/api/check/resources", &jwt_body(&good)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["results"][0]["actions"]["tools/call::read_file"],
        "EFFECT_ALLOW"
    );
    assert_eq!(v["results"][0]["resource"]["scope"], "acme");

    // The audit row names the caller (its node) and the asserted principal, and every
    // resource × action with its effect; its id is the cerbosCallId.
    let rows = d.rows("check").await;
    let row = rows
        .iter()
        .find(|r| r.id == call_id)
        .expect("the check's audit row");
    assert_eq!(row.principal, "alice");
    assert_eq!(row.node, "pep.example.ts.net");
    assert_eq!(row.tags, vec!["tag:pep"]);
    assert_eq!(row.effect, "deny");
    assert_eq!(row.outcome, "answered");
    assert!(
        row.reason.contains("caller pep.example.ts.net"),
        "{}",
        row.reason
    );
    assert!(
        row.reason
            .contains("mcp_tool/read_file tools/call::delete_x=deny"),
        "{}",
        row.reason
    );
    assert_eq!(row.explain["caller"], "pep.example.ts.net");
    assert_eq!(
        row.explain["results"][0]["actions"]["tools/call::read_file"]["effect"],
        "allow"
    );
    assert_eq!(
        row.explain["results"][0]["actions"]["tools/call::delete_x"]["effect"],
        "deny"
    );

    // Alice is identified but not a caller, and self_only is off: 403 PERMISSION_DENIED.
    let (s, v) = d.post(ALICE, "/api/check/resources", &body).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["code"], 7);
    let (s, v) = d.post(NOBODY, "/api/check/resources", &body).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["code"], 7);
    let refused = d.rows("check").await;
    assert!(
        refused
            .iter()
            .any(|r| r.outcome == "refused" && r.login == "alice@example.com")
    );
    d.stop().await;
}

#[tokio::test]
async fn self_only_callers_ask_about_themselves() {
    let d = Daemon::start("  callers: [tag:pep]\n  self_only: true").await;
    // Alice claims to be an admin: the body's principal is ignored, her WhoIs principal used.
    let body = json!({"principal": {"id": "root", "roles": ["admin"]}, "resources": [{"resource": {"kind": "mcp_tool", "id": "t", "attr": {}}, "actions": ["tools/call::delete_repo", "tools/list::t"]}]});
    let (s, v) = d.post(ALICE, "/api/check/resources", &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["results"][0]["actions"]["tools/call::delete_repo"],
        "EFFECT_DENY"
    );
    assert_eq!(v["results"][0]["actions"]["tools/list::t"], "EFFECT_ALLOW");
    // The PEP still asserts principals.
    let (s, v) = d.post(PEP, "/api/check/resources", &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["results"][0]["actions"]["tools/call::delete_repo"],
        "EFFECT_ALLOW"
    );
    // explain is for listed callers only.
    let (s, _) = d
        .post(ALICE, "/api/check/resources?explain=true", &body)
        .await;
    assert_eq!(s, 403);
    let (s, v) = d
        .post(PEP, "/api/check/resources?explain=true", &body)
        .await;
    assert_eq!(s, 200);
    assert!(v["results"][0]["trace"]["steps"].is_array(), "{v}");
    let rows = d.rows("check").await;
    assert!(
        rows.iter()
            .any(|r| r.principal == "alice@example.com" && r.login == "alice@example.com")
    );
    assert!(
        rows.iter()
            .any(|r| r.principal == "root" && r.node == "pep.example.ts.net")
    );
    d.stop().await;
}

#[tokio::test]
async fn bad_input_gets_cerbos_errors_never_a_panic() {
    let d = Daemon::start(
        "  callers: [tag:pep]\n  request_limits: {max_actions_per_resource: 5, max_resources_per_request: 3}\n  jwt_keysets: [{id: hs, local: {file: keys.jwks}}]",
    )
    .await;
    let raw = |b: &str| Some(b.as_bytes().to_vec());
    let p = principal();
    let r = resource();
    let entry = |n: usize| json!({"resource": r, "actions": (0..n).map(|i| format!("a{i}")).collect::<Vec<_>>()});
    type Case = (&'static str, Option<Vec<u8>>, u16, i64, &'static str);
    let cases: Vec<Case> = vec![
        ("malformed JSON", raw("{\"principal\":"), 400, 3, "request body is not a valid request"),
        ("wrong type", raw(r#"{"principal":{"id":"a","roles":"user"},"resources":[]}"#), 400, 3, "invalid type"),
        ("unknown field", raw(r#"{"foo":1}"#), 400, 3, "unknown field `foo`"),
        ("not an object", raw("[1]"), 400, 3, "request body is not a valid request"),
        ("empty roles", Some(json!({"principal": {"id": "a", "roles": []}, "resources": [entry(1)]}).to_string().into_bytes()), 400, 3, "validation error: principal.roles: value is required"),
        ("no resources", Some(json!({"principal": p, "resources": []}).to_string().into_bytes()), 400, 3, "validation error: resources: value is required"),
        ("duplicate actions", Some(json!({"principal": p, "resources": [{"resource": r, "actions": ["a", "a"]}]}).to_string().into_bytes()), 400, 3, "validation error: resources[0].actions: repeated value must contain unique items"),
        ("too many actions", Some(json!({"principal": p, "resources": [entry(6)]}).to_string().into_bytes()), 400, 3, "number of actions (6) exceeds configured limit (5)"),
        ("too many resources", Some(json!({"principal": p, "resources": [entry(1), entry(1), entry(1), entry(1)]}).to_string().into_bytes()), 400, 3, "number of resources in batch (4) exceeds configured limit (3)"),
        ("expired JWT", Some(json!({"principal": p, "resources": [entry(1)], "auxData": {"jwt": {"token": token(json!({"sub": "a", "exp": now() - 60}), HS_SECRET)}}}).to_string().into_bytes()), 400, 3, "invalid auxData: auxData.jwt: the token has expired"),
        ("bad signature", Some(json!({"principal": p, "resources": [entry(1)], "auxData": {"jwt": {"token": token(json!({"sub": "a"}), b"another-secret-of-32-bytes-000000"), "keySetId": "hs"}}}).to_string().into_bytes()), 400, 3, "invalid auxData: auxData.jwt: InvalidSignature"),
        ("unknown key set", Some(json!({"principal": p, "resources": [entry(1)], "auxData": {"jwt": {"token": "x.y.z", "keySetId": "nope"}}}).to_string().into_bytes()), 400, 3, "invalid auxData: auxData.jwt: unknown keySetId"),
        ("oversize body", Some(json!({"principal": {"id": "a", "roles": ["u"], "attr": {"x": "y".repeat(5_000_000)}}, "resources": [entry(1)]}).to_string().into_bytes()), 429, 8, "request body larger than max"),
    ];
    for (name, body, status, code, msg) in cases {
        let (s, v) = d.send(PEP, "POST", "/api/check/resources", body).await;
        assert_eq!(s, status, "{name}: {v}");
        assert_eq!(v["code"], code, "{name}: {v}");
        let m = v["message"].as_str().unwrap_or("");
        assert!(
            m.starts_with(msg) || m.contains(msg),
            "{name}: {m:?} should say {msg:?}"
        );
        if let Some(details) = v.get("details") {
            assert!(details[0]["@type"].is_string(), "{name}: {v}");
        }
    }
    // An unknown kind is no error: every action is denied with NO_MATCH, as in Cerbos.
    let (s, v) = d
        .post(PEP, "/api/check/resources", &json!({"includeMeta": true, "principal": p, "resources": [{"resource": {"kind": "nope", "id": "1"}, "actions": ["a"]}]}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["actions"]["a"], "EFFECT_DENY");
    assert_eq!(
        v["results"][0]["meta"]["actions"]["a"]["matchedPolicy"],
        "NO_MATCH"
    );
    // Wrong method: Cerbos's 501.
    let (s, v) = d.send(PEP, "GET", "/api/check/resources", None).await;
    assert_eq!((s, v["code"].clone()), (501, json!(12)));
    // Still serving after all of it.
    let (s, _) = d.send(NOBODY, "GET", "/_cerbos/health", None).await;
    assert_eq!(s, 200);
    d.stop().await;
}

#[tokio::test]
async fn plan_answers_cerbos_filters_audits_one_row_and_refuses_what_it_cannot_plan() {
    let d = Daemon::start("  callers: [tag:pep]").await;
    let alice = json!({"id": "alice", "roles": ["user"], "attr": {"team": "red", "regions": ["eu"], "max_size": 100}});
    // Conditional: derived roles (owner, team) OR a variable, as Cerbos 0.55 nests them.
    let (s, v) = d
        .post(PEP, "/api/plan/resources", &json!({"requestId": "p1", "action": "view", "principal": alice, "resource": {"kind": "document"}}))
        .await;
    assert_eq!(s, 200, "{v}");
    let eq = |attr: &str, val: Value| json!({"expression": {"operator": "eq", "operands": [{"variable": format!("request.resource.attr.{attr}")}, {"value": val}]}});
    assert_eq!(
        without_call_id(v),
        json!({"requestId": "p1", "action": "view", "resourceKind": "document", "filter": {"kind": "KIND_CONDITIONAL", "condition": {"expression": {"operator": "or", "operands": [
            {"expression": {"operator": "or", "operands": [eq("owner", json!("alice")), eq("team", json!("red"))]}},
            eq("visibility", json!("public"))]}}}})
    );
    // Always allowed, always denied, with meta.
    let (_, v) = d
        .post(PEP, "/api/plan/resources", &json!({"actions": ["list"], "includeMeta": true, "principal": alice, "resource": {"kind": "document"}}))
        .await;
    assert_eq!(v["filter"], json!({"kind": "KIND_ALWAYS_ALLOWED"}));
    assert_eq!(v["meta"]["filterDebug"], "(true)");
    let (_, v) = d
        .post(PEP, "/api/plan/resources", &json!({"action": "purge", "includeMeta": true, "principal": alice, "resource": {"kind": "document"}}))
        .await;
    assert_eq!(v["filter"], json!({"kind": "KIND_ALWAYS_DENIED"}));
    // A condition with no exact filter form (startsWith over an unknown attribute): a clear
    // error naming it, never a plan.
    let bob = json!({"id": "bob", "roles": ["contractor"], "attr": {"team": "core"}});
    let (s, v) = d
        .post(PEP, "/api/plan/resources", &json!({"action": "tools/call::read_file", "principal": bob, "resource": {"kind": "mcp_tool"}}))
        .await;
    assert_eq!((s, v["code"].clone()), (501, json!(12)), "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(
        m.contains("startsWith") && m.contains("cannot plan the condition"),
        "{m}"
    );
    // Callers outside pdp.callers may not plan; bad input gets Cerbos's error.
    let (s, _) = d
        .post(
            ALICE,
            "/api/plan/resources",
            &json!({"action": "view", "principal": alice, "resource": {"kind": "document"}}),
        )
        .await;
    assert_eq!(s, 403);
    let (s, v) = d
        .post(PEP, "/api/plan/resources", &json!({"action": "view", "principal": {"id": "a", "roles": []}, "resource": {"kind": "document"}}))
        .await;
    assert_eq!((s, v["code"].clone()), (400, json!(3)), "{v}");
    // One row per answered or failed plan: the caller, the principal, the filter.
    let rows: Vec<_> = d
        .rows("check")
        .await
        .into_iter()
        .filter(|r| r.method == "POST /api/plan/resources" && r.outcome != "refused")
        .collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let by_action = |a: &str| rows.iter().find(|r| r.action == a).unwrap();
    let view = by_action("view");
    assert_eq!(
        (
            view.principal.as_str(),
            view.effect.as_str(),
            view.outcome.as_str()
        ),
        ("alice", "deny", "answered")
    );
    assert!(
        view.reason
            .contains("KIND_CONDITIONAL (or (or (eq request.resource.attr.owner \"alice\")"),
        "{}",
        view.reason
    );
    assert_eq!(view.explain["plan"]["kind"], "KIND_CONDITIONAL");
    assert_eq!(by_action("list").effect, "allow");
    assert_eq!(by_action("purge").effect, "deny");
    let failed = by_action("tools/call::read_file");
    assert_eq!(
        (failed.outcome.as_str(), failed.effect.as_str()),
        ("error", "deny")
    );
    assert!(failed.reason.contains("startsWith"), "{}", failed.reason);
    d.stop().await;
}
