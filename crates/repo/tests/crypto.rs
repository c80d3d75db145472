//! Keys and signatures against the interop fixtures, plus the rejections atproto requires.

use atpdb_repo::crypto::{Curve, KeyError, Keypair, PublicKey};
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Standard base64 with or without padding: the fixtures leave it out.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignatureCase {
    comment: String,
    message_base64: String,
    algorithm: String,
    did_doc_suite: String,
    public_key_did: String,
    public_key_multibase: String,
    signature_base64: String,
    valid_signature: bool,
    tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DidKeyCase {
    private_key_bytes_hex: Option<String>,
    private_key_bytes_base58: Option<String>,
    public_did_key: String,
}

fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<T, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("reading fixture {}: {error}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn hex_decode(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err(format!("odd-length hex {hex:?}"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|at| {
            hex.get(at..at + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("invalid hex {hex:?}"))
        })
        .collect()
}

#[test]
fn signature_fixtures() -> TestResult {
    let Some(path) = atpdb_testkit::interop("signature_fixtures", "crypto/signature-fixtures.json")
    else {
        return Ok(());
    };
    let cases: Vec<SignatureCase> = read_json(&path)?;
    assert!(!cases.is_empty(), "no cases in {}", path.display());
    for case in &cases {
        let comment = &case.comment;
        let curve = match case.algorithm.as_str() {
            "ES256K" => Curve::K256,
            "ES256" => Curve::P256,
            other => panic!("{comment}: unknown algorithm {other:?}"),
        };
        let legacy_curve = match case.did_doc_suite.as_str() {
            "EcdsaSecp256k1VerificationKey2019" => Curve::K256,
            "EcdsaSecp256r1VerificationKey2019" => Curve::P256,
            other => panic!("{comment}: unknown didDocSuite {other:?}"),
        };
        assert_eq!(
            curve, legacy_curve,
            "{comment}: algorithm and didDocSuite disagree"
        );

        let key = PublicKey::from_did_key(&case.public_key_did)
            .map_err(|error| format!("{comment}: did:key: {error}"))?;
        assert_eq!(
            key.curve(),
            curve,
            "{comment}: curve of {}",
            case.public_key_did
        );
        assert_eq!(
            key.to_did_key(),
            case.public_key_did,
            "{comment}: did:key round trip"
        );
        assert_eq!(curve.jwt_alg(), case.algorithm, "{comment}: jwt alg");
        let legacy = PublicKey::from_legacy_multibase(&case.public_key_multibase, curve)
            .map_err(|error| format!("{comment}: legacy multibase: {error}"))?;
        assert_eq!(
            legacy, key,
            "{comment}: legacy multibase and did:key differ"
        );

        let message = BASE64.decode(&case.message_base64)?;
        let signature = BASE64.decode(&case.signature_base64)?;
        let result = key.verify(&message, &signature);
        if case.valid_signature {
            assert_eq!(result, Ok(()), "{comment}: valid signature rejected");
        } else {
            assert!(result.is_err(), "{comment}: invalid signature accepted");
        }
        if case.tags.iter().any(|tag| tag == "high-s") {
            assert_eq!(result, Err(KeyError::HighS { curve }), "{comment}");
        }
        if case.tags.iter().any(|tag| tag == "der-encoded") {
            assert_eq!(
                result,
                Err(KeyError::DerSignature {
                    len: signature.len()
                }),
                "{comment}"
            );
        }
    }
    Ok(())
}

