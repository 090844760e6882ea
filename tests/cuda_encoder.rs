//! The CUDA device's encoder kernels (LayerNorm, GELU, bias add,
//! bidirectional attention with a padding mask), run in the CPU emulator,
//! against the CPU device's ops on the same (bf16-rounded) inputs. Outputs
//! are poisoned before each launch; shapes include ragged ones.
#![cfg(feature = "emu")]

mod common;

use common::emu::{check, data, gpu, pair, poisoned};
use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::tensor::DType::BF16;
use rand::rngs::StdRng;

/// bf16 outputs round each element by up to 2⁻⁹ of its size.
const BF16_TOL: f32 = 1e-2;

fn rng() -> StdRng {
    common::seeded_rng("CUDA_ENCODER_SEED")
}

#[test]
fn layernorm() {
    let (g, mut r) = (gpu(), rng());
    for (n, d) in [(1, 7), (5, 384), (17, 1000)] {
        let what = format!("[{n}, {d}]");
        // an offset mean, as hidden states have
        let xv: Vec<f32> = data(&mut r, n * d, 2.0).iter().map(|v| v + 3.0).collect();
        let xv: Vec<f32> = xv
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let x = pair(&g, &xv, &[n, d], BF16);
        let w = pair(&g, &data(&mut r, d, 1.5), &[d], BF16);
        let b = pair(&g, &data(&mut r, d, 0.5), &[d], BF16);
        let mut out = poisoned(&g, &[n, d], BF16);
        Cpu.layernorm(&mut out.cpu, &x.cpu, &w.cpu, &b.cpu, 1e-12)
            .unwrap();
        g.layernorm(&mut out.gpu, &x.gpu, &w.gpu, &b.gpu, 1e-12)
            .unwrap();
        check(&what, &g, &out, BF16_TOL);
    }
}

#[test]
fn gelu_and_bias() {
    let (g, mut r) = (gpu(), rng());
    for (n, d) in [(1, 3), (7, 1536), (33, 100)] {
        let what = format!("[{n}, {d}]");
        let x = pair(&g, &data(&mut r, n * d, 5.0), &[n, d], BF16);
        let mut out = poisoned(&g, &[n, d], BF16);
        Cpu.gelu(&mut out.cpu, &x.cpu).unwrap();
        g.gelu(&mut out.gpu, &x.gpu).unwrap();
        check(&format!("gelu {what}"), &g, &out, BF16_TOL);
        let bias = pair(&g, &data(&mut r, d, 1.0), &[d], BF16);
        Cpu.add_bias(&mut out.cpu, &bias.cpu).unwrap();
        g.add_bias(&mut out.gpu, &bias.gpu).unwrap();
        check(&format!("add_bias {what}"), &g, &out, BF16_TOL);
    }
}

/// Sequences full, partly padded and empty; MiniLM's 12 heads of 32, and
/// head widths that are not a multiple of 32. Padding rows come out zero on
/// both devices.
#[test]
fn attention_bidirectional() {
    let (g, mut r) = (gpu(), rng());
    for (seq, heads, hd, lens) in [
        (1, 1, 8, vec![1]),
        (9, 12, 32, vec![9, 4, 0]),
        (13, 3, 40, vec![2, 13]),
        (6, 2, 64, vec![5, 1, 6, 3]),
    ] {
        let what = format!("seq {seq}, heads {heads}, hd {hd}, lens {lens:?}");
        let (rows, width) = (seq * lens.len(), heads * hd);
        let q = pair(&g, &data(&mut r, rows * width, 2.0), &[rows, width], BF16);
        let k = pair(&g, &data(&mut r, rows * width, 2.0), &[rows, width], BF16);
        let v = pair(&g, &data(&mut r, rows * width, 1.0), &[rows, width], BF16);
        let mut out = poisoned(&g, &[rows, width], BF16);
        Cpu.attention_bidirectional(&mut out.cpu, &q.cpu, &k.cpu, &v.cpu, heads, &lens)
            .unwrap();
        g.attention_bidirectional(&mut out.gpu, &q.gpu, &k.gpu, &v.gpu, heads, &lens)
            .unwrap();
        check(&what, &g, &out, BF16_TOL);
    }
}
