//! Session tokens and admin credentials.
//!
//! Tokens are real HS256 JWTs with the reference PDS's scopes, so clients that inspect
//! `exp` or `scope` (the TypeScript agent does, to refresh ahead of expiry) behave as they
//! do against a production PDS.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use crate::xrpc::XrpcError;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Access tokens live two hours, refresh tokens ninety days, as on the reference PDS.
const ACCESS_SECONDS: u64 = 2 * 3600;
const REFRESH_SECONDS: u64 = 90 * 86_400;

pub(crate) const ACCESS_SCOPE: &str = "com.atproto.access";
pub(crate) const REFRESH_SCOPE: &str = "com.atproto.refresh";

/// The claims the PDS reads back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub(crate) scope: String,
    pub(crate) sub: String,
    pub(crate) aud: String,
    pub(crate) iat: u64,
    pub(crate) exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) jti: Option<String>,
}

/// Signs and checks tokens with one secret per host.
#[derive(Clone)]
pub(crate) struct TokenKey {
    secret: [u8; 32],
    audience: String,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

impl TokenKey {
    pub(crate) fn new(secret: [u8; 32], audience: String) -> TokenKey {
        TokenKey { secret, audience }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        <HmacSha256 as KeyInit>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    fn sign(&self, claims: &Claims, typ: &str) -> String {
        let header = serde_json::json!({"alg": "HS256", "typ": typ});
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default())
        );
        let mut mac = self.mac();
        mac.update(token.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        token.push('.');
        token.push_str(&sig);
        token
    }

    /// A fresh access and refresh token pair for `did`; the refresh token's `jti` names
    /// the session so that it can be rotated and revoked.
    pub(crate) fn issue(&self, did: &str, session: &str) -> (String, String) {
        let now = unix_now();
        let access = Claims {
            scope: ACCESS_SCOPE.to_owned(),
            sub: did.to_owned(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + ACCESS_SECONDS,
            // Unique per issue, so a refresh always yields a new access token (clients
            // compare tokens to decide whether a refresh did anything).
            jti: Some(format!("{session}-{}", hex(&random_bytes::<8>()))),
        };
        let refresh = Claims {
            scope: REFRESH_SCOPE.to_owned(),
            sub: did.to_owned(),
            aud: self.audience.clone(),
            iat: now,
            exp: now + REFRESH_SECONDS,
            jti: Some(session.to_owned()),
        };
        (
            self.sign(&access, "at+jwt"),
            self.sign(&refresh, "refresh+jwt"),
        )
    }

    /// Checks a bearer token's signature, expiry and scope.
    pub(crate) fn verify(&self, token: &str, scope: &str) -> Result<Claims, XrpcError> {
        let invalid = || XrpcError::auth("Token could not be verified");
        let (signed, sig) = token.rsplit_once('.').ok_or_else(invalid)?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| invalid())?;
        let mut mac = self.mac();
        mac.update(signed.as_bytes());
        mac.verify_slice(&sig).map_err(|_| invalid())?;
        let (_, payload) = signed.split_once('.').ok_or_else(invalid)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| invalid())?;
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| invalid())?;
        if claims.exp <= unix_now() {
            return Err(XrpcError::bad("ExpiredToken", "Token has expired"));
        }
        if claims.scope != scope || claims.aud != self.audience {
            return Err(XrpcError::bad("InvalidToken", "Bad token scope"));
        }
        Ok(claims)
    }
}

/// The bearer token of a request, if it has one.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Whether a request carries `admin:{password}` as HTTP Basic credentials.
pub(crate) fn is_admin(headers: &axum::http::HeaderMap, password: &str) -> bool {
    let Some(value) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Basic "))
    else {
        return false;
    };
    let Ok(decoded) = STANDARD.decode(value.trim()) else {
        return false;
    };
    // Compare through HMAC so the check does not leak the password's prefix by timing.
    let expected = format!("admin:{password}");
    let key = TokenKey::new([7; 32], String::new());
    let mut mac = key.mac();
    mac.update(&decoded);
    let mut expected_mac = key.mac();
    expected_mac.update(expected.as_bytes());
    mac.verify_slice(&expected_mac.finalize().into_bytes())
        .is_ok()
}

/// Random bytes for secrets and session ids.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS generator failing leaves zeros: acceptable for a loopback test network, and
    // better than refusing to start.
    let _ = getrandom::fill(&mut bytes);
    bytes
}

/// Lowercase hex, for session and token ids.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Middleware in front of every host's `/admin` routes: HTTP Basic `admin:{password}`.
pub(crate) async fn require_admin(
    axum::extract::State(password): axum::extract::State<std::sync::Arc<str>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if is_admin(request.headers(), &password) {
        next.run(request).await
    } else {
        (
            axum::http::StatusCode::UNAUTHORIZED,
            [(
                axum::http::header::WWW_AUTHENTICATE,
                "Basic realm=\"atpdb-devnet admin\"",
            )],
            axum::Json(
                serde_json::json!({"error": "AuthenticationRequired", "message": "admin credentials required"}),
            ),
        )
            .into_response()
    }
}