fn did_key_fixtures(test: &str, file: &str, curve: Curve) -> TestResult {
    let Some(path) = atpdb_testkit::interop(test, file) else {
        return Ok(());
    };
    let cases: Vec<DidKeyCase> = read_json(&path)?;
    assert!(!cases.is_empty(), "no cases in {}", path.display());
    for case in &cases {
        let did_key = &case.public_did_key;
        let secret = match (&case.private_key_bytes_hex, &case.private_key_bytes_base58) {
            (Some(hex), _) => hex_decode(hex)?,
            (None, Some(base58)) => bs58::decode(base58).into_vec()?,
            (None, None) => panic!("{did_key}: case without a private key"),
        };
        let secret: [u8; 32] = secret
            .try_into()
            .map_err(|secret: Vec<u8>| format!("{did_key}: secret is {} bytes", secret.len()))?;
        let keypair = Keypair::from_secret_bytes(curve, &secret)?;
        assert_eq!(keypair.curve(), curve, "{did_key}");
        assert_eq!(
            keypair.secret_bytes(),
            secret,
            "{did_key}: secret round trip"
        );
        let public = keypair.public();
        assert_eq!(
            &public.to_did_key(),
            did_key,
            "{did_key}: derived public key"
        );

        let parsed = PublicKey::from_did_key(did_key)?;
        assert_eq!(
            parsed, public,
            "{did_key}: parsed key differs from derived key"
        );
        assert_eq!(parsed.curve(), curve, "{did_key}");
        let multikey = did_key.trim_start_matches("did:key:");
        assert_eq!(
            parsed.to_multikey(),
            multikey,
            "{did_key}: multikey round trip"
        );
        assert_eq!(
            PublicKey::from_multikey(multikey)?,
            parsed,
            "{did_key}: from_multikey"
        );
        assert_eq!(
            PublicKey::from_compressed(curve, &parsed.compressed())?,
            parsed,
            "{did_key}: from_compressed"
        );

        let signature = keypair.sign(b"fixture message");
        assert_eq!(
            parsed.verify(b"fixture message", &signature),
            Ok(()),
            "{did_key}: sign/verify"
        );
    }
    Ok(())
}

#[test]
fn w3c_didkey_k256() -> TestResult {
    did_key_fixtures(
        "w3c_didkey_k256",
        "crypto/w3c_didkey_K256.json",
        Curve::K256,
    )
}

#[test]
fn w3c_didkey_p256() -> TestResult {
    did_key_fixtures(
        "w3c_didkey_p256",
        "crypto/w3c_didkey_P256.json",
        Curve::P256,
    )
}

/// Group orders n, big-endian, to build the high-S twin `n - s` of a signature.
const K256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
    0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
];
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// The same signature with `s' = n - s`: valid ECDSA, but high-S.
fn high_s_twin(curve: Curve, signature: &[u8; 64]) -> [u8; 64] {
    let order = match curve {
        Curve::K256 => &K256_ORDER,
        Curve::P256 => &P256_ORDER,
    };
    let mut twin = *signature;
    let mut borrow = 0u16;
    for index in (0..32).rev() {
        let subtrahend = u16::from(signature[32 + index]) + borrow;
        let minuend = u16::from(order[index]);
        let (digit, next_borrow) = if minuend >= subtrahend {
            (minuend - subtrahend, 0)
        } else {
            (minuend + 256 - subtrahend, 1)
        };
        twin[32 + index] = u8::try_from(digit).unwrap_or(0);
        borrow = next_borrow;
    }
    twin
}

/// A DER encoding of a compact signature (positive INTEGERs, minimal length).
fn der(signature: &[u8; 64]) -> Vec<u8> {
    let integer = |bytes: &[u8]| {
        let start = bytes.iter().position(|&byte| byte != 0).unwrap_or(31);
        let mut body = Vec::new();
        if bytes[start] & 0x80 != 0 {
            body.push(0);
        }
        body.extend_from_slice(&bytes[start..]);
        let mut out = vec![0x02, u8::try_from(body.len()).unwrap_or(0)];
        out.extend(body);
        out
    };
    let mut content = integer(&signature[..32]);
    content.extend(integer(&signature[32..]));
    let mut out = vec![0x30, u8::try_from(content.len()).unwrap_or(0)];
    out.extend(content);
    out
}

fn keypairs() -> Result<Vec<Keypair>, KeyError> {
    let mut keypairs = Vec::new();
    for curve in [Curve::K256, Curve::P256] {
        for seed in 1u8..=4 {
            let mut secret = [seed; 32];
            secret[0] = 0x11;
            keypairs.push(Keypair::from_secret_bytes(curve, &secret)?);
        }
    }
    Ok(keypairs)
}

