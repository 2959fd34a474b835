//! A pickle decoder that never executes code, for published split files and torch
//! checkpoints.
//!
//! It decodes the opcodes of protocols 0-5 that plain data uses (lists, tuples, dicts,
//! strings, bytes, numbers), numpy arrays and scalars (the Flickr30k split files), and the
//! tensor references of a `torch.save` file: persistent ids naming a storage, and
//! `torch._utils._rebuild_tensor_v2` placing a tensor in one ([`TensorRef`]; the values
//! stay in the container, read by [`crate::pth`]). A file may name a global only from a
//! fixed allow-list (numpy's array, dtype and scalar reconstructors, `_codecs.encode` for
//! protocol-2 bytes, `collections.OrderedDict`, torch's typed storages and tensor
//! rebuilders, `argparse.Namespace`); every other global is an error that names it, raised
//! before anything could be called.
//! Objects are built in an arena (memo entries share them, as in Python) and turned into an
//! owned [`Value`] tree at the end, with a depth and size budget so that a hostile file
//! (a recursive list, exponential sharing, a length field larger than the file) is an error,
//! never a hang or an out-of-memory.
//!
//! Python 2 `str` (opcodes `S`, `T`, `U`, as in the original `refer` pickles) is decoded as
//! UTF-8 when it is valid UTF-8, and as Latin-1 otherwise.

use std::collections::HashMap;

/// A decoded pickle object.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Keys and values in insertion order.
    Dict(Vec<(Value, Value)>),
    Array(NdArray),
    /// A torch tensor: where its values lie in a storage of the container.
    Tensor(TensorRef),
}

/// The element type of a torch storage (`torch.FloatStorage` and the like).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    /// The dtype of torch's typed storage class `name` (`FloatStorage`, ...).
    fn of_storage(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

/// A tensor of a torch file: `shape` elements at `offset` and `stride` (in elements) of
/// the storage `storage` (its key in the container), which holds `storage_numel` elements
/// of `dtype`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: String,
    pub dtype: StorageDtype,
    /// The device tag the file was saved from (`cpu`, `cuda:0`): recorded, not used.
    pub location: String,
    pub storage_numel: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// One past the last storage element the tensor touches (`offset` when it is empty),
    /// or `None` on overflow.
    pub fn extent(&self) -> Option<usize> {
        if self.shape.contains(&0) {
            return Some(self.offset);
        }
        self.shape
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset + 1, |end, (&n, &s)| {
                end.checked_add((n - 1).checked_mul(s)?)
            })
    }
}

/// A numeric numpy array, values widened to f64, C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    /// numpy's type code without byte order, e.g. `f4`, `i8`.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Why a pickle could not be decoded. Positions are byte offsets into the pickle.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("byte {pos}: the data ends in the middle of a pickle (truncated file?)")]
    Truncated { pos: usize },
    #[error("byte {pos}: opcode 0x{op:02x} is not supported by this reader ({what})")]
    Unsupported {
        pos: usize,
        op: u8,
        what: &'static str,
    },
    #[error("byte {pos}: global `{module}.{name}` is not allowed (this reader never calls code named by a file; it knows plain data, numpy arrays, torch tensors and argparse.Namespace)")]
    ForbiddenGlobal {
        pos: usize,
        module: String,
        name: String,
    },
    #[error("byte {pos}: {msg}")]
    Malformed { pos: usize, msg: String },
}

type Result<T> = std::result::Result<T, PickleError>;

/// Nesting deeper than this is rejected (real split files nest 4 deep).
const MAX_DEPTH: usize = 256;

impl Value {
    /// A short name of the variant, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Array(_) => "numpy array",
            Value::Tensor(_) => "tensor",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Numbers (int, float, bool) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }

    /// The items of a list or tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// Look a string key up in a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// JSON for keeping leftover fields: tuples become arrays, dicts with string keys
    /// objects (other dicts arrays of pairs), bytes a Latin-1 string, non-finite floats null,
    /// arrays nested lists.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::None => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Bytes(b) => J::String(b.iter().map(|&c| char::from(c)).collect()),
            Value::List(v) | Value::Tuple(v) => J::Array(v.iter().map(Value::to_json).collect()),
            Value::Dict(items) => {
                let object: Option<serde_json::Map<String, J>> = items
                    .iter()
                    .map(|(k, v)| Some((k.as_str()?.to_string(), v.to_json())))
                    .collect();
                match object {
                    Some(o) => J::Object(o),
                    None => J::Array(
                        items
                            .iter()
                            .map(|(k, v)| J::Array(vec![k.to_json(), v.to_json()]))
                            .collect(),
                    ),
                }
            }
            Value::Array(a) => array_json(&a.shape, &a.data),
            Value::Tensor(t) => J::String(format!("tensor {:?} {:?}", t.dtype, t.shape)),
        }
    }
}

