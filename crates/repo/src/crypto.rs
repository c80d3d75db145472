//! Signing keys: k256 and p256, did:key / Multikey encodings, compact low-S signatures.
//!
//! atproto signs the SHA-256 of DRISL bytes with ECDSA on k256 (secp256k1) or p256
//! (secp256r1); nothing in a signature says which curve made it, so the caller brings the
//! [`PublicKey`] from the DID document. Only the 64-byte compact `r‖s` form with a low `s`
//! (`s ≤ n/2`) is accepted, as the reference implementations do, so that a commit has exactly
//! one valid signature and its CID cannot be changed by re-encoding the signature.
//!
//! Parsing happens once, in the constructors; [`PublicKey::verify_digest`] then does one
//! length check, one scalar comparison and the curve arithmetic, without allocating.
//!
//! Backends: libsecp256k1 (the `secp256k1` crate) for k256; for p256, aws-lc-rs verifies and
//! RustCrypto `p256` parses points and signs. Callers see neither: both stay behind this API.
//!
//! The one `static` here is the libsecp256k1 context: created once on first use, never
//! changed, and shared because creating one per call would cost more than a verify.

use std::fmt;
use std::sync::OnceLock;

use p256::ecdsa::signature::hazmat::PrehashSigner;
use sha2::{Digest, Sha256};

/// Why a key or signature is malformed, or a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The string does not start with `did:key:`.
    #[error("{input:?} is not a did:key: expected the prefix \"did:key:\"")]
    NotDidKey {
        /// The input, shortened when long.
        input: String,
    },
    /// The key is not base58btc multibase (`z` followed by base58 characters).
    #[error("key {key:?}: not base58btc multibase: {reason}")]
    BadMultibase {
        /// The key as given, shortened when long.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The decoded key does not start with a multicodec varint.
    #[error("key {key:?}: no multicodec prefix before the key bytes")]
    MissingMulticodec {
        /// The key as given, shortened when long.
        key: String,
    },
    /// The multicodec names a key type atproto does not use (ed25519, RSA, ...).
    #[error(
        "key {key:?}: unsupported multicodec {code:#x}, expected secp256k1-pub (0xe7) or p256-pub (0x1200)"
    )]
    UnsupportedMulticodec {
        /// The key as given, shortened when long.
        key: String,
        /// The multicodec code found.
        code: u64,
    },
    /// The point has a length the encoding does not allow.
    #[error("key {key:?}: {curve} point is {found} bytes, expected {expected}")]
    KeyLength {
        /// The key as given (hex for raw bytes), shortened when long.
        key: String,
        /// The curve the key claims.
        curve: Curve,
        /// The length found.
        found: usize,
        /// The lengths allowed.
        expected: &'static str,
    },
    /// The bytes have the right length but are not a point on the curve.
    #[error("key {key:?}: not a valid {curve} point")]
    InvalidPoint {
        /// The key as given (hex for raw bytes), shortened when long.
        key: String,
        /// The curve the key claims.
        curve: Curve,
    },
    /// The secret scalar is zero or not below the group order.
    #[error("{curve} secret key is zero or not below the group order")]
    InvalidSecretKey {
        /// The curve of the key.
        curve: Curve,
    },
    /// The signature is ASN.1 DER, which atproto does not accept.
    #[error("signature is DER-encoded ({len} bytes), expected the 64-byte compact r‖s form")]
    DerSignature {
        /// The signature's length.
        len: usize,
    },
    /// The signature is not 64 bytes.
    #[error("signature is {len} bytes, expected the 64-byte compact r‖s form")]
    SignatureLength {
        /// The signature's length.
        len: usize,
    },
    /// `r` or `s` is zero or not below the group order.
    #[error("{curve} signature: r or s is zero or not below the group order")]
    MalformedSignature {
        /// The curve of the key it was checked against.
        curve: Curve,
    },
    /// `s` is above `n/2`: a malleable twin of a low-S signature, rejected by atproto.
    #[error("{curve} signature is high-S (s > n/2), atproto accepts only low-S signatures")]
    HighS {
        /// The curve of the key it was checked against.
        curve: Curve,
    },
    /// The signature is well-formed but was not made by this key over this data.
    #[error("signature does not verify with {key}")]
    BadSignature {
        /// The key, as a did:key.
        key: String,
    },
}

