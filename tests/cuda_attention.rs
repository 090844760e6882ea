//! The flash-style prefill attention kernel (`attention_prefill_bf16`,
//! kernels/attention.cu version 2) in the CPU emulator, launched by name:
//! `out` against the CPU device's attention and against version 1
//! (`attention_fwd_bf16`), `lse` against an f64 reference computed here.
//! Outputs are poisoned with NaN before each launch, and cache rows past
//! pos0 + n hold NaN, so a kernel that reads them fails.
#![cfg(feature = "emu")]

mod common;

use common::max_rel_err;
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::Emu;
use engine::backend::cuda::emu::{self, LaneOrder};
use engine::backend::cuda::Cuda;
use engine::backend::Backend;
use engine::tensor::DType::{BF16, F32};
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::c_void;

/// bf16 outputs, measured against the largest reference value (as in cuda_ops.rs).
const BF16_TOL: f32 = 1e-2;
/// lse: |Δ| ≤ LSE_TOL · max(1, |ref|) per element (the scores come from
/// exact bf16 products summed in f32; an lse near 0 is held to 1e-4 absolute).
const LSE_TOL: f64 = 1e-4;
/// The kernel's tiles: queries per block, threads per block.
const BQ: usize = 64;
const THREADS: u32 = 128;

fn gpu() -> Cuda<Emu> {
    Cuda::new(Emu::new())
}

fn rng() -> StdRng {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// Random values already representable in bf16, so every path sees the same inputs.
fn data(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| half::bf16::from_f32(rng.random_range(-scale..scale)).to_f32())
        .collect()
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    hd: usize,
    pos0: usize,
    n: usize,
}

