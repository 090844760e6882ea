//! The compute layer: one trait, one implementation per device.
//!
//! Model code is written once against [`Backend`]. Each op has a CPU
//! implementation (the reference, in `cpu/`) and, later, a CUDA kernel tested
//! against it. Nothing here knows what a transformer is: the ops are plain
//! tensor functions.
//!
//! Conventions, as in llm.c: arguments go outputs → inputs → weights → sizes;
//! matrices are row-major; `[n, d]` means n rows (tokens) of d columns.
//! Output tensors are preallocated by the caller and may have a capacity larger
//! than their shape (activations are reused across calls of different length):
//! ops read and write only the first `numel()` elements.
//!
//! Backward ops sit right after the forward they differentiate, and their doc
//! comment quotes it. A gradient named `dX` is the gradient of the loss with
//! respect to X. Parameter gradients, and activation gradients that collect
//! from several consumers (the residual stream, the normed input that feeds
//! q/k/v or gate/up), are *accumulated* (`+=`): the caller zeroes them once
//! per step. The others are *overwritten*. Each doc comment says which.
//! Devices that lack an op yet return `Error::Unsupported` (the defaults).

pub mod cpu;
pub mod cuda;
pub mod sample;
pub mod shapes;
pub mod topk;

pub use topk::top_k_order;

use crate::backend::sample::SamplerConfig;
use crate::error::{Error, Result};
use crate::quant::{GgmlType, QBytes};
use crate::tensor::{DType, Tensor};

pub trait Backend: Sized + Send + Sync {
    /// Device memory.
    type Buf: Send + Sync;
    /// Device memory of a quantized weight (`QTensor`).
    type QBuf: Send + Sync;

    fn name(&self) -> &'static str;

    /// True for the CPU device, whose tensors are host memory its ops run on
    /// in place: data the host holds already (a memory-mapped index) is then
    /// computed on where it lies rather than uploaded.
    fn is_host(&self) -> bool {
        false
    }

    /// The element type of weights and activations on this device (f32 on the
    /// CPU, bf16 on a GPU). Outputs that need full precision — logits,
    /// log-probabilities — are asked for as f32 explicitly.
    fn dtype(&self) -> DType;

    // ----- memory -----

