//! Arbitrary bytes as one DRISL item.
//!
//! Checks: `Value::from_cbor` accepts only canonical bytes (re-encoding with `to_cbor` gives
//! the input back, byte for byte); `cbor_to_json` accepts and rejects exactly what
//! `from_cbor` does and equals `to_json`; the JSON form reads back (from the `serde_json`
//! value and from its text) to the same `Value`, unless a map uses the reserved `$link` or
//! `$bytes` keys (documented: the JSON form cannot carry those); `cbor::validate` accepts
//! exactly what `from_cbor` accepts (integers outside i64 included: both reject them).
#![no_main]

use atpdb_repo::cbor;
use atpdb_repo::value::{Value, cbor_to_json};
use libfuzzer_sys::fuzz_target;

/// Whether any map in the value has a key its JSON form would misread.
fn has_reserved_keys(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().any(has_reserved_keys),
        Value::Map(map) => {
            map.contains_key("$link")
                || map.contains_key("$bytes")
                || map.values().any(has_reserved_keys)
        }
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let value = Value::from_cbor(data);
    let json = cbor_to_json(data);
    let valid = cbor::validate(data);
    match (&value, &json) {
        (Ok(value), Ok(json)) => assert!(
            &value.to_json() == json,
            "cbor_to_json differs from to_json"
        ),
        (Err(a), Err(b)) => assert_eq!(a, b, "cbor_to_json fails differently"),
        _ => panic!(
            "cbor_to_json disagrees with from_cbor: {:?} vs {:?}",
            value.as_ref().err(),
            json.as_ref().err()
        ),
    }
    let value = match value {
        Ok(value) => value,
        Err(err) => {
            assert!(
                valid.is_err(),
                "cbor::validate accepts what from_cbor rejects: {err:?}"
            );
            return;
        }
    };
    if let Err(err) = valid {
        panic!("cbor::validate rejects what from_cbor accepts: {err:?}");
    }

    let encoded = value.to_cbor();
    assert!(encoded == data, "to_cbor is not the input: {encoded:02x?}");
    assert_eq!(value.cid(), atpdb_repo::Cid::dag_cbor(data));

    let json = value.to_json();
    if !has_reserved_keys(&value) {
        match Value::from_json(&json) {
            Ok(back) => assert!(back == value, "JSON round trip changed the value"),
            Err(err) => panic!("from_json rejects to_json's output: {err}"),
        }
        let text = serde_json::to_string(&json).expect("JSON serialises");
        let reparsed: serde_json::Value = serde_json::from_str(&text).expect("JSON parses");
        match Value::from_json(&reparsed) {
            Ok(back) => assert!(back == value, "JSON text round trip changed the value"),
            Err(err) => panic!("from_json rejects to_json's text: {err}"),
        }
    }
    let _ = value.validate_record();
});
