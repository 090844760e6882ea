//! Kernel microbenchmarks, in the way of llm.c's dev/cuda: every kernel of the
//! CUDA device, every version of it in kernels/*.cu side by side, at
//! SmolLM2-135M shapes (d 576, FFN 1536, 9 heads / 3 KV heads of 64, vocab
//! 49152) for a prefill of 128 and of 512 tokens and for one decode step over a
//! 512-token cache.
//!
//! Each case first runs once on random bf16-representable inputs, its output
//! poisoned with NaN, and is compared with the CPU device (tolerances of
//! tests/cuda_ops.rs); a kernel that disagrees is reported and not timed, and
//! the bench exits with status 1.
//!
//! - On a GPU (`--device cuda`, the default where the driver library is
//!   present): warm-up, then the median of samples of back-to-back launches
//!   timed with CUDA events. GB/s counts the bytes a kernel must move at least
//!   (each input read once, each output written once; L2 is not flushed
//!   between launches), TFLOP/s the multiply-adds of matmul and attention.
//!   Each matmul shape gets a cuBLAS row (bf16 in, f32 compute), the upper
//!   bound, and each version its time over cuBLAS's.
//! - Without one (`--device emu`, needs `--features emu`): the same cases
//!   through the CPU emulator, as a check — the times are emulator wall time,
//!   not GPU performance — then the static figures of `engine kernels check`
//!   (registers, shared memory, spills) where the CUDA tools are installed
//!   (scripts/cuda-tools.sh).
//!
//!   cargo bench --bench kernels [-- --device cuda|emu] [--filter TEXT] [--repeats N]
//!   cargo bench --features emu --bench kernels
//!
//! Kernels are found by name in the embedded sources
//! (`engine::backend::cuda::sources::KERNELS`); each needs a line in [`SPECS`]
//! saying what it computes and how its launcher launches it. Entry points
//! without one are listed under the table; lines whose kernel is absent are
//! skipped.

use anyhow::{bail, Context as _, Result};
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::{DevicePtr, GpuDriver};
use engine::backend::cuda::{real, sources, Cuda};
use engine::backend::sample::{argmax, Sampler, SamplerConfig};
use engine::backend::Backend;
use engine::tensor::DType::{self, BF16, F32};
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::c_void;
use std::io::IsTerminal as _;
use std::time::Instant;

// SmolLM2-135M.
const D: usize = 576;
const FFN: usize = 1536;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HD: usize = 64;
const VOCAB: usize = 49152;
const THETA: f32 = 100_000.0;
const EPS: f32 = 1e-5;
/// The KV cache a decode step attends over.
const CACHE: usize = 512;

/// Tolerances of tests/cuda_ops.rs, relative to the largest reference value.
const BF16_TOL: f32 = 1e-2;
const F32_TOL: f32 = 1e-5;

/// What a kernel computes, its parameters, and its launcher's geometry.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    /// out[n, m] = x[n, k] · w[m, k]ᵀ: (out, x, w, n, m, k); grid
    /// (ceil(m / tile_m), ceil(n / tile_n)), block `threads`.
    Matmul {
        f32_out: bool,
        tile_n: usize,
        tile_m: usize,
        threads: u32,
    },
    /// The same product by cuBLAS (the baseline row; GPU only).
    Cublas { f32_out: bool },
    /// (out, q, k, v, heads, kv_heads, hd, pos0); grid (n, heads), block 128.
    Attention,
    /// (out, lse, q, k, v, n, heads, kv_heads, hd, pos0); grid
    /// (ceil(n / 64), heads), block 128.
    AttentionPrefill,
    /// (out, x, weight, d, eps); a block of 256 per row.
    Rmsnorm { f32_in: bool },
    /// (x, n, heads, hd, pos0, theta), in place; grid-stride over pairs.
    Rope,
    /// (out, gate, up, n); grid-stride.
    Swiglu,
    /// (x, y, n): x += y; grid-stride.
    Add { f32_x: bool },
    /// (out, ids, table, d); a block of 256 per row.
    Embedding { f32_out: bool },
    /// (out, x, d); a block of 256 per row.
    LogSoftmax,
    /// (out ids, logits, vocab); a block of 1024 per row.
    Argmax,
    /// (out ids, logits, vocab, temperature, top_k, top_p, u); a block of
    /// 1024 per row.
    Sample,
}

struct Spec {
    name: &'static str,
    family: Family,
    /// The kernel's parameter count, checked against its source.
    params: usize,
}

const fn spec(name: &'static str, family: Family, params: usize) -> Spec {
    Spec {
        name,
        family,
        params,
    }
}

const fn matmul(name: &'static str, f32_out: bool, tile: (usize, usize), threads: u32) -> Spec {
    let family = Family::Matmul {
        f32_out,
        tile_n: tile.0,
        tile_m: tile.1,
        threads,
    };
    spec(name, family, 6)
}