/// The two elliptic curves atproto signs with; both are mandatory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Curve {
    /// secp256k1, JWT `ES256K`, multicodec `0xe7`: what the reference PDS creates by default.
    K256,
    /// secp256r1 (NIST P-256), JWT `ES256`, multicodec `0x1200`: what secure enclaves and HSMs offer.
    P256,
}

impl Curve {
    /// The JWT `alg` name: `ES256K` or `ES256`.
    pub fn jwt_alg(self) -> &'static str {
        match self {
            Curve::K256 => "ES256K",
            Curve::P256 => "ES256",
        }
    }

    /// The unsigned-varint multicodec prefix of a Multikey on this curve.
    fn multicodec(self) -> [u8; 2] {
        match self {
            Curve::K256 => [0xe7, 0x01],
            Curve::P256 => [0x80, 0x24],
        }
    }

    /// `floor(n / 2)` big-endian: the largest `s` a low-S signature may have.
    fn half_order(self) -> &'static [u8; 32] {
        match self {
            Curve::K256 => &K256_HALF_ORDER,
            Curve::P256 => &P256_HALF_ORDER,
        }
    }
}

impl fmt::Display for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Curve::K256 => "k256",
            Curve::P256 => "p256",
        })
    }
}

/// `floor(n / 2)` of secp256k1's group order n.
const K256_HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
];

/// `floor(n / 2)` of P-256's group order n.
const P256_HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

/// The did:key method prefix.
const DID_KEY_PREFIX: &str = "did:key:";

/// Longest decoded multibase we accept: a 2-byte multicodec and a 65-byte uncompressed point,
/// with room to spare so that a slightly-too-long key gets a length error, not a base58 one.
const MAX_DECODED: usize = 80;

/// Inputs are quoted in errors up to this many characters, so an error stays small.
const MAX_QUOTED: usize = 100;

/// The shared libsecp256k1 context.
///
/// Verification in libsecp256k1 needs no per-context tables, but the API wants a context
/// pointer, and allocating one per call would cost more than the verify itself. It is not
/// randomized: signing here serves the devnet, not secrets under side-channel attack.
fn secp_context() -> &'static secp256k1::Secp256k1<secp256k1::All> {
    static CONTEXT: OnceLock<secp256k1::Secp256k1<secp256k1::All>> = OnceLock::new();
    CONTEXT.get_or_init(secp256k1::Secp256k1::new)
}

/// A parsed public key, ready to verify.
///
/// The curve point is decompressed and checked once, when the key is built; clones are a
/// memcpy of about a hundred bytes, so a per-DID cache can hand out copies.
#[derive(Clone)]
pub struct PublicKey {
    backend: VerifyingBackend,
    compressed: [u8; 33],
}

/// The parsed point, in the form each backend verifies with.
#[derive(Clone)]
enum VerifyingBackend {
    K256(secp256k1::PublicKey),
    /// aws-lc verifies p256 about five times faster than RustCrypto (~90 µs against ~430 µs
    /// on this project's machines); RustCrypto still parses and signs.
    P256(aws_lc_rs::signature::ParsedPublicKey),
}

/// How a key was given, for error messages; only turned into a `String` on failure.
#[derive(Clone, Copy)]
enum KeyInput<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
}

impl KeyInput<'_> {
    fn describe(self) -> String {
        match self {
            KeyInput::Text(text) => shorten(text),
            KeyInput::Bytes(bytes) => {
                let mut hex = String::with_capacity(2 + 2 * bytes.len().min(MAX_QUOTED / 2));
                hex.push_str("0x");
                for byte in bytes.iter().take(MAX_QUOTED / 2) {
                    hex.push_str(&format!("{byte:02x}"));
                }
                if bytes.len() > MAX_QUOTED / 2 {
                    hex.push('…');
                }
                hex
            }
        }
    }
}

