//! Torch `.pth` containers, read without torch: the zip layout (torch >= 1.6, one
//! `<archive>/data.pkl` entry) and the legacy stream (torch < 1.6: five pickles in a row,
//! magic number, protocol version, sys_info, the object, storage keys).
//!
//! Both give the one saved object as a [`Value`] through the code-free decoder in
//! [`crate::pickle`]. Published split files are plain lists, so a file that holds tensor
//! storages is rejected with a clear error rather than half-read.

use crate::error::{DataError, Result};
use crate::pickle::{self, Value};
use std::io::Read;
use std::path::Path;

/// `pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)`: the first pickle of a legacy file.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// A split list's pickle is a few MB at most; refuse to inflate anything absurd.
const MAX_PICKLE_BYTES: u64 = 4 << 30;

/// Which container a `.pth` file used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Zip,
    Legacy,
}

fn format_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Read a `.pth` file's object.
pub fn read(path: &Path) -> Result<(Value, Container)> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes, path)
}

/// Decode `.pth` bytes (`path` names the file in errors).
pub fn decode(bytes: &[u8], path: &Path) -> Result<(Value, Container)> {
    if bytes.starts_with(ZIP_MAGIC) {
        let pkl = zip_data_pkl(bytes, path)?;
        let v = pickle::loads(&pkl).map_err(|e| format_err(path, format!("data.pkl: {e}")))?;
        Ok((v, Container::Zip))
    } else if bytes.starts_with(LEGACY_MAGIC) {
        Ok((legacy_object(bytes, path)?, Container::Legacy))
    } else {
        Err(format_err(path, "not a torch .pth file: neither a zip archive (PK\\x03\\x04) nor the legacy pickle magic number"))
    }
}

fn zip_data_pkl(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| {
        format_err(
            path,
            format!("broken zip container (truncated download?): {e}"),
        )
    })?;
    let index = zip
        .file_names_raw()
        .position(|n| n == b"data.pkl" || n.ends_with(b"/data.pkl"))
        .ok_or_else(|| {
            format_err(
                path,
                "zip container has no data.pkl entry: not a torch.save file",
            )
        })?;
    let name = "data.pkl";
    let mut entry = zip
        .by_index(index)
        .map_err(|e| format_err(path, format!("{name}: {e}")))?;
    if entry.size() > MAX_PICKLE_BYTES {
        return Err(format_err(
            path,
            format!("{name} claims {} bytes", entry.size()),
        ));
    }
    let mut out = Vec::with_capacity(entry.size().min(bytes.len() as u64) as usize);
    entry
        .read_to_end(&mut out)
        .map_err(|e| format_err(path, format!("{name}: {e}")))?;
    Ok(out)
}

fn legacy_object(bytes: &[u8], path: &Path) -> Result<Value> {
    let mut at = LEGACY_MAGIC.len();
    let mut next = |what: &str| -> Result<Value> {
        let (v, used) = pickle::load_prefix(&bytes[at..]).map_err(|e| {
            format_err(
                path,
                format!("legacy container, {what} pickle at byte {at}: {e}"),
            )
        })?;
        at += used;
        Ok(v)
    };
    match next("protocol version")? {
        Value::Int(1001) => {}
        v => {
            return Err(format_err(
                path,
                format!("legacy container: protocol version {v:?}, expected 1001"),
            ))
        }
    }
    next("sys_info")?;
    let object = next("object")?;
    match next("storage keys")? {
        Value::List(keys) if keys.is_empty() => Ok(object),
        Value::List(keys) => Err(format_err(
            path,
            format!(
                "holds {} tensor storages: a split file is a plain list",
                keys.len()
            ),
        )),
        v => Err(format_err(
            path,
            format!(
                "legacy container: storage keys are a {}, not a list",
                v.type_name()
            ),
        )),
    }
}
