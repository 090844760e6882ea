//! The CUDA device's backward kernels, run in the CPU emulator, against the
//! CPU device's ops on the same (bf16-rounded) inputs. Outputs are poisoned
//! before each launch; shapes include ragged ones.
#![cfg(feature = "emu")]

mod common;

use common::emu::{check, data, gpu, pair, poisoned, Pair};
use common::max_rel_err;
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::Emu;
use engine::backend::cuda::Cuda;
use engine::backend::{AdamWTensors, Backend};
use engine::tensor::DType::{BF16, F32};
use rand::rngs::StdRng;
use rand::Rng;

/// bf16 outputs round each element by up to 2⁻⁹ of its size.
const BF16_TOL: f32 = 1e-2;
/// f32 outputs of f32 inputs: only the order of additions differs.
const F32_TOL: f32 = 1e-6;

fn rng() -> StdRng {
    common::seeded_rng("CUDA_BACKWARD_SEED")
}

#[test]
fn swiglu_backward() {
    let (g, mut r) = (gpu(), rng());
    for (n, f) in [(1, 7), (5, 160), (17, 1536)] {
        let what = format!("[{n}, {f}]");
        let shape = [n, f];
        let dout = pair(&g, &data(&mut r, n * f, 1.0), &shape, BF16);
        let gate = pair(&g, &data(&mut r, n * f, 4.0), &shape, BF16);
        let up = pair(&g, &data(&mut r, n * f, 2.0), &shape, BF16);
        let (mut dgate, mut dup) = (poisoned(&g, &shape, BF16), poisoned(&g, &shape, BF16));
        Cpu.swiglu_backward(&mut dgate.cpu, &mut dup.cpu, &dout.cpu, &gate.cpu, &up.cpu)
            .unwrap();
        g.swiglu_backward(&mut dgate.gpu, &mut dup.gpu, &dout.gpu, &gate.gpu, &up.gpu)
            .unwrap();
        check(&format!("dgate {what}"), &g, &dgate, BF16_TOL);
        check(&format!("dup {what}"), &g, &dup, BF16_TOL);
    }
}

/// The backward turns by −angle: on the GPU, forward then backward gives
/// the input back (to bf16 rounding), and the backward matches the CPU's.
#[test]
fn rope_backward() {
    let (g, mut r) = (gpu(), rng());
    for (n, heads, hd, pos0) in [(1, 1, 2, 0), (7, 3, 16, 5), (33, 9, 64, 100)] {
        let what = format!("n {n}, heads {heads}, hd {hd}, pos0 {pos0}");
        let width = heads * hd;
        let v = data(&mut r, n * width, 2.0);
        let mut x = pair(&g, &v, &[n, width], BF16);
        Cpu.rope_backward(&mut x.cpu, heads, pos0, 10000.0).unwrap();
        g.rope_backward(&mut x.gpu, heads, pos0, 10000.0).unwrap();
        check(&what, &g, &x, BF16_TOL);
        g.rope(&mut x.gpu, heads, pos0, 10000.0).unwrap();
        let back = g.download(&x.gpu).unwrap();
        let err = max_rel_err(&back, &v);
        assert!(
            err <= BF16_TOL,
            "{what}: rope(rope_backward(x)) off by {err:e}"
        );
    }
}

/// Rows that share an id add into the same row of the table (atomically on
/// the GPU); the table's other rows keep what they held.
#[test]
fn embedding_backward() {
    let (g, mut r) = (gpu(), rng());
    let (vocab, d) = (37, 67);
    let ids: Vec<u32> = (0..50).map(|_| r.random_range(0..8)).collect();
    let dout = pair(&g, &data(&mut r, ids.len() * d, 1.0), &[ids.len(), d], F32);
    let mut dtable = pair(&g, &data(&mut r, vocab * d, 1.0), &[vocab, d], F32);
    Cpu.embedding_backward(&mut dtable.cpu, &dout.cpu, &ids)
        .unwrap();
    g.embedding_backward(&mut dtable.gpu, &dout.gpu, &ids)
        .unwrap();
    check("embedding_backward", &g, &dtable, F32_TOL);
    let none: [u32; 0] = [];
    let empty = pair(&g, &[], &[0, d], F32);
    g.embedding_backward(&mut dtable.gpu, &empty.gpu, &none)
        .unwrap();
}