    /// A zero-filled tensor with room for `capacity` elements (≥ the shape's).
    fn zeros_with_capacity(
        &self,
        shape: &[usize],
        capacity: usize,
        dtype: DType,
    ) -> Result<Tensor<Self>>;

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        self.zeros_with_capacity(shape, shape.iter().product(), dtype)
    }

    /// Moves host data to the device, stored as `dtype`.
    fn upload(&self, data: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>;

    /// Copies `rows` rows starting at `row` back to the host, as f32.
    fn download_rows(&self, t: &Tensor<Self>, row: usize, rows: usize) -> Result<Vec<f32>>;

    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        let (rows, _) = t.rows_cols();
        self.download_rows(t, 0, rows)
    }

    /// t = 0 (its first `numel()` elements): gradients and accumulators are
    /// cleared in place once per step rather than reallocated.
    fn zero(&self, t: &mut Tensor<Self>) -> Result<()>;

    /// dst[dst_row..dst_row+rows] = src[src_row..src_row+rows] (same row width).
    fn copy_rows(
        &self,
        dst: &mut Tensor<Self>,
        dst_row: usize,
        src: &Tensor<Self>,
        src_row: usize,
        rows: usize,
    ) -> Result<()>;

    /// dst = src converted to dst's element type (same shape): f32 master
    /// weights refreshing their working copy after an optimizer step.
    fn convert(&self, dst: &mut Tensor<Self>, src: &Tensor<Self>) -> Result<()>;

    // ----- forward ops -----

    /// out[i] = table[ids[i]]; out [n, d], table [vocab, d].
    fn embedding(&self, out: &mut Tensor<Self>, ids: &[u32], table: &Tensor<Self>) -> Result<()>;

    /// Backward of `embedding` (`out[i] = table[ids[i]]`):
    /// dtable[ids[i]] += dout[i]. dtable [vocab, d] accumulates; dout [n, d].
    fn embedding_backward(
        &self,
        dtable: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        ids: &[u32],
    ) -> Result<()> {
        let _ = (dtable, dout, ids);
        Err(Error::Unsupported(format!(
            "embedding_backward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// out = x / sqrt(mean(x²) + eps) * weight, per row; x, out [n, d], weight [d].
    fn rmsnorm(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<()>;

    /// Backward of `rmsnorm` (`out = x · r · weight`, r = 1/sqrt(mean(x²) + eps)),
    /// per row of width d:
    ///   dx      += r · (dout ∘ weight) − x · r³ · mean(dout ∘ weight ∘ x)
    ///   dweight += Σ_rows dout ∘ x · r
    /// Both accumulate (dx is the residual stream's gradient). x, dx, dout
    /// [n, d]; weight, dweight [d].
    fn rmsnorm_backward(
        &self,
        dx: &mut Tensor<Self>,
        dweight: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<()> {
        let _ = (dx, dweight, dout, x, weight, eps);
        Err(Error::Unsupported(format!(
            "rmsnorm_backward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// out = x · wᵀ (a Linear layer); out [n, m], x [n, k], w [m, k].
    fn matmul_nt(&self, out: &mut Tensor<Self>, x: &Tensor<Self>, w: &Tensor<Self>) -> Result<()>;

    /// `matmul_nt` with batch invariance: each output element is computed by
    /// one arithmetic (order of operations included) that depends only on its
    /// row of x, its row of w and k — not on the number or contents of the
    /// other rows, nor on the thread count — so a sequence's results do not
    /// depend on the batch it is served in (a decode row alone and the same
    /// row among a prefill's get the same bits). The CPU's arithmetic is also
    /// the same on every processor (src/backend/cpu/matmul_invariant.rs). It
    /// may be slower than `matmul_nt`, which training keeps using.
    fn matmul_nt_invariant(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
    ) -> Result<()>;

    /// Uploads a weight matrix [rows, cols] kept in the ggml block format
    /// `ty` (`cols` a multiple of its block size; `data` exactly its bytes).
    /// The CPU computes on `data` where it lies (a GGUF file's memory map).
    fn upload_quant(
        &self,
        data: QBytes,
        ty: GgmlType,
        rows: usize,
        cols: usize,
    ) -> Result<QTensor<Self>> {
        let _ = (data, ty, rows, cols);
        Err(Error::Unsupported(format!(
            "quantized weights are not implemented on the {} device yet",
            self.name()
        )))
    }

    /// out = x · deq(w)ᵀ for a quantized weight w [m, k]; out [n, m] and
    /// x [n, k] in the device's element type. Batch-invariant as
    /// `matmul_nt_invariant` is: an output element's arithmetic depends only
    /// on its row of x, its row of w and k. The CPU quantizes each block of
    /// 32 values of x to 8 bits (ggml's Q8_0 / Q8_K) and takes integer dot
    /// products, as llama.cpp does; the f32 reference is `deq(w)`'s product.
    fn matmul_q(&self, out: &mut Tensor<Self>, x: &Tensor<Self>, w: &QTensor<Self>) -> Result<()> {
        let _ = (out, x, w);
        Err(Error::Unsupported(format!(
            "matmul_q is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Backward of `matmul_q` through its frozen weight: dx += dy · deq(w),
    /// dx [n, k], dy [n, m] (accumulates, as `matmul_nt_backward`'s dx).
    /// LoRA trains on a quantized base through it.
    fn matmul_q_backward(
        &self,
        dx: &mut Tensor<Self>,
        dy: &Tensor<Self>,
        w: &QTensor<Self>,
    ) -> Result<()> {
        let _ = (dx, dy, w);
        Err(Error::Unsupported(format!(
            "matmul_q_backward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Rows `ids` of a quantized table [vocab, d], dequantized: out [n, d].
    fn embedding_q(
        &self,
        out: &mut Tensor<Self>,
        ids: &[u32],
        table: &QTensor<Self>,
    ) -> Result<()> {
        let _ = (out, ids, table);
        Err(Error::Unsupported(format!(
            "embedding_q is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Backward of `matmul_nt` (`out = x · wᵀ`):
    ///   dx += dout · w      [n, k] = [n, m] · [m, k]
    ///   dw += doutᵀ · x     [m, k] = [n, m]ᵀ · [n, k]
    /// Both accumulate: x usually feeds several products (h → q, k, v), and
    /// weight gradients sum over micro-batches. `dw` is None for a frozen
    /// weight (LoRA's base layers), and then only dx is computed.
    fn matmul_nt_backward(
        &self,
        dx: &mut Tensor<Self>,
        dw: Option<&mut Tensor<Self>>,
        dout: &Tensor<Self>,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
    ) -> Result<()> {
        let _ = (dx, dw, dout, x, w);
        Err(Error::Unsupported(format!(
            "matmul_nt_backward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// A LoRA branch joining a Linear layer's output y = x·Wᵀ
    /// (`model::adapter`), with s the adapter's scaling:
    ///   t  = drop(x) · Aᵀ      [n, r]    overwritten, f32 (kept for the backward)
    ///   y += s · t · Bᵀ        [n, out]
    /// x [n, in], A [r, in], B [out, r]. `dropout` is (p, seed): drop is
    /// [`Backend::dropout`] over x's elements, or the identity when None.
    /// A GPU fuses the two products, so t makes no round trip through
    /// device memory between them.
    #[allow(clippy::too_many_arguments)]
    fn lora_forward(
        &self,
        y: &mut Tensor<Self>,
        t: &mut Tensor<Self>,
        x: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        dropout: Option<(f32, u64)>,
    ) -> Result<()> {
        let _ = (y, t, x, a, b, s, dropout);
        Err(Error::Unsupported(format!(
            "lora_forward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Backward of `lora_forward`, with ds = s·dy:
    ///   dt  = ds · B            [n, r]    into `dt` (f32 scratch), overwritten
    ///   dB += dsᵀ · t           [out, r]
    ///   dA += dtᵀ · drop(x)     [r, in]
    ///   dx += drop'(dt · A)     [n, in]
    /// where drop' applies the forward's mask again (dropout is its own
    /// backward). dA, dB (f32) and dx accumulate. t is what the forward
    /// wrote; `dropout` must be the forward's.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        dx: &mut Tensor<Self>,
        da: &mut Tensor<Self>,
        db: &mut Tensor<Self>,
        dt: &mut Tensor<Self>,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        t: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        dropout: Option<(f32, u64)>,
    ) -> Result<()> {
        let _ = (dx, da, db, dt, dy, x, t, a, b, s, dropout);
        Err(Error::Unsupported(format!(
            "lora_backward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Many LoRA adapters over one batch (serving, after a base projection
    /// y = x·Wᵀ whose rows belong to requests for different adapters): row i
    /// gets the branch of adapter a = row_adapter[i],
    ///   t_i  = x[i] · A_aᵀ              [r_a]   (f32, never stored)
    ///   y[i] += s_a · t_i · B_aᵀ         [out]
    /// and a row whose entry is [`NO_ADAPTER`] (the base model) is left
    /// alone, as are the adapters no row names (never read). x [n, in],
    /// y [n, out] accumulates; each adapter's A [r, in], B [out, r], its
    /// rank r ≥ 1 its own. No dropout (inference). Every row is computed by
    /// the same arithmetic whatever the other rows are (batch invariance:
    /// bit for bit). `Error::Invalid`, nothing written, unless
    /// row_adapter.len() = n, every entry < adapters.len() or NO_ADAPTER,
    /// the shapes fit and x, y, A, B share one element type; a device
    /// refuses what its kernel does not take with `Error::Unsupported` (the
    /// CUDA device: bf16 only, ranks up to 128).
    fn lora_gathered(
        &self,
        y: &mut Tensor<Self>,
        x: &Tensor<Self>,
        adapters: &[LoraRef<'_, Self>],
        row_adapter: &[u32],
    ) -> Result<()> {
        let _ = (y, x, adapters, row_adapter);
        Err(Error::Unsupported(format!(
            "lora_gathered is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Rotary position embedding in place, HF "rotate half" layout: in each head
    /// of width hd, element i pairs with i + hd/2 and turns by angle
    /// pos · theta^(−2i/hd); row r has position pos0 + r. x [n, heads·hd].
    fn rope(&self, x: &mut Tensor<Self>, heads: usize, pos0: usize, theta: f32) -> Result<()>;

    /// Backward of `rope` (`x ← R(pos) x`, a rotation of each pair): the
    /// rotation is orthogonal, so dx ← R(pos)ᵀ dx, the turn by −angle, in
    /// place. dx [n, heads·hd] is overwritten by the gradient before rope.
    fn rope_backward(
        &self,
        dx: &mut Tensor<Self>,
        heads: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<()> {
        let _ = (dx, heads, pos0, theta);
        Err(Error::Unsupported(format!(
            "rope_backward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// `rope` with a position per row: row r turns by `positions[r]` (a
    /// ragged serving batch, whose rows belong to different sequences). For
    /// positions pos0..pos0+n it computes exactly what `rope(x, heads, pos0,
    /// theta)` does, bit for bit. x [n, heads·hd] in place; positions [n].
    fn rope_rows(
        &self,
        x: &mut Tensor<Self>,
        heads: usize,
        positions: &[u32],
        theta: f32,
    ) -> Result<()> {
        let _ = (x, heads, positions, theta);
        Err(Error::Unsupported(format!(
            "rope_rows is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// dst[slots[i]] = src[i] for every row i of src: the write of a step's
    /// keys or values into a paged KV pool through its slot mapping. Rows of
    /// dst that no slot names are untouched. dst [num_slots, d], src [n, d]
    /// (same element type); slots [n], each < num_slots and no two alike
    /// (else `Error::Invalid`, nothing written).
    fn scatter_rows(
        &self,
        dst: &mut Tensor<Self>,
        src: &Tensor<Self>,
        slots: &[u32],
    ) -> Result<()> {
        let _ = (dst, src, slots);
        Err(Error::Unsupported(format!(
            "scatter_rows is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Causal grouped-query attention over a paged KV pool, for a ragged
    /// batch of sequences (decode rows and prefill chunks in one call),
    /// scaled by 1/sqrt(hd). For each sequence s of `seqs` and each of its
    /// rows i < s.rows, the query in row s.row + i sits at position
    /// P = s.ctx − s.rows + i and attends to the keys and values of positions
    /// 0..=P, position p read from pool slot
    /// s.blocks[p / block_size]·block_size + p % block_size:
    ///   out[r,h] = Σ_{p ≤ P} softmax_p(q[r,h]·k[slot(p),g] / sqrt(hd)) v[slot(p),g]
    /// with g = h / (heads / kv_heads). Each (row, head) is computed on its
    /// own, so a row's result does not depend on the other rows of the call
    /// (batch invariance: bit for bit on the CPU). Rows of out that no
    /// sequence covers are untouched. out, q [n, heads·hd]; k_cache, v_cache
    /// [num_slots, kv_heads·hd], num_slots a multiple of block_size.
    /// `Error::Invalid` (nothing written) unless heads is a multiple of
    /// kv_heads and every sequence has rows ≤ ctx, rows inside q, no row
    /// shared with another sequence, blocks enough for ctx
    /// (blocks.len()·block_size ≥ ctx) and every block id < num_slots /
    /// block_size.
    #[allow(clippy::too_many_arguments)]
    fn attention_paged(
        &self,
        out: &mut Tensor<Self>,
        q: &Tensor<Self>,
        k_cache: &Tensor<Self>,
        v_cache: &Tensor<Self>,
        seqs: &[PagedSeq<'_>],
        heads: usize,
        kv_heads: usize,
        block_size: usize,
    ) -> Result<()> {
        let _ = (out, q, k_cache, v_cache, seqs, heads, kv_heads, block_size);
        Err(Error::Unsupported(format!(
            "attention_paged is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Causal grouped-query attention of n new queries at positions pos0..pos0+n
    /// over the cached keys/values 0..pos0+n, scaled by 1/sqrt(hd).
    /// out, q [n, heads·hd]; k, v [capacity, kv_heads·hd]. With `lse` [heads,
    /// n] (f32, training), also writes each row's log-sum-exp
    /// lse[h, i] = ln Σ_j exp(q[i,h]·k[j,g]/sqrt(hd)), from which the backward
    /// recomputes the softmax.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        out: &mut Tensor<Self>,
        lse: Option<&mut Tensor<Self>>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        heads: usize,
        kv_heads: usize,
        pos0: usize,
    ) -> Result<()>;

    /// Backward of `attention`
    /// (`out[i,h] = Σ_j p_ij v[j,g]`, p_ij = softmax_j(q[i,h]·k[j,g]/sqrt(hd)),
    /// j ≤ pos0 + i), with the softmax recomputed from the forward's `out` and
    /// `lse` (p_ij = exp(q[i,h]·k[j,g]/sqrt(hd) − lse[h,i])), never stored:
    ///   D_ih     = dout[i,h]·out[i,h]
    ///   dv[j,g] += Σ_i p_ij dout[i,h]
    ///   ds_ij    = p_ij (dout[i,h]·v[j,g] − D_ih)
    ///   dq[i,h]  = Σ_j ds_ij k[j,g] / sqrt(hd)
    ///   dk[j,g] += Σ_i ds_ij q[i,h] / sqrt(hd)
    /// dq [n, heads·hd] is overwritten; dk, dv [capacity, kv_heads·hd]
    /// accumulate over the queries and over the heads that share kv head g
    /// (rows pos0+n.. are left alone). Arguments as in `attention`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Tensor<Self>,
        dk: &mut Tensor<Self>,
        dv: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        out: &Tensor<Self>,
        lse: &Tensor<Self>,
        heads: usize,
        kv_heads: usize,
        pos0: usize,
    ) -> Result<()> {
        let _ = (dq, dk, dv, dout, q, k, v, out, lse, heads, kv_heads, pos0);
        Err(Error::Unsupported(format!(
            "attention_backward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// out = silu(gate) * up; all [n, f].
    fn swiglu(&self, out: &mut Tensor<Self>, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<()>;

    /// Backward of `swiglu` (`out = silu(gate) ∘ up`), with σ the logistic:
    ///   dgate = dout ∘ up ∘ σ(gate) (1 + gate (1 − σ(gate)))
    ///   dup   = dout ∘ silu(gate)
    /// Both overwritten (gate and up have no other consumer); all [n, f].
    fn swiglu_backward(
        &self,
        dgate: &mut Tensor<Self>,
        dup: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<()> {
        let _ = (dgate, dup, dout, gate, up);
        Err(Error::Unsupported(format!(
            "swiglu_backward is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// x += alpha · y (a LoRA branch joining its base layer, with alpha the
    /// adapter's scaling). Its backward is `add_scaled` again: dy = alpha · dx.
    fn add_scaled(&self, x: &mut Tensor<Self>, y: &Tensor<Self>, alpha: f32) -> Result<()>;

    /// x += y (the residual stream): `add_scaled` with alpha 1, which is
    /// exact. Its backward is the identity: dx passes to both addends
    /// unchanged, so there is no op for it.
    fn add_assign(&self, x: &mut Tensor<Self>, y: &Tensor<Self>) -> Result<()> {
        self.add_scaled(x, y, 1.0)
    }

    /// Inverted dropout in place: x[i] ← x[i] / (1 − p) where
    /// [`dropout_keeps`]`(seed, i, p)`, else 0. The mask is a pure function
    /// of (seed, i), so the backward is this same call on the gradient, and
    /// every device draws the same mask. x [n, d].
    fn dropout(&self, x: &mut Tensor<Self>, p: f32, seed: u64) -> Result<()> {
        let _ = (x, p, seed);
        Err(Error::Unsupported(format!(
            "dropout is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// out = log_softmax(x) per row; [n, v].
    fn log_softmax(&self, out: &mut Tensor<Self>, x: &Tensor<Self>) -> Result<()>;

    /// Fused softmax cross-entropy, forward and backward, over f32 logits
    /// [n, vocab] and one target per row; a target of [`IGNORE`] counts no
    /// loss. Returns Σ over counted rows of −log softmax(logits[i])[t_i]
    /// (a sum: the caller divides by its own count, across micro-batches).
    /// With `dlogits` [n, vocab] (f32) given, it is overwritten with
    ///   dlogits[i] = (softmax(logits[i]) − onehot(t_i)) · scale
    /// for counted rows and zeros for ignored rows, where scale is the given
    /// `scale` or, when None, 1 / (the number of counted rows in this call).
    fn cross_entropy(
        &self,
        dlogits: Option<&mut Tensor<Self>>,
        logits: &Tensor<Self>,
        targets: &[u32],
        scale: Option<f32>,
    ) -> Result<f32> {
        let _ = (dlogits, logits, targets, scale);
        Err(Error::Unsupported(format!(
            "cross_entropy is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// The next token from f32 logits [1, vocab]: `sample::choose(logits, cfg, u)`
    /// exactly, where u is the one uniform draw the host made for this step.
    fn sample(&self, logits: &Tensor<Self>, cfg: &SamplerConfig, u: f32) -> Result<u32>;

    /// The k best entries of each row of f32 scores [n, m] (retrieval: one
    /// row per query, one column per indexed vector), best first: by score
    /// (larger first; −0 counts as +0 and a NaN as −∞, and each is reported
    /// so: `topk::rank_score`), ties to the lower column. Each row gives
    /// min(k, m) (column, score) pairs.
    fn top_k(&self, scores: &Tensor<Self>, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let _ = (scores, k);
        Err(Error::Unsupported(format!(
            "top_k is not implemented on the {} device yet",
            self.name()
        )))
    }

    // ----- optimizer -----

    /// Σ x² over the tensor, accumulated in f64 on the host side (the
    /// global gradient norm is the square root of the sum over tensors).
    fn sum_squares(&self, t: &Tensor<Self>) -> Result<f64>;

    /// t ·= s in place (gradient clipping).
    fn scale(&self, t: &mut Tensor<Self>, s: f32) -> Result<()>;

    /// One AdamW step on every trainable tensor at once (one launch on a
    /// GPU), in torch.optim.AdamW's order (decoupled weight decay, bias
    /// correction), element-wise, with t = `step` (1 for the first step):
    ///   param ·= 1 − lr·weight_decay
    ///   m      = m + (1 − β1)(grad − m)
    ///   v      = β2·v + (1 − β2)·grad²
    ///   param −= lr/(1 − β1ᵗ) · m / (sqrt(v)/sqrt(1 − β2ᵗ) + eps)
    ///   copy   = param, in copy's element type (when given)
    /// param, m, v (f32: master weights and state) are updated in place; the
    /// tensors of one entry have the same shape.
    fn adamw_step(&self, tensors: &mut [AdamWTensors<'_, Self>], hp: &AdamW) -> Result<()> {
        let _ = (tensors, hp);
        Err(Error::Unsupported(format!(
            "adamw_step is not implemented on the {} device yet",
            self.name()
        )))
    }

    // ----- encoder ops (BERT-family embedders, `model::bert`) -----

    /// LayerNorm per row of width d, with the biased variance as torch takes it:
    ///   mean = Σ x / d,  var = Σ (x − mean)² / d
    ///   out  = (x − mean) / sqrt(var + eps) · weight + bias
    /// x, out [n, d]; weight, bias [d]. out is overwritten.
    fn layernorm(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: &Tensor<Self>,
        eps: f32,
    ) -> Result<()> {
        let _ = (out, x, weight, bias, eps);
        Err(Error::Unsupported(format!(
            "layernorm is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// GELU in its exact (erf) form, BERT's `"gelu"`:
    ///   out = x · ½ (1 + erf(x / √2))
    /// element-wise; out, x [n, f]. out is overwritten.
    fn gelu(&self, out: &mut Tensor<Self>, x: &Tensor<Self>) -> Result<()> {
        let _ = (out, x);
        Err(Error::Unsupported(format!(
            "gelu is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// x[i, j] += bias[j]: a Linear layer's bias, broadcast over the rows;
    /// x [n, d] in place, bias [d].
    fn add_bias(&self, x: &mut Tensor<Self>, bias: &Tensor<Self>) -> Result<()> {
        let _ = (x, bias);
        Err(Error::Unsupported(format!(
            "add_bias is not implemented on the {} device yet",
            self.name()
        )))
    }

    /// Bidirectional (non-causal) multi-head attention over a batch of
    /// padded sequences, BERT's self-attention with its padding mask. Rows
    /// b·seq .. (b+1)·seq of q, k, v and out hold sequence b, whose first
    /// `lens[b]` rows are real tokens and the rest padding (seq = rows /
    /// lens.len()). For every real query i < lens[b] and head h:
    ///   out[b,i,h] = Σ_{j < lens[b]} softmax_j(q[b,i,h]·k[b,j,h] / sqrt(hd)) v[b,j,h]
    /// Keys and values at or past lens[b] are masked: never read. Padding
    /// query rows (i ≥ lens[b]) are never read either, and their output is
    /// written as zeros. out, q, k, v [batch·seq, heads·hd]; lens[b] ≤ seq.
    fn attention_bidirectional(
        &self,
        out: &mut Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        heads: usize,
        lens: &[usize],
    ) -> Result<()> {
        let _ = (out, q, k, v, heads, lens);
        Err(Error::Unsupported(format!(
            "attention_bidirectional is not implemented on the {} device yet",
            self.name()
        )))
    }
}

/// Whether inverted dropout with probability `p` keeps element `i` under
/// `seed`: the top 24 bits of a SplitMix64 hash of (seed, i), as a uniform
/// u in [0, 1), against p. Integer-exact, so a kernel reproduces it bit for
/// bit.
pub fn dropout_keeps(seed: u64, i: u64, p: f32) -> bool {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 / (1u32 << 24) as f32;
    u >= p
}

/// A weight matrix kept in a ggml block format: `rows` rows of `cols`
/// values, each row `cols / ty.block_size()` blocks of `ty` laid out as in a
/// GGUF file (`crate::quant`).
pub struct QTensor<B: Backend> {
    pub buf: B::QBuf,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

/// One sequence's rows in an `attention_paged` call.
#[derive(Clone, Copy, Debug)]
pub struct PagedSeq<'a> {
    /// The first row of q and out that holds this sequence's queries.
    pub row: usize,
    /// Its queries in this call, at positions ctx − rows .. ctx.
    pub rows: usize,
    /// Its length after this step: the keys visible to its last query.
    pub ctx: usize,
    /// The pool blocks holding positions 0..ctx in order: position p lives in
    /// slot blocks[p / block_size] · block_size + p % block_size.
    pub blocks: &'a [u32],
}

/// One adapter of a `Backend::lora_gathered` call: A [r, in], B [out, r]
/// and its scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA).
pub struct LoraRef<'a, B: Backend> {
    pub a: &'a Tensor<B>,
    pub b: &'a Tensor<B>,
    pub scale: f32,
}

// Clone and Copy by hand: a derive would ask B itself to be Copy, and
// `Cuda<D>` is not (it holds an Arc).
impl<B: Backend> Clone for LoraRef<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for LoraRef<'_, B> {}

/// The `row_adapter` entry of a row that takes no adapter in
/// `Backend::lora_gathered` (a request for the base model).
pub const NO_ADAPTER: u32 = u32::MAX;

/// One trainable tensor of `Backend::adamw_step`: the f32 parameter (the
/// master copy on a device that trains in bf16), its moments and gradient,
/// and the working copy the forward reads, refreshed in the same pass.
pub struct AdamWTensors<'a, B: Backend> {
    pub param: &'a mut Tensor<B>,
    pub m: &'a mut Tensor<B>,
    pub v: &'a mut Tensor<B>,
    pub grad: &'a Tensor<B>,
    pub copy: Option<&'a mut Tensor<B>>,
}

/// The f32 scalars of one AdamW step, derived from [`AdamW`] in f64 and
/// rounded once, shared by every device's `adamw_step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// 1 − lr·weight_decay
    pub decay: f32,
    /// lr / (1 − β1ᵗ)
    pub step_size: f32,
    /// sqrt(1 − β2ᵗ)
    pub bc2_sqrt: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl AdamW {
    pub fn scalars(&self) -> AdamWScalars {
        assert!(self.step >= 1, "AdamW steps count from 1");
        let t = self.step as f64;
        AdamWScalars {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            step_size: (self.lr / (1.0 - self.beta1.powf(t))) as f32,
            bc2_sqrt: (1.0 - self.beta2.powf(t)).sqrt() as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
        }
    }
}

/// The target of a row that counts no loss in `Backend::cross_entropy`
/// (padding, prompt tokens).
pub const IGNORE: u32 = u32::MAX;

/// `cross_entropy`'s default gradient scale: 1 / the counted targets (0
/// when every target is IGNORE), so the gradient is that of the mean loss.
pub fn mean_scale(targets: &[u32]) -> f32 {
    match targets.iter().filter(|&&t| t != IGNORE).count() {
        0 => 0.0,
        counted => 1.0 / counted as f32,
    }
}

/// The hyperparameters of one `Backend::adamw_step` (torch.optim.AdamW's names).
/// f64 like the Python floats torch takes: the derived scalars (1 − β1,
/// lr/(1 − β1ᵗ), …) are formed in f64 and rounded to the device's f32 once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The step number t, from 1: bias correction uses β1ᵗ and β2ᵗ.
    pub step: u64,
}
