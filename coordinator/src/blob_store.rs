//! Where the bytes of artifacts and logs live: never in Raft, which carries only their
//! metadata. Every coordinator of a cluster must see the same blob store, so a blob acknowledged
//! on one node is readable on every other: a local directory for a single node (or one
//! directory all nodes mount), and S3-compatible object storage for real clusters.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob key {0:?} is not valid (use lower-case letters, digits, '-', '_', '.', '/')")]
    BadKey(String),
    #[error("blob store I/O error on {key}: {source}")]
    Io { key: String, source: std::io::Error },
}

/// The `[blob_store]` section of a node config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BlobStoreConfig {
    /// A directory. `shared = true` declares that every node of the cluster mounts the same
    /// directory (NFS or similar); a multi-node cluster refuses to start with a directory that
    /// is not declared shared.
    Dir {
        path: PathBuf,
        #[serde(default)]
        shared: bool,
    },
}

#[tonic::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Store `bytes` under `key`; durable when this returns. Writing a key again replaces it.
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), BlobError>;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BlobError>;
    /// Store the contents of a local file under `key` without holding it in memory; durable
    /// when this returns. The file itself is left in place.
    async fn put_file(&self, key: &str, source: &Path) -> Result<(), BlobError>;
    /// Store a local file under `key`, taking it over: durable when this returns, and `source`
    /// is gone afterwards whatever the result. A store on the same filesystem moves the file
    /// instead of copying it.
    async fn adopt_file(&self, key: &str, source: &Path) -> Result<(), BlobError> {
        let stored = self.put_file(key, source).await;
        let _ = tokio::fs::remove_file(source).await;
        stored
    }
    /// Read `key` from byte `offset` on, streaming; `None` if there is no such blob.
    async fn open(&self, key: &str, offset: u64) -> Result<Option<BlobReader>, BlobError>;
    /// Delete `key`; deleting a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), BlobError>;
    async fn exists(&self, key: &str) -> Result<bool, BlobError>;
    /// Keys under `prefix` (for garbage collection).
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError>;
    fn describe(&self) -> String;
}

/// A blob being read: its total length and a reader positioned at the requested offset.
pub struct BlobReader {
    pub total_len: u64,
    pub reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
}

fn check_key(key: &str) -> Result<(), BlobError> {
    let valid_characters = key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_./".contains(&b));
    let valid_parts = key.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if key.is_empty() || key.len() > 512 || !valid_characters || !valid_parts {
        return Err(BlobError::BadKey(key.to_string()));
    }
    Ok(())
}

/// A directory of files, one per key. Writes go to a temporary file that is fsynced and renamed
/// into place, so a crash leaves the old blob or the new one.
pub struct DirBlobStore {
    root: PathBuf,
}

impl DirBlobStore {
    /// Write a blob through a temporary file in its own directory, fsynced and renamed into
    /// place, then fsync the directory: a crash leaves the old blob or the new one.
    fn write_atomically(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<()> {
        let directory = path.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(directory)?;
        let temporary = directory.join(format!(
            ".{}.{}.tmp",
            path.file_name().expect("blob paths have a file name").to_string_lossy(),
            rand::random::<u64>()
        ));
        let mut file = std::fs::File::create(&temporary)?;
        let written = fill(&mut file).and_then(|()| file.sync_all());
        if let Err(error) = written {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(directory)?.sync_all()
    }

    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self { root: root.to_path_buf() })
    }

    fn path(&self, key: &str) -> Result<PathBuf, BlobError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io_error(key: &str) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io { key: key.to_string(), source }
}