/// The same seed draws the same mask on both devices, bit for bit: the f32
/// kernel's output equals the CPU's exactly.
#[test]
fn dropout_mask_matches_the_cpu() {
    let (g, mut r) = (gpu(), rng());
    for (n, d, p) in [(1, 3, 0.5), (13, 129, 0.1), (64, 1000, 0.3)] {
        let seed: u64 = r.random();
        let v = data(&mut r, n * d, 1.0);
        let mut x = pair(&g, &v, &[n, d], F32);
        Cpu.dropout(&mut x.cpu, p, seed).unwrap();
        g.dropout(&mut x.gpu, p, seed).unwrap();
        let (want, got) = (Cpu.download(&x.cpu).unwrap(), g.download(&x.gpu).unwrap());
        assert_eq!(got, want, "[{n}, {d}] p {p}: masks differ");
        let mut y = pair(&g, &v, &[n, d], BF16);
        Cpu.dropout(&mut y.cpu, p, seed).unwrap();
        g.dropout(&mut y.gpu, p, seed).unwrap();
        check(&format!("bf16 [{n}, {d}]"), &g, &y, BF16_TOL);
    }
}

/// dx and dweight accumulate (start from random values); dweight sums over
/// rows with atomics. Inputs as train_step passes them: the residual stream
/// x and its gradient in f32, dout and the gain in bf16.
#[test]
fn rmsnorm_backward() {
    let (g, mut r) = (gpu(), rng());
    for (n, d) in [(1, 5), (3, 64), (17, 129), (40, 576)] {
        let what = format!("[{n}, {d}]");
        let x = pair(&g, &data(&mut r, n * d, 2.0), &[n, d], F32);
        let dout = pair(&g, &data(&mut r, n * d, 1.0), &[n, d], BF16);
        let w = pair(&g, &data(&mut r, d, 1.5), &[d], BF16);
        let mut dx = pair(&g, &data(&mut r, n * d, 1.0), &[n, d], F32);
        let mut dw = pair(&g, &data(&mut r, d, 1.0), &[d], F32);
        Cpu.rmsnorm_backward(&mut dx.cpu, &mut dw.cpu, &dout.cpu, &x.cpu, &w.cpu, 1e-5)
            .unwrap();
        g.rmsnorm_backward(&mut dx.gpu, &mut dw.gpu, &dout.gpu, &x.gpu, &w.gpu, 1e-5)
            .unwrap();
        check(&format!("dx {what}"), &g, &dx, 1e-5);
        check(&format!("dweight {what}"), &g, &dw, 1e-5);
    }
}

/// The loss sum and dlogits over ragged vocabularies, with ignored rows, a
/// given scale or the default 1/count, and without dlogits.
#[test]
fn cross_entropy() {
    let (g, mut r) = (gpu(), rng());
    for (n, vocab) in [(1, 7), (5, 1000), (9, 49152)] {
        let what = format!("[{n}, {vocab}]");
        let logits = pair(&g, &data(&mut r, n * vocab, 8.0), &[n, vocab], F32);
        let mut targets: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
        if n > 1 {
            targets[1] = engine::backend::IGNORE;
        }
        for scale in [None, Some(0.25)] {
            let mut dl = poisoned(&g, &[n, vocab], F32);
            let want = Cpu
                .cross_entropy(Some(&mut dl.cpu), &logits.cpu, &targets, scale)
                .unwrap();
            let got = g
                .cross_entropy(Some(&mut dl.gpu), &logits.gpu, &targets, scale)
                .unwrap();
            assert!(
                ((got - want) / want).abs() < 1e-5,
                "{what} {scale:?}: loss {got} vs {want}"
            );
            check(&format!("dlogits {what} {scale:?}"), &g, &dl, 1e-5);
        }
        let got = g.cross_entropy(None, &logits.gpu, &targets, None).unwrap();
        let want = Cpu
            .cross_entropy(None, &logits.cpu, &targets, None)
            .unwrap();
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "{what}: loss {got} vs {want}"
        );
        let bad = vec![vocab as u32; n];
        assert!(g.cross_entropy(None, &logits.gpu, &bad, None).is_err());
    }
}