/// Every kernel the bench can launch, versions of one kernel in order.
const SPECS: &[Spec] = &[
    // Version 1: 64×64 tiles, 256 threads.
    matmul("matmul_nt_bf16", false, (64, 64), 256),
    matmul("matmul_nt_bf16_f32", true, (64, 64), 256),
    // Version 2, tensor cores: 64 rows × 128 columns of out, 4 warps.
    matmul("matmul_nt_mma_bf16", false, (64, 128), 128),
    matmul("matmul_nt_mma_bf16_f32", true, (64, 128), 128),
    spec("attention_fwd_bf16", Family::Attention, 8),
    spec("attention_prefill_bf16", Family::AttentionPrefill, 10),
    spec("rmsnorm_fwd_bf16", Family::Rmsnorm { f32_in: false }, 5),
    spec("rmsnorm_fwd_f32_bf16", Family::Rmsnorm { f32_in: true }, 5),
    spec("rope_fwd_bf16", Family::Rope, 6),
    spec("swiglu_fwd_bf16", Family::Swiglu, 4),
    spec("add_scaled_bf16", Family::Add { f32_x: false }, 3),
    spec("add_scaled_f32_bf16", Family::Add { f32_x: true }, 3),
    spec(
        "embedding_fwd_bf16",
        Family::Embedding { f32_out: false },
        4,
    ),
    spec(
        "embedding_fwd_bf16_f32",
        Family::Embedding { f32_out: true },
        4,
    ),
    spec("log_softmax_f32", Family::LogSoftmax, 3),
    spec("sample_argmax_f32", Family::Argmax, 3),
    spec("sample_f32", Family::Sample, 7),
];

/// The cuBLAS rows (parameter counts unused).
const CUBLAS: [Spec; 2] = [
    spec("cuBLAS gemm_ex", Family::Cublas { f32_out: false }, 0),
    spec("cuBLAS gemm_ex", Family::Cublas { f32_out: true }, 0),
];

/// One row of the table: a kernel on one problem. `n` rows (tokens) at
/// positions pos0.., and for a matmul w [m, k].
struct Case {
    phase: &'static str,
    /// The layer and shape, e.g. "gate,up [512,576]·[1536,576]ᵀ".
    what: String,
    spec: &'static Spec,
    n: usize,
    pos0: usize,
    m: usize,
    k: usize,
}

impl Case {
    /// The bytes the kernel must move at least: each input read once, each
    /// output written once.
    fn bytes(&self) -> f64 {
        let size = |f32: bool| if f32 { 4 } else { 2 };
        let (n, m, k) = (self.n, self.m, self.k);
        let qkv = 2 * (2 * n * HEADS * HD) + 2 * (2 * (self.pos0 + n) * KV_HEADS * HD);
        let b = match self.spec.family {
            Family::Matmul { f32_out, .. } | Family::Cublas { f32_out } => {
                2 * n * k + 2 * m * k + size(f32_out) * n * m
            }
            Family::Attention => qkv,
            Family::AttentionPrefill => qkv + 4 * HEADS * n,
            Family::Rmsnorm { f32_in } => n * D * size(f32_in) + 2 * D + 2 * n * D,
            Family::Rope => 2 * 2 * n * HEADS * HD,
            Family::Swiglu => 3 * 2 * n * FFN,
            Family::Add { f32_x } => n * D * (2 * size(f32_x) + 2),
            Family::Embedding { f32_out } => 4 * n + n * D * (2 + size(f32_out)),
            Family::LogSoftmax => 8 * n * VOCAB,
            Family::Argmax | Family::Sample => 4 * n * VOCAB + 4 * n,
        };
        b as f64
    }

    /// Floating-point operations of matmul and attention (a multiply-add is
    /// two); None for the others.
    fn flops(&self) -> Option<f64> {
        match self.spec.family {
            Family::Matmul { .. } | Family::Cublas { .. } => {
                Some(2.0 * (self.n * self.m * self.k) as f64)
            }
            Family::Attention | Family::AttentionPrefill => {
                // Query i sees pos0 + i + 1 keys: q·k and p·v, hd each.
                let keys: usize = (0..self.n).map(|i| self.pos0 + i + 1).sum();
                Some(4.0 * (HEADS * HD * keys) as f64)
            }
            _ => None,
        }
    }
}

