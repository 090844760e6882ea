//! Kernel microbenchmarks, in the way of llm.c's dev/cuda: every kernel of the
//! CUDA device, every version of it in kernels/*.cu side by side, at
//! SmolLM2-135M shapes (d 576, FFN 1536, 9 heads / 3 KV heads of 64, vocab
//! 49152) for a prefill of 128 and of 512 tokens and for one decode step over a
//! 512-token cache; the training step's kernels (backward GEMMs, attention
//! backward, the other backward ops, fused cross-entropy, dropout, the fused
//! LoRA kernels) on a sequence of 128 and of 512 tokens; the optimizer's
//! (AdamW, conversions, gradient norm and clipping) on a LoRA A of rank 8, an
//! FFN weight and the embedding; the embedding model's (all-MiniLM-L6-v2:
//! hidden 384, intermediate 1536, 12 heads of 32) LayerNorm, GELU, bias and
//! bidirectional attention on 32 sentences padded to 128 tokens; serving's
//! (RoPE at a position per row, the KV write into a paged pool, attention
//! through a block table, the LoRA branches of many adapters over one batch)
//! in the prefill and decode phases; and
//! retrieval's, the flat-IP index's f32 scores and their top 10, for 1 and
//! 64 queries against 100,000 vectors.
//!
//! Each case first runs once on random bf16-representable inputs (any f32
//! where a kernel takes f32 throughout: the retrieval rows), its output
//! poisoned with NaN (an output that accumulates or is updated in place
//! starts from random values instead, or from zeros where the training step
//! zeroes it), and each output is compared with the CPU device's same op
//! (tolerances of tests/cuda_ops.rs; token ids and top-k lists exactly); a
//! kernel that disagrees is reported and not timed, and the bench exits with
//! status 1.
//!
//! - On a GPU (`--device cuda`, the default where the driver library is
//!   present): warm-up, then the median of samples of back-to-back launches
//!   timed with CUDA events. GB/s counts the bytes a kernel must move at least
//!   (each input read once, each output written once; L2 is not flushed
//!   between launches; an accumulated output counts as read and written),
//!   TFLOP/s the multiply-adds of matmul, attention and LoRA (forward and
//!   backward; see `Case::flops`). Each forward matmul shape gets a cuBLAS
//!   row (bf16 in, f32 compute; f32 in for the retrieval scores), the upper
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

mod common;

use anyhow::{bail, Context as _, Result};
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::{DevicePtr, GpuDriver};
use engine::backend::cuda::{real, sources, top_k_segment, Cuda};
use engine::backend::sample::{argmax, Sampler, SamplerConfig};
use engine::backend::topk::merge_top_k;
use engine::backend::{mean_scale, AdamW, AdamWTensors, Backend, LoraRef, PagedSeq, IGNORE};
use engine::tensor::DType::{self, BF16, F32};
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
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
/// The paged KV pool of the serving rows: slots, in blocks of PAGE.
const POOL: usize = 2048;
const PAGE: usize = 16;
/// The LoRA dropout of the dropout rows.
const DROPOUT: f32 = 0.1;
/// The LoRA rows' alpha: their scaling s is alpha / r.
const LORA_ALPHA: f32 = 32.0;
/// Serving's many-adapter LoRA rows: the rank of every adapter, how many
/// adapters a prefill's rows (prompt chunks) and a decode step's rows take
/// in turn, and the rows of a decode step (one per request).
const SERVE_RANK: usize = 16;
const SERVE_PREFILL_ADAPTERS: usize = 4;
const SERVE_DECODE_ADAPTERS: usize = 16;
const SERVE_DECODE_ROWS: usize = 64;

// all-MiniLM-L6-v2, the embedding model: hidden 384, intermediate 1536, 12
// heads of 32, LayerNorm eps 1e-12 (BERT's).
const ENC_D: usize = 384;
const ENC_FFN: usize = 1536;
const ENC_HEADS: usize = 12;
const ENC_HD: usize = ENC_D / ENC_HEADS;
const ENC_EPS: f32 = 1e-12;
/// The padded length of an encoder batch (the longest sentence's tokens).
const ENC_SEQ: usize = 128;

/// The flat-IP index of the retrieval rows: vectors of the embedding
/// model's width, and the best k kept per query.
const INDEX: usize = 100_000;
const TOP_K: usize = 10;

/// Tolerances of tests/cuda_ops.rs, relative to the largest reference value.
const BF16_TOL: f32 = 1e-2;
const F32_TOL: f32 = 1e-5;

/// What a kernel computes, its parameters, and its launcher's geometry.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    /// out[n, m] = x[n, k] · w[m, k]ᵀ: (out, x, w, n, m, k); grid
    /// (ceil(m / tile_m), ceil(n / tile_n)), block `threads`. x and w bf16,
    /// or with `f32_in` f32 (and out f32): the flat-IP index's scores, in
    /// the retrieval phases.
    Matmul {
        f32_in: bool,
        f32_out: bool,
        tile_n: usize,
        tile_m: usize,
        threads: u32,
    },
    /// The same product by cuBLAS (the baseline row; GPU only).
    Cublas { f32_in: bool, f32_out: bool },
    /// (out, q, k, v, heads, kv_heads, hd, pos0); grid (n, heads), block 128.
    Attention,
    /// (out, lse, q, k, v, n, heads, kv_heads, hd, pos0); grid
    /// (ceil(n / 64), heads), block 128.
    AttentionPrefill,
    /// (out, x, weight, d, eps); a block of 256 per row.
    Rmsnorm { f32_in: bool },
    /// (x, n, heads, hd, pos0, theta), in place; grid-stride over pairs.
    /// The backward turns the gradient by −angle.
    Rope { backward: bool },
    /// (out, gate, up, n); grid-stride.
    Swiglu,
    /// (x, y, alpha, n): x += alpha·y; grid-stride. A y in f32 is a
    /// gradient (the residual stream's), in the training step only.
    Add { f32_x: bool, f32_y: bool },
    /// (out, ids, table, d); a block of 256 per row.
    Embedding { f32_out: bool },
    /// (out, x, d); a block of 256 per row.
    LogSoftmax,
    /// (out ids, logits, vocab); a block of 1024 per row.
    Argmax,
    /// Serving's RoPE with a position per row: (x, positions, n, heads, hd,
    /// theta), in place, positions u32 on the device; grid-stride over pairs.
    RopeRows,
    /// Serving's KV write: (dst, src, slots, d), dst[slots[i]] = src[i],
    /// rows of a layer's keys into the pool of POOL slots, slots u32 on the
    /// device; grid (n), block 256. bf16, or f32 rows with `f32`.
    ScatterRows { f32: bool },
    /// Serving's attention over the paged pool (blocks of PAGE, shuffled):
    /// (out, q, k_cache, v_cache, tasks, blocks, heads, kv_heads, hd,
    /// block_size), tasks (row, position, table offset) and the block table
    /// u32 on the device; grid (n, heads), block 128. One sequence of n
    /// queries at pos0, the same work as `Attention`.
    AttentionPaged,
    /// Serving's LoRA branches of many adapters over one batch
    /// (`Backend::lora_gathered`), on a projection x [n, in] → y [n, out]:
    /// y[i] += s_a·(x[i]·A_aᵀ)·B_aᵀ with row i's adapter a, the rows taking
    /// `Lora::adapters` adapters of rank `Lora::r` in turn (each its own A,
    /// B). (y, x, adapters, tasks, in, out), the table (A, B, r, the bits of
    /// s per adapter) and the tasks (row | adapter << 32, in adapter order)
    /// u64 on the device; grid (n), block 256. y accumulates.
    LoraGathered,
    /// (out ids, logits, vocab, temperature, top_k, top_p, u); a block of
    /// 1024 per row.
    Sample,

    // ----- the training step's kernels (phases "train N") -----
    /// c [M, N] += a [M, K] · b [K, N], a and b read through (row, column)
    /// strides, b bf16: (c, a, b, M, N, K, a_rs, a_cs, b_rs, b_cs); grid
    /// (ceil(N / 64), ceil(M / 64)), block 256. The backward of out [n, m] =
    /// x [n, k] · w [m, k]ᵀ as `matmul_nt_backward` launches it: a bf16 c is
    /// dx [n, k] += dout · w, an f32 c is dw [m, k] += doutᵀ · x.
    MatmulAcc { a_f32: bool, c_f32: bool },
    /// (dq, dsum, dout, q, k, v, out, lse, n, heads, kv_heads, hd, pos0);
    /// grid (n, heads), block 32; out and lse are the forward's. dq is
    /// overwritten; dsum (D per query and head) feeds the dkv kernel.
    AttentionBwdDq,
    /// (dk, dv, lse, dsum, dout, q, k, v, n, heads, kv_heads, hd, pos0); grid
    /// (pos0 + n, kv_heads), block 32; after the dq kernel, whose dsum it
    /// reads (launched once in `prepare`, untimed). dk, dv accumulate.
    AttentionBwdDkv,
    /// (dx, dw, dout, x, w, d, eps); a block of 256 per row; dx and dw f32,
    /// accumulated.
    RmsnormBwd,
    /// (dgate, dup, dout, gate, up, n); grid-stride.
    SwigluBwd,
    /// (dtable, ids, dout, d): dtable[ids[i]] += dout[i], f32; a block of
    /// 256 per row.
    EmbeddingBwd,
    /// (loss, dlogits, logits, targets, vocab, scale), f32; a block of 256
    /// per row.
    CrossEntropy,
    /// (x, p, keep_scale, seed, n), in place; grid-stride.
    Dropout { f32_x: bool },
    /// A LoRA branch (A [r, in], B [out, r], scaling s; `Case::lora`) on a
    /// projection x [n, in] → y [n, out], one row per kernel launched as
    /// `Backend::lora_forward` / `lora_backward` of the Cuda device launch
    /// them (raw launches rather than the methods, so that each of the
    /// backward's three kernels gets its own time and figures; the input a
    /// kernel takes from the one before, t or dt, is the CPU device's).
    /// t = drop(x)·Aᵀ (f32, written), y += s·t·Bᵀ: (y, t, x, a, b, n, in,
    /// out, r, s, p, keep_scale, seed); grid ceil(n / 16), block 256.
    LoraFwd,
    /// dt = s·dy·B (f32, written), dx += drop'(dt·A), dy f32 where it is
    /// the residual stream's gradient: (dx, dt, dy, a, b, n, in, out, r, s,
    /// p, keep_scale, seed); grid ceil(n / 16), block 256.
    LoraBwdX { f32_dy: bool },
    /// g(k, c) += scale·Σ_i u[i, k]·drop(v[i, c]), f32, chunks of 128 rows
    /// adding atomically: dA [r, in] += dtᵀ·drop(x) (v = x, bf16), or dB
    /// [out, r] += s·dyᵀ·t (v = dy); (g, u, v, n, cols, r, g_sk, g_sc, scale,
    /// p, keep_scale, seed); grid (ceil(cols / 256), ceil(r / 16),
    /// ceil(n / 128)), block 256.
    LoraGrad { f32_v: bool },

    // ----- the optimizer's kernels (phase "optimizer", per weight tensor) -----
    /// (dst, src, n); grid-stride. f32 master weights into their bf16
    /// working copy (`to_f32` false), or back.
    Convert { to_f32: bool },
    /// Through the Cuda device's `Backend::adamw_step`: one launch of
    /// adamw_f32 for all the tensors, over a table of their pointers that the
    /// method uploads; each tensor with a bf16 working copy to refresh.
    AdamW,
    /// (out f64, x, n): out += Σ x², out zeroed first; grid-stride over at
    /// most 1024 blocks.
    SumSquares,
    /// (x, s, n): x ·= s; grid-stride.
    Scale,

    // ----- the encoder's kernels (phase "encode", all-MiniLM-L6-v2) -----
    /// (out, x, weight, bias, d, eps); a block of 256 per row.
    Layernorm,
    /// (out, x, n); grid-stride.
    Gelu,
    /// (x, bias, n, d): x[i] += bias[i % d], in place; grid-stride.
    AddBias,
    /// (out, q, k, v, lens, seq, heads, hd) over a padded batch of
    /// sequences, `lens` u32 on the device; grid (batch·seq, heads), block
    /// 128.
    AttentionBidir,

    // ----- retrieval's kernels (phases "retrieve") -----
    /// (idx, val, scores, m, k): the k best of each row of scores [n, m],
    /// f32, in no order (the launcher sorts them on the host); grid (n),
    /// block 256.
    TopK,
}

