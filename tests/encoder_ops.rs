//! The encoder ops of `Backend` (LayerNorm, GELU, bias add, bidirectional
//! attention over padded sequences) on the CPU device against a plain f64
//! reference, in the manner of tests/cpu_ops.rs.
//!
//! Each reference is the math of the trait's doc comment, written the obvious
//! way in f64. Inputs are random and fresh each run; the seed is printed and
//! `ENCODER_OPS_SEED=<seed>` replays it. Outputs are poisoned with NaN before
//! each call and carry a sentinel past their shape; inputs carry NaN past
//! theirs, and attention's padding rows are NaN too, as the op must not read
//! them. Tolerance: f32 relative error ≤ 1e-5, measured per output tensor as
//! max|got − ref| / max|ref|; GELU, element-wise. NaN never passes.

mod common;

use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::Rng;

const TOL: f64 = 1e-5;

// ----- helpers -----

fn seeded_rng() -> StdRng {
    common::seeded_rng("ENCODER_OPS_SEED")
}

fn random_vec(rng: &mut StdRng, len: usize, bound: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-bound..bound)).collect()
}

fn input(data: &[f32], shape: &[usize]) -> Tensor<Cpu> {
    common::cpu_input(data, shape)
}

fn output(shape: &[usize]) -> Tensor<Cpu> {
    common::cpu_poisoned(shape)
}

/// An op's output against its f64 reference, and its spare capacity.
fn check_output(what: &str, out: &Tensor<Cpu>, want: &[f64]) {
    common::check_cpu_output(what, out, want, TOL);
}

// ----- references (f64, straight from the math) -----

/// (x − mean) / sqrt(var + eps) · w + b per row, var the biased variance.
fn layernorm_ref(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f64> {
    let d = w.len();
    x.chunks_exact(d)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            row.iter()
                .zip(w.iter().zip(b))
                .map(move |(&v, (&w, &b))| (v as f64 - mean) * inv * w as f64 + b as f64)
        })
        .collect()
}

/// erf(z) = (2/√π) e^(−z²) Σ_{n≥0} 2ⁿ z^(2n+1) / (1·3·5···(2n+1)): a series of
/// terms of one sign (no cancellation), independent of the op's rational
/// approximations. Beyond |z| = 5.9, erf is ±1 to within 1e-16.
fn erf_ref(z: f64) -> f64 {
    if z.abs() >= 5.9 {
        return z.signum();
    }
    let (mut term, mut sum, mut n) = (z, z, 0.0);
    while term.abs() > 1e-17 * sum.abs() {
        term *= 2.0 * z * z / (2.0 * n + 3.0);
        sum += term;
        n += 1.0;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-z * z).exp() * sum
}

fn gelu_ref(x: f32) -> f64 {
    let x = x as f64;
    0.5 * x * (1.0 + erf_ref(x / 2f64.sqrt()))
}

