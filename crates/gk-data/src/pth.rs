//! Torch `.pth` files, read without torch and without running code: the zip layout
//! (torch >= 1.6: `<archive>/data.pkl` plus one stored entry `<archive>/data/<key>` per
//! storage) and the legacy stream (torch < 1.6: five pickles in a row, magic number,
//! protocol version, sys_info, the object, the storage keys; then per key in that order an
//! int64 element count and the raw little-endian values).
//!
//! [`TorchFile::open`] decodes the saved object through the code-free decoder in
//! [`crate::pickle`] (tensors become [`TensorRef`]s) and records where each storage lies,
//! reading only the pickles; [`TorchFile::read_f32`] then reads one tensor's values, so a
//! released checkpoint with optimizer state (~1.8 GB) is never held in memory, and what a
//! caller does not read (`optimizer`, `lr_scheduler`) is never read. A tensor claiming more
//! than its storage holds, a storage beyond the end of the file, big-endian data or a
//! compressed entry is an error naming the file and the storage.
//!
//! [`read`]/[`decode`] are the published split files' entry points: the object of a file
//! that must hold plain data (a file with tensor storages is rejected).

use crate::error::{DataError, Result};
use crate::pickle::{self, PickleError, Value};
pub use crate::pickle::{StorageDtype, TensorRef};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)`: the first pickle of a legacy file.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// The object pickle of a checkpoint is a few MB; refuse to inflate anything absurd.
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// Which container a `.pth` file used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Zip,
    Legacy,
}

trait Source: Read + Seek + Send {}
impl<T: Read + Seek + Send> Source for T {}

enum Storages {
    Zip {
        archive: Mutex<zip::ZipArchive<Box<dyn Source>>>,
        /// `<archive>/`, the folder every entry of a torch zip lies in.
        prefix: String,
    },
    Legacy {
        reader: Mutex<Box<dyn Source>>,
        /// key -> (byte offset of its first value, element count from its header)
        at: HashMap<String, (u64, usize)>,
    },
}

/// An open torch file: its object, and its storages read on demand.
pub struct TorchFile {
    path: PathBuf,
    container: Container,
    object: Value,
    storages: Storages,
}

fn format_err(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every tensor of `v`, depth first.
pub fn tensors<'a>(v: &'a Value, out: &mut Vec<&'a TensorRef>) {
    match v {
        Value::Tensor(t) => out.push(t),
        Value::List(items) | Value::Tuple(items) => items.iter().for_each(|i| tensors(i, out)),
        Value::Dict(kv) => kv.iter().for_each(|(k, v)| {
            tensors(k, out);
            tensors(v, out);
        }),
        _ => {}
    }
}

impl TorchFile {
    /// Open a `.pth` file: reads its pickles, not its tensors.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = BufReader::new(File::open(path).map_err(io_err(path))?);
        let len = f.seek(SeekFrom::End(0)).map_err(io_err(path))?;
        f.rewind().map_err(io_err(path))?;
        Self::from_source(Box::new(f), len, path)
    }

    /// A torch file held in memory (`path` names it in errors).
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        let len = bytes.len() as u64;
        Self::from_source(Box::new(Cursor::new(bytes)), len, path)
    }

    fn from_source(mut src: Box<dyn Source>, len: u64, path: &Path) -> Result<Self> {
        let mut magic = [0u8; LEGACY_MAGIC.len()];
        let n = read_up_to(&mut src, &mut magic).map_err(io_err(path))?;
        src.rewind().map_err(io_err(path))?;
        let (container, object, storages) = if magic[..n].starts_with(ZIP_MAGIC) {
            let (object, storages) = open_zip(src, path)?;
            (Container::Zip, object, storages)
        } else if magic[..n] == *LEGACY_MAGIC {
            let (object, storages) = open_legacy(src, len, path)?;
            (Container::Legacy, object, storages)
        } else {
            return Err(format_err(path, "not a torch .pth file: neither a zip archive (PK\\x03\\x04) nor the legacy pickle magic number"));
        };
        Ok(Self {
            path: path.to_path_buf(),
            container,
            object,
            storages,
        })
    }

    pub fn container(&self) -> Container {
        self.container
    }

    /// The saved object (a checkpoint's dict: `model`, `optimizer`, `args`, ...).
    pub fn object(&self) -> &Value {
        &self.object
    }

    /// Number of storages the container holds.
    pub fn storage_count(&self) -> usize {
        match &self.storages {
            Storages::Zip { archive, prefix } => archive.lock().map_or(0, |a| {
                let data = format!("{prefix}data/");
                a.file_names_raw()
                    .filter(|n| n.starts_with(data.as_bytes()) && n.len() > data.len())
                    .count()
            }),
            Storages::Legacy { at, .. } => at.len(),
        }
    }

    fn err(&self, t: &TensorRef, msg: impl std::fmt::Display) -> DataError {
        format_err(&self.path, format!("storage `{}`: {msg}", t.storage))
    }

    /// The raw bytes of storage elements `[start, end)` of `t`'s storage; the storage's
    /// real size is checked before anything is allocated.
    fn storage_bytes(&self, t: &TensorRef, start: usize, end: usize) -> Result<Vec<u8>> {
        let es = t.dtype.size() as u64;
        let (lo, hi) = match (start as u64)
            .checked_mul(es)
            .zip((end as u64).checked_mul(es))
        {
            Some(r) => r,
            None => return Err(self.err(t, "byte range overflows")),
        };
        let poisoned = || self.err(t, "a reader panicked earlier");
        match &self.storages {
            Storages::Zip { archive, prefix } => {
                let mut a = archive.lock().map_err(|_| poisoned())?;
                let name = format!("{prefix}data/{}", t.storage);
                let mut entry = a.by_name_seek(&name).map_err(|e| {
                    self.err(t, format!("entry {name}: {e} (truncated download, or a storage compressed by a tool other than torch?)"))
                })?;
                if entry.size() < hi {
                    return Err(self.err(
                        t,
                        format!(
                            "entry {name} has {} bytes; the tensor needs bytes {lo}..{hi}",
                            entry.size()
                        ),
                    ));
                }
                let mut buf = vec![0u8; (hi - lo) as usize];
                entry
                    .seek(SeekFrom::Start(lo))
                    .map_err(io_err(&self.path))?;
                entry
                    .read_exact(&mut buf)
                    .map_err(|e| self.err(t, format!("reading entry {name}: {e}")))?;
                Ok(buf)
            }
            Storages::Legacy { reader, at } => {
                let &(data, numel) = at
                    .get(&t.storage)
                    .ok_or_else(|| self.err(t, "not among the file's storage keys"))?;
                if end > numel {
                    return Err(
                        self.err(t, format!("holds {numel} elements; the tensor needs {end}"))
                    );
                }
                let mut buf = vec![0u8; (hi - lo) as usize];
                let mut r = reader.lock().map_err(|_| poisoned())?;
                r.seek(SeekFrom::Start(data + lo))
                    .map_err(io_err(&self.path))?;
                r.read_exact(&mut buf).map_err(|e| {
                    self.err(
                        t,
                        format!("reading {} bytes at {}: {e}", buf.len(), data + lo),
                    )
                })?;
                Ok(buf)
            }
        }
    }

    /// One tensor's values as f32, in C order (any storage dtype; integers and f64 are
    /// converted).
    pub fn read_f32(&self, t: &TensorRef) -> Result<Vec<f32>> {
        let n = t.numel();
        let end = t
            .extent()
            .ok_or_else(|| self.err(t, "tensor extent overflows"))?;
        if end > t.storage_numel {
            return Err(self.err(
                t,
                format!(
                    "a tensor of size {:?}, stride {:?} at offset {} reaches element {end}, but the storage holds {}",
                    t.shape, t.stride, t.offset, t.storage_numel
                ),
            ));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes = self.storage_bytes(t, t.offset, end)?;
        let values = decode_f32(t.dtype, &bytes);
        if is_contiguous(&t.shape, &t.stride) {
            return Ok(values);
        }
        // strided: walk the index in C order
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..n {
            let at: usize = idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum();
            out.push(values[at]);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(out)
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut want = 1;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != want {
            return false;
        }
        want *= n;
    }
    true
}

fn decode_f32(dtype: StorageDtype, b: &[u8]) -> Vec<f32> {
    macro_rules! each {
        ($n:expr, $f:expr) => {
            b.chunks_exact($n)
                .map(|c| $f(c.try_into().expect("chunks_exact")))
                .collect()
        };
    }
    match dtype {
        StorageDtype::F32 => each!(4, f32::from_le_bytes),
        StorageDtype::F64 => each!(8, |c| f64::from_le_bytes(c) as f32),
        StorageDtype::F16 => each!(2, |c| half::f16::from_le_bytes(c).to_f32()),
        StorageDtype::BF16 => each!(2, |c| half::bf16::from_le_bytes(c).to_f32()),
        StorageDtype::I64 => each!(8, |c| i64::from_le_bytes(c) as f32),
        StorageDtype::I32 => each!(4, |c| i32::from_le_bytes(c) as f32),
        StorageDtype::I16 => each!(2, |c| f32::from(i16::from_le_bytes(c))),
        StorageDtype::I8 => b.iter().map(|&c| f32::from(c as i8)).collect(),
        StorageDtype::U8 | StorageDtype::Bool => b.iter().map(|&c| f32::from(c)).collect(),
    }
}

fn open_zip(src: Box<dyn Source>, path: &Path) -> Result<(Value, Storages)> {
    let mut zip = zip::ZipArchive::new(src).map_err(|e| {
        format_err(
            path,
            format!("broken zip container (truncated download?): {e}"),
        )
    })?;
    let name = zip
        .file_names_raw()
        .find(|n| *n == b"data.pkl" || n.ends_with(b"/data.pkl"))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .ok_or_else(|| {
            format_err(
                path,
                "zip container has no data.pkl entry: not a torch.save file",
            )
        })?;
    let prefix = name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut e) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        e.read_to_string(&mut order).ok();
        if order.trim() == "big" {
            return Err(format_err(
                path,
                "saved on a big-endian machine (byteorder: big): not supported",
            ));
        }
    }
    let pkl = {
        let mut entry = zip
            .by_name(&name)
            .map_err(|e| format_err(path, format!("{name}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(format_err(
                path,
                format!("{name} claims {} bytes", entry.size()),
            ));
        }
        let mut out = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut out)
            .map_err(|e| format_err(path, format!("{name}: {e}")))?;
        out
    };
    let object = pickle::loads(&pkl).map_err(|e| format_err(path, format!("{name}: {e}")))?;
    Ok((
        object,
        Storages::Zip {
            archive: Mutex::new(zip),
            prefix,
        },
    ))
}

/// The four pickles after a legacy file's magic number, read in growing chunks until they
/// parse (the storages that follow are not read).
fn legacy_pickles(src: &mut dyn Source, len: u64, path: &Path) -> Result<(Vec<Value>, u64)> {
    let mut buf = Vec::new();
    let mut want: u64 = 1 << 20;
    loop {
        let have = buf.len() as u64;
        if want > have {
            src.seek(SeekFrom::Start(have)).map_err(io_err(path))?;
            Read::take(&mut *src, want - have)
                .read_to_end(&mut buf)
                .map_err(io_err(path))?;
        }
        let whole = buf.len() as u64 >= len;
        let mut at = LEGACY_MAGIC.len();
        let mut values = Vec::with_capacity(4);
        let mut parsed = || -> std::result::Result<(), (PickleError, usize)> {
            for _ in 0..4 {
                let (v, used) = pickle::load_prefix(&buf[at..]).map_err(|e| (e, at))?;
                at += used;
                values.push(v);
            }
            Ok(())
        };
        match parsed() {
            Ok(()) => return Ok((values, at as u64)),
            Err((PickleError::Truncated { .. }, _)) if !whole && want < MAX_PICKLE_BYTES => {
                want *= 4;
            }
            Err((e, at)) => {
                let what =
                    ["protocol version", "sys_info", "object", "storage keys"][values.len().min(3)];
                return Err(format_err(
                    path,
                    format!("legacy container, {what} pickle at byte {at}: {e}"),
                ));
            }
        }
    }
}

fn open_legacy(mut src: Box<dyn Source>, len: u64, path: &Path) -> Result<(Value, Storages)> {
    let (mut pickles, mut at) = legacy_pickles(&mut *src, len, path)?;
    let keys = pickles.pop().expect("four pickles");
    let object = pickles.pop().expect("four pickles");
    match &pickles[0] {
        Value::Int(1001) => {}
        v => {
            return Err(format_err(
                path,
                format!("legacy container: protocol version {v:?}, expected 1001"),
            ))
        }
    }
    let Value::List(keys) = keys else {
        return Err(format_err(
            path,
            format!(
                "legacy container: storage keys are a {}, not a list",
                keys.type_name()
            ),
        ));
    };
    // element sizes from the tensors that use each storage
    let mut refs = Vec::new();
    tensors(&object, &mut refs);
    let dtype: HashMap<&str, StorageDtype> =
        refs.iter().map(|t| (t.storage.as_str(), t.dtype)).collect();
    let mut offsets = HashMap::with_capacity(keys.len());
    for k in &keys {
        let Some(key) = k.as_str() else {
            return Err(format_err(
                path,
                "legacy container: a storage key is not a string",
            ));
        };
        let Some(dt) = dtype.get(key) else {
            return Err(format_err(
                path,
                format!("legacy container: storage `{key}` is used by no tensor, so its element size (and where the next one starts) is unknown"),
            ));
        };
        let mut head = [0u8; 8];
        src.seek(SeekFrom::Start(at)).map_err(io_err(path))?;
        src.read_exact(&mut head).map_err(|_| {
            format_err(path, format!("legacy container: truncated file: storage `{key}`'s header at byte {at} is past the end ({len} bytes)"))
        })?;
        let numel = u64::from_le_bytes(head);
        let data = at + 8;
        let end = numel
            .checked_mul(dt.size() as u64)
            .and_then(|b| b.checked_add(data))
            .filter(|&e| e <= len)
            .ok_or_else(|| {
                format_err(path, format!("legacy container: truncated file: storage `{key}` claims {numel} elements from byte {data}, past the end ({len} bytes)"))
            })?;
        offsets.insert(key.to_string(), (data, numel as usize));
        at = end;
    }
    for t in &refs {
        if let Some(&(_, numel)) = offsets.get(&t.storage) {
            if numel != t.storage_numel {
                return Err(format_err(path, format!("legacy container: storage `{}` holds {numel} elements, its persistent id says {}", t.storage, t.storage_numel)));
            }
        }
    }
    Ok((
        object,
        Storages::Legacy {
            reader: Mutex::new(src),
            at: offsets,
        },
    ))
}

/// A state dict (`OrderedDict` of name -> tensor) as `(name, tensor)` in file order.
pub fn state_dict(v: &Value) -> std::result::Result<Vec<(String, TensorRef)>, String> {
    let Value::Dict(items) = v else {
        return Err(format!(
            "a state dict is a dict of tensors, not a {}",
            v.type_name()
        ));
    };
    items
        .iter()
        .map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Tensor(t)) => Ok((k.clone(), t.clone())),
            (Value::Str(k), v) => Err(format!("`{k}` is a {}, not a tensor", v.type_name())),
            (k, _) => Err(format!("a key is a {}, not a string", k.type_name())),
        })
        .collect()
}

fn plain(file: TorchFile) -> Result<(Value, Container)> {
    match file.storage_count() {
        0 => Ok((file.object, file.container)),
        n => Err(format_err(
            &file.path,
            format!("holds {n} tensor storages: a split file is a plain list"),
        )),
    }
}

/// Read a `.pth` split file's object (plain data: no tensors).
pub fn read(path: &Path) -> Result<(Value, Container)> {
    plain(TorchFile::open(path)?)
}

/// Decode `.pth` split-file bytes (`path` names the file in errors).
pub fn decode(bytes: &[u8], path: &Path) -> Result<(Value, Container)> {
    plain(TorchFile::from_bytes(bytes.to_vec(), path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storages_of_every_dtype_decode_little_endian() {
        let f16 = [0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00];
        assert_eq!(
            decode_f32(StorageDtype::F16, &f16),
            vec![1.0, -2.0, 65504.0, 5.960_464_5e-8]
        );
        assert_eq!(
            decode_f32(StorageDtype::BF16, &[0x80, 0x3f, 0x20, 0xc1]),
            vec![1.0, -10.0]
        );
        assert_eq!(
            decode_f32(StorageDtype::F64, &(-0.5f64).to_le_bytes()),
            vec![-0.5]
        );
        assert_eq!(
            decode_f32(StorageDtype::I64, &(-7i64).to_le_bytes()),
            vec![-7.0]
        );
        assert_eq!(decode_f32(StorageDtype::I8, &[0xff, 3]), vec![-1.0, 3.0]);
        assert_eq!(decode_f32(StorageDtype::Bool, &[1, 0]), vec![1.0, 0.0]);
    }

    #[test]
    fn contiguity_ignores_unit_dimensions() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[2, 1, 3], &[3, 7, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[], &[]));
    }
}