/// `text`, cut to [`MAX_QUOTED`] characters.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Decode `z<base58btc>` into `buffer`, returning the bytes written.
fn decode_base58btc<'b>(
    input: &str,
    buffer: &'b mut [u8; MAX_DECODED],
) -> Result<&'b [u8], KeyError> {
    let bad = |reason| KeyError::BadMultibase {
        key: shorten(input),
        reason,
    };
    let Some(body) = input.strip_prefix('z') else {
        return Err(bad("expected the base58btc prefix 'z'"));
    };
    match bs58::decode(body).onto(&mut buffer[..]) {
        Ok(len) => Ok(&buffer[..len]),
        Err(bs58::decode::Error::BufferTooSmall) => {
            Err(bad("decodes to more bytes than any supported key"))
        }
        Err(_) => Err(bad("invalid base58 character")),
    }
}

impl PublicKey {
    /// Parse a `did:key:z…` string: the `did:key:` prefix and a Multikey.
    pub fn from_did_key(did_key: &str) -> Result<PublicKey, KeyError> {
        match did_key.strip_prefix(DID_KEY_PREFIX) {
            Some(multikey) => Self::from_multikey(multikey),
            None => Err(KeyError::NotDidKey {
                input: shorten(did_key),
            }),
        }
    }

    /// Parse a Multikey (`publicKeyMultibase` of a `Multikey` verification method):
    /// base58btc of a multicodec varint and a compressed 33-byte point.
    ///
    /// Uncompressed points are refused here, as the reference implementation refuses them.
    pub fn from_multikey(multikey: &str) -> Result<PublicKey, KeyError> {
        let mut buffer = [0u8; MAX_DECODED];
        let decoded = decode_base58btc(multikey, &mut buffer)?;
        let input = KeyInput::Text(multikey);
        for curve in [Curve::K256, Curve::P256] {
            if let Some(point) = decoded.strip_prefix(&curve.multicodec()) {
                return Self::parse_point(curve, point, false, input);
            }
        }
        match crate::multiformats::read_uvarint(decoded).ok().flatten() {
            Some((code, _)) => Err(KeyError::UnsupportedMulticodec {
                key: shorten(multikey),
                code,
            }),
            None => Err(KeyError::MissingMulticodec {
                key: shorten(multikey),
            }),
        }
    }

    /// Parse the `publicKeyMultibase` of a legacy `EcdsaSecp256k1VerificationKey2019` or
    /// `EcdsaSecp256r1VerificationKey2019` verification method: base58btc of a bare point,
    /// without multicodec; the curve comes from the method's `type`.
    ///
    /// Both compressed (33-byte) and uncompressed (65-byte) points occur in old DID documents.
    pub fn from_legacy_multibase(multibase: &str, curve: Curve) -> Result<PublicKey, KeyError> {
        let mut buffer = [0u8; MAX_DECODED];
        let decoded = decode_base58btc(multibase, &mut buffer)?;
        Self::parse_point(curve, decoded, true, KeyInput::Text(multibase))
    }

    /// Parse a compressed 33-byte SEC1 point (`0x02`/`0x03` then x).
    pub fn from_compressed(curve: Curve, compressed: &[u8]) -> Result<PublicKey, KeyError> {
        Self::parse_point(curve, compressed, false, KeyInput::Bytes(compressed))
    }

