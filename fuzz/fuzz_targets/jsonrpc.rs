//! The JSON-RPC envelope: any body is refused with an error, or parsed into a message whose
//! canonical form parses back to the same message (what is forwarded is what was checked).
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolgate::mcp::jsonrpc::{Limits, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = parse(data, Limits::default()) {
        let again = parse(&m.canonical(), Limits::default()).expect("canonical form must parse");
        assert_eq!(again, m);
    }
});