fn array_json(shape: &[usize], data: &[f64]) -> serde_json::Value {
    let num = |f: f64| {
        serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number)
    };
    match shape {
        [] => data.first().map_or(serde_json::Value::Null, |&f| num(f)),
        [_] => serde_json::Value::Array(data.iter().map(|&f| num(f)).collect()),
        [n, rest @ ..] => {
            let step = rest.iter().product::<usize>();
            serde_json::Value::Array(
                (0..*n)
                    .map(|i| array_json(rest, &data[i * step..(i + 1) * step]))
                    .collect(),
            )
        }
    }
}

/// Decode one pickle that fills the whole of `data` (trailing bytes are an error).
pub fn loads(data: &[u8]) -> Result<Value> {
    let (v, used) = load_prefix(data)?;
    if used != data.len() {
        return Err(PickleError::Malformed {
            pos: used,
            msg: format!("{} bytes after the pickle's STOP", data.len() - used),
        });
    }
    Ok(v)
}

/// Decode the pickle at the start of `data`; returns it and the bytes it used (a legacy
/// torch file is several pickles in a row).
pub fn load_prefix(data: &[u8]) -> Result<(Value, usize)> {
    let mut m = Machine {
        data,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let top = m.run()?;
    // Every node can appear once per path; a budget proportional to the input bounds what
    // sharing may expand to (real files: one node per few bytes).
    let mut budget = 64 * data.len() + 1024;
    let v = m.materialize(top, 0, &mut budget)?;
    Ok((v, m.pos))
}

type Id = usize;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Callable {
    Reconstruct,
    NdArrayType,
    Dtype,
    Scalar,
    CodecsEncode,
    OrderedDict,
    Storage(StorageDtype),
    RebuildTensor,
    RebuildParameter,
    Namespace,
}

#[derive(Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Callable),
    Dtype {
        code: String,
        big_endian: bool,
    },
    /// Made by `_reconstruct`, filled by BUILD.
    Array(Option<NdArray>),
    /// A persistent id `('storage', <Type>Storage, key, location, numel[, None])`.
    Storage {
        key: String,
        dtype: StorageDtype,
        location: String,
        numel: usize,
    },
    Tensor(TensorRef),
    /// `argparse.Namespace()`, filled by BUILD; read as a dict.
    Namespace(Vec<(Id, Id)>),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

fn allowed(module: &str, name: &str) -> Option<Callable> {
    let numpy_ma = matches!(module, "numpy.core.multiarray" | "numpy._core.multiarray");
    match (module, name) {
        (_, "_reconstruct") if numpy_ma => Some(Callable::Reconstruct),
        (_, "scalar") if numpy_ma => Some(Callable::Scalar),
        ("numpy", "ndarray") => Some(Callable::NdArrayType),
        ("numpy", "dtype") => Some(Callable::Dtype),
        ("_codecs", "encode") => Some(Callable::CodecsEncode),
        ("collections", "OrderedDict") => Some(Callable::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Callable::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Callable::RebuildParameter),
        ("torch", _) => StorageDtype::of_storage(name).map(Callable::Storage),
        ("argparse", "Namespace") => Some(Callable::Namespace),
        _ => None,
    }
}

/// Python 2 `str` bytes: UTF-8 when valid, else Latin-1.
fn py2_str(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => e.into_bytes().iter().map(|&c| char::from(c)).collect(),
    }
}

