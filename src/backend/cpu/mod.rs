//! The CPU device: f32 everywhere, rows in parallel with rayon, matrix products
//! through the `gemm` crate. It is the reference every other device is tested
//! against, so its code stays plain.

pub mod attention;
mod backward;
mod encoder;
mod lora;
mod matmul;
pub mod matmul_invariant;
mod ops;
mod optim;
// `quant::check` is also the CUDA device's rule at upload.
pub mod quant;
mod quant_backward;

use crate::backend::sample::{self, SamplerConfig};
use crate::backend::{
    mean_scale, shapes, AdamW, AdamWTensors, Backend, LoraRef, PagedSeq, QTensor,
};
use crate::error::{Error, Result};
use crate::quant::{GgmlType, QBytes};
use crate::tensor::{DType, Tensor};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// The CPU computes in f32 only: half-precision weights are widened at load.
fn f32_only(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 => Ok(()),
        other => Err(Error::Unsupported(format!(
            "the CPU device stores f32 tensors, not {other}"
        ))),
    }
}

/// The elements a tensor's shape covers (its buffer may be longer).
fn view(t: &Tensor<Cpu>) -> &[f32] {
    &t.buf[..t.numel()]
}

fn view_mut(t: &mut Tensor<Cpu>) -> &mut [f32] {
    let n = t.numel();
    &mut t.buf[..n]
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type QBuf = quant::QWeight;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn is_host(&self) -> bool {
        true
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn zeros_with_capacity(
        &self,
        shape: &[usize],
        capacity: usize,
        dtype: DType,
    ) -> Result<Tensor<Self>> {
        f32_only(dtype)?;
        let numel: usize = shape.iter().product();
        assert!(capacity >= numel, "capacity {capacity} < shape {shape:?}");
        Ok(Tensor {
            buf: vec![0.0; capacity],
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn upload(&self, data: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        f32_only(dtype)?;
        assert_eq!(data.len(), shape.iter().product::<usize>(), "{shape:?}");
        Ok(Tensor {
            buf: data,
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn download_rows(&self, t: &Tensor<Self>, row: usize, rows: usize) -> Result<Vec<f32>> {
        let (n, d) = t.rows_cols();
        assert!(row + rows <= n, "rows {row}+{rows} of {n}");
        Ok(t.buf[row * d..(row + rows) * d].to_vec())
    }

    fn zero(&self, t: &mut Tensor<Self>) -> Result<()> {
        view_mut(t).fill(0.0);
        Ok(())
    }

    fn convert(&self, dst: &mut Tensor<Self>, src: &Tensor<Self>) -> Result<()> {
        // One element type on this device: a copy.
        assert_eq!(dst.shape, src.shape, "convert: shapes differ");
        view_mut(dst).copy_from_slice(view(src));
        Ok(())
    }

    fn copy_rows(
        &self,
        dst: &mut Tensor<Self>,
        dst_row: usize,
        src: &Tensor<Self>,
        src_row: usize,
        rows: usize,
    ) -> Result<()> {
        let d = shapes::copy_rows(dst, dst_row, src, src_row, rows);
        dst.buf[dst_row * d..(dst_row + rows) * d]
            .copy_from_slice(&src.buf[src_row * d..(src_row + rows) * d]);
        Ok(())
    }

    fn embedding(&self, out: &mut Tensor<Self>, ids: &[u32], table: &Tensor<Self>) -> Result<()> {
        let (vocab, d) = table.rows_cols();
        assert_eq!(out.shape, [ids.len(), d]);
        for (row, &id) in view_mut(out).chunks_exact_mut(d).zip(ids) {
            let id = id as usize;
            assert!(id < vocab, "token id {id} outside vocabulary {vocab}");
            row.copy_from_slice(&table.buf[id * d..(id + 1) * d]);
        }
        Ok(())
    }

    fn embedding_backward(
        &self,
        dtable: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        ids: &[u32],
    ) -> Result<()> {
        let (_, d) = shapes::embedding_backward(dtable, dout, ids);
        backward::embedding_backward(view_mut(dtable), view(dout), ids, d);
        Ok(())
    }

    fn rmsnorm(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<()> {
        assert_eq!(out.shape, x.shape);
        let (_, d) = x.rows_cols();
        assert_eq!(weight.numel(), d);
        ops::rmsnorm(view_mut(out), view(x), view(weight), d, eps);
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut Tensor<Self>,
        dweight: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<()> {
        let d = shapes::rmsnorm_backward(dx, dweight, dout, x, weight);
        backward::rmsnorm_backward(
            view_mut(dx),
            view_mut(dweight),
            view(dout),
            view(x),
            view(weight),
            d,
            eps,
        );
        Ok(())
    }

    fn matmul_nt(&self, out: &mut Tensor<Self>, x: &Tensor<Self>, w: &Tensor<Self>) -> Result<()> {
        let (n, m, k) = shapes::matmul_nt(out, x, w);
        matmul::matmul_nt(view_mut(out), view(x), view(w), n, m, k);
        Ok(())
    }

    fn matmul_nt_invariant(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
    ) -> Result<()> {
        let (n, m, k) = shapes::matmul_nt(out, x, w);
        matmul_invariant::matmul_nt_invariant(view_mut(out), view(x), view(w), n, m, k);
        Ok(())
    }

    fn upload_quant(
        &self,
        data: QBytes,
        ty: GgmlType,
        rows: usize,
        cols: usize,
    ) -> Result<QTensor<Self>> {
        Ok(QTensor {
            buf: quant::QWeight::new(ty, data, rows, cols)?,
            ty,
            rows,
            cols,
        })
    }

    fn matmul_q(&self, out: &mut Tensor<Self>, x: &Tensor<Self>, w: &QTensor<Self>) -> Result<()> {
        let (n, _, _) = shapes::matmul_q(out, x, w);
        quant::matmul_q(view_mut(out), view(x), &w.buf, n);
        Ok(())
    }

    fn matmul_q_backward(
        &self,
        dx: &mut Tensor<Self>,
        dy: &Tensor<Self>,
        w: &QTensor<Self>,
    ) -> Result<()> {
        let (n, _, _) = shapes::matmul_q(dy, dx, w);
        quant_backward::matmul_q_backward(view_mut(dx), view(dy), &w.buf, n);
        Ok(())
    }

    fn embedding_q(
        &self,
        out: &mut Tensor<Self>,
        ids: &[u32],
        table: &QTensor<Self>,
    ) -> Result<()> {
        assert_eq!(out.shape, [ids.len(), table.cols]);
        quant::embedding_q(view_mut(out), ids, &table.buf);
        Ok(())
    }

    fn matmul_nt_backward(
        &self,
        dx: &mut Tensor<Self>,
        dw: Option<&mut Tensor<Self>>,
        dout: &Tensor<Self>,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
    ) -> Result<()> {
        let dims = shapes::matmul_nt_backward(dx, dw.as_deref(), dout, x, w);
        let dw = dw.map(view_mut);
        backward::matmul_nt_backward(view_mut(dx), dw, view(dout), view(x), view(w), dims);
        Ok(())
    }

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
        let dims = shapes::lora_forward(y, t, x, a, b);
        let (x, a, b) = (view(x), view(a), view(b));
        lora::forward((view_mut(y), view_mut(t)), x, (a, b), s, dropout, dims);
        Ok(())
    }

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
        let dims = shapes::lora_backward(dx, da, db, dt, dy, x, t, a, b);
        lora::backward(
            (view_mut(dx), view_mut(da), view_mut(db), view_mut(dt)),
            (view(dy), view(x), view(t)),
            (view(a), view(b)),
            s,
            dropout,
            dims,
        );
        Ok(())
    }

    fn lora_gathered(
        &self,
        y: &mut Tensor<Self>,
        x: &Tensor<Self>,
        adapters: &[LoraRef<'_, Self>],
        row_adapter: &[u32],
    ) -> Result<()> {
        let (n, inp, out) = shapes::lora_gathered(y, x, adapters, row_adapter)?;
        if n == 0 || inp == 0 || out == 0 {
            return Ok(());
        }
        let adapters: Vec<lora::Adapter<'_>> = adapters
            .iter()
            .map(|l| lora::Adapter {
                a: view(l.a),
                b: view(l.b),
                r: l.a.rows_cols().0,
                s: l.scale,
            })
            .collect();
        lora::gathered(view_mut(y), view(x), &adapters, row_adapter, (inp, out));
        Ok(())
    }

    fn rope(&self, x: &mut Tensor<Self>, heads: usize, pos0: usize, theta: f32) -> Result<()> {
        let (_, hd) = shapes::rope(x, heads);
        ops::rope(view_mut(x), heads * hd, heads, pos0, theta);
        Ok(())
    }

    fn rope_backward(
        &self,
        dx: &mut Tensor<Self>,
        heads: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<()> {
        let (_, hd) = shapes::rope(dx, heads);
        backward::rope_backward(view_mut(dx), heads * hd, heads, pos0, theta);
        Ok(())
    }

    fn rope_rows(
        &self,
        x: &mut Tensor<Self>,
        heads: usize,
        positions: &[u32],
        theta: f32,
    ) -> Result<()> {
        let (_, hd) = shapes::rope_rows(x, heads, positions)?;
        ops::rope_rows(view_mut(x), heads * hd, heads, positions, theta);
        Ok(())
    }

    fn scatter_rows(
        &self,
        dst: &mut Tensor<Self>,
        src: &Tensor<Self>,
        slots: &[u32],
    ) -> Result<()> {
        let (_, d) = shapes::scatter_rows(dst, src, slots)?;
        for (row, &slot) in view(src).chunks_exact(d).zip(slots) {
            let slot = slot as usize;
            dst.buf[slot * d..(slot + 1) * d].copy_from_slice(row);
        }
        Ok(())
    }

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
        let (n, hd) =
            shapes::attention_paged(out, q, k_cache, v_cache, seqs, heads, kv_heads, block_size)?;
        // Each row's block table and position; None where no sequence is.
        let mut rows: Vec<Option<(&[u32], usize)>> = vec![None; n];
        for s in seqs {
            for i in 0..s.rows {
                rows[s.row + i] = Some((s.blocks, s.ctx - s.rows + i));
            }
        }
        let dims = attention::PagedDims {
            heads,
            kv_heads,
            hd,
            block_size,
        };
        let (k, v) = (view(k_cache), view(v_cache));
        attention::paged(view_mut(out), view(q), k, v, &rows, dims);
        Ok(())
    }

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
    ) -> Result<()> {
        let (n, hd) = shapes::attention(out, q, k, v, heads, kv_heads, pos0);
        let dims = attention::Dims {
            n,
            heads,
            kv_heads,
            hd,
            pos0,
        };
        if let Some(lse) = &lse {
            shapes::attention_lse(lse, heads, n);
        }
        let lse = lse.map(view_mut);
        attention::causal(view_mut(out), lse, view(q), &k.buf, &v.buf, dims);
        Ok(())
    }

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
        let (n, hd) =
            shapes::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, heads, kv_heads, pos0);
        let dims = attention::Dims {
            n,
            heads,
            kv_heads,
            hd,
            pos0,
        };
        backward::attention_backward(
            view_mut(dq),
            view_mut(dk),
            view_mut(dv),
            view(dout),
            view(q),
            view(k),
            view(v),
            (view(out), view(lse)),
            dims,
        );
        Ok(())
    }

    fn swiglu(&self, out: &mut Tensor<Self>, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<()> {
        assert_eq!(out.shape, gate.shape);
        assert_eq!(gate.shape, up.shape);
        ops::swiglu(view_mut(out), view(gate), view(up));
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgate: &mut Tensor<Self>,
        dup: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<()> {
        shapes::same_shape("swiglu_backward", &[dgate, dup, dout, gate, up]);
        backward::swiglu_backward(
            view_mut(dgate),
            view_mut(dup),
            view(dout),
            view(gate),
            view(up),
        );
        Ok(())
    }

    fn add_scaled(&self, x: &mut Tensor<Self>, y: &Tensor<Self>, alpha: f32) -> Result<()> {
        assert_eq!(x.shape, y.shape);
        for (a, b) in view_mut(x).iter_mut().zip(view(y)) {
            *a += alpha * b;
        }
        Ok(())
    }

    fn dropout(&self, x: &mut Tensor<Self>, p: f32, seed: u64) -> Result<()> {
        ops::dropout(view_mut(x), 0, p, seed);
        Ok(())
    }

    fn log_softmax(&self, out: &mut Tensor<Self>, x: &Tensor<Self>) -> Result<()> {
        assert_eq!(out.shape, x.shape);
        let (_, d) = x.rows_cols();
        ops::log_softmax(view_mut(out), view(x), d);
        Ok(())
    }

    fn cross_entropy(
        &self,
        dlogits: Option<&mut Tensor<Self>>,
        logits: &Tensor<Self>,
        targets: &[u32],
        scale: Option<f32>,
    ) -> Result<f32> {
        let (_, vocab) = shapes::cross_entropy(dlogits.as_deref(), logits, targets);
        let scale = scale.unwrap_or_else(|| mean_scale(targets));
        let dlogits = dlogits.map(view_mut);
        Ok(backward::cross_entropy(
            dlogits,
            view(logits),
            targets,
            vocab,
            scale,
        ))
    }

    fn top_k(&self, scores: &Tensor<Self>, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let (rows, m) = scores.rows_cols();
        Ok(ops::top_k(view(scores), rows, m, k))
    }

    fn sample(&self, logits: &Tensor<Self>, cfg: &SamplerConfig, u: f32) -> Result<u32> {
        assert_eq!(logits.rows_cols().0, 1, "sample takes one row of logits");
        Ok(sample::choose(view(logits), cfg, u))
    }

    fn sum_squares(&self, t: &Tensor<Self>) -> Result<f64> {
        // Fixed chunks summed in order: the same f64 total on every run.
        let parts: Vec<f64> = view(t)
            .par_chunks(1 << 14)
            .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .collect();
        Ok(parts.iter().sum())
    }

    fn scale(&self, t: &mut Tensor<Self>, s: f32) -> Result<()> {
        view_mut(t).par_chunks_mut(1 << 14).for_each(|c| {
            c.iter_mut().for_each(|x| *x *= s);
        });
        Ok(())
    }

    fn adamw_step(&self, tensors: &mut [AdamWTensors<'_, Self>], hp: &AdamW) -> Result<()> {
        for t in tensors {
            let AdamWTensors {
                param,
                m,
                v,
                grad,
                copy,
            } = t;
            shapes::same_shape("adamw_step", &[param, m, v, grad]);
            optim::adamw(view_mut(param), view_mut(m), view_mut(v), view(grad), hp);
            if let Some(copy) = copy {
                self.convert(copy, param)?;
            }
        }
        Ok(())
    }

    // ----- encoder ops -----

    fn layernorm(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: &Tensor<Self>,
        eps: f32,
    ) -> Result<()> {
        let d = shapes::layernorm(out, x, weight, bias);
        encoder::layernorm(view_mut(out), view(x), view(weight), view(bias), d, eps);
        Ok(())
    }

    fn gelu(&self, out: &mut Tensor<Self>, x: &Tensor<Self>) -> Result<()> {
        shapes::same_shape("gelu", &[out, x]);
        encoder::gelu(view_mut(out), view(x));
        Ok(())
    }

    fn add_bias(&self, x: &mut Tensor<Self>, bias: &Tensor<Self>) -> Result<()> {
        let d = shapes::add_bias(x, bias);
        encoder::add_bias(view_mut(x), view(bias), d);
        Ok(())
    }

    fn attention_bidirectional(
        &self,
        out: &mut Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        heads: usize,
        lens: &[usize],
    ) -> Result<()> {
        let (seq, hd) = shapes::attention_bidirectional(out, q, k, v, heads, lens);
        let dims = encoder::Dims { heads, hd, seq };
        let (q, k, v) = (view(q), view(k), view(v));
        encoder::attention_bidirectional(view_mut(out), q, k, v, lens, dims);
        Ok(())
    }
}
