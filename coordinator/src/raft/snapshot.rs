//! The snapshot file format and the directory of snapshot files.
//!
//! Layout (version 1): the magic `DAVITSNAP1\n`; a u32 length and the JSON of the
//! `SnapshotMeta`; then records `(u8 table-name length, table name, u32 key length, key,
//! u32 value length, value)`; a zero name length ends them; last, the SHA-256 of everything
//! before it. A file is written to a temporary name, fsynced and renamed into place, so a crash
//! leaves either the old snapshot or the new one, never half of one.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::SnapshotMeta;
use crate::store::{KeyValue, Table};

const MAGIC: &[u8] = b"DAVITSNAP1\n";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("snapshot I/O error: {0}")]
    Io(#[from] std::io::Error),
}

pub fn encode(meta: &SnapshotMeta, tables: &[(Table, Vec<KeyValue>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    let meta_json = serde_json::to_vec(meta).expect("snapshot meta serializes");
    out.extend_from_slice(&(meta_json.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta_json);
    for (table, rows) in tables {
        let name = table.name().as_bytes();
        for (key, value) in rows {
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
    }
    out.push(0);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

pub struct Decoded {
    pub meta: SnapshotMeta,
    pub records: Vec<(Table, Vec<u8>, Vec<u8>)>,
}

pub fn decode(bytes: &[u8]) -> Result<Decoded, SnapshotError> {
    let corrupt = |what: &str| SnapshotError::Corrupt(what.to_string());
    if bytes.len() < MAGIC.len() + 4 + 32 || !bytes.starts_with(MAGIC) {
        return Err(corrupt("not a davit snapshot (bad magic or too short)"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(corrupt("checksum mismatch"));
    }
    let mut cursor = &body[MAGIC.len()..];
    let mut take = |n: usize| -> Result<&[u8], SnapshotError> {
        if cursor.len() < n {
            return Err(corrupt("truncated record"));
        }
        let (head, tail) = cursor.split_at(n);
        cursor = tail;
        Ok(head)
    };
    let read_u32 = |bytes: &[u8]| u32::from_be_bytes(bytes.try_into().expect("4 bytes")) as usize;
    let meta_len = read_u32(take(4)?);
    let meta: SnapshotMeta = serde_json::from_slice(take(meta_len)?).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
    let mut records = Vec::new();
    loop {
        let name_len = take(1)?[0] as usize;
        if name_len == 0 {
            break;
        }
        let name = std::str::from_utf8(take(name_len)?).map_err(|_| corrupt("table name is not UTF-8"))?;
        let table = Table::from_name(name).ok_or_else(|| SnapshotError::Corrupt(format!("unknown table {name}")))?;
        let key_len = read_u32(take(4)?);
        let key = take(key_len)?.to_vec();
        let value_len = read_u32(take(4)?);
        let value = take(value_len)?.to_vec();
        records.push((table, key, value));
    }
    Ok(Decoded { meta, records })
}

/// The directory holding snapshot files; only the newest is kept.
#[derive(Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        // Leftovers of a crash in the middle of writing are incomplete by definition.
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn file_name(meta: &SnapshotMeta) -> String {
        let index = meta.last_log_id.map(|id| id.index).unwrap_or(0);
        format!("snapshot-{index:020}-{}.bin", meta.snapshot_id)
    }

    /// Write the snapshot durably and make it the current one.
    pub fn save(&self, meta: &SnapshotMeta, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.dir.join(Self::file_name(meta));
        let temporary = path.with_extension("tmp");
        {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            if entry.path() != path && entry.file_name().to_string_lossy().starts_with("snapshot-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(path)
    }

    /// The newest snapshot's bytes, if any.
    pub fn load_current(&self) -> std::io::Result<Option<Vec<u8>>> {
        let mut newest: Option<PathBuf> = None;
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("snapshot-") && name.ends_with(".bin") && newest.as_ref().is_none_or(|n| entry.path() > *n) {
                newest = Some(entry.path());
            }
        }
        match newest {
            Some(path) => {
                let mut bytes = Vec::new();
                std::fs::File::open(path)?.read_to_end(&mut bytes)?;
                Ok(Some(bytes))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let meta = SnapshotMeta { last_log_id: None, last_membership: Default::default(), snapshot_id: "s1".into() };
        let tables = vec![(Table::Users, vec![(b"k".to_vec(), b"v".to_vec())]), (Table::Jobs, vec![])];
        let mut bytes = encode(&meta, &tables);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.meta.snapshot_id, "s1");
        assert_eq!(decoded.records, vec![(Table::Users, b"k".to_vec(), b"v".to_vec())]);
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        assert!(matches!(decode(&bytes), Err(SnapshotError::Corrupt(_))));
    }

    #[test]
    fn only_the_newest_snapshot_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = SnapshotDir::open(dir.path()).unwrap();
        let mut meta = SnapshotMeta { last_log_id: None, last_membership: Default::default(), snapshot_id: "a".into() };
        snapshots.save(&meta, b"first").unwrap();
        meta.snapshot_id = "b".into();
        meta.last_log_id = Some(openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 5));
        snapshots.save(&meta, b"second").unwrap();
        assert_eq!(snapshots.load_current().unwrap().unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
