//! Every line of the shared `atproto-interop-tests/syntax` fixtures, through the identifier types.
//!
//! These files are the same across language implementations: each `*_valid.txt` line must
//! parse and each `*_invalid.txt` line must be rejected. Lines are used untrimmed, because
//! some invalid lines carry deliberate whitespace.

use std::fmt::Debug;
use std::str::FromStr;

use atpdb_repo::syntax::{
    AtIdentifier, AtUri, Datetime, Did, Handle, Language, Nsid, RecordKey, SyntaxError, Tid,
    validate_cid_syntax,
};

/// The lines of `syntax/<file>`, or `None` when the shared fixtures are absent.
fn fixture(test: &str, file: &str) -> Option<Vec<String>> {
    let path = atpdb_testkit::interop(test, &format!("syntax/{file}"))?;
    let lines = atpdb_testkit::fixture_lines(&path);
    assert!(!lines.is_empty(), "fixture {} has no cases", path.display());
    Some(lines)
}

/// Checks `<stem>_syntax_valid.txt` and `<stem>_syntax_invalid.txt` against `T`.
///
/// Valid lines must parse through both `FromStr` and `TryFrom<String>` to the same value,
/// whose text is `expected_text(line)` (the line itself unless the type normalizes).
fn check_fixtures<T>(test: &str, kind: &str, stem: &str, expected_text: impl Fn(&str) -> String)
where
    T: FromStr<Err = SyntaxError>
        + TryFrom<String, Error = SyntaxError>
        + AsRef<str>
        + PartialEq
        + Debug,
{
    let Some(valid) = fixture(test, &format!("{stem}_syntax_valid.txt")) else {
        return;
    };
    for line in &valid {
        let parsed = line.parse::<T>();
        assert!(parsed.is_ok(), "rejected valid {kind} {line:?}: {parsed:?}");
        let Ok(parsed) = parsed else { continue };
        assert_eq!(
            parsed.as_ref(),
            expected_text(line),
            "text of {kind} {line:?}"
        );
        assert_eq!(
            T::try_from(line.clone()).as_ref(),
            Ok(&parsed),
            "TryFrom<String> of {kind} {line:?}"
        );
    }

    let Some(invalid) = fixture(test, &format!("{stem}_syntax_invalid.txt")) else {
        return;
    };
    for line in &invalid {
        let parsed = line.parse::<T>();
        assert!(
            parsed.is_err(),
            "accepted invalid {kind} {line:?}: {parsed:?}"
        );
        assert!(
            T::try_from(line.clone()).is_err(),
            "TryFrom<String> accepted invalid {kind} {line:?}"
        );
    }
}

/// Checks that every line of a `*_parse_invalid.txt` file is rejected: these are well-formed
/// but meaningless (month zero, a repeated variant), and the types check meaning too.
fn check_parse_invalid<T: FromStr<Err = SyntaxError> + Debug>(test: &str, kind: &str, file: &str) {
    let Some(lines) = fixture(test, file) else {
        return;
    };
    for line in &lines {
        let parsed = line.parse::<T>();
        assert!(
            parsed.is_err(),
            "accepted semantically invalid {kind} {line:?}: {parsed:?}"
        );
    }
}

fn same(line: &str) -> String {
    line.to_owned()
}

#[test]
fn did() {
    check_fixtures::<Did>("did", "DID", "did", same);
}

#[test]
fn handle() {
    // Handles are lowercased on parse.
    check_fixtures::<Handle>("handle", "handle", "handle", str::to_ascii_lowercase);
}

#[test]
fn at_identifier() {
    check_fixtures::<AtIdentifier>("at_identifier", "AT identifier", "atidentifier", |line| {
        if line.starts_with("did:") {
            line.to_owned()
        } else {
            line.to_ascii_lowercase()
        }
    });
}

#[test]
fn nsid() {
    check_fixtures::<Nsid>("nsid", "NSID", "nsid", same);
}

#[test]
fn record_key() {
    check_fixtures::<RecordKey>("record_key", "record key", "recordkey", same);
}

#[test]
fn tid() {
    check_fixtures::<Tid>("tid", "TID", "tid", same);
}

#[test]
fn at_uri() {
    check_fixtures::<AtUri>("at_uri", "AT-URI", "aturi", same);
}

#[test]
fn datetime() {
    check_fixtures::<Datetime>("datetime", "datetime", "datetime", same);
    check_parse_invalid::<Datetime>("datetime", "datetime", "datetime_parse_invalid.txt");
}

#[test]
fn language() {
    check_fixtures::<Language>("language", "language tag", "language", same);
    check_parse_invalid::<Language>("language", "language tag", "language_parse_invalid.txt");
}

#[test]
fn cid() {
    let Some(valid) = fixture("cid", "cid_syntax_valid.txt") else {
        return;
    };
    for line in &valid {
        let result = validate_cid_syntax(line);
        assert!(result.is_ok(), "rejected valid CID {line:?}: {result:?}");
    }
    let Some(invalid) = fixture("cid", "cid_syntax_invalid.txt") else {
        return;
    };
    for line in &invalid {
        assert!(
            validate_cid_syntax(line).is_err(),
            "accepted invalid CID {line:?}"
        );
    }
}
