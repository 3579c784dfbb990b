//! GGUF v2/v3 reader and writer.
//!
//! Layout: magic `GGUF`, version, tensor count, metadata count, the metadata key/value pairs,
//! the tensor table (name, dims with the contiguous axis first, GGML type, offset), padding to
//! `general.alignment` (32 by default), then the tensor data. The reader parses the header
//! through a [`ByteSource`] in large chunks and validates every tensor against the file length,
//! so a node can later read just the tensors of its own layers.
//!
//! Shapes in this crate are row-major (outer axis first): GGUF's `[576, 192]` for `attn_k`
//! becomes `[192, 576]`, a matrix of 192 rows (outputs) by 576 columns (inputs).
//!
//! A file may come from anywhere, so no count or length in it drives an allocation before the
//! bytes behind it are there: arrays grow as their elements are read (an element takes at least
//! its own size in the file), strings and metadata values are capped ([`MAX_STRING`],
//! [`MAX_VALUES`]), and every offset and size is checked `u64` arithmetic, also on wasm32.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::quant::DType;
use crate::source::ByteSource;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Header bytes fetched per read: a few requests cover a large vocabulary over HTTP.
const CHUNK: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
/// Longest string in a header (a chat template is a few KiB; a token a few bytes).
pub const MAX_STRING: u64 = 16 << 20;
/// Most metadata values in all, array elements included (a 256k vocabulary with its merges
/// and token types is under a million). Each costs about 32 bytes in memory.
pub const MAX_VALUES: u64 = 8 << 20;
/// Most tensors in a table.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Array elements reserved ahead of reading them.
const RESERVE_AHEAD: u64 = 4096;

/// A metadata value, one variant per GGUF value type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Row-major shape, outer axis first.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Values in the tensor (saturating: the reader already refused tables that overflow).
    pub fn n_elements(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }
}

/// A parsed GGUF header: metadata and tensor table. Tensor data stays in the source.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub file: String,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset where tensor data begins.
    pub data_start: u64,
    index: BTreeMap<String, usize>,
}

/// Reads the header sequentially, fetching the source in chunks.
struct Cursor<'a, S: ByteSource + ?Sized> {
    src: &'a S,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
    /// Metadata values read so far, against [`MAX_VALUES`].
    values: u64,
}

impl<'a, S: ByteSource + ?Sized> Cursor<'a, S> {
    fn new(src: &'a S) -> Self {
        Self {
            src,
            pos: 0,
            buf: Vec::new(),
            buf_start: 0,
            values: 0,
        }
    }