/// Which part of the work a kernel serves, and so the phases it runs in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    /// Inference, and the training step's forward: prefill and decode.
    Forward,
    /// What the training step adds to the forward: rows of n tokens.
    Train,
    /// Once a step on the weight tensors: a launch per tensor (AdamW: one
    /// for all of them).
    Optimizer,
    /// The embedding model's forward on a padded batch of sentences.
    Encoder,
    /// Scoring queries against the flat-IP index, and picking the best.
    Retrieval,
}

impl Family {
    fn stage(self) -> Stage {
        use Family::*;
        match self {
            Rope { backward: true } | Add { f32_y: true, .. } => Stage::Train,
            MatmulAcc { .. }
            | AttentionBwdDq
            | AttentionBwdDkv
            | RmsnormBwd
            | SwigluBwd
            | EmbeddingBwd
            | CrossEntropy
            | Dropout { .. } => Stage::Train,
            LoraFwd | LoraBwdX { .. } | LoraGrad { .. } => Stage::Train,
            Convert { .. } | AdamW | SumSquares | Scale => Stage::Optimizer,
            Layernorm | Gelu | AddBias | AttentionBidir => Stage::Encoder,
            Matmul { f32_in: true, .. } | Cublas { f32_in: true, .. } | TopK => Stage::Retrieval,
            _ => Stage::Forward,
        }
    }
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
        f32_in: false,
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
    spec("rope_fwd_bf16", Family::Rope { backward: false }, 6),
    spec("rope_rows_bf16", Family::RopeRows, 6),
    spec("scatter_rows_bf16", Family::ScatterRows { f32: false }, 4),
    spec("scatter_rows_f32", Family::ScatterRows { f32: true }, 4),
    spec("attention_paged_bf16", Family::AttentionPaged, 10),
    spec("lora_gathered_bf16", Family::LoraGathered, 6),
    spec("swiglu_fwd_bf16", Family::Swiglu, 4),
    spec("add_scaled_bf16", add(false, false), 4),
    spec("add_scaled_f32_bf16", add(true, false), 4),
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
    // The training step. matmul_acc_{a}_{c}: a is dout's type, c the
    // accumulated gradient's (bf16: dx, f32: dw). Version 1, 64×64 tiles.
    spec("matmul_acc_bf16_bf16", acc(false, false), 10),
    spec("matmul_acc_f32_bf16", acc(true, false), 10),
    spec("matmul_acc_bf16_f32", acc(false, true), 10),
    spec("matmul_acc_f32_f32", acc(true, true), 10),
    spec("attention_bwd_dq_bf16", Family::AttentionBwdDq, 13),
    spec("attention_bwd_dkv_bf16", Family::AttentionBwdDkv, 13),
    spec("rmsnorm_bwd_f32_bf16", Family::RmsnormBwd, 7),
    spec("rope_bwd_bf16", Family::Rope { backward: true }, 6),
    spec("swiglu_bwd_bf16", Family::SwigluBwd, 6),
    spec("embedding_bwd_f32", Family::EmbeddingBwd, 4),
    spec("cross_entropy_f32", Family::CrossEntropy, 6),
    spec("dropout_bf16", Family::Dropout { f32_x: false }, 5),
    spec("dropout_f32", Family::Dropout { f32_x: true }, 5),
    spec("add_scaled_bf16_f32", add(false, true), 4),
    spec("add_scaled_f32_f32", add(true, true), 4),
    // The LoRA branch, forward and backward (kernels/lora.cu).
    spec("lora_fwd_bf16", Family::LoraFwd, 13),
    spec("lora_bwd_x_bf16", Family::LoraBwdX { f32_dy: false }, 13),
    spec("lora_bwd_x_f32", Family::LoraBwdX { f32_dy: true }, 13),
    spec("lora_grad_bf16", Family::LoraGrad { f32_v: false }, 12),
    spec("lora_grad_f32", Family::LoraGrad { f32_v: true }, 12),
    // The optimizer.
    spec("convert_f32_bf16", Family::Convert { to_f32: false }, 3),
    spec("convert_bf16_f32", Family::Convert { to_f32: true }, 3),
    spec("adamw_f32", Family::AdamW, VIA_BACKEND),
    spec("sum_squares_f32", Family::SumSquares, 3),
    spec("scale_f32", Family::Scale, 3),
    // The encoder (all-MiniLM-L6-v2).
    spec("layernorm_fwd_bf16", Family::Layernorm, 6),
    spec("gelu_fwd_bf16", Family::Gelu, 3),
    spec("add_bias_bf16", Family::AddBias, 4),
    spec("attention_bidir_bf16", Family::AttentionBidir, 8),
    // Retrieval: the index's f32 scores (version 1 only), then the top k.
    spec(
        "matmul_nt_f32",
        Family::Matmul {
            f32_in: true,
            f32_out: true,
            tile_n: 64,
            tile_m: 64,
            threads: 256,
        },
        6,
    ),
    spec("topk_f32", Family::TopK, 6),
];

/// The parameter count of a kernel the bench runs through the Cuda device's
/// `Backend` method rather than a raw launch: not checked here (the method's
/// launcher is kept in step with its kernel by tests/cuda_*.rs).
const VIA_BACKEND: usize = usize::MAX;

const fn add(f32_x: bool, f32_y: bool) -> Family {
    Family::Add { f32_x, f32_y }
}

const fn acc(a_f32: bool, c_f32: bool) -> Family {
    Family::MatmulAcc { a_f32, c_f32 }
}

/// The cuBLAS rows (parameter counts unused): bf16 in with bf16 or f32
/// out, and f32 throughout.
const CUBLAS: [Spec; 3] = [
    spec("cuBLAS gemm_ex", cublas(false, false), 0),
    spec("cuBLAS gemm_ex", cublas(false, true), 0),
    spec("cuBLAS gemm_ex", cublas(true, true), 0),
];

const fn cublas(f32_in: bool, f32_out: bool) -> Family {
    Family::Cublas { f32_in, f32_out }
}

/// The cuBLAS row for a matmul's types.
fn cublas_spec(f32_in: bool, f32_out: bool) -> &'static Spec {
    &CUBLAS[if f32_in { 2 } else { usize::from(f32_out) }]
}

/// One row of the table: a kernel on one problem. `n` rows (tokens) at
/// positions pos0.., and for a matmul w [m, k]. An encoder case has n rows
/// of width m, or for attention n = batch·m rows, sequences padded to m
/// tokens ([`ragged`]); a retrieval case n queries against m index vectors
/// of width k, or for top-k the best k of each row of scores [n, m].
struct Case {
    phase: &'static str,
    /// The layer and shape, e.g. "gate,up [512,576]·[1536,576]ᵀ".
    what: String,
    spec: &'static Spec,
    n: usize,
    pos0: usize,
    m: usize,
    k: usize,
    /// The LoRA families' branch; m is the projection's out, k its in.
    lora: Lora,
}

/// A LoRA case's rank, dropout, and for `lora_grad_*` which gradient.
#[derive(Clone, Copy, Debug, Default)]
struct Lora {
    r: usize,
    /// With dropout [`DROPOUT`] on the branch's input.
    dropout: bool,
    /// dB [out, r] += s·dyᵀ·t rather than dA [r, in] += dtᵀ·drop(x).
    db: bool,
    /// `lora_gathered_*`: the adapters the rows take in turn.
    adapters: usize,
}

impl Case {
    /// The bytes the kernel must move at least: each input read once, each
    /// output written once.
    fn bytes(&self) -> f64 {
        let size = |f32: bool| if f32 { 4 } else { 2 };
        let (n, m, k) = (self.n, self.m, self.k);
        let qkv = 2 * (2 * n * HEADS * HD) + 2 * (2 * (self.pos0 + n) * KV_HEADS * HD);
        let b = match self.spec.family {
            Family::Matmul {
                f32_in, f32_out, ..
            }
            | Family::Cublas { f32_in, f32_out } => {
                size(f32_in) * (n * k + m * k) + size(f32_out) * n * m
            }
            Family::Attention => qkv,
            // The tables: (row, position, offset) per query, a block id per block.
            Family::AttentionPaged => qkv + 12 * n + 4 * (self.pos0 + n).div_ceil(PAGE),
            Family::RopeRows => 2 * 2 * n * HEADS * HD + 4 * n,
            Family::ScatterRows { f32 } => 2 * size(f32) * n * KV_HEADS * HD + 4 * n,
            Family::AttentionPrefill => qkv + 4 * HEADS * n,
            Family::Rmsnorm { f32_in } => n * D * size(f32_in) + 2 * D + 2 * n * D,
            Family::Rope { .. } => 2 * 2 * n * HEADS * HD,
            Family::Swiglu => 3 * 2 * n * FFN,
            Family::Add { f32_x, f32_y } => n * D * (2 * size(f32_x) + size(f32_y)),
            Family::Embedding { f32_out } => 4 * n + n * D * (2 + size(f32_out)),
            Family::LogSoftmax => 8 * n * VOCAB,
            Family::Argmax | Family::Sample => 4 * n * VOCAB + 4 * n,
            // An accumulated output is read once and written once.
            Family::MatmulAcc { a_f32, c_f32 } => {
                // dout [n, m]; then w [m, k] and dx [n, k], or x [n, k] and dw [m, k].
                let (b, c) = if c_f32 {
                    (n * k, m * k)
                } else {
                    (m * k, n * k)
                };
                size(a_f32) * n * m + 2 * b + 2 * size(c_f32) * c
            }
            // dout and out read besides q, dq (qkv's output), k, v; lse read, D written.
            Family::AttentionBwdDq => qkv + 2 * 2 * n * HEADS * HD + 8 * HEADS * n,
            // dk, dv read and written.
            Family::AttentionBwdDkv => {
                qkv + 4 * (2 * (self.pos0 + n) * KV_HEADS * HD) + 8 * HEADS * n
            }
            // dx, dw read and written; dout, w bf16; x f32.
            Family::RmsnormBwd => n * D * (8 + 2 + 4) + D * (2 + 8),
            Family::SwigluBwd => 5 * 2 * n * FFN,
            Family::EmbeddingBwd => 4 * n + n * D * (4 + 8),
            Family::CrossEntropy => 8 * n * VOCAB + 8 * n,
            Family::Dropout { f32_x } => 2 * size(f32_x) * n * D,
            // x [n, in] (k), y / dy [n, out] (m), A [r, in], B [out, r], t
            // and dt [n, r] f32; y, dx (bf16) and dA, dB (f32) read and
            // written.
            Family::LoraFwd => {
                let r = self.lora.r;
                2 * n * k + 2 * r * (k + m) + 2 * 2 * n * m + 4 * n * r
            }
            Family::LoraBwdX { f32_dy } => {
                let r = self.lora.r;
                size(f32_dy) * n * m + 2 * r * (k + m) + 2 * 2 * n * k + 4 * n * r
            }
            // x read, y read and written, each adapter's A and B read once,
            // the table and a task per row.
            Family::LoraGathered => {
                let Lora { r, adapters, .. } = self.lora;
                2 * n * k + 2 * 2 * n * m + 2 * r * (k + m) * adapters + 32 * adapters + 8 * n
            }
            Family::LoraGrad { f32_v } => {
                let r = self.lora.r;
                // u (dt or t) read; v (x or dy) read; g read and written.
                let cols = if self.lora.db { m } else { k };
                4 * n * r + size(f32_v) * n * cols + 2 * 4 * r * cols
            }
            Family::Convert { .. } => (4 + 2) * m * k,
            // param, m, v read and written; grad read; the bf16 copy written.
            Family::AdamW => (3 * 8 + 4 + 2) * self.elements(),
            Family::SumSquares => 4 * m * k + 8,
            Family::Scale => 8 * m * k,
            Family::Layernorm => 2 * 2 * n * m + 2 * 2 * m,
            Family::Gelu => 2 * 2 * n * m,
            Family::AddBias => 2 * 2 * n * m + 2 * m,
            // q, k, v of the real rows read (padding never is), every row
            // of out written, the lengths read.
            Family::AttentionBidir => {
                let lens = ragged(n / m, m);
                let real: usize = lens.iter().sum();
                3 * 2 * real * ENC_D + 2 * n * ENC_D + 4 * lens.len()
            }
            Family::TopK => 4 * n * m + 8 * n * m.div_ceil(top_k_segment(k)) * k,
        };
        b as f64
    }