/// For each sequence b and real query i < lens[b]:
/// out[b,i,h] = Σ_{j < lens[b]} softmax_j(q·k / sqrt(hd)) v[b,j,h]; zeros for
/// padding queries.
fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    hd: usize,
    seq: usize,
    lens: &[usize],
) -> Vec<f64> {
    let width = heads * hd;
    let mut out = vec![0.0; lens.len() * seq * width];
    for (b, &len) in lens.iter().enumerate() {
        for i in 0..len {
            let row = b * seq + i;
            for h in 0..heads {
                let qh = &q[row * width + h * hd..][..hd];
                let scores: Vec<f64> = (0..len)
                    .map(|j| {
                        let kj = &k[(b * seq + j) * width + h * hd..][..hd];
                        let dot: f64 = qh.iter().zip(kj).map(|(&a, &c)| a as f64 * c as f64).sum();
                        dot / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                let o = &mut out[row * width + h * hd..][..hd];
                for (j, p) in weights.iter().enumerate() {
                    let vj = &v[(b * seq + j) * width + h * hd..][..hd];
                    for (o, &vv) in o.iter_mut().zip(vj) {
                        *o += p / sum * vv as f64;
                    }
                }
            }
        }
    }
    out
}

// ----- tests -----

#[test]
fn layernorm() {
    let mut rng = seeded_rng();
    for d in [1, 5, 64, 129, 384, 2000] {
        for n in [1, 3, 17, 33] {
            for eps in [1e-12, 1e-5] {
                let what = format!("n {n}, d {d}, eps {eps}");
                // Rows of very different scales and offsets: eps matters in
                // some, and a large mean must not swamp a small spread.
                let mut x_data = Vec::with_capacity(n * d);
                for _ in 0..n {
                    let scale = [1e-3, 1.0, 30.0][rng.random_range(0..3)];
                    let offset = [0.0, 5.0, -100.0][rng.random_range(0..3)];
                    x_data.extend(
                        random_vec(&mut rng, d, 1.0)
                            .iter()
                            .map(|v| v * scale + offset),
                    );
                }
                let w_data = random_vec(&mut rng, d, 2.0);
                let b_data = random_vec(&mut rng, d, 1.0);
                let x = input(&x_data, &[n, d]);
                let (w, b) = (input(&w_data, &[d]), input(&b_data, &[d]));
                let mut out = output(&[n, d]);
                Cpu.layernorm(&mut out, &x, &w, &b, eps).unwrap();
                check_output(&what, &out, &layernorm_ref(&x_data, &w_data, &b_data, eps));
            }
        }
    }
    // Leading dims fold into rows.
    let x_data = random_vec(&mut rng, 2 * 3 * 17, 1.0);
    let (w_data, b_data) = (random_vec(&mut rng, 17, 1.0), random_vec(&mut rng, 17, 1.0));
    let mut out = output(&[2, 3, 17]);
    Cpu.layernorm(
        &mut out,
        &input(&x_data, &[2, 3, 17]),
        &input(&w_data, &[17]),
        &input(&b_data, &[17]),
        1e-12,
    )
    .unwrap();
    check_output(
        "[2, 3, 17]",
        &out,
        &layernorm_ref(&x_data, &w_data, &b_data, 1e-12),
    );
}

#[test]
fn gelu() {
    let mut rng = seeded_rng();
    let check = |what: &str, x_data: &[f32], shape: &[usize]| {
        let mut out = output(shape);
        Cpu.gelu(&mut out, &input(x_data, shape)).unwrap();
        let got = Cpu.download(&out).unwrap();
        for (i, (&g, &x)) in got.iter().zip(x_data).enumerate() {
            let want = gelu_ref(x);
            // Element-wise: f32 rounding of the result, and no more.
            assert!(
                (g as f64 - want).abs() <= 1e-6 * want.abs() + 1e-12,
                "{what}: gelu({x}) = {g}, want {want} (element {i})"
            );
        }
        common::assert_spare_untouched(what, &out);
    };
    for n in [1, 3, 17, 33] {
        for f in [1, 7, 384, 1536] {
            let x_data = random_vec(&mut rng, n * f, 6.0);
            check(&format!("[{n}, {f}]"), &x_data, &[n, f]);
        }
    }
    // Each branch of erf and its edges, and the tails.
    let special: Vec<f32> = [
        0.0, 1e-30, 1e-9, 0.3, 1.19, 1.2, 1.77, 1.8, 4.0, 4.04, 8.48, 8.5, 10.0, 30.0, 100.0,
    ]
    .iter()
    .flat_map(|&x: &f32| [x, -x])
    .collect();
    check("special values", &special, &[special.len()]);
    let got = {
        let mut out = output(&[4]);
        Cpu.gelu(&mut out, &input(&[100.0, -100.0, 0.0, -30.0], &[4]))
            .unwrap();
        Cpu.download(&out).unwrap()
    };
    assert_eq!(got, [100.0, 0.0, 0.0, 0.0], "gelu's tails");
}

#[test]
fn add_bias() {
    let mut rng = seeded_rng();
    for d in [1, 5, 384, 1537] {
        for n in [1, 3, 17, 33] {
            let x_data = random_vec(&mut rng, n * d, 3.0);
            let b_data = random_vec(&mut rng, d, 1.0);
            let mut x = output(&[n, d]);
            x.buf[..n * d].copy_from_slice(&x_data);
            Cpu.add_bias(&mut x, &input(&b_data, &[d])).unwrap();
            let want: Vec<f64> = x_data
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f64 + b_data[i % d] as f64)
                .collect();
            check_output(&format!("[{n}, {d}]"), &x, &want);
        }
    }
}

#[test]
fn attention_bidirectional() {
    let mut rng = seeded_rng();
    let batches: [&[usize]; 7] = [
        &[1],
        &[7],
        &[3, 7, 1],
        &[5, 0, 5],
        &[33, 17, 2, 33],
        &[9, 64],
        &[70],
    ];
    for heads in [1, 4, 6] {
        for hd in [5, 8, 64] {
            for lens in batches {
                for extra in [0, 3] {
                    let seq = lens.iter().copied().max().unwrap() + extra;
                    let what = format!("heads {heads}, hd {hd}, lens {lens:?}, seq {seq}");
                    let width = heads * hd;
                    let rows = lens.len() * seq;
                    let mut q_data = random_vec(&mut rng, rows * width, 2.0);
                    let mut k_data = random_vec(&mut rng, rows * width, 2.0);
                    let mut v_data = random_vec(&mut rng, rows * width, 1.0);
                    // Padding rows hold NaN: the op must read none of them.
                    for (b, &len) in lens.iter().enumerate() {
                        let pad = (b * seq + len) * width..(b + 1) * seq * width;
                        q_data[pad.clone()].fill(f32::NAN);
                        k_data[pad.clone()].fill(f32::NAN);
                        v_data[pad].fill(f32::NAN);
                    }
                    let q = input(&q_data, &[rows, width]);
                    let k = input(&k_data, &[rows, width]);
                    let v = input(&v_data, &[rows, width]);
                    let mut out = output(&[rows, width]);
                    Cpu.attention_bidirectional(&mut out, &q, &k, &v, heads, lens)
                        .unwrap();
                    let want = attention_ref(&q_data, &k_data, &v_data, heads, hd, seq, lens);
                    check_output(&what, &out, &want);
                    // Padding queries are written as zeros, exactly.
                    let got = Cpu.download(&out).unwrap();
                    for (b, &len) in lens.iter().enumerate() {
                        let pad = &got[(b * seq + len) * width..(b + 1) * seq * width];
                        assert!(
                            pad.iter().all(|&x| x == 0.0),
                            "{what}: padding rows of sequence {b} are not zero"
                        );
                    }
                }
            }
        }
    }
}

/// A batch gives each sequence what it gets alone: the padding and the other
/// sequences change nothing but, at most, the rounding.
#[test]
fn attention_bidirectional_batch_equals_single() {
    let mut rng = seeded_rng();
    let (heads, hd) = (4, 16);
    let width = heads * hd;
    let lens = [11, 4, 1, 16];
    let seq = 16;
    let rows = lens.len() * seq;
    let q_data = random_vec(&mut rng, rows * width, 2.0);
    let k_data = random_vec(&mut rng, rows * width, 2.0);
    let v_data = random_vec(&mut rng, rows * width, 1.0);
    let mut out = output(&[rows, width]);
    let (q, k, v) = (
        input(&q_data, &[rows, width]),
        input(&k_data, &[rows, width]),
        input(&v_data, &[rows, width]),
    );
    Cpu.attention_bidirectional(&mut out, &q, &k, &v, heads, &lens)
        .unwrap();
    let batched = Cpu.download(&out).unwrap();
    for (b, &len) in lens.iter().enumerate() {
        let part = |d: &[f32]| d[b * seq * width..][..len * width].to_vec();
        let (qs, ks, vs) = (part(&q_data), part(&k_data), part(&v_data));
        let mut one = output(&[len, width]);
        Cpu.attention_bidirectional(
            &mut one,
            &input(&qs, &[len, width]),
            &input(&ks, &[len, width]),
            &input(&vs, &[len, width]),
            heads,
            &[len],
        )
        .unwrap();
        let one: Vec<f64> = Cpu
            .download(&one)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        common::assert_close_f64(
            &format!("sequence {b}"),
            &batched[b * seq * width..][..len * width],
            &one,
            1e-6,
        );
    }
}
