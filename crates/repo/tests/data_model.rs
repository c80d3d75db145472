//! The atproto data model against the interop fixtures, plus the DRISL edge cases they miss.

use std::error::Error;
use std::path::Path;

use atpdb_repo::cbor::{self, DecodeError, Encoder};
use atpdb_repo::value::{self, Map, Value, ValueError};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde_json::json;

type TestResult = Result<(), Box<dyn Error>>;

fn read_cases(path: &Path) -> Result<Vec<serde_json::Value>, Box<dyn Error>> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("reading fixture {}: {err}", path.display()))?;
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    assert!(!cases.is_empty(), "no cases in {}", path.display());
    Ok(cases)
}

fn note(case: &serde_json::Value) -> &str {
    case.get("note")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("(no note)")
}

#[test]
fn fixtures_round_trip() -> TestResult {
    let Some(path) =
        atpdb_testkit::interop("fixtures_round_trip", "data-model/data-model-fixtures.json")
    else {
        return Ok(());
    };
    for (index, case) in read_cases(&path)?.iter().enumerate() {
        let json = &case["json"];
        let cbor_base64 = case["cbor_base64"]
            .as_str()
            .ok_or(format!("case {index}: no cbor_base64"))?;
        let expected_cid = case["cid"]
            .as_str()
            .ok_or(format!("case {index}: no cid"))?;
        let expected_cbor = STANDARD_NO_PAD.decode(cbor_base64)?;

        let from_json = Value::from_json(json)?;
        assert_eq!(
            from_json.to_cbor(),
            expected_cbor,
            "case {index}: JSON -> CBOR"
        );
        assert_eq!(
            from_json.cid().to_string(),
            expected_cid,
            "case {index}: CID"
        );

        let from_cbor = Value::from_cbor(&expected_cbor)?;
        assert_eq!(from_cbor, from_json, "case {index}: CBOR and JSON values");
        assert_eq!(&from_cbor.to_json(), json, "case {index}: CBOR -> JSON");
        assert_eq!(
            &value::cbor_to_json(&expected_cbor)?,
            json,
            "case {index}: direct CBOR -> JSON"
        );
        assert_eq!(
            from_cbor.to_cbor(),
            expected_cbor,
            "case {index}: CBOR -> CBOR"
        );
        from_cbor.validate_record()?;
    }
    Ok(())
}

#[test]
fn valid_fixtures_pass() -> TestResult {
    let Some(path) =
        atpdb_testkit::interop("valid_fixtures_pass", "data-model/data-model-valid.json")
    else {
        return Ok(());
    };
    for case in read_cases(&path)? {
        let result = value::validate_record_json(&case["json"]);
        assert!(
            result.is_ok(),
            "rejected valid case {:?}: {result:?}",
            note(&case)
        );
    }
    Ok(())
}

#[test]
fn invalid_fixtures_fail() -> TestResult {
    let Some(path) = atpdb_testkit::interop(
        "invalid_fixtures_fail",
        "data-model/data-model-invalid.json",
    ) else {
        return Ok(());
    };
    for case in read_cases(&path)? {
        let note = note(&case);
        match value::validate_record_json(&case["json"]) {
            Ok(()) => panic!("accepted invalid case {note:?}"),
            Err(error) => assert!(
                rejected_for_the_noted_reason(note, &error),
                "case {note:?} rejected for another reason: {error}"
            ),
        }
    }
    Ok(())
}

/// Whether `error` is the rejection the fixture's note describes; notes this test does not
/// know only need some rejection.
fn rejected_for_the_noted_reason(note: &str, error: &ValueError) -> bool {
    match note {
        "top-level not an object" => matches!(error, ValueError::NotObject { .. }),
        "float" => matches!(error, ValueError::Float { .. }),
        "link with bogus CID" => matches!(error, ValueError::LinkCid { .. }),
        _ if note.starts_with("record with") => matches!(error, ValueError::TypeField { .. }),
        _ if note.starts_with("blob") => matches!(error, ValueError::Blob { .. }),
        _ if note.starts_with("bytes") => matches!(error, ValueError::BytesShape { .. }),
        _ if note.starts_with("link") => matches!(error, ValueError::LinkShape { .. }),
        _ => true,
    }
}