/// dx += dout·w and dw += doutᵀ·x accumulate into random starting values,
/// for dout in bf16 and in f32 (the residual stream's and the logits'
/// gradients), dx in bf16 or f32, at shapes that fit no 64×64 tile; dw
/// None leaves only dx.
#[test]
fn matmul_nt_backward() {
    let (g, mut r) = (gpu(), rng());
    for (n, m, k) in [(1, 1, 1), (5, 37, 70), (65, 130, 33), (24, 96, 200)] {
        for (dout_t, dx_t) in [(BF16, BF16), (F32, BF16), (F32, F32)] {
            let what = format!("n {n} m {m} k {k}, dout {dout_t}, dx {dx_t}");
            let dout = pair(&g, &data(&mut r, n * m, 1.0), &[n, m], dout_t);
            let x = pair(&g, &data(&mut r, n * k, 1.0), &[n, k], BF16);
            let w = pair(&g, &data(&mut r, m * k, 1.0), &[m, k], BF16);
            let mut dx = pair(&g, &data(&mut r, n * k, 1.0), &[n, k], dx_t);
            let mut dw = pair(&g, &data(&mut r, m * k, 1.0), &[m, k], F32);
            Cpu.matmul_nt_backward(&mut dx.cpu, Some(&mut dw.cpu), &dout.cpu, &x.cpu, &w.cpu)
                .unwrap();
            g.matmul_nt_backward(&mut dx.gpu, Some(&mut dw.gpu), &dout.gpu, &x.gpu, &w.gpu)
                .unwrap();
            let tol = if dx_t == BF16 { BF16_TOL } else { 1e-5 };
            check(&format!("dx, {what}"), &g, &dx, tol);
            check(&format!("dw, {what}"), &g, &dw, 1e-5);
            // frozen weight: dx only (into a fresh dx: a second bf16
            // accumulation would round the first sum, which a near-cancelling
            // single element turns into a large relative error)
            let before = g.download(&dw.gpu).unwrap();
            let mut dx = pair(&g, &data(&mut r, n * k, 1.0), &[n, k], dx_t);
            g.matmul_nt_backward(&mut dx.gpu, None, &dout.gpu, &x.gpu, &w.gpu)
                .unwrap();
            Cpu.matmul_nt_backward(&mut dx.cpu, None, &dout.cpu, &x.cpu, &w.cpu)
                .unwrap();
            check(&format!("dx alone, {what}"), &g, &dx, tol);
            assert_eq!(g.download(&dw.gpu).unwrap(), before);
        }
    }
}

