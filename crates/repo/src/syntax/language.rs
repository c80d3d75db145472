//! Language tags (BCP 47), as records carry them in `langs` fields.

use super::{IdentifierKind, SyntaxError, is_alphanumeric};

/// Longest tag accepted, in bytes.
///
/// RFC 5646 sets no maximum, but the duplicate-variant check compares variants pairwise,
/// and real tags are a few dozen bytes; the cap keeps hostile input cheap.
const MAX_LANGUAGE_LEN: usize = 256;

/// Tags registered before RFC 4646 that the grammar cannot produce (or parses differently),
/// spelled as in the IANA registry.
const GRANDFATHERED: [&str; 26] = [
    "en-GB-oed",
    "i-ami",
    "i-bnn",
    "i-default",
    "i-enochian",
    "i-hak",
    "i-klingon",
    "i-lux",
    "i-mingo",
    "i-navajo",
    "i-pwn",
    "i-tao",
    "i-tay",
    "i-tsu",
    "sgn-BE-FR",
    "sgn-BE-NL",
    "sgn-CH-DE",
    "art-lojban",
    "cel-gaulish",
    "no-bok",
    "no-nyn",
    "zh-guoyu",
    "zh-hakka",
    "zh-min",
    "zh-min-nan",
    "zh-xiang",
];

/// A BCP 47 language tag such as `pt-BR` or `zh-Hant`.
///
/// Tags follow the RFC 5646 grammar (language, extlangs, script, region, variants,
/// extensions, private use, grandfathered tags) with the stricter choices of the atproto
/// reference parser that the interop fixtures encode: the primary language subtag must be
/// lowercase and two, three or five to eight letters (`JA` and `jaja` are rejected), and a
/// repeated variant or extension singleton (compared without case) is rejected, so the
/// fixtures' `language_parse_invalid` lines fail too. Subtags are not checked against the
/// IANA registry, and the text is kept as given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Language(String);

string_identifier!(Language, 0);

impl Language {
    fn parse_str(input: &str) -> Result<Self, SyntaxError> {
        validate(input)?;
        Ok(Language(input.to_owned()))
    }

    fn parse_string(input: String) -> Result<Self, SyntaxError> {
        validate(&input)?;
        Ok(Language(input))
    }
}

fn validate(input: &str) -> Result<(), SyntaxError> {
    check_language(input)
        .map_err(|rule| SyntaxError::invalid(IdentifierKind::Language, input, rule))
}

/// Where in the tag the parser is; subtags must come in this order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Position {
    Language,
    Extlang,
    Script,
    Region,
    Variant,
    Extension,
}

pub(crate) fn check_language(input: &str) -> Result<(), &'static str> {
    if input.is_empty() {
        return Err("is empty");
    }
    if input.len() > MAX_LANGUAGE_LEN {
        return Err("longer than 256 bytes");
    }
    if GRANDFATHERED.contains(&input) {
        return Ok(());
    }

    let mut subtags = input.split('-');
    let primary = subtags.next().unwrap_or_default().as_bytes();
    if primary.eq_ignore_ascii_case(b"x") {
        return check_private_use(subtags);
    }
    if primary == b"i" {
        return Err("'i-' tags must be registered grandfathered tags");
    }
    if !primary.iter().all(u8::is_ascii_lowercase) {
        return Err("primary language subtag must be lowercase ASCII letters");
    }
    let short_primary = match primary.len() {
        2 | 3 => true,
        5..=8 => false,
        _ => return Err("primary language subtag must have 2, 3 or 5 to 8 letters"),
    };

    let mut position = Position::Language;
    let mut n_extlangs = 0;
    // Byte offset where the run of variants starts, for the duplicate check.
    let mut variants_start = None;
    let mut singletons_seen = 0u64;
    let mut extension_has_subtag = true;
    let mut offset = primary.len() + 1;

    while let Some(subtag) = subtags.next() {
        let start = offset;
        offset += subtag.len() + 1;
        let bytes = subtag.as_bytes();
        if bytes.is_empty() {
            return Err("has an empty subtag");
        }
        if !is_alphanumeric(bytes) {
            return Err("subtags allow only ASCII letters and digits");
        }
        let all_alpha = bytes.iter().all(u8::is_ascii_alphabetic);
        let all_digit = bytes.iter().all(u8::is_ascii_digit);
        match bytes.len() {
            1 => {
                if !extension_has_subtag {
                    return Err("extension singleton needs at least one subtag");
                }
                if bytes.eq_ignore_ascii_case(b"x") {
                    return check_private_use(subtags);
                }
                let bit = bytes.first().map_or(0, |&b| singleton_bit(b));
                if singletons_seen & bit != 0 {
                    return Err("repeats an extension singleton");
                }
                singletons_seen |= bit;
                extension_has_subtag = false;
                position = Position::Extension;
            }
            2..=8 if position == Position::Extension => extension_has_subtag = true,
            3 if all_alpha && short_primary && position <= Position::Extlang && n_extlangs < 3 => {
                n_extlangs += 1;
                position = Position::Extlang;
            }
            4 if all_alpha && position < Position::Script => position = Position::Script,
            2 if all_alpha && position < Position::Region => position = Position::Region,
            3 if all_digit && position < Position::Region => position = Position::Region,
            4..=8
                if position <= Position::Variant
                    && (bytes.len() > 4 || bytes.first().is_some_and(u8::is_ascii_digit)) =>
            {
                let start_of_run = *variants_start.get_or_insert(start);
                let earlier = input.get(start_of_run..start).unwrap_or_default();
                if earlier
                    .split('-')
                    .any(|variant| variant.eq_ignore_ascii_case(subtag))
                {
                    return Err("repeats a variant subtag");
                }
                position = Position::Variant;
            }
            _ => return Err("has a subtag of the wrong length or out of order"),
        }
    }
    if !extension_has_subtag {
        return Err("extension singleton needs at least one subtag");
    }
    Ok(())
}

/// A bit per possible singleton (`0-9`, `a-z` without case), for the repeat check.
fn singleton_bit(b: u8) -> u64 {
    let index = match b.to_ascii_lowercase() {
        digit @ b'0'..=b'9' => digit - b'0',
        letter => letter.wrapping_sub(b'a').wrapping_add(10),
    };
    1u64 << (index & 63)
}

/// The subtags after an `x` singleton: at least one, each 1–8 letters or digits.
fn check_private_use<'a>(subtags: impl Iterator<Item = &'a str>) -> Result<(), &'static str> {
    let mut n_subtags = 0;
    for subtag in subtags {
        if subtag.is_empty() || subtag.len() > 8 || !is_alphanumeric(subtag.as_bytes()) {
            return Err("private-use subtags must be 1 to 8 ASCII letters or digits");
        }
        n_subtags += 1;
    }
    if n_subtags == 0 {
        return Err("private use 'x' needs at least one subtag");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed() {
        for tag in [
            "de",
            "de-CH",
            "de-DE-1901",
            "mn-Cyrl-MN",
            "x-fr-CH",
            "zh-yue-HK",
            "en-a-bbb-x-a-ccc",
        ] {
            assert!(tag.parse::<Language>().is_ok(), "{tag}");
        }
    }

    #[test]
    fn malformed() {
        for tag in [
            "",
            "x",
            "de-CH-",
            "i-bad-grandfathered",
            "en-US-Latn",
            "en-a",
            "en-a-b",
            "en--US",
            "en-x",
        ] {
            assert!(tag.parse::<Language>().is_err(), "{tag}");
        }
    }
}