/// The cases in table order: by phase, then layer; the versions of a kernel
/// next to each other, each matmul shape followed by cuBLAS.
fn cases(specs: &[&'static Spec], with_cublas: bool) -> Vec<Case> {
    let phases = [
        ("prefill 128", 128, 0),
        ("prefill 512", 512, 0),
        ("decode @512", 1, CACHE - 1),
    ];
    // The projections (bf16 out) and the LM head (f32 logits: every row when
    // scoring a prompt, the last one when generating).
    let matmuls = [
        ("q,o", D, D, false),
        ("k,v", KV_HEADS * HD, D, false),
        ("gate,up", FFN, D, false),
        ("down", D, FFN, false),
        ("lm head", VOCAB, D, true),
    ];
    let mut out = Vec::new();
    for (phase, n, pos0) in phases {
        let case = |what: String, spec, m, k| Case {
            phase,
            what,
            spec,
            n,
            pos0,
            m,
            k,
        };
        for (layer, m, k, f32_out) in matmuls {
            let what = format!("{layer} [{n},{k}]·[{m},{k}]ᵀ");
            let versions: Vec<&'static Spec> = specs
                .iter()
                .copied()
                .filter(|s| matches!(s.family, Family::Matmul { f32_out: f, .. } if f == f32_out))
                .collect();
            for &s in &versions {
                out.push(case(what.clone(), s, m, k));
            }
            if with_cublas && !versions.is_empty() {
                out.push(case(what, &CUBLAS[usize::from(f32_out)], m, k));
            }
        }
        for &s in specs {
            let what = match s.family {
                Family::Matmul { .. } | Family::Cublas { .. } => continue,
                // A prefill kernel; decode has its own.
                Family::AttentionPrefill if n == 1 => continue,
                Family::Attention | Family::AttentionPrefill => {
                    format!("{HEADS}/{KV_HEADS} heads of {HD}, {n} q × {} k", pos0 + n)
                }
                Family::Rmsnorm { .. } | Family::Add { .. } => format!("[{n},{D}]"),
                Family::Rope => format!("q [{n},{}], {HEADS} heads", HEADS * HD),
                Family::Swiglu => format!("[{n},{FFN}]"),
                Family::Embedding { .. } => format!("{n} ids, table [{VOCAB},{D}]"),
                Family::LogSoftmax => format!("[{n},{VOCAB}]"),
                // Sampling reads the last position's logits, once a step.
                Family::Argmax | Family::Sample if n > 1 => continue,
                Family::Argmax => format!("[1,{VOCAB}]"),
                Family::Sample => format!("[1,{VOCAB}], T 0.8, top-k 50, top-p 0.95"),
            };
            out.push(case(what, s, 0, 0));
        }
    }
    out
}

/// Kernel arguments in cuLaunchKernel's form, one 8-byte slot each.
#[derive(Default)]
struct Args(Vec<u64>);

impl Args {
    fn ptr(mut self, p: DevicePtr) -> Self {
        self.0.push(p);
        self
    }
    fn int(mut self, v: usize) -> Self {
        self.0
            .push(i32::try_from(v).expect("int argument") as u32 as u64);
        self
    }
    fn float(mut self, v: f32) -> Self {
        self.0.push(v.to_bits() as u64);
        self
    }
}

/// How a prepared case is launched.
enum Call {
    Kernel {
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        args: Args,
    },
    /// out[n, m] = x[n, k] · w[m, k]ᵀ by cuBLAS.
    Cublas {
        out: DevicePtr,
        x: DevicePtr,
        w: DevicePtr,
        n: usize,
        m: usize,
        k: usize,
        f32_out: bool,
    },
}

/// A case ready to launch: its device tensors (kept alive here, `call` holds
/// their addresses), the CPU device's answer and how to compare with it.
struct Prepared<D: GpuDriver> {
    _inputs: Vec<Tensor<Cuda<D>>>,
    out: Tensor<Cuda<D>>,
    want: Vec<f32>,
    /// None: token ids, compared exactly (stored as the bits of f32s).
    tol: Option<f32>,
    call: Call,
}

enum Outcome {
    /// Agrees with the CPU (max relative error), then timed (s per launch).
    Ok {
        err: f32,
        secs: f64,
    },
    /// Disagrees with the CPU device: how.
    Mismatch(String),
    Failed(String),
}

/// Seconds per launch of `launch`, given the wall time of the check launch
/// (the emulator's first sample).
type Timer<'a> = dyn Fn(f64, &mut dyn FnMut() -> Result<()>) -> Result<f64> + 'a;

/// Runs a cuBLAS call (GPU only).
type Gemm<'a> = dyn Fn(&Call) -> Result<()> + 'a;

struct Bench<'a, D: GpuDriver> {
    gpu: Cuda<D>,
    /// A real GPU: GB/s, TFLOP/s and cuBLAS columns.
    real: bool,
    timer: &'a Timer<'a>,
    gemm: Option<&'a Gemm<'a>>,
}

fn blocks_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65535) as u32
}

fn dtype(f32: bool) -> DType {
    if f32 {
        F32
    } else {
        BF16
    }
}

/// Random values representable in bf16, so both devices see the same inputs.
fn data(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| half::bf16::from_f32(rng.random_range(-scale..scale)).to_f32())
        .collect()
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want) {
        let e = (g - w).abs() / scale;
        if e.is_nan() {
            return f32::INFINITY;
        }
        worst = worst.max(e);
    }
    worst
}

fn cpu(v: &[f32], shape: &[usize]) -> Result<Tensor<Cpu>> {
    Ok(Cpu.upload(v.to_vec(), shape, F32)?)
}