/// The training forward's lse, then dq (overwritten), dk and dv
/// (accumulated into random values) against the CPU op, with GQA, a cache
/// prefix (pos0), a head width that is not a multiple of 32, and cache rows
/// past pos0 + n that must stay untouched.
#[test]
fn attention_backward() {
    let (g, mut r) = (gpu(), rng());
    for (n, heads, kv_heads, hd, pos0) in [
        (1, 1, 1, 8, 0),
        (5, 4, 2, 16, 3),
        (13, 6, 2, 64, 0),
        (9, 9, 3, 64, 7),
        (6, 2, 1, 40, 2),
    ] {
        let what = format!("n {n}, heads {heads}/{kv_heads}, hd {hd}, pos0 {pos0}");
        let (width, kv_width) = (heads * hd, kv_heads * hd);
        let cap = pos0 + n + 2;
        let q = pair(&g, &data(&mut r, n * width, 1.5), &[n, width], BF16);
        let dout = pair(&g, &data(&mut r, n * width, 1.0), &[n, width], BF16);
        let k = pair(
            &g,
            &data(&mut r, cap * kv_width, 1.5),
            &[cap, kv_width],
            BF16,
        );
        let v = pair(
            &g,
            &data(&mut r, cap * kv_width, 1.0),
            &[cap, kv_width],
            BF16,
        );
        // The forward's out and log-sum-exp, on each device; the flash
        // kernel (the one that writes lse) takes hd 8..128, powers of 2:
        // for others the GPU refuses, and gets the CPU's forward instead.
        let mut out = poisoned(&g, &[n, width], BF16);
        let mut lse = poisoned(&g, &[heads, n], F32);
        Cpu.attention(
            &mut out.cpu,
            Some(&mut lse.cpu),
            &q.cpu,
            &k.cpu,
            &v.cpu,
            heads,
            kv_heads,
            pos0,
        )
        .unwrap();
        let fwd = g.attention(
            &mut out.gpu,
            Some(&mut lse.gpu),
            &q.gpu,
            &k.gpu,
            &v.gpu,
            heads,
            kv_heads,
            pos0,
        );
        if [8, 16, 32, 64, 128].contains(&hd) {
            fwd.unwrap();
            check(&format!("out, {what}"), &g, &out, BF16_TOL);
            check(&format!("lse, {what}"), &g, &lse, 1e-5);
        } else {
            assert!(fwd.unwrap_err().to_string().contains("head_dim"));
            out.gpu = g
                .upload(Cpu.download(&out.cpu).unwrap(), &[n, width], BF16)
                .unwrap();
            lse.gpu = g
                .upload(Cpu.download(&lse.cpu).unwrap(), &[heads, n], F32)
                .unwrap();
        }
        let mut dq = poisoned(&g, &[n, width], BF16);
        let mut dk = pair(
            &g,
            &data(&mut r, cap * kv_width, 0.5),
            &[cap, kv_width],
            BF16,
        );
        let mut dv = pair(
            &g,
            &data(&mut r, cap * kv_width, 0.5),
            &[cap, kv_width],
            BF16,
        );
        Cpu.attention_backward(
            &mut dq.cpu,
            &mut dk.cpu,
            &mut dv.cpu,
            &dout.cpu,
            &q.cpu,
            &k.cpu,
            &v.cpu,
            &out.cpu,
            &lse.cpu,
            heads,
            kv_heads,
            pos0,
        )
        .unwrap();
        g.attention_backward(
            &mut dq.gpu,
            &mut dk.gpu,
            &mut dv.gpu,
            &dout.gpu,
            &q.gpu,
            &k.gpu,
            &v.gpu,
            &out.gpu,
            &lse.gpu,
            heads,
            kv_heads,
            pos0,
        )
        .unwrap();
        check(&format!("dq, {what}"), &g, &dq, BF16_TOL);
        check(&format!("dk, {what}"), &g, &dk, BF16_TOL);
        check(&format!("dv, {what}"), &g, &dv, BF16_TOL);
    }
}