    /// Check the SEC1 tag and length ourselves (libsecp256k1 would also take the "hybrid"
    /// 0x06/0x07 forms) and let the backend check that the point is on the curve.
    fn parse_point(
        curve: Curve,
        point: &[u8],
        allow_uncompressed: bool,
        input: KeyInput<'_>,
    ) -> Result<PublicKey, KeyError> {
        let length_ok = point.len() == 33 || (allow_uncompressed && point.len() == 65);
        if !length_ok {
            return Err(KeyError::KeyLength {
                key: input.describe(),
                curve,
                found: point.len(),
                expected: if allow_uncompressed {
                    "33 (compressed) or 65 (uncompressed)"
                } else {
                    "33 (compressed)"
                },
            });
        }
        let tag_ok = match point.len() {
            33 => matches!(point[0], 0x02 | 0x03),
            _ => point[0] == 0x04,
        };
        let invalid = || KeyError::InvalidPoint {
            key: input.describe(),
            curve,
        };
        if !tag_ok {
            return Err(invalid());
        }
        match curve {
            Curve::K256 => {
                let key = secp256k1::PublicKey::from_slice(point).map_err(|_| invalid())?;
                Ok(PublicKey {
                    compressed: key.serialize(),
                    backend: VerifyingBackend::K256(key),
                })
            }
            Curve::P256 => {
                let key =
                    p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(|_| invalid())?;
                Self::from_p256(key)
            }
        }
    }

    /// Wrap a RustCrypto p256 key (parsed and checked on the curve) for aws-lc to verify with,
    /// caching its compressed form.
    fn from_p256(key: p256::ecdsa::VerifyingKey) -> Result<PublicKey, KeyError> {
        let encoded = key.to_encoded_point(true);
        let mut compressed = [0u8; 33];
        // A compressed SEC1 encoding of a non-identity point is always 33 bytes.
        compressed.copy_from_slice(encoded.as_bytes());
        let parsed = aws_lc_rs::signature::ParsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            compressed,
        )
        .map_err(|_| KeyError::InvalidPoint {
            key: KeyInput::Bytes(&compressed).describe(),
            curve: Curve::P256,
        })?;
        Ok(PublicKey {
            compressed,
            backend: VerifyingBackend::P256(parsed),
        })
    }

    /// The curve of this key.
    pub fn curve(&self) -> Curve {
        match self.backend {
            VerifyingBackend::K256(_) => Curve::K256,
            VerifyingBackend::P256(_) => Curve::P256,
        }
    }

    /// The compressed 33-byte SEC1 point.
    pub fn compressed(&self) -> [u8; 33] {
        self.compressed
    }

    /// The Multikey form: `z` and base58btc of the multicodec varint and compressed point.
    pub fn to_multikey(&self) -> String {
        let mut prefixed = [0u8; 35];
        prefixed[..2].copy_from_slice(&self.curve().multicodec());
        prefixed[2..].copy_from_slice(&self.compressed);
        let mut multikey = String::with_capacity(50);
        multikey.push('z');
        multikey.push_str(&bs58::encode(prefixed).into_string());
        multikey
    }

    /// The `did:key:z…` form, as found in PLC operations' `verificationMethods`.
    pub fn to_did_key(&self) -> String {
        format!("{DID_KEY_PREFIX}{}", self.to_multikey())
    }

    /// Check `sig` over `data`: atproto signs the SHA-256 of the bytes, not the bytes.
    pub fn verify(&self, data: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        let digest: [u8; 32] = Sha256::digest(data).into();
        self.verify_digest(&digest, sig)
    }

    /// Check `sig` over an already computed SHA-256 `digest`.
    ///
    /// Errors say why: not 64 bytes ([`KeyError::DerSignature`], [`KeyError::SignatureLength`]),
    /// `r`/`s` out of range, [`KeyError::HighS`], or [`KeyError::BadSignature`].
    pub fn verify_digest(&self, digest: &[u8; 32], sig: &[u8]) -> Result<(), KeyError> {
        let compact = compact_signature(sig)?;
        let curve = self.curve();
        let malformed = || KeyError::MalformedSignature { curve };
        // libsecp256k1 parses a zero r or s (and then fails to verify); name it the same on
        // both curves.
        if compact[..32] == [0; 32] || compact[32..] == [0; 32] {
            return Err(malformed());
        }
        let verified = match &self.backend {
            VerifyingBackend::K256(key) => {
                let signature =
                    secp256k1::ecdsa::Signature::from_compact(compact).map_err(|_| malformed())?;
                check_low_s(curve, compact)?;
                let message = secp256k1::Message::from_digest(*digest);
                secp_context()
                    .verify_ecdsa(message, &signature, key)
                    .is_ok()
            }
            VerifyingBackend::P256(key) => {
                // r and s must be below the group order, as RustCrypto's parser requires.
                p256::ecdsa::Signature::from_slice(compact).map_err(|_| malformed())?;
                // aws-lc accepts high-S signatures; atproto does not.
                check_low_s(curve, compact)?;
                let digest =
                    aws_lc_rs::digest::Digest::import_less_safe(digest, &aws_lc_rs::digest::SHA256)
                        .map_err(|_| malformed())?;
                key.verify_digest_sig(&digest, compact).is_ok()
            }
        };
        if verified {
            Ok(())
        } else {
            Err(KeyError::BadSignature {
                key: self.to_did_key(),
            })
        }
    }
}