    fn remaining(&self) -> u64 {
        self.src.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&[u8]> {
        let end = self.pos.saturating_add(n);
        if end > self.src.len() {
            return Err(Error::Truncated {
                file: self.src.name().to_string(),
                what: what.to_string(),
                needed: end,
                len: self.src.len(),
            });
        }
        let buf_end = self.buf_start.saturating_add(self.buf.len() as u64);
        if self.pos < self.buf_start || end > buf_end {
            let len = n.max(CHUNK).min(self.src.len() - self.pos);
            self.buf = self.src.read_vec(self.pos, len, what)?;
            self.buf_start = self.pos;
        }
        // Both fit the buffer, which is in memory, so they fit a usize.
        let start = (self.pos - self.buf_start) as usize;
        let stop = start.saturating_add(n as usize);
        self.pos = end;
        self.buf.get(start..stop).ok_or_else(|| {
            Error::format(
                self.src.name(),
                format!("{what}: {n} bytes do not fit in memory"),
            )
        })
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let file = self.src.name().to_string();
        if len > MAX_STRING {
            return Err(Error::format(
                &file,
                format!("{what} is a string of {len} bytes, more than the {MAX_STRING} allowed"),
            ));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::format(&file, format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: u32) -> Result<Value> {
        let what = || format!("metadata value `{key}`");
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(Error::format(
                self.src.name(),
                format!("metadata `{key}`: more than {MAX_VALUES} values in the header"),
            ));
        }
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(&what())?[0]),
            1 => Value::I8(self.array::<1>(&what())?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => match self.array::<1>(&what())?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::format(
                        self.src.name(),
                        format!("metadata `{key}`: bool byte {b} is neither 0 nor 1"),
                    ))
                }
            },
            8 => Value::String(self.string(&what())?),
            9 => {
                if depth > 2 {
                    return Err(Error::format(
                        self.src.name(),
                        format!("metadata `{key}`: arrays nested too deeply"),
                    ));
                }
                let elem = self.u32(&what())?;
                let count = self.u64(&what())?;
                // Every element takes at least its smallest encoding in the file: a count the
                // rest of the file cannot hold is garbage.
                let min = min_encoded_bytes(elem);
                if count > self.remaining() / min {
                    return Err(Error::Truncated {
                        file: self.src.name().to_string(),
                        what: format!("metadata array `{key}` of {count} elements"),
                        needed: self.pos.saturating_add(count.saturating_mul(min)),
                        len: self.src.len(),
                    });
                }
                // A value in memory is several times its bytes in the file: reserve only a
                // little ahead and let the vector grow with what is actually read.
                let mut items = Vec::with_capacity(count.min(RESERVE_AHEAD) as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
            t => {
                return Err(Error::format(
                    self.src.name(),
                    format!("metadata `{key}` has unknown value type {t}"),
                ))
            }
        })
    }
}

/// The fewest bytes an element of GGUF type `type_id` takes in a file (1 for unknown types,
/// which fail when read).
fn min_encoded_bytes(type_id: u32) -> u64 {
    match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,  // the length of an empty string
        9 => 12, // the type and count of an empty array
        10..=12 => 8,
        _ => 1,
    }
}

