//! Quantized weights in ggml's block formats (the formats of GGUF files):
//! the types and their layouts, and the plain reference arithmetic on them
//! that the device kernels are tested against.

pub mod dequant;
pub mod quantize;

pub use dequant::GgmlType;

use memmap2::Mmap;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// The bytes of a quantized tensor: its own, or a slice of a memory-mapped
/// file (a GGUF tensor used where it lies, never copied or widened).
#[derive(Clone)]
pub enum QBytes {
    Owned(Vec<u8>),
    Mapped(Arc<Mmap>, Range<usize>),
}

impl Deref for QBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            QBytes::Owned(v) => v,
            QBytes::Mapped(map, range) => &map[range.clone()],
        }
    }
}

impl std::fmt::Debug for QBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            QBytes::Owned(_) => "owned",
            QBytes::Mapped(..) => "mapped",
        };
        write!(f, "QBytes({} bytes, {kind})", self.len())
    }
}
