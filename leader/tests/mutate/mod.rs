//! Where to break a JSON document, for the property tests: every path into
//! it, and a value put at one. Shared by `tests/properties.rs` and the
//! injector's review properties (`src/inject/tests.rs`).

use serde_json::{json, Value};

/// Every path into `value` below `at`: objects' keys and arrays' indices.
pub(crate) fn paths(value: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                at.push(json!(key));
                paths(child, at, out);
                at.pop();
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                at.push(json!(index));
                paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

/// Puts `with` at `path` in `value`.
pub(crate) fn replace(value: &mut Value, path: &[Value], with: Value) {
    let mut here = value;
    for step in path {
        here = match step {
            Value::String(key) => &mut here[key.as_str()],
            Value::Number(index) => &mut here[index.as_u64().unwrap_or_default() as usize],
            _ => return,
        };
    }
    *here = with;
}