/// Inputs of one case: q [n, heads·hd]; k, v [pos0 + n + 3, kv_heads·hd]
/// with the 3 rows past pos0 + n set to NaN.
struct Case {
    s: Shape,
    cap: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Case {
    fn new(r: &mut StdRng, s: Shape, scale: f32) -> Self {
        let cap = s.pos0 + s.n + 3;
        let kvw = s.kv_heads * s.hd;
        let valid = (s.pos0 + s.n) * kvw;
        let mut k = data(r, cap * kvw, scale);
        let mut v = data(r, cap * kvw, 2.0);
        k[valid..].fill(f32::NAN);
        v[valid..].fill(f32::NAN);
        Case {
            s,
            cap,
            q: data(r, s.n * s.heads * s.hd, scale),
            k,
            v,
        }
    }

    /// The CPU device's attention output.
    fn cpu(&self) -> Vec<f32> {
        let Shape {
            heads,
            kv_heads,
            hd,
            pos0,
            n,
        } = self.s;
        let up = |x: &[f32], rows, cols| Cpu.upload(x.to_vec(), &[rows, cols], F32).unwrap();
        let q = up(&self.q, n, heads * hd);
        let k = up(&self.k, self.cap, kv_heads * hd);
        let v = up(&self.v, self.cap, kv_heads * hd);
        let mut out = Cpu.zeros(&[n, heads * hd], F32).unwrap();
        Cpu.attention(&mut out, None, &q, &k, &v, heads, kv_heads, pos0)
            .unwrap();
        Cpu.download(&out).unwrap()
    }

    /// lse[h, i] = ln Σ_{j ≤ pos0+i} exp(q[i,h]·k[j,g] / sqrt(hd)), in f64.
    fn lse_ref(&self) -> Vec<f64> {
        let Shape {
            heads,
            kv_heads,
            hd,
            pos0,
            n,
        } = self.s;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut lse = vec![0.0; heads * n];
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            for i in 0..n {
                let qi = &self.q[i * heads * hd + h * hd..][..hd];
                let s: Vec<f64> = (0..=pos0 + i)
                    .map(|j| {
                        let kj = &self.k[j * kv_heads * hd + g * hd..][..hd];
                        qi.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                lse[h * n + i] = max + s.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            }
        }
        lse
    }
}

/// Device copies of a case's inputs and NaN-poisoned outputs.
struct Dev {
    q: Tensor<Cuda<Emu>>,
    k: Tensor<Cuda<Emu>>,
    v: Tensor<Cuda<Emu>>,
    out: Tensor<Cuda<Emu>>,
    lse: Tensor<Cuda<Emu>>,
}

impl Dev {
    fn new(g: &Cuda<Emu>, c: &Case) -> Self {
        let Shape {
            heads,
            kv_heads,
            hd,
            n,
            ..
        } = c.s;
        let kvw = kv_heads * hd;
        Dev {
            q: g.upload(c.q.clone(), &[n, heads * hd], BF16).unwrap(),
            k: g.upload(c.k.clone(), &[c.cap, kvw], BF16).unwrap(),
            v: g.upload(c.v.clone(), &[c.cap, kvw], BF16).unwrap(),
            out: g
                .upload(vec![f32::NAN; n * heads * hd], &[n, heads * hd], BF16)
                .unwrap(),
            lse: g
                .upload(vec![f32::NAN; heads * n], &[heads, n], F32)
                .unwrap(),
        }
    }

    /// Runs `attention_prefill_bf16`; returns (out, lse).
    fn prefill(
        &mut self,
        g: &Cuda<Emu>,
        s: Shape,
        order: LaneOrder,
    ) -> engine::Result<(Vec<f32>, Vec<f32>)> {
        let (mut out, mut lse) = (self.out.buf.ptr, self.lse.buf.ptr);
        let (mut q, mut k, mut v) = (self.q.buf.ptr, self.k.buf.ptr, self.v.buf.ptr);
        let [mut n, mut heads, mut kv_heads, mut hd, mut pos0] =
            [s.n, s.heads, s.kv_heads, s.hd, s.pos0].map(|x| x as i32);
        let mut args: [*mut c_void; 10] = [
            (&raw mut out).cast(),
            (&raw mut lse).cast(),
            (&raw mut q).cast(),
            (&raw mut k).cast(),
            (&raw mut v).cast(),
            (&raw mut n).cast(),
            (&raw mut heads).cast(),
            (&raw mut kv_heads).cast(),
            (&raw mut hd).cast(),
            (&raw mut pos0).cast(),
        ];
        let grid = (s.n.div_ceil(BQ) as u32, s.heads as u32, 1);
        // SAFETY: the arguments are, in order, the kernel's (bf16* out, float*
        // lse, const bf16* q, k, v, int n, heads, kv_heads, hd, pos0), each
        // pointing at a live local of that type (device pointers are u64);
        // out is [n, heads·hd] bf16, lse [heads, n] f32, q [n, heads·hd],
        // k and v [pos0 + n + 3, kv_heads·hd] bf16, allocated by `g` and
        // alive for the launch; the kernel touches only those ranges.
        unsafe {
            emu::launch_ordered(
                "attention_prefill_bf16",
                grid,
                (THREADS, 1, 1),
                0,
                &mut args,
                order,
            )?
        };
        Ok((g.download(&self.out)?, g.download(&self.lse)?))
    }

    /// Runs version 1, `attention_fwd_bf16`, into a fresh NaN-poisoned output.
    fn version1(&mut self, g: &Cuda<Emu>, s: Shape) -> Vec<f32> {
        let width = s.heads * s.hd;
        let o = g
            .upload(vec![f32::NAN; s.n * width], &[s.n, width], BF16)
            .unwrap();
        let mut out = o.buf.ptr;
        let (mut q, mut k, mut v) = (self.q.buf.ptr, self.k.buf.ptr, self.v.buf.ptr);
        let [mut heads, mut kv_heads, mut hd, mut pos0] =
            [s.heads, s.kv_heads, s.hd, s.pos0].map(|x| x as i32);
        let mut args: [*mut c_void; 8] = [
            (&raw mut out).cast(),
            (&raw mut q).cast(),
            (&raw mut k).cast(),
            (&raw mut v).cast(),
            (&raw mut heads).cast(),
            (&raw mut kv_heads).cast(),
            (&raw mut hd).cast(),
            (&raw mut pos0).cast(),
        ];
        // SAFETY: the arguments are the kernel's (bf16* out, const bf16* q, k,
        // v, int heads, kv_heads, hd, pos0), each pointing at a live local of
        // that type; out and q are [n, heads·hd] bf16 and the grid has n
        // rows; k and v hold pos0 + n + 3 rows of kv_heads·hd.
        unsafe {
            emu::launch(
                "attention_fwd_bf16",
                (s.n as u32, s.heads as u32, 1),
                (THREADS, 1, 1),
                0,
                &mut args,
            )
            .unwrap()
        };
        g.download(&o).unwrap()
    }
}

fn check_lse(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (idx, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= LSE_TOL * w.abs().max(1.0),
            "{what}: lse[{idx}] = {g}, want {w} (|Δ| {err:e})"
        );
    }
}

/// One case: out against the CPU device (and version 1 if asked), lse
/// against the f64 reference.
fn check_case(g: &Cuda<Emu>, r: &mut StdRng, s: Shape, scale: f32, order: LaneOrder, v1: bool) {
    let what = format!("{s:?} scale {scale} {order:?}");
    let c = Case::new(r, s, scale);
    let mut d = Dev::new(g, &c);
    let (out, lse) = d
        .prefill(g, s, order)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = c.cpu();
    let err = max_rel_err(&out, &want);
    assert!(err <= BF16_TOL, "{what}: out max relative error {err:e}");
    check_lse(&what, &lse, &c.lse_ref());
    if v1 {
        let old = d.version1(g, s);
        let err = max_rel_err(&out, &old);
        assert!(err <= BF16_TOL, "{what}: against version 1: {err:e}");
    }
}

const HEADS: [(usize, usize); 4] = [(4, 4), (4, 2), (9, 3), (6, 1)];
const POS_N: [(usize, usize); 5] = [(0, 1), (0, 17), (5, 33), (0, 130), (100, 64)];

fn grid(hd: usize) {
    let (g, mut r) = (gpu(), rng());
    for (heads, kv_heads) in HEADS {
        for (pos0, n) in POS_N {
            let s = Shape {
                heads,
                kv_heads,
                hd,
                pos0,
                n,
            };
            check_case(&g, &mut r, s, 2.0, LaneOrder::Default, true);
        }
    }
}

#[test]
fn prefill_hd8() {
    grid(8);
}

#[test]
fn prefill_hd64() {
    grid(64);
}

#[test]
fn prefill_hd128() {
    grid(128);
}

/// hd 16 and 32, GQA, a ragged tail of queries.
#[test]
fn prefill_other_head_dims() {
    let (g, mut r) = (gpu(), rng());
    for hd in [16, 32] {
        for (pos0, n) in [(0, 1), (3, 70)] {
            let s = Shape {
                heads: 4,
                kv_heads: 2,
                hd,
                pos0,
                n,
            };
            check_case(&g, &mut r, s, 2.0, LaneOrder::Default, false);
        }
    }
}

/// Large scores: the row maximum moves from tile to tile, so the rescaling
/// of the accumulator and normaliser is exercised hard.
#[test]
fn prefill_peaked_scores() {
    let (g, mut r) = (gpu(), rng());
    for (hd, pos0, n) in [(64, 100, 64), (128, 0, 130), (8, 70, 9)] {
        let s = Shape {
            heads: 4,
            kv_heads: 2,
            hd,
            pos0,
            n,
        };
        check_case(&g, &mut r, s, 6.0, LaneOrder::Default, false);
    }
}

/// Lanes and blocks in reverse order, whatever the environment says.
#[test]
fn prefill_reverse_lanes() {
    let (g, mut r) = (gpu(), rng());
    for (hd, pos0, n) in [(8, 5, 33), (64, 0, 130), (128, 100, 64)] {
        let s = Shape {
            heads: 9,
            kv_heads: 3,
            hd,
            pos0,
            n,
        };
        check_case(&g, &mut r, s, 2.0, LaneOrder::Reverse, false);
    }
}

/// A head width outside {8, 16, 32, 64, 128} traps rather than computing garbage.
#[test]
fn prefill_rejects_other_head_dims() {
    let (g, mut r) = (gpu(), rng());
    let s = Shape {
        heads: 2,
        kv_heads: 1,
        hd: 24,
        pos0: 0,
        n: 3,
    };
    let c = Case::new(&mut r, s, 1.0);
    let err = Dev::new(&g, &c)
        .prefill(&g, s, LaneOrder::Default)
        .expect_err("hd 24 must trap");
    assert!(err.to_string().contains("trap"), "{err}");
}
