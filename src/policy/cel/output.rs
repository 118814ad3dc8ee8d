//! CEL value → JSON for rule outputs and `json.encode`, as Cerbos produces it (cel-go's
//! conversion to `google.protobuf.Value`, then protojson): every number is a JSON number, a
//! whole double prints as an integer (`30`, not `30.0`), durations are strings of seconds
//! (`"5400s"`, `"1.5s"`), timestamps RFC 3339 with their offset (`"…Z"` in UTC), bytes base64.

use base64::Engine;
use cel::common::types::{
    CelBool, CelBytes, CelDouble, CelDuration, CelInt, CelOptional, CelString, CelTimestamp,
    CelType, CelUInt, Kind,
};
use cel::common::value::Val;
use serde_json::{Number, Value};

/// Deepest value converted (JSON input is at most 128 deep; expressions at most `MAX_DEPTH`).
const MAX_OUTPUT_DEPTH: usize = 200;

/// The JSON form of `v`.
pub(super) fn to_json(v: &dyn Val) -> Result<Value, String> {
    convert(v, 0)
}

fn convert(v: &dyn Val, depth: usize) -> Result<Value, String> {
    if depth > MAX_OUTPUT_DEPTH {
        return Err("value is nested too deeply to output".to_string());
    }
    let ty = v.get_type();
    let unsupported = || format!("cannot output a value of type {}", ty.name());
    Ok(match ty.kind() {
        Kind::NullType => Value::Null,
        Kind::Boolean => Value::Bool(*v.downcast_ref::<CelBool>().ok_or_else(unsupported)?.inner()),
        Kind::Int => Value::from(*v.downcast_ref::<CelInt>().ok_or_else(unsupported)?.inner()),
        Kind::UInt => Value::from(*v.downcast_ref::<CelUInt>().ok_or_else(unsupported)?.inner()),
        Kind::Double => double(
            *v.downcast_ref::<CelDouble>()
                .ok_or_else(unsupported)?
                .inner(),
        ),
        Kind::String => Value::String(
            v.downcast_ref::<CelString>()
                .ok_or_else(unsupported)?
                .inner()
                .to_string(),
        ),
        Kind::Bytes => Value::String(
            base64::engine::general_purpose::STANDARD.encode(
                v.downcast_ref::<CelBytes>()
                    .ok_or_else(unsupported)?
                    .inner(),
            ),
        ),
        Kind::Duration => Value::String(duration(
            v.downcast_ref::<CelDuration>()
                .ok_or_else(unsupported)?
                .inner(),
        )),
        Kind::Timestamp => Value::String(timestamp(
            v.downcast_ref::<CelTimestamp>()
                .ok_or_else(unsupported)?
                .inner(),
        )),
        Kind::Type => Value::String(
            v.downcast_ref::<CelType>()
                .ok_or_else(unsupported)?
                .name()
                .to_string(),
        ),
        Kind::List => {
            let mut items = v.as_iterable().ok_or_else(unsupported)?.iter();
            let mut out = Vec::new();
            while let Some(x) = items.next() {
                out.push(convert(x, depth + 1)?);
            }
            Value::Array(out)
        }
        Kind::Map => {
            let mut keys = v.as_iterable().ok_or_else(unsupported)?.iter();
            let indexer = v.as_indexer().ok_or_else(unsupported)?;
            let mut out = serde_json::Map::new();
            while let Some(k) = keys.next() {
                let Some(key) = k.downcast_ref::<CelString>() else {
                    return Err(format!(
                        "cannot output a map with a key of type {}",
                        k.get_type().name()
                    ));
                };
                let value = indexer
                    .get(k)
                    .map_err(|e| super::scope::error_message(&e))?;
                out.insert(key.inner().to_string(), convert(value.as_ref(), depth + 1)?);
            }
            Value::Object(out)
        }
        _ => {
            if let Some(opt) = v.downcast_ref::<CelOptional>() {
                return match opt.option() {
                    Some(x) => convert(x, depth + 1),
                    None => Ok(Value::Null),
                };
            }
            match display(v) {
                Some(s) => Value::String(s),
                None => return Err(unsupported()),
            }
        }
    })
}

/// Our own types, as their string form.
fn display(v: &dyn Val) -> Option<String> {
    if let Some(h) = v.downcast_ref::<super::hierarchy::Hierarchy>() {
        return Some(h.to_string());
    }
    if let Some(ip) = v.downcast_ref::<super::network::IpVal>() {
        return Some(ip.to_string());
    }
    if let Some(c) = v.downcast_ref::<super::network::CidrVal>() {
        return Some(c.to_string());
    }
    if let Some(id) = v.downcast_ref::<super::spiffe::SpiffeId>() {
        return Some(id.to_string());
    }
    if let Some(td) = v.downcast_ref::<super::spiffe::TrustDomain>() {
        return Some(td.to_string());
    }
    None
}

/// A double as protojson prints it: whole values without a fraction; NaN and infinities as
/// the strings protojson uses.
fn double(d: f64) -> Value {
    if d.is_nan() {
        return Value::String("NaN".to_string());
    }
    if d.is_infinite() {
        let s = if d > 0.0 { "Infinity" } else { "-Infinity" };
        return Value::String(s.to_string());
    }
    // Below 2^53 a whole double is an exact integer.
    if d.fract() == 0.0 && d.abs() < 9_007_199_254_740_992.0 {
        return Value::from(d as i64);
    }
    Number::from_f64(d).map_or(Value::Null, Value::Number)
}

/// cel-go's duration string: the seconds, shortest decimal form, then `s`.
pub(super) fn duration(d: &chrono::Duration) -> String {
    let secs = d.num_seconds();
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        return format!("{secs}s");
    }
    let total = secs as f64 + f64::from(nanos) / 1e9;
    format!("{total}s")
}

/// RFC 3339 with nanoseconds trimmed of trailing zeros, and `Z` for UTC (Go's RFC3339Nano).
pub(super) fn timestamp(t: &chrono::DateTime<chrono::FixedOffset>) -> String {
    let nanos = t.timestamp_subsec_nanos() % 1_000_000_000;
    let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    if t.offset().local_minus_utc() == 0 {
        out.push('Z');
    } else {
        out.push_str(&t.format("%:z").to_string());
    }
    out
}
