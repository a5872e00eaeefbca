//! The API key store: `<data_dir>/keys.json`, written atomically under an advisory lock (the CLI
//! and a running server may both change it), holding each key's public id, name, role, collections
//! and an Argon2id hash of its secret; the secret itself is shown once, at creation, and never
//! stored.
//!
//! A key reads `drk_<id>_<secret>`: the id finds the entry without hashing every key, Argon2id
//! checks the secret. A verified token is remembered (by its SHA-256) until the file changes, so a
//! request pays for Argon2 once per key and server start, and a revocation made by the CLI is seen
//! by the running server at its next request (the file's modification time and size are checked).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{AccessError, Principal, Role};

const PREFIX: &str = "drk_";
/// Verified tokens remembered before the memo is cleared (bounds memory under a flood of keys).
const MEMO_MAX: usize = 10_000;

/// One key as stored (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub collections: Vec<String>,
    /// Argon2id PHC string of the secret.
    pub hash: String,
    pub created_at: u64,
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

/// A key as listed: everything but the hash.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub collections: Vec<String>,
    pub created_at: u64,
    pub revoked_at: Option<u64>,
}

impl From<&StoredKey> for KeyView {
    fn from(k: &StoredKey) -> KeyView {
        KeyView {
            id: k.id.clone(),
            name: k.name.clone(),
            role: k.role,
            collections: k.collections.clone(),
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

/// What a new key is for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub name: String,
    pub role: Role,
    /// Required for readers and editors; must be empty for admins.
    #[serde(default)]
    pub collections: Vec<String>,
}

/// A key just made: the token (shown once) and what was stored.
#[derive(Debug, Clone, Serialize)]
pub struct NewKey {
    pub token: String,
    #[serde(flatten)]
    pub key: KeyView,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<StoredKey>,
}

#[derive(Default)]
struct Loaded {
    /// Modification time and size of the file when read; `None` = absent.
    stamp: Option<(std::time::SystemTime, u64)>,
    keys: Vec<StoredKey>,
    /// SHA-256 of verified tokens -> key id.
    verified: HashMap<[u8; 32], String>,
}

/// The keys of one data dir.
pub struct KeyStore {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

impl KeyStore {
    pub fn new(data_dir: &Path) -> KeyStore {
        KeyStore {
            path: data_dir.join("keys.json"),
            loaded: RwLock::new(Loaded::default()),
        }
    }

    /// Make a key; the returned token is the only copy of its secret.
    pub fn create(&self, spec: KeySpec) -> Result<NewKey, AccessError> {
        validate(&spec)?;
        let id = hex::encode(random_bytes::<6>());
        let secret = hex::encode(random_bytes::<32>());
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .map_err(|e| AccessError::InvalidKey(format!("hashing the secret failed: {e}")))?
            .to_string();
        let stored = StoredKey {
            id: id.clone(),
            name: spec.name,
            role: spec.role,
            collections: spec.collections,
            hash,
            created_at: crate::collection::now_secs(),
            revoked_at: None,
        };
        let view = KeyView::from(&stored);
        self.modify(|file| {
            file.keys.push(stored);
            Ok(())
        })?;
        Ok(NewKey {
            token: format!("{PREFIX}{id}_{secret}"),
            key: view,
        })
    }

    /// Every key, revoked ones included (oldest first).
    pub fn list(&self) -> Result<Vec<KeyView>, AccessError> {
        self.refresh()?;
        let loaded = self
            .loaded
            .read()
            .expect("key store lock is never poisoned");
        Ok(loaded.keys.iter().map(KeyView::from).collect())
    }

    /// Whether any key can still be used.
    pub fn has_active(&self) -> Result<bool, AccessError> {
        Ok(self.list()?.iter().any(|k| k.revoked_at.is_none()))
    }

    /// Revoke key `id` (kept in the list, marked with the time); revoking twice is harmless.
    pub fn revoke(&self, id: &str) -> Result<KeyView, AccessError> {
        let mut view = None;
        self.modify(|file| {
            let key = file
                .keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or_else(|| AccessError::NoSuchKey(id.to_string()))?;
            key.revoked_at
                .get_or_insert_with(crate::collection::now_secs);
            view = Some(KeyView::from(&*key));
            Ok(())
        })?;
        Ok(view.expect("set by the closure on success"))
    }

    /// The principal a bearer token stands for. Blocking (Argon2 takes tens of milliseconds the
    /// first time a token is seen): call it from a blocking thread.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AccessError> {
        let invalid = || AccessError::Unauthenticated("invalid or revoked API key".into());
        self.refresh()?;
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let (id, secret) = parse(token).ok_or_else(invalid)?;
        {
            let loaded = self
                .loaded
                .read()
                .expect("key store lock is never poisoned");
            let key = active(&loaded.keys, id).ok_or_else(invalid)?;
            if loaded.verified.get(&digest).is_some_and(|k| k == id) {
                return Ok(principal(key));
            }
            let hash = PasswordHash::new(&key.hash).map_err(|e| AccessError::Damaged {
                path: self.path.clone(),
                message: format!("key {id}: {e}"),
            })?;
            Argon2::default()
                .verify_password(secret.as_bytes(), &hash)
                .map_err(|_| invalid())?;
        }
        let mut loaded = self
            .loaded
            .write()
            .expect("key store lock is never poisoned");
        if loaded.verified.len() >= MEMO_MAX {
            loaded.verified.clear();
        }
        loaded.verified.insert(digest, id.to_string());
        let key = active(&loaded.keys, id).ok_or_else(invalid)?;
        Ok(principal(key))
    }

    /// Re-read the file if it changed since it was last read.
    fn refresh(&self) -> Result<(), AccessError> {
        let stamp = self.stamp()?;
        if self
            .loaded
            .read()
            .expect("key store lock is never poisoned")
            .stamp
            == stamp
            && stamp.is_some()
        {
            return Ok(());
        }
        let keys = self.read_file()?.keys;
        let mut loaded = self
            .loaded
            .write()
            .expect("key store lock is never poisoned");
        *loaded = Loaded {
            stamp,
            keys,
            verified: HashMap::new(),
        };
        Ok(())
    }

    fn stamp(&self) -> Result<Option<(std::time::SystemTime, u64)>, AccessError> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(Some((m.modified().map_err(|e| self.io(e))?, m.len()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }

    fn read_file(&self) -> Result<KeyFile, AccessError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AccessError::Damaged {
                path: self.path.clone(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyFile::default()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Read, change and write the file under an exclusive lock (CLI and server may both write).
    fn modify(
        &self,
        change: impl FnOnce(&mut KeyFile) -> Result<(), AccessError>,
    ) -> Result<(), AccessError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        let _lock = crate::datadir::FileLock::exclusive(&self.path.with_extension("lock"))
            .map_err(|e| self.io(e))?;
        let mut file = self.read_file()?;
        change(&mut file)?;
        let bytes = serde_json::to_vec_pretty(&file).expect("key file serialises");
        crate::collection::write_atomic(&self.path, &bytes).map_err(|e| self.io(e))?;
        restrict_permissions(&self.path).map_err(|e| self.io(e))?;
        // Force a re-read: a write within the same clock tick may keep the stamp.
        self.loaded
            .write()
            .expect("key store lock is never poisoned")
            .stamp = None;
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> AccessError {
        AccessError::Store {
            path: self.path.clone(),
            source,
        }
    }
}

fn validate(spec: &KeySpec) -> Result<(), AccessError> {
    let bad = |m: String| Err(AccessError::InvalidKey(m));
    let name = spec.name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return bad("`name` must be 1-64 characters without control characters".into());
    }
    match spec.role {
        Role::Admin if !spec.collections.is_empty() => {
            bad("an admin key holds every collection: give no `collections`".into())
        }
        Role::Reader | Role::Editor if spec.collections.is_empty() => bad(format!(
            "a {} key needs at least one collection (`--collection NAME`)",
            spec.role
        )),
        _ => {
            for c in &spec.collections {
                crate::collection::validate_name(c)
                    .map_err(|e| AccessError::InvalidKey(e.to_string()))?;
            }
            Ok(())
        }
    }
}

fn parse(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(PREFIX)?.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 12) && hex(secret, 64)).then_some((id, secret))
}

fn active<'a>(keys: &'a [StoredKey], id: &str) -> Option<&'a StoredKey> {
    keys.iter().find(|k| k.id == id && k.revoked_at.is_none())
}

fn principal(key: &StoredKey) -> Principal {
    Principal {
        key_id: key.id.clone(),
        name: key.name.clone(),
        role: key.role,
        collections: key.collections.clone(),
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

/// The key file holds hashes only, but nobody else on the machine needs to read it.
fn restrict_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(role: Role, collections: &[&str]) -> KeySpec {
        KeySpec {
            name: "team".into(),
            role,
            collections: collections.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_created_key_authenticates_until_revoked_and_its_secret_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        let new = store.create(spec(Role::Reader, &["support"])).unwrap();
        let p = store.authenticate(&new.token).unwrap();
        assert_eq!(
            (p.role, p.collections.clone()),
            (Role::Reader, vec!["support".into()])
        );
        // Again: from the memo this time, same answer.
        assert_eq!(store.authenticate(&new.token).unwrap(), p);
        let secret = new.token.rsplit('_').next().unwrap();
        let file = std::fs::read_to_string(dir.path().join("keys.json")).unwrap();
        assert!(!file.contains(secret), "the secret must not be stored");
        assert!(file.contains("$argon2id$"));

        // A second store (the CLI) revokes; the first (the server) sees it at once.
        KeyStore::new(dir.path()).revoke(&new.key.id).unwrap();
        let e = store.authenticate(&new.token).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Unauthenticated);
        assert!(store.list().unwrap()[0].revoked_at.is_some());
    }

    #[test]
    fn wrong_secrets_and_malformed_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        let new = store.create(spec(Role::Admin, &[])).unwrap();
        let mut wrong = new.token.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        for token in [wrong.as_str(), "", "drk_", "Bearer x", &new.token[..20]] {
            assert!(store.authenticate(token).is_err(), "{token:?}");
        }
        assert!(store.authenticate(&new.token).is_ok());
    }

    #[test]
    fn key_requests_that_make_no_sense_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        for (s, words) in [
            (spec(Role::Reader, &[]), "needs at least one collection"),
            (spec(Role::Admin, &["a"]), "holds every collection"),
            (spec(Role::Editor, &["Bad Name"]), "invalid collection name"),
        ] {
            let e = store.create(s).unwrap_err().to_string();
            assert!(e.contains(words), "{e}");
        }
        assert!(!store.has_active().unwrap());
        assert!(store.revoke("nope").is_err());
    }
}
