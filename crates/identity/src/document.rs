//! Reading a DID document: the `#atproto` key, the `#atproto_pds` endpoint and the claimed handle.

use atpdb_repo::crypto::{Curve, PublicKey};
use atpdb_repo::syntax::{Did, Handle};
use serde_json::Value;

/// What atpdb needs from a DID document, as resolved.
///
/// The handle here is only *claimed* by the document; [`crate::Resolver::verified_handle`]
/// checks that it points back at the DID before anyone should display it.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The DID the document belongs to (its `id`).
    pub did: Did,
    /// The repository signing key: the `#atproto` verification method.
    pub key: PublicKey,
    /// The `#atproto_pds` service endpoint, without a trailing slash.
    pub pds: String,
    /// The first `at://` entry of `alsoKnownAs` that is a valid handle, unverified.
    pub handle: Option<Handle>,
    /// The document as served (at most [`crate::MAX_DOCUMENT_BYTES`] of JSON), for callers
    /// that show it.
    pub document: Value,
}

/// The verification method id fragment of the repository signing key.
const KEY_FRAGMENT: &str = "#atproto";
/// The service id fragment of the PDS.
const PDS_FRAGMENT: &str = "#atproto_pds";
/// The service type a PDS must have.
const PDS_TYPE: &str = "AtprotoPersonalDataServer";
/// The verification method id fragment of a labeler's label-signing key.
const LABEL_KEY_FRAGMENT: &str = "#atproto_label";
/// The service id fragment of a labeler.
const LABELER_FRAGMENT: &str = "#atproto_labeler";
/// The service type a labeler must have.
const LABELER_TYPE: &str = "AtprotoLabeler";

impl Identity {
    /// Reads `document` by the rules of the DID spec: `id` must be `did`; the key is the
    /// first verification method whose id is `#atproto` (relative or absolute), controlled
    /// by the DID, a `Multikey` or one of the two legacy `EcdsaSecp256*VerificationKey2019`
    /// types; the PDS is the first service whose id is `#atproto_pds`, of type
    /// `AtprotoPersonalDataServer`, with an http(s) endpoint.
    ///
    /// The first entry with the right id decides: a document whose `#atproto` method is
    /// unusable is refused even if a later one would do, as the reference implementations
    /// refuse it. The error is the reason, for [`crate::IdentityError::Invalid`].
    pub fn from_document(did: &Did, document: Value) -> Result<Identity, String> {
        let id = document.get("id").and_then(Value::as_str);
        if id != Some(did.as_str()) {
            return Err(match id {
                Some(id) => format!("id is {:?}, expected {:?}", quote(id), did.as_str()),
                None if document.is_object() => "no id".to_owned(),
                None => "not a JSON object".to_owned(),
            });
        }
        let key = verification_key(did, &document, KEY_FRAGMENT)?;
        let pds = service_endpoint(did, &document, PDS_FRAGMENT, PDS_TYPE)?;
        let handle = claimed_handle(&document);
        Ok(Identity {
            did: did.clone(),
            key,
            pds,
            handle,
            document,
        })
    }

    /// The labeler's label-signing key: the `#atproto_label` verification method, by the
    /// same rules as `#atproto`. A labeler without one cannot have valid labels; no other
    /// key is tried (the label specification says so).
    ///
    /// # Errors
    ///
    /// Why the method is missing or unusable.
    pub fn label_key(&self) -> Result<PublicKey, String> {
        verification_key(&self.did, &self.document, LABEL_KEY_FRAGMENT)
    }

    /// Where the labeler serves `subscribeLabels` and `queryLabels`: the `#atproto_labeler`
    /// service of type `AtprotoLabeler`, without a trailing slash.
    ///
    /// # Errors
    ///
    /// Why the service is missing or unusable.
    pub fn labeler_endpoint(&self) -> Result<String, String> {
        service_endpoint(&self.did, &self.document, LABELER_FRAGMENT, LABELER_TYPE)
    }
}

/// Whether an entry's `id` is `fragment`, relative (`#atproto`) or absolute (`did:…#atproto`).
fn has_id(did: &Did, entry: &Value, fragment: &str) -> bool {
    entry
        .get("id")
        .and_then(Value::as_str)
        .and_then(|id| id.strip_suffix(fragment))
        .is_some_and(|base| base.is_empty() || base == did.as_str())
}

fn first_with_id<'a>(
    did: &Did,
    document: &'a Value,
    list: &str,
    fragment: &str,
) -> Option<&'a Value> {
    document
        .get(list)
        .and_then(Value::as_array)?
        .iter()
        .find(|entry| has_id(did, entry, fragment))
}

