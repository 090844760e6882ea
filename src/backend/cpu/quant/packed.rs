//! The 32-value types' rows (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) repacked at
//! load, quad by quad, into the order a kernel step consumes them
//! (`kernel::Quad`), so that a step reads its codes with one or two plain
//! loads instead of unpacking, splitting and broadcasting two pairs of
//! blocks (llama.cpp repacks Q4_0 for its x86 kernels for the same reason).
//! The bits are the file's, moved: each output keeps the arithmetic of the
//! module doc of `quant`, so a packed and a file-layout product agree bit
//! for bit. A packed row is as long as the file's, plus, where its blocks
//! are not a whole number of quads (k = 576: 18 blocks), the last quad's
//! zero blocks, which add nothing (the kernel multiplies them either way;
//! stored, they spare a step that widens a short quad).
//!
//! A packed quad of 4 blocks (128 values) holds, in order:
//! - the codes, in the step's halves (`activations::split_quad`): value
//!   8l + i of the quad (lane l, i < 4) at position 4l + i of the even half,
//!   8l + 4 + i at 4l + i of the odd half. 4- and 5-bit types keep the low 4
//!   bits of both halves in 64 bytes (even in the low nibbles, odd in the
//!   high ones); Q8_0 keeps its signed bytes, 64 even then 64 odd;
//! - 5-bit types: the fifth bits, a little-endian u64 per half (bit t of
//!   code t);
//! - the 4 blocks' scales d as the file's f16, then, for types with a min
//!   (Q4_1, Q5_1), their 4 mins m.

use super::activations::{BLOCK, GROUP, QUAD};
use crate::quant::GgmlType;
use rayon::prelude::*;

/// What a 32-value type's blocks hold: bits a code, and whether a min.
#[derive(Clone, Copy)]
struct Spec {
    bits: usize,
    min: bool,
}

impl Spec {
    /// The type's spec, if the CPU packs it.
    const fn of(ty: GgmlType) -> Option<Spec> {
        let (bits, min) = match ty {
            GgmlType::Q8_0 => (8, false),
            GgmlType::Q4_0 => (4, false),
            GgmlType::Q4_1 => (4, true),
            GgmlType::Q5_0 => (5, false),
            GgmlType::Q5_1 => (5, true),
            _ => return None,
        };
        Some(Spec { bits, min })
    }

    /// Where a quad's fifth bits lie (5-bit types), after its codes.
    const fn high_at(self) -> usize {
        QUAD / 2
    }

    /// Where a quad's scales lie (its mins 8 bytes on).
    const fn scales_at(self) -> usize {
        match self.bits {
            8 => QUAD,
            5 => QUAD / 2 + QUAD / 8,
            _ => QUAD / 2,
        }
    }

    /// A file block's bytes: d at 0, m at 2 (with a min), the fifth bits
    /// as a u32 (5-bit types), then the codes.
    const fn file_high_at(self) -> usize {
        2 + 2 * self.min as usize
    }

    const fn file_codes_at(self) -> usize {
        self.file_high_at() + if self.bits == 5 { 4 } else { 0 }
    }

    /// The 32 codes of a file block: Q8_0's bytes; a 4-bit type's nibbles
    /// (low nibbles are values 0..16, high ones 16..32), with 5-bit types'
    /// fifth bit e of the u32 before them.
    fn file_codes(self, block: &[u8]) -> [u8; BLOCK] {
        let qs = &block[self.file_codes_at()..];
        if self.bits == 8 {
            return qs[..BLOCK].try_into().expect("32 codes");
        }
        let high = match self.bits {
            5 => u32::from_le_bytes(block[self.file_high_at()..][..4].try_into().unwrap()),
            _ => 0,
        };
        std::array::from_fn(|e| {
            let low = (qs[e % 16] >> (4 * (e / 16))) & 0x0F;
            low | (((high >> e) & 1) as u8) << 4
        })
    }
}

