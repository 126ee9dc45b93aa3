//! The write-ahead journal of rotated refresh tokens: a token the provider issued is written here
//! (encrypted, fsynced) before `<name>-token` is patched, and removed once the Secret holds it.
//! A process that dies in between finds the token again at start and saves it.
//!
//! In the chart the journal is an `emptyDir` (it survives a container restart, not the pod) and the
//! key lives in a memory-backed `emptyDir`: the key never touches a disk, so the journal files are
//! useless without the pod. Files are `0600`, one per connection, replaced atomically.

use super::tokens::Pending;
use ring::aead::{self, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("journal key {0}: not 32 bytes")]
    Key(PathBuf),
}

/// What [`Journal::load`] found: readable entries `(connection id, pending)`, and unreadable files.
pub type Loaded = (Vec<(String, Pending)>, Vec<PathBuf>);

/// An open journal directory and its key.
pub struct Journal {
    dir: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the directory).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(())
}

impl Journal {
    /// Opens (creating) the journal in `dir`, with the key in `key_file` (created with 32 random
    /// bytes, mode 0600, when absent).
    pub fn open(dir: &Path, key_file: &Path) -> Result<Self, JournalError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let rng = SystemRandom::new();
        let key = match fs::read(key_file) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = vec![0u8; 32];
                rng.fill(&mut bytes).expect("system randomness");
                if let Some(parent) = key_file.parent() {
                    fs::create_dir_all(parent).map_err(io(parent))?;
                }
                write_atomic(key_file, &bytes)?;
                bytes
            }
            Err(e) => return Err(io(key_file)(e)),
        };
        let key =
            UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| JournalError::Key(key_file.into()))?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            key: LessSafeKey::new(key),
            rng,
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        // Connection UIDs are [0-9a-f-]; anything else is hex-encoded.
        let safe: String = id
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'0'..=b'9' | b'-' => (b as char).to_string(),
                other => format!("_{other:02x}"),
            })
            .collect();
        self.dir.join(format!("{safe}.token"))
    }

    /// Records `pending` for connection `id` (durable when this returns).
    pub fn put(&self, id: &str, pending: &Pending) -> Result<(), JournalError> {
        let path = self.path(id);
        // The file name is authenticated: an entry moved to another connection's name won't open.
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("system randomness");
        let mut sealed = serde_json::to_vec(&(id, pending)).expect("pending serializes");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(stem.as_bytes()),
                &mut sealed,
            )
            .expect("sealing cannot fail for small inputs");
        let mut bytes = nonce.to_vec();
        bytes.extend(sealed);
        write_atomic(&path, &bytes)
    }

    /// Forgets connection `id`'s entry (its token is saved, or superseded).
    pub fn remove(&self, id: &str) -> Result<(), JournalError> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Every entry that can be read with this key: `(connection id, pending)`. Entries sealed with
    /// another key (a previous pod's) or damaged are skipped and reported in `unreadable`.
    pub fn load(&self) -> Result<Loaded, JournalError> {
        let mut entries = vec![];
        let mut unreadable = vec![];
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("token") {
                continue;
            }
            let bytes = fs::read(&path).map_err(io(&path))?;
            match self.open_entry(&path, bytes) {
                Some(e) => entries.push(e),
                None => unreadable.push(path),
            }
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((entries, unreadable))
    }

    fn open_entry(&self, path: &Path, bytes: Vec<u8>) -> Option<(String, Pending)> {
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let stem = path.file_stem()?.to_str()?.to_string();
        let mut sealed = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                aead::Aad::from(stem.as_bytes()),
                &mut sealed,
            )
            .ok()?;
        let (stored_id, pending): (String, Pending) = serde_json::from_slice(plain).ok()?;
        Some((stored_id, pending))
    }
}

