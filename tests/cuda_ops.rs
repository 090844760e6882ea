//! Every kernel of the CUDA device, run in the CPU emulator, against the CPU
//! device's op on the same (bf16-rounded) inputs. Outputs are poisoned before
//! each launch. Shapes include ragged ones that fit no tile.
#![cfg(feature = "emu")]

mod common;

use common::emu::{check, data, gpu, pair, poisoned};
use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::tensor::DType::{BF16, F32};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// bf16 outputs: each element rounds by up to 2⁻⁹ relative, and bf16
/// intermediates (q, k, v …) add a little; measured against the largest
/// reference value, as elsewhere.
const BF16_TOL: f32 = 1e-2;
/// f32 outputs from bf16 inputs: only the summation order differs.
const F32_TOL: f32 = 1e-5;

fn rng() -> StdRng {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    StdRng::seed_from_u64(seed)
}

#[test]
fn add_swiglu_rmsnorm() {
    let (g, mut r) = (gpu(), rng());
    for (n, d) in [(1, 5), (3, 64), (17, 129), (33, 576)] {
        let what = format!("[{n}, {d}]");
        let x = data(&mut r, n * d, 3.0);
        let y = data(&mut r, n * d, 3.0);
        let w = data(&mut r, d, 2.0);
        let (mut a, b) = (pair(&g, &x, &[n, d], BF16), pair(&g, &y, &[n, d], BF16));
        Cpu.add_assign(&mut a.cpu, &b.cpu).unwrap();
        g.add_assign(&mut a.gpu, &b.gpu).unwrap();
        check(&format!("add {what}"), &g, &a, BF16_TOL);

        let (gate, up) = (pair(&g, &x, &[n, d], BF16), pair(&g, &y, &[n, d], BF16));
        let mut o = poisoned(&g, &[n, d], BF16);
        Cpu.swiglu(&mut o.cpu, &gate.cpu, &up.cpu).unwrap();
        g.swiglu(&mut o.gpu, &gate.gpu, &up.gpu).unwrap();
        check(&format!("swiglu {what}"), &g, &o, BF16_TOL);

        let wt = pair(&g, &w, &[d], BF16);
        let mut o = poisoned(&g, &[n, d], BF16);
        Cpu.rmsnorm(&mut o.cpu, &gate.cpu, &wt.cpu, 1e-5).unwrap();
        g.rmsnorm(&mut o.gpu, &gate.gpu, &wt.gpu, 1e-5).unwrap();
        check(&format!("rmsnorm {what}"), &g, &o, BF16_TOL);

        // The residual stream in f32: x += bf16 y, then rmsnorm reads it.
        let exact: Vec<f32> = x.iter().map(|v| v + 1e-3).collect(); // not bf16-representable
        let mut a = pair(&g, &exact, &[n, d], F32);
        Cpu.add_assign(&mut a.cpu, &b.cpu).unwrap();
        g.add_assign(&mut a.gpu, &b.gpu).unwrap();
        check(&format!("add f32 += bf16 {what}"), &g, &a, F32_TOL);
        // A LoRA branch joining its layer: x += scaling · y.
        Cpu.add_scaled(&mut a.cpu, &b.cpu, -0.375).unwrap();
        g.add_scaled(&mut a.gpu, &b.gpu, -0.375).unwrap();
        check(&format!("add_scaled f32 += bf16 {what}"), &g, &a, F32_TOL);
        let mut a = pair(&g, &x, &[n, d], BF16);
        Cpu.add_scaled(&mut a.cpu, &b.cpu, 2.5).unwrap();
        g.add_scaled(&mut a.gpu, &b.gpu, 2.5).unwrap();
        check(&format!("add_scaled {what}"), &g, &a, BF16_TOL);
        let mut z = g.upload(vec![f32::NAN; n * d], &[n, d], BF16).unwrap();
        g.zero(&mut z).unwrap();
        assert!(
            g.download(&z).unwrap().iter().all(|&v| v == 0.0),
            "zero {what}"
        );
        let mut o = poisoned(&g, &[n, d], BF16);
        Cpu.rmsnorm(&mut o.cpu, &a.cpu, &wt.cpu, 1e-6).unwrap();
        g.rmsnorm(&mut o.gpu, &a.gpu, &wt.gpu, 1e-6).unwrap();
        check(&format!("rmsnorm f32 in {what}"), &g, &o, BF16_TOL);
    }
}

#[test]
fn embedding_and_copy_rows() {
    let (g, mut r) = (gpu(), rng());
    let (vocab, d) = (50, 67);
    let table = pair(&g, &data(&mut r, vocab * d, 1.0), &[vocab, d], BF16);
    let ids: Vec<u32> = (0..13).map(|_| r.random_range(0..vocab as u32)).collect();
    let mut o = poisoned(&g, &[ids.len(), d], BF16);
    Cpu.embedding(&mut o.cpu, &ids, &table.cpu).unwrap();
    g.embedding(&mut o.gpu, &ids, &table.gpu).unwrap();
    check("embedding", &g, &o, 0.0);
    let mut o32 = poisoned(&g, &[ids.len(), d], F32);
    Cpu.embedding(&mut o32.cpu, &ids, &table.cpu).unwrap();
    g.embedding(&mut o32.gpu, &ids, &table.gpu).unwrap();
    check("embedding into f32", &g, &o32, 0.0);
    assert!(g
        .embedding(&mut o.gpu, &[vocab as u32; 13], &table.gpu)
        .is_err());

    let mut dst = pair(&g, &data(&mut r, 20 * d, 1.0), &[20, d], BF16);
    Cpu.copy_rows(&mut dst.cpu, 4, &o.cpu, 2, 9).unwrap();
    g.copy_rows(&mut dst.gpu, 4, &o.gpu, 2, 9).unwrap();
    check("copy_rows", &g, &dst, 0.0);
}