/// The signature as 64 bytes, or why it is not the compact form.
fn compact_signature(sig: &[u8]) -> Result<&[u8; 64], KeyError> {
    sig.try_into().map_err(|_| {
        let len = sig.len();
        // An ASN.1 DER SEQUENCE: tag 0x30, then a one-byte length covering the rest.
        if len >= 8 && sig[0] == 0x30 && usize::from(sig[1]) == len - 2 {
            KeyError::DerSignature { len }
        } else {
            KeyError::SignatureLength { len }
        }
    })
}

/// Refuse `s > n/2`: big-endian byte strings of equal length compare as numbers.
fn check_low_s(curve: Curve, compact: &[u8; 64]) -> Result<(), KeyError> {
    if compact[32..] > curve.half_order()[..] {
        Err(KeyError::HighS { curve })
    } else {
        Ok(())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.curve() == other.curve() && self.compressed == other.compressed
    }
}

impl Eq for PublicKey {}

impl std::hash::Hash for PublicKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.curve().hash(state);
        self.compressed.hash(state);
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PublicKey")
            .field(&self.to_did_key())
            .finish()
    }
}

/// Shown as its did:key.
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_did_key())
    }
}

/// A secret signing key and its public key: the devnet signs commits and PLC operations.
///
/// No key generation here (this crate has no RNG): callers derive the 32 secret bytes, from a
/// seeded RNG in tests. Signatures are deterministic (RFC 6979) and always low-S.
#[derive(Clone)]
pub struct Keypair {
    secret: SigningBackend,
    public: PublicKey,
}

/// The secret scalar, in the form each backend signs with.
#[derive(Clone)]
enum SigningBackend {
    K256(secp256k1::SecretKey),
    P256(p256::ecdsa::SigningKey),
}

impl Keypair {
    /// Build a keypair from a 32-byte big-endian secret scalar, which must be in `1..n`.
    pub fn from_secret_bytes(curve: Curve, secret: &[u8; 32]) -> Result<Keypair, KeyError> {
        let invalid = || KeyError::InvalidSecretKey { curve };
        match curve {
            Curve::K256 => {
                let secret_key =
                    secp256k1::SecretKey::from_byte_array(*secret).map_err(|_| invalid())?;
                let public_key = secp256k1::PublicKey::from_secret_key(secp_context(), &secret_key);
                Ok(Keypair {
                    secret: SigningBackend::K256(secret_key),
                    public: PublicKey {
                        compressed: public_key.serialize(),
                        backend: VerifyingBackend::K256(public_key),
                    },
                })
            }
            Curve::P256 => {
                let signing_key = p256::ecdsa::SigningKey::from_bytes(&(*secret).into())
                    .map_err(|_| invalid())?;
                let public = PublicKey::from_p256(*signing_key.verifying_key())?;
                Ok(Keypair {
                    secret: SigningBackend::P256(signing_key),
                    public,
                })
            }
        }
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        self.public.clone()
    }

    /// The curve of this key.
    pub fn curve(&self) -> Curve {
        self.public.curve()
    }