#[test]
fn integer_like_float_reads_as_integer() -> TestResult {
    assert_eq!(Value::from_json(&json!(123.0))?, Value::Integer(123));
    assert_eq!(Value::from_json(&json!(-4.0))?, Value::Integer(-4));
    let float = Value::from_json(&json!({"a": [1, 123.456]}));
    assert_eq!(
        float,
        Err(ValueError::Float {
            path: "/a/1".to_owned(),
            found: "123.456".to_owned()
        })
    );
    let message = float.err().map(|err| err.to_string()).unwrap_or_default();
    assert_eq!(
        message,
        "at /a/1: float 123.456 is not allowed (the data model has only integers)"
    );
    let too_big = Value::from_json(&json!(1e300));
    assert!(
        matches!(too_big, Err(ValueError::IntegerRange { .. })),
        "{too_big:?}"
    );
    let too_big = Value::from_json(&json!(u64::MAX));
    assert!(
        matches!(too_big, Err(ValueError::IntegerRange { .. })),
        "{too_big:?}"
    );
    Ok(())
}

#[test]
fn integer_boundaries_round_trip() -> TestResult {
    let boundaries = [
        0,
        1,
        -1,
        23,
        24,
        -24,
        -25,
        255,
        256,
        -256,
        -257,
        65_535,
        65_536,
        -65_536,
        -65_537,
        4_294_967_295,
        4_294_967_296,
        -4_294_967_296,
        -4_294_967_297,
        (1 << 53) - 1,
        -((1 << 53) - 1),
        i64::MAX,
        i64::MIN,
    ];
    for number in boundaries {
        let value = Value::Integer(number);
        let bytes = value.to_cbor();
        assert_eq!(
            Value::from_cbor(&bytes)?,
            value,
            "CBOR round trip of {number}"
        );
        assert_eq!(value.to_json(), json!(number), "JSON form of {number}");
        assert_eq!(
            Value::from_json(&value.to_json())?,
            value,
            "JSON round trip of {number}"
        );
    }
    // 2^63 as an unsigned head, and -2^63 - 1 as a negative head, do not fit in i64.
    for bytes in [
        [0x1b, 0x80, 0, 0, 0, 0, 0, 0, 0],
        [0x3b, 0x80, 0, 0, 0, 0, 0, 0, 0],
    ] {
        let result = Value::from_cbor(&bytes);
        assert_eq!(
            result,
            Err(ValueError::Decode(DecodeError::IntRange { offset: 0 })),
            "{bytes:02x?}"
        );
    }
    Ok(())
}

/// `n` arrays nested in one another around a zero.
fn nested_arrays(n: usize) -> Vec<u8> {
    let mut bytes = vec![0x81; n];
    bytes.push(0x00);
    bytes
}

#[test]
fn depth_33_is_rejected() -> TestResult {
    Value::from_cbor(&nested_arrays(32))?;
    value::cbor_to_json(&nested_arrays(32))?;
    for result in [
        Value::from_cbor(&nested_arrays(33)).map(|_| ()),
        value::cbor_to_json(&nested_arrays(33)).map(|_| ()),
    ] {
        assert!(
            matches!(
                result,
                Err(ValueError::Decode(DecodeError::Limit {
                    what: "nesting depth",
                    ..
                }))
            ),
            "{result:?}"
        );
    }

    let mut json = json!(0);
    for _ in 0..32 {
        json = json!([json]);
    }
    Value::from_json(&json)?;
    let result = Value::from_json(&json!([json]));
    assert!(
        matches!(
            result,
            Err(ValueError::Limit {
                what: "nesting depth",
                found: 33,
                ..
            })
        ),
        "{result:?}"
    );
    Ok(())
}

#[test]
fn non_canonical_key_order_is_rejected() -> TestResult {
    // Bytewise order, which is not DRISL's length-first order.
    for keys in [["b", "a"], ["aa", "b"]] {
        let mut encoder = Encoder::new();
        encoder.map(2);
        for key in keys {
            encoder.text(key);
            encoder.u64(1);
        }
        let result = Value::from_cbor(encoder.as_bytes());
        assert!(
            matches!(
                result,
                Err(ValueError::Decode(DecodeError::KeyOrder { .. }))
            ),
            "keys {keys:?}: {result:?}"
        );
    }
    Ok(())
}