#[test]
fn sign_verify_round_trip() -> TestResult {
    for keypair in keypairs()? {
        let public = keypair.public();
        for data in [&b""[..], b"hello world", &[0xa5; 1000]] {
            let signature = keypair.sign(data);
            assert_eq!(public.verify(data, &signature), Ok(()), "{keypair:?}");
            assert_eq!(
                keypair.sign(data),
                signature,
                "{keypair:?}: signing is deterministic"
            );
            assert!(
                signature[32..] < high_s_twin(keypair.curve(), &signature)[32..],
                "{keypair:?}: signature is not low-S"
            );
            let digest: [u8; 32] = sha256(data);
            assert_eq!(
                keypair.sign_digest(&digest),
                signature,
                "{keypair:?}: sign_digest"
            );
            assert_eq!(
                public.verify_digest(&digest, &signature),
                Ok(()),
                "{keypair:?}"
            );
        }
    }
    Ok(())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

#[test]
fn flipped_bits_fail() -> TestResult {
    for keypair in keypairs()? {
        let public = keypair.public();
        let data = b"flip me";
        let signature = keypair.sign(data);
        for bit in [0, 7, 255, 256, 300, 511] {
            let mut flipped = signature;
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                public.verify(data, &flipped).is_err(),
                "{keypair:?}: signature with bit {bit} flipped verified"
            );
        }
        let mut other_data = *data;
        other_data[0] ^= 1;
        assert_eq!(
            public.verify(&other_data, &signature),
            Err(KeyError::BadSignature {
                key: public.to_did_key()
            }),
            "{keypair:?}: signature verified over other data"
        );
        let other_key = Keypair::from_secret_bytes(keypair.curve(), &[0x42; 32])?.public();
        assert_eq!(
            other_key.verify(data, &signature),
            Err(KeyError::BadSignature {
                key: other_key.to_did_key()
            }),
            "{keypair:?}: signature verified with another key"
        );
    }
    Ok(())
}

#[test]
fn high_s_twin_is_rejected() -> TestResult {
    for keypair in keypairs()? {
        let curve = keypair.curve();
        let signature = keypair.sign(b"malleable");
        let twin = high_s_twin(curve, &signature);
        assert_ne!(twin, signature);
        assert_eq!(
            keypair.public().verify(b"malleable", &twin),
            Err(KeyError::HighS { curve }),
            "{keypair:?}"
        );
    }
    Ok(())
}

#[test]
fn der_signature_is_rejected() -> TestResult {
    for keypair in keypairs()? {
        let signature = keypair.sign(b"der");
        let der = der(&signature);
        assert_eq!(
            keypair.public().verify(b"der", &der),
            Err(KeyError::DerSignature { len: der.len() }),
            "{keypair:?}"
        );
    }
    Ok(())
}

#[test]
fn wrong_lengths_are_rejected() -> TestResult {
    let keypair = Keypair::from_secret_bytes(Curve::K256, &[7; 32])?;
    let signature = keypair.sign(b"x");
    let public = keypair.public();
    assert_eq!(
        public.verify(b"x", &[]),
        Err(KeyError::SignatureLength { len: 0 })
    );
    assert_eq!(
        public.verify(b"x", &signature[..63]),
        Err(KeyError::SignatureLength { len: 63 })
    );
    let mut long = signature.to_vec();
    long.push(0);
    assert_eq!(
        public.verify(b"x", &long),
        Err(KeyError::SignatureLength { len: 65 })
    );
    Ok(())
}

#[test]
fn out_of_range_signatures_are_malformed() -> TestResult {
    for keypair in keypairs()? {
        let curve = keypair.curve();
        let public = keypair.public();
        let mut zero_r = keypair.sign(b"r");
        zero_r[..32].fill(0);
        assert_eq!(
            public.verify(b"r", &zero_r),
            Err(KeyError::MalformedSignature { curve }),
            "{keypair:?}: r = 0"
        );
        let mut huge_s = keypair.sign(b"s");
        huge_s[32..].fill(0xff);
        assert_eq!(
            public.verify(b"s", &huge_s),
            Err(KeyError::MalformedSignature { curve }),
            "{keypair:?}: s >= n"
        );
    }
    Ok(())
}

#[test]
fn secret_keys_out_of_range_are_rejected() {
    for curve in [Curve::K256, Curve::P256] {
        assert_eq!(
            Keypair::from_secret_bytes(curve, &[0; 32]).map(|_| ()),
            Err(KeyError::InvalidSecretKey { curve })
        );
        assert_eq!(
            Keypair::from_secret_bytes(curve, &[0xff; 32]).map(|_| ()),
            Err(KeyError::InvalidSecretKey { curve })
        );
    }
}

