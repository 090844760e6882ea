//! A GGUF (v2/v3) reader over a memory map.
//!
//! Layout (all little-endian):
//!
//! ```text
//! "GGUF" u32 version  u64 tensor_count  u64 kv_count
//! kv_count × { string key, u32 value_type, value }
//! tensor_count × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_start + offset
//! ```
//!
//! where a string is `u64 len` + UTF-8 bytes and an array value is
//! `u32 item_type, u64 count` + items. `ne` lists dims innermost first
//! (ne[0] is the row length); [`TensorInfo::shape`] reverses it into the
//! usual row-major shape.
//!
//! Every length and offset is checked against the file size before it is
//! used, so a truncated or corrupt file gives an [`Error::Format`] naming the
//! file and what is wrong — never a panic, and no allocation that is not
//! bounded by the file's size.

use crate::error::{Error, Result};
use crate::quant::dequant::{self, GgmlType};
use crate::quant::QBytes;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: usize = 4;
/// How deeply arrays may nest inside arrays.
const MAX_ARRAY_DEPTH: usize = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer value, widened.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any float value (an f64 is narrowed).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
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

/// One tensor's entry in the GGUF header.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dims as GGUF stores them: innermost (the row length) first.
    pub ne: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: usize,
    /// Bytes of data.
    pub nbytes: usize,
}

impl TensorInfo {
    /// Row-major shape, outermost first (the reverse of `ne`).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().copied().collect()
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.ne.iter().product()
    }
}

/// An open GGUF file.
pub struct Gguf {
    path: PathBuf,
    mmap: Arc<Mmap>,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
    pub alignment: usize,
    /// Byte offset of the data section in the file.
    pub data_start: usize,
}

impl Gguf {
    /// Opens and validates `path`: the header, all metadata, all tensor infos,
    /// and that every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(Error::format(
                path,
                format!("file is {len} bytes, too short for a GGUF header (24 bytes)"),
            ));
        }
        // SAFETY: the map is read-only and lives as long as `Gguf`; as with
        // every memory map, the file must not be truncated by another process
        // while it is open. All reads below are bounds-checked slices of it.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse(&mmap).map_err(|msg| Error::format(path, msg))?;
        let mut by_name = BTreeMap::new();
        for (i, t) in header.tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::format(
                    path,
                    format!("tensor '{}' is listed twice", t.name),
                ));
            }
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name,
            alignment: header.alignment,
            data_start: header.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of tensor `name` (checked at open to lie in the file).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.require_tensor(name)?;
        let start = self.data_start + t.offset;
        Ok(&self.mmap[start..start + t.nbytes])
    }

    /// The bytes of tensor `name` where they lie in the memory map, to be
    /// computed on without a copy.
    pub fn tensor_qbytes(&self, name: &str) -> Result<QBytes> {
        let t = self.require_tensor(name)?;
        let start = self.data_start + t.offset;
        Ok(QBytes::Mapped(self.mmap.clone(), start..start + t.nbytes))
    }

    /// Tensor `name` dequantized to f32: its row-major shape (outermost
    /// first) and values.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self.require_tensor(name)?;
        if !t.ggml_type.can_dequantize() {
            return Err(Error::Unsupported(format!(
                "{}: tensor '{name}': {}",
                self.path.display(),
                dequant::unsupported_msg(t.ggml_type)
            )));
        }
        let values = self.tensor_copy(name, |raw| {
            dequant::dequantize_vec(t.ggml_type, raw, t.numel())
        })??;
        Ok((t.shape(), values))
    }

    /// `copy(bytes of tensor name)`, for a copy of the tensor made in
    /// memory: then the file's pages of it are dropped from this process's
    /// resident memory (`quant::drop_mapped_pages`), so that the process
    /// does not hold both (an f32 GGUF widened whole peaked at 2x its size).
    pub fn tensor_copy<T>(&self, name: &str, copy: impl FnOnce(&[u8]) -> T) -> Result<T> {
        let t = self.require_tensor(name)?;
        let out = copy(self.tensor_bytes(name)?);
        let start = self.data_start + t.offset;
        crate::quant::drop_mapped_pages(&self.mmap, start..start + t.nbytes);
        Ok(out)
    }

    fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| Error::format(&self.path, format!("missing tensor '{name}'")))
    }

    /// The metadata value under `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| Error::format(&self.path, format!("missing metadata key {key}")))
    }

    fn wrong_type(&self, key: &str, v: &Value, expected: &str) -> Error {
        Error::format(
            &self.path,
            format!(
                "metadata key {key} is a {}, expected {expected}",
                v.type_name()
            ),
        )
    }

    /// An integer value (of any stored integer type) that fits in a u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        let n = v
            .as_i128()
            .ok_or_else(|| self.wrong_type(key, v, "an integer"))?;
        u64::try_from(n)
            .map_err(|_| Error::format(&self.path, format!("metadata key {key} is negative: {n}")))
    }

    /// An integer value (of any stored integer type) that fits in a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let n = self.get_u64(key)?;
        u32::try_from(n)
            .map_err(|_| Error::format(&self.path, format!("metadata key {key} is too large: {n}")))
    }

    /// An integer value (of any stored integer type) that fits in a usize.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let n = self.get_u64(key)?;
        usize::try_from(n)
            .map_err(|_| Error::format(&self.path, format!("metadata key {key} is too large: {n}")))
    }

    /// A float value (f32, or f64 narrowed).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.require(key)?;
        v.as_f32().ok_or_else(|| self.wrong_type(key, v, "a float"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, v, "a string"))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| self.wrong_type(key, v, "a bool"))
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.wrong_type(key, v, "an array"))
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    Error::format(
                        &self.path,
                        format!(
                            "metadata key {key}: item {i} is a {}, expected a string",
                            v.type_name()
                        ),
                    )
                })
            })
            .collect()
    }

    /// An array of integers (of any stored integer type) that fit in an i64.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i128()
                    .and_then(|n| i64::try_from(n).ok())
                    .ok_or_else(|| {
                        Error::format(
                            &self.path,
                            format!(
                                "metadata key {key}: item {i} is a {}, expected an integer",
                                v.type_name()
                            ),
                        )
                    })
            })
            .collect()
    }
}

