//! Every op of `Backend` on the CPU device against a plain f64 reference.
//!
//! Each reference is the math of the trait's doc comment, written the obvious
//! way in f64. Inputs are random and fresh each run; the seed is printed (shown
//! when a test fails) and `CPU_OPS_SEED=<seed>` replays it. Outputs are
//! poisoned with NaN before each call, so an element an op skips fails, and
//! every tensor has spare capacity past its shape: NaN in inputs (an op that
//! reads it produces NaN), a sentinel in outputs (an op that writes it is
//! caught).
//!
//! Tolerance: f32 relative error ≤ 1e-5, measured per output tensor as
//! max|got − ref| / max|ref|. NaN and infinities never pass.

mod common;
use common::SPARE;

use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::tensor::DType::F32;
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::Rng;

const TOL: f64 = 1e-5;

// ----- helpers -----

fn seeded_rng() -> StdRng {
    common::seeded_rng("CPU_OPS_SEED")
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

fn embedding_ref(ids: &[u32], table: &[f32], d: usize) -> Vec<f64> {
    ids.iter()
        .flat_map(|&id| &table[id as usize * d..][..d])
        .map(|&t| t as f64)
        .collect()
}

fn rmsnorm_ref(x: &[f32], weight: &[f32], eps: f32) -> Vec<f64> {
    let d = weight.len();
    x.chunks_exact(d)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(&v, &w)| v as f64 * inv * w as f64)
        })
        .collect()
}

/// out[i, j] = Σ_l x[i, l] · w[j, l]; also the scale to measure errors
/// against (see `matmul_nt`).
fn matmul_nt_ref(x: &[f32], w: &[f32], n: usize, m: usize, k: usize) -> (Vec<f64>, f64) {
    let mut out = vec![0.0; n * m];
    let mut scale = 0.0f64;
    for i in 0..n {
        for j in 0..m {
            let (xi, wj) = (&x[i * k..][..k], &w[j * k..][..k]);
            let terms = xi.iter().zip(wj).map(|(&a, &b)| a as f64 * b as f64);
            out[i * m + j] = terms.clone().sum();
            let magnitude: f64 = terms.map(f64::abs).sum();
            scale = scale
                .max(out[i * m + j].abs())
                .max(magnitude / (k as f64).sqrt());
        }
    }
    (out, scale)
}

/// HF rotate-half: in each head, (x[i], x[i + hd/2]) turns by angle
/// (pos0 + row) · inv_freq[i], inv_freq[i] = 1 / theta^(2i/hd).
fn rope_ref(x: &[f32], width: usize, heads: usize, pos0: usize, theta: f32) -> Vec<f64> {
    let hd = width / heads;
    let half = hd / 2;
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (row, xs) in out.chunks_exact_mut(width).enumerate() {
        let pos = (pos0 + row) as f64;
        for head in xs.chunks_exact_mut(hd) {
            for i in 0..half {
                let inv_freq = 1.0 / (theta as f64).powf((2 * i) as f64 / hd as f64);
                let (sin, cos) = (pos * inv_freq).sin_cos();
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * cos - x2 * sin;
                head[i + half] = x2 * cos + x1 * sin;
            }
        }
    }
    out
}

/// out[i, h] = Σ_{j ≤ pos0+i} softmax_j(q[i,h]·k[j,g] / sqrt(hd)) v[j,g],
/// g = h / (heads / kv_heads). k and v rows past pos0 + n are never read.
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    pos0: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (width, kv_width) = (heads * hd, kv_heads * hd);
    let group = heads / kv_heads;
    let mut out = vec![0.0; n * width];
    let mut lse = vec![0.0; heads * n];
    for i in 0..n {
        for h in 0..heads {
            let g = h / group;
            let qh = &q[i * width + h * hd..][..hd];
            let scores: Vec<f64> = (0..=pos0 + i)
                .map(|j| {
                    let kj = &k[j * kv_width + g * hd..][..hd];
                    let dot: f64 = qh.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    dot / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            lse[h * n + i] = max + sum.ln();
            let o = &mut out[i * width + h * hd..][..hd];
            for (j, p) in weights.iter().enumerate() {
                let vj = &v[j * kv_width + g * hd..][..hd];
                for (o, &vv) in o.iter_mut().zip(vj) {
                    *o += p / sum * vv as f64;
                }
            }
        }
    }
    (out, lse)
}

/// silu(g) · u, silu(g) = g / (1 + e^−g).
fn swiglu_ref(gate: &[f32], up: &[f32]) -> Vec<f64> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            g / (1.0 + (-g).exp()) * u as f64
        })
        .collect()
}