#[test]
fn duplicate_keys_are_rejected() -> TestResult {
    let mut encoder = Encoder::new();
    encoder.map(2);
    encoder.text("a");
    encoder.u64(1);
    encoder.text("a");
    encoder.u64(2);
    let result = Value::from_cbor(encoder.as_bytes());
    assert!(
        matches!(
            result,
            Err(ValueError::Decode(DecodeError::KeyOrder { .. }))
        ),
        "{result:?}"
    );
    Ok(())
}

#[test]
fn encoding_sorts_keys_length_first() -> TestResult {
    let map: Map = [("bb", 1), ("a", 2), ("c", 3), ("aaa", 4)]
        .into_iter()
        .map(|(key, number)| (key.to_owned(), Value::Integer(number)))
        .collect();
    let bytes = Value::Map(map.clone()).to_cbor();
    let mut expected = Encoder::new();
    expected.map(4);
    for (key, number) in [("a", 2), ("c", 3), ("bb", 1), ("aaa", 4)] {
        expected.text(key);
        expected.i64(number);
    }
    assert_eq!(bytes, expected.into_bytes());
    cbor::validate(&bytes)?;
    assert_eq!(Value::from_cbor(&bytes)?, Value::Map(map));
    Ok(())
}

#[test]
fn floats_are_rejected() {
    for bytes in [
        &[0xf9, 0x3c, 0x00][..],
        &[0xfa, 0x3f, 0x80, 0x00, 0x00],
        &[0xfb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0],
        &[0x81, 0xfb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0],
    ] {
        let result = Value::from_cbor(bytes);
        assert!(
            matches!(result, Err(ValueError::Decode(DecodeError::Float { .. }))),
            "{bytes:02x?}: {result:?}"
        );
    }
}

