//! The real Cerbos SDKs as tests (issue 15 part 4): the PyPI `cerbos` client and the npm
//! `@cerbos/http` client run the same scenario (`tests/peers/cerbos_sdk/`) against toolgate and
//! against the Cerbos 0.55.0 binary, on the same policies (`tests/pdp/policies`) and the same
//! JWT key set, and what each SDK returns must be identical: decisions, outputs, matchedPolicy
//! and matchedScope, effective derived roles, query plans, health, and the SDK's own handling
//! of an invalid request; then the raw plan API over a table of requests (`plan_table`). Peers are installed by `scripts/peers` and `scripts/peers-cerbos-sdk`. The scenario
//! keeps clear of the one documented output difference (docs/compatibility.md: a rule reached
//! through two active derived roles, or a later action of a rule with an inactive derived role,
//! emits its output twice in Cerbos, once here).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use toolgate::{config::Config, daemon};

const HS_SECRET: &[u8] = b"secret-key-for-tests-0123456789ab";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a peer-install script and returns the path it prints.
fn peer(script: &str, arg: &str) -> PathBuf {
    let out = Command::new(root().join("scripts").join(script))
        .arg(arg)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("scripts/{script} {arg}: {e}"));
    assert!(out.status.success(), "scripts/{script} {arg} failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_jwks(dir: &Path) -> PathBuf {
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

fn token() -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("hs1".into());
    jsonwebtoken::encode(
        &h,
        &json!({"sub": "alice", "groups": ["readers"], "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(HS_SECRET),
    )
    .unwrap()
}

struct Cerbos {
    child: Child,
    port: u16,
}

impl Drop for Cerbos {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_cerbos(dir: &Path, jwks: &Path) -> Cerbos {
    let bin = peer("peers", "cerbos");
    let (http, grpc) = (free_port(), free_port());
    let config = json!({
        "server": {"httpListenAddr": format!("127.0.0.1:{http}"), "grpcListenAddr": format!("127.0.0.1:{grpc}"), "metricsEnabled": false},
        "storage": {"driver": "disk", "disk": {"directory": root().join("tests/pdp/policies"), "watchForChanges": false}},
        "auxData": {"jwt": {"keySets": [{"id": "hs", "local": {"file": jwks}}]}},
        // toolgate's default is Cerbos's strict evaluation.
        "engine": {"strictEvaluation": true},
        "audit": {"enabled": false},
        "telemetry": {"disabled": true}
    });
    let path = dir.join("cerbos.yaml");
    std::fs::write(&path, config.to_string()).unwrap();
    let log = std::fs::File::create(dir.join("cerbos.log")).unwrap();
    let child = Command::new(bin)
        .arg("server")
        .arg(format!("--config={}", path.display()))
        .arg("--log-level=warn")
        .env("CERBOS_NO_TELEMETRY", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let c = Cerbos { child, port: http };
    wait_healthy(http);
    c
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_cerbos/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200") && out.contains("SERVING")
}

fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if healthy(port) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no healthy server on port {port} after 60 s");
}

fn run(cmd: &mut Command) -> Value {
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn sdks_see_the_same_answers_from_toolgate_and_cerbos() {
    let python = peer("peers-cerbos-sdk", "python");
    let node_modules = peer("peers-cerbos-sdk", "node");
    let dir = tempfile::tempdir().unwrap();
    let jwks = write_jwks(dir.path());
    let cerbos = start_cerbos(dir.path(), &jwks);

    // toolgate: the SDKs connect from 127.0.0.1, a PEP node (tag:pep) in this fixture.
    let port = free_port();
    std::fs::write(
        dir.path().join("identities.yaml"),
        "\"127.0.0.1\":\n  node: pep.example.ts.net\n  node_id: nPEP1\n  tags: [tag:pep]\n",
    )
    .unwrap();
    let cfg = format!(
        "listen: [\"127.0.0.1:{port}\"]\ntls: off\nidentity:\n  provider: static\n  static: identities.yaml\n\
         policies:\n  dir: {}\naudit:\n  sqlite: audit.db\npdp:\n  callers: [tag:pep]\n  jwt_keysets: [{{id: hs, local: {{file: keys.jwks}}}}]\n",
        root().join("tests/pdp/policies").display()
    );
    std::fs::write(dir.path().join("toolgate.yaml"), cfg).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = Config::load(&dir.path().join("toolgate.yaml")).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let server = rt.spawn(async move {
        let listen = daemon::resolve_listen(&cfg, &[]).unwrap();
        let identify = daemon::static_provider(&cfg, &listen).unwrap();
        let built =
            daemon::build(cfg, identify, &daemon::NodeInfo::default(), listen, None).unwrap();
        daemon::run(built, rx).await
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "toolgate did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_healthy(port);

    let token = token();
    let scripts = root().join("tests/peers/cerbos_sdk");
    let py = |port: u16| {
        run(Command::new(&python)
            .env("PYTHONHASHSEED", "0")
            .arg(scripts.join("py_client.py"))
            .arg(format!("http://127.0.0.1:{port}"))
            .arg(&token))
    };
    let js = |port: u16| {
        run(Command::new("node")
            .arg(scripts.join("node_client.mjs"))
            .arg(format!("http://127.0.0.1:{port}"))
            .arg(&token)
            .env("NODE_PATH", &node_modules))
    };
    // Python: the SDK sends roles from a set, in hash order; fix the order for both runs.
    let (py_cerbos, py_toolgate) = (canonical(py(cerbos.port)), canonical(py(port)));
    for (k, v) in py_cerbos.as_object().unwrap() {
        assert_eq!(
            &py_toolgate[k], v,
            "the Python SDK saw different answers for {k}"
        );
    }
    assert_eq!(
        py_toolgate, py_cerbos,
        "the Python SDK saw different answers"
    );
    let (js_cerbos, js_toolgate) = (canonical(js(cerbos.port)), canonical(js(port)));
    for (k, v) in js_cerbos.as_object().unwrap() {
        assert_eq!(
            &js_toolgate[k], v,
            "the JS SDK saw different answers for {k}"
        );
    }
    assert_eq!(js_toolgate, js_cerbos, "the JS SDK saw different answers");

    // The scenario is not vacuous: allows, denies, outputs, scopes and errors all occur.
    assert_eq!(py_toolgate["is_allowed"], json!([true, true, false]));
    assert_eq!(py_toolgate["invalid"]["code"], 3);
    assert_eq!(py_toolgate["invalid"]["status_code"], 400);
    assert_eq!(js_toolgate["invalid"]["code"], 3);
    assert_eq!(js_toolgate["health"]["status"], "SERVING");
    let alice = &js_toolgate["check_alice"]["results"];
    assert_eq!(
        alice[0]["actions"]["tools/call::write_file"],
        "EFFECT_ALLOW"
    );
    assert_eq!(alice[0]["actions"]["tools/call::delete_x"], "EFFECT_DENY");
    assert!(!alice[1]["outputs"].as_array().unwrap().is_empty());
    assert_eq!(
        alice[3]["metadata"]["actions"]["tools/call::write_file"]["matchedScope"],
        "acme"
    );
    assert_eq!(
        js_toolgate["check_jwt"][0]["actions"]["tools/call::read_file"],
        "EFFECT_ALLOW"
    );

    // The plans are not vacuous either: each filter kind occurs, through both SDKs.
    let kinds: Vec<&str> = py_toolgate["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["filter"]["kind"].as_str().unwrap())
        .collect();
    for k in [
        "KIND_ALWAYS_ALLOWED",
        "KIND_ALWAYS_DENIED",
        "KIND_CONDITIONAL",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    assert_eq!(js_toolgate["plans"].as_array().unwrap().len(), 11);

    // The raw plan API over a table of requests, with `includeMeta` (filterDebug,
    // matchedScopes): identical JSON from both servers but for cerbosCallId.
    let table = plan_table();
    let answers = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut out = Vec::new();
        for body in &table {
            let mut pair = Vec::new();
            for p in [cerbos.port, port] {
                let r = client
                    .post(format!("http://127.0.0.1:{p}/api/plan/resources"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let mut v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
                let id = v.as_object_mut().and_then(|m| m.remove("cerbosCallId"));
                assert!(
                    id.as_ref()
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty()),
                    "no cerbosCallId from port {p} for {body}: {v}"
                );
                pair.push((status, canonical(v)));
            }
            out.push(pair);
        }
        out
    });
    let mut conditional = 0;
    for (body, pair) in table.iter().zip(&answers) {
        assert_eq!(
            pair[1], pair[0],
            "toolgate (right) and Cerbos (left) differ on {body}"
        );
        assert_eq!(pair[0].0, 200, "{body}");
        if pair[0].1["filter"]["kind"] == "KIND_CONDITIONAL" {
            conditional += 1;
        }
    }
    assert!(conditional >= 8, "only {conditional} conditional plans");

    let _ = stop.send(true);
    let _ = rt.block_on(server);
}

/// What Cerbos itself varies between runs, made canonical: the order of the operands of
/// `and` and `or` in a plan (its planner meets a rule's derived-role rows in map order, so the
/// same request gives `(or A B)` or `(or B A)`), nested `and`/`or` flattened, in the operand
/// tree of every SDK's shape and in the s-expressions (`filterDebug`, `conditionString`).
fn canonical(v: Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.into_iter().map(canonical).collect()),
        Value::Object(m) => {
            let mut m: serde_json::Map<String, Value> =
                m.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            for key in ["filterDebug", "conditionString"] {
                if let Some(Value::String(s)) = m.get(key) {
                    let c = canonical_sexpr(s);
                    m.insert(key.into(), Value::String(c));
                }
            }
            let logical = matches!(
                m.get("operator").and_then(Value::as_str),
                Some("and" | "or")
            );
            if logical && let Some(Value::Array(ops)) = m.get("operands") {
                let op = m["operator"].clone();
                let mut flat = Vec::new();
                for o in ops {
                    // An operand is `{expression: {operator, operands}}` (HTTP, Python) or
                    // `{operator, operands}` (JS).
                    let inner = o.get("expression").unwrap_or(o);
                    if inner.get("operator") == Some(&op) {
                        flat.extend(inner["operands"].as_array().cloned().unwrap_or_default());
                    } else {
                        flat.push(o.clone());
                    }
                }
                flat.sort_by_key(|o| o.to_string());
                m.insert("operands".into(), Value::Array(flat));
            }
            Value::Object(m)
        }
        other => other,
    }
}

/// An s-expression as Cerbos's `filterDebug` writes it: `(op a b ...)`, atoms being variables
/// or compact JSON values.
#[derive(Debug)]
enum Sexpr {
    Atom(String),
    List(Vec<Sexpr>),
}

fn parse_sexpr(chars: &[char], i: &mut usize) -> Sexpr {
    if chars.get(*i) == Some(&'(') {
        *i += 1;
        let mut items = Vec::new();
        loop {
            while chars.get(*i) == Some(&' ') {
                *i += 1;
            }
            match chars.get(*i) {
                None => break,
                Some(')') => {
                    *i += 1;
                    break;
                }
                _ => items.push(parse_sexpr(chars, i)),
            }
        }
        return Sexpr::List(items);
    }
    let start = *i;
    let (mut depth, mut in_str) = (0i32, false);
    while let Some(&c) = chars.get(*i) {
        if in_str {
            if c == '\\' {
                *i += 1;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if c == '[' || c == '{' {
            depth += 1;
        } else if c == ']' || c == '}' {
            depth -= 1;
        } else if depth == 0 && (c == ' ' || c == ')') {
            break;
        }
        *i += 1;
    }
    Sexpr::Atom(chars[start..*i].iter().collect())
}

fn render_sexpr(e: Sexpr) -> String {
    match e {
        Sexpr::Atom(a) => a,
        Sexpr::List(items) => {
            let mut items: Vec<Sexpr> = items;
            let op = match items.first() {
                Some(Sexpr::Atom(a)) => a.clone(),
                _ => String::new(),
            };
            let mut rest: Vec<String> = Vec::new();
            for item in items.drain(1..) {
                let r = render_sexpr(item);
                let nested = format!("({op} ");
                if (op == "and" || op == "or") && r.starts_with(&nested) {
                    // Flatten: re-parse the already canonical child's operands.
                    let chars: Vec<char> = r.chars().collect();
                    let mut j = 0;
                    if let Sexpr::List(inner) = parse_sexpr(&chars, &mut j) {
                        rest.extend(inner.into_iter().skip(1).map(render_sexpr));
                    }
                } else {
                    rest.push(r);
                }
            }
            if op == "and" || op == "or" {
                rest.sort();
            }
            let mut out = format!("({op}");
            for r in rest {
                out.push(' ');
                out.push_str(&r);
            }
            out.push(')');
            out
        }
    }
}

fn canonical_sexpr(s: &str) -> String {
    if !s.starts_with('(') {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    render_sexpr(parse_sexpr(&chars, &mut i))
}

/// Plan requests on `document.yaml`: allowed, denied, and conditional with each operator family
/// (eq/ne, in, and/or/not, lt/le/gt/ge), derived roles, deny rules, multi-role principals,
/// several actions, known attributes, an unknown kind.
fn plan_table() -> Vec<Value> {
    let alice = json!({"id": "alice", "roles": ["user"], "attr": {"team": "red", "regions": ["eu", "us"], "max_size": 100, "until": 2025}});
    let bob = json!({"id": "bob", "roles": ["contractor"], "attr": {"team": "blue", "regions": ["eu", "us"]}});
    let dan = json!({"id": "dan", "roles": ["auditor", "contractor"], "attr": {"team": "blue", "regions": ["eu"], "until": 2024}});
    let dan2 = json!({"id": "dan", "roles": ["contractor", "auditor"], "attr": {"team": "blue", "regions": [], "until": 2024}});
    let root = json!({"id": "root", "roles": ["admin", "user"], "attr": {"team": "x"}});
    let doc = json!({"kind": "document"});
    let plan = |action: Value, principal: &Value, resource: Value| {
        let mut b = json!({"requestId": "t", "includeMeta": true, "principal": principal, "resource": resource});
        match action {
            Value::Array(_) => b["actions"] = action,
            a => b["action"] = a,
        }
        b
    };
    vec![
        plan(json!("list"), &alice, doc.clone()),
        plan(json!("purge"), &alice, doc.clone()),
        plan(json!("delete"), &alice, doc.clone()),
        plan(json!("view"), &alice, doc.clone()),
        plan(json!("edit"), &alice, doc.clone()),
        plan(json!("archive"), &alice, doc.clone()),
        plan(json!(["view", "edit"]), &alice, doc.clone()),
        plan(json!(["list", "archive", "edit"]), &alice, doc.clone()),
        plan(json!(["list", "purge"]), &alice, doc.clone()),
        plan(json!("view"), &bob, doc.clone()),
        plan(json!("view"), &dan, doc.clone()),
        plan(json!("view"), &dan2, doc.clone()),
        plan(json!("audit"), &dan, doc.clone()),
        plan(
            json!("view"),
            &dan,
            json!({"kind": "document", "attr": {"visibility": "public"}}),
        ),
        plan(
            json!("view"),
            &bob,
            json!({"kind": "document", "attr": {"classification": "public"}}),
        ),
        plan(
            json!("edit"),
            &alice,
            json!({"kind": "document", "attr": {"locked": false, "status": "draft"}}),
        ),
        plan(
            json!("edit"),
            &alice,
            json!({"kind": "document", "attr": {"locked": true}}),
        ),
        plan(
            json!("archive"),
            &alice,
            json!({"kind": "document", "attr": {"age": 40}}),
        ),
        plan(json!("edit"), &root, doc.clone()),
        plan(json!("purge"), &root, doc.clone()),
        plan(
            json!("view"),
            &alice,
            json!({"kind": "document", "policyVersion": "default"}),
        ),
        plan(json!("view"), &alice, json!({"kind": "no_such_kind"})),
        plan(
            json!("tools/list::read_file"),
            &alice,
            json!({"kind": "mcp_tool"}),
        ),
    ]
}