/// At start: saves every journalled token whose `<name>-token` still holds the token it replaced
/// (or an intent on it), and forgets the entries already saved or superseded. Returns the entries
/// still pending (e.g. the Secret is gone or a write failed), for the reconciler to save.
pub async fn replay(client: &kube::Client, journal: &Journal) -> Vec<(String, Pending)> {
    use super::tokens::{Save, read_live, save_decision, settled_patch};
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, Patch, PatchParams};

    let (entries, unreadable) = match journal.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the token journal");
            return vec![];
        }
    };
    for path in unreadable {
        tracing::warn!(path = %path.display(), "journal entry sealed with another key or damaged; ignored");
    }
    let mut remaining = vec![];
    for (id, pending) in entries {
        let api: Api<Secret> = Api::namespaced(client.clone(), &pending.namespace);
        let saved = match api.get_opt(&pending.secret).await {
            Ok(Some(current)) => match save_decision(&pending, read_live(&current).as_ref()) {
                Save::Done | Save::Superseded => true,
                Save::Write => {
                    let patch = settled_patch(
                        &pending.token,
                        &pending.seed_hash,
                        current.metadata.resource_version.as_deref(),
                    );
                    match api
                        .patch(&pending.secret, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(namespace = %pending.namespace, secret = %pending.secret, "saved a journalled refresh token");
                            true
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, secret = %pending.secret, "could not save a journalled refresh token yet");
                            false
                        }
                    }
                }
            },
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, secret = %pending.secret, "could not read a Secret to replay the journal");
                false
            }
        };
        if saved {
            if let Err(e) = journal.remove(&id) {
                tracing::warn!(error = %e, "could not remove a replayed journal entry");
            }
        } else {
            remaining.push((id, pending));
        }
    }
    remaining
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn pending(token: &str) -> Pending {
        Pending {
            namespace: "ns".into(),
            secret: "acme-token".into(),
            replaced: "h".into(),
            token: token.into(),
            seed_hash: "s".into(),
        }
    }

    #[test]
    fn entries_survive_reopening_with_the_same_key_and_are_encrypted_0600() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key/key");
        let j = Journal::open(&dir.path().join("j"), &key).unwrap();
        j.put("0f1e-uid", &pending("5Aep-new-token")).unwrap();
        j.put("other/ns:x", &pending("second")).unwrap();
        let file = dir.path().join("j/0f1e-uid.token");
        let raw = fs::read(&file).unwrap();
        assert!(
            !String::from_utf8_lossy(&raw).contains("5Aep-new-token"),
            "sealed"
        );
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

        let reopened = Journal::open(&dir.path().join("j"), &key).unwrap();
        let (entries, unreadable) = reopened.load().unwrap();
        assert!(unreadable.is_empty());
        let ids: Vec<_> = entries
            .iter()
            .map(|(id, p)| (id.as_str(), p.token.as_str()))
            .collect();
        assert_eq!(ids, [("0f1e-uid", "5Aep-new-token"), ("other/ns:x", "second")]);
        reopened.remove("0f1e-uid").unwrap();
        reopened.remove("0f1e-uid").unwrap();
        assert_eq!(reopened.load().unwrap().0.len(), 1);
    }

    #[test]
    fn another_key_cannot_read_entries() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j"), &dir.path().join("k1")).unwrap();
        j.put("uid", &pending("t")).unwrap();
        let other = Journal::open(&dir.path().join("j"), &dir.path().join("k2")).unwrap();
        let (entries, unreadable) = other.load().unwrap();
        assert!(entries.is_empty());
        assert_eq!(unreadable.len(), 1);
    }

    #[test]
    fn a_file_renamed_to_another_connection_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j"), &dir.path().join("k")).unwrap();
        j.put("uid-a", &pending("t")).unwrap();
        fs::rename(dir.path().join("j/uid-a.token"), dir.path().join("j/uid-b.token")).unwrap();
        assert_eq!(j.load().unwrap().1.len(), 1, "the id is authenticated data");
    }
}