fn add_ref(x: &[f32], y: &[f32]) -> Vec<f64> {
    x.iter()
        .zip(y)
        .map(|(&a, &b)| a as f64 + b as f64)
        .collect()
}

/// x − log Σ e^x, per row of width d.
fn log_softmax_ref(x: &[f32], d: usize) -> Vec<f64> {
    x.chunks_exact(d)
        .flat_map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row.iter().map(move |&v| v as f64 - lse)
        })
        .collect()
}

// ----- tests -----

#[test]
fn memory_upload_download_zeros() {
    let mut rng = seeded_rng();
    for shape in [
        vec![1, 1],
        vec![3, 5],
        vec![17, 129],
        vec![2, 3, 5],
        vec![33],
    ] {
        let what = format!("{shape:?}");
        let numel: usize = shape.iter().product();

        let z = Cpu.zeros_with_capacity(&shape, numel + SPARE, F32).unwrap();
        assert_eq!(
            (z.shape.as_slice(), z.buf.len()),
            (shape.as_slice(), numel + SPARE)
        );
        assert_eq!(Cpu.download(&z).unwrap(), vec![0.0; numel], "zeros {what}");
        assert_eq!(
            Cpu.download(&Cpu.zeros(&shape, F32).unwrap()).unwrap(),
            vec![0.0; numel]
        );

        let data = random_vec(&mut rng, numel, 10.0);
        let t = Cpu.upload(data.clone(), &shape, F32).unwrap();
        assert_eq!(Cpu.download(&t).unwrap(), data, "upload/download {what}");

        // A tensor with spare capacity downloads exactly its shape.
        let t = input(&data, &shape);
        assert_eq!(
            Cpu.download(&t).unwrap(),
            data,
            "download with spare {what}"
        );
        let (rows, cols) = t.rows_cols();
        for (row, count) in [
            (0, rows),
            (0, 1),
            (rows - 1, 1),
            (rows / 2, rows - rows / 2),
            (rows, 0),
        ] {
            let got = Cpu.download_rows(&t, row, count).unwrap();
            assert_eq!(
                got,
                data[row * cols..(row + count) * cols],
                "download_rows({row}, {count}) {what}"
            );
        }
    }
}

#[test]
fn copy_rows() {
    let mut rng = seeded_rng();
    for (dst_n, src_n, d) in [(1, 1, 5), (3, 17, 64), (33, 7, 129), (17, 17, 1)] {
        for _ in 0..4 {
            let rows = rng.random_range(0..=dst_n.min(src_n));
            let dst_row = rng.random_range(0..=dst_n - rows);
            let src_row = rng.random_range(0..=src_n - rows);
            let what = format!(
                "dst [{dst_n}, {d}] row {dst_row}, src [{src_n}, {d}] row {src_row}, {rows} rows"
            );

            let src_data = random_vec(&mut rng, src_n * d, 1.0);
            let dst_data = random_vec(&mut rng, dst_n * d, 1.0);
            let src = input(&src_data, &[src_n, d]);
            // Rows outside the copied range must keep their values, so the
            // destination starts random rather than NaN.
            let mut dst = output(&[dst_n, d]);
            dst.buf[..dst_n * d].copy_from_slice(&dst_data);
            Cpu.copy_rows(&mut dst, dst_row, &src, src_row, rows)
                .unwrap();

            let mut want: Vec<f64> = dst_data.iter().map(|&v| v as f64).collect();
            for (w, &s) in want[dst_row * d..][..rows * d]
                .iter_mut()
                .zip(&src_data[src_row * d..])
            {
                *w = s as f64;
            }
            check_output(&what, &dst, &want);
        }
    }
}