    /// The weight tensors of an optimizer case: [m, k], or with m = 0 every
    /// tensor of a rank-8 LoRA on all seven projections of the 30 layers.
    fn tensors(&self) -> Vec<[usize; 2]> {
        if self.m > 0 {
            return vec![[self.m, self.k]];
        }
        let (kv, r) = (KV_HEADS * HD, 8);
        let projections = [
            (D, D),
            (kv, D),
            (kv, D),
            (D, D),
            (FFN, D),
            (FFN, D),
            (D, FFN),
        ];
        let layer = projections
            .iter()
            .flat_map(|&(out, inp)| [[r, inp], [out, r]]);
        layer.cycle().take(30 * 2 * projections.len()).collect()
    }

    fn elements(&self) -> usize {
        self.tensors().iter().map(|[m, k]| m * k).sum()
    }

    /// Floating-point operations of matmul, attention and LoRA (a
    /// multiply-add is two); None for the others.
    fn flops(&self) -> Option<f64> {
        match self.spec.family {
            Family::Matmul { .. } | Family::Cublas { .. } => {
                Some(2.0 * (self.n * self.m * self.k) as f64)
            }
            Family::MatmulAcc { .. } => Some(2.0 * (self.n * self.m * self.k) as f64),
            // Both of the branch's products (the forward's x·Aᵀ and t·Bᵀ,
            // the backward's dy·B and dt·A), or one gradient's.
            Family::LoraFwd | Family::LoraBwdX { .. } | Family::LoraGathered => {
                Some(2.0 * (self.n * self.lora.r * (self.k + self.m)) as f64)
            }
            Family::LoraGrad { .. } => {
                let cols = if self.lora.db { self.m } else { self.k };
                Some(2.0 * (self.n * self.lora.r * cols) as f64)
            }
            Family::Attention
            | Family::AttentionPrefill
            | Family::AttentionPaged
            | Family::AttentionBwdDq
            | Family::AttentionBwdDkv => {
                // Query i sees pos0 + i + 1 keys. Per (query, key, head), in
                // multiply-adds of hd: the forward q·k and p·v (2); the dq
                // kernel recomputes q·k, then dout·v and dq += ds·k (3); the
                // dkv kernel recomputes q·k and dout·v, then dv += p·dout and
                // dk += ds·q (4).
                let keys: usize = (0..self.n).map(|i| self.pos0 + i + 1).sum();
                let mads = match self.spec.family {
                    Family::AttentionBwdDq => 3,
                    Family::AttentionBwdDkv => 4,
                    _ => 2,
                };
                Some(2.0 * (mads * HEADS * HD * keys) as f64)
            }
            // A real query sees the len keys of its sequence: q·k and p·v.
            Family::AttentionBidir => {
                let keys: usize = ragged(self.n / self.m, self.m).iter().map(|l| l * l).sum();
                Some(2.0 * (2 * ENC_HEADS * ENC_HD * keys) as f64)
            }
            _ => None,
        }
    }
}