/// AdamW over several tensors in one launch against the CPU op, two steps
/// (bias correction changes between them), with weight decay: sizes around
/// the kernel's 1024-element chunks, an empty tensor, and bf16 working
/// copies refreshed in the same pass for some. Then the conversions of
/// f32 ↔ bf16.
#[test]
fn adamw_step_and_convert() {
    let (g, mut r) = (gpu(), rng());
    let sizes = [1, 1023, 0, 1025, 3000, 37];
    let with_copy = |i: usize| i.is_multiple_of(2);
    let mut params: Vec<Pair> = sizes
        .iter()
        .map(|&n| pair(&g, &data(&mut r, n, 1.0), &[n], F32))
        .collect();
    let mut ms: Vec<Pair> = sizes
        .iter()
        .map(|&n| pair(&g, &vec![0.0; n], &[n], F32))
        .collect();
    let mut vs: Vec<Pair> = sizes
        .iter()
        .map(|&n| pair(&g, &vec![0.0; n], &[n], F32))
        .collect();
    let mut copies: Vec<Pair> = sizes.iter().map(|&n| poisoned(&g, &[n], BF16)).collect();
    for step in 1..=2 {
        let grads: Vec<Pair> = sizes
            .iter()
            .map(|&n| pair(&g, &data(&mut r, n, 0.1), &[n], F32))
            .collect();
        let hp = engine::backend::AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        let mut cpu_side: Vec<AdamWTensors<Cpu>> = Vec::new();
        let mut gpu_side: Vec<AdamWTensors<Cuda<Emu>>> = Vec::new();
        for (i, (((p, m), v), (grad, copy))) in params
            .iter_mut()
            .zip(&mut ms)
            .zip(&mut vs)
            .zip(grads.iter().zip(&mut copies))
            .enumerate()
        {
            cpu_side.push(AdamWTensors {
                param: &mut p.cpu,
                m: &mut m.cpu,
                v: &mut v.cpu,
                grad: &grad.cpu,
                copy: with_copy(i).then_some(&mut copy.cpu),
            });
            gpu_side.push(AdamWTensors {
                param: &mut p.gpu,
                m: &mut m.gpu,
                v: &mut v.gpu,
                grad: &grad.gpu,
                copy: with_copy(i).then_some(&mut copy.gpu),
            });
        }
        Cpu.adamw_step(&mut cpu_side, &hp).unwrap();
        g.adamw_step(&mut gpu_side, &hp).unwrap();
        for (i, n) in sizes.into_iter().enumerate() {
            let what = format!("tensor {i} of {n}, step {step}");
            check(&format!("param, {what}"), &g, &params[i], 1e-6);
            check(&format!("m, {what}"), &g, &ms[i], 1e-6);
            check(&format!("v, {what}"), &g, &vs[i], 1e-6);
            if with_copy(i) {
                // the copy is param rounded to bf16, exactly
                let want: Vec<f32> = g
                    .download(&params[i].gpu)
                    .unwrap()
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect();
                assert_eq!(g.download(&copies[i].gpu).unwrap(), want, "copy, {what}");
            }
        }
    }
    let untouched = g.download(&copies[1].gpu).unwrap();
    assert!(
        untouched.iter().all(|x| x.is_nan()),
        "a tensor without a copy wrote one"
    );
    let n = sizes[4];
    let p = &params[4];
    let mut copy = poisoned(&g, &[n], BF16);
    Cpu.convert(&mut copy.cpu, &p.cpu).unwrap();
    g.convert(&mut copy.gpu, &p.gpu).unwrap();
    check("convert f32 → bf16", &g, &copy, BF16_TOL);
    let mut back = poisoned(&g, &[n], F32);
    Cpu.convert(&mut back.cpu, &copy.cpu).unwrap();
    g.convert(&mut back.gpu, &copy.gpu).unwrap();
    check("convert bf16 → f32", &g, &back, BF16_TOL);
}

/// A LoRA branch's backward scales a gradient that may be f32 (the residual
/// stream's) into a bf16 scratch.
#[test]
fn add_scaled_from_f32() {
    let (g, mut r) = (gpu(), rng());
    let (n, d) = (9, 131);
    for x_t in [BF16, F32] {
        let mut x = pair(&g, &data(&mut r, n * d, 1.0), &[n, d], x_t);
        let y = pair(&g, &data(&mut r, n * d, 1.0), &[n, d], F32);
        Cpu.add_scaled(&mut x.cpu, &y.cpu, 0.625).unwrap();
        g.add_scaled(&mut x.gpu, &y.gpu, 0.625).unwrap();
        let tol = if x_t == BF16 { BF16_TOL } else { 1e-6 };
        check(&format!("{x_t} += f32"), &g, &x, tol);
    }
}

/// The global gradient norm's pieces: Σ x² (f64 total of per-block f32
/// sums) and the clipping scale, at ragged lengths.
#[test]
fn sum_squares_and_scale() {
    let (g, mut r) = (gpu(), rng());
    for n in [1, 255, 257, 100_003] {
        let mut x = pair(&g, &data(&mut r, n, 2.0), &[n], F32);
        let (want, got) = (
            Cpu.sum_squares(&x.cpu).unwrap(),
            g.sum_squares(&x.gpu).unwrap(),
        );
        assert!(((got - want) / want).abs() < 1e-6, "n {n}: {got} vs {want}");
        Cpu.scale(&mut x.cpu, 0.37).unwrap();
        g.scale(&mut x.gpu, 0.37).unwrap();
        check(&format!("scale n {n}"), &g, &x, 0.0);
    }
}

