//! The large, possibly secret part of a client message, held once.
//!
//! A call's `params.arguments` (or a completion's `ref`, `argument` and `context`) is taken out
//! of the parsed message right after parsing ([`detach`]). The audit row shares it (an `Arc`),
//! the policy check borrows it as `R.attr.arguments` and hands it back, and it goes back into
//! the message just before the message is forwarded ([`Payload::attach`]): one copy per call,
//! where there used to be four (the row, the check, the resource, the stream). Invariant I5:
//! a call's memory is bounded by its body, not a multiple of it.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::jsonrpc::Message;

/// Where the payload lives in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// `params.arguments`, as it was.
    Arguments,
    /// `completion/complete`: the keys of [`COMPLETION_KEYS`] that were there, as one object.
    Completion,
}

/// A completion's keys that carry what the user typed (`argument.value`), what they entered
/// before (`context.arguments`) and what is completed (`ref`, which may name a resource URI).
const COMPLETION_KEYS: [&str; 3] = ["ref", "argument", "context"];

/// The payload of one message, out of it.
#[derive(Debug)]
pub struct Payload {
    value: Arc<Value>,
    slot: Slot,
}

/// Takes the payload out of `msg` (nothing for a message without one).
pub fn detach(msg: &mut Message) -> Option<Payload> {
    let completion = msg.method == "completion/complete";
    let params = msg.value.get_mut("params")?.as_object_mut()?;
    if completion {
        let mut taken = Map::new();
        for k in COMPLETION_KEYS {
            if let Some(v) = params.remove(k) {
                taken.insert(k.to_string(), v);
            }
        }
        return Some(Payload {
            value: Arc::new(Value::Object(taken)),
            slot: Slot::Completion,
        });
    }
    let args = params.remove("arguments")?;
    Some(Payload {
        value: Arc::new(args),
        slot: Slot::Arguments,
    })
}

impl Payload {
    /// A payload that goes where `slot` says.
    pub fn new(value: Value, slot: Slot) -> Payload {
        Payload {
            value: Arc::new(value),
            slot,
        }
    }

    /// The value, shared (for the audit row: digested or redacted per `audit.arguments`).
    pub fn shared(&self) -> Arc<Value> {
        self.value.clone()
    }

    /// The value, borrowed (to check its shape).
    pub fn value(&self) -> &Value {
        &self.value
    }

    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The value itself; free once no one else holds it (the audit row let go of it), a copy
    /// otherwise (an audit sink that keeps rows).
    pub fn into_value(self) -> Value {
        Arc::try_unwrap(self.value).unwrap_or_else(|shared| (*shared).clone())
    }

    /// Puts the payload back where it was, for forwarding.
    pub fn attach(self, msg: &mut Message) {
        let slot = self.slot;
        let value = self.into_value();
        let Some(params) = msg.value.get_mut("params").and_then(Value::as_object_mut) else {
            return;
        };
        match (slot, value) {
            (Slot::Completion, Value::Object(keys)) => params.extend(keys),
            (Slot::Completion, _) => {}
            (Slot::Arguments, v) => {
                params.insert("arguments".into(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::{Limits, parse};

    fn msg(s: &str) -> Message {
        parse(s.as_bytes(), Limits::default()).unwrap()
    }

    #[test]
    fn detach_then_attach_gives_the_message_back() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":[1,2,{"b":"c"}]},"_meta":{}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"f://x"},"argument":{"name":"a","value":"v"},"context":{"arguments":{"k":"v"}},"_meta":{}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"argument":{"name":"a","value":"v"}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1]}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        ] {
            let original = msg(body);
            let mut m = original.clone();
            let p = detach(&mut m);
            if let Some(p) = p {
                assert!(m.params().is_none_or(|ps| !ps.contains_key("arguments")));
                p.attach(&mut m);
            }
            assert_eq!(m, original, "{body}");
        }
    }

    #[test]
    fn the_shared_value_is_what_was_sent_and_is_not_copied_back() {
        let mut m = msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"k":"v"}}}"#,
        );
        let p = detach(&mut m).unwrap();
        assert_eq!(*p.shared(), serde_json::json!({"k": "v"}));
        let before = Arc::as_ptr(&p.value);
        let row = p.shared();
        drop(row);
        // Unique again: taking it out moves the allocation's contents, no deep copy.
        assert_eq!(Arc::strong_count(&p.value), 1);
        assert_eq!(Arc::as_ptr(&p.value), before);
        let completion = detach(&mut msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"p"},"argument":{"name":"a","value":"sk-typed"},"_meta":{"x":1}}}"#,
        ))
        .unwrap();
        assert_eq!(completion.slot(), Slot::Completion);
        assert_eq!(
            *completion.shared(),
            serde_json::json!({"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a", "value": "sk-typed"}})
        );
    }
}
