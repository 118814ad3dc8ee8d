//! Unit tests: the Cerbos CEL environment end to end (compile, then evaluate against a fixed
//! request), load-time rejections, the cost bound, variables, output encoding.

use std::sync::Arc;

use chrono::TimeZone;
use serde_json::{Map, Value, json};

use super::*;

struct Fixture {
    principal: Principal,
    resource: Resource,
    aux: Value,
    globals: Map<String, Value>,
    constants: Arc<Map<String, Value>>,
    now: chrono::DateTime<chrono::Utc>,
    derived: Vec<String>,
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn fixture() -> Fixture {
    Fixture {
        principal: Principal {
            id: "alice".into(),
            roles: vec!["developer".into(), "user".into()],
            attr: object(json!({
                "department": "eng",
                "teams": ["a", "b", "c"],
                "geo": {"country": "NL", "city": "Amsterdam"},
                "level": 3,
                "login": "alice",
                "ip": "10.1.2.3",
            })),
            policy_version: "default".into(),
            scope: "acme".into(),
        },
        resource: Resource {
            kind: "tool".into(),
            id: "t1".into(),
            attr: object(json!({
                "owner": "alice",
                "tags": ["x", "y"],
                "arguments": {"path": "/home/alice/x.txt"},
                "count": 30,
                "nested": {"a": {"b": [1, 2, {"c": true}]}},
                "nothing": null,
                "big": (0..70_000).collect::<Vec<i64>>(),
            })),
            ..Default::default()
        },
        aux: json!({"jwt": {"iss": "idp", "aud": ["x"]}}),
        globals: object(json!({"env": "prod"})),
        constants: Arc::new(object(json!({"max": 10}))),
        now: chrono::Utc
            .with_ymd_and_hms(2024, 6, 1, 12, 0, 0)
            .single()
            .unwrap_or_default(),
        derived: vec!["owner".into()],
    }
}

fn compile(src: &str) -> Result<Expr, String> {
    CelEnv::new().compile(src)
}

/// Evaluates `src` to JSON against the fixture, with `vars`.
fn eval_vars(src: &str, vars: &Variables) -> Result<Value, String> {
    let f = fixture();
    let env = CelEnv::new();
    let expr = env.compile(src)?;
    let request = Request {
        principal: &f.principal,
        resource: &f.resource,
        aux_data: &f.aux,
        now: f.now,
        globals: &f.globals,
        clock_read: Default::default(),
    };
    let ctx = EvalCtx {
        env: &env,
        request: &request,
        action: "read",
        constants: &f.constants,
        variables: vars,
        effective_derived_roles: &f.derived,
        derived_roles_error: None,
    };
    expr.eval_json(&ctx)
}

fn eval(src: &str) -> Result<Value, String> {
    eval_vars(src, &Variables::default())
}

/// Table of expressions and the JSON value they evaluate to.
fn assert_values(cases: &[(&str, Value)]) {
    let mut failures = Vec::new();
    for (src, want) in cases {
        match eval(src) {
            Ok(got) if got == *want => {}
            other => failures.push(format!("{src}\n    want {want}\n    got  {other:?}")),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Table of expressions that compile but fail to evaluate, with part of the message.
fn assert_eval_errors(cases: &[(&str, &str)]) {
    let mut failures = Vec::new();
    for (src, want) in cases {
        match eval(src) {
            Err(e) if e.contains(want) && !e.contains('\n') => {}
            other => failures.push(format!(
                "{src}\n    want error {want:?}\n    got  {other:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Table of expressions rejected at load, with part of the message.
fn assert_compile_errors(cases: &[(&str, &str)]) {
    let mut failures = Vec::new();
    for (src, want) in cases {
        match compile(src) {
            Err(e) if e.contains(want) && !e.contains('\n') => {}
            Err(e) => failures.push(format!("{src}\n    want {want:?}\n    got  {e}")),
            Ok(_) => failures.push(format!("{src}\n    want {want:?}\n    compiled")),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn types_are_shareable() {
    fn check<T: Send + Sync + Clone + std::fmt::Debug>() {}
    check::<CelEnv>();
    check::<Expr>();
    check::<Variables>();
}

#[test]
fn core_language_and_numbers() {
    assert_values(&[
        ("1 + 2", json!(3)),
        ("'a' + 'b'", json!("ab")),
        ("[0, 1].all(x, 1 / x > 5)", json!(false)),
        ("(1 / 0 == 1) || true", json!(true)),
        ("1 == 1.0 && 1 < 2u", json!(true)),
        ("{'a': 1, 'a': 2}['a']", json!(2)),
        ("'%s-%d'.format(['a', 1])", json!("a-1")),
        ("math.greatest(1, 2)", json!(2)),
        ("lists.range(3)", json!([0, 1, 2])),
        ("[3, 1, 2].sort()", json!([1, 2, 3])),
        ("'ABC'.lowerAscii()", json!("abc")),
        ("base64.encode(b'hello')", json!("aGVsbG8=")),
        ("optional.of(1).hasValue()", json!(true)),
        ("type(1) == int", json!(true)),
        ("id(1)", json!(1)),
        ("[1, 2].map(x, x * 2)", json!([2, 4])),
        ("[1, 2, 3].filter(x, x > 1)", json!([2, 3])),
        ("[1, 2, 3].exists_one(x, x > 2)", json!(true)),
        ("[{'n': 2}, {'n': 1}].sortBy(e, e.n)[0].n", json!(1)),
        ("{'a': 1}.?a.optMap(v, v + 1).value()", json!(2)),
        ("R.attr.?nested.?a.?zz.orValue(5)", json!(5)),
        ("P.attr.teams.distinct().size()", json!(3)),
        ("P.attr.teams.slice(1, 2)", json!(["b"])),
    ]);
}

#[test]
fn request_values_are_cerbos_shaped() {
    assert_values(&[
        ("R.attr.count", json!(30)),
        ("R.attr.count + 0.5", json!(30.5)),
        ("R.attr.count == 30", json!(true)),
        ("P.attr.level * 2.0", json!(6)),
        ("type(R.attr.count) == double", json!(true)),
        ("P.id", json!("alice")),
        ("P.roles", json!(["developer", "user"])),
        (
            "P.policyVersion + P.policy_version",
            json!("defaultdefault"),
        ),
        ("P.scope", json!("acme")),
        ("R.kind + ':' + R.id", json!("tool:t1")),
        ("R.policyVersion", json!("")),
        ("R.attr.nested.a.b[2].c", json!(true)),
        ("R.attr.nested.a.b[0]", json!(1)),
        ("R.attr.nothing == null", json!(true)),
        ("has(R.attr.owner) && !has(R.attr.nope)", json!(true)),
        ("'owner' in R.attr && !('nope' in R.attr)", json!(true)),
        ("size(P.roles) == 2 && P.roles.size() == 2", json!(true)),
        ("P.roles.exists(r, r == 'developer')", json!(true)),
        ("'developer' in P.roles", json!(true)),
        ("R.attr.tags.map(t, t + '!')", json!(["x!", "y!"])),
        ("R.attr.tags.filter(t, t == 'y')", json!(["y"])),
        (
            "P.attr.geo == {'country': 'NL', 'city': 'Amsterdam'}",
            json!(true),
        ),
        (
            "{'country': 'NL', 'city': 'Amsterdam'} == P.attr.geo",
            json!(true),
        ),
        ("P.attr.teams == ['a', 'b', 'c']", json!(true)),
        ("['a', 'b', 'c'] == P.attr.teams", json!(true)),
        ("[P.attr.teams] == [['a', 'b', 'c']]", json!(true)),
        ("P.attr.teams in [['a', 'b', 'c']]", json!(true)),
        ("'b' in P.attr.teams && !('z' in P.attr.teams)", json!(true)),
        (
            "3 in [P.attr.level] && 3 in R.attr.nested.a.b == false",
            json!(true),
        ),
        ("P.attr.teams + ['d']", json!(["a", "b", "c", "d"])),
        ("['z'] + P.attr.teams", json!(["z", "a", "b", "c"])),
        ("P.attr.?missing.orValue('dflt')", json!("dflt")),
        ("P.attr.teams.join(',')", json!("a,b,c")),
        ("P.attr.teams.reverse()", json!(["c", "b", "a"])),
        ("R.attr.all(k, k != '')", json!(true)),
        ("size(R.attr.arguments)", json!(1)),
        (
            "R.attr.arguments.path.startsWith('/home/' + P.attr.login) && 'developer' in P.roles",
            json!(true),
        ),
        ("request.principal.attr.department == 'eng'", json!(true)),
        (
            "request.resource.attr.owner == request.principal.id",
            json!(true),
        ),
        ("request.principal.roles[0]", json!("developer")),
        ("request.auxData.jwt.iss", json!("idp")),
        ("request.aux_data.jwt.aud[0]", json!("x")),
        ("request.action", json!("read")),
        ("request['action'] == 'read'", json!(true)),
        ("runtime.effectiveDerivedRoles", json!(["owner"])),
        ("'owner' in runtime.effective_derived_roles", json!(true)),
        ("G.env + globals.env", json!("prodprod")),
        ("C.max + constants.max", json!(20)),
        (
            "P.attr",
            json!({
                "department": "eng", "teams": ["a", "b", "c"],
                "geo": {"country": "NL", "city": "Amsterdam"},
                "level": 3, "login": "alice", "ip": "10.1.2.3",
            }),
        ),
        (
            "string(R.attr.count) == '30' && int(R.attr.count) == 30",
            json!(true),
        ),
        ("R.attr.count > 10 && R.attr.count < 31u", json!(true)),
        ("R.attr.tags[0] + R.attr.tags[1]", json!("xy")),
        ("size(R.attr.owner) + R.attr.owner.size()", json!(10)),
        ("now().getFullYear()", json!(2024)),
        (
            "R.attr.nested == {'a': {'b': [1, 2, {'c': true}]}}",
            json!(true),
        ),
        (
            "R.attr.nested != {'a': {'b': [1, 2, {'c': false}]}}",
            json!(true),
        ),
        ("[R.attr.nested.a.b[2]] == [{'c': true}]", json!(true)),
        ("{'c': true} in R.attr.nested.a.b", json!(true)),
        ("R.attr.nested.a.b[2] in [{'c': true}]", json!(true)),
        (
            "P.attr.geo in [P.attr.geo] && P.attr.teams != P.attr.geo",
            json!(true),
        ),
        (
            "[P.attr.geo].exists(g, g == {'country': 'NL', 'city': 'Amsterdam'})",
            json!(true),
        ),
        ("R.attr.big.size()", json!(70_000)),
        ("69999 in R.attr.big", json!(true)),
    ]);
}

#[test]
fn time_now_and_getters() {
    assert_values(&[
        ("now()", json!("2024-06-01T12:00:00Z")),
        ("now() == now()", json!(true)),
        ("now() > timestamp('2020-01-01T00:00:00Z')", json!(true)),
        (
            "timeSince(timestamp('2024-06-01T11:00:00Z'))",
            json!("3600s"),
        ),
        (
            "timestamp('2024-06-01T11:00:00Z').timeSince() == duration('1h')",
            json!(true),
        ),
        (
            "timestamp('2024-03-15T10:20:30+02:00').getHours()",
            json!(8),
        ),
        (
            "timestamp('2024-03-15T23:20:30-02:00').getDate()",
            json!(16),
        ),
        (
            "timestamp('2024-03-15T10:20:30Z').getHours('America/New_York')",
            json!(6),
        ),
        (
            "timestamp('2024-03-15T10:20:30.456Z').getMilliseconds()",
            json!(456),
        ),
        ("timestamp('2024-03-15T10:20:30Z').getDayOfWeek()", json!(5)),
        ("duration('90m').getHours()", json!(1)),
        ("duration('1h30m').getMinutes()", json!(90)),
    ]);
}

#[test]
fn regexes_are_re2_and_cached() {
    assert_values(&[
        ("'٣'.matches('^\\\\d$')", json!(false)),
        ("'3'.matches('^\\\\d$')", json!(true)),
        ("'é'.matches('^\\\\w$')", json!(false)),
        ("'a_1'.matches('^[\\\\w]+$')", json!(true)),
        ("'é'.matches('^\\\\W$')", json!(true)),
        ("'x y'.matches('x\\\\sy')", json!(true)),
        ("'a b'.matches('\\\\ba\\\\b')", json!(true)),
        ("matches('abc', 'b')", json!(true)),
        ("'['.matches('^[[]$')", json!(true)),
        ("'a'.matches('^[[:alpha:]]$')", json!(true)),
        ("'&'.matches('^[&&]$')", json!(true)),
        ("'a.b'.matches('^\\\\Qa.b\\\\E$')", json!(true)),
        ("'axb'.matches('^\\\\Qa.b\\\\E$')", json!(false)),
        ("'é'.matches('^\\\\pL$')", json!(true)),
        ("'ABC'.matches('(?i)^abc$')", json!(true)),
        ("'a{'.matches('^a{$')", json!(true)),
        (
            "'aa'.matches('^a{2}$') && 'aaa'.matches('^a{2,}$') && 'a'.matches('^a{1,2}$')",
            json!(true),
        ),
        (
            "'a{x}'.matches('^a{x}$') && 'a{2'.matches('^a{2$')",
            json!(true),
        ),
        ("R.attr.owner.matches('^al')", json!(true)),
        ("R.attr.owner.matches(P.id)", json!(true)),
        ("regex.extract('abc123', '[0-9]+').value()", json!("123")),
        ("regex.extract('hello world', 'hello(.*)')", json!(" world")),
        ("regex.extract('HELLO', 'hello').hasValue()", json!(false)),
        ("regex.extractAll('a1b2', '[0-9]')", json!(["1", "2"])),
        (
            "regex.extractAll('id:1, id:22', 'id:(\\\\d+)')",
            json!(["1", "22"]),
        ),
        ("regex.replace('abc', 'b', 'x')", json!("axc")),
        ("regex.replace('banana', 'a', 'o', 2)", json!("bonona")),
        ("regex.replace('abc', '(b)', '[$1]')", json!("a[b]c")),
    ]);
    assert_eval_errors(&[
        (
            "regex.extract('x@y', '(.*)@(.*)')",
            "more than one capturing group",
        ),
        ("regex.replace('abc', 'b', '$2')", "references group $2"),
        (
            "'a'.matches(R.attr.owner + '(')",
            "invalid regular expression",
        ),
        ("'aa'.matches('(a)\\\\1')", "invalid regular expression"),
    ]);
}

#[test]
fn bind_and_two_variable_comprehensions() {
    assert_values(&[
        ("cel.bind(a, 1, cel.bind(b, a + 1, a + b))", json!(3)),
        (
            "cel.bind(t, R.attr.tags, t.size() == 2 && 'x' in t)",
            json!(true),
        ),
        ("[[1, 2], [3]].all(i, xs, xs.all(j, x, x > i))", json!(true)),
        (
            "{'a': 1, 'b': 2}.exists(k, v, k == 'b' && v == 2)",
            json!(true),
        ),
        ("[10, 20].exists(i, v, i == 1 && v == 20)", json!(true)),
        ("[1, 2].existsOne(i, v, v == 2)", json!(true)),
        ("[1, 2].all(i, v, v > 0)", json!(true)),
        ("[1, 2].transformList(i, v, i * 10 + v)", json!([1, 12])),
        ("[1, 2, 3].transformList(i, v, i > 0, v)", json!([2, 3])),
        ("{'a': 1}.transformMap(k, v, v + 1)", json!({"a": 2})),
        (
            "{'a': 1, 'b': 2}.transformMap(k, v, v > 1, v)",
            json!({"b": 2}),
        ),
        (
            "{'a': 'x'}.transformMapEntry(k, v, {v: k})",
            json!({"x": "a"}),
        ),
        ("R.attr.tags.all(i, t, t.size() == 1)", json!(true)),
        ("P.attr.geo.exists(k, v, v == 'NL')", json!(true)),
        (
            "P.attr.geo.transformMap(k, v, v + '!')",
            json!({"country": "NL!", "city": "Amsterdam!"}),
        ),
    ]);
    assert_eval_errors(&[(
        "{'a': 1, 'b': 1}.transformMapEntry(k, v, {v: k})",
        "insert failed: key 1 already exists",
    )]);
}

#[test]
fn cerbos_library() {
    assert_values(&[
        ("'10.1.2.3'.inIPAddrRange('10.0.0.0/8')", json!(true)),
        ("'10.1.2.3'.inIPAddrRange('10.2.0.0/16')", json!(false)),
        ("'2001:db8::1'.inIPAddrRange('2001:db8::/32')", json!(true)),
        ("'::ffff:10.1.2.3'.inIPAddrRange('10.0.0.0/8')", json!(true)),
        ("P.attr.ip.inIPAddrRange('10.1.0.0/16')", json!(true)),
        ("intersect([1, 2, 3], [3, 2])", json!([3, 2])),
        ("[3, 2].intersect([1, 2, 3])", json!([3, 2])),
        ("P.attr.teams.intersect(['c', 'a', 'z'])", json!(["a", "c"])),
        ("[1, 2, 2].except([1])", json!([2, 2])),
        ("except(P.attr.teams, ['b'])", json!(["a", "c"])),
        ("[1].isSubset([1, 2])", json!(true)),
        ("is_subset([3], [1, 2])", json!(false)),
        ("[1].isSubset([1.0])", json!(true)),
        ("hasIntersection([1, 2], [2])", json!(true)),
        ("has_intersection(['a'], ['b'])", json!(false)),
        ("P.roles.hasIntersection(['user', 'admin'])", json!(true)),
        (
            "lists.range(20).map(i, string(i)).isSubset(lists.range(30).map(i, string(i)))",
            json!(true),
        ),
        (
            "lists.range(30).map(i, string(i)).isSubset(lists.range(20).map(i, string(i)))",
            json!(false),
        ),
        ("sets.contains([1, 2], [1])", json!(true)),
        ("sets.contains([1], [1.0])", json!(true)),
        ("sets.contains([1], [2])", json!(false)),
        ("sets.equivalent([1, 2], [2, 1, 1])", json!(true)),
        ("sets.intersects([1, 2], [2, 3])", json!(true)),
        ("sets.intersects([1], [2, 3])", json!(false)),
        (
            "json.encode({'a': [1, 2.5, 'x', duration('1m')]})",
            json!("{\"a\":[1,2.5,\"x\",\"60s\"]}"),
        ),
    ]);
}

#[test]
fn hierarchies() {
    assert_values(&[
        (
            "hierarchy('a:b:c', ':').descendentOf(hierarchy(['a', 'b']))",
            json!(true),
        ),
        ("hierarchy('a.b.c')[1]", json!("b")),
        (
            "size(hierarchy('a.b.c')) == 3 && hierarchy('a.b.c').size() == 3",
            json!(true),
        ),
        ("hierarchy('a.b') == hierarchy(['a', 'b'])", json!(true)),
        ("hierarchy('a.b') != hierarchy('a.c')", json!(true)),
        (
            "hierarchy('a.b.c').commonAncestors(hierarchy('a.b.d')) == hierarchy('a.b')",
            json!(true),
        ),
        (
            "hierarchy('a.b.c').commonAncestors(hierarchy('a.b.c'))",
            json!("a.b"),
        ),
        (
            "hierarchy('a.b').ancestorOf(hierarchy('a.b.c'))",
            json!(true),
        ),
        (
            "hierarchy('a.b').ancestorOf(hierarchy('a.b'))",
            json!(false),
        ),
        (
            "hierarchy('a.b').immediateParentOf(hierarchy('a.b.c'))",
            json!(true),
        ),
        (
            "hierarchy('a').immediateParentOf(hierarchy('a.b.c'))",
            json!(false),
        ),
        (
            "hierarchy('a.b.c').immediateChildOf(hierarchy('a.b'))",
            json!(true),
        ),
        (
            "hierarchy('a.b.c').siblingOf(hierarchy('a.b.d'))",
            json!(true),
        ),
        (
            "hierarchy('a.b.c').siblingOf(hierarchy('a.x.d'))",
            json!(false),
        ),
        (
            "hierarchy('a.b').overlaps(hierarchy('a.b.c.d'))",
            json!(true),
        ),
        (
            "hierarchy('a.x').overlaps(hierarchy('a.b.c'))",
            json!(false),
        ),
        ("type(hierarchy('a')) == cerbos.lib.hierarchy", json!(true)),
        ("hierarchy(R.attr.arguments.path, '/').size()", json!(4)),
        ("hierarchy(P.attr.teams)", json!("a.b.c")),
        ("hierarchy('ab', '')", json!("a.b")),
    ]);
    assert_eval_errors(&[
        ("hierarchy('a')[5]", "index out of range"),
        ("hierarchy([1])", "failed to convert list to string slice"),
        ("hierarchy('a').ancestorOf('a.b')", "no matching overload"),
    ]);
}

#[test]
fn network_extension() {
    assert_values(&[
        ("ip('10.0.0.1').family()", json!(4)),
        ("ip('::1').family()", json!(6)),
        ("cidr('10.0.0.0/8').containsIP(ip('10.1.2.3'))", json!(true)),
        ("cidr('10.0.0.0/8').containsIP('11.1.2.3')", json!(false)),
        ("cidr('10.0.0.0/8').containsIP(P.attr.ip)", json!(true)),
        (
            "isIP('::1') && !isIP('1.2.3') && !isIP('::ffff:1.2.3.4')",
            json!(true),
        ),
        (
            "isCIDR('10.0.0.0/8') && !isCIDR('10.0.0.0/33') && !isCIDR('10.0.0.0/08')",
            json!(true),
        ),
        (
            "ip('127.0.0.1').isLoopback() && ip('::1').isLoopback()",
            json!(true),
        ),
        ("ip.isCanonical('2001:db8::1')", json!(true)),
        ("ip.isCanonical('2001:DB8::1')", json!(false)),
        ("ip.isCanonical('2001:db8:0:0:0:0:0:1')", json!(false)),
        (
            "cidr('192.168.1.5/24').masked() == cidr('192.168.1.0/24')",
            json!(true),
        ),
        ("cidr('192.168.1.0/24').prefixLength()", json!(24)),
        (
            "cidr('192.168.1.5/24').ip() == ip('192.168.1.5')",
            json!(true),
        ),
        (
            "cidr('10.0.0.0/8').containsCIDR('10.1.0.0/16')",
            json!(true),
        ),
        (
            "cidr('10.1.0.0/16').containsCIDR(cidr('10.0.0.0/8'))",
            json!(false),
        ),
        (
            "string(ip('::1')) + ' ' + string(cidr('::/0'))",
            json!("::1 ::/0"),
        ),
        (
            "ip('8.8.8.8').isGlobalUnicast() && !ip('255.255.255.255').isGlobalUnicast()",
            json!(true),
        ),
        (
            "ip('fe80::1').isLinkLocalUnicast() && ip('169.254.1.1').isLinkLocalUnicast()",
            json!(true),
        ),
        (
            "ip('ff02::1').isLinkLocalMulticast() && ip('224.0.0.1').isLinkLocalMulticast()",
            json!(true),
        ),
        (
            "ip('0.0.0.0').isUnspecified() && ip('::').isUnspecified()",
            json!(true),
        ),
        ("type(ip('1.2.3.4')) == net.IP", json!(true)),
        ("ip('1.2.3.4')", json!("1.2.3.4")),
    ]);
    assert_eval_errors(&[
        ("ip(R.attr.owner)", "parse error"),
        (
            "R.attr.owner.inIPAddrRange('10.0.0.0/8')",
            "invalid IP address",
        ),
    ]);
}

#[test]
fn path_functions() {
    assert_values(&[
        ("basePath('/a/b.txt')", json!("b.txt")),
        ("basePath('')", json!(".")),
        ("basePath('/')", json!("/")),
        ("dirPath('/a/b/c')", json!("/a/b")),
        ("dirPath('a')", json!(".")),
        ("dirPath('/a/../b/c/')", json!("/b")),
        ("extPath('/a/b.tar.gz')", json!(".gz")),
        ("extPath('/a.b/c')", json!("")),
        ("volumeName('/a')", json!("")),
        ("joinPath(['a', 'b', '../c'])", json!("a/c")),
        ("joinPath(['', '', 'a', '', 'b'])", json!("a/b")),
        ("joinPath(['', ''])", json!("")),
        ("'/a/b'.pathHasPrefix('/a')", json!(true)),
        ("pathHasPrefix('/a/b', '/x')", json!(false)),
        ("'/a/b'.pathHasPrefix('/a/b')", json!(false)),
        ("'/ab'.pathHasPrefix('/a')", json!(false)),
        ("'/a/../etc/passwd'.pathHasPrefix('/a')", json!(false)),
        (
            "R.attr.arguments.path.pathHasPrefix('/home/' + P.id)",
            json!(true),
        ),
        ("'/a/b'.pathMatch('/a/*')", json!(true)),
        ("'/a/b/c'.pathMatch('/a/*')", json!(false)),
        ("pathMatch('/a/b.txt', '/a/*.txt')", json!(true)),
        ("pathMatch('/a/b', '/a/[a-c]')", json!(true)),
        ("pathMatch('/a/d', '/a/[^a-c]')", json!(true)),
        ("pathMatch('/a/b', '/a/?')", json!(true)),
        ("pathMatch('/a//b', '/a/b')", json!(true)),
        ("pathMatch('/a/*', '/a/\\\\*')", json!(true)),
        ("'/a/b'.pathMatchAnyOf(['/x/*', '/a/?'])", json!(true)),
        ("pathMatchAnyOf('/a/b', ['/x/*'])", json!(false)),
        ("relPath('/a/b', '/a/c/d')", json!("../c/d")),
        ("relPath('/a', '/a/b/c')", json!("b/c")),
        ("relPath('a/b', 'a/b')", json!(".")),
        ("relPath('/a/b/c', '/a')", json!("../..")),
    ]);
    assert_eval_errors(&[
        ("relPath('a', '/b')", "can't make /b relative to a"),
        (
            "'/a/b'.pathMatch(R.attr.owner + '[')",
            "syntax error in pattern",
        ),
    ]);
}

#[test]
fn go_filepath_clean() {
    for (input, want) in [
        ("", "."),
        ("a/../..", ".."),
        ("/../a", "/a"),
        ("a//b/./c/", "a/b/c"),
        ("../../a/b/../c", "../../a/c"),
        ("/a/b/../../..", "/"),
        ("./", "."),
        ("abc/def/../../..", ".."),
    ] {
        assert_eq!(paths::clean(input), want, "clean({input:?})");
    }
}

#[test]
fn spiffe_functions() {
    assert_values(&[
        (
            "spiffeID('spiffe://example.org/ns/default/sa/x').path()",
            json!("/ns/default/sa/x"),
        ),
        (
            "spiffeID('spiffe://example.org/a').trustDomain() == spiffeTrustDomain('example.org')",
            json!(true),
        ),
        (
            "spiffeID('spiffe://example.org/a').trustDomain().name()",
            json!("example.org"),
        ),
        (
            "spiffeTrustDomain('example.org').id()",
            json!("spiffe://example.org"),
        ),
        (
            "spiffeID('spiffe://example.org/a').isMemberOf(spiffeTrustDomain('spiffe://example.org'))",
            json!(true),
        ),
        (
            "spiffeMatchAny().matchesID(spiffeID('spiffe://x.org/a'))",
            json!(true),
        ),
        (
            "spiffeMatchExact(spiffeID('spiffe://x.org/a')).matchesID('spiffe://x.org/a')",
            json!(true),
        ),
        (
            "spiffeMatchOneOf(['spiffe://x.org/a', 'spiffe://x.org/b']).matchesID('spiffe://x.org/c')",
            json!(false),
        ),
        (
            "spiffeMatchTrustDomain('x.org').matchesID('spiffe://x.org/c')",
            json!(true),
        ),
        (
            "spiffeID('spiffe://x.org/a') == 'spiffe://x.org/a'",
            json!(true),
        ),
        ("spiffeID('spiffe://x.org/a')", json!("spiffe://x.org/a")),
    ]);
    assert_eval_errors(&[
        ("spiffeID(R.attr.owner)", "scheme is missing or invalid"),
        (
            "spiffeID('spiffe://x.org/' + R.attr.owner + '/')",
            "trailing slash",
        ),
    ]);
}

#[test]
fn output_is_protojson_like() {
    assert_values(&[
        ("duration('90m')", json!("5400s")),
        ("duration('1.5s')", json!("1.5s")),
        ("duration('-1.5s')", json!("-1.5s")),
        (
            "timestamp('2024-01-01T00:00:00Z')",
            json!("2024-01-01T00:00:00Z"),
        ),
        (
            "timestamp('2024-01-01T00:00:00.5+02:00')",
            json!("2024-01-01T00:00:00.5+02:00"),
        ),
        ("b'hi'", json!("aGk=")),
        ("1u", json!(1)),
        ("30.0", json!(30)),
        ("0.1", json!(0.1)),
        ("-0.5", json!(-0.5)),
        ("1e300", json!(1e300)),
        ("1.0 / 0.0", json!("Infinity")),
        ("[1, 'a', true, null]", json!([1, "a", true, null])),
        (
            "{'a': 1.0, 'b': {'c': [duration('1s')]}}",
            json!({"a": 1, "b": {"c": ["1s"]}}),
        ),
        ("optional.of(1)", json!(1)),
        ("optional.none()", json!(null)),
        ("type(1)", json!("int")),
        (
            "R",
            json!({
                "kind": "tool", "id": "t1", "policyVersion": "", "scope": "",
                "attr": fixture().resource.attr,
            }),
        ),
    ]);
    assert_eval_errors(&[("{1: 'x'}", "key of type int")]);
}

#[test]
fn evaluation_errors() {
    assert_eval_errors(&[
        ("R.attr.missing", "No such key: missing"),
        ("1 / 0 == 1", "Division by zero"),
        ("R.attr.count + 1", "Unsupported binary operator"),
        ("timestamp(R.attr.owner)", "timestamp"),
        ("P.attr.teams[7]", "Index out of bounds"),
        ("R['nope']", "No such key: nope"),
        (
            "P.id == 'alice' && 1 < 'a'",
            "no matching overload for '_<_'",
        ),
        ("1 == 1 && P.id.matches(1)", "'matches'"),
    ]);
    let e = compile("1 + 1").and_then(|e| {
        let f = fixture();
        let env = CelEnv::new();
        let request = Request {
            principal: &f.principal,
            resource: &f.resource,
            aux_data: &f.aux,
            now: f.now,
            globals: &f.globals,
            clock_read: Default::default(),
        };
        e.eval_bool(&EvalCtx {
            env: &env,
            request: &request,
            action: "read",
            constants: &f.constants,
            variables: &Variables::default(),
            effective_derived_roles: &f.derived,
            derived_roles_error: None,
        })
    });
    // Cerbos 0.55 reads a non-boolean condition as not satisfied, in both modes.
    assert_eq!(e, Ok(false));
}

#[test]
fn load_time_rejections() {
    let long = format!("'{}'", "x".repeat(MAX_SOURCE_LEN));
    let deep_parens = format!("{}1{}", "(".repeat(200), ")".repeat(200));
    let long_chain = format!("1{}", " + 1".repeat(60));
    let huge_chain = format!("1{}", "+1".repeat(4000));
    let nested_loops = "[1].all(a, [1].all(b, [1].all(c, [1].all(d, [1].all(e, true)))))";
    let deep_lists = format!("{}1{}", "[".repeat(90), "]".repeat(90));
    assert_compile_errors(&[
        ("foo == 1", "undeclared reference to 'foo'"),
        ("[1].all(x, y > 0)", "undeclared reference to 'y'"),
        ("x.all(x, x)", "undeclared reference to 'x'"),
        ("undefinedFn(1)", "undeclared function 'undefinedFn'"),
        ("P.id.frobnicate()", "undeclared function 'frobnicate'"),
        ("now(1)", "undeclared function 'now'"),
        ("foo.bind(a, 1, a)", "undeclared function 'bind'"),
        ("absPath('a')", "unsupported function 'absPath'"),
        ("P.atr.x == 1", "undefined field 'atr' of principal"),
        ("R.kid == 'x'", "undefined field 'kid' of resource"),
        ("request.foo", "undefined field 'foo' of request"),
        ("runtime.roles", "undefined field 'roles' of runtime"),
        ("P.id.x == 1", "field 'id' of principal has no field 'x'"),
        (
            "duration('1d') > duration('1h')",
            "invalid duration literal \"1d\"",
        ),
        (
            "timestamp('bad') > now()",
            "invalid timestamp literal \"bad\"",
        ),
        ("'a'.matches('(')", "invalid regular expression \"(\""),
        ("matches('a', '[')", "invalid regular expression"),
        (
            "regex.replace('a', '(', 'b') == 'a'",
            "invalid regular expression",
        ),
        ("ip('1.2.3') == ip('1.2.3.4')", "invalid ip literal"),
        (
            "cidr('10.0.0.0/40').prefixLength() == 1",
            "invalid cidr literal",
        ),
        ("ip.isCanonical('x')", "invalid isCanonical literal"),
        ("'1.2.3.4'.inIPAddrRange('bad')", "invalid CIDR \"bad\""),
        (
            "spiffeID('http://x').path() == ''",
            "invalid spiffeID literal",
        ),
        ("V == {}", "'V' must be followed by a variable name"),
        ("size(variables) == 0", "'variables' must be followed"),
        ("V[R.id]", "variables must be read by name"),
        ("a.b.C{x: 1}", "message construction is not supported"),
        ("1 +", "syntax error at line 1"),
        (&long, "expression is too long"),
        (&deep_parens, "nests too deeply"),
        (&long_chain, "nests too deeply (61 levels, limit 50)"),
        (&huge_chain, "nests too deeply"),
        (&deep_lists, "nests too deeply (91 levels"),
        (
            nested_loops,
            "comprehensions nest too deeply (5 levels, limit 4)",
        ),
    ]);
    // Four nested loops are fine, and binds do not count as loops.
    let four =
        "[1].all(a, [1].all(b, [1].all(c, [1].all(d, cel.bind(e, 1, cel.bind(f, 2, e < f))))))";
    assert_eq!(eval(four), Ok(json!(true)));
    // Parentheses add no depth: 90 of them parse (on the compiler thread) and evaluate.
    let parens = format!("{}1{}", "(".repeat(90), ")".repeat(90));
    assert_eq!(eval(&parens), Ok(json!(1)));
}

#[test]
fn compiles_concurrently() {
    let handles: Vec<_> = (0..8)
        .map(|i| std::thread::spawn(move || compile(&format!("R.attr.count > {i}.0")).is_ok()))
        .collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap_or(false)));
}

#[test]
fn cost_bound_stops_runaway_loops() {
    assert_eval_errors(&[
        (
            "lists.range(1000).all(x, lists.range(1000).all(y, y >= 0))",
            COST_EXCEEDED,
        ),
        (
            "lists.range(200).all(a, lists.range(200).all(b, lists.range(200).all(c, c >= 0)))",
            COST_EXCEEDED,
        ),
        (
            "lists.range(1000).map(x, lists.range(1000).map(y, y)).size() > 0",
            COST_EXCEEDED,
        ),
        (
            "lists.range(1000).map(x, lists.range(1000000)).size() > 0",
            COST_EXCEEDED,
        ),
        (
            "R.attr.big.all(x, R.attr.big.exists(y, y == x))",
            COST_EXCEEDED,
        ),
        (
            "R.attr.big.map(x, x).filter(x, x >= 0).size() > 0",
            COST_EXCEEDED,
        ),
        ("R.attr.big.transformMap(i, v, v).size() > 0", COST_EXCEEDED),
        ("lists.range(2000000).size() > 0", "exceeds maximum allowed"),
    ]);
    // A single loop over 70,000 elements is within budget.
    assert_values(&[("R.attr.big.all(x, x >= 0)", json!(true))]);
    // Each evaluation starts with a full budget.
    for _ in 0..3 {
        assert_values(&[("R.attr.big.exists(x, x == 69999.0)", json!(true))]);
    }
}

fn vars(defs: &[(&str, &str)]) -> Result<Variables, Vec<(String, String)>> {
    let compiled = defs
        .iter()
        .map(|(n, src)| Ok((n.to_string(), compile(src)?)))
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| vec![("compile".to_string(), e)])?;
    Variables::compile(compiled)
}

#[test]
fn variables_used_are_collected() {
    let e = compile(
        "V.a && variables.b && has(V.c) && V['d'] && V.a && [1].all(V, V > 0) && V.e.f && has(V.g.h)",
    );
    assert_eq!(
        e.map(|e| e.variables_used().to_vec()),
        Ok(["a", "b", "c", "d", "e", "g"].map(String::from).to_vec())
    );
}

#[test]
fn variables_order_cycles_and_errors() {
    let v = vars(&[("c", "V.b + 1"), ("b", "V.a + 1"), ("a", "1")]).unwrap();
    assert_eq!(
        eval_vars("V.c == 3 && variables.a == 1", &v),
        Ok(json!(true))
    );

    let cyc = vars(&[("a", "V.b"), ("b", "V.a"), ("ok", "1")]).unwrap_err();
    assert!(
        !cyc.is_empty()
            && cyc
                .iter()
                .all(|(_, m)| m == "cyclical variable definitions"),
        "{cyc:?}"
    );
    let undefined = vars(&[("a", "V.zz == 1")]);
    assert_eq!(
        undefined.err(),
        Some(vec![(
            "a".to_string(),
            "undefined variable 'zz'".to_string()
        )])
    );
    let self_ref = vars(&[("a", "V.a")]);
    assert!(self_ref.is_err());
}

#[test]
fn variables_are_lazy_isolated_and_cached() {
    let v = vars(&[
        ("broken", "1 / 0 == 1"),
        ("fine", "true"),
        // 60,000 loop iterations: twice would exceed the budget.
        ("costly", "lists.range(60000).all(x, x >= 0)"),
        ("geo", "P.attr.geo"),
        ("h", "hierarchy(R.attr.arguments.path, '/')"),
        ("tags", "R.attr.tags + ['z']"),
        ("when", "now() - duration('1h')"),
    ])
    .unwrap();
    assert_eq!(eval_vars("V.fine", &v), Ok(json!(true)));
    assert_eq!(eval_vars("V.broken || V.fine", &v), Ok(json!(true)));
    let err = eval_vars("V.broken", &v);
    assert!(
        matches!(&err, Err(e) if e.contains("variable 'broken'") && e.contains("Division by zero")),
        "{err:?}"
    );
    assert_eq!(
        eval_vars("V.costly && V.costly && variables.costly", &v),
        Ok(json!(true))
    );
    assert_eq!(eval_vars("[1, 2, 3].all(i, V.costly)", &v), Ok(json!(true)));
    assert_eq!(
        eval_vars("V.geo.country == 'NL' && V['geo'].city == 'Amsterdam'", &v),
        Ok(json!(true))
    );
    assert_eq!(
        eval_vars("V.h.size() == 4 && V.h[1] == 'home'", &v),
        Ok(json!(true))
    );
    assert_eq!(eval_vars("V.tags", &v), Ok(json!(["x", "y", "z"])));
    assert_eq!(eval_vars("V.when", &v), Ok(json!("2024-06-01T11:00:00Z")));
    assert_eq!(
        eval_vars("has(V.fine) && !has(V.nope)", &v),
        Ok(json!(true))
    );
}

#[test]
fn variable_chains_are_bounded() {
    let deep = format!("1{}", " + 1".repeat(40));
    let defs = [
        ("a", format!("V.b + {deep}")),
        ("b", format!("V.c + {deep}")),
        ("c", deep.clone()),
    ];
    let compiled: Vec<(String, Expr)> = defs
        .iter()
        .filter_map(|(n, s)| compile(s).ok().map(|e| (n.to_string(), e)))
        .collect();
    assert_eq!(compiled.len(), 3);
    let err = Variables::compile(compiled).err().unwrap_or_default();
    assert!(
        err.iter()
            .any(|(n, m)| n == "a" && m.contains("nest too deeply")),
        "{err:?}"
    );
}

#[test]
fn deepest_accepted_expression_evaluates() {
    // Debug builds use far more stack per level than release ones: give this test room.
    let result = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(|| {
            let chain = format!("1{}", " + 1".repeat(48));
            eval(&chain)
        })
        .map(|h| h.join());
    assert!(matches!(result, Ok(Ok(Ok(v))) if v == json!(49)));
}

/// Eval time per condition; run with
/// `cargo test --release --lib policy::cel::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore = "a timing report, not a check: run it in release by hand (docs/benchmarks.md)"]
fn timing() {
    let f = fixture();
    let env = CelEnv::new();
    let variables = vars(&[("is_owner", "R.attr.owner == P.id")]).unwrap_or_default();
    let request = Request {
        principal: &f.principal,
        resource: &f.resource,
        aux_data: &f.aux,
        now: f.now,
        globals: &f.globals,
        clock_read: Default::default(),
    };
    let ctx = EvalCtx {
        env: &env,
        request: &request,
        action: "read",
        constants: &f.constants,
        variables: &variables,
        effective_derived_roles: &f.derived,
        derived_roles_error: None,
    };
    for src in [
        "true",
        "R.attr.arguments.path.startsWith('/home/' + P.attr.login) && 'developer' in P.roles",
        "request.resource.attr.owner == request.principal.id",
        "V.is_owner && R.attr.tags.exists(t, t == 'y')",
        "P.attr.login.matches('^[a-z]+$')",
        "timestamp('2024-01-01T00:00:00Z') < now() && R.attr.count > 10.0",
        "hierarchy('a.b.c').ancestorOf(hierarchy('a.b.c.d'))",
    ] {
        let Ok(expr) = env.compile(src) else {
            panic!("compile {src}");
        };
        let n = 200_000;
        for _ in 0..10_000 {
            let _ = expr.eval_bool(&ctx);
        }
        let start = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(expr.eval_bool(&ctx), Ok(true), "{src}");
        }
        let per = start.elapsed() / n;
        println!("{per:>10.2?}  {src}");
    }
    let start = std::time::Instant::now();
    for _ in 0..1000 {
        let _ = env.compile("P.roles.exists(r, r in R.attr.tags) && size(R.attr.tags) > 0");
    }
    println!("compile: {:?} per expression", start.elapsed() / 1000);
}

/// Strict evaluation: when a derived role of the scope failed, `runtime.effectiveDerivedRoles`
/// is an error, which CEL's `||` can still absorb (as in Cerbos 0.55 with strictEvaluation).
#[test]
fn failed_derived_roles_make_runtime_an_error() {
    let f = fixture();
    let env = CelEnv::new();
    let request = Request {
        principal: &f.principal,
        resource: &f.resource,
        aux_data: &f.aux,
        now: f.now,
        globals: &f.globals,
        clock_read: Default::default(),
    };
    let ctx = EvalCtx {
        env: &env,
        request: &request,
        action: "read",
        constants: &f.constants,
        variables: &Variables::default(),
        effective_derived_roles: &f.derived,
        derived_roles_error: Some("derived role flagged: no such key"),
    };
    for src in [
        "'owner' in runtime.effectiveDerivedRoles",
        "size(runtime.effective_derived_roles) >= 0",
        "size(runtime['effectiveDerivedRoles']) >= 0",
    ] {
        let got = compile(src).and_then(|e| e.eval_bool(&ctx));
        assert!(
            got.as_ref().is_err_and(|m| m.contains("flagged")),
            "{src}: {got:?}"
        );
    }
    let absorbed = compile("'owner' in runtime.effectiveDerivedRoles || P.id != ''")
        .and_then(|e| e.eval_bool(&ctx));
    assert_eq!(absorbed, Ok(true));
}

/// `has()` as cel-go evaluates it in Cerbos 0.55 (checked against the binary): a scalar
/// operand gives `false`, a list operand or a missing parent is an error.
#[test]
fn presence_tests_follow_cel_go() {
    assert_values(&[
        ("has(R.attr.owner.x)", json!(false)),
        ("has(R.attr.count.x)", json!(false)),
        ("has(R.attr.nothing.x)", json!(false)),
        ("has(R.attr.arguments.path)", json!(true)),
        ("has(R.attr.arguments.nope)", json!(false)),
        ("has(R.attr.nested.a.b)", json!(true)),
        ("has(P.attr.geo.city) && !has(P.attr.geo.zip)", json!(true)),
    ]);
    assert_eval_errors(&[
        ("has(R.attr.tags.x)", ""),
        ("has(R.attr.missing.x)", "missing"),
    ]);
}
