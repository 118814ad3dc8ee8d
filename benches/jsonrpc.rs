//! The strict JSON-RPC parse of an upstream's answer (issue 14 part 4):
//! `cargo bench --bench jsonrpc`.
//!
//! An answer that is forwarded as the upstream's own bytes (any tool result; not a list, which
//! is filtered) needs its envelope read and the whole of it checked (UTF-8, duplicate and
//! case-folded keys at every depth, nesting, the value count), but no tree built.
//! `jsonrpc::parse_head` does that; `jsonrpc::parse` builds the whole `Value` tree, as the
//! answer check did before. Three answers: the proxy bench's one-line text result, a 16 KiB
//! text result, and a structured result of 9,000 small objects (about 1 MiB).
//!
//! Run without `--bench` (`cargo test --benches`, nextest), criterion runs each benchmark once.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "bench code")]

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use serde_json::json;
use toolgate::mcp::jsonrpc::{self, Limits};

fn answers() -> Vec<(&'static str, Vec<u8>)> {
    let text = |s: String| {
        json!({"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": s}]}})
            .to_string()
            .into_bytes()
    };
    let rows: Vec<_> = (0..9000)
        .map(|i| json!({"id": i, "name": format!("item-{i}"), "path": format!("/srv/data/{i}.json"), "size": i * 37, "tags": ["a", "b"], "ok": i % 3 == 0, "score": 0.5}))
        .collect();
    let structured = json!({"jsonrpc": "2.0", "id": 7, "result": {"content": [], "structuredContent": {"rows": rows}}});
    vec![
        ("hello", text("hello".into())),
        ("text 16 KiB", text("lorem ipsum dolor ".repeat(910))),
        (
            "structured, 9,000 objects",
            structured.to_string().into_bytes(),
        ),
    ]
}

fn answer_check(c: &mut Criterion) {
    let limits = Limits {
        max_bytes: 64 << 20,
        max_depth: 128,
        max_nodes: jsonrpc::MAX_UPSTREAM_NODES,
    };
    let mut g = c.benchmark_group("answer check");
    for (name, body) in answers() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(
            format!("{name} ({} bytes): parse, whole tree", body.len()),
            |b| b.iter(|| black_box(jsonrpc::parse(black_box(&body), limits).unwrap())),
        );
        g.bench_function(format!("{name} ({} bytes): parse_head", body.len()), |b| {
            b.iter(|| black_box(jsonrpc::parse_head(black_box(&body), limits).unwrap()))
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    answer_check(&mut c);
    c.final_summary();
}
