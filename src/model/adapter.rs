//! A LoRA adapter on a device, applied unmerged: the adapted projection
//! `y = x·Wᵀ` becomes
//!
//!   y = x·Wᵀ + s · (drop(x)·Aᵀ)·Bᵀ,   t = drop(x)·Aᵀ  [n, r]
//!
//! with A [r, in], B [out, r] and s the adapter's scaling (alpha/r, or
//! alpha/sqrt(r) with rsLoRA), as PEFT's `lora.Linear.forward` computes it.
//! The base weight stays frozen; [`Lora::backward`] gives
//!
//!   dB += (s·dy)ᵀ · t,   dt = (s·dy) · B
//!   dA += dtᵀ · drop(x),  dx += drop'(dt · A)
//!
//! Both run as one device op each (`Backend::lora_forward`,
//! `lora_backward`; fused kernels on a GPU). Dropout's mask is a pure
//! function of its seed (`Backend::dropout`), so the backward recomputes
//! drop(x) instead of keeping it; only t (f32) is kept per adapted
//! projection.
//!
//! The host-side adapter, its PEFT files and merging are in `model::lora`.

use crate::backend::Backend;
use crate::error::Result;
use crate::model::lora::{LoraAdapter, LoraConfig, LoraPair, Target};
use crate::tensor::{DType, Tensor};

/// A [rank, in] and B [out, rank] of one adapted projection.
pub struct LoraWeights<B: Backend> {
    pub a: Tensor<B>,
    pub b: Tensor<B>,
}

/// A LoRA adapter for every layer, on the device of `B`.
pub struct Lora<B: Backend> {
    pub config: LoraConfig,
    /// `layers[i][j]` adapts `config.targets[j]` of layer `i` (the layout of
    /// `LoraAdapter`).
    pub layers: Vec<Vec<LoraWeights<B>>>,
    pub base_model: Option<String>,
}

impl<B: Backend> Lora<B> {
    /// Uploads a host adapter, stored as `dtype`.
    pub fn upload(be: &B, adapter: &LoraAdapter, dtype: DType) -> Result<Self> {
        let r = adapter.config.rank;
        let layers = adapter
            .layers
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|p| {
                        Ok(LoraWeights {
                            a: be.upload(p.a.clone(), &[r, p.inp], dtype)?,
                            b: be.upload(p.b.clone(), &[p.out, r], dtype)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Lora {
            config: adapter.config.clone(),
            layers,
            base_model: adapter.base_model.clone(),
        })
    }

    /// The adapter back on the host (to save it in PEFT's format).
    pub fn download(&self, be: &B) -> Result<LoraAdapter> {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|w| {
                        Ok(LoraPair {
                            a: be.download(&w.a)?,
                            b: be.download(&w.b)?,
                            out: w.b.shape[0],
                            inp: w.a.shape[1],
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraAdapter {
            config: self.config.clone(),
            layers,
            base_model: self.base_model.clone(),
        })
    }

    /// f32 zeros of the same shapes: gradients and AdamW moments.
    pub fn zeros_like(&self, be: &B) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|w| {
                        Ok(LoraWeights {
                            a: be.zeros(&w.a.shape, DType::F32)?,
                            b: be.zeros(&w.b.shape, DType::F32)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Lora {
            config: self.config.clone(),
            layers,
            base_model: self.base_model.clone(),
        })
    }

    pub fn scaling(&self) -> f32 {
        self.config.scaling()
    }

    pub fn get(&self, layer: usize, target: Target) -> Option<&LoraWeights<B>> {
        let j = self.config.targets.iter().position(|&t| t == target)?;
        self.layers.get(layer).map(|l| &l[j])
    }

    pub fn get_mut(&mut self, layer: usize, target: Target) -> Option<&mut LoraWeights<B>> {
        let j = self.config.targets.iter().position(|&t| t == target)?;
        self.layers.get_mut(layer).map(|l| &mut l[j])
    }

    /// Every tensor in one fixed order (per layer, per target, A then B): the
    /// parameters, their gradients and moments zip by it.
    pub fn tensors(&self) -> Vec<&Tensor<B>> {
        self.layers
            .iter()
            .flatten()
            .flat_map(|w| [&w.a, &w.b])
            .collect()
    }

    /// [`Lora::tensors`], mutable.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor<B>> {
        self.layers
            .iter_mut()
            .flatten()
            .flat_map(|w| [&mut w.a, &mut w.b])
            .collect()
    }

    /// Adds the LoRA branch of `(layer, target)` to `y = x·Wᵀ` (already
    /// computed), when that projection is adapted (`Backend::lora_forward`);
    /// keeps t [n, r] (f32) in `keep_t` when given (training). `dropout` is
    /// (p, seed), None for inference.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &B,
        y: &mut Tensor<B>,
        x: &Tensor<B>,
        layer: usize,
        target: Target,
        dropout: Option<(f32, u64)>,
        keep_t: Option<&mut Tensor<B>>,
        s: &mut LoraScratch<B>,
    ) -> Result<()> {
        let Some(w) = self.get(layer, target) else {
            return Ok(());
        };
        let t = match keep_t {
            Some(t) => t,
            None => s.t(x.shape[0]),
        };
        be.lora_forward(y, t, x, &w.a, &w.b, self.scaling(), dropout)
    }

    /// The backward of [`Lora::forward`] for `(layer, target)`
    /// (`Backend::lora_backward`): adds into `grads`' A and B and into dx
    /// (the gradient of the projection's input; the base weight's dx term is
    /// the caller's). `t` is what the forward kept; `dropout` must be the
    /// forward's.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &B,
        grads: &mut Lora<B>,
        dx: &mut Tensor<B>,
        dy: &Tensor<B>,
        x: &Tensor<B>,
        t: &Tensor<B>,
        layer: usize,
        target: Target,
        dropout: Option<(f32, u64)>,
        s: &mut LoraScratch<B>,
    ) -> Result<()> {
        let Some(w) = self.get(layer, target) else {
            return Ok(());
        };
        let g = grads
            .get_mut(layer, target)
            .expect("gradients shaped like the adapter");
        let dt = s.t(x.shape[0]);
        let (a, b, scaling) = (&w.a, &w.b, self.scaling());
        be.lora_backward(dx, &mut g.a, &mut g.b, dt, dy, x, t, a, b, scaling, dropout)
    }
}

/// Scratch of the LoRA branches for up to `rows` rows: t [n, r] (f32) at
/// inference, dt in the backward.
pub struct LoraScratch<B: Backend> {
    t: Tensor<B>,
    rows: usize,
}

impl<B: Backend> LoraScratch<B> {
    pub fn new(be: &B, rank: usize, rows: usize) -> Result<Self> {
        Ok(LoraScratch {
            t: be.zeros(&[rows, rank], DType::F32)?,
            rows,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.rows * self.t.shape[1] * self.t.dtype.size()
    }

    /// The scratch as an [n, r] tensor.
    fn t(&mut self, n: usize) -> &mut Tensor<B> {
        assert!(
            n <= self.rows,
            "LoRA scratch for {} rows, asked for {n}",
            self.rows
        );
        self.t.shape[0] = n;
        &mut self.t
    }
}
