//! `matmul_q_backward` (dx += dy · deq(W)) on the CPU against an f64
//! product with the dequantized weights, for every type with a block
//! layout of its own, on ragged shapes.

use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::quant::{dequant, GgmlType, QBytes};
use engine::tensor::DType::F32;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `rows` rows of random blocks of `ty`: random bytes, with every f16 scale
/// (the first two bytes of a block, and the K types' second) set to a
/// sane value so no block is infinite or NaN.
fn random_blocks(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let bytes = ty.bytes_for(cols).unwrap() * rows;
    let mut out: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
    let scale = |rng: &mut StdRng| f16::from_f32(rng.random_range(0.001..0.02)).to_le_bytes();
    for block in out.chunks_exact_mut(ty.type_size()) {
        match ty {
            // d (and dmin) first.
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q4_1 | GgmlType::Q5_1 => {
                block[..2].copy_from_slice(&scale(rng));
                block[2..4].copy_from_slice(&scale(rng));
            }
            // d last.
            GgmlType::Q6_K => {
                let n = block.len();
                block[n - 2..].copy_from_slice(&scale(rng));
            }
            _ => block[..2].copy_from_slice(&scale(rng)),
        }
    }
    out
}

#[test]
fn dx_is_dy_times_the_dequantized_weight() {
    let mut rng = StdRng::seed_from_u64(7);
    let cases = [
        (GgmlType::Q8_0, 5, 300, 96),
        (GgmlType::Q4_0, 70, 33, 64),
        (GgmlType::Q4_1, 3, 257, 32),
        (GgmlType::Q5_0, 2, 40, 160),
        (GgmlType::Q4_K, 4, 19, 512),
        (GgmlType::Q5_K, 1, 7, 256),
        (GgmlType::Q6_K, 66, 9, 256),
    ];
    for (ty, n, m, k) in cases {
        let w = random_blocks(&mut rng, ty, m, k);
        let wf = dequant::dequantize_vec(ty, &w, m * k).unwrap();
        assert!(wf.iter().all(|v| v.is_finite()), "{ty}: test weights");
        let dy: Vec<f32> = (0..n * m).map(|_| rng.random_range(-1.0..1.0)).collect();
        let dx0: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let q = Cpu.upload_quant(QBytes::Owned(w), ty, m, k).unwrap();
        let dyt = Cpu.upload(dy.clone(), &[n, m], F32).unwrap();
        let mut dx = Cpu.upload(dx0.clone(), &[n, k], F32).unwrap();
        Cpu.matmul_q_backward(&mut dx, &dyt, &q).unwrap();
        let got = Cpu.download(&dx).unwrap();
        for i in 0..n {
            for c in 0..k {
                let (mut want, mut mag) = (dx0[i * k + c] as f64, dx0[i * k + c].abs() as f64);
                for j in 0..m {
                    let p = dy[i * m + j] as f64 * wf[j * k + c] as f64;
                    want += p;
                    mag += p.abs();
                }
                // f32 sums of m products: a few ulps of the magnitude.
                let err = (got[i * k + c] as f64 - want).abs();
                assert!(
                    err <= 1e-6 * mag.max(1e-30) * (m as f64).sqrt(),
                    "{ty} [{i}, {c}]: {} vs {want}",
                    got[i * k + c]
                );
            }
        }
    }
}