#[test]
fn embedding() {
    let mut rng = seeded_rng();
    for vocab in [1, 5, 50] {
        for d in [5, 64, 129] {
            for n in [1, 3, 17, 33] {
                let what = format!("vocab {vocab}, n {n}, d {d}");
                let table_data = random_vec(&mut rng, vocab * d, 1.0);
                let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
                let table = input(&table_data, &[vocab, d]);
                let mut out = output(&[n, d]);
                Cpu.embedding(&mut out, &ids, &table).unwrap();
                check_output(&what, &out, &embedding_ref(&ids, &table_data, d));
            }
        }
    }
}

#[test]
fn rmsnorm() {
    let mut rng = seeded_rng();
    for d in [1, 5, 64, 129, 20000] {
        for n in [1, 3, 17, 33] {
            for eps in [1e-5, 1e-6] {
                let what = format!("n {n}, d {d}, eps {eps}");
                // Rows of very different scales, so eps matters in some.
                let mut x_data = Vec::with_capacity(n * d);
                for _ in 0..n {
                    let scale = [1e-3, 1.0, 30.0][rng.random_range(0..3)];
                    x_data.extend(random_vec(&mut rng, d, 1.0).iter().map(|v| v * scale));
                }
                let w_data = random_vec(&mut rng, d, 2.0);
                let (x, w) = (input(&x_data, &[n, d]), input(&w_data, &[d]));
                let mut out = output(&[n, d]);
                Cpu.rmsnorm(&mut out, &x, &w, eps).unwrap();
                check_output(&what, &out, &rmsnorm_ref(&x_data, &w_data, eps));
            }
        }
    }
    // Leading dims fold into rows.
    let x_data = random_vec(&mut rng, 2 * 3 * 17, 1.0);
    let w_data = random_vec(&mut rng, 17, 1.0);
    let mut out = output(&[2, 3, 17]);
    Cpu.rmsnorm(
        &mut out,
        &input(&x_data, &[2, 3, 17]),
        &input(&w_data, &[17]),
        1e-6,
    )
    .unwrap();
    check_output("[2, 3, 17]", &out, &rmsnorm_ref(&x_data, &w_data, 1e-6));
}

#[test]
fn matmul_nt() {
    let mut rng = seeded_rng();
    let sizes = [1, 7, 31, 64, 130];
    let mut shapes: Vec<(usize, usize, usize)> = Vec::new();
    for n in sizes {
        for m in sizes {
            for k in sizes {
                shapes.push((n, m, k));
            }
        }
    }
    // Large k: still 1e-5, as f32 accumulation over 4096 random terms stays far
    // below that relative to the largest output.
    //
    // The scale is max|ref| as elsewhere, but never below max Σ_l|x·w| / sqrt(k),
    // the typical size of a dot product of these terms. f32 rounding of a dot
    // product scales with Σ|x·w|, not with |Σ x·w|, and an output with one or a
    // few elements (n = m = 1) can cancel to near zero by chance, and measured
    // against max|ref| alone it then flirts with 1e-5 (seen: [1, 1] with
    // k = 130, |ref| = 0.053, relative error 9.8e-6; typical 1e-7). For
    // outputs of many elements the floor sits below max|ref| (≈ 0.75σ against
    // 3σ for uniform inputs), so it loosens nothing there.
    shapes.extend([(3, 5, 4096), (33, 17, 4099), (1, 129, 2048)]);
    for (n, m, k) in shapes {
        let what = format!("out [{n}, {m}] = x [{n}, {k}] · w [{m}, {k}]ᵀ");
        let x_data = random_vec(&mut rng, n * k, 1.0);
        let w_data = random_vec(&mut rng, m * k, 1.0);
        let (x, w) = (input(&x_data, &[n, k]), input(&w_data, &[m, k]));
        let mut out = output(&[n, m]);
        Cpu.matmul_nt(&mut out, &x, &w).unwrap();
        let (want, scale) = matmul_nt_ref(&x_data, &w_data, n, m, k);
        common::assert_close_to_scale(&what, &Cpu.download(&out).unwrap(), &want, scale, TOL);
        common::assert_spare_untouched(&what, &out);
    }
}