/// What [`parse`] finds in the header.
struct Header {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    alignment: usize,
    data_start: usize,
}

/// Parses and validates the whole header of a GGUF image; errors are the
/// message part of an [`Error::Format`].
fn parse(buf: &[u8]) -> std::result::Result<Header, String> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r.take(4).map_err(|e| format!("header: {e}"))?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file: magic bytes are {:02x?}, expected \"GGUF\"",
            magic
        ));
    }
    let version = r.u32().map_err(|e| format!("header: {e}"))?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (expected 2 or 3)"
        ));
    }
    let n_tensors = r.u64().map_err(|e| format!("header: {e}"))?;
    let n_kv = r.u64().map_err(|e| format!("header: {e}"))?;
    // Each metadata entry takes at least 8 + 4 + 1 bytes, each tensor info at
    // least 8 + 4 + 4 + 8; counts that cannot fit are corrupt, and checking
    // them first bounds every allocation below by the file size.
    let rest = r.remaining() as u64;
    if n_kv > rest / 13 {
        return Err(format!(
            "header: metadata count {n_kv} cannot fit in a file of {} bytes; the file is truncated or corrupt",
            buf.len()
        ));
    }
    if n_tensors > rest / 24 {
        return Err(format!(
            "header: tensor count {n_tensors} cannot fit in a file of {} bytes; the file is truncated or corrupt",
            buf.len()
        ));
    }

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r
            .string()
            .map_err(|e| format!("metadata entry {i}: key: {e}"))?;
        let ty = r
            .u32()
            .map_err(|e| format!("metadata entry {i} ({key}): {e}"))?;
        let value = r
            .value(ty, 0)
            .map_err(|e| format!("metadata entry {i} ({key}): {e}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key {key} appears twice"));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(format!(
                "general.alignment must be a power-of-two u32, found {v:?}"
            ))
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        tensors.push(tensor_info(&mut r).map_err(|e| format!("tensor info {i}: {e}"))?);
    }

    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let offset = t.offset as u64;
        if !offset.is_multiple_of(alignment) {
            return Err(format!(
                "tensor '{}': data offset {offset} is not a multiple of the alignment {alignment}",
                t.name
            ));
        }
        let end = data_start
            .checked_add(offset)
            .and_then(|s| s.checked_add(t.nbytes as u64));
        if end.is_none_or(|end| end > file_len) {
            return Err(format!(
                "tensor '{}': data ({} bytes at offset {offset} of the data section, which starts at {data_start}) runs past the end of the file ({file_len} bytes); the file is truncated or corrupt",
                t.name, t.nbytes
            ));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment: alignment as usize,
        data_start: data_start as usize,
    })
}

