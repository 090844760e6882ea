//! A weight matrix of the model: dense in the device's element type, or kept
//! in a ggml block format as a GGUF file (or `--weights`) gives it.
//!
//! Model code multiplies by a `Weight` without asking which it is; only
//! full fine-tuning, which updates the weights themselves, needs them dense
//! (`Weight::dense`).

use crate::backend::{Backend, QTensor};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub enum Weight<B: Backend> {
    Dense(Tensor<B>),
    Quant(QTensor<B>),
}

impl<B: Backend> Weight<B> {
    /// [rows, cols].
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Weight::Dense(t) => {
                let (rows, cols) = t.rows_cols();
                [rows, cols]
            }
            Weight::Quant(q) => [q.rows, q.cols],
        }
    }

    /// The format it is stored in, for messages ("f32", "Q4_K").
    pub fn format(&self) -> String {
        match self {
            Weight::Dense(t) => t.dtype.to_string(),
            Weight::Quant(q) => q.ty.to_string(),
        }
    }

    pub fn is_dense(&self) -> bool {
        matches!(self, Weight::Dense(_))
    }

    /// The dense tensor. Panics on a quantized weight: callers that update
    /// weights (full fine-tuning) refuse a quantized model first
    /// (`LlamaWeights::require_dense`).
    pub fn dense(&self) -> &Tensor<B> {
        match self {
            Weight::Dense(t) => t,
            Weight::Quant(q) => panic!("a {} weight where a dense one is needed", q.ty),
        }
    }

    /// [`Weight::dense`], mutable.
    pub fn dense_mut(&mut self) -> &mut Tensor<B> {
        match self {
            Weight::Dense(t) => t,
            Weight::Quant(q) => panic!("a {} weight where a dense one is needed", q.ty),
        }
    }

    /// y = x · Wᵀ, batch-invariant (inference: `Backend::matmul_nt_invariant`
    /// or `Backend::matmul_q`).
    pub fn matmul_invariant(&self, be: &B, y: &mut Tensor<B>, x: &Tensor<B>) -> Result<()> {
        match self {
            Weight::Dense(w) => be.matmul_nt_invariant(y, x, w),
            Weight::Quant(w) => be.matmul_q(y, x, w),
        }
    }

    /// y = x · Wᵀ as training computes it (`Backend::matmul_nt` for a dense
    /// weight; a quantized one is frozen and has one product).
    pub fn matmul(&self, be: &B, y: &mut Tensor<B>, x: &Tensor<B>) -> Result<()> {
        match self {
            Weight::Dense(w) => be.matmul_nt(y, x, w),
            Weight::Quant(w) => be.matmul_q(y, x, w),
        }
    }

    /// Backward of [`Weight::matmul`]: dx += dy · W, and dW += dyᵀ · x when
    /// `dw` is given (`Backend::matmul_nt_backward`); a quantized weight is
    /// frozen (`Backend::matmul_q_backward`).
    pub fn matmul_backward(
        &self,
        be: &B,
        dx: &mut Tensor<B>,
        dw: Option<&mut Tensor<B>>,
        dy: &Tensor<B>,
        x: &Tensor<B>,
    ) -> Result<()> {
        match self {
            Weight::Dense(w) => be.matmul_nt_backward(dx, dw, dy, x, w),
            Weight::Quant(w) => match dw {
                None => be.matmul_q_backward(dx, dy, w),
                Some(_) => Err(Error::Unsupported(format!(
                    "a {} weight cannot be trained: quantized weights stay frozen",
                    w.ty
                ))),
            },
        }
    }

    /// Rows `ids` of the table: out [ids.len(), cols].
    pub fn gather(&self, be: &B, out: &mut Tensor<B>, ids: &[u32]) -> Result<()> {
        match self {
            Weight::Dense(t) => be.embedding(out, ids, t),
            Weight::Quant(q) => be.embedding_q(out, ids, q),
        }
    }
}