/// The fused LoRA kernels (kernels/lora.cu) against the CPU's LoRA ops:
/// ragged rows and columns, ranks from 1 to the kernels' limit of 128, with
/// and without dropout, dy in bf16 and in f32 (the residual stream's
/// gradient). y, dx, dA and dB accumulate into random values; t and dt are
/// poisoned.
#[test]
fn lora_forward_and_backward() {
    let (g, mut r) = (gpu(), rng());
    for (n, inp, out, rank, dropout, dy_t) in [
        (1, 8, 8, 1, None, BF16),
        (17, 64, 192, 8, None, BF16),
        (33, 96, 40, 16, Some((0.1, 7)), F32),
        (20, 576, 72, 128, Some((0.3, 9)), BF16),
        (150, 40, 24, 20, None, F32),
    ] {
        let what = format!("n {n} in {inp} out {out} r {rank}, dropout {dropout:?}, dy {dy_t}");
        let s = 2.0;
        let x = pair(&g, &data(&mut r, n * inp, 1.0), &[n, inp], BF16);
        let a = pair(&g, &data(&mut r, rank * inp, 0.5), &[rank, inp], BF16);
        let b = pair(&g, &data(&mut r, out * rank, 0.5), &[out, rank], BF16);
        let mut y = pair(&g, &data(&mut r, n * out, 1.0), &[n, out], BF16);
        let mut t = poisoned(&g, &[n, rank], F32);
        Cpu.lora_forward(&mut y.cpu, &mut t.cpu, &x.cpu, &a.cpu, &b.cpu, s, dropout)
            .unwrap();
        g.lora_forward(&mut y.gpu, &mut t.gpu, &x.gpu, &a.gpu, &b.gpu, s, dropout)
            .unwrap();
        check(&format!("y, {what}"), &g, &y, BF16_TOL);
        check(&format!("t, {what}"), &g, &t, 1e-5);

        let dy = pair(&g, &data(&mut r, n * out, 1.0), &[n, out], dy_t);
        let mut dx = pair(&g, &data(&mut r, n * inp, 1.0), &[n, inp], BF16);
        let mut da = pair(&g, &data(&mut r, rank * inp, 1.0), &[rank, inp], F32);
        let mut db = pair(&g, &data(&mut r, out * rank, 1.0), &[out, rank], F32);
        let mut dt = poisoned(&g, &[n, rank], F32);
        Cpu.lora_backward(
            &mut dx.cpu,
            &mut da.cpu,
            &mut db.cpu,
            &mut dt.cpu,
            &dy.cpu,
            &x.cpu,
            &t.cpu,
            &a.cpu,
            &b.cpu,
            s,
            dropout,
        )
        .unwrap();
        g.lora_backward(
            &mut dx.gpu,
            &mut da.gpu,
            &mut db.gpu,
            &mut dt.gpu,
            &dy.gpu,
            &x.gpu,
            &t.gpu,
            &a.gpu,
            &b.gpu,
            s,
            dropout,
        )
        .unwrap();
        check(&format!("dx, {what}"), &g, &dx, BF16_TOL);
        check(&format!("dt, {what}"), &g, &dt, 1e-5);
        check(&format!("dA, {what}"), &g, &da, 1e-5);
        check(&format!("dB, {what}"), &g, &db, 1e-5);
    }
}

/// Ranks above the kernels' limit are refused with an error, not run.
#[test]
fn lora_rank_above_the_limit_is_an_error() {
    let g = gpu();
    let (n, inp, out, rank) = (2, 4, 4, 129);
    let x = g.zeros(&[n, inp], BF16).unwrap();
    let a = g.zeros(&[rank, inp], BF16).unwrap();
    let b = g.zeros(&[out, rank], BF16).unwrap();
    let mut y = g.zeros(&[n, out], BF16).unwrap();
    let mut t = g.zeros(&[n, rank], F32).unwrap();
    let err = g
        .lora_forward(&mut y, &mut t, &x, &a, &b, 1.0, None)
        .unwrap_err();
    assert!(err.to_string().contains("rank 129"), "{err}");
}