    /// The 32-byte big-endian secret scalar, for storing the key.
    pub fn secret_bytes(&self) -> [u8; 32] {
        match &self.secret {
            SigningBackend::K256(secret_key) => secret_key.secret_bytes(),
            SigningBackend::P256(signing_key) => signing_key.to_bytes().into(),
        }
    }

    /// Sign the SHA-256 of `data`: a compact, low-S `r‖s`.
    pub fn sign(&self, data: &[u8]) -> [u8; 64] {
        let digest: [u8; 32] = Sha256::digest(data).into();
        self.sign_digest(&digest)
    }

    /// Sign an already computed SHA-256 `digest`: a compact, low-S `r‖s`.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> [u8; 64] {
        match &self.secret {
            SigningBackend::K256(secret_key) => {
                // libsecp256k1 always produces low-S signatures.
                let message = secp256k1::Message::from_digest(*digest);
                secp_context()
                    .sign_ecdsa(message, secret_key)
                    .serialize_compact()
            }
            SigningBackend::P256(signing_key) => {
                let signature: p256::ecdsa::Signature = match signing_key.sign_prehash(digest) {
                    Ok(signature) => signature,
                    // Errors only for a prehash shorter than 16 bytes, or when RFC 6979 yields
                    // r = 0 or s = 0, which happens with probability about 2^-256.
                    Err(_) => unreachable!("p256 RFC 6979 signing of a 32-byte digest failed"),
                };
                // RustCrypto's ecdsa does not normalize s for p256.
                let signature = signature.normalize_s().unwrap_or(signature);
                signature.to_bytes().into()
            }
        }
    }
}

/// Shows the curve and public key, never the secret.
impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair")
            .field("curve", &self.curve())
            .field("public", &self.public.to_did_key())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::PrimeField;
    use p256::elliptic_curve::scalar::IsHigh;

    /// Add one to a big-endian number (no overflow for the half orders).
    fn plus_one(mut bytes: [u8; 32]) -> [u8; 32] {
        for byte in bytes.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
        bytes
    }

    #[test]
    fn p256_half_order_is_the_largest_low_s() {
        let is_high = |bytes: [u8; 32]| {
            Option::<p256::Scalar>::from(p256::Scalar::from_repr(bytes.into()))
                .map(|scalar| bool::from(scalar.is_high()))
        };
        assert_eq!(is_high(P256_HALF_ORDER), Some(false), "n/2 must be low");
        assert_eq!(
            is_high(plus_one(P256_HALF_ORDER)),
            Some(true),
            "n/2 + 1 must be high"
        );
    }

    #[test]
    fn k256_half_order_is_the_largest_low_s() -> Result<(), secp256k1::Error> {
        let signature_with_s = |s: [u8; 32]| {
            let mut compact = [0u8; 64];
            compact[31] = 1;
            compact[32..].copy_from_slice(&s);
            secp256k1::ecdsa::Signature::from_compact(&compact)
        };
        let low = signature_with_s(K256_HALF_ORDER)?;
        let mut normalized = low;
        normalized.normalize_s();
        assert_eq!(low, normalized, "n/2 must be low");
        let high = signature_with_s(plus_one(K256_HALF_ORDER))?;
        let mut normalized = high;
        normalized.normalize_s();
        assert_ne!(high, normalized, "n/2 + 1 must be high");
        Ok(())
    }

    #[test]
    fn unsupported_multicodec_is_named() {
        // An ed25519 did:key from the W3C did:key examples.
        let ed25519 = "z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        assert_eq!(
            PublicKey::from_multikey(ed25519),
            Err(KeyError::UnsupportedMulticodec {
                key: ed25519.to_owned(),
                code: 0xed
            })
        );
    }

    #[test]
    fn long_input_is_shortened_in_errors() {
        let long = "z".repeat(1000);
        let message = match PublicKey::from_multikey(&long) {
            Ok(key) => format!("accepted {key}"),
            Err(error) => error.to_string(),
        };
        assert!(message.len() < 300, "error too long: {message}");
    }
}
