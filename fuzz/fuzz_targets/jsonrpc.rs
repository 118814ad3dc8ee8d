//! The JSON-RPC envelope: any body is refused with an error, or parsed into a message whose
//! canonical form parses back to the same message (what is forwarded is what was checked).
//! The head parse (answers forwarded as sent) refuses exactly what the full parse refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolgate::mcp::jsonrpc::{Limits, parse, parse_head};

fuzz_target!(|data: &[u8]| {
    let full = parse(data, Limits::default());
    let head = parse_head(data, Limits::default());
    match (&full, &head) {
        (Ok(f), Ok(h)) => assert_eq!((f.kind, &f.id, &f.method), (h.kind, &h.id, &h.method)),
        (Err(f), Err(h)) => assert_eq!(f, h),
        _ => panic!("the head parse and the full parse disagree: {full:?} / {head:?}"),
    }
    if let Ok(m) = full {
        let again = parse(&m.canonical(), Limits::default()).expect("canonical form must parse");
        assert_eq!(again, m);
    }
});
