//! Users' credentials: argon2id password hashes and the JWTs that `POST /api/v1/auth/login`
//! issues (HS256, one hour). The signing key is replicated state, so every node checks the
//! tokens every other node issued.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::state::records::Role;

/// `expires_in` of a login token, in seconds (the seed's 3600).
pub const TOKEN_LIFETIME_SECONDS: i64 = 3600;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id, as a string (JWT convention).
    pub sub: String,
    pub role: Role,
    pub username: String,
    pub exp: i64,
    pub iat: i64,
    /// A random id (hex), so that two logins in the same second get different tokens and a
    /// logout revokes only its own (tokens issued before it existed have none).
    #[serde(default)]
    pub jti: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid or expired token; log in again with POST /api/v1/auth/login")]
    BadToken,
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// argon2id with OWASP's minimum: 19 MiB of memory, 2 passes, 1 lane.
fn argon2() -> argon2::Argon2<'static> {
    let params = argon2::Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

pub fn hash_password(password: &str) -> Result<String, AuthError> {
    argon2().hash_password(password.as_bytes()).map(|hash| hash.to_string()).map_err(|e| AuthError::Hash(e.to_string()))
}

/// At most this many password hashes are computed at once (one per core): each takes 19 MiB
/// and a core for tens of milliseconds, so a burst of logins queues instead of exhausting the
/// node's memory.
static HASHING: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(1))
});

/// Run a password hash off the async runtime, a bounded number at a time.
async fn hashing<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, AuthError> {
    let _permit = HASHING.acquire().await.map_err(|e| AuthError::Hash(e.to_string()))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| AuthError::Hash(e.to_string()))
}

/// [`hash_password`] for async callers.
pub async fn hash_password_async(password: String) -> Result<String, AuthError> {
    hashing(move || hash_password(&password)).await?
}

/// [`verify_password`] for async callers. Without a stored hash (an unknown user) it checks
/// against a dummy hash and answers false, so the answer takes as long either way and does not
/// reveal which usernames exist.
pub async fn verify_password_async(password: String, stored_hash: Option<String>) -> Result<bool, AuthError> {
    static DUMMY_HASH: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hash_password("davit-dummy-password").expect("hashing works"));
    hashing(move || {
        let known = stored_hash.is_some();
        verify_password(&password, stored_hash.as_deref().unwrap_or(&DUMMY_HASH)) && known
    })
    .await
}

pub fn verify_password(password: &str, stored_hash: &str) -> bool {
    match PasswordHash::new(stored_hash) {
        Ok(hash) => argon2::Argon2::default().verify_password(password.as_bytes(), &hash).is_ok(),
        Err(_) => false,
    }
}

pub fn issue_token(signing_key: &str, user_id: u64, username: &str, role: Role, now_seconds: i64) -> Result<String, AuthError> {
    let claims = Claims {
        sub: user_id.to_string(),
        role,
        username: username.to_string(),
        exp: now_seconds + TOKEN_LIFETIME_SECONDS,
        iat: now_seconds,
        jti: crate::state::apply::hex(&rand::random::<[u8; 16]>()),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(signing_key.as_bytes()))
        .map_err(|_| AuthError::BadToken)
}

pub fn check_token(signing_key: &str, token: &str) -> Result<Claims, AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(signing_key.as_bytes()), &validation)
        .map(|data| data.claims)
        .map_err(|_| AuthError::BadToken)
}

/// The stored form of an API token: its SHA-256, hex.
pub fn token_hash(secret: &str) -> String {
    use sha2::Digest;
    crate::state::apply::hex(&sha2::Sha256::digest(secret.as_bytes()))
}

pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A random string of `length` URL-safe characters, for generated passwords and keys.
pub fn random_secret(length: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..length).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_round_trip() {
        let hash = hash_password("your_password").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("your_password", &hash));
        assert!(!verify_password("wrong", &hash));
        let now = 1_764_134_400;
        let token = issue_token("key", 7, "john_doe", Role::Developer, now).unwrap();
        let claims = check_token("key", &token);
        // Expired long ago relative to the real clock: rejected.
        assert!(claims.is_err());
        let fresh = issue_token("key", 7, "john_doe", Role::Developer, jsonwebtoken::get_current_timestamp() as i64).unwrap();
        assert_eq!(check_token("key", &fresh).unwrap().sub, "7");
        // Two logins in the same second are two tokens (a logout revokes only its own).
        let same_second = issue_token("key", 7, "john_doe", Role::Developer, jsonwebtoken::get_current_timestamp() as i64).unwrap();
        assert_ne!(check_token("key", &same_second).unwrap().jti, check_token("key", &fresh).unwrap().jti);
        assert!(check_token("other key", &fresh).is_err());
        // The algorithm is pinned: an unsigned token with `alg: none` is refused.
        let header = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, r#"{"alg":"none","typ":"JWT"}"#);
        let body = fresh.split('.').nth(1).unwrap();
        assert!(check_token("key", &format!("{header}.{body}.")).is_err());
        // So is the same claims signed with another HMAC variant.
        let hs512 =
            jsonwebtoken::encode(&Header::new(Algorithm::HS512), &check_token("key", &fresh).unwrap(), &EncodingKey::from_secret(b"key"))
                .unwrap();
        assert!(check_token("key", &hs512).is_err());
        assert!(hash.contains("m=19456,t=2,p=1"), "{hash}");
    }
}