#[test]
fn other_simple_values_and_tags_are_rejected() {
    // undefined, simple(32), tag 1 (epoch time).
    for bytes in [&[0xf7][..], &[0xf8, 0x20], &[0xc1, 0x00]] {
        let result = Value::from_cbor(bytes);
        assert!(
            matches!(
                result,
                Err(ValueError::Decode(
                    DecodeError::Simple { .. } | DecodeError::Tag { .. }
                ))
            ),
            "{bytes:02x?}: {result:?}"
        );
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let result = Value::from_cbor(&[0x01, 0x02]);
    assert_eq!(
        result,
        Err(ValueError::Decode(DecodeError::Trailing {
            count: 1,
            offset: 1
        }))
    );
    let empty = Value::from_cbor(&[]);
    assert!(
        matches!(
            empty,
            Err(ValueError::Decode(DecodeError::Truncated { .. }))
        ),
        "{empty:?}"
    );
}

#[test]
fn huge_declared_lengths_fail_cleanly() {
    let cases: [&[u8]; 5] = [
        // A byte string of 2^63 bytes.
        &[0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0],
        // A text string of 4 GiB.
        &[0x7a, 0xff, 0xff, 0xff, 0xff, 0x61],
        // An array of 131,072 items (at the limit) with one present.
        &[0x9a, 0x00, 0x02, 0x00, 0x00, 0x00],
        // A map of 100,000 entries with none present.
        &[0xba, 0x00, 0x01, 0x86, 0xa0],
        // An array of 2^32 - 1 items, beyond the container limit.
        &[0x9a, 0xff, 0xff, 0xff, 0xff, 0x00],
    ];
    for bytes in cases {
        let result = Value::from_cbor(bytes);
        assert!(
            matches!(
                result,
                Err(ValueError::Decode(
                    DecodeError::Truncated { .. } | DecodeError::Limit { .. }
                ))
            ),
            "{bytes:02x?}: {result:?}"
        );
        assert!(value::cbor_to_json(bytes).is_err(), "{bytes:02x?}");
    }
}

#[test]
fn nested_huge_arrays_stay_small() -> TestResult {
    // 32 nested arrays that each declare 131,072 items, padded so the count is within the
    // input: reserving every declared count would take hundreds of megabytes.
    let mut bytes = Vec::new();
    for _ in 0..32 {
        bytes.extend_from_slice(&[0x9a, 0x00, 0x02, 0x00, 0x00]);
    }
    bytes.resize(bytes.len() + 131_072, 0xf6);
    let result = Value::from_cbor(&bytes);
    assert!(result.is_err(), "an incomplete array was accepted");
    Ok(())
}

#[test]
fn bytes_accept_padding_and_emit_none() -> TestResult {
    let data = b"hello world";
    let padded = STANDARD.encode(data);
    assert!(padded.ends_with('='));
    for text in [padded.as_str(), padded.trim_end_matches('=')] {
        let value = Value::from_json(&json!({ "$bytes": text }))?;
        assert_eq!(value, Value::Bytes(data.to_vec()), "{text:?}");
        assert_eq!(
            value.to_json(),
            json!({ "$bytes": padded.trim_end_matches('=') })
        );
    }
    let bad = Value::from_json(&json!({ "x": { "$bytes": "a!b" } }));
    assert!(
        matches!(&bad, Err(ValueError::BytesBase64 { path, .. }) if path == "/x"),
        "{bad:?}"
    );
    Ok(())
}

#[test]
fn links_read_and_write() -> TestResult {
    let cid = atpdb_repo::Cid::dag_cbor(b"record");
    let json = json!({ "$link": cid.to_string() });
    let value = Value::from_json(&json)?;
    assert_eq!(value, Value::Link(cid));
    assert_eq!(value.to_json(), json);
    assert_eq!(Value::from_cbor(&value.to_cbor())?, value);
    Ok(())
}

#[test]
fn record_shape_errors_name_the_field() -> TestResult {
    let cid = atpdb_repo::Cid::raw(b"blob").to_string();
    let cases = [
        (
            json!({"embed": {"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/png", "size": -1}}),
            "at /embed: blob field \"size\" must be a non-negative integer",
        ),
        (
            json!({"embed": {"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/png", "size": 1, "alt": ""}}),
            "at /embed: blob field \"alt\" is not allowed (a blob has only $type, ref, mimeType and size)",
        ),
        (
            json!({"items": [{"$type": ""}]}),
            "at /items/0: $type must be a non-empty string, found an empty string",
        ),
        (
            json!({"$type": null}),
            "at the top level: $type must be a non-empty string, found null",
        ),
        (json!([1]), "top-level value is array, not an object"),
        (
            json!({"img": {"cid": 5, "mimeType": "image/png"}}),
            "at /img: blob field \"cid\" must be a string (legacy blob)",
        ),
    ];
    for (json, expected) in cases {
        let result = value::validate_record_json(&json);
        let message = result.err().map(|err| err.to_string());
        assert_eq!(message.as_deref(), Some(expected), "{json}");
    }
    // A legacy blob with string fields is fine.
    value::validate_record_json(&json!({"img": {"cid": cid, "mimeType": "image/png"}}))?;
    Ok(())
}

#[test]
fn decoded_maps_may_not_use_json_form_keys() -> TestResult {
    let mut encoder = Encoder::new();
    encoder.map(1);
    encoder.text("$link");
    encoder.text("bafy");
    let value = Value::from_cbor(encoder.as_bytes())?;
    let result = value.validate_record();
    assert!(
        matches!(result, Err(ValueError::ReservedKey { key: "$link", .. })),
        "{result:?}"
    );
    Ok(())
}

#[test]
fn errors_convert_to_the_crate_error() {
    let error: atpdb_repo::Error = ValueError::NotObject { found: "string" }.into();
    assert!(
        matches!(
            error,
            atpdb_repo::Error::Value(ValueError::NotObject { .. })
        ),
        "{error:?}"
    );
}

#[test]
fn long_keys_are_rejected() -> TestResult {
    let long_key = "k".repeat(8193);
    let mut object = serde_json::Map::new();
    object.insert(long_key.clone(), json!(1));
    let result = Value::from_json(&json!({ "a": object }));
    assert_eq!(
        result,
        Err(ValueError::Limit {
            path: "/a".to_owned(),
            what: "map key length",
            limit: 8192,
            found: 8193
        })
    );

    let mut encoder = Encoder::new();
    encoder.map(1);
    encoder.text(&long_key);
    encoder.u64(1);
    let result = Value::from_cbor(encoder.as_bytes());
    assert!(
        matches!(
            result,
            Err(ValueError::Decode(DecodeError::Limit {
                what: "map key length",
                ..
            }))
        ),
        "{result:?}"
    );
    Value::from_json(&json!({ "k".repeat(8192): 1 }))?;
    Ok(())
}
