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

impl QBytes {
    /// Lets the process's resident memory drop the pages of bytes `range`
    /// of a mapped tensor (`drop_mapped_pages`); owned bytes stay.
    pub fn drop_pages(&self, range: Range<usize>) {
        if let QBytes::Mapped(map, mapped) = self {
            assert!(range.end <= mapped.len());
            drop_mapped_pages(map, mapped.start + range.start..mapped.start + range.end);
        }
    }
}

/// Advises the kernel that bytes `range` of a read-only file map are not
/// needed: their pages leave this process's resident memory (they stay in
/// the page cache), and a later read faults them back in unchanged (as do
/// a neighbour's first reads: Linux maps up to 64 KiB around a fault, so a
/// small tensor saves less). A failed advice only costs memory.
pub fn drop_mapped_pages(map: &Mmap, range: Range<usize>) {
    #[cfg(unix)]
    // SAFETY: the map is a read-only map of a file: DONTNEED drops its
    // pages, and any read after it sees the file's bytes again.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
    };
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