fn verification_key(did: &Did, document: &Value, fragment: &str) -> Result<PublicKey, String> {
    let method = first_with_id(did, document, "verificationMethod", fragment)
        .ok_or_else(|| format!("no {fragment} verification method"))?;
    let controller = method.get("controller").and_then(Value::as_str);
    if controller != Some(did.as_str()) {
        return Err(format!(
            "{fragment} verification method has controller {:?}, expected {:?}",
            controller.map(quote),
            did.as_str()
        ));
    }
    let multibase = method
        .get("publicKeyMultibase")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{fragment} verification method has no publicKeyMultibase"))?;
    let parsed = match method.get("type").and_then(Value::as_str) {
        Some("Multikey") => PublicKey::from_multikey(multibase),
        Some("EcdsaSecp256r1VerificationKey2019") => {
            PublicKey::from_legacy_multibase(multibase, Curve::P256)
        }
        Some("EcdsaSecp256k1VerificationKey2019") => {
            PublicKey::from_legacy_multibase(multibase, Curve::K256)
        }
        other => {
            return Err(format!(
                "{fragment} verification method has type {:?}, expected \"Multikey\"",
                other.map(quote)
            ));
        }
    };
    parsed.map_err(|err| format!("{fragment} key: {err}"))
}

fn service_endpoint(
    did: &Did,
    document: &Value,
    fragment: &str,
    expected_type: &str,
) -> Result<String, String> {
    let service = first_with_id(did, document, "service", fragment)
        .ok_or_else(|| format!("no {fragment} service"))?;
    let kind = service.get("type").and_then(Value::as_str);
    if kind != Some(expected_type) {
        return Err(format!(
            "{fragment} service has type {:?}, expected {expected_type:?}",
            kind.map(quote)
        ));
    }
    let endpoint = service
        .get("serviceEndpoint")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{fragment} service has no serviceEndpoint string"))?;
    let url = reqwest::Url::parse(endpoint)
        .map_err(|err| format!("{fragment} endpoint {:?}: {err}", quote(endpoint)))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "{fragment} endpoint {:?} is not an http(s) URL with a host",
            quote(endpoint)
        ));
    }
    Ok(endpoint.trim_end_matches('/').to_owned())
}

/// Longest piece of a document quoted in an error: errors are cached and logged, and the
/// document is someone else's.
const MAX_QUOTED: usize = 100;

/// `text`, cut to [`MAX_QUOTED`] bytes (on a character boundary).
pub(crate) fn quote(text: &str) -> &str {
    if text.len() <= MAX_QUOTED {
        return text;
    }
    let mut end = MAX_QUOTED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default()
}

/// The first `at://` entry of `alsoKnownAs` that parses as a handle.
fn claimed_handle(document: &Value) -> Option<Handle> {
    document
        .get("alsoKnownAs")
        .and_then(Value::as_array)?
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|uri| uri.strip_prefix("at://"))
        .find_map(|handle| handle.parse::<Handle>().ok())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // JSON fixtures are edited in place by index
mod tests {
    use super::*;
    use serde_json::json;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const DID: &str = "did:plc:7iza6de2dwap2sbkpav7c6c6";

    fn key() -> PublicKey {
        atpdb_repo::sample::sample_keypair(1, Curve::K256).public()
    }

    fn document() -> Value {
        json!({
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": DID,
            "alsoKnownAs": ["at://alice.test"],
            "verificationMethod": [{
                "id": format!("{DID}#atproto"),
                "type": "Multikey",
                "controller": DID,
                "publicKeyMultibase": key().to_multikey(),
            }],
            "service": [{
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "https://pds.example.com/",
            }],
        })
    }

    fn parse(document: Value) -> Result<Identity, String> {
        let did: Did = DID.parse().map_err(|err| format!("{err}"))?;
        Identity::from_document(&did, document)
    }

    /// Applies `edit` to the good document and returns the reason it is refused.
    fn refused(edit: impl FnOnce(&mut Value)) -> Result<String, Box<dyn std::error::Error>> {
        let mut document = document();
        edit(&mut document);
        match parse(document) {
            Ok(identity) => Err(format!("accepted: {identity:?}").into()),
            Err(reason) => Ok(reason),
        }
    }

    #[test]
    fn reads_key_pds_and_handle() -> TestResult {
        let identity = parse(document())?;
        assert_eq!(identity.key, key());
        assert_eq!(identity.pds, "https://pds.example.com");
        assert_eq!(
            identity.handle.as_ref().map(Handle::as_str),
            Some("alice.test")
        );
        assert_eq!(identity.did.as_str(), DID);
        Ok(())
    }

    #[test]
    fn relative_and_absolute_ids_both_match() -> TestResult {
        let mut relative = document();
        relative["verificationMethod"][0]["id"] = json!("#atproto");
        relative["service"][0]["id"] = json!(format!("{DID}#atproto_pds"));
        assert!(parse(relative).is_ok());
        let other = refused(|doc| {
            doc["verificationMethod"][0]["id"] = json!("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa#atproto");
        })?;
        assert_eq!(other, "no #atproto verification method");
        Ok(())
    }