#[test]
fn matmul_nt_same_result_on_1_and_2_threads() {
    let mut rng = seeded_rng();
    let pool = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    };
    let (one, two) = (pool(1), pool(2));
    // Big enough that the CPU device splits the work when it has threads.
    for (n, m, k) in [
        (130, 130, 130),
        (7, 130, 64),
        (33, 257, 129),
        (64, 31, 4096),
    ] {
        let x = input(&random_vec(&mut rng, n * k, 1.0), &[n, k]);
        let w = input(&random_vec(&mut rng, m * k, 1.0), &[m, k]);
        let run = |pool: &rayon::ThreadPool| {
            let mut out = output(&[n, m]);
            pool.install(|| Cpu.matmul_nt(&mut out, &x, &w)).unwrap();
            Cpu.download(&out).unwrap()
        };
        let (a, b) = (run(&one), run(&two));
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "[{n}, {m}, {k}]: {differ} elements differ between 1 and 2 threads"
        );
    }
}

#[test]
fn rope() {
    let mut rng = seeded_rng();
    // Positions stay below ~64: the op computes angle = pos · inv_freq in f32,
    // as HF does, whose rounding (about pos · 2⁻²⁴ rad) against this f64
    // reference would exceed 1e-5 at positions in the hundreds.
    for heads in [1, 3] {
        for hd in [2, 6, 64] {
            for n in [1, 3, 17] {
                for pos0 in [0, 5, 20] {
                    for theta in [10000.0, 500000.0] {
                        let what =
                            format!("heads {heads}, hd {hd}, n {n}, pos0 {pos0}, theta {theta}");
                        let width = heads * hd;
                        let x_data = random_vec(&mut rng, n * width, 1.0);
                        // In place: x's spare capacity holds the sentinel.
                        let mut x = output(&[n, width]);
                        x.buf[..n * width].copy_from_slice(&x_data);
                        Cpu.rope(&mut x, heads, pos0, theta).unwrap();
                        check_output(&what, &x, &rope_ref(&x_data, width, heads, pos0, theta));
                    }
                }
            }
        }
    }
}

#[test]
fn attention() {
    let mut rng = seeded_rng();
    for (heads, kv_heads) in [(4, 4), (4, 2), (9, 3), (6, 1)] {
        for hd in [8, 64] {
            for pos0 in [0, 5] {
                for n in [1, 7, 33] {
                    let what = format!("heads {heads}/{kv_heads}, hd {hd}, pos0 {pos0}, n {n}");
                    let (width, kv_width) = (heads * hd, kv_heads * hd);
                    // The cache has rows past pos0 + n; they hold NaN, as the
                    // op must not read them.
                    let capacity = pos0 + n + 3;
                    let valid = (pos0 + n) * kv_width;
                    let q_data = random_vec(&mut rng, n * width, 2.0);
                    let mut k_data = random_vec(&mut rng, capacity * kv_width, 2.0);
                    let mut v_data = random_vec(&mut rng, capacity * kv_width, 1.0);
                    k_data[valid..].fill(f32::NAN);
                    v_data[valid..].fill(f32::NAN);
                    let q = input(&q_data, &[n, width]);
                    let k = input(&k_data, &[capacity, kv_width]);
                    let v = input(&v_data, &[capacity, kv_width]);
                    let mut out = output(&[n, width]);
                    let mut lse = output(&[heads, n]);
                    Cpu.attention(&mut out, Some(&mut lse), &q, &k, &v, heads, kv_heads, pos0)
                        .unwrap();
                    let (want, want_lse) =
                        attention_ref(&q_data, &k_data, &v_data, n, heads, kv_heads, hd, pos0);
                    check_output(&what, &out, &want);
                    check_output(&format!("{what}: lse"), &lse, &want_lse);
                }
            }
        }
    }
}