impl Gguf {
    /// Parse the header of a GGUF file and validate its tensor table.
    pub fn read<S: ByteSource + ?Sized>(src: &S) -> Result<Self> {
        let file = src.name().to_string();
        let mut cur = Cursor::new(src);
        let magic = cur.array::<4>("magic")?;
        if &magic != MAGIC {
            return Err(Error::format(
                &file,
                format!("bad magic {magic:02x?}: not a GGUF file (expected \"GGUF\")"),
            ));
        }
        let version = cur.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                &file,
                format!("unsupported GGUF version {version} (this build reads versions 2 and 3)"),
            ));
        }
        let n_tensors = cur.u64("tensor count")?;
        let n_kv = cur.u64("metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = cur.string(&format!("metadata key {i}"))?;
            let type_id = cur.u32(&format!("type of metadata `{key}`"))?;
            let value = cur.value(type_id, &key, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::format(
                        &file,
                        format!("general.alignment {v:?} is not a power of two"),
                    ))
                }
            },
        };
        if n_tensors > MAX_TENSORS {
            return Err(Error::format(
                &file,
                format!("{n_tensors} tensors, more than the {MAX_TENSORS} allowed"),
            ));
        }
        // Each table entry takes at least 24 bytes; a larger count is garbage.
        if n_tensors > cur.remaining() / 24 {
            return Err(Error::Truncated {
                file,
                what: format!("tensor table of {n_tensors} entries"),
                needed: cur.pos.saturating_add(n_tensors.saturating_mul(24)),
                len: src.len(),
            });
        }
        // Entries are parsed, not trusted: ~64 bytes each in memory against 24 or more in the
        // file, so reserve only a little ahead of what has been read.
        let mut raw = Vec::with_capacity(n_tensors.min(RESERVE_AHEAD) as usize);
        for i in 0..n_tensors {
            let name = cur.string(&format!("name of tensor {i}"))?;
            let n_dims = cur.u32(&format!("dims of tensor `{name}`"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::format(
                    &file,
                    format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} supported)"),
                ));
            }
            let mut shape = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = cur.u64(&format!("dims of tensor `{name}`"))?;
                shape.push(usize::try_from(d).map_err(|_| {
                    Error::format(&file, format!("tensor `{name}` has dimension {d}"))
                })?);
            }
            shape.reverse();
            let type_id = cur.u32(&format!("type of tensor `{name}`"))?;
            let offset = cur.u64(&format!("offset of tensor `{name}`"))?;
            raw.push((name, shape, type_id, offset));
        }
        let data_start = cur.pos.checked_next_multiple_of(alignment).ok_or_else(|| {
            Error::format(
                &file,
                format!("alignment {alignment} passes the end of any file"),
            )
        })?;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = BTreeMap::new();
        for (name, shape, type_id, offset) in raw {
            let dtype = DType::from_ggml_id(type_id).ok_or_else(|| Error::UnsupportedType {
                file: file.clone(),
                tensor: name.clone(),
                dtype: format!("GGML type {type_id}"),
            })?;
            // In u64: a tensor too large for a 32-bit address space is still described right.
            let n = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| Error::format(&file, format!("tensor `{name}` is too large")))?;
            if shape.last().is_some_and(|&c| c % dtype.block_len() != 0) {
                return Err(Error::format(
                    &file,
                    format!(
                        "tensor `{name}` ({dtype}) rows of {:?} values are not whole blocks of {}",
                        shape.last(),
                        dtype.block_len()
                    ),
                ));
            }
            let n_bytes = (n / dtype.block_len() as u64)
                .checked_mul(dtype.block_bytes() as u64)
                .ok_or_else(|| Error::format(&file, format!("tensor `{name}` is too large")))?;
            if offset % alignment != 0 {
                return Err(Error::format(
                    &file,
                    format!("tensor `{name}` offset {offset} is not aligned to {alignment}"),
                ));
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= src.len() => {
                    if index.insert(name.clone(), tensors.len()).is_some() {
                        return Err(Error::format(
                            &file,
                            format!("tensor `{name}` listed twice"),
                        ));
                    }
                    tensors.push(TensorInfo {
                        name,
                        dtype,
                        shape,
                        offset: start,
                        n_bytes,
                    });
                }
                _ => {
                    return Err(Error::Truncated {
                        file,
                        what: format!("tensor `{name}` ({n_bytes} bytes at data offset {offset})"),
                        needed: end.unwrap_or(u64::MAX),
                        len: src.len(),
                    })
                }
            }
        }
        Ok(Self {
            file,
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            index,
        })
    }

    /// The tensor table entry for `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Read the raw stored bytes of a tensor (blocks stay quantized).
    pub fn read_bytes<S: ByteSource + ?Sized>(&self, src: &S, name: &str) -> Result<Vec<u8>> {
        let info = self.tensor(name).ok_or_else(|| Error::MissingTensor {
            file: self.file.clone(),
            tensor: name.to_string(),
        })?;
        src.read_vec(info.offset, info.n_bytes, &format!("tensor `{name}`"))
    }
}

/// Builds GGUF files in memory: used by tests, converters and tools.
#[derive(Debug, Clone, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn metadata(&mut self, key: impl Into<String>, value: Value) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Add a tensor with a row-major `shape` and stored `bytes` of `dtype`.
    pub fn tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[usize],
        bytes: Vec<u8>,
    ) -> &mut Self {
        self.tensors
            .push((name.into(), dtype, shape.to_vec(), bytes));
        self
    }

    /// Serialise as GGUF v3.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self
            .metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT) as usize;
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, dtype, shape, bytes) in &self.tensors {
            put_string(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(dtype.ggml_id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += bytes.len().div_ceil(alignment) * alignment;
        }
        for (_, _, _, bytes) in &self.tensors {
            out.resize(out.len().div_ceil(alignment) * alignment, 0);
            out.extend(bytes);
        }
        out
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.push(*v as u8),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(*v as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let elem = items.first().map_or(0, Value::type_id);
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
    }
}