    #[test]
    fn handle_is_the_first_valid_at_uri() -> TestResult {
        let mut doc = document();
        doc["alsoKnownAs"] = json!([
            "https://alice.example",
            "at://not a handle",
            "at://Bob.Test"
        ]);
        let identity = parse(doc)?;
        assert_eq!(
            identity.handle.as_ref().map(Handle::as_str),
            Some("bob.test")
        );
        let mut doc = document();
        doc["alsoKnownAs"] = json!("at://alice.test");
        assert_eq!(parse(doc)?.handle, None);
        Ok(())
    }

    #[test]
    fn legacy_key_types_parse() -> TestResult {
        // Legacy methods carry a bare point without multicodec, compressed or not.
        for curve in [Curve::K256, Curve::P256] {
            let key = atpdb_repo::sample::sample_keypair(2, curve).public();
            let kind = match curve {
                Curve::K256 => "EcdsaSecp256k1VerificationKey2019",
                _ => "EcdsaSecp256r1VerificationKey2019",
            };
            let mut doc = document();
            doc["verificationMethod"][0]["type"] = json!(kind);
            let bare = format!("z{}", bs58::encode(key.compressed()).into_string());
            doc["verificationMethod"][0]["publicKeyMultibase"] = json!(bare);
            assert_eq!(parse(doc)?.key, key, "{kind}");
        }
        Ok(())
    }

    #[test]
    fn malformed_documents_are_refused_with_a_reason() -> TestResult {
        type Edit = fn(&mut Value);
        let cases: Vec<(&str, Edit)> = vec![
            ("not a JSON object", |doc| *doc = json!([DID])),
            ("no id", |doc| *doc = json!({})),
            ("id is", |doc| {
                doc["id"] = json!("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
            }),
            ("no #atproto verification method", |doc| {
                doc["verificationMethod"] = json!([])
            }),
            ("no #atproto verification method", |doc| {
                doc["verificationMethod"] = json!({"id": "#atproto"})
            }),
            ("expected \"Multikey\"", |doc| {
                doc["verificationMethod"][0]["type"] = json!("JsonWebKey2020")
            }),
            ("has controller", |doc| {
                doc["verificationMethod"][0]["controller"] = json!("did:web:evil.com")
            }),
            ("no publicKeyMultibase", |doc| {
                doc["verificationMethod"][0]["publicKeyMultibase"] = json!(42)
            }),
            ("#atproto key", |doc| {
                doc["verificationMethod"][0]["publicKeyMultibase"] = json!("zQ3sh0OIl")
            }),
            ("#atproto key", |doc| {
                doc["verificationMethod"][0]["publicKeyMultibase"] = json!("mAbCd")
            }),
            ("no #atproto_pds service", |doc| doc["service"] = json!([])),
            ("no #atproto_pds service", |doc| {
                if let Some(map) = doc.as_object_mut() {
                    map.remove("service");
                }
            }),
            ("expected \"AtprotoPersonalDataServer\"", |doc| {
                doc["service"][0]["type"] = json!("BskyFeedGenerator")
            }),
            ("no serviceEndpoint", |doc| {
                doc["service"][0]["serviceEndpoint"] = json!({"uri": "x"})
            }),
            ("not an http(s) URL", |doc| {
                doc["service"][0]["serviceEndpoint"] = json!("ftp://pds.example.com")
            }),
            ("#atproto_pds endpoint", |doc| {
                doc["service"][0]["serviceEndpoint"] = json!("pds.example.com")
            }),
        ];
        for (expected, edit) in cases {
            let reason = refused(edit)?;
            assert!(
                reason.contains(expected),
                "reason {reason:?} does not mention {expected:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_labeler_has_its_own_key_and_endpoint_and_no_fallback() -> TestResult {
        let label_key = atpdb_repo::sample::sample_keypair(2, Curve::P256).public();
        let mut labeler = document();
        labeler["verificationMethod"]
            .as_array_mut()
            .ok_or("methods")?
            .push(json!({
                "id": "#atproto_label",
                "type": "Multikey",
                "controller": DID,
                "publicKeyMultibase": label_key.to_multikey(),
            }));
        labeler["service"]
            .as_array_mut()
            .ok_or("services")?
            .push(json!({
                "id": format!("{DID}#atproto_labeler"),
                "type": "AtprotoLabeler",
                "serviceEndpoint": "https://labeler.example.com/",
            }));
        let identity = parse(labeler.clone())?;
        assert_eq!(identity.key, key(), "#atproto is not #atproto_label");
        assert_eq!(identity.label_key()?, label_key);
        assert_eq!(identity.labeler_endpoint()?, "https://labeler.example.com");
        labeler["service"][1]["type"] = json!("AtprotoPersonalDataServer");
        let wrong_type = parse(labeler)?.labeler_endpoint().err().unwrap_or_default();
        assert!(
            wrong_type.contains("expected \"AtprotoLabeler\""),
            "{wrong_type}"
        );
        // An account that is no labeler: the repository key is not used for labels.
        let plain = parse(document())?;
        assert_eq!(
            plain.label_key().err().as_deref(),
            Some("no #atproto_label verification method")
        );
        assert!(plain.labeler_endpoint().is_err());
        Ok(())
    }
}