#[test]
fn swiglu() {
    let mut rng = seeded_rng();
    for n in [1, 3, 17, 33] {
        for f in [5, 64, 129] {
            let what = format!("n {n}, f {f}");
            // Wide gate range to reach both tails of silu.
            let gate_data = random_vec(&mut rng, n * f, 20.0);
            let up_data = random_vec(&mut rng, n * f, 1.0);
            let (gate, up) = (input(&gate_data, &[n, f]), input(&up_data, &[n, f]));
            let mut out = output(&[n, f]);
            Cpu.swiglu(&mut out, &gate, &up).unwrap();
            check_output(&what, &out, &swiglu_ref(&gate_data, &up_data));
        }
    }
    // Past one 16384-element task of the CPU device.
    let gate_data = random_vec(&mut rng, 3 * 20000, 20.0);
    let up_data = random_vec(&mut rng, 3 * 20000, 1.0);
    let mut out = output(&[3, 20000]);
    Cpu.swiglu(
        &mut out,
        &input(&gate_data, &[3, 20000]),
        &input(&up_data, &[3, 20000]),
    )
    .unwrap();
    check_output("n 3, f 20000", &out, &swiglu_ref(&gate_data, &up_data));
}

#[test]
fn add_assign() {
    let mut rng = seeded_rng();
    for n in [1, 3, 17, 33] {
        for d in [5, 64, 129] {
            let what = format!("n {n}, d {d}");
            let x_data = random_vec(&mut rng, n * d, 1.0);
            let y_data = random_vec(&mut rng, n * d, 1.0);
            let mut x = output(&[n, d]);
            x.buf[..n * d].copy_from_slice(&x_data);
            Cpu.add_assign(&mut x, &input(&y_data, &[n, d])).unwrap();
            check_output(&what, &x, &add_ref(&x_data, &y_data));
        }
    }
}

#[test]
fn add_scaled_and_zero() {
    let mut rng = seeded_rng();
    let (n, d) = (17, 129);
    let x_data = random_vec(&mut rng, n * d, 1.0);
    let y_data = random_vec(&mut rng, n * d, 1.0);
    let mut x = output(&[n, d]);
    x.buf[..n * d].copy_from_slice(&x_data);
    Cpu.add_scaled(&mut x, &input(&y_data, &[n, d]), -0.625)
        .unwrap();
    let scaled: Vec<f32> = y_data.iter().map(|v| -0.625 * v).collect();
    check_output("add_scaled", &x, &add_ref(&x_data, &scaled));
    Cpu.zero(&mut x).unwrap();
    assert!(x.buf[..n * d].iter().all(|&v| v == 0.0));
}

/// Inverted dropout keeps about 1 − p of the elements, scales them by
/// 1/(1 − p), and draws the same mask for the same seed (so its backward,
/// the same call on the gradient, zeroes the same elements).
#[test]
fn dropout_mask_is_seeded_and_scaled() {
    let n = 64 * 1000;
    let ones = vec![1.0f32; n];
    let p = 0.25;
    let mut a = input(&ones, &[64, 1000]);
    Cpu.dropout(&mut a, p, 7).unwrap();
    let kept = a.buf[..n].iter().filter(|&&v| v != 0.0).count();
    assert!(a.buf[..n].iter().all(|&v| v == 0.0 || v == 1.0 / (1.0 - p)));
    let frac = kept as f64 / n as f64;
    assert!((frac - 0.75).abs() < 0.01, "kept {frac}");
    let mut b = input(&ones, &[64, 1000]);
    Cpu.dropout(&mut b, p, 7).unwrap();
    assert_eq!(a.buf[..n], b.buf[..n], "same seed, same mask");
    let mut c = input(&ones, &[64, 1000]);
    Cpu.dropout(&mut c, p, 8).unwrap();
    assert_ne!(a.buf[..n], c.buf[..n], "another seed, another mask");
    let mut d = input(&ones, &[64, 1000]);
    Cpu.dropout(&mut d, 0.0, 7).unwrap();
    assert_eq!(d.buf[..n], ones[..], "p = 0 is the identity");
}

#[test]
fn log_softmax() {
    let mut rng = seeded_rng();
    for n in [1, 3, 17, 33] {
        for d in [1, 5, 64, 129, 32769] {
            let what = format!("n {n}, d {d}");
            let x_data = random_vec(&mut rng, n * d, 10.0);
            let mut out = output(&[n, d]);
            Cpu.log_softmax(&mut out, &input(&x_data, &[n, d])).unwrap();
            check_output(&what, &out, &log_softmax_ref(&x_data, d));
        }
    }
}