impl Machine<'_> {
    fn malformed<T>(&self, msg: impl Into<String>) -> Result<T> {
        Err(PickleError::Malformed {
            pos: self.pos,
            msg: msg.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if n > self.data.len() - self.pos {
            return Err(PickleError::Truncated { pos: self.pos });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn take_len(&mut self, n: u64) -> Result<&[u8]> {
        let n = usize::try_from(n).map_err(|_| PickleError::Truncated { pos: self.pos })?;
        self.take(n)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    /// A text line (protocol 0 argument), without its newline.
    fn line(&mut self) -> Result<&[u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or(PickleError::Truncated { pos: self.pos })?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn line_str(&mut self) -> Result<String> {
        let l = self.line()?;
        std::str::from_utf8(l)
            .map(str::to_string)
            .map_err(|_| PickleError::Malformed {
                pos: self.pos,
                msg: "argument line is not text".into(),
            })
    }

    fn push(&mut self, n: Node) {
        self.arena.push(n);
        self.stack.push(self.arena.len() - 1);
    }

    fn pop(&mut self) -> Result<Id> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return self.malformed("pop across a MARK");
        }
        match self.stack.pop() {
            Some(id) => Ok(id),
            None => self.malformed("stack underflow"),
        }
    }

    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(&id) if self.marks.last().is_none_or(|&m| m < self.stack.len()) => Ok(id),
            _ => self.malformed("stack underflow"),
        }
    }

    /// Everything pushed since the last MARK (which is removed).
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        match self.marks.pop() {
            Some(m) => Ok(self.stack.split_off(m)),
            None => self.malformed("no MARK on the stack"),
        }
    }

    /// The memo key argument of PUT/GET (text), BINPUT/BINGET (u8), LONG_BINPUT/LONG_BINGET
    /// (u32) or MEMOIZE (the next free key).
    fn memo_key(&mut self, op: u8, at: usize) -> Result<u64> {
        Ok(match op {
            b'p' | b'g' => {
                let s = self.line_str()?;
                s.parse().map_err(|_| PickleError::Malformed {
                    pos: at,
                    msg: format!("bad memo key `{s}`"),
                })?
            }
            b'q' | b'h' => u64::from(self.u8()?),
            b'r' | b'j' => u64::from(u32::from_le_bytes(self.le()?)),
            _ => self.memo.len() as u64,
        })
    }

    fn memo_get(&mut self, key: u64) -> Result<()> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => self.malformed(format!("memo key {key} was never stored")),
        }
    }

    fn memo_put(&mut self, key: u64) -> Result<()> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn str_of(&self, id: Id) -> Option<&str> {
        match &self.arena[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    fn append(&mut self, list: Id, items: Vec<Id>) -> Result<()> {
        match &mut self.arena[list] {
            Node::List(v) => {
                v.extend(items);
                Ok(())
            }
            _ => self.malformed("APPEND to something that is not a list"),
        }
    }

    fn set_items(&mut self, dict: Id, kv: Vec<Id>) -> Result<()> {
        if !kv.len().is_multiple_of(2) {
            return self.malformed("SETITEMS with an odd number of items");
        }
        match &mut self.arena[dict] {
            Node::Dict(v) => {
                v.extend(kv.chunks(2).map(|c| (c[0], c[1])));
                Ok(())
            }
            _ => self.malformed("SETITEM on something that is not a dict"),
        }
    }

    fn global(&mut self, module: &str, name: &str, at: usize) -> Result<()> {
        match allowed(module, name) {
            Some(c) => {
                self.push(Node::Global(c));
                Ok(())
            }
            None => Err(PickleError::ForbiddenGlobal {
                pos: at,
                module: module.to_string(),
                name: name.to_string(),
            }),
        }
    }

    fn int_text(&mut self, allow_bool: bool) -> Result<()> {
        let s = self.line_str()?;
        let t = s.trim_end_matches('L');
        if allow_bool && (t == "00" || t == "01") {
            self.push(Node::Bool(t == "01"));
            return Ok(());
        }
        match t.parse::<i64>() {
            Ok(i) => {
                self.push(Node::Int(i));
                Ok(())
            }
            Err(_) => self.malformed(format!("integer `{s}` is not a 64-bit integer")),
        }
    }

    fn long_bytes(&mut self, n: u64) -> Result<()> {
        if n > 8 {
            return self.malformed(format!("{n}-byte integer does not fit 64 bits"));
        }
        let b = self.take_len(n)?;
        let mut v: i64 = 0;
        for (i, &c) in b.iter().enumerate() {
            v |= i64::from(c) << (8 * i);
        }
        if n > 0 && n < 8 && b[n as usize - 1] & 0x80 != 0 {
            v -= 1i64 << (8 * n); // two's complement sign
        }
        self.push(Node::Int(v));
        Ok(())
    }

    fn run(&mut self) -> Result<Id> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                b'(' => self.marks.push(self.stack.len()),
                b'.' => {
                    if !self.marks.is_empty() {
                        return self.malformed("STOP with an open MARK");
                    }
                    return match self.stack.as_slice() {
                        [id] => Ok(*id),
                        _ => self.malformed(format!(
                            "STOP with {} objects on the stack, not 1",
                            self.stack.len()
                        )),
                    };
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(id);
                }
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return self.malformed(format!("pickle protocol {v} is newer than 5"));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                // --- scalars
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'I' => self.int_text(true)?,
                b'L' => self.int_text(false)?,
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Node::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Node::Int(i64::from(v)));
                }
                0x8a => {
                    let n = self.u8()?;
                    self.long_bytes(u64::from(n))?;
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.le()?);
                    self.long_bytes(u64::try_from(n).unwrap_or(u64::MAX))?;
                }
                b'F' => {
                    let s = self.line_str()?;
                    match s.trim().parse::<f64>() {
                        Ok(f) => self.push(Node::Float(f)),
                        Err(_) => return self.malformed(format!("float `{s}` does not parse")),
                    }
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Node::Float(v));
                }
                // --- strings and bytes
                b'S' => {
                    let l = self.line()?.to_vec();
                    let s = unquote_py2(&l).ok_or(PickleError::Malformed {
                        pos: at,
                        msg: "STRING argument is not a quoted literal".into(),
                    })?;
                    self.push(Node::Str(py2_str(s)));
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.le()?);
                    let b = self
                        .take_len(u64::try_from(n).unwrap_or(u64::MAX))?
                        .to_vec();
                    self.push(Node::Str(py2_str(b)));
                }
                b'U' => {
                    let n = self.u8()?;
                    let b = self.take(usize::from(n))?.to_vec();
                    self.push(Node::Str(py2_str(b)));
                }
                b'V' => {
                    let l = self.line()?.to_vec();
                    let s = raw_unicode_escape(&l).ok_or(PickleError::Malformed {
                        pos: at,
                        msg: "bad raw-unicode-escape text".into(),
                    })?;
                    self.push(Node::Str(s));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => u64::from(u32::from_le_bytes(self.le()?)),
                        0x8c => u64::from(self.u8()?),
                        _ => u64::from_le_bytes(self.le()?),
                    };
                    let b = self.take_len(n)?;
                    match std::str::from_utf8(b) {
                        Ok(s) => {
                            let s = s.to_string();
                            self.push(Node::Str(s));
                        }
                        Err(_) => {
                            return Err(PickleError::Malformed {
                                pos: at,
                                msg: "unicode string is not UTF-8".into(),
                            })
                        }
                    }
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => u64::from(u32::from_le_bytes(self.le()?)),
                        b'C' => u64::from(self.u8()?),
                        _ => u64::from_le_bytes(self.le()?),
                    };
                    let b = self.take_len(n)?.to_vec();
                    self.push(Node::Bytes(b));
                }
                // --- containers
                b']' => self.push(Node::List(Vec::new())),
                b')' => self.push(Node::Tuple(Vec::new())),
                b'}' => self.push(Node::Dict(Vec::new())),
                0x8f => self.push(Node::List(Vec::new())), // EMPTY_SET: read as a list
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items));
                }
                b't' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push(if op == b't' {
                        Node::Tuple(items)
                    } else {
                        Node::List(items)
                    });
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items));
                }
                b'd' => {
                    let kv = self.pop_mark()?;
                    self.push(Node::Dict(Vec::new()));
                    let d = self.top()?;
                    self.set_items(d, kv)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![item])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![k, v])?;
                }
                b'u' => {
                    let kv = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, kv)?;
                }
                // --- memo
                b'p' | b'q' | b'r' | 0x94 => {
                    let k = self.memo_key(op, at)?;
                    self.memo_put(k)?;
                }
                b'g' | b'h' | b'j' => {
                    let k = self.memo_key(op, at)?;
                    self.memo_get(k)?;
                }
                // --- globals and reconstruction (allow-listed only)
                b'c' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    self.global(&module, &name, at)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (
                        self.str_of(module).map(str::to_string),
                        self.str_of(name).map(str::to_string),
                    ) else {
                        return self.malformed("STACK_GLOBAL needs two strings");
                    };
                    self.global(&m, &n, at)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let node = self.reduce(f, args)?;
                    self.push(node);
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.top()?;
                    self.build(obj, state)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let node = self.storage(pid)?;
                    self.push(node);
                }
                b'P' => {
                    return Err(PickleError::Unsupported {
                        pos: at,
                        op,
                        what: "text persistent id (torch writes binary ones)",
                    })
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let namespace = matches!(self.arena[cls], Node::Global(Callable::Namespace))
                        && self.seq(args).is_some_and(<[Id]>::is_empty);
                    if !namespace {
                        return Err(PickleError::Unsupported {
                            pos: at,
                            op,
                            what: "object instantiation other than argparse.Namespace()",
                        });
                    }
                    self.push(Node::Namespace(Vec::new()));
                }
                b'i' => {
                    // INST names its class inline: refuse it by name like GLOBAL does
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    self.global(&module, &name, at)?;
                    return Err(PickleError::Unsupported {
                        pos: at,
                        op,
                        what: "object instantiation",
                    });
                }
                b'o' | 0x92 => {
                    return Err(PickleError::Unsupported {
                        pos: at,
                        op,
                        what: "object instantiation",
                    })
                }
                0x82..=0x84 => {
                    return Err(PickleError::Unsupported {
                        pos: at,
                        op,
                        what: "extension registry",
                    })
                }
                0x97 | 0x98 => {
                    return Err(PickleError::Unsupported {
                        pos: at,
                        op,
                        what: "out-of-band buffer",
                    })
                }
                _ => {
                    return Err(PickleError::Unsupported {
                        pos: at,
                        op,
                        what: "unknown opcode",
                    })
                }
            }
        }
    }

    fn seq(&self, id: Id) -> Option<&[Id]> {
        match &self.arena[id] {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    fn reduce(&mut self, f: Id, args: Id) -> Result<Node> {
        let Node::Global(c) = self.arena[f] else {
            return self.malformed("REDUCE on something that is not an allowed callable");
        };
        let Some(args) = self.seq(args).map(<[Id]>::to_vec) else {
            return self.malformed("REDUCE arguments are not a tuple");
        };
        match c {
            Callable::Reconstruct => Ok(Node::Array(None)),
            Callable::Dtype => match args.first().and_then(|&a| self.str_of(a)) {
                Some(code) => Ok(Node::Dtype {
                    code: code.to_string(),
                    big_endian: false,
                }),
                None => self.malformed("numpy.dtype needs a type code"),
            },
            Callable::CodecsEncode => {
                let Some(s) = args.first().and_then(|&a| self.str_of(a)) else {
                    return self.malformed("_codecs.encode needs a string");
                };
                let bytes: Option<Vec<u8>> =
                    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                match bytes {
                    Some(b) => Ok(Node::Bytes(b)),
                    None => self.malformed("_codecs.encode: text is not Latin-1"),
                }
            }
            Callable::OrderedDict => {
                let mut items = Vec::new();
                if let Some(&pairs) = args.first() {
                    for &p in self.seq(pairs).unwrap_or(&[]) {
                        match self.seq(p) {
                            Some([k, v]) => items.push((*k, *v)),
                            _ => return self.malformed("OrderedDict items are not pairs"),
                        }
                    }
                }
                Ok(Node::Dict(items))
            }
            Callable::Scalar => {
                let (Some(&dt), Some(&raw)) = (args.first(), args.get(1)) else {
                    return self.malformed("numpy scalar needs a dtype and bytes");
                };
                let (code, big) = match &self.arena[dt] {
                    Node::Dtype { code, big_endian } => (code.clone(), *big_endian),
                    _ => return self.malformed("numpy scalar: first argument is not a dtype"),
                };
                let Node::Bytes(b) = &self.arena[raw] else {
                    return self.malformed("numpy scalar: second argument is not bytes");
                };
                let vals = decode_numbers(&code, big, b)
                    .map_err(|msg| PickleError::Malformed { pos: self.pos, msg })?;
                match (vals.as_slice(), code.starts_with('f')) {
                    ([v], true) => Ok(Node::Float(*v)),
                    ([v], false) => Ok(Node::Int(*v as i64)),
                    _ => self.malformed("numpy scalar: byte count does not match its dtype"),
                }
            }
            Callable::RebuildTensor => self.rebuild_tensor(&args),
            Callable::RebuildParameter => match args.first().map(|&a| &self.arena[a]) {
                Some(Node::Tensor(t)) => Ok(Node::Tensor(t.clone())),
                _ => self.malformed("_rebuild_parameter needs a tensor"),
            },
            Callable::NdArrayType => self.malformed("numpy.ndarray cannot be called directly"),
            Callable::Storage(_) | Callable::Namespace => {
                self.malformed("a storage type or Namespace cannot be called with REDUCE")
            }
        }
    }

    /// A persistent id: torch's `('storage', <Type>Storage, key, location, numel)`, with a
    /// sixth item `None` in the legacy container (a view of another storage is refused).
    fn storage(&mut self, pid: Id) -> Result<Node> {
        let items = self.seq(pid).map(<[Id]>::to_vec).unwrap_or_default();
        if items.first().and_then(|&i| self.str_of(i)) != Some("storage") {
            return self.malformed("persistent id is not a ('storage', ...) tuple");
        }
        let [_, ty, key, location, numel, rest @ ..] = &items[..] else {
            return self.malformed("storage persistent id has fewer than 5 items");
        };
        let Node::Global(Callable::Storage(dtype)) = self.arena[*ty] else {
            return self.malformed("storage persistent id without a torch storage type");
        };
        match rest {
            [] => {}
            [v] if matches!(self.arena[*v], Node::None) => {}
            _ => {
                return self.malformed(
                    "storage views (a legacy persistent id with view metadata) are not supported",
                )
            }
        }
        let (Some(key), Some(location), Node::Int(numel)) = (
            self.str_of(*key).map(str::to_string),
            self.str_of(*location).map(str::to_string),
            &self.arena[*numel],
        ) else {
            return self.malformed(
                "storage persistent id: key and location must be strings, size an integer",
            );
        };
        let Ok(numel) = usize::try_from(*numel) else {
            return self.malformed("storage persistent id: negative size");
        };
        Ok(Node::Storage {
            key,
            dtype,
            location,
            numel,
        })
    }

    fn ints(&self, id: Id, what: &str) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for &d in self.seq(id).unwrap_or(&[]) {
            match self.arena[d] {
                Node::Int(n) if n >= 0 => out.push(n as usize),
                _ => return self.malformed(format!("tensor {what} is not non-negative integers")),
            }
        }
        Ok(out)
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`.
    fn rebuild_tensor(&self, args: &[Id]) -> Result<Node> {
        let [storage, offset, size, stride, ..] = args[..] else {
            return self.malformed("_rebuild_tensor_v2 needs storage, offset, size and stride");
        };
        let Node::Storage {
            key,
            dtype,
            location,
            numel,
        } = &self.arena[storage]
        else {
            return self.malformed("_rebuild_tensor_v2: first argument is not a storage");
        };
        let Node::Int(offset) = self.arena[offset] else {
            return self.malformed("_rebuild_tensor_v2: offset is not an integer");
        };
        let (shape, stride) = (self.ints(size, "size")?, self.ints(stride, "stride")?);
        if shape.len() != stride.len() {
            return self.malformed(format!(
                "tensor of size {shape:?} has stride {stride:?}: not one stride per dimension"
            ));
        }
        Ok(Node::Tensor(TensorRef {
            storage: key.clone(),
            dtype: *dtype,
            location: location.clone(),
            storage_numel: *numel,
            offset: usize::try_from(offset).map_err(|_| PickleError::Malformed {
                pos: self.pos,
                msg: "tensor with a negative storage offset".into(),
            })?,
            shape,
            stride,
        }))
    }

    fn build(&mut self, obj: Id, state: Id) -> Result<()> {
        match (&self.arena[obj], &self.arena[state]) {
            // An OrderedDict's instance attributes (a state dict's `_metadata`): not data.
            (Node::Dict(_), Node::Dict(_) | Node::None) => return Ok(()),
            (Node::Namespace(_), Node::Dict(kv)) => {
                let kv = kv.clone();
                if let Node::Namespace(items) = &mut self.arena[obj] {
                    items.extend(kv);
                }
                return Ok(());
            }
            _ => {}
        }
        let Some(st) = self.seq(state).map(<[Id]>::to_vec) else {
            return self.malformed("BUILD state is not a tuple");
        };
        match &self.arena[obj] {
            Node::Dtype { code, .. } => {
                // (version, byte order, subarray, names, fields, elsize, alignment, flags)
                let order = st.get(1).and_then(|&o| self.str_of(o)).unwrap_or("|");
                let code = code.clone();
                self.arena[obj] = Node::Dtype {
                    code,
                    big_endian: order == ">",
                };
                Ok(())
            }
            Node::Array(_) => {
                // (version, shape, dtype, is_fortran, raw bytes)
                let [_, shape, dtype, fortran, raw] = st[..] else {
                    return self.malformed("numpy array state is not a 5-tuple");
                };
                let mut dims = Vec::new();
                for &d in self.seq(shape).unwrap_or(&[]) {
                    match self.arena[d] {
                        Node::Int(n) if n >= 0 => dims.push(n as usize),
                        _ => {
                            return self.malformed("numpy array shape is not non-negative integers")
                        }
                    }
                }
                let (code, big) = match &self.arena[dtype] {
                    Node::Dtype { code, big_endian } => (code.clone(), *big_endian),
                    _ => return self.malformed("numpy array dtype is missing"),
                };
                let fortran = matches!(self.arena[fortran], Node::Bool(true) | Node::Int(1));
                let Node::Bytes(b) = &self.arena[raw] else {
                    return self.malformed(format!("numpy array of dtype `{code}` without raw bytes (object arrays are not supported)"));
                };
                let mut data = decode_numbers(&code, big, b)
                    .map_err(|msg| PickleError::Malformed { pos: self.pos, msg })?;
                let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if n != Some(data.len()) {
                    return self.malformed(format!(
                        "numpy array of shape {dims:?} holds {} values",
                        data.len()
                    ));
                }
                if fortran && dims.len() > 1 {
                    data = fortran_to_c(&dims, &data);
                }
                self.arena[obj] = Node::Array(Some(NdArray {
                    dtype: code,
                    shape: dims,
                    data,
                }));
                Ok(())
            }
            _ => self.malformed(
                "BUILD on an object that is not a numpy array, dtype, OrderedDict or Namespace",
            ),
        }
    }

    fn materialize(&self, id: Id, depth: usize, budget: &mut usize) -> Result<Value> {
        let pos = self.pos;
        if depth > MAX_DEPTH {
            return Err(PickleError::Malformed {
                pos,
                msg: format!("nesting deeper than {MAX_DEPTH} (a recursive structure?)"),
            });
        }
        if *budget == 0 {
            return Err(PickleError::Malformed {
                pos,
                msg: "shared references expand to far more objects than the file holds".into(),
            });
        }
        *budget -= 1;
        let many = |ids: &[Id], budget: &mut usize| {
            ids.iter()
                .map(|&i| self.materialize(i, depth + 1, budget))
                .collect::<Result<Vec<_>>>()
        };
        Ok(match &self.arena[id] {
            Node::None => Value::None,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::Int(*i),
            Node::Float(f) => Value::Float(*f),
            Node::Str(s) => Value::Str(s.clone()),
            Node::Bytes(b) => Value::Bytes(b.clone()),
            Node::List(v) => Value::List(many(v, budget)?),
            Node::Tuple(v) => Value::Tuple(many(v, budget)?),
            Node::Dict(kv) | Node::Namespace(kv) => {
                let mut out = Vec::with_capacity(kv.len());
                for &(k, v) in kv {
                    out.push((
                        self.materialize(k, depth + 1, budget)?,
                        self.materialize(v, depth + 1, budget)?,
                    ));
                }
                Value::Dict(out)
            }
            Node::Array(Some(a)) => Value::Array(a.clone()),
            Node::Array(None) => {
                return Err(PickleError::Malformed {
                    pos,
                    msg: "numpy array without its state".into(),
                })
            }
            Node::Tensor(t) => Value::Tensor(t.clone()),
            Node::Global(_) | Node::Dtype { .. } | Node::Storage { .. } => {
                return Err(PickleError::Malformed {
                    pos,
                    msg: "a bare global, dtype or storage where data was expected".into(),
                })
            }
        })
    }
}

/// numpy raw bytes to f64 values.
fn decode_numbers(code: &str, big_endian: bool, b: &[u8]) -> std::result::Result<Vec<f64>, String> {
    macro_rules! dec {
        ($t:ty, $n:expr) => {{
            if !b.len().is_multiple_of($n) {
                return Err(format!(
                    "{} raw bytes are not a whole number of `{code}` values",
                    b.len()
                ));
            }
            b.chunks_exact($n)
                .map(|c| {
                    let a: [u8; $n] = c.try_into().expect("chunks_exact");
                    (if big_endian {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    }) as f64
                })
                .collect()
        }};
    }
    Ok(match code {
        "f4" => dec!(f32, 4),
        "f8" => dec!(f64, 8),
        "i1" => dec!(i8, 1),
        "i2" => dec!(i16, 2),
        "i4" => dec!(i32, 4),
        "i8" => dec!(i64, 8),
        "u1" | "b1" => dec!(u8, 1),
        "u2" => dec!(u16, 2),
        "u4" => dec!(u32, 4),
        "u8" => dec!(u64, 8),
        _ => {
            return Err(format!(
                "numpy dtype `{code}` is not supported (numbers only)"
            ))
        }
    })
}

fn fortran_to_c(dims: &[usize], data: &[f64]) -> Vec<f64> {
    let n = data.len();
    let mut out = vec![0.0; n];
    for (c_index, o) in out.iter_mut().enumerate() {
        // Unravel in C order, ravel in Fortran order.
        let (mut rem, mut f_index, mut stride) = (c_index, 0, 1);
        let mut idx = vec![0; dims.len()];
        for (k, &d) in dims.iter().enumerate().rev() {
            idx[k] = rem % d;
            rem /= d;
        }
        for (k, &d) in dims.iter().enumerate() {
            f_index += idx[k] * stride;
            stride *= d;
        }
        *o = data[f_index];
    }
    out
}

/// A protocol-0 `STRING` argument: a Python 2 repr-quoted literal, to bytes.
fn unquote_py2(l: &[u8]) -> Option<Vec<u8>> {
    let (&q, rest) = l.split_first()?;
    let (&last, body) = rest.split_last()?;
    if !(q == b'\'' || q == b'"') || last != q {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *body.get(i)?;
        i += 1;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'\\' | b'\'' | b'"' => out.push(e),
            b'x' => {
                let h = std::str::from_utf8(body.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            b'0'..=b'7' => {
                let end = (i + 2).min(body.len());
                let digits = std::iter::once(e)
                    .chain(
                        body[i..end]
                            .iter()
                            .copied()
                            .take_while(|d| (b'0'..=b'7').contains(d)),
                    )
                    .collect::<Vec<_>>();
                i += digits.len() - 1;
                out.push(
                    u8::try_from(u32::from_str_radix(std::str::from_utf8(&digits).ok()?, 8).ok()?)
                        .ok()?,
                );
            }
            _ => {
                out.push(b'\\');
                out.push(e);
            }
        }
    }
    Some(out)
}

/// A protocol-0 `UNICODE` argument (raw-unicode-escape) to a string.
fn raw_unicode_escape(l: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(l.len());
    let mut i = 0;
    while i < l.len() {
        let c = l[i];
        if c == b'\\' && matches!(l.get(i + 1), Some(b'u') | Some(b'U')) {
            let n = if l[i + 1] == b'u' { 4 } else { 8 };
            let h = std::str::from_utf8(l.get(i + 2..i + 2 + n)?).ok()?;
            out.push(char::from_u32(u32::from_str_radix(h, 16).ok()?)?);
            i += 2 + n;
        } else {
            out.push(char::from(c));
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The byte strings below are what CPython 3.11 `pickle.dumps(..., protocol=2)` writes
    // (numpy 2.4 for the arrays).

    #[test]
    fn protocol_2_list_of_tuples() {
        // [('a.jpg', 1, [1.5, -2.0], 'x'), None]
        let data = b"\x80\x02]q\x00((X\x05\x00\x00\x00a.jpgq\x01K\x01]q\x02(G?\xf8\x00\x00\x00\x00\x00\x00G\xc0\x00\x00\x00\x00\x00\x00\x00eX\x01\x00\x00\x00xq\x03tq\x04Ne.";
        let v = loads(data).unwrap();
        let want = Value::List(vec![
            Value::Tuple(vec![
                Value::Str("a.jpg".into()),
                Value::Int(1),
                Value::List(vec![Value::Float(1.5), Value::Float(-2.0)]),
                Value::Str("x".into()),
            ]),
            Value::None,
        ]);
        assert_eq!(v, want);
    }

    #[test]
    fn protocol_0_py2_strings_and_memo() {
        // Python 2 pickle.dumps({'s': ['caf\xc3\xa9', 'caf\xc3\xa9'], 'n': 3, 'f': 0.5}) style,
        // the list's second item fetched from the memo.
        let data = b"(dp0\nS's'\np1\n(lp2\nS'caf\\xc3\\xa9'\np3\nag3\nasS'n'\np4\nI3\nsS'f'\np5\nF0.5\nsS'b'\np6\nI01\ns.";
        let v = loads(data).unwrap();
        assert_eq!(
            v.get("s"),
            Some(&Value::List(vec![
                Value::Str("café".into()),
                Value::Str("café".into())
            ]))
        );
        assert_eq!(v.get("n"), Some(&Value::Int(3)));
        assert_eq!(v.get("f"), Some(&Value::Float(0.5)));
        assert_eq!(v.get("b"), Some(&Value::Bool(true)));
    }

    #[test]
    fn memo_shares_mutable_lists() {
        // l = [7]; (l, l)
        let v = loads(b"\x80\x02]q\x00K\x07ah\x00\x86q\x01.").unwrap();
        assert_eq!(
            v,
            Value::Tuple(vec![
                Value::List(vec![Value::Int(7)]),
                Value::List(vec![Value::Int(7)])
            ])
        );
        // Filled after it was memoised (protocol 0 style): the shared copy sees the items.
        let v = loads(b"(lp0\nI7\nag0\n\x86.").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            v,
            Value::Tuple(vec![
                Value::List(vec![Value::Int(7)]),
                Value::List(vec![Value::Int(7)])
            ])
        );
    }

    #[test]
    fn forbidden_global_is_named() {
        let data = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.";
        let e = loads(data).unwrap_err();
        assert!(
            matches!(&e, PickleError::ForbiddenGlobal { module, name, .. } if module == "posix" && name == "system"),
            "{e}"
        );
        assert!(e.to_string().contains("posix.system"), "{e}");
    }

    #[test]
    fn recursive_and_exponential_structures_are_errors() {
        // l = []; l.append(l)
        let rec = b"\x80\x02]q\x00h\x00a.";
        assert!(loads(rec).unwrap_err().to_string().contains("recursive"));
        // x = [x, x] sixty times: 2^60 leaves when expanded.
        let mut bomb = b"\x80\x02K\x00".to_vec();
        for _ in 0..60 {
            bomb.extend_from_slice(b"q\x00h\x00\x86"); // memoise top, push it again, pair them
        }
        bomb.push(b'.');
        assert!(loads(&bomb).is_err());
    }

    #[test]
    fn lengths_beyond_the_data_are_truncation_errors() {
        let data = b"\x80\x02X\xff\xff\xff\x7fabc";
        assert!(matches!(loads(data), Err(PickleError::Truncated { .. })));
        let data = b"\x80\x02\x8e\xff\xff\xff\xff\xff\xff\xff\xffabc";
        assert!(matches!(loads(data), Err(PickleError::Truncated { .. })));
    }

    #[test]
    fn numpy_array_and_scalars_protocol_2() {
        // np.array([1.5, 2.0, 3.25, 4.0], dtype=np.float32)
        let data: &[u8] = b"\x80\x02cnumpy._core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02c_codecs\nencode\nq\x03X\x01\x00\x00\x00bq\x04X\x06\x00\x00\x00latin1q\x05\x86q\x06Rq\x07\x87q\x08Rq\t(K\x01K\x04\x85q\ncnumpy\ndtype\nq\x0bX\x02\x00\x00\x00f4q\x0c\x89\x88\x87q\rRq\x0e(K\x03X\x01\x00\x00\x00<q\x0fNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x10b\x89h\x03X\x12\x00\x00\x00\x00\x00\xc3\x80?\x00\x00\x00@\x00\x00P@\x00\x00\xc2\x80@q\x11h\x05\x86q\x12Rq\x13tq\x14b.";
        let v = loads(data).unwrap();
        assert_eq!(
            v,
            Value::Array(NdArray {
                dtype: "f4".into(),
                shape: vec![4],
                data: vec![1.5, 2.0, 3.25, 4.0]
            })
        );
        // [np.float32(2.5), np.int64(-3)]
        let data: &[u8] = b"\x80\x02]q\x00(cnumpy._core.multiarray\nscalar\nq\x01cnumpy\ndtype\nq\x02X\x02\x00\x00\x00f4q\x03\x89\x88\x87q\x04Rq\x05(K\x03X\x01\x00\x00\x00<q\x06NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x07bc_codecs\nencode\nq\x08X\x04\x00\x00\x00\x00\x00 @q\tX\x06\x00\x00\x00latin1q\n\x86q\x0bRq\x0c\x86q\rRq\x0eh\x01h\x02X\x02\x00\x00\x00i8q\x0f\x89\x88\x87q\x10Rq\x11(K\x03h\x06NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x12bh\x08X\x10\x00\x00\x00\xc3\xbd\xc3\xbf\xc3\xbf\xc3\xbf\xc3\xbf\xc3\xbf\xc3\xbf\xc3\xbfq\x13h\n\x86q\x14Rq\x15\x86q\x16Rq\x17e.";
        assert_eq!(
            loads(data).unwrap(),
            Value::List(vec![Value::Float(2.5), Value::Int(-3)])
        );
    }

    #[test]
    fn fortran_order_is_reordered() {
        // 2x3 [[0,1,2],[3,4,5]] stored column-major: 0 3 1 4 2 5
        assert_eq!(
            fortran_to_c(&[2, 3], &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
    }
}
