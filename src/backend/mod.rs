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

pub mod cpu;
pub mod cuda;
pub mod sample;
pub mod shapes;

use crate::backend::sample::SamplerConfig;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

pub trait Backend: Sized + Send + Sync {
    /// Device memory.
    type Buf: Send + Sync;

    fn name(&self) -> &'static str;

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

    /// dst[dst_row..dst_row+rows] = src[src_row..src_row+rows] (same row width).
    fn copy_rows(
        &self,
        dst: &mut Tensor<Self>,
        dst_row: usize,
        src: &Tensor<Self>,
        src_row: usize,
        rows: usize,
    ) -> Result<()>;

    // ----- forward ops -----

    /// out[i] = table[ids[i]]; out [n, d], table [vocab, d].
    fn embedding(&self, out: &mut Tensor<Self>, ids: &[u32], table: &Tensor<Self>) -> Result<()>;

    /// out = x / sqrt(mean(x²) + eps) * weight, per row; x, out [n, d], weight [d].
    fn rmsnorm(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<()>;

    /// out = x · wᵀ (a Linear layer); out [n, m], x [n, k], w [m, k].
    fn matmul_nt(&self, out: &mut Tensor<Self>, x: &Tensor<Self>, w: &Tensor<Self>) -> Result<()>;

    /// Rotary position embedding in place, HF "rotate half" layout: in each head
    /// of width hd, element i pairs with i + hd/2 and turns by angle
    /// pos · theta^(−2i/hd); row r has position pos0 + r. x [n, heads·hd].
    fn rope(&self, x: &mut Tensor<Self>, heads: usize, pos0: usize, theta: f32) -> Result<()>;

    /// Causal grouped-query attention of n new queries at positions pos0..pos0+n
    /// over the cached keys/values 0..pos0+n, scaled by 1/sqrt(hd).
    /// out, q [n, heads·hd]; k, v [capacity, kv_heads·hd].
    fn attention(
        &self,
        out: &mut Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        heads: usize,
        kv_heads: usize,
        pos0: usize,
    ) -> Result<()>;

    /// out = silu(gate) * up; all [n, f].
    fn swiglu(&self, out: &mut Tensor<Self>, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<()>;

    /// x += y (the residual stream).
    fn add_assign(&self, x: &mut Tensor<Self>, y: &Tensor<Self>) -> Result<()>;

    /// out = log_softmax(x) per row; [n, v].
    fn log_softmax(&self, out: &mut Tensor<Self>, x: &Tensor<Self>) -> Result<()>;

    /// The next token from f32 logits [1, vocab]: `sample::choose(logits, cfg, u)`
    /// exactly, where u is the one uniform draw the host made for this step.
    fn sample(&self, logits: &Tensor<Self>, cfg: &SamplerConfig, u: f32) -> Result<u32>;
}
