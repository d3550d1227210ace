//! FHIR JSON has no empty elements: an array, object or string with nothing in it (and `null`)
//! is invalid and must be left out. The provider's own renderings never build one; JSON a
//! consumer sent and the provider keeps (registered demographics, the booking organisation) is
//! pruned with [`prune_empty`] before it is checked and stored, so it cannot echo one back.

use serde_json::Value;

/// `value` without empty arrays, objects, strings or nulls at any depth; `None` when nothing
/// is left. Pruning is bottom-up, so `{"line": [""]}` disappears entirely.
pub fn prune_empty(value: Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::String(text) if text.is_empty() => None,
        Value::Array(items) => {
            let items: Vec<Value> = items.into_iter().filter_map(prune_empty).collect();
            (!items.is_empty()).then_some(Value::Array(items))
        }
        Value::Object(object) => {
            let object: serde_json::Map<String, Value> = object
                .into_iter()
                .filter_map(|(key, value)| prune_empty(value).map(|value| (key, value)))
                .collect();
            (!object.is_empty()).then_some(Value::Object(object))
        }
        other => Some(other),
    }
}

/// The JSON paths (`/a/0/b`) of every empty array, object or string and every `null` in
/// `value`: empty when it is valid FHIR JSON in this respect. The tests run it on every body.
#[cfg(test)]
pub fn empty_elements(value: &Value) -> Vec<String> {
    fn walk(value: &Value, path: &mut String, found: &mut Vec<String>) {
        let empty = match value {
            Value::Null => true,
            Value::String(text) => text.is_empty(),
            Value::Array(items) => items.is_empty(),
            Value::Object(object) => object.is_empty(),
            Value::Bool(_) | Value::Number(_) => false,
        };
        if empty {
            found.push(if path.is_empty() {
                "/".into()
            } else {
                path.clone()
            });
            return;
        }
        let children: Vec<(String, &Value)> = match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            Value::Object(object) => object.iter().map(|(k, v)| (k.clone(), v)).collect(),
            _ => Vec::new(),
        };
        for (key, child) in children {
            let len = path.len();
            path.push('/');
            path.push_str(&key);
            walk(child, path, found);
            path.truncate(len);
        }
    }
    let mut found = Vec::new();
    walk(value, &mut String::new(), &mut found);
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_elements_are_pruned_bottom_up() {
        let sent = json!({
            "resourceType": "Patient",
            "telecom": [],
            "address": [{ "line": [""], "city": "" }],
            "name": [{ "family": "Dawes", "given": ["", "Minnie"], "prefix": [] }],
            "extension": [{}],
            "photo": null,
            "active": false,
            "multipleBirthInteger": 0,
        });
        let pruned = prune_empty(sent).expect("something is left");
        assert_eq!(
            pruned,
            json!({
                "resourceType": "Patient",
                "name": [{ "family": "Dawes", "given": ["Minnie"] }],
                "active": false,
                "multipleBirthInteger": 0,
            })
        );
        assert!(empty_elements(&pruned).is_empty());
        assert_eq!(prune_empty(json!({ "a": [[], {}, ""] })), None);
    }

    #[test]
    fn empty_elements_are_found_with_their_paths() {
        let body = json!({ "a": [], "b": { "c": "", "d": [1, {}] }, "e": null, "f": "x" });
        assert_eq!(empty_elements(&body), ["/a", "/b/c", "/b/d/1", "/e"]);
        assert_eq!(empty_elements(&json!({})), ["/"]);
        assert!(empty_elements(&json!({ "ok": [true, 0, "x"] })).is_empty());
    }
}
