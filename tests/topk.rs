//! `Backend::top_k`, retrieval's selection: on the CPU against a full sort,
//! and (with the `emu` feature) the CUDA kernel in the emulator against the
//! CPU, on random scores with many ties, k past the row width, k = 0, and
//! negative, zero (−0 ranks as +0), infinite and NaN (ranks as −∞) scores,
//! and on finely tied scores across the CUDA kernel's row segments.

mod common;

use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::tensor::DType::F32;
use rand::rngs::StdRng;
use rand::Rng;

fn rng() -> StdRng {
    common::seeded_rng("TOPK_SEED")
}

/// Scores drawn from a few values, so that ties are everywhere, plus
/// specials.
fn scores(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match r.random_range(0..20) {
            0 => f32::INFINITY,
            1 => f32::NEG_INFINITY,
            2 => -0.0,
            3 => 0.0,
            4 => f32::NAN,
            _ => r.random_range(-8i32..8) as f32 * 0.25,
        })
        .collect()
}

/// Scores in [−1, 1) in steps of 1/64: finite, and the best value held by
/// a few dozen columns of a wide row, spread over all its segments, so that
/// ties across segments decide (the specials above put +∞ in the first).
fn fine_scores(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| r.random_range(-64i32..64) as f32 / 64.0)
        .collect()
}

/// Every shape with each kind of scores.
fn cases(r: &mut StdRng) -> Vec<(usize, usize, usize, Vec<f32>)> {
    let mut out = Vec::new();
    for (rows, m, k) in SHAPES {
        out.push((rows, m, k, scores(r, rows * m)));
        out.push((rows, m, k, fine_scores(r, rows * m)));
    }
    out
}

/// The reference: every (column, score), sorted best first, cut at k.
fn sorted(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(c, &s)| {
            (
                c as u32,
                if s.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    s + 0.0
                },
            )
        })
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// (rows, columns, k). The CUDA kernel cuts rows into segments of
/// `top_k_segment(k)` columns (4096 here but for k 300: 4800): the last
/// three shapes take several, one a last segment narrower than k.
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (3, 10, 4),
    (2, 7, 9),
    (4, 1000, 0),
    (5, 3000, 17),
    (2, 8197, 40),
    (3, 9000, 300),
    (1, 70000, 100),
];

#[test]
fn cpu_top_k_is_the_head_of_a_full_sort() {
    for (rows, m, k, v) in cases(&mut rng()) {
        let t = Cpu.upload(v.clone(), &[rows, m], F32).unwrap();
        let got = Cpu.top_k(&t, k).unwrap();
        assert_eq!(got.len(), rows);
        for (i, row) in got.iter().enumerate() {
            let want = sorted(&v[i * m..(i + 1) * m], k);
            let same = row.len() == want.len()
                && row
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.0 == b.0 && a.1.to_bits() == b.1.to_bits());
            assert!(
                same,
                "rows {rows} m {m} k {k}, row {i}: {row:?} vs {want:?}"
            );
        }
    }
}

#[cfg(feature = "emu")]
#[test]
fn cuda_top_k_matches_the_cpu() {
    let g = common::emu::gpu();
    for (rows, m, k, v) in cases(&mut rng()) {
        let want = Cpu
            .top_k(&Cpu.upload(v.clone(), &[rows, m], F32).unwrap(), k)
            .unwrap();
        let got = g.top_k(&g.upload(v, &[rows, m], F32).unwrap(), k).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let same = a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits());
            assert!(same, "rows {rows} m {m} k {k}, row {i}: {a:?} vs {b:?}");
        }
    }
}