/// Whether the CPU keeps `ty` packed.
pub fn packs(ty: GgmlType) -> bool {
    Spec::of(ty).is_some()
}

fn spec(ty: GgmlType) -> Spec {
    Spec::of(ty).unwrap_or_else(|| panic!("{ty} is not packed"))
}

/// Bytes of a packed quad of `ty`: as many as its 4 blocks in the file.
pub(super) const fn quad_bytes(ty: GgmlType) -> usize {
    4 * ty.type_size()
}

/// Bytes of a packed row of `k` values (k a whole number of blocks).
pub fn row_bytes(ty: GgmlType, k: usize) -> usize {
    k.div_ceil(QUAD) * quad_bytes(ty)
}

/// Where value v (0..128) of a quad goes in the split halves: (half, index).
fn split_at(v: usize) -> (usize, usize) {
    let (lane, i) = (v / GROUP, v % GROUP);
    (i / 4, 4 * lane + i % 4)
}

/// Rows of `ty` blocks (k values a row, as a file lays them out) repacked
/// into `out` (`row_bytes` a row), rows in parallel. `ty` is one `packs`
/// takes; `data` and `out` hold the same number of rows.
pub fn pack(ty: GgmlType, data: &[u8], k: usize, out: &mut [u8]) {
    let (spec, size) = (spec(ty), ty.type_size());
    let (file_row, packed_row) = (k / BLOCK * size, row_bytes(ty, k));
    if file_row == 0 {
        return;
    }
    assert_eq!(data.len() / file_row * packed_row, out.len());
    out.par_chunks_exact_mut(packed_row)
        .zip(data.par_chunks_exact(file_row))
        .with_min_len(16)
        .for_each(|(dst, src)| {
            for (quad, dst) in src.chunks(4 * size).zip(dst.chunks_exact_mut(4 * size)) {
                pack_quad(spec, size, quad, dst);
            }
        });
}

/// The packed quad of 1 to 4 file blocks of `size` bytes (`quad`), zero
/// blocks after them, into `whole`.
fn pack_quad(spec: Spec, size: usize, quad: &[u8], whole: &mut [u8]) {
    let mut halves = [[0u8; QUAD / 2]; 2];
    whole.fill(0);
    for (b, block) in quad.chunks_exact(size).enumerate() {
        let codes = spec.file_codes(block);
        for g in 0..BLOCK / GROUP {
            let lane = 4 * b + g;
            halves[0][4 * lane..4 * lane + 4].copy_from_slice(&codes[8 * g..8 * g + 4]);
            halves[1][4 * lane..4 * lane + 4].copy_from_slice(&codes[8 * g + 4..8 * g + 8]);
        }
        let scales = spec.scales_at() + 2 * b;
        whole[scales..scales + 2].copy_from_slice(&block[..2]);
        if spec.min {
            whole[scales + 8..scales + 10].copy_from_slice(&block[2..4]);
        }
    }
    if spec.bits == 8 {
        whole[..QUAD / 2].copy_from_slice(&halves[0]);
        whole[QUAD / 2..QUAD].copy_from_slice(&halves[1]);
    } else {
        for t in 0..QUAD / 2 {
            whole[t] = halves[0][t] & 0x0F | (halves[1][t] & 0x0F) << 4;
        }
    }
    if spec.bits == 5 {
        for (h, half) in halves.iter().enumerate() {
            let bits = (0..QUAD / 2).fold(0u64, |bits, t| bits | ((half[t] >> 4) as u64 & 1) << t);
            whole[spec.high_at() + 8 * h..][..8].copy_from_slice(&bits.to_le_bytes());
        }
    }
}