#[tonic::async_trait]
impl BlobStore for DirBlobStore {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), BlobError> {
        let path = self.path(key)?;
        let owned_key = key.to_string();
        tokio::task::spawn_blocking(move || Self::write_atomically(&path, |file| std::io::Write::write_all(file, &bytes)))
            .await
            .expect("blob writer panicked")
            .map_err(io_error(&owned_key))
    }

    async fn put_file(&self, key: &str, source: &Path) -> Result<(), BlobError> {
        let path = self.path(key)?;
        let source = source.to_path_buf();
        let owned_key = key.to_string();
        tokio::task::spawn_blocking(move || {
            Self::write_atomically(&path, |file| {
                let mut input = std::fs::File::open(&source)?;
                std::io::copy(&mut input, file).map(|_| ())
            })
        })
        .await
        .expect("blob writer panicked")
        .map_err(io_error(&owned_key))
    }

    async fn adopt_file(&self, key: &str, source: &Path) -> Result<(), BlobError> {
        let path = self.path(key)?;
        let source = source.to_path_buf();
        let owned_key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let adopted = (|| {
                // The contents must be durable before the name that publishes them.
                std::fs::File::open(&source)?.sync_all()?;
                let directory = path.parent().expect("blob paths have a parent");
                std::fs::create_dir_all(directory)?;
                match std::fs::rename(&source, &path) {
                    Ok(()) => std::fs::File::open(directory)?.sync_all(),
                    Err(error) if error.kind() == std::io::ErrorKind::CrossesDevices => Self::write_atomically(&path, |file| {
                        let mut input = std::fs::File::open(&source)?;
                        std::io::copy(&mut input, file).map(|_| ())
                    }),
                    Err(error) => Err(error),
                }
            })();
            let _ = std::fs::remove_file(&source);
            adopted
        })
        .await
        .expect("blob writer panicked")
        .map_err(io_error(&owned_key))
    }

    async fn open(&self, key: &str, offset: u64) -> Result<Option<BlobReader>, BlobError> {
        use tokio::io::AsyncSeekExt;
        let path = self.path(key)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error(key)(error)),
        };
        let total_len = file.metadata().await.map_err(io_error(key))?.len();
        file.seek(std::io::SeekFrom::Start(offset.min(total_len))).await.map_err(io_error(key))?;
        Ok(Some(BlobReader { total_len, reader: Box::new(file) }))
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BlobError> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error(key)(error)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), BlobError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error(key)(error)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        let path = self.path(key)?;
        Ok(tokio::fs::try_exists(&path).await.map_err(io_error(key))?)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        let keys = tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            let mut pending = vec![root.clone()];
            while let Some(directory) = pending.pop() {
                let Ok(entries) = std::fs::read_dir(&directory) else { continue };
                for entry in entries.flatten() {
                    let path = entry.path();
                    if entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false) {
                        pending.push(path);
                    } else if let Ok(relative) = path.strip_prefix(&root) {
                        let key = relative.to_string_lossy().to_string();
                        if !key.rsplit('/').next().unwrap_or("").starts_with('.') && key.starts_with(&prefix) {
                            keys.push(key);
                        }
                    }
                }
            }
            keys.sort();
            keys
        })
        .await
        .expect("blob lister panicked");
        Ok(keys)
    }

    fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn directory_store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirBlobStore::open(dir.path()).unwrap();
        store.put("artifacts/sha256/ab/abcd", b"bytes".to_vec()).await.unwrap();
        assert_eq!(store.get("artifacts/sha256/ab/abcd").await.unwrap().unwrap(), b"bytes");
        assert!(store.exists("artifacts/sha256/ab/abcd").await.unwrap());
        assert_eq!(store.list("artifacts/").await.unwrap(), vec!["artifacts/sha256/ab/abcd".to_string()]);
        let source = dir.path().join("source");
        std::fs::write(&source, b"0123456789").unwrap();
        store.put_file("artifacts/sha256/cd/cdef", &source).await.unwrap();
        let mut reader = store.open("artifacts/sha256/cd/cdef", 4).await.unwrap().unwrap();
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader.reader, &mut rest).await.unwrap();
        assert_eq!((reader.total_len, rest.as_slice()), (10, b"456789".as_slice()));
        assert!(store.open("artifacts/sha256/cd/missing", 0).await.unwrap().is_none());
        store.delete("artifacts/sha256/ab/abcd").await.unwrap();
        store.delete("artifacts/sha256/ab/abcd").await.unwrap();
        assert!(store.get("artifacts/sha256/ab/abcd").await.unwrap().is_none());
        for bad in ["../escape", "a//b", "UPPER", "", "a/./b"] {
            assert!(matches!(store.put(bad, vec![]).await, Err(BlobError::BadKey(_))), "{bad}");
        }
    }

    #[tokio::test]
    async fn adopting_a_file_moves_it_into_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirBlobStore::open(&dir.path().join("blobs")).unwrap();
        let source = dir.path().join("upload.tar.zst");
        std::fs::write(&source, b"compressed").unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&source).unwrap());
        store.adopt_file("artifacts/sha256/ef/ef01", &source).await.unwrap();
        let stored = dir.path().join("blobs/artifacts/sha256/ef/ef01");
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&stored).unwrap()), inode, "moved, not copied");
        assert_eq!(store.get("artifacts/sha256/ef/ef01").await.unwrap().unwrap(), b"compressed");
        assert!(!source.exists(), "the source is taken over");
        // A bad key refuses before touching anything; a missing source is an error.
        std::fs::write(&source, b"again").unwrap();
        assert!(matches!(store.adopt_file("../escape", &source).await, Err(BlobError::BadKey(_))));
        assert!(store.adopt_file("artifacts/sha256/ef/ef02", &dir.path().join("missing")).await.is_err());
        assert!(store.get("artifacts/sha256/ef/ef02").await.unwrap().is_none());
    }
}