/// The cases in table order: by phase, then layer; the versions of a kernel
/// next to each other, each matmul shape followed by cuBLAS. The forward
/// kernels run in the prefill and decode phases, the training step's in the
/// "train" phases (n tokens, one sequence), the optimizer's on weight tensors.
fn cases(specs: &[&'static Spec], with_cublas: bool) -> Vec<Case> {
    let phases = [
        ("prefill 128", 128, 0, Stage::Forward),
        ("prefill 512", 512, 0, Stage::Forward),
        ("decode @512", 1, CACHE - 1, Stage::Forward),
        ("train 128", 128, 0, Stage::Train),
        ("train 512", 512, 0, Stage::Train),
        ("optimizer", 0, 0, Stage::Optimizer),
        ("encode 32×128", 32 * ENC_SEQ, 0, Stage::Encoder),
        ("retrieve 1 q", 1, 0, Stage::Retrieval),
        ("retrieve 64 q", 64, 0, Stage::Retrieval),
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
    // Their backward as the training step runs it (`matmul_nt_backward`):
    // dout is f32 where it is the residual stream's gradient (o, down) or the
    // logits' (lm head), else bf16. dx rows run in every step, dW rows in
    // full fine-tuning only (a LoRA step freezes these weights).
    let backward = [
        ("q", D, D, false),
        ("k,v", KV_HEADS * HD, D, false),
        ("o", D, D, true),
        ("gate,up", FFN, D, false),
        ("down", D, FFN, true),
        ("lm head", VOCAB, D, true),
    ];
    // LoRA branches of a training step (`model::adapter`): (layer, out, in,
    // dy f32, rank, dropout). dy is f32 where it is the residual stream's
    // gradient (down), as for the backward GEMMs; the q branch also with
    // dropout.
    let lora = [
        ("q", D, D, false, 16, false),
        ("q", D, D, false, 16, true),
        ("gate", FFN, D, false, 16, false),
        ("down", D, FFN, true, 16, false),
        ("q", D, D, false, 64, false),
        ("gate", FFN, D, false, 64, false),
        ("down", D, FFN, true, 64, false),
    ];
    // The weight tensors of an optimizer step: a LoRA A of rank 8, an FFN
    // weight, and the largest, the embedding (tied to the LM head).
    let tensors = [
        ("LoRA A, r 8", 8, D),
        ("gate weight", FFN, D),
        ("embedding", VOCAB, D),
    ];
    let mut out = Vec::new();
    for (phase, n, pos0, stage) in phases {
        let case = |what: String, spec, m, k| Case {
            phase,
            what,
            spec,
            n,
            pos0,
            m,
            k,
            lora: Lora::default(),
        };
        let specs: Vec<&'static Spec> = (specs.iter().copied())
            .filter(|s| s.family.stage() == stage)
            .collect();
        match stage {
            Stage::Forward => {
                for (layer, m, k, f32_out) in matmuls {
                    let what = format!("{layer} [{n},{k}]·[{m},{k}]ᵀ");
                    let versions: Vec<&'static Spec> = (specs.iter().copied())
                        .filter(|s| matches!(s.family, Family::Matmul { f32_out: f, .. } if f == f32_out))
                        .collect();
                    for &s in &versions {
                        out.push(case(what.clone(), s, m, k));
                    }
                    if with_cublas && !versions.is_empty() {
                        out.push(case(what, cublas_spec(false, f32_out), m, k));
                    }
                }
                // Serving's LoRA on each projection: a prefill's rows over a
                // few adapters, a decode step's many rows (one per request)
                // over many.
                let (rows, adapters) = if n == 1 {
                    (SERVE_DECODE_ROWS, SERVE_DECODE_ADAPTERS)
                } else {
                    (n, SERVE_PREFILL_ADAPTERS)
                };
                for &s in specs.iter().filter(|s| s.family == Family::LoraGathered) {
                    for (layer, m, k, f32_out) in matmuls {
                        if f32_out {
                            continue; // the LM head takes no adapter
                        }
                        let what = format!(
                            "{layer} LoRA, {rows} rows over {adapters} adapters of r {SERVE_RANK}: \
                             y [{rows},{m}] += s·x [{rows},{k}]·Aᵀ·Bᵀ"
                        );
                        let lora = Lora {
                            r: SERVE_RANK,
                            adapters,
                            ..Lora::default()
                        };
                        out.push(Case {
                            n: rows,
                            lora,
                            ..case(what, s, m, k)
                        });
                    }
                }
            }
            Stage::Train => {
                for (layer, m, k, dout_f32) in backward {
                    for &s in &specs {
                        let Family::MatmulAcc { a_f32, c_f32 } = s.family else {
                            continue;
                        };
                        if a_f32 != dout_f32 {
                            continue;
                        }
                        let what = if c_f32 {
                            format!("{layer} dW [{m},{k}] += [{n},{m}]ᵀ·[{n},{k}]")
                        } else {
                            format!("{layer} dx [{n},{k}] += [{n},{m}]·[{m},{k}]")
                        };
                        out.push(case(what, s, m, k));
                    }
                }
                // Each LoRA branch: its forward, then the backward's kernels
                // in the order `lora_backward` launches them.
                for (layer, m, k, dy_f32, r, dropout) in lora {
                    let drop = if dropout {
                        format!(", dropout {DROPOUT}")
                    } else {
                        String::new()
                    };
                    let name = format!("{layer} LoRA r {r}{drop}:");
                    let x = if dropout { "drop(x)" } else { "x" };
                    let dx = format!("s·dy [{n},{m}]·B·A");
                    let dx = if dropout { format!("drop({dx})") } else { dx };
                    for &s in &specs {
                        let mut rows = Vec::new();
                        match s.family {
                            Family::LoraFwd => rows.push((
                                format!("{name} y [{n},{m}] += s·{x} [{n},{k}]·Aᵀ·Bᵀ"),
                                false,
                            )),
                            Family::LoraBwdX { f32_dy } if f32_dy == dy_f32 => {
                                rows.push((format!("{name} dx [{n},{k}] += {dx}"), false))
                            }
                            Family::LoraGrad { f32_v } => {
                                if !f32_v {
                                    let what = format!("{name} dA [{r},{k}] += dtᵀ·{x} [{n},{k}]");
                                    rows.push((what, false));
                                }
                                // dB takes no dropout: the same as without.
                                if f32_v == dy_f32 && !dropout {
                                    let what = format!("{name} dB [{m},{r}] += s·dyᵀ [{m},{n}]·t");
                                    rows.push((what, true));
                                }
                            }
                            _ => {}
                        }
                        for (what, db) in rows {
                            let lora = Lora {
                                r,
                                dropout,
                                db,
                                ..Lora::default()
                            };
                            out.push(Case {
                                lora,
                                ..case(what, s, m, k)
                            });
                        }
                    }
                }
            }
            Stage::Optimizer => {
                // AdamW through `Backend::adamw_step` (see `prepare`).
                let via = |s: &Spec| match s.family {
                    Family::AdamW => " (adamw_step)",
                    _ => "",
                };
                for (tensor, m, k) in tensors {
                    for &s in &specs {
                        out.push(case(format!("{tensor} [{m},{k}]{}", via(s)), s, m, k));
                    }
                }
                // One AdamW launch steps every tensor of a LoRA.
                for &s in specs.iter().filter(|s| s.family == Family::AdamW) {
                    let set = case(String::new(), s, 0, 0);
                    let (count, total) = (set.tensors().len(), set.elements());
                    let what = format!(
                        "LoRA r 8, all targets: {count} tensors, {:.2}M values{}",
                        total as f64 / 1e6,
                        via(s)
                    );
                    out.push(case(what, s, 0, 0));
                }
                continue;
            }
            Stage::Encoder => {
                // One layer's kernels on a padded batch of n / ENC_SEQ
                // sentences: the bias rows on the projections' width and
                // on the intermediate's.
                let batch = n / ENC_SEQ;
                for &s in &specs {
                    match s.family {
                        Family::Layernorm => out.push(case(format!("[{n},{ENC_D}]"), s, ENC_D, 0)),
                        Family::Gelu => out.push(case(format!("[{n},{ENC_FFN}]"), s, ENC_FFN, 0)),
                        Family::AddBias => {
                            for d in [ENC_D, ENC_FFN] {
                                out.push(case(format!("[{n},{d}] + bias [{d}]"), s, d, 0));
                            }
                        }
                        Family::AttentionBidir => {
                            let lens = ragged(batch, ENC_SEQ);
                            let (lo, hi) = (lens.iter().min(), lens.iter().max());
                            let what = format!(
                                "{ENC_HEADS} heads of {ENC_HD}, {batch} seqs padded to {ENC_SEQ}, \
                                 lens {}..{}",
                                lo.unwrap_or(&0),
                                hi.unwrap_or(&0)
                            );
                            out.push(case(what, s, ENC_SEQ, 0));
                        }
                        _ => {}
                    }
                }
                continue;
            }
            Stage::Retrieval => {
                // The index's scores for n queries (f32 throughout, with
                // cuBLAS's f32 GEMM as the bound), then the best of each row.
                let what = format!("scores [{n},{ENC_D}]·[{INDEX},{ENC_D}]ᵀ");
                let versions: Vec<&'static Spec> = (specs.iter().copied())
                    .filter(|s| matches!(s.family, Family::Matmul { .. }))
                    .collect();
                for &s in &versions {
                    out.push(case(what.clone(), s, INDEX, ENC_D));
                }
                if with_cublas && !versions.is_empty() {
                    out.push(case(what, cublas_spec(true, true), INDEX, ENC_D));
                }
                for &s in specs.iter().filter(|s| s.family == Family::TopK) {
                    out.push(case(format!("[{n},{INDEX}], k {TOP_K}"), s, INDEX, TOP_K));
                }
                continue;
            }
        }
        for &s in &specs {
            let what = match s.family {
                Family::Matmul { .. } | Family::Cublas { .. } | Family::MatmulAcc { .. } => {
                    continue
                }
                // A prefill kernel; decode has its own.
                Family::AttentionPrefill if n == 1 => continue,
                Family::Attention
                | Family::AttentionPrefill
                | Family::AttentionBwdDq
                | Family::AttentionBwdDkv => {
                    format!("{HEADS}/{KV_HEADS} heads of {HD}, {n} q × {} k", pos0 + n)
                }
                Family::AttentionPaged => format!(
                    "{HEADS}/{KV_HEADS} heads of {HD}, {n} q × {} k, pool blocks of {PAGE}",
                    pos0 + n
                ),
                Family::RopeRows => {
                    format!("q [{n},{}], {HEADS} heads, a position per row", HEADS * HD)
                }
                Family::ScatterRows { .. } => {
                    format!("k [{n},{}] into a pool of {POOL} slots", KV_HEADS * HD)
                }
                Family::Rmsnorm { .. } | Family::Add { .. } | Family::RmsnormBwd => {
                    format!("[{n},{D}]")
                }
                Family::Rope { .. } => format!("q [{n},{}], {HEADS} heads", HEADS * HD),
                Family::Swiglu | Family::SwigluBwd => format!("[{n},{FFN}]"),
                Family::Embedding { .. } => format!("{n} ids, table [{VOCAB},{D}]"),
                Family::EmbeddingBwd => format!("{n} ids, dtable [{VOCAB},{D}]"),
                Family::LogSoftmax | Family::CrossEntropy => format!("[{n},{VOCAB}]"),
                Family::Dropout { .. } => format!("[{n},{D}], p {DROPOUT}"),
                // Sampling reads the last position's logits, once a step.
                Family::Argmax | Family::Sample if n > 1 => continue,
                Family::Argmax => format!("[1,{VOCAB}]"),
                Family::Sample => format!("[1,{VOCAB}], T 0.8, top-k 50, top-p 0.95"),
                Family::Convert { .. } | Family::AdamW | Family::SumSquares | Family::Scale => {
                    continue
                }
                Family::LoraFwd | Family::LoraBwdX { .. } | Family::LoraGrad { .. } => continue,
                Family::LoraGathered => continue,
                Family::Layernorm
                | Family::Gelu
                | Family::AddBias
                | Family::AttentionBidir
                | Family::TopK => continue,
            };
            out.push(case(what, s, 0, 0));
        }
    }
    out
}

/// The lengths of a padded encoder batch of `batch` sentences, as the
/// embedding model batches them: the longest fills the padded length `seq`,
/// the others spread evenly down to seq / 8.
fn ragged(batch: usize, seq: usize) -> Vec<usize> {
    let shortest = (seq / 8).max(1);
    let step = (seq - shortest) as f64 / batch.saturating_sub(1).max(1) as f64;
    (0..batch)
        .map(|b| seq - (b as f64 * step).round() as usize)
        .collect()
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
    fn u64(mut self, v: u64) -> Self {
        self.0.push(v);
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
    /// `Backend::adamw_step` of the Cuda device over the prepared tensors:
    /// outputs param, m, v, copy and input grad of each tensor in turn.
    AdamW(AdamW),
    /// out[n, m] = x[n, k] · w[m, k]ᵀ by cuBLAS.
    Cublas {
        out: DevicePtr,
        x: DevicePtr,
        w: DevicePtr,
        n: usize,
        m: usize,
        k: usize,
        f32_in: bool,
        f32_out: bool,
    },
}

/// A case ready to launch: its device tensors (kept alive here, `call` holds
/// their addresses), the CPU device's answers and how to compare with them.
struct Prepared<D: GpuDriver> {
    inputs: Vec<Tensor<Cuda<D>>>,
    outs: Vec<Output<D>>,
    call: Call,
}

/// An output, the CPU device's values of it, and how to compare them.
struct Output<D: GpuDriver> {
    name: &'static str,
    t: Tensor<Cuda<D>>,
    want: Vec<f32>,
    check: Check,
}

fn output<D: GpuDriver>(
    name: &'static str,
    t: Tensor<Cuda<D>>,
    want: Vec<f32>,
    check: Check,
) -> Output<D> {
    Output {
        name,
        t,
        want,
        check,
    }
}

/// How outputs are compared with the CPU device's.
#[derive(Clone, Copy)]
enum Check {
    /// Max error relative to the largest reference value, at most this.
    Tol(f32),
    /// Token ids, exactly (stored as the bits of f32s).
    Ids,
    /// f64 values (each stored as the bits of two f32s), relative error.
    F64(f32),
    /// Top-k lists of k (column, score) per row, exactly: the output holds
    /// every row's columns (u32, as the bits of f32s), then every row's
    /// scores; the kernel's `width` candidates per row in any order, the
    /// CPU's k best first.
    TopK { k: usize, width: usize },
}

/// An f64 as the two f32s that hold its bits (little-endian), as an F32
/// tensor of the device stores it.
fn f64_as_f32s(v: f64) -> Vec<f32> {
    let bits = v.to_bits();
    vec![
        f32::from_bits(bits as u32),
        f32::from_bits((bits >> 32) as u32),
    ]
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.chunks_exact(2)
        .map(|p| f64::from_bits(u64::from(p[0].to_bits()) | u64::from(p[1].to_bits()) << 32))
        .collect()
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

/// Random f32 values, for the inputs a kernel takes in f32 throughout.
fn f32s(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
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

fn max_rel_err_f64(got: &[f64], want: &[f64]) -> f32 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        let e = (g - w).abs() / scale;
        if e.is_nan() {
            return f32::INFINITY;
        }
        worst = worst.max(e);
    }
    worst as f32
}

fn cpu(v: &[f32], shape: &[usize]) -> Result<Tensor<Cpu>> {
    Ok(Cpu.upload(v.to_vec(), shape, F32)?)
}

impl<D: GpuDriver> Bench<'_, D> {
    fn up(&self, v: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor<Cuda<D>>> {
        Ok(self.gpu.upload(v.to_vec(), shape, dtype)?)
    }

    /// u32 ids (token ids, targets) as the bits of an F32 tensor, which
    /// uploads byte for byte.
    fn ids(&self, ids: &[u32]) -> Result<Tensor<Cuda<D>>> {
        let bits: Vec<f32> = ids.iter().map(|&i| f32::from_bits(i)).collect();
        self.up(&bits, &[ids.len()], F32)
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
        let bf16 = Check::Tol(BF16_TOL);
        let tol = |f32: bool| Check::Tol(if f32 { F32_TOL } else { BF16_TOL });
        Ok(match case.spec.family {
            Family::Matmul {
                f32_in, f32_out, ..
            }
            | Family::Cublas { f32_in, f32_out } => {
                // f32 inputs (queries and index vectors) take any f32.
                let input = if f32_in { f32s } else { data };
                let (xv, wv) = (input(rng, n * k, 1.0), input(rng, m * k, 1.0));
                let mut want = Cpu.zeros(&[n, m], F32)?;
                Cpu.matmul_nt(&mut want, &cpu(&xv, &[n, k])?, &cpu(&wv, &[m, k])?)?;
                let x = self.up(&xv, &[n, k], dtype(f32_in))?;
                let w = self.up(&wv, &[m, k], dtype(f32_in))?;
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
                        f32_in,
                        f32_out,
                    },
                };
                Prepared {
                    inputs: vec![x, w],
                    outs: vec![output("out", out, want.buf, tol(f32_out))],
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
                let mut want_lse = Cpu.zeros(&[HEADS, n], F32)?;
                Cpu.attention(
                    &mut want,
                    Some(&mut want_lse),
                    &qc,
                    &kc,
                    &vc,
                    HEADS,
                    KV_HEADS,
                    pos0,
                )?;
                let q = self.up(&qv, &[n, width], BF16)?;
                let kt = self.up(&kv, &[cap, kv_width], BF16)?;
                let vt = self.up(&vv, &[cap, kv_width], BF16)?;
                let out = self.poisoned(&[n, width], BF16)?;
                // The log-sum-exp the prefill kernel saves for the backward.
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
                let mut outs = vec![output("out", out, want.buf, bf16)];
                if case.spec.family == Family::Attention {
                    drop(lse);
                } else {
                    outs.push(output("lse", lse, want_lse.buf, tol(true)));
                }
                Prepared {
                    inputs: vec![q, kt, vt],
                    outs,
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
                    inputs: vec![x, w],
                    outs: vec![output("out", out, want.buf, bf16)],
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::Rope { backward } => {
                // In place (so not poisoned), on q (the backward on dq).
                let xv = data(rng, n * HEADS * HD, 2.0);
                let mut want = cpu(&xv, &[n, HEADS * HD])?;
                if backward {
                    Cpu.rope_backward(&mut want, HEADS, pos0, THETA)?;
                } else {
                    Cpu.rope(&mut want, HEADS, pos0, THETA)?;
                }
                let out = self.up(&xv, &[n, HEADS * HD], BF16)?;
                let args = Args::default().ptr(out.buf.ptr).int(n).int(HEADS).int(HD);
                let args = args.int(pos0).float(THETA);
                let grid = blocks_for(n * HEADS * HD / 2) as usize;
                Prepared {
                    inputs: vec![],
                    outs: vec![output("out", out, want.buf, bf16)],
                    call: kernel((grid, 1), 256, args),
                }
            }
            Family::RopeRows => {
                // In place (so not poisoned), on q, rows at scattered positions.
                let xv = data(rng, n * HEADS * HD, 2.0);
                let positions: Vec<u32> = (0..n).map(|_| rng.random_range(0..4096)).collect();
                let mut want = cpu(&xv, &[n, HEADS * HD])?;
                Cpu.rope_rows(&mut want, HEADS, &positions, THETA)?;
                let out = self.up(&xv, &[n, HEADS * HD], BF16)?;
                let dev_positions = self.ids(&positions)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(dev_positions.buf.ptr);
                let args = args.int(n).int(HEADS).int(HD).float(THETA);
                let grid = blocks_for(n * HEADS * HD / 2) as usize;
                Prepared {
                    inputs: vec![dev_positions],
                    outs: vec![output("out", out, want.buf, bf16)],
                    call: kernel((grid, 1), 256, args),
                }
            }
            Family::ScatterRows { f32 } => {
                // Into a random pool (the rows not named must keep their
                // values), exactly.
                let d = KV_HEADS * HD;
                let (before, src) = (data(rng, POOL * d, 1.0), data(rng, n * d, 1.0));
                let mut slots: Vec<u32> = (0..POOL as u32).collect();
                slots.shuffle(rng);
                slots.truncate(n);
                let mut want = cpu(&before, &[POOL, d])?;
                Cpu.scatter_rows(&mut want, &cpu(&src, &[n, d])?, &slots)?;
                let dst = self.up(&before, &[POOL, d], dtype(f32))?;
                let src = self.up(&src, &[n, d], dtype(f32))?;
                let dev_slots = self.ids(&slots)?;
                let args = Args::default().ptr(dst.buf.ptr).ptr(src.buf.ptr);
                let args = args.ptr(dev_slots.buf.ptr).int(d);
                Prepared {
                    inputs: vec![src, dev_slots],
                    outs: vec![output("dst", dst, want.buf, Check::Tol(0.0))],
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::AttentionPaged => {
                // One sequence's keys and values in shuffled blocks of the
                // pool, NaN in every other slot.
                let (width, kv_width, ctx) = (HEADS * HD, KV_HEADS * HD, pos0 + n);
                let num_blocks = ctx.div_ceil(PAGE) + 4;
                let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
                ids.shuffle(rng);
                let table = &ids[..ctx.div_ceil(PAGE)];
                let slots = num_blocks * PAGE;
                let (mut kp, mut vp) = (
                    vec![f32::NAN; slots * kv_width],
                    vec![f32::NAN; slots * kv_width],
                );
                let (kc, vc) = (
                    data(rng, ctx * kv_width, 2.0),
                    data(rng, ctx * kv_width, 1.0),
                );
                for p in 0..ctx {
                    let slot = table[p / PAGE] as usize * PAGE + p % PAGE;
                    kp[slot * kv_width..][..kv_width]
                        .copy_from_slice(&kc[p * kv_width..][..kv_width]);
                    vp[slot * kv_width..][..kv_width]
                        .copy_from_slice(&vc[p * kv_width..][..kv_width]);
                }
                let qv = data(rng, n * width, 2.0);
                let seq = [PagedSeq {
                    row: 0,
                    rows: n,
                    ctx,
                    blocks: table,
                }];
                let mut want = Cpu.zeros(&[n, width], F32)?;
                Cpu.attention_paged(
                    &mut want,
                    &cpu(&qv, &[n, width])?,
                    &cpu(&kp, &[slots, kv_width])?,
                    &cpu(&vp, &[slots, kv_width])?,
                    &seq,
                    HEADS,
                    KV_HEADS,
                    PAGE,
                )?;
                let q = self.up(&qv, &[n, width], BF16)?;
                let kt = self.up(&kp, &[slots, kv_width], BF16)?;
                let vt = self.up(&vp, &[slots, kv_width], BF16)?;
                let tasks: Vec<u32> = (0..n)
                    .flat_map(|i| [i as u32, (pos0 + i) as u32, 0])
                    .collect();
                let (dev_tasks, dev_table) = (self.ids(&tasks)?, self.ids(table)?);
                let out = self.poisoned(&[n, width], BF16)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(q.buf.ptr);
                let args = args.ptr(kt.buf.ptr).ptr(vt.buf.ptr);
                let args = args.ptr(dev_tasks.buf.ptr).ptr(dev_table.buf.ptr);
                let args = args.int(HEADS).int(KV_HEADS).int(HD).int(PAGE);
                Prepared {
                    inputs: vec![q, kt, vt, dev_tasks, dev_table],
                    outs: vec![output("out", out, want.buf, bf16)],
                    call: kernel((n, HEADS), 128, args),
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
                    inputs: vec![gate, up],
                    outs: vec![output("out", out, want.buf, bf16)],
                    call: kernel((blocks_for(n * FFN) as usize, 1), 256, args),
                }
            }
            Family::Add { f32_x, f32_y } => {
                // In place: x += alpha · y.
                let (xv, yv) = (data(rng, n * D, 3.0), data(rng, n * D, 3.0));
                let alpha = 0.75;
                let mut want = cpu(&xv, &[n, D])?;
                Cpu.add_scaled(&mut want, &cpu(&yv, &[n, D])?, alpha)?;
                let out = self.up(&xv, &[n, D], dtype(f32_x))?;
                let y = self.up(&yv, &[n, D], dtype(f32_y))?;
                let args = Args::default()
                    .ptr(out.buf.ptr)
                    .ptr(y.buf.ptr)
                    .float(alpha)
                    .int(n * D);
                Prepared {
                    inputs: vec![y],
                    outs: vec![output("out", out, want.buf, tol(f32_x))],
                    call: kernel((blocks_for(n * D) as usize, 1), 256, args),
                }
            }
            Family::Embedding { f32_out } => {
                let tv = data(rng, VOCAB * D, 1.0);
                let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect();
                let mut want = Cpu.zeros(&[n, D], F32)?;
                Cpu.embedding(&mut want, &ids, &cpu(&tv, &[VOCAB, D])?)?;
                let table = self.up(&tv, &[VOCAB, D], BF16)?;
                let dev_ids = self.ids(&ids)?;
                let out = self.poisoned(&[n, D], dtype(f32_out))?;
                let args = Args::default().ptr(out.buf.ptr).ptr(dev_ids.buf.ptr);
                let args = args.ptr(table.buf.ptr).int(D);
                Prepared {
                    inputs: vec![table, dev_ids],
                    outs: vec![output("out", out, want.buf, tol(f32_out))],
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
                    inputs: vec![x],
                    outs: vec![output("out", out, want.buf, tol(true))],
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
                    inputs: vec![x],
                    outs: vec![output("ids", out, want, Check::Ids)],
                    call: kernel((n, 1), 1024, args),
                }
            }
            Family::MatmulAcc { a_f32, c_f32 } => {
                // The backward of out [n, m] = x [n, k] · w [m, k]ᵀ, launched
                // as `matmul_nt_backward` launches it; the gradient (dx or dw)
                // accumulates into random values.
                let doutv = data(rng, n * m, 1.0);
                let (xv, wv) = (data(rng, n * k, 1.0), data(rng, m * k, 1.0));
                let (dout_c, x_c, w_c) = (
                    cpu(&doutv, &[n, m])?,
                    cpu(&xv, &[n, k])?,
                    cpu(&wv, &[m, k])?,
                );
                let rows = if c_f32 { m } else { n };
                let cv = data(rng, rows * k, 1.0);
                let mut want = cpu(&cv, &[rows, k])?;
                let (name, b, (mm, nn, kk), (a_rs, a_cs)) = if c_f32 {
                    // dw [m, k] += doutᵀ [m, n] · x [n, k]
                    let mut dx = Cpu.zeros(&[n, k], F32)?;
                    Cpu.matmul_nt_backward(&mut dx, Some(&mut want), &dout_c, &x_c, &w_c)?;
                    ("dw", self.up(&xv, &[n, k], BF16)?, (m, k, n), (1, m))
                } else {
                    // dx [n, k] += dout [n, m] · w [m, k]
                    Cpu.matmul_nt_backward(&mut want, None, &dout_c, &x_c, &w_c)?;
                    ("dx", self.up(&wv, &[m, k], BF16)?, (n, k, m), (m, 1))
                };
                let dout = self.up(&doutv, &[n, m], dtype(a_f32))?;
                let out = self.up(&cv, &[rows, k], dtype(c_f32))?;
                let args = Args::default().ptr(out.buf.ptr).ptr(dout.buf.ptr);
                let args = args.ptr(b.buf.ptr).int(mm).int(nn).int(kk);
                let args = args.int(a_rs).int(a_cs).int(k).int(1);
                Prepared {
                    inputs: vec![dout, b],
                    outs: vec![output(name, out, want.buf, tol(c_f32))],
                    call: kernel((nn.div_ceil(64), mm.div_ceil(64)), 256, args),
                }
            }
            Family::AttentionBwdDq | Family::AttentionBwdDkv => {
                let (width, kv_width, cap) = (HEADS * HD, KV_HEADS * HD, pos0 + n);
                let (qv, dov) = (data(rng, n * width, 1.5), data(rng, n * width, 1.0));
                let (kv, vv) = (
                    data(rng, cap * kv_width, 1.5),
                    data(rng, cap * kv_width, 1.0),
                );
                // dk and dv accumulate from zero, as the training step passes them.
                let zeros = vec![0.0; cap * kv_width];
                let mut dq_c = Cpu.zeros(&[n, width], F32)?;
                let mut dk_c = cpu(&zeros, &[cap, kv_width])?;
                let mut dv_c = cpu(&zeros, &[cap, kv_width])?;
                let (q_c, k_c, v_c) = (
                    cpu(&qv, &[n, width])?,
                    cpu(&kv, &[cap, kv_width])?,
                    cpu(&vv, &[cap, kv_width])?,
                );
                // The forward's output and log-sum-exp (the CPU's, for both).
                let mut out_c = Cpu.zeros(&[n, width], F32)?;
                let mut lse_c = Cpu.zeros(&[HEADS, n], F32)?;
                Cpu.attention(
                    &mut out_c,
                    Some(&mut lse_c),
                    &q_c,
                    &k_c,
                    &v_c,
                    HEADS,
                    KV_HEADS,
                    pos0,
                )?;
                Cpu.attention_backward(
                    &mut dq_c,
                    &mut dk_c,
                    &mut dv_c,
                    &cpu(&dov, &[n, width])?,
                    &q_c,
                    &k_c,
                    &v_c,
                    &out_c,
                    &lse_c,
                    HEADS,
                    KV_HEADS,
                    pos0,
                )?;
                let q = self.up(&qv, &[n, width], BF16)?;
                let dout = self.up(&dov, &[n, width], BF16)?;
                let kt = self.up(&kv, &[cap, kv_width], BF16)?;
                let vt = self.up(&vv, &[cap, kv_width], BF16)?;
                let out = self.up(&out_c.buf, &[n, width], BF16)?;
                let lse = self.up(&lse_c.buf, &[HEADS, n], F32)?;
                let dq = self.poisoned(&[n, width], BF16)?;
                // D of every (query, head), from the dq kernel to the dkv
                // kernel; checked through the dkv kernel's outputs.
                let dsum = self.poisoned(&[HEADS, n], F32)?;
                let args = Args::default().ptr(dq.buf.ptr).ptr(dsum.buf.ptr);
                let args = args.ptr(dout.buf.ptr).ptr(q.buf.ptr);
                let args = args.ptr(kt.buf.ptr).ptr(vt.buf.ptr);
                let args = args.ptr(out.buf.ptr).ptr(lse.buf.ptr);
                let args = args.int(n).int(HEADS).int(KV_HEADS).int(HD).int(pos0);
                let dq_call = Call::Kernel {
                    name: "attention_bwd_dq_bf16",
                    grid: (n as u32, HEADS as u32, 1),
                    block: 32,
                    args,
                };
                if case.spec.family == Family::AttentionBwdDq {
                    Prepared {
                        inputs: vec![q, dout, kt, vt, out, lse, dsum],
                        outs: vec![output("dq", dq, dq_c.buf, bf16)],
                        call: dq_call,
                    }
                } else {
                    // D, which the launcher's first kernel leaves, untimed.
                    self.launch(&dq_call)?;
                    let dk = self.up(&zeros, &[cap, kv_width], BF16)?;
                    let dv = self.up(&zeros, &[cap, kv_width], BF16)?;
                    let args = Args::default().ptr(dk.buf.ptr).ptr(dv.buf.ptr);
                    let args = args.ptr(lse.buf.ptr).ptr(dsum.buf.ptr).ptr(dout.buf.ptr);
                    let args = args.ptr(q.buf.ptr).ptr(kt.buf.ptr).ptr(vt.buf.ptr);
                    let args = args.int(n).int(HEADS).int(KV_HEADS).int(HD).int(pos0);
                    Prepared {
                        inputs: vec![q, dout, kt, vt, out, lse, dsum, dq],
                        outs: vec![
                            output("dk", dk, dk_c.buf, bf16),
                            output("dv", dv, dv_c.buf, bf16),
                        ],
                        call: kernel((cap, KV_HEADS), 32, args),
                    }
                }
            }
            Family::RmsnormBwd => {
                // The residual stream x and its gradient dx in f32, dout and
                // the gain in bf16; dx and dw accumulate into random values.
                let (xv, dov) = (data(rng, n * D, 2.0), data(rng, n * D, 1.0));
                let (wv, dxv, dwv) = (data(rng, D, 1.5), data(rng, n * D, 1.0), data(rng, D, 1.0));
                let (mut dx_c, mut dw_c) = (cpu(&dxv, &[n, D])?, cpu(&dwv, &[D])?);
                let (x_c, dout_c) = (cpu(&xv, &[n, D])?, cpu(&dov, &[n, D])?);
                Cpu.rmsnorm_backward(&mut dx_c, &mut dw_c, &dout_c, &x_c, &cpu(&wv, &[D])?, EPS)?;
                let (x, dout) = (self.up(&xv, &[n, D], F32)?, self.up(&dov, &[n, D], BF16)?);
                let w = self.up(&wv, &[D], BF16)?;
                let (dx, dw) = (self.up(&dxv, &[n, D], F32)?, self.up(&dwv, &[D], F32)?);
                let args = Args::default().ptr(dx.buf.ptr).ptr(dw.buf.ptr);
                let args = args.ptr(dout.buf.ptr).ptr(x.buf.ptr).ptr(w.buf.ptr);
                let args = args.int(D).float(EPS);
                Prepared {
                    inputs: vec![dout, x, w],
                    outs: vec![
                        output("dx", dx, dx_c.buf, tol(true)),
                        output("dw", dw, dw_c.buf, tol(true)),
                    ],
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::SwigluBwd => {
                let len = n * FFN;
                let (dov, gv, uv) = (
                    data(rng, len, 1.0),
                    data(rng, len, 4.0),
                    data(rng, len, 2.0),
                );
                let (mut dgate_c, mut dup_c) =
                    (Cpu.zeros(&[n, FFN], F32)?, Cpu.zeros(&[n, FFN], F32)?);
                Cpu.swiglu_backward(
                    &mut dgate_c,
                    &mut dup_c,
                    &cpu(&dov, &[n, FFN])?,
                    &cpu(&gv, &[n, FFN])?,
                    &cpu(&uv, &[n, FFN])?,
                )?;
                let dout = self.up(&dov, &[n, FFN], BF16)?;
                let (gate, up) = (
                    self.up(&gv, &[n, FFN], BF16)?,
                    self.up(&uv, &[n, FFN], BF16)?,
                );
                let dgate = self.poisoned(&[n, FFN], BF16)?;
                let dup = self.poisoned(&[n, FFN], BF16)?;
                let args = Args::default().ptr(dgate.buf.ptr).ptr(dup.buf.ptr);
                let args = args.ptr(dout.buf.ptr).ptr(gate.buf.ptr).ptr(up.buf.ptr);
                Prepared {
                    inputs: vec![dout, gate, up],
                    outs: vec![
                        output("dgate", dgate, dgate_c.buf, bf16),
                        output("dup", dup, dup_c.buf, bf16),
                    ],
                    call: kernel((blocks_for(len) as usize, 1), 256, args.int(len)),
                }
            }
            Family::EmbeddingBwd => {
                // Ids from the first 1024 of the vocabulary, so that rows
                // share ids (and add atomically) as frequent tokens do; the
                // table's gradient accumulates into random values.
                let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..1024)).collect();
                let (dov, tv) = (data(rng, n * D, 1.0), data(rng, VOCAB * D, 1.0));
                let mut want = cpu(&tv, &[VOCAB, D])?;
                Cpu.embedding_backward(&mut want, &cpu(&dov, &[n, D])?, &ids)?;
                let (dev_ids, dout) = (self.ids(&ids)?, self.up(&dov, &[n, D], F32)?);
                let dtable = self.up(&tv, &[VOCAB, D], F32)?;
                let args = Args::default().ptr(dtable.buf.ptr).ptr(dev_ids.buf.ptr);
                let args = args.ptr(dout.buf.ptr).int(D);
                Prepared {
                    inputs: vec![dev_ids, dout],
                    outs: vec![output("dtable", dtable, want.buf, tol(true))],
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::CrossEntropy => {
                let xv = data(rng, n * VOCAB, 8.0);
                let mut targets: Vec<u32> =
                    (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect();
                // A row that counts no loss (a prompt token).
                targets[n / 2] = IGNORE;
                let scale = mean_scale(&targets);
                let mut dl_c = Cpu.zeros(&[n, VOCAB], F32)?;
                Cpu.cross_entropy(
                    Some(&mut dl_c),
                    &cpu(&xv, &[n, VOCAB])?,
                    &targets,
                    Some(scale),
                )?;
                // The kernel writes each row's loss; the CPU op sums them.
                let losses = (xv.chunks_exact(VOCAB).zip(&targets))
                    .map(|(row, &t)| {
                        Ok(Cpu.cross_entropy(None, &cpu(row, &[1, VOCAB])?, &[t], None)?)
                    })
                    .collect::<Result<Vec<f32>>>()?;
                let (logits, dev_targets) = (self.up(&xv, &[n, VOCAB], F32)?, self.ids(&targets)?);
                let loss = self.poisoned(&[n], F32)?;
                let dlogits = self.poisoned(&[n, VOCAB], F32)?;
                let args = Args::default().ptr(loss.buf.ptr).ptr(dlogits.buf.ptr);
                let args = args.ptr(logits.buf.ptr).ptr(dev_targets.buf.ptr);
                let args = args.int(VOCAB).float(scale);
                Prepared {
                    inputs: vec![logits, dev_targets],
                    outs: vec![
                        output("loss", loss, losses, tol(true)),
                        output("dlogits", dlogits, dl_c.buf, tol(true)),
                    ],
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::Dropout { f32_x } => {
                // In place, with the keep scale formed in f32 as the launcher does.
                let (xv, seed) = (data(rng, n * D, 1.0), rng.random());
                let mut want = cpu(&xv, &[n, D])?;
                Cpu.dropout(&mut want, DROPOUT, seed)?;
                let out = self.up(&xv, &[n, D], dtype(f32_x))?;
                let args = Args::default().ptr(out.buf.ptr).float(DROPOUT);
                let args = args.float(1.0 / (1.0 - DROPOUT)).u64(seed).int(n * D);
                Prepared {
                    inputs: vec![],
                    outs: vec![output("x", out, want.buf, tol(f32_x))],
                    call: kernel((blocks_for(n * D) as usize, 1), 256, args),
                }
            }
            Family::LoraFwd | Family::LoraBwdX { .. } | Family::LoraGrad { .. } => {
                self.prepare_lora(case, rng)?
            }
            Family::LoraGathered => {
                let (out, inp, Lora { r, adapters, .. }) = (m, k, case.lora);
                let s = LORA_ALPHA / r as f32;
                let ws: Vec<(Vec<f32>, Vec<f32>)> = (0..adapters)
                    .map(|_| (data(rng, r * inp, 0.5), data(rng, out * r, 0.5)))
                    .collect();
                let row_adapter: Vec<u32> = (0..n).map(|i| (i % adapters) as u32).collect();
                let (xv, yv) = (data(rng, n * inp, 1.0), data(rng, n * out, 1.0));
                let cpu_ws = (ws.iter())
                    .map(|(a, b)| Ok((cpu(a, &[r, inp])?, cpu(b, &[out, r])?)))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<LoraRef<'_, Cpu>> = (cpu_ws.iter())
                    .map(|(a, b)| LoraRef { a, b, scale: s })
                    .collect();
                let mut want = cpu(&yv, &[n, out])?;
                Cpu.lora_gathered(&mut want, &cpu(&xv, &[n, inp])?, &refs, &row_adapter)?;
                let mut inputs = Vec::new();
                // The table and the tasks as `lora_gathered` builds them, as
                // the u32 halves of u64 words.
                let mut words: Vec<u64> = Vec::new();
                for (a, b) in &ws {
                    let (a, b) = (self.up(a, &[r, inp], BF16)?, self.up(b, &[out, r], BF16)?);
                    words.extend([a.buf.ptr, b.buf.ptr, r as u64, s.to_bits() as u64]);
                    inputs.extend([a, b]);
                }
                let mut tasks: Vec<u64> = (row_adapter.iter().enumerate())
                    .map(|(i, &a)| i as u64 | (a as u64) << 32)
                    .collect();
                tasks.sort_unstable_by_key(|&t| (t >> 32, t & 0xffff_ffff));
                let halves = |w: &[u64]| -> Vec<u32> {
                    w.iter()
                        .flat_map(|&w| [w as u32, (w >> 32) as u32])
                        .collect()
                };
                let (table, tasks) = (self.ids(&halves(&words))?, self.ids(&halves(&tasks))?);
                let x = self.up(&xv, &[n, inp], BF16)?;
                let y = self.up(&yv, &[n, out], BF16)?;
                let args = Args::default().ptr(y.buf.ptr).ptr(x.buf.ptr);
                let args = args.ptr(table.buf.ptr).ptr(tasks.buf.ptr).int(inp).int(out);
                inputs.extend([x, table, tasks]);
                Prepared {
                    inputs,
                    outs: vec![output("y", y, want.buf, bf16)],
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::Convert { to_f32 } => {
                // f32 master weights hold any f32 (rounded into bf16); a bf16
                // working copy widens exactly.
                let len = m * k;
                let v: Vec<f32> = if to_f32 {
                    data(rng, len, 1.0)
                } else {
                    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
                };
                let mut want = Cpu.zeros(&[m, k], F32)?;
                Cpu.convert(&mut want, &cpu(&v, &[m, k])?)?;
                let src = self.up(&v, &[m, k], dtype(!to_f32))?;
                let out = self.poisoned(&[m, k], dtype(to_f32))?;
                let args = Args::default().ptr(out.buf.ptr).ptr(src.buf.ptr).int(len);
                Prepared {
                    inputs: vec![src],
                    outs: vec![output("dst", out, want.buf, tol(to_f32))],
                    call: kernel((blocks_for(len) as usize, 1), 256, args),
                }
            }
            Family::AdamW => {
                // Through the Cuda device's `adamw_step`, which launches
                // adamw_f32 once for all its tensors over a table of their
                // pointers that it uploads each call (included in the time).
                // Every tensor refreshes a bf16 working copy, as training
                // on the GPU does. Mid-run state: gradients around 1e-2,
                // step 10.
                let hp = AdamW {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    step: 10,
                };
                let (mut inputs, mut outs) = (Vec::new(), Vec::new());
                for shape in case.tensors() {
                    let len = shape[0] * shape[1];
                    let (pv, gv, mv) = (
                        data(rng, len, 1.0),
                        data(rng, len, 1e-2),
                        data(rng, len, 1e-2),
                    );
                    let vv: Vec<f32> = data(rng, len, 1e-2).iter().map(|g| g * g).collect();
                    let (mut p_c, mut m_c) = (cpu(&pv, &shape)?, cpu(&mv, &shape)?);
                    let (mut v_c, mut copy_c) = (cpu(&vv, &shape)?, Cpu.zeros(&shape, F32)?);
                    let g_c = cpu(&gv, &shape)?;
                    let mut entry = [AdamWTensors {
                        param: &mut p_c,
                        m: &mut m_c,
                        v: &mut v_c,
                        grad: &g_c,
                        copy: Some(&mut copy_c),
                    }];
                    Cpu.adamw_step(&mut entry, &hp)?;
                    let f32_tol = tol(true);
                    outs.push(output(
                        "param",
                        self.up(&pv, &shape, F32)?,
                        p_c.buf,
                        f32_tol,
                    ));
                    outs.push(output("m", self.up(&mv, &shape, F32)?, m_c.buf, f32_tol));
                    outs.push(output("v", self.up(&vv, &shape, F32)?, v_c.buf, f32_tol));
                    let copy = self.poisoned(&shape, BF16)?;
                    outs.push(output("copy", copy, copy_c.buf, bf16));
                    inputs.push(self.up(&gv, &shape, F32)?);
                }
                Prepared {
                    inputs,
                    outs,
                    call: Call::AdamW(hp),
                }
            }
            Family::SumSquares => {
                let len = m * k;
                let xv = data(rng, len, 2.0);
                let want = Cpu.sum_squares(&cpu(&xv, &[m, k])?)?;
                let x = self.up(&xv, &[m, k], F32)?;
                // The f64 total, zeroed as the launcher zeroes it (the
                // kernel adds into it).
                let out = self.up(&[0.0, 0.0], &[2], F32)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr).int(len);
                let blocks = blocks_for(len).min(1024) as usize;
                Prepared {
                    inputs: vec![x],
                    outs: vec![output("sum", out, f64_as_f32s(want), Check::F64(F32_TOL))],
                    call: kernel((blocks, 1), 256, args),
                }
            }
            Family::Scale => {
                let len = m * k;
                let xv = data(rng, len, 2.0);
                let mut want = cpu(&xv, &[m, k])?;
                Cpu.scale(&mut want, 0.37)?;
                let out = self.up(&xv, &[m, k], F32)?;
                let args = Args::default().ptr(out.buf.ptr).float(0.37).int(len);
                Prepared {
                    inputs: vec![],
                    outs: vec![output("x", out, want.buf, tol(true))],
                    call: kernel((blocks_for(len) as usize, 1), 256, args),
                }
            }
            Family::Layernorm => {
                // Hidden states around an offset mean, as the residual
                // stream has them.
                let xv: Vec<f32> = (0..n * m)
                    .map(|_| half::bf16::from_f32(3.0 + rng.random_range(-2.0..2.0)).to_f32())
                    .collect();
                let (wv, bv) = (data(rng, m, 1.5), data(rng, m, 0.5));
                let mut want = Cpu.zeros(&[n, m], F32)?;
                let (x_c, w_c, b_c) = (cpu(&xv, &[n, m])?, cpu(&wv, &[m])?, cpu(&bv, &[m])?);
                Cpu.layernorm(&mut want, &x_c, &w_c, &b_c, ENC_EPS)?;
                let x = self.up(&xv, &[n, m], BF16)?;
                let (w, b) = (self.up(&wv, &[m], BF16)?, self.up(&bv, &[m], BF16)?);
                let out = self.poisoned(&[n, m], BF16)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr);
                let args = args.ptr(w.buf.ptr).ptr(b.buf.ptr).int(m).float(ENC_EPS);
                Prepared {
                    inputs: vec![x, w, b],
                    outs: vec![output("out", out, want.buf, bf16)],
                    call: kernel((n, 1), 256, args),
                }
            }
            Family::Gelu => {
                let len = n * m;
                let xv = data(rng, len, 4.0);
                let mut want = Cpu.zeros(&[n, m], F32)?;
                Cpu.gelu(&mut want, &cpu(&xv, &[n, m])?)?;
                let x = self.up(&xv, &[n, m], BF16)?;
                let out = self.poisoned(&[n, m], BF16)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr).int(len);
                Prepared {
                    inputs: vec![x],
                    outs: vec![output("out", out, want.buf, bf16)],
                    call: kernel((blocks_for(len) as usize, 1), 256, args),
                }
            }
            Family::AddBias => {
                // In place: x [n, m] += bias [m] on every row.
                let len = n * m;
                let (xv, bv) = (data(rng, len, 3.0), data(rng, m, 1.0));
                let mut want = cpu(&xv, &[n, m])?;
                Cpu.add_bias(&mut want, &cpu(&bv, &[m])?)?;
                let (out, bias) = (self.up(&xv, &[n, m], BF16)?, self.up(&bv, &[m], BF16)?);
                let args = Args::default().ptr(out.buf.ptr).ptr(bias.buf.ptr);
                let args = args.int(len).int(m);
                Prepared {
                    inputs: vec![bias],
                    outs: vec![output("x", out, want.buf, bf16)],
                    call: kernel((blocks_for(len) as usize, 1), 256, args),
                }
            }
            Family::AttentionBidir => {
                // n / m sequences padded to m rows; the lengths go to the
                // device as u32, as the launcher uploads them.
                let (seq, rows, width) = (m, n, ENC_D);
                let lens = ragged(rows / seq, seq);
                let (qv, kv, vv) = (
                    data(rng, rows * width, 2.0),
                    data(rng, rows * width, 2.0),
                    data(rng, rows * width, 1.0),
                );
                let mut want = Cpu.zeros(&[rows, width], F32)?;
                Cpu.attention_bidirectional(
                    &mut want,
                    &cpu(&qv, &[rows, width])?,
                    &cpu(&kv, &[rows, width])?,
                    &cpu(&vv, &[rows, width])?,
                    ENC_HEADS,
                    &lens,
                )?;
                let q = self.up(&qv, &[rows, width], BF16)?;
                let kt = self.up(&kv, &[rows, width], BF16)?;
                let vt = self.up(&vv, &[rows, width], BF16)?;
                let dev_lens = self.ids(&lens.iter().map(|&l| l as u32).collect::<Vec<_>>())?;
                let out = self.poisoned(&[rows, width], BF16)?;
                let args = Args::default().ptr(out.buf.ptr).ptr(q.buf.ptr);
                let args = args.ptr(kt.buf.ptr).ptr(vt.buf.ptr).ptr(dev_lens.buf.ptr);
                let args = args.int(seq).int(ENC_HEADS).int(ENC_HD);
                Prepared {
                    inputs: vec![q, kt, vt, dev_lens],
                    outs: vec![output("out", out, want.buf, bf16)],
                    call: kernel((rows, ENC_HEADS), 128, args),
                }
            }
            Family::TopK => {
                // Scores as an f32 inner product leaves them (few ties).
                let sv = f32s(rng, n * m, 1.0);
                let lists = Cpu.top_k(&cpu(&sv, &[n, m])?, k)?;
                let mut want: Vec<f32> = Vec::with_capacity(2 * n * k);
                want.extend(lists.iter().flatten().map(|&(c, _)| f32::from_bits(c)));
                want.extend(lists.iter().flatten().map(|&(_, v)| v));
                let scores = self.up(&sv, &[n, m], F32)?;
                // Each row's segments x k candidates, as the launcher asks.
                let seg = top_k_segment(k);
                let segs = m.div_ceil(seg);
                let width = segs * k;
                // One buffer: idx [n, width] (u32), then val [n, width] inside it.
                let out = self.poisoned(&[2, n, width], F32)?;
                let val = out.buf.ptr + (4 * n * width) as DevicePtr;
                let args = Args::default().ptr(out.buf.ptr).ptr(val);
                let args = args.ptr(scores.buf.ptr).int(m).int(k).int(seg);
                Prepared {
                    inputs: vec![scores],
                    outs: vec![output("top k", out, want, Check::TopK { k, width })],
                    call: kernel((n, segs), 256, args),
                }
            }
        })
    }

    /// A LoRA case: the CPU device's forward and backward of the branch,
    /// then the one kernel of the case, launched as the Cuda device's
    /// `lora_forward` / `lora_backward` launch it. y, dx, dA and dB
    /// accumulate into random values; t and dt are poisoned. A kernel that
    /// reads what the one before it wrote (dA's dt, dB's t) gets the CPU
    /// device's values.
    fn prepare_lora(&self, case: &Case, rng: &mut StdRng) -> Result<Prepared<D>> {
        let (n, out, inp) = (case.n, case.m, case.k);
        let Lora { r, dropout, db, .. } = case.lora;
        let s = LORA_ALPHA / r as f32;
        let drop = dropout.then(|| (DROPOUT, rng.random::<u64>()));
        // The dropout arguments as the launchers form them; p = 0: none.
        let (p, keep_scale, seed) = match drop {
            Some((p, seed)) => (p, 1.0 / (1.0 - p), seed),
            None => (0.0, 1.0, 0),
        };
        let dy_f32 = match case.spec.family {
            Family::LoraBwdX { f32_dy } => f32_dy,
            Family::LoraGrad { f32_v } => db && f32_v,
            _ => false,
        };
        let (xv, av, bv) = (
            data(rng, n * inp, 1.0),
            data(rng, r * inp, 0.5),
            data(rng, out * r, 0.5),
        );
        let (yv, dyv, dxv) = (
            data(rng, n * out, 1.0),
            data(rng, n * out, 1.0),
            data(rng, n * inp, 1.0),
        );
        let (dav, dbv) = (data(rng, r * inp, 1.0), data(rng, out * r, 1.0));
        let (x_c, a_c, b_c) = (
            cpu(&xv, &[n, inp])?,
            cpu(&av, &[r, inp])?,
            cpu(&bv, &[out, r])?,
        );
        let (mut y_c, mut t_c) = (cpu(&yv, &[n, out])?, Cpu.zeros(&[n, r], F32)?);
        Cpu.lora_forward(&mut y_c, &mut t_c, &x_c, &a_c, &b_c, s, drop)?;
        let (mut dx_c, mut dt_c) = (cpu(&dxv, &[n, inp])?, Cpu.zeros(&[n, r], F32)?);
        let (mut da_c, mut db_c) = (cpu(&dav, &[r, inp])?, cpu(&dbv, &[out, r])?);
        Cpu.lora_backward(
            &mut dx_c,
            &mut da_c,
            &mut db_c,
            &mut dt_c,
            &cpu(&dyv, &[n, out])?,
            &x_c,
            &t_c,
            &a_c,
            &b_c,
            s,
            drop,
        )?;
        let (bf16, f32_tol) = (Check::Tol(BF16_TOL), Check::Tol(F32_TOL));
        let call = |grid: (usize, usize, usize), args| Call::Kernel {
            name: case.spec.name,
            grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block: 256,
            args,
        };
        let ab = || -> Result<_> {
            Ok((
                self.up(&av, &[r, inp], BF16)?,
                self.up(&bv, &[out, r], BF16)?,
            ))
        };
        Ok(match case.spec.family {
            Family::LoraFwd => {
                let (x, (a, b)) = (self.up(&xv, &[n, inp], BF16)?, ab()?);
                let y = self.up(&yv, &[n, out], BF16)?;
                let t = self.poisoned(&[n, r], F32)?;
                let args = Args::default().ptr(y.buf.ptr).ptr(t.buf.ptr);
                let args = args.ptr(x.buf.ptr).ptr(a.buf.ptr).ptr(b.buf.ptr);
                let args = args.int(n).int(inp).int(out).int(r).float(s);
                let args = args.float(p).float(keep_scale).u64(seed);
                Prepared {
                    inputs: vec![x, a, b],
                    outs: vec![
                        output("y", y, y_c.buf, bf16),
                        output("t", t, t_c.buf, f32_tol),
                    ],
                    call: call((n.div_ceil(16), 1, 1), args),
                }
            }
            Family::LoraBwdX { .. } => {
                let (dy, (a, b)) = (self.up(&dyv, &[n, out], dtype(dy_f32))?, ab()?);
                let dx = self.up(&dxv, &[n, inp], BF16)?;
                let dt = self.poisoned(&[n, r], F32)?;
                let args = Args::default().ptr(dx.buf.ptr).ptr(dt.buf.ptr);
                let args = args.ptr(dy.buf.ptr).ptr(a.buf.ptr).ptr(b.buf.ptr);
                let args = args.int(n).int(inp).int(out).int(r).float(s);
                let args = args.float(p).float(keep_scale).u64(seed);
                Prepared {
                    inputs: vec![dy, a, b],
                    outs: vec![
                        output("dx", dx, dx_c.buf, bf16),
                        output("dt", dt, dt_c.buf, f32_tol),
                    ],
                    call: call((n.div_ceil(16), 1, 1), args),
                }
            }
            _ => {
                // dA [r, in] += dtᵀ·drop(x), or dB [out, r] += s·dyᵀ·t
                // (dropout-free), as `lora_backward` passes them.
                let (name, g, u, v, want) = if db {
                    let g = self.up(&dbv, &[out, r], F32)?;
                    let u = self.up(&t_c.buf, &[n, r], F32)?;
                    let v = self.up(&dyv, &[n, out], dtype(dy_f32))?;
                    ("dB", g, u, v, db_c.buf)
                } else {
                    let g = self.up(&dav, &[r, inp], F32)?;
                    let u = self.up(&dt_c.buf, &[n, r], F32)?;
                    let v = self.up(&xv, &[n, inp], BF16)?;
                    ("dA", g, u, v, da_c.buf)
                };
                let (cols, (g_sk, g_sc), scale, (p, keep_scale, seed)) = if db {
                    (out, (1, r), s, (0.0, 1.0, 0))
                } else {
                    (inp, (inp, 1), 1.0, (p, keep_scale, seed))
                };
                let args = Args::default().ptr(g.buf.ptr).ptr(u.buf.ptr);
                let args = args.ptr(v.buf.ptr).int(n).int(cols).int(r);
                let args = args.int(g_sk).int(g_sc).float(scale);
                let args = args.float(p).float(keep_scale).u64(seed);
                let grid = (cols.div_ceil(256), r.div_ceil(16), n.div_ceil(128));
                Prepared {
                    inputs: vec![u, v],
                    outs: vec![output(name, g, want, f32_tol)],
                    call: call(grid, args),
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
            Call::AdamW(_) => bail!("AdamW runs through `Bench::call`"),
        }
    }

    /// Runs a prepared case's call once.
    fn call(&self, p: &mut Prepared<D>) -> Result<()> {
        let Prepared { inputs, outs, call } = p;
        let Call::AdamW(hp) = call else {
            return self.launch(call);
        };
        let mut entries: Vec<AdamWTensors<'_, Cuda<D>>> = (outs.chunks_exact_mut(4))
            .zip(inputs.iter())
            .map(|(o, grad)| {
                let [param, m, v, copy] = o else {
                    unreachable!("four outputs a tensor")
                };
                AdamWTensors {
                    param: &mut param.t,
                    m: &mut m.t,
                    v: &mut v.t,
                    grad,
                    copy: Some(&mut copy.t),
                }
            })
            .collect();
        Ok(self.gpu.adamw_step(&mut entries, hp)?)
    }

    /// Checks the case against the CPU device, then times it.
    fn run(&self, case: &Case, rng: &mut StdRng) -> Result<Outcome> {
        let mut p = self.prepare(case, rng)?;
        let t0 = Instant::now();
        self.call(&mut p)?;
        self.gpu.driver().synchronize()?;
        let first = t0.elapsed().as_secs_f64();
        let mut worst = 0f32;
        for Output {
            name: what,
            t,
            want,
            check,
        } in &p.outs
        {
            let got = self.gpu.download(t)?;
            let err = match *check {
                Check::Tol(tol) | Check::F64(tol) => {
                    let err = match check {
                        Check::F64(_) => max_rel_err_f64(&f64s(&got), &f64s(want)),
                        _ => max_rel_err(&got, want),
                    };
                    if err > tol {
                        let what = format!("{what}: max relative error {err:.1e} > {tol:.0e}");
                        return Ok(Outcome::Mismatch(what));
                    }
                    err
                }
                Check::Ids => {
                    let differ: Vec<(u32, u32)> = (got.iter().zip(want))
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
                Check::TopK { k, width } => {
                    if let Some(what) = top_k_mismatch(&got, want, k, width) {
                        return Ok(Outcome::Mismatch(what));
                    }
                    0.0
                }
            };
            worst = worst.max(err);
        }
        let err = worst;
        let secs = (self.timer)(first, &mut || self.call(&mut p))?;
        self.gpu.driver().synchronize()?;
        Ok(Outcome::Ok { err, secs })
    }
}

/// How a top-k output (`Check::TopK`) differs from the CPU device's lists,
/// if it does: each row's candidates (`width` of them) merged as the launcher
/// merges them (`merge_top_k`), then compared exactly, columns and score
/// bits.
fn top_k_mismatch(got: &[f32], want: &[f32], k: usize, width: usize) -> Option<String> {
    let lists = |v: &[f32], width: usize| -> Vec<Vec<(u32, f32)>> {
        let (idx, val) = v.split_at(v.len() / 2);
        let idx: Vec<u32> = idx.iter().map(|c| c.to_bits()).collect();
        (idx.chunks_exact(width).zip(val.chunks_exact(width)))
            .map(|(i, s)| merge_top_k(i, s, k))
            .collect()
    };
    let (got, want) = (lists(got, width), lists(want, k));
    let same = |a: &[(u32, f32)], b: &[(u32, f32)]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits())
    };
    let differ: Vec<usize> = (0..got.len())
        .filter(|&r| !same(&got[r], &want[r]))
        .collect();
    let &r = differ.first()?;
    Some(format!(
        "top-{k} lists differ in {} of {} rows (first, row {r}: kernel {:?}, CPU {:?})",
        differ.len(),
        got.len(),
        got[r],
        want[r]
    ))
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
                    Family::TopK => "ok (same lists)".into(),
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
            Some((_, p)) if *p != s.params && s.params != VIA_BACKEND => notes.push(format!(
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
        Ok(common::median(times))
    }

    /// out[n, m] = x[n, k] · w[m, k]ᵀ, row-major, by cuBLAS: bf16 inputs
    /// with out bf16 or f32, or f32 throughout; CUBLAS_COMPUTE_32F in the
    /// default math mode (no TF32). Column-major that is outᵀ[m, n] = w · xᵀ: A
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
            f32_in,
            f32_out,
        } = call
        else {
            bail!("not a cuBLAS call");
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (n, m, k) = (n as i32, m as i32, k as i32);
        let data_type = |f32: bool| {
            if f32 {
                cudaDataType_t::CUDA_R_32F
            } else {
                cudaDataType_t::CUDA_R_16BF
            }
        };
        let (ab_type, c_type) = (data_type(f32_in), data_type(f32_out));
        // SAFETY: out, x, w are live device allocations of n·m, n·k and m·k
        // elements of the types passed (`Prepared` keeps them), the leading
        // dimensions are those of the shapes above, and alpha, beta are host
        // f32s as f32 compute and the default host pointer mode expect. The handle runs on the
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
                ab_type,
                k,
                x as *const c_void,
                ab_type,
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
            Ok(common::median(samples))
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
