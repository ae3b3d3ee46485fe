//! Sealing secret values before they are proposed to Raft: AES-256-GCM with a fresh random
//! nonce per value and a cluster master key that lives outside the Raft log and the store (a
//! key file, or `DAVIT_MASTER_KEY`). The Raft log, the store files and snapshots only ever hold
//! `davit-sealed:v1:<key id>:<base64(nonce || ciphertext)>`.
//!
//! Key rotation: the key file holds one key per line, `<key id> <base64 of 32 bytes>`; the last
//! line seals, every line opens. Add a new last line on every node (rolling restart), re-seal
//! stored secrets, then drop the old line.

use std::collections::BTreeMap;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::RngCore;

const PREFIX: &str = "davit-sealed:v1:";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("master key file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("DAVIT_MASTER_KEY: {0}")]
    KeyEnv(String),
    #[error("sealed value was sealed with master key {0:?}, which this node does not have; add it to the master key file")]
    UnknownKey(String),
    #[error("sealed value is malformed or was tampered with")]
    Malformed,
}

/// The master keys of a cluster; the last one seals.
pub struct MasterKeys {
    keys: BTreeMap<String, Aes256Gcm>,
    active: String,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeys").field("key_ids", &self.keys.keys()).field("active", &self.active).finish()
    }
}

fn parse_key(text: &str) -> Result<Aes256Gcm, String> {
    let bytes = BASE64.decode(text.trim()).map_err(|e| format!("key is not base64: {e}"))?;
    if bytes.len() != 32 {
        return Err(format!("key must be 32 bytes (base64 of 32 random bytes), got {}", bytes.len()));
    }
    Aes256Gcm::new_from_slice(&bytes).map_err(|e| e.to_string())
}

impl MasterKeys {
    /// Parse a key file's text: lines `<key id> <base64 key>`, `#` comments allowed.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        let mut active = None;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, key) =
                line.split_once(char::is_whitespace).ok_or_else(|| format!("line {}: expected `<key id> <base64 key>`", number + 1))?;
            if id.contains(':') {
                return Err(format!("line {}: key id must not contain ':'", number + 1));
            }
            keys.insert(id.to_string(), parse_key(key).map_err(|e| format!("line {}: {e}", number + 1))?);
            active = Some(id.to_string());
        }
        let active = active.ok_or("no key in it")?;
        Ok(Self { keys, active })
    }

    pub fn load_file(path: &Path) -> Result<Self, SecretError> {
        let error = |message: String| SecretError::KeyFile { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::parse(&text).map_err(error)
    }

    /// `DAVIT_MASTER_KEY`: the same format as the file (one or more lines), or just a base64 key.
    pub fn from_env_value(value: &str) -> Result<Self, SecretError> {
        if value.trim().contains(char::is_whitespace) {
            Self::parse(value).map_err(SecretError::KeyEnv)
        } else {
            let key = parse_key(value).map_err(SecretError::KeyEnv)?;
            Ok(Self { keys: BTreeMap::from([("env".to_string(), key)]), active: "env".into() })
        }
    }

    /// A new key file's text with one fresh random key.
    pub fn generate_file_text(key_id: &str) -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        format!(
            "# davit master key file: `<key id> <base64 32-byte key>` per line; the last line seals.\n{key_id} {}\n",
            BASE64.encode(key)
        )
    }

    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// Seal `plaintext`, bound to `context` (for example `config/staging/db_password`) so a
    /// sealed value cannot be moved to another record and opened there.
    pub fn seal(&self, plaintext: &str, context: &str) -> String {
        let cipher = &self.keys[&self.active];
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: plaintext.as_bytes(), aad: context.as_bytes() })
            .expect("AES-GCM encryption of in-memory data does not fail");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ciphertext);
        format!("{PREFIX}{}:{}", self.active, BASE64.encode(blob))
    }

    pub fn open(&self, sealed: &str, context: &str) -> Result<String, SecretError> {
        let rest = sealed.strip_prefix(PREFIX).ok_or(SecretError::Malformed)?;
        let (key_id, blob) = rest.split_once(':').ok_or(SecretError::Malformed)?;
        let cipher = self.keys.get(key_id).ok_or_else(|| SecretError::UnknownKey(key_id.to_string()))?;
        let blob = BASE64.decode(blob).map_err(|_| SecretError::Malformed)?;
        if blob.len() < 12 + 16 {
            return Err(SecretError::Malformed);
        }
        let (nonce, ciphertext) = blob.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().expect("12 bytes");
        let plaintext = cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: ciphertext, aad: context.as_bytes() })
            .map_err(|_| SecretError::Malformed)?;
        String::from_utf8(plaintext).map_err(|_| SecretError::Malformed)
    }

    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_with_rotation() {
        let old = MasterKeys::parse(&MasterKeys::generate_file_text("k1")).unwrap();
        let sealed = old.seal("new_password", "config/staging/db_password");
        assert!(MasterKeys::is_sealed(&sealed));
        assert!(!sealed.contains("new_password"));
        assert_eq!(old.open(&sealed, "config/staging/db_password").unwrap(), "new_password");
        // Bound to its context.
        assert!(matches!(old.open(&sealed, "config/production/db_password"), Err(SecretError::Malformed)));
        // Two seals of one value differ (fresh nonce).
        assert_ne!(sealed, old.seal("new_password", "config/staging/db_password"));

        let both =
            MasterKeys::parse(&format!("{}\n{}", MasterKeys::generate_file_text("k1"), MasterKeys::generate_file_text("k2"))).unwrap();
        assert_eq!(both.active_key_id(), "k2");
        let unknown = both.seal("v", "c");
        assert!(matches!(old.open(&unknown, "c"), Err(SecretError::UnknownKey(id)) if id == "k2"));
    }

    #[test]
    fn bad_keys_say_what_is_wrong() {
        assert!(MasterKeys::parse("k1 c2hvcnQ=").unwrap_err().contains("32 bytes"));
        assert!(MasterKeys::parse("# only a comment\n").unwrap_err().contains("no key"));
        assert!(MasterKeys::from_env_value("not base64!").is_err());
    }
}