impl<D: GpuDriver> Bench<'_, D> {
    fn up(&self, v: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor<Cuda<D>>> {
        Ok(self.gpu.upload(v.to_vec(), shape, dtype)?)
    }

    /// An output filled with NaN, so elements a kernel skips show.
    fn poisoned(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Cuda<D>>> {
        self.up(&vec![f32::NAN; shape.iter().product()], shape, dtype)
    }

    /// Inputs on both devices, the CPU device's answer, and the launch.
    fn prepare(&self, case: &Case, rng: &mut StdRng) -> Result<Prepared<D>> {
        let (n, pos0, m, k) = (case.n, case.pos0, case.m, case.k);
        let kernel = |grid: (usize, usize), block, args| Call::Kernel {
            name: case.spec.name,
            grid: (grid.0 as u32, grid.1 as u32, 1),
            block,
            args,
        };
        let bf16 = Some(BF16_TOL);
        let tol = |f32: bool| Some(if f32 { F32_TOL } else { BF16_TOL });
        Ok(match case.spec.family {
            Family::Matmul { f32_out, .. } | Family::Cublas { f32_out } => {
                let (xv, wv) = (data(rng, n * k, 1.0), data(rng, m * k, 1.0));
                let mut want = Cpu.zeros(&[n, m], F32)?;
                Cpu.matmul_nt(&mut want, &cpu(&xv, &[n, k])?, &cpu(&wv, &[m, k])?)?;
                let (x, w) = (self.up(&xv, &[n, k], BF16)?, self.up(&wv, &[m, k], BF16)?);
                let out = self.poisoned(&[n, m], dtype(f32_out))?;
                let call = match case.spec.family {
                    Family::Matmul {
                        tile_n,
                        tile_m,
                        threads,
                        ..
                    } => {
                        let args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr);
                        let args = args.ptr(w.buf.ptr).int(n).int(m).int(k);
                        kernel((m.div_ceil(tile_m), n.div_ceil(tile_n)), threads, args)
                    }
                    _ => Call::Cublas {
                        out: out.buf.ptr,
                        x: x.buf.ptr,
                        w: w.buf.ptr,
                        n,
                        m,
                        k,
                        f32_out,
                    },
                };
                Prepared {
                    _inputs: vec![x, w],
                    out,
                    want: want.buf,
                    tol: tol(f32_out),
                    call,
                }
            }
            Family::Attention | Family::AttentionPrefill => {
                let (width, kv_width, cap) = (HEADS * HD, KV_HEADS * HD, pos0 + n);
                let qv = data(rng, n * width, 2.0);
                let (kv, vv) = (
                    data(rng, cap * kv_width, 2.0),
                    data(rng, cap * kv_width, 2.0),
                );
                let mut want = Cpu.zeros(&[n, width], F32)?;
                let (qc, kc, vc) = (
                    cpu(&qv, &[n, width])?,
                    cpu(&kv, &[cap, kv_width])?,
                    cpu(&vv, &[cap, kv_width])?,
                );
                Cpu.attention(&mut want, &qc, &kc, &vc, HEADS, KV_HEADS, pos0)?;
                let q = self.up(&qv, &[n, width], BF16)?;
                let kt = self.up(&kv, &[cap, kv_width], BF16)?;
                let vt = self.up(&vv, &[cap, kv_width], BF16)?;
                let out = self.poisoned(&[n, width], BF16)?;
                // The log-sum-exp the prefill kernel saves is not checked here.
                let lse = self.poisoned(&[HEADS, n], F32)?;
                let call = if case.spec.family == Family::Attention {
                    let args = Args::default().ptr(out.buf.ptr).ptr(q.buf.ptr);
                    let args = args.ptr(kt.buf.ptr).ptr(vt.buf.ptr);
                    let args = args.int(HEADS).int(KV_HEADS).int(HD).int(pos0);
                    kernel((n, HEADS), 128, args)
                } else {
                    let args = Args::default().ptr(out.buf.ptr).ptr(lse.buf.ptr);
                    let args = args.ptr(q.buf.ptr).ptr(kt.buf.ptr).ptr(vt.buf.ptr);
                    let args = args.int(n).int(HEADS).int(KV_HEADS).int(HD).int(pos0);
                    kernel((n.div_ceil(64), HEADS), 128, args)
                };
                Prepared {
                    _inputs: vec![q, kt, vt, lse],
                    out,
                    want: want.buf,
                    tol: bf16,
                    call,
                }
            }
            Family::Rmsnorm { f32_in } => {
                let (xv, wv) = (data(rng, n * D, 3.0), data(rng, D, 2.0));
                let mut want = Cpu.zeros(&[n, D], F32)?;
                Cpu.rmsnorm(&mut want, &cpu(&xv, &[n, D])?, &cpu(&wv, &[D])?, EPS)?;
                let x = self.up(&xv, &[n, D], dtype(f32_in))?;
                let w = self.up(&wv, &[D], BF16)?;
                let out = self.poisoned(&[n, D], BF16)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr);
                let args = args.ptr(w.buf.ptr).int(D).float(EPS);
                Prepared {
                    _inputs: vec![x, w],
                    out,
                    want: want.buf,
                    tol: bf16,
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::Rope => {
                // In place (so not poisoned), on q.
                let xv = data(rng, n * HEADS * HD, 2.0);
                let mut want = cpu(&xv, &[n, HEADS * HD])?;
                Cpu.rope(&mut want, HEADS, pos0, THETA)?;
                let out = self.up(&xv, &[n, HEADS * HD], BF16)?;
                let args = Args::default().ptr(out.buf.ptr).int(n).int(HEADS).int(HD);
                let args = args.int(pos0).float(THETA);
                let grid = blocks_for(n * HEADS * HD / 2) as usize;
                Prepared {
                    _inputs: vec![],
                    out,
                    want: want.buf,
                    tol: bf16,
                    call: kernel((grid, 1), 256, args),
                }
            }
            Family::Swiglu => {
                let (gv, uv) = (data(rng, n * FFN, 3.0), data(rng, n * FFN, 3.0));
                let mut want = Cpu.zeros(&[n, FFN], F32)?;
                Cpu.swiglu(&mut want, &cpu(&gv, &[n, FFN])?, &cpu(&uv, &[n, FFN])?)?;
                let gate = self.up(&gv, &[n, FFN], BF16)?;
                let up = self.up(&uv, &[n, FFN], BF16)?;
                let out = self.poisoned(&[n, FFN], BF16)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(gate.buf.ptr);
                let args = args.ptr(up.buf.ptr).int(n * FFN);
                Prepared {
                    _inputs: vec![gate, up],
                    out,
                    want: want.buf,
                    tol: bf16,
                    call: kernel((blocks_for(n * FFN) as usize, 1), 256, args),
                }
            }
            Family::Add { f32_x } => {
                // In place: x += alpha · y.
                let (xv, yv) = (data(rng, n * D, 3.0), data(rng, n * D, 3.0));
                let alpha = 0.75;
                let mut want = cpu(&xv, &[n, D])?;
                Cpu.add_scaled(&mut want, &cpu(&yv, &[n, D])?, alpha)?;
                let out = self.up(&xv, &[n, D], dtype(f32_x))?;
                let y = self.up(&yv, &[n, D], BF16)?;
                let args = Args::default()
                    .ptr(out.buf.ptr)
                    .ptr(y.buf.ptr)
                    .float(alpha)
                    .int(n * D);
                Prepared {
                    _inputs: vec![y],
                    out,
                    want: want.buf,
                    tol: tol(f32_x),
                    call: kernel((blocks_for(n * D) as usize, 1), 256, args),
                }
            }
            Family::Embedding { f32_out } => {
                let tv = data(rng, VOCAB * D, 1.0);
                let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect();
                let mut want = Cpu.zeros(&[n, D], F32)?;
                Cpu.embedding(&mut want, &ids, &cpu(&tv, &[VOCAB, D])?)?;
                let table = self.up(&tv, &[VOCAB, D], BF16)?;
                // The ids as the bits of an f32 tensor, which uploads byte for byte.
                let id_bits: Vec<f32> = ids.iter().map(|&i| f32::from_bits(i)).collect();
                let dev_ids = self.up(&id_bits, &[n], F32)?;
                let out = self.poisoned(&[n, D], dtype(f32_out))?;
                let args = Args::default().ptr(out.buf.ptr).ptr(dev_ids.buf.ptr);
                let args = args.ptr(table.buf.ptr).int(D);
                Prepared {
                    _inputs: vec![table, dev_ids],
                    out,
                    want: want.buf,
                    tol: tol(f32_out),
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::LogSoftmax => {
                let xv = data(rng, n * VOCAB, 20.0);
                let mut want = Cpu.zeros(&[n, VOCAB], F32)?;
                Cpu.log_softmax(&mut want, &cpu(&xv, &[n, VOCAB])?)?;
                let x = self.up(&xv, &[n, VOCAB], F32)?;
                let out = self.poisoned(&[n, VOCAB], F32)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr).int(VOCAB);
                Prepared {
                    _inputs: vec![x],
                    out,
                    want: want.buf,
                    tol: tol(true),
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::Argmax | Family::Sample => {
                let xv = data(rng, n * VOCAB, 20.0);
                let seed = rng.random();
                let cfg = SamplerConfig {
                    temperature: 0.8,
                    top_k: 50,
                    top_p: 0.95,
                    seed,
                };
                // The sampler's one uniform draw, which the kernel takes as an argument.
                let u: f32 = StdRng::seed_from_u64(seed).random();
                let want: Vec<f32> = xv
                    .chunks_exact(VOCAB)
                    .map(|row| match case.spec.family {
                        Family::Argmax => argmax(row),
                        _ => Sampler::new(cfg).sample(row),
                    })
                    .map(f32::from_bits)
                    .collect();
                let x = self.up(&xv, &[n, VOCAB], F32)?;
                // u32 ids, poisoned with a NaN pattern no id has.
                let out = self.poisoned(&[n], F32)?;
                let mut args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr).int(VOCAB);
                if case.spec.family == Family::Sample {
                    args = args.float(cfg.temperature).int(cfg.top_k);
                    args = args.float(cfg.top_p).float(u);
                }
                Prepared {
                    _inputs: vec![x],
                    out,
                    want,
                    tol: None,
                    call: kernel((n, 1), 1024, args),
                }
            }
        })
    }

    fn launch(&self, call: &Call) -> Result<()> {
        match call {
            Call::Kernel {
                name,
                grid,
                block,
                args,
            } => {
                let mut slots = args.0.clone();
                let mut ptrs: Vec<*mut c_void> = slots
                    .iter_mut()
                    .map(|s| s as *mut u64 as *mut c_void)
                    .collect();
                // SAFETY: `prepare` passes the kernel's parameters in order
                // with their types (their count checked against its source),
                // pointing into tensors that `Prepared` keeps alive, sized for
                // the grid its launcher uses.
                unsafe { (self.gpu.driver()).launch(name, *grid, (*block, 1, 1), 0, &mut ptrs)? };
                Ok(())
            }
            Call::Cublas { .. } => match self.gemm {
                Some(gemm) => gemm(call),
                None => bail!("cuBLAS runs on a GPU only"),
            },
        }
    }

    /// Checks the case against the CPU device, then times it.
    fn run(&self, case: &Case, rng: &mut StdRng) -> Result<Outcome> {
        let p = self.prepare(case, rng)?;
        let t0 = Instant::now();
        self.launch(&p.call)?;
        self.gpu.driver().synchronize()?;
        let first = t0.elapsed().as_secs_f64();
        let got = self.gpu.download(&p.out)?;
        let err = match p.tol {
            Some(tol) => {
                let err = max_rel_err(&got, &p.want);
                if err > tol {
                    let what = format!("max relative error {err:.1e} > {tol:.0e}");
                    return Ok(Outcome::Mismatch(what));
                }
                err
            }
            None => {
                let differ: Vec<(u32, u32)> = (got.iter().zip(&p.want))
                    .map(|(g, w)| (g.to_bits(), w.to_bits()))
                    .filter(|(g, w)| g != w)
                    .collect();
                if let Some((g, w)) = differ.first() {
                    let what = format!(
                        "token ids differ in {} of {} rows (first: kernel {g}, CPU {w})",
                        differ.len(),
                        got.len()
                    );
                    return Ok(Outcome::Mismatch(what));
                }
                0.0
            }
        };
        let secs = (self.timer)(first, &mut || self.launch(&p.call))?;
        self.gpu.driver().synchronize()?;
        Ok(Outcome::Ok { err, secs })
    }
}

/// `__global__` entry points of the embedded kernel sources, with their
/// parameter counts.
fn entry_points() -> Vec<(String, usize)> {
    sources::entry_points()
        .into_iter()
        .map(|e| (e.name, e.params))
        .collect()
}

fn fmt_time(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.2} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.2} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

/// Prints the rows as one aligned table.
fn print_table(rows: &[(Case, Outcome)], real: bool) {
    let time_head = if real {
        "time/launch"
    } else {
        "emu wall/launch"
    };
    let mut head = vec!["phase", "kernel", "shape", time_head];
    if real {
        head.extend(["GB/s", "TFLOP/s", "÷cuBLAS"]);
    }
    head.push("check vs CPU (max rel err)");
    let cublas_secs = |c: &Case| {
        rows.iter().find_map(|(r, o)| match (r.spec.family, o) {
            (Family::Cublas { .. }, Outcome::Ok { secs, .. })
                if r.phase == c.phase && r.what == c.what =>
            {
                Some(*secs)
            }
            _ => None,
        })
    };
    let mut table: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for (c, outcome) in rows {
        let mut cells = vec![c.phase.into(), c.spec.name.into(), c.what.clone()];
        let mut figures = vec![String::new(); if real { 3 } else { 0 }];
        let (time, check) = match outcome {
            Outcome::Ok { err, secs } => {
                if real {
                    figures[0] = format!("{:.1}", c.bytes() / secs / 1e9);
                    if let Some(f) = c.flops() {
                        figures[1] = format!("{:.2}", f / secs / 1e12);
                    }
                    if let (Family::Matmul { .. }, Some(base)) = (c.spec.family, cublas_secs(c)) {
                        figures[2] = format!("{:.2}", secs / base);
                    }
                }
                let check = match c.spec.family {
                    Family::Argmax | Family::Sample => "ok (same token ids)".into(),
                    _ => format!("ok ({err:.1e})"),
                };
                (fmt_time(*secs), check)
            }
            Outcome::Mismatch(what) => ("not timed".into(), format!("MISMATCH: {what}")),
            Outcome::Failed(e) => (
                "failed".into(),
                format!("FAILED: {}", e.lines().next().unwrap_or_default()),
            ),
        };
        cells.push(time);
        cells.extend(figures);
        cells.push(check);
        table.push(cells);
    }
    let cols = table[0].len();
    let width: Vec<usize> = (0..cols)
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (j, row) in table.iter().enumerate() {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = " ".repeat(width[i] - cell.chars().count());
            // Figures right-aligned, text left-aligned.
            if i >= 3 && i + 1 < cols {
                line += &format!("{pad}{cell}  ");
            } else {
                line += &format!("{cell}{pad}  ");
            }
        }
        println!("{}", line.trim_end());
        if j == 0 {
            println!(
                "{}",
                "-".repeat(width.iter().sum::<usize>() + 2 * (cols - 1))
            );
        }
    }
}

struct Options {
    device: Option<String>,
    filter: Option<String>,
    repeats: Option<usize>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        device: None,
        filter: None,
        repeats: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => o.device = Some(value()?),
            "--filter" => o.filter = Some(value()?.to_lowercase()),
            "--repeats" => o.repeats = Some(value()?.parse().context("--repeats N")?),
            "--bench" => {} // passed by `cargo bench`
            other => bail!(
                "unknown argument {other} (usage: cargo bench --bench kernels -- \
                 [--device cuda|emu] [--filter TEXT] [--repeats N])"
            ),
        }
    }
    Ok(o)
}