#[test]
fn keypair_debug_hides_the_secret() -> TestResult {
    let secret = [0x5a; 32];
    let keypair = Keypair::from_secret_bytes(Curve::P256, &secret)?;
    let debug = format!("{keypair:?}");
    assert!(debug.contains(&keypair.public().to_did_key()), "{debug}");
    assert!(
        !debug.contains("5a5a") && !debug.contains("90, 90"),
        "secret in {debug}"
    );
    Ok(())
}

#[test]
fn malformed_keys_are_rejected() -> TestResult {
    let k256 = Keypair::from_secret_bytes(Curve::K256, &[3; 32])?.public();
    let multikey = k256.to_multikey();

    let not_did = "did:plc:abc";
    assert_eq!(
        PublicKey::from_did_key(not_did),
        Err(KeyError::NotDidKey {
            input: not_did.to_owned()
        })
    );
    let no_z = multikey.trim_start_matches('z');
    assert!(
        matches!(
            PublicKey::from_multikey(no_z),
            Err(KeyError::BadMultibase { .. })
        ),
        "accepted multikey without 'z': {no_z}"
    );
    let bad_char = format!("{multikey}0");
    assert!(
        matches!(
            PublicKey::from_multikey(&bad_char),
            Err(KeyError::BadMultibase { .. })
        ),
        "accepted '0' in base58: {bad_char}"
    );

    // Multikeys must be compressed; legacy keys may be either.
    let mut compressed = k256.compressed();
    let encode = |bytes: &[u8]| format!("z{}", bs58::encode(bytes).into_string());
    let legacy = encode(&compressed);
    assert_eq!(
        PublicKey::from_legacy_multibase(&legacy, Curve::K256)?,
        k256
    );
    let codec_less = PublicKey::from_multikey(&legacy);
    assert!(
        codec_less.is_err(),
        "accepted a codec-less key as a multikey: {codec_less:?}"
    );

    let short = encode(&[&[0xe7, 0x01][..], &compressed[..32]].concat());
    assert_eq!(
        PublicKey::from_multikey(&short),
        Err(KeyError::KeyLength {
            key: short.clone(),
            curve: Curve::K256,
            found: 32,
            expected: "33 (compressed)"
        })
    );

    compressed[0] = 0x04;
    assert_eq!(
        PublicKey::from_compressed(Curve::K256, &compressed).map(|_| ()),
        Err(KeyError::InvalidPoint {
            key: format!(
                "0x{}",
                compressed
                    .iter()
                    .map(|byte| format!("{byte:02x}"))
                    .collect::<String>()
            ),
            curve: Curve::K256
        })
    );
    // x = 5 has no point on secp256k1: 5^3 + 7 = 132 is not a square mod p.
    let mut off_curve = [0u8; 33];
    off_curve[0] = 0x02;
    off_curve[32] = 5;
    assert!(
        matches!(
            PublicKey::from_compressed(Curve::K256, &off_curve),
            Err(KeyError::InvalidPoint { .. })
        ),
        "accepted x = 5 on k256"
    );
    let mut x_too_big = [0xffu8; 33];
    x_too_big[0] = 0x02;
    for curve in [Curve::K256, Curve::P256] {
        assert!(
            matches!(
                PublicKey::from_compressed(curve, &x_too_big),
                Err(KeyError::InvalidPoint { .. })
            ),
            "accepted x >= p on {curve}"
        );
    }
    Ok(())
}

#[test]
fn uncompressed_legacy_keys_parse() -> TestResult {
    // The secp256k1 generator G, uncompressed: the public key of the secret 1.
    let generator_x =
        hex_decode("79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")?;
    let generator_y =
        hex_decode("483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8")?;
    let uncompressed = [&[0x04][..], &generator_x, &generator_y].concat();
    let legacy = format!("z{}", bs58::encode(&uncompressed).into_string());
    let key = PublicKey::from_legacy_multibase(&legacy, Curve::K256)?;
    let mut one = [0u8; 32];
    one[31] = 1;
    assert_eq!(key, Keypair::from_secret_bytes(Curve::K256, &one)?.public());
    Ok(())
}
