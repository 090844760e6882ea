//! A GGUF v3 writer: the layout gguf.rs reads (see there), with tensor data
//! aligned to 32 bytes, GGUF's default (so no `general.alignment` key).
//!
//! The header is built in memory (its size is known before any tensor is
//! made: each tensor's byte count follows from its type and dims), then the
//! tensors are asked for one at a time, so memory holds one tensor, not the
//! model. The file is written under a temporary name next to the destination
//! and renamed into place.

use crate::error::{Error, Result};
use crate::model::folder::write_file_atomically;
use crate::model::gguf::Value;
use crate::quant::GgmlType;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

const ALIGNMENT: usize = 32;

/// One tensor of the file to write.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    /// Dims innermost first (ne[0] is the row length), as GGUF stores them.
    pub ne: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorSpec {
    /// Bytes of data, or None when a row is not whole blocks of the type.
    pub fn nbytes(&self) -> Option<usize> {
        let row = *self.ne.first()?;
        if !row.is_multiple_of(self.ty.block_size()) {
            return None;
        }
        self.ty.bytes_for(self.ne.iter().product())
    }
}

/// Writes a GGUF v3 file at `path`: `metadata` in the order given, then
/// `tensors`, whose bytes `data(i)` makes for tensor i, in order. Returns the
/// size of the file.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let invalid = |msg: String| Error::Invalid(format!("{}: {msg}", path.display()));
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    let mut keys = BTreeSet::new();
    for (key, value) in metadata {
        if !keys.insert(key) {
            return Err(invalid(format!("metadata key {key} is given twice")));
        }
        if key == "general.alignment" {
            return Err(invalid(format!(
                "general.alignment is not written (the data is aligned to {ALIGNMENT})"
            )));
        }
        put_string(&mut header, key);
        header.extend_from_slice(&type_id(value).to_le_bytes());
        put_value(&mut header, value)
            .map_err(|msg| invalid(format!("metadata key {key}: {msg}")))?;
    }
    let mut names = BTreeSet::new();
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        if !names.insert(&t.name) {
            return Err(invalid(format!("tensor '{}' is given twice", t.name)));
        }
        let nbytes = t.nbytes().filter(|_| (1..=4).contains(&t.ne.len()));
        let nbytes = nbytes.ok_or_else(|| {
            invalid(format!(
                "tensor '{}': dims {:?} are not 1 to 4 dims of whole {} blocks ({} values)",
                t.name,
                t.ne,
                t.ty,
                t.ty.block_size()
            ))
        })?;
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for &d in &t.ne {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ty.id().to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        sizes.push(nbytes);
        offset += nbytes.next_multiple_of(ALIGNMENT);
    }
    pad(&mut header);
    let total = (header.len() + offset) as u64;

    write_file_atomically(path, "gguf", |tmp| {
        let io = |e| Error::io(tmp, e);
        let file = File::create(tmp).map_err(io)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&header).map_err(io)?;
        for (i, t) in tensors.iter().enumerate() {
            let mut bytes = data(i)?;
            if bytes.len() != sizes[i] {
                return Err(invalid(format!(
                    "tensor '{}': {} bytes of data, expected {} for {} {:?}",
                    t.name,
                    bytes.len(),
                    sizes[i],
                    t.ty,
                    t.ne
                )));
            }
            pad(&mut bytes);
            w.write_all(&bytes).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    })?;
    Ok(total)
}

/// Zero bytes up to the next multiple of the alignment.
fn pad(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(ALIGNMENT), 0);
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// The GGUF value type of `v` (gguf.rs's `Reader::value` reads them).
fn type_id(v: &Value) -> u32 {
    match v {
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

/// Appends the bytes of `v` (without its type); an array must hold items of
/// one type.
fn put_value(buf: &mut Vec<u8>, v: &Value) -> std::result::Result<(), String> {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_string(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            // An empty array's item type is lost on reading; u8 is as good as any.
            let item = items.first().map_or(0, type_id);
            buf.extend_from_slice(&item.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for (i, x) in items.iter().enumerate() {
                if type_id(x) != item {
                    return Err(format!(
                        "array item {i} is a {}, the first a {}",
                        x.type_name(),
                        items[0].type_name()
                    ));
                }
                put_value(buf, x)?;
            }
        }
    }
    Ok(())
}
