//! The loose string check for CIDs in places that only need their shape (Lexicon `cid` fields).

use super::{IdentifierKind, SyntaxError};

/// Shortest CID string accepted.
const MIN_CID_LEN: usize = 8;
/// Longest CID string accepted.
const MAX_CID_LEN: usize = 256;

/// Checks that `input` looks like a CIDv1 string in some multibase: 8 to 256 characters of
/// `A-Za-z0-9+=`, and not a CIDv0 (`Qm...`).
///
/// This is deliberately loose, matching the interop fixtures, which accept base58, base64,
/// base8 and base16 CIDs: a `cid` field in a record need not be something atpdb can hash. A
/// CID that atpdb follows or verifies must be parsed as a [`crate::Cid`], which decodes it.
///
/// # Errors
///
/// [`SyntaxError::Invalid`] naming the rule the string breaks.
pub fn validate_cid_syntax(input: &str) -> Result<(), SyntaxError> {
    check_cid_syntax(input.as_bytes())
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::Cid, input, rule))
}

fn check_cid_syntax(bytes: &[u8]) -> Result<(), &'static str> {
    if bytes.len() < MIN_CID_LEN {
        return Err("shorter than 8 characters");
    }
    if bytes.len() > MAX_CID_LEN {
        return Err("longer than 256 characters");
    }
    if !bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'=')
    {
        return Err("allows only ASCII letters, digits, '+' and '='");
    }
    if bytes.starts_with(b"Qm") {
        return Err("CIDv0 (Qm...) is not allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_cids_atpdb_writes_and_rejects_v0() {
        let cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
        assert_eq!(validate_cid_syntax(cid), Ok(()));
        let v0 = "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR";
        assert_eq!(
            validate_cid_syntax(v0).map_err(|err| err.rule()),
            Err("CIDv0 (Qm...) is not allowed")
        );
    }
}
