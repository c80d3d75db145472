//! The two multiformats encodings atproto's binary formats share, written once: unsigned
//! varints (CID fields, CAR lengths, multicodec prefixes) and lowercase base32 (the multibase
//! `b` form of CIDs, did:plc identifiers).

/// Longest unsigned varint accepted: the multiformats spec caps them at 9 bytes (63 bits).
pub const MAX_VARINT_BYTES: usize = 9;

/// Why bytes are not an unsigned varint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VarintError {
    /// More than [`MAX_VARINT_BYTES`] bytes.
    #[error("varint longer than {MAX_VARINT_BYTES} bytes")]
    TooLong,
    /// A trailing zero byte: the same number has a shorter encoding.
    #[error("varint is not minimally encoded")]
    NonMinimal,
}

/// Reads an unsigned varint from the front of `bytes`: the value and the bytes it used, or
/// `Ok(None)` when `bytes` ends inside it (a stream needs more input).
///
/// # Errors
///
/// [`VarintError`] for an over-long or non-minimal encoding.
pub fn read_uvarint(bytes: &[u8]) -> Result<Option<(u64, usize)>, VarintError> {
    let mut value: u64 = 0;
    for (index, &byte) in bytes.iter().take(MAX_VARINT_BYTES).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            if byte == 0 && index > 0 {
                return Err(VarintError::NonMinimal);
            }
            return Ok(Some((value, index + 1)));
        }
    }
    if bytes.len() >= MAX_VARINT_BYTES {
        Err(VarintError::TooLong)
    } else {
        Ok(None)
    }
}

/// Appends `value` as an unsigned varint.
pub fn write_uvarint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The encoded length of `value`.
pub fn uvarint_len(value: u64) -> usize {
    let bits = 64 - value.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// RFC 4648 base32, lowercase, no padding: the multibase `b` alphabet.
pub fn base32_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(BASE32[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(BASE32[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Decodes [`base32_encode`]'s form; `None` for any other character, or leftover bits that
/// are not zero padding (which would give one value two spellings).
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for byte in text.bytes() {
        let value = match byte {
            b'a'..=b'z' => byte - b'a',
            b'2'..=b'7' => byte - b'2' + 26,
            _ => return None,
        };
        buffer = (buffer << 5) | u32::from(value);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    if bits >= 5 || buffer & ((1 << bits) - 1) != 0 {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        assert_eq!(read_uvarint(&[0xe7, 0x01]), Ok(Some((0xe7, 2))));
        assert_eq!(read_uvarint(&[0x80, 0x24]), Ok(Some((0x1200, 2))));
        assert_eq!(read_uvarint(&[0xed, 0x01, 0xff]), Ok(Some((0xed, 2))));
        assert_eq!(read_uvarint(&[0x80, 0x80]), Ok(None));
        assert_eq!(read_uvarint(&[]), Ok(None));
        assert_eq!(read_uvarint(&[0x81, 0x00]), Err(VarintError::NonMinimal));
        assert_eq!(read_uvarint(&[0xff; 9]), Err(VarintError::TooLong));
        for value in [0, 1, 127, 128, 300, 1 << 40, (1 << 63) - 1] {
            let mut bytes = Vec::new();
            write_uvarint(value, &mut bytes);
            assert_eq!(bytes.len(), uvarint_len(value));
            assert_eq!(read_uvarint(&bytes), Ok(Some((value, bytes.len()))));
        }
    }

    #[test]
    fn base32_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ] {
            assert_eq!(base32_encode(input.as_bytes()), expected);
            assert_eq!(base32_decode(expected).as_deref(), Some(input.as_bytes()));
        }
        assert_eq!(base32_decode("aa"), Some(vec![0]));
        assert!(base32_decode("ab").is_none());
        assert!(base32_decode("A").is_none());
    }
}
