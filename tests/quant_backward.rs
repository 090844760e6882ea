//! `matmul_q_backward` (dx += dy · deq(W)) on the CPU against an f64
//! product with the dequantized weights, for every type with a block
//! layout of its own, on ragged shapes.

mod common;

use common::qblocks::random_blocks;
use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::quant::{dequant, GgmlType, QBytes};
use engine::tensor::DType::F32;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