/// Runs every case (progress on stderr), then prints the header, the table
/// and notes on stdout. Returns the number of cases that disagree with the
/// CPU device or fail, and the kernels that ran.
fn run_all<D: GpuDriver>(
    bench: &Bench<D>,
    opts: &Options,
    header: &str,
) -> (usize, Vec<&'static str>) {
    let entries = entry_points();
    let mut usable = Vec::new();
    let mut notes = Vec::new();
    for s in SPECS {
        match entries.iter().find(|(n, _)| n == s.name) {
            None => notes.push(format!("{} is not in kernels/*.cu: skipped", s.name)),
            Some((_, p)) if *p != s.params => notes.push(format!(
                "{} now has {p} parameters, not {}: update its line in SPECS \
                 (benches/kernels.rs); not benchmarked",
                s.name, s.params
            )),
            Some(_) => usable.push(s),
        }
    }
    let unknown: Vec<&str> = entries
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !SPECS.iter().any(|s| s.name == *n))
        .collect();
    if !unknown.is_empty() {
        notes.push(format!(
            "no line in SPECS (benches/kernels.rs), not benchmarked: {}",
            unknown.join(", ")
        ));
    }
    let mut all = cases(&usable, bench.gemm.is_some());
    if let Some(f) = &opts.filter {
        all.retain(|c| {
            let text = format!("{} {} {}", c.phase, c.spec.name, c.what);
            text.to_lowercase().contains(f)
        });
    }

    let mut rng = StdRng::seed_from_u64(rand::rng().random());
    let (total, t0) = (all.len(), Instant::now());
    let progress = std::io::stderr().is_terminal();
    // Messages start on a new line after a progress line.
    let nl = if progress { "\n" } else { "" };
    let mut rows = Vec::new();
    let mut bad = 0;
    for (i, case) in all.into_iter().enumerate() {
        let name = format!("{} ({}, {})", case.spec.name, case.phase, case.what);
        if progress {
            eprint!("\r[{}/{total}] {name}\x1b[K", i + 1);
        }
        let outcome = bench
            .run(&case, &mut rng)
            .unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
        match &outcome {
            Outcome::Ok { .. } => {}
            Outcome::Mismatch(what) => {
                bad += 1;
                eprintln!("{nl}MISMATCH: {name} disagrees with the CPU device: {what}; not timed");
            }
            Outcome::Failed(e) => {
                bad += 1;
                eprintln!("{nl}FAILED: {name}: {e}");
            }
        }
        rows.push((case, outcome));
    }
    let clear = if progress { "\r\x1b[K" } else { "" };
    eprintln!(
        "{clear}{total} cases in {:.0} s",
        t0.elapsed().as_secs_f64()
    );

    println!("{header}");
    print_table(&rows, bench.real);
    for n in notes {
        println!("note: {n}");
    }
    if bad > 0 {
        println!("{bad} case(s) DISAGREE with the CPU device or failed: see above");
    }
    (bad, rows.iter().map(|(c, _)| c.spec.name).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A real GPU: CUDA events and cuBLAS.
mod gpu {
    use super::*;
    use cudarc::cublas::result::gemm_ex;
    use cudarc::cublas::sys::{
        cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
    };
    use cudarc::cublas::CudaBlas;
    use cudarc::driver::sys::CUevent_flags;
    use cudarc::driver::CudaContext;
    use engine::backend::cuda::real::Real;
    use std::sync::Arc;

    /// Median seconds per launch: a warm-up, then `samples` batches of
    /// back-to-back launches, each between two events on the null stream the
    /// driver launches on; a batch lasts about 0.2 ms, far above the events'
    /// resolution.
    fn time(
        ctx: &Arc<CudaContext>,
        samples: usize,
        launch: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64> {
        let stream = ctx.default_stream();
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let mut batch_time = |batch: usize| -> Result<f64> {
            start.record(&stream)?;
            for _ in 0..batch {
                launch()?;
            }
            end.record(&stream)?;
            Ok(f64::from(start.elapsed_ms(&end)?) * 1e-3 / batch as f64)
        };
        let one = batch_time(5)?; // warm-up, and an estimate
        let batch = ((2e-4 / one.max(1e-7)).ceil() as usize).clamp(1, 500);
        batch_time(batch)?;
        let times = (0..samples.max(1))
            .map(|_| batch_time(batch))
            .collect::<Result<Vec<_>>>()?;
        Ok(median(times))
    }

    /// out[n, m] = x[n, k] · w[m, k]ᵀ, row-major, by cuBLAS: bf16 inputs, f32
    /// compute, out bf16 or f32. Column-major that is outᵀ[m, n] = w · xᵀ: A
    /// is w's buffer read as a k×m matrix and transposed, B is x's buffer read
    /// as k×n, C is out's buffer read as m×n.
    fn gemm(blas: &CudaBlas, call: &Call) -> Result<()> {
        let &Call::Cublas {
            out,
            x,
            w,
            n,
            m,
            k,
            f32_out,
        } = call
        else {
            bail!("not a cuBLAS call");
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (n, m, k) = (n as i32, m as i32, k as i32);
        let bf16 = cudaDataType_t::CUDA_R_16BF;
        let c_type = if f32_out {
            cudaDataType_t::CUDA_R_32F
        } else {
            bf16
        };
        // SAFETY: out, x, w are live device allocations of n·m, n·k and m·k
        // elements (`Prepared` keeps them), the leading dimensions are those
        // of the shapes above, and alpha, beta are host f32s as f32 compute
        // and the default host pointer mode expect. The handle runs on the
        // null stream, like the kernels.
        unsafe {
            gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha as *const f32 as *const c_void,
                w as *const c_void,
                bf16,
                k,
                x as *const c_void,
                bf16,
                k,
                &beta as *const f32 as *const c_void,
                out as *mut c_void,
                c_type,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| anyhow::anyhow!("cublasGemmEx: {e:?}"))
    }

    pub fn main(opts: &Options) -> Result<usize> {
        let driver = Real::new(0).context("opening GPU 0 (without a GPU: --device emu)")?;
        let ctx = driver.context().clone();
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name()?;
        // SAFETY: only probes whether libcublas can be loaded.
        let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            Some(CudaBlas::new(ctx.default_stream())?)
        } else {
            eprintln!("libcublas not found: no cuBLAS rows");
            None
        };
        let samples = opts.repeats.unwrap_or(25);
        let timer =
            |_first: f64, launch: &mut dyn FnMut() -> Result<()>| time(&ctx, samples, launch);
        let gemm_fn = |call: &Call| gemm(blas.as_ref().expect("cuBLAS"), call);
        let bench = Bench {
            gpu: Cuda::new(driver),
            real: true,
            timer: &timer,
            gemm: blas.as_ref().map(|_| &gemm_fn as &Gemm),
        };
        let header = format!(
            "GPU: {name} (sm_{major}{minor}). Median of {samples} CUDA-event samples after \
             warm-up; GB/s from the bytes a kernel must move at least, L2 not flushed. \
             The event and cuBLAS code was written without a GPU to run it on."
        );
        Ok(run_all(&bench, opts, &header).0)
    }
}

/// The CPU emulator.
#[cfg(feature = "emu")]
mod emu {
    use super::*;
    use engine::backend::cuda::driver::Emu;

    pub fn main(opts: &Options) -> Result<usize> {
        // A check, not a measurement: the check launch is the first sample,
        // repeated up to `repeats` launches and not past a second a case.
        let repeats = opts.repeats.unwrap_or(3);
        let timer = |first: f64, launch: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            let mut samples = vec![first];
            let t0 = Instant::now();
            while samples.len() < repeats && first + t0.elapsed().as_secs_f64() < 1.0 {
                let t = Instant::now();
                launch()?;
                samples.push(t.elapsed().as_secs_f64());
            }
            Ok(median(samples))
        };
        let bench = Bench {
            gpu: Cuda::new(Emu::new()),
            real: false,
            timer: &timer,
            gemm: None,
        };
        let header = format!(
            "CUDA emulator on CPU ({} workers) — times are emulator wall time, not GPU \
             performance",
            engine::backend::cuda::emu::workers()
        );
        let (bad, ran) = run_all(&bench, opts, &header);
        println!();
        match engine::kernels_check::inspect(&["sm_80".into(), "sm_90".into()]) {
            Ok(mut report) => {
                if opts.filter.is_some() {
                    report.rows.retain(|r| ran.contains(&r.kernel.as_str()));
                }
                println!("Static figures (engine kernels check --arch sm_80,sm_90):\n{report}")
            }
            Err(e) => {
                println!("No static figures: {e}\n(scripts/cuda-tools.sh installs the CUDA tools)")
            }
        }
        Ok(bad)
    }
}

fn main() {
    let result = parse_args().and_then(|opts| {
        let device = match opts.device.as_deref() {
            Some(d) => d.to_string(),
            None if real::unavailable_reason().is_none() => "cuda".into(),
            None => "emu".into(),
        };
        match device.as_str() {
            "cuda" => match real::unavailable_reason() {
                Some(why) => bail!("--device cuda: {why} (without a GPU: --device emu)"),
                None => gpu::main(&opts),
            },
            "emu" => {
                #[cfg(feature = "emu")]
                return emu::main(&opts);
                #[cfg(not(feature = "emu"))]
                bail!(
                    "no GPU here, and the emulator is not built in: \
                     cargo bench --features emu --bench kernels"
                )
            }
            other => bail!("--device {other}: expected cuda or emu"),
        }
    });
    match result {
        Ok(0) => {}
        Ok(_) => std::process::exit(1),
        Err(e) => {
            eprintln!("kernels bench: {e:#}");
            std::process::exit(1);
        }
    }
}