#[test]
fn rope() {
    let (g, mut r) = (gpu(), rng());
    for (n, heads, hd, pos0) in [(1, 1, 2, 0), (3, 3, 16, 5), (17, 9, 64, 20), (5, 2, 6, 100)] {
        let x = data(&mut r, n * heads * hd, 2.0);
        let mut t = pair(&g, &x, &[n, heads * hd], BF16);
        Cpu.rope(&mut t.cpu, heads, pos0, 10000.0).unwrap();
        g.rope(&mut t.gpu, heads, pos0, 10000.0).unwrap();
        check(
            &format!("rope n{n} h{heads} hd{hd} pos0 {pos0}"),
            &g,
            &t,
            BF16_TOL,
        );
    }
}

#[test]
fn matmul_both_outputs() {
    let (g, mut r) = (gpu(), rng());
    for (n, m, k) in [
        (1, 1, 1),
        (1, 130, 64),
        (7, 31, 130),
        (64, 64, 64),
        (65, 129, 47),
        (130, 7, 200),
    ] {
        let x = pair(&g, &data(&mut r, n * k, 1.0), &[n, k], BF16);
        let w = pair(&g, &data(&mut r, m * k, 1.0), &[m, k], BF16);
        for (dtype, tol) in [(F32, F32_TOL), (BF16, BF16_TOL)] {
            let mut o = poisoned(&g, &[n, m], dtype);
            Cpu.matmul_nt(&mut o.cpu, &x.cpu, &w.cpu).unwrap();
            g.matmul_nt(&mut o.gpu, &x.gpu, &w.gpu).unwrap();
            check(
                &format!("matmul [{n},{k}]·[{m},{k}]ᵀ → {dtype}"),
                &g,
                &o,
                tol,
            );
        }
    }
}

#[test]
fn attention() {
    let (g, mut r) = (gpu(), rng());
    for (heads, kv_heads) in [(4, 4), (4, 2), (9, 3), (6, 1)] {
        for hd in [8, 64] {
            for (pos0, n) in [(0, 1), (0, 7), (5, 1), (5, 33)] {
                let cap = pos0 + n + 3;
                let kvw = kv_heads * hd;
                let q = pair(
                    &g,
                    &data(&mut r, n * heads * hd, 2.0),
                    &[n, heads * hd],
                    BF16,
                );
                let k = pair(&g, &data(&mut r, cap * kvw, 2.0), &[cap, kvw], BF16);
                let v = pair(&g, &data(&mut r, cap * kvw, 2.0), &[cap, kvw], BF16);
                let mut o = poisoned(&g, &[n, heads * hd], BF16);
                Cpu.attention(
                    &mut o.cpu, None, &q.cpu, &k.cpu, &v.cpu, heads, kv_heads, pos0,
                )
                .unwrap();
                g.attention(
                    &mut o.gpu, None, &q.gpu, &k.gpu, &v.gpu, heads, kv_heads, pos0,
                )
                .unwrap();
                let what = format!("attention {heads}/{kv_heads} hd {hd} pos0 {pos0} n {n}");
                check(&what, &g, &o, BF16_TOL);
            }
        }
    }
}

#[test]
fn log_softmax() {
    let (g, mut r) = (gpu(), rng());
    for (n, d) in [(1, 3), (4, 320), (3, 49152)] {
        let x = pair(&g, &data(&mut r, n * d, 20.0), &[n, d], F32);
        let mut o = poisoned(&g, &[n, d], F32);
        Cpu.log_softmax(&mut o.cpu, &x.cpu).unwrap();
        g.log_softmax(&mut o.gpu, &x.gpu).unwrap();
        check(&format!("log_softmax [{n}, {d}]"), &g, &o, F32_TOL);
    }
}

#[test]
fn sample_op_matches_the_cpu() {
    use engine::backend::sample::SamplerConfig;
    let (g, mut r) = (gpu(), rng());
    for vocab in [1, 7, 320, 49152] {
        let x = pair(&g, &data(&mut r, vocab, 8.0), &[1, vocab], F32);
        for (temperature, top_k, top_p) in [
            (0.0, 0, 1.0),
            (1.0, 0, 1.0),
            (0.7, 40, 0.9),
            (1.3, 1 << 40, 0.5),
        ] {
            let cfg = SamplerConfig {
                temperature,
                top_k,
                top_p,
                seed: 0,
            };
            for _ in 0..3 {
                let u: f32 = r.random();
                let want = Cpu.sample(&x.cpu, &cfg, u).unwrap();
                assert_eq!(
                    g.sample(&x.gpu, &cfg, u).unwrap(),
                    want,
                    "vocab {vocab} {cfg:?} u {u}"
                );
            }
        }
    }
}