/// Row `r` of a packed matrix (k values a row) back in the file's layout,
/// into `out` (exactly its k / 32 blocks).
pub fn unpack_row(ty: GgmlType, packed: &[u8], r: usize, k: usize, out: &mut [u8]) {
    let (spec, size) = (spec(ty), ty.type_size());
    let row = &packed[r * row_bytes(ty, k)..(r + 1) * row_bytes(ty, k)];
    assert_eq!(out.len(), k / BLOCK * size);
    out.fill(0);
    for (whole, blocks) in row.chunks_exact(4 * size).zip(out.chunks_mut(4 * size)) {
        for (b, block) in blocks.chunks_exact_mut(size).enumerate() {
            let scales = spec.scales_at() + 2 * b;
            block[..2].copy_from_slice(&whole[scales..scales + 2]);
            if spec.min {
                block[2..4].copy_from_slice(&whole[scales + 8..scales + 10]);
            }
            let (high, codes) = (spec.file_high_at(), spec.file_codes_at());
            for e in 0..BLOCK {
                let (half, at) = split_at(BLOCK * b + e);
                if spec.bits == 8 {
                    block[codes + e] = whole[QUAD / 2 * half + at];
                    continue;
                }
                let low = (whole[at] >> (4 * half)) & 0x0F;
                block[codes + e % 16] |= low << (4 * (e / 16));
                if spec.bits == 5 {
                    let bit = (whole[spec.high_at() + 8 * half + at / 8] >> (at % 8)) & 1;
                    block[high + e / 8] |= bit << (e % 8);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// Every row, every ragged length (whole quads and 1 to 3 blocks
    /// after them), comes back as the file's bytes.
    #[test]
    fn unpack_row_inverts_pack() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            for blocks in 1..=9 {
                let (rows, k) = (3, blocks * BLOCK);
                let data = random_bytes(rows * blocks * ty.type_size(), 7 + blocks as u64);
                let mut packed = vec![0xA5; rows * row_bytes(ty, k)];
                pack(ty, &data, k, &mut packed);
                let mut row = vec![0u8; blocks * ty.type_size()];
                for r in 0..rows {
                    unpack_row(ty, &packed, r, k, &mut row);
                    let file = &data[r * row.len()..(r + 1) * row.len()];
                    assert_eq!(row, file, "{ty} {blocks} blocks, row {r}");
                }
            }
        }
    }

    /// The layout the kernels read: value 8l + i of lane l at 4l + i of
    /// the even half, 8l + 4 + i of the odd; the scales after the codes;
    /// the pad after the last block all zero.
    #[test]
    fn a_quad_holds_the_halves_then_the_scales() {
        // One Q8_0 row of 5 blocks: block b's value e is b·32 + e (mod 256),
        // its scale bytes [b, 0x3C].
        let mut data = Vec::new();
        for b in 0..5u8 {
            data.extend_from_slice(&[b, 0x3C]);
            data.extend((0..32u8).map(|e| b.wrapping_mul(32).wrapping_add(e)));
        }
        let mut packed = vec![0xA5; row_bytes(GgmlType::Q8_0, 5 * BLOCK)];
        pack(GgmlType::Q8_0, &data, 5 * BLOCK, &mut packed);
        let first = &packed[..quad_bytes(GgmlType::Q8_0)];
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let spec = spec(ty);
            let end = spec.scales_at() + 8 * (1 + spec.min as usize);
            assert_eq!(end, quad_bytes(ty), "{ty}: a quad is 4 blocks long");
        }
        assert_eq!(&first[..8], &[0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(&first[64..72], &[4, 5, 6, 7, 12, 13, 14, 15]);
        assert_eq!(&first[128..], &[0, 0x3C, 1, 0x3C, 2, 0x3C, 3, 0x3C]);
        assert_eq!(first.len(), 4 * GgmlType::Q8_0.type_size());
        // The last block, then 3 zero blocks.
        let second = &packed[quad_bytes(GgmlType::Q8_0)..];
        assert_eq!(&second[..4], &[128, 129, 130, 131]);
        assert_eq!(&second[64..68], &[132, 133, 134, 135]);
        assert!(second[16..64].iter().all(|&c| c == 0), "zero blocks' codes");
        assert_eq!(&second[128..], &[4, 0x3C, 0, 0, 0, 0, 0, 0]);
    }
}
