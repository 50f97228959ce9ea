//! Fields of `haven ctl --json` objects.

use serde_json::Value;

/// A numeric field; fails the test naming the field if absent.
pub fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} missing in {v}"))
}

/// A numeric field, 0 if absent (for figures, not checks).
pub fn u64_field(m: &Value, f: &str) -> u64 {
    m[f].as_u64().unwrap_or(0)
}

/// A string field, `?` if absent (for figures, not checks).
pub fn str_field<'a>(m: &'a Value, f: &str) -> &'a str {
    m[f].as_str().unwrap_or("?")
}