/// Reads one tensor info and checks its dims and type.
fn tensor_info(r: &mut Reader) -> std::result::Result<TensorInfo, String> {
    let name = r.string()?;
    let ctx = |e: String| format!("'{name}': {e}");
    let n_dims = r.u32().map_err(ctx)? as usize;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(ctx(format!(
            "{n_dims} dimensions (expected 1 to {MAX_DIMS})"
        )));
    }
    let mut ne = Vec::with_capacity(n_dims);
    for _ in 0..n_dims {
        let d = r.u64().map_err(ctx)?;
        ne.push(usize::try_from(d).map_err(|_| ctx(format!("dimension {d} is too large")))?);
    }
    let type_id = r.u32().map_err(ctx)?;
    let ggml_type =
        GgmlType::from_id(type_id).ok_or_else(|| ctx(format!("unknown ggml type {type_id}")))?;
    let offset = r.u64().map_err(ctx)?;
    let numel = ne
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ctx(format!("dimensions {ne:?} overflow")))?;
    let row = ne[0];
    if !row.is_multiple_of(ggml_type.block_size()) {
        return Err(ctx(format!(
            "row length {row} is not a multiple of the {ggml_type} block size {}",
            ggml_type.block_size()
        )));
    }
    let nbytes = ggml_type
        .bytes_for(numel)
        .ok_or_else(|| ctx(format!("dimensions {ne:?} overflow")))?;
    Ok(TensorInfo {
        offset: usize::try_from(offset)
            .map_err(|_| ctx(format!("offset {offset} is too large")))?,
        name,
        ne,
        ggml_type,
        nbytes,
    })
}

/// A bounds-checked little-endian cursor over the file image.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {}, past the end of the file ({} bytes); the file is truncated or corrupt",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let at = self.pos;
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "string of length {len} at offset {at} runs past the end of the file ({} bytes); the file is truncated or corrupt",
                self.buf.len()
            ));
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("string at offset {at} is not valid UTF-8"))
    }

    /// A value of GGUF value type `ty`; `depth` counts enclosing arrays.
    fn value(&mut self, ty: u32, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array()?)),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.take(1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(format!(
                        "bool at offset {} is {b}, not 0 or 1",
                        self.pos - 1
                    ))
                }
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"));
                }
                let item_ty = self.u32()?;
                if item_ty > 12 {
                    return Err(format!("array of unknown metadata value type {item_ty}"));
                }
                let at = self.pos;
                let count = self.u64()?;
                // Every item takes at least one byte, so a count larger than
                // what is left is corrupt; this also bounds the allocation.
                if count > self.remaining() as u64 {
                    return Err(format!(
                        "array of {count} items at offset {at} runs past the end of the file ({} bytes); the file is truncated or corrupt",
                        self.buf.len()
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for i in 0..count {
                    items.push(
                        self.value(item_ty, depth + 1)
                            .map_err(|e| format!("item {i}: {e}"))?,
                    );
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            _ => return Err(format!("unknown metadata value type {ty}")),
        })
    }
}
