//! Every backward op of `Backend` on the CPU device against central finite
//! differences of its forward, and AdamW against torch.optim.AdamW.
//!
//! The forwards for the finite differences are written here in f64, straight
//! from the math of the trait's doc comments, and evaluated at the same f32
//! inputs the op sees. For a forward F and a random cotangent dout, the scalar
//! L(x) = Σ dout ∘ F(x) has ∂L/∂x = the gradient the backward computes; the
//! test takes (L(x + h) − L(x − h)) / 2h per element with h = 1e-5. In f64
//! that is exact to ~h²·L‴ ≈ 1e-10 (truncation) plus ~1e-16·|L|/h ≈ 1e-11
//! (rounding), far below the f32 tolerance, so what is measured is the f32
//! backward's own error.
//!
//! Tolerance: as in tests/cpu_ops.rs, f32 relative error ≤ 1e-5 per gradient
//! tensor, max|got − want| / max|want|. Inputs are random and fresh each run
//! (the seed is printed; `CPU_BACKWARD_SEED=<seed>` replays it). Overwritten
//! gradients are poisoned with NaN before the call; accumulated ones start
//! from random values, and the check is `init + gradient`; every tensor has
//! spare capacity past its shape (NaN in inputs, a sentinel in outputs).

mod common;
use common::{SENTINEL, SPARE};

use engine::backend::cpu::Cpu;
use engine::backend::{AdamW, AdamWTensors, Backend, IGNORE};
use engine::tensor::DType::F32;
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::Rng;

const TOL: f64 = 1e-5;
/// The finite-difference step.
const H: f64 = 1e-5;

// ----- helpers -----

fn seeded_rng() -> StdRng {
    common::seeded_rng("CPU_BACKWARD_SEED")
}

fn random_vec(rng: &mut StdRng, len: usize, bound: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-bound..bound)).collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn input(data: &[f32], shape: &[usize]) -> Tensor<Cpu> {
    common::cpu_input(data, shape)
}

fn poisoned(shape: &[usize]) -> Tensor<Cpu> {
    common::cpu_poisoned(shape)
}

/// A gradient the op accumulates into: `init`, the sentinel past the shape.
fn accumulator(init: &[f32], shape: &[usize]) -> Tensor<Cpu> {
    let mut t = Cpu
        .zeros_with_capacity(shape, init.len() + SPARE, F32)
        .unwrap();
    t.buf[..init.len()].copy_from_slice(init);
    t.buf[init.len()..].fill(SENTINEL);
    t
}

/// Checks a gradient tensor: `init + grad` if it accumulates (init given),
/// else `grad`; and that its spare capacity still holds the sentinel.
fn check_grad(what: &str, t: &Tensor<Cpu>, init: Option<&[f32]>, grad: &[f64]) {
    let want: Vec<f64> = match init {
        Some(init) => init.iter().zip(grad).map(|(&i, g)| i as f64 + g).collect(),
        None => grad.to_vec(),
    };
    common::check_cpu_output(what, t, &want, TOL);
}

/// Central differences of the scalar `loss` at `x`, element by element.
fn fd(x: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + H;
            let up = loss(&x);
            x[i] = x0 - H;
            let down = loss(&x);
            x[i] = x0;
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// Σ dout ∘ y.
fn contract(dout: &[f64], y: &[f64]) -> f64 {
    assert_eq!(dout.len(), y.len());
    dout.iter().zip(y).map(|(a, b)| a * b).sum()
}

// ----- forwards in f64 -----

fn embedding_f64(ids: &[u32], table: &[f64], d: usize) -> Vec<f64> {
    ids.iter()
        .flat_map(|&id| table[id as usize * d..][..d].iter().copied())
        .collect()
}

fn rmsnorm_f64(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let d = w.len();
    x.chunks_exact(d)
        .flat_map(|row| {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            row.iter().zip(w).map(move |(x, w)| x * r * w)
        })
        .collect()
}

/// out[n, m] = x[n, k] · w[m, k]ᵀ.
fn matmul_nt_f64(x: &[f64], w: &[f64], n: usize, m: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
        }
    }
    out
}

/// The angles of the CPU rope, formed as it forms them (inv_freq and the
/// product in f32), so the reference differentiates the same rotation.
fn rope_angle(pos: usize, i: usize, hd: usize, theta: f32) -> f64 {
    let inv_freq = 1.0 / theta.powf((2 * i) as f32 / hd as f32);
    (pos as f32 * inv_freq) as f64
}

fn rope_f64(x: &[f64], width: usize, heads: usize, pos0: usize, theta: f32) -> Vec<f64> {
    let hd = width / heads;
    let half = hd / 2;
    let mut out = x.to_vec();
    for (r, row) in out.chunks_exact_mut(width).enumerate() {
        for head in row.chunks_exact_mut(hd) {
            for i in 0..half {
                let (sin, cos) = rope_angle(pos0 + r, i, hd, theta).sin_cos();
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * cos - x2 * sin;
                head[i + half] = x2 * cos + x1 * sin;
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug)]
struct Att {
    n: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    pos0: usize,
}

/// Causal GQA: out[i,h] = Σ_{j ≤ pos0+i} softmax_j(q[i,h]·k[j,g]/sqrt(hd)) v[j,g].
fn attention_f64(q: &[f64], k: &[f64], v: &[f64], a: Att) -> Vec<f64> {
    let (width, kv_width) = (a.heads * a.hd, a.kv_heads * a.hd);
    let group = a.heads / a.kv_heads;
    let mut out = vec![0.0; a.n * width];
    for i in 0..a.n {
        for h in 0..a.heads {
            let g = h / group;
            let qh = &q[i * width + h * a.hd..][..a.hd];
            let s: Vec<f64> = (0..=a.pos0 + i)
                .map(|j| {
                    let kj = &k[j * kv_width + g * a.hd..][..a.hd];
                    contract(qh, kj) / (a.hd as f64).sqrt()
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, e) in e.iter().enumerate() {
                for c in 0..a.hd {
                    out[i * width + h * a.hd + c] += e / sum * v[j * kv_width + g * a.hd + c];
                }
            }
        }
    }
    out
}

fn silu_f64(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// Σ over counted rows of logsumexp(x) − x[t].
fn cross_entropy_f64(logits: &[f64], targets: &[u32], vocab: usize) -> f64 {
    logits
        .chunks_exact(vocab)
        .zip(targets)
        .filter(|(_, &t)| t != IGNORE)
        .map(|(x, &t)| {
            let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln() - x[t as usize]
        })
        .sum()
}

// ----- tests -----

#[test]
fn embedding_backward_scatters_and_accumulates() {
    let mut rng = seeded_rng();
    for (n, vocab, d) in [(1, 1, 1), (5, 3, 7), (40, 17, 33)] {
        let what = format!("n {n} vocab {vocab} d {d}");
        // repeated ids on purpose: n > vocab in two of the cases
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        let table = random_vec(&mut rng, vocab * d, 1.0);
        let dout = random_vec(&mut rng, n * d, 1.0);
        let init = random_vec(&mut rng, vocab * d, 1.0);
        let mut dtable = accumulator(&init, &[vocab, d]);
        Cpu.embedding_backward(&mut dtable, &input(&dout, &[n, d]), &ids)
            .unwrap();
        let dout64 = f64s(&dout);
        let want = fd(&f64s(&table), |t| {
            contract(&dout64, &embedding_f64(&ids, t, d))
        });
        check_grad(&format!("{what}: dtable"), &dtable, Some(&init), &want);
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut rng = seeded_rng();
    for (n, d) in [(1, 1), (3, 7), (5, 64), (9, 130)] {
        let what = format!("[{n}, {d}]");
        let eps = 1e-5;
        let x = random_vec(&mut rng, n * d, 2.0);
        let w = random_vec(&mut rng, d, 1.5);
        let dout = random_vec(&mut rng, n * d, 1.0);
        let (dx0, dw0) = (
            random_vec(&mut rng, n * d, 1.0),
            random_vec(&mut rng, d, 1.0),
        );
        let mut dx = accumulator(&dx0, &[n, d]);
        let mut dw = accumulator(&dw0, &[d]);
        Cpu.rmsnorm_backward(
            &mut dx,
            &mut dw,
            &input(&dout, &[n, d]),
            &input(&x, &[n, d]),
            &input(&w, &[d]),
            eps,
        )
        .unwrap();
        let (x64, w64, dout64) = (f64s(&x), f64s(&w), f64s(&dout));
        let eps = eps as f64;
        let want_dx = fd(&x64, |x| contract(&dout64, &rmsnorm_f64(x, &w64, eps)));
        let want_dw = fd(&w64, |w| contract(&dout64, &rmsnorm_f64(&x64, w, eps)));
        check_grad(&format!("{what}: dx"), &dx, Some(&dx0), &want_dx);
        check_grad(&format!("{what}: dweight"), &dw, Some(&dw0), &want_dw);
    }
}

#[test]
fn matmul_nt_backward_matches_finite_differences() {
    let mut rng = seeded_rng();
    // Ragged sizes; 70 and 130 rows span several of the op's row blocks.
    for (n, m, k) in [(1, 1, 1), (3, 5, 7), (70, 33, 19), (5, 130, 9)] {
        let what = format!("n {n} m {m} k {k}");
        let x = random_vec(&mut rng, n * k, 1.0);
        let w = random_vec(&mut rng, m * k, 1.0);
        let dout = random_vec(&mut rng, n * m, 1.0);
        let (dx0, dw0) = (
            random_vec(&mut rng, n * k, 1.0),
            random_vec(&mut rng, m * k, 1.0),
        );
        let (xt, wt, dt) = (
            input(&x, &[n, k]),
            input(&w, &[m, k]),
            input(&dout, &[n, m]),
        );
        let mut dx = accumulator(&dx0, &[n, k]);
        let mut dw = accumulator(&dw0, &[m, k]);
        Cpu.matmul_nt_backward(&mut dx, Some(&mut dw), &dt, &xt, &wt)
            .unwrap();
        let (x64, w64, dout64) = (f64s(&x), f64s(&w), f64s(&dout));
        let want_dx = fd(&x64, |x| {
            contract(&dout64, &matmul_nt_f64(x, &w64, n, m, k))
        });
        let want_dw = fd(&w64, |w| {
            contract(&dout64, &matmul_nt_f64(&x64, w, n, m, k))
        });
        check_grad(&format!("{what}: dx"), &dx, Some(&dx0), &want_dx);
        check_grad(&format!("{what}: dw"), &dw, Some(&dw0), &want_dw);

        // A frozen weight: only dx, accumulated the same way.
        let mut dx = accumulator(&dx0, &[n, k]);
        Cpu.matmul_nt_backward(&mut dx, None, &dt, &xt, &wt)
            .unwrap();
        check_grad(&format!("{what}: dx, frozen w"), &dx, Some(&dx0), &want_dx);
    }
}

#[test]
fn rope_backward_matches_finite_differences() {
    let mut rng = seeded_rng();
    for (n, heads, hd, pos0, theta) in [
        (1, 1, 2, 0, 10000.0),
        (4, 3, 8, 0, 10000.0),
        (5, 2, 16, 37, 100000.0),
        (3, 4, 6, 1000, 500000.0),
    ] {
        let what = format!("n {n} heads {heads} hd {hd} pos0 {pos0}");
        let width = heads * hd;
        let x = random_vec(&mut rng, n * width, 1.0);
        let dout = random_vec(&mut rng, n * width, 1.0);
        // in place: dx holds dout on the way in
        let mut dx = input(&dout, &[n, width]);
        dx.buf[n * width..].fill(SENTINEL);
        Cpu.rope_backward(&mut dx, heads, pos0, theta).unwrap();
        let dout64 = f64s(&dout);
        let want = fd(&f64s(&x), |x| {
            contract(&dout64, &rope_f64(x, width, heads, pos0, theta))
        });
        check_grad(&format!("{what}: dx"), &dx, None, &want);
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = seeded_rng();
    for a in [
        Att {
            n: 1,
            heads: 1,
            kv_heads: 1,
            hd: 4,
            pos0: 0,
        },
        Att {
            n: 5,
            heads: 4,
            kv_heads: 2,
            hd: 8,
            pos0: 3,
        },
        Att {
            n: 9,
            heads: 6,
            kv_heads: 2,
            hd: 6,
            pos0: 0,
        },
        Att {
            n: 7,
            heads: 3,
            kv_heads: 3,
            hd: 5,
            pos0: 11,
        },
        Att {
            n: 4,
            heads: 6,
            kv_heads: 1,
            hd: 4,
            pos0: 2,
        },
        // n ≥ 8 takes the per-head matrix products, here with a cache prefix
        Att {
            n: 12,
            heads: 6,
            kv_heads: 2,
            hd: 8,
            pos0: 5,
        },
    ] {
        let what = format!("{a:?}");
        let (width, kv_width) = (a.heads * a.hd, a.kv_heads * a.hd);
        let len = a.pos0 + a.n;
        let capacity = len + 3; // cache rows past pos0 + n: never read or written
        let q = random_vec(&mut rng, a.n * width, 1.5);
        let k = random_vec(&mut rng, capacity * kv_width, 1.5);
        let v = random_vec(&mut rng, capacity * kv_width, 1.0);
        let dout = random_vec(&mut rng, a.n * width, 1.0);
        let (dk0, dv0) = (
            random_vec(&mut rng, capacity * kv_width, 1.0),
            random_vec(&mut rng, capacity * kv_width, 1.0),
        );
        let mut kt = input(&k, &[capacity, kv_width]);
        let mut vt = input(&v, &[capacity, kv_width]);
        // rows past pos0 + n are NaN: reading them would show
        kt.buf[len * kv_width..].fill(f32::NAN);
        vt.buf[len * kv_width..].fill(f32::NAN);
        let qt = input(&q, &[a.n, width]);
        // the forward's output and log-sum-exp, which the backward reads
        let mut out = poisoned(&[a.n, width]);
        let mut lse = poisoned(&[a.heads, a.n]);
        Cpu.attention(
            &mut out,
            Some(&mut lse),
            &qt,
            &kt,
            &vt,
            a.heads,
            a.kv_heads,
            a.pos0,
        )
        .unwrap();
        let mut dq = poisoned(&[a.n, width]);
        let mut dk = accumulator(&dk0, &[capacity, kv_width]);
        let mut dv = accumulator(&dv0, &[capacity, kv_width]);
        Cpu.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &input(&dout, &[a.n, width]),
            &qt,
            &kt,
            &vt,
            &out,
            &lse,
            a.heads,
            a.kv_heads,
            a.pos0,
        )
        .unwrap();
        let (q64, dout64) = (f64s(&q), f64s(&dout));
        let (k64, v64) = (f64s(&k[..len * kv_width]), f64s(&v[..len * kv_width]));
        let want_dq = fd(&q64, |q| {
            contract(&dout64, &attention_f64(q, &k64, &v64, a))
        });
        let mut want_dk = fd(&k64, |k| {
            contract(&dout64, &attention_f64(&q64, k, &v64, a))
        });
        let mut want_dv = fd(&v64, |v| {
            contract(&dout64, &attention_f64(&q64, &k64, v, a))
        });
        // no gradient for the rows past pos0 + n
        want_dk.resize(capacity * kv_width, 0.0);
        want_dv.resize(capacity * kv_width, 0.0);
        check_grad(&format!("{what}: dq"), &dq, None, &want_dq);
        check_grad(&format!("{what}: dk"), &dk, Some(&dk0), &want_dk);
        check_grad(&format!("{what}: dv"), &dv, Some(&dv0), &want_dv);
    }
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let mut rng = seeded_rng();
    for (n, f) in [(1, 1), (3, 7), (6, 65)] {
        let what = format!("[{n}, {f}]");
        let gate = random_vec(&mut rng, n * f, 4.0);
        let up = random_vec(&mut rng, n * f, 2.0);
        let dout = random_vec(&mut rng, n * f, 1.0);
        let mut dgate = poisoned(&[n, f]);
        let mut dup = poisoned(&[n, f]);
        Cpu.swiglu_backward(
            &mut dgate,
            &mut dup,
            &input(&dout, &[n, f]),
            &input(&gate, &[n, f]),
            &input(&up, &[n, f]),
        )
        .unwrap();
        let (g64, u64_, dout64) = (f64s(&gate), f64s(&up), f64s(&dout));
        let fwd = |g: &[f64], u: &[f64]| -> Vec<f64> {
            g.iter().zip(u).map(|(&g, &u)| silu_f64(g) * u).collect()
        };
        let want_dg = fd(&g64, |g| contract(&dout64, &fwd(g, &u64_)));
        let want_du = fd(&u64_, |u| contract(&dout64, &fwd(&g64, u)));
        check_grad(&format!("{what}: dgate"), &dgate, None, &want_dg);
        check_grad(&format!("{what}: dup"), &dup, None, &want_du);
    }
}

#[test]
fn cross_entropy_loss_and_gradient() {
    let mut rng = seeded_rng();
    // (rows, vocab, how many rows ignored, given scale)
    for (n, vocab, ignored, scale) in [
        (1, 1, 0, None),
        (4, 7, 1, None),
        (9, 300, 4, None),
        (5, 50, 2, Some(0.125f32)),
        (3, 11, 3, None), // every row ignored
    ] {
        let what = format!("n {n} vocab {vocab} ignored {ignored} scale {scale:?}");
        let logits = random_vec(&mut rng, n * vocab, 6.0);
        let mut targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        let mut rows: Vec<usize> = (0..n).collect();
        for _ in 0..ignored {
            let r = rows.swap_remove(rng.random_range(0..rows.len()));
            targets[r] = IGNORE;
        }
        let counted = n - ignored;
        let lt = input(&logits, &[n, vocab]);
        let mut dl = poisoned(&[n, vocab]);
        let loss = Cpu
            .cross_entropy(Some(&mut dl), &lt, &targets, scale)
            .unwrap();
        let logits64 = f64s(&logits);
        let want_loss = cross_entropy_f64(&logits64, &targets, vocab);
        common::assert_close_f64(&format!("{what}: loss"), &[loss], &[want_loss], TOL);
        // the loss alone, without the gradient
        let loss_only = Cpu.cross_entropy(None, &lt, &targets, scale).unwrap();
        assert_eq!(loss_only, loss, "{what}: loss without dlogits");

        let s = match scale {
            Some(s) => s as f64,
            None if counted == 0 => 0.0,
            None => 1.0 / counted as f64,
        };
        let want = fd(&logits64, |x| s * cross_entropy_f64(x, &targets, vocab));
        if counted == 0 {
            assert!(dl.buf[..n * vocab].iter().all(|&g| g == 0.0), "{what}");
        } else {
            check_grad(&format!("{what}: dlogits"), &dl, None, &want);
        }
        // ignored rows are exactly zero, not merely small
        for (r, &t) in targets.iter().enumerate() {
            if t == IGNORE {
                assert!(dl.buf[r * vocab..(r + 1) * vocab].iter().all(|&g| g == 0.0));
            }
        }
    }
}

#[test]
fn adamw_matches_torch() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adamw.json");
    let text = std::fs::read_to_string(path).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let cases = golden["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for (c, case) in cases.iter().enumerate() {
        let hp = |name: &str| case[name].as_f64().unwrap();
        let shapes: Vec<Vec<usize>> = case["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect()
            })
            .collect();
        let init = case["init"].as_array().unwrap();
        let mut state: Vec<[Tensor<Cpu>; 3]> = shapes
            .iter()
            .zip(init)
            .map(|(shape, p)| {
                let p = floats(p);
                let zeros = vec![0.0; p.len()];
                [
                    accumulator(&p, shape),
                    accumulator(&zeros, shape),
                    accumulator(&zeros, shape),
                ]
            })
            .collect();
        for (s, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let adamw = AdamW {
                lr: hp("lr"),
                beta1: hp("beta1"),
                beta2: hp("beta2"),
                eps: hp("eps"),
                weight_decay: hp("weight_decay"),
                step: s as u64 + 1,
            };
            let grads: Vec<Tensor<Cpu>> = (0..state.len())
                .map(|t| input(&floats(&step["grads"][t]), &shapes[t]))
                .collect();
            let mut tensors: Vec<AdamWTensors<Cpu>> = state
                .iter_mut()
                .zip(&grads)
                .map(|([param, m, v], grad)| AdamWTensors {
                    param,
                    m,
                    v,
                    grad,
                    copy: None,
                })
                .collect();
            Cpu.adamw_step(&mut tensors, &adamw).unwrap();
            for (t, [p, m, v]) in state.iter().enumerate() {
                for (name, got) in [("params", p), ("m", m), ("v", v)] {
                    let want = f64s(&floats(&step[name][t]));
                    let what = format!("case {c} step {} tensor {t}: {name}", s + 1);
                    common::assert_close_f64(&what, &got.buf[..got.numel()], &want, 1e-6);
                }
            }
        }
    }
}

// ----- a whole 1-layer Llama, forward and backward -----

/// The tiny model of `llama_block_gradients`: sizes and parameter order.
#[derive(Clone, Copy)]
struct Tiny {
    vocab: usize,
    d: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    f: usize,
    eps: f32,
    theta: f32,
}

const NAMES: [&str; 11] = [
    "embed",
    "attn_norm",
    "wq",
    "wk",
    "wv",
    "wo",
    "ffn_norm",
    "w_gate",
    "w_up",
    "w_down",
    "norm",
];

impl Tiny {
    fn shapes(&self) -> [Vec<usize>; 11] {
        let (d, f) = (self.d, self.f);
        let (qw, kvw) = (self.heads * self.hd, self.kv_heads * self.hd);
        [
            vec![self.vocab, d],
            vec![d],
            vec![qw, d],
            vec![kvw, d],
            vec![kvw, d],
            vec![d, qw],
            vec![d],
            vec![f, d],
            vec![f, d],
            vec![d, f],
            vec![d],
        ]
    }

    /// The mean loss over counted targets, in f64 (the model's forward as
    /// src/model/llama.rs runs it, tied embeddings, then cross-entropy).
    fn loss_f64(&self, p: &[Vec<f64>], ids: &[u32], targets: &[u32]) -> f64 {
        let (n, d, f, v) = (ids.len(), self.d, self.f, self.vocab);
        let (qw, kvw) = (self.heads * self.hd, self.kv_heads * self.hd);
        let eps = self.eps as f64;
        let att = Att {
            n,
            heads: self.heads,
            kv_heads: self.kv_heads,
            hd: self.hd,
            pos0: 0,
        };
        let mut x = embedding_f64(ids, &p[0], d);
        let h = rmsnorm_f64(&x, &p[1], eps);
        let q = rope_f64(
            &matmul_nt_f64(&h, &p[2], n, qw, d),
            qw,
            self.heads,
            0,
            self.theta,
        );
        let k = rope_f64(
            &matmul_nt_f64(&h, &p[3], n, kvw, d),
            kvw,
            self.kv_heads,
            0,
            self.theta,
        );
        let vv = matmul_nt_f64(&h, &p[4], n, kvw, d);
        let o = attention_f64(&q, &k, &vv, att);
        let proj = matmul_nt_f64(&o, &p[5], n, d, qw);
        x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        let h = rmsnorm_f64(&x, &p[6], eps);
        let gate = matmul_nt_f64(&h, &p[7], n, f, d);
        let up = matmul_nt_f64(&h, &p[8], n, f, d);
        let act: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&g, u)| silu_f64(g) * u)
            .collect();
        let proj = matmul_nt_f64(&act, &p[9], n, d, f);
        x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        let hf = rmsnorm_f64(&x, &p[10], eps);
        let logits = matmul_nt_f64(&hf, &p[0], n, v, d);
        let counted = targets.iter().filter(|&&t| t != IGNORE).count();
        cross_entropy_f64(&logits, targets, v) / counted as f64
    }
}

/// The forward and backward of a 1-layer Llama written as llm.c writes
/// them, a flat list of op calls and the same list reversed, checked against
/// finite differences of the f64 model for every parameter. This checks how
/// the ops fit together: which gradients accumulate, the residual stream,
/// the tied embedding's two uses, GQA and the ignored target.
///
/// The same 1e-5 tolerance holds for the whole chain of about twenty f32
/// ops: at these sizes each op is within ~1e-6 of exact.
#[test]
fn llama_block_gradients_match_finite_differences() {
    let mut rng = seeded_rng();
    let c = Tiny {
        vocab: 11,
        d: 8,
        heads: 4,
        kv_heads: 2,
        hd: 4,
        f: 12,
        eps: 1e-5,
        theta: 10000.0,
    };
    let n = 7;
    let (d, f, v) = (c.d, c.f, c.vocab);
    let (qw, kvw) = (c.heads * c.hd, c.kv_heads * c.hd);
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    let mut targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    targets[2] = IGNORE;
    let shapes = c.shapes();
    let params: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| {
            let numel = s.iter().product();
            if s.len() == 1 {
                // norm weights near 1, as trained models have them
                (0..numel).map(|_| rng.random_range(0.5..1.5)).collect()
            } else {
                random_vec(&mut rng, numel, 0.6)
            }
        })
        .collect();

    let be = Cpu;
    let up = |data: &[f32], shape: &[usize]| be.upload(data.to_vec(), shape, F32).unwrap();
    let zeros = |shape: &[usize]| be.zeros(shape, F32).unwrap();
    let w: Vec<Tensor<Cpu>> = params.iter().zip(&shapes).map(|(p, s)| up(p, s)).collect();
    let mut g: Vec<Tensor<Cpu>> = shapes.iter().map(|s| zeros(s)).collect();
    let [embed, attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down, norm] = &w[..] else {
        unreachable!()
    };

    // forward (activations kept for the backward)
    let mut x0 = zeros(&[n, d]);
    be.embedding(&mut x0, &ids, embed).unwrap();
    let mut h1 = zeros(&[n, d]);
    be.rmsnorm(&mut h1, &x0, attn_norm, c.eps).unwrap();
    let (mut q, mut k, mut vv) = (zeros(&[n, qw]), zeros(&[n, kvw]), zeros(&[n, kvw]));
    be.matmul_nt(&mut q, &h1, wq).unwrap();
    be.matmul_nt(&mut k, &h1, wk).unwrap();
    be.matmul_nt(&mut vv, &h1, wv).unwrap();
    be.rope(&mut q, c.heads, 0, c.theta).unwrap();
    be.rope(&mut k, c.kv_heads, 0, c.theta).unwrap();
    let mut att = zeros(&[n, qw]);
    let mut lse = zeros(&[c.heads, n]);
    be.attention(
        &mut att,
        Some(&mut lse),
        &q,
        &k,
        &vv,
        c.heads,
        c.kv_heads,
        0,
    )
    .unwrap();
    let mut proj = zeros(&[n, d]);
    be.matmul_nt(&mut proj, &att, wo).unwrap();
    let mut x1 = up(&be.download(&x0).unwrap(), &[n, d]);
    be.add_assign(&mut x1, &proj).unwrap();
    let mut h2 = zeros(&[n, d]);
    be.rmsnorm(&mut h2, &x1, ffn_norm, c.eps).unwrap();
    let (mut gate, mut upp, mut act) = (zeros(&[n, f]), zeros(&[n, f]), zeros(&[n, f]));
    be.matmul_nt(&mut gate, &h2, w_gate).unwrap();
    be.matmul_nt(&mut upp, &h2, w_up).unwrap();
    be.swiglu(&mut act, &gate, &upp).unwrap();
    be.matmul_nt(&mut proj, &act, w_down).unwrap();
    let mut x2 = up(&be.download(&x1).unwrap(), &[n, d]);
    be.add_assign(&mut x2, &proj).unwrap();
    let mut hf = zeros(&[n, d]);
    be.rmsnorm(&mut hf, &x2, norm, c.eps).unwrap();
    let mut logits = zeros(&[n, v]);
    be.matmul_nt(&mut logits, &hf, embed).unwrap();
    let mut dlogits = zeros(&[n, v]);
    let loss_sum = be
        .cross_entropy(Some(&mut dlogits), &logits, &targets, None)
        .unwrap();

    // backward: the same list reversed
    let [d_embed, d_attn_norm, d_wq, d_wk, d_wv, d_wo, d_ffn_norm, d_gate_w, d_up_w, d_down_w, d_norm] =
        &mut g[..]
    else {
        unreachable!()
    };
    let mut dhf = zeros(&[n, d]);
    be.matmul_nt_backward(&mut dhf, Some(d_embed), &dlogits, &hf, embed)
        .unwrap();
    // dx is the residual stream's gradient: every block adds into it
    let mut dx = zeros(&[n, d]);
    be.rmsnorm_backward(&mut dx, d_norm, &dhf, &x2, norm, c.eps)
        .unwrap();
    // x2 = x1 + down(act): dx flows on unchanged, and into the block
    let mut dact = zeros(&[n, f]);
    be.matmul_nt_backward(&mut dact, Some(d_down_w), &dx, &act, w_down)
        .unwrap();
    let (mut dgate, mut dup) = (zeros(&[n, f]), zeros(&[n, f]));
    be.swiglu_backward(&mut dgate, &mut dup, &dact, &gate, &upp)
        .unwrap();
    let mut dh = zeros(&[n, d]);
    be.matmul_nt_backward(&mut dh, Some(d_gate_w), &dgate, &h2, w_gate)
        .unwrap();
    be.matmul_nt_backward(&mut dh, Some(d_up_w), &dup, &h2, w_up)
        .unwrap();
    be.rmsnorm_backward(&mut dx, d_ffn_norm, &dh, &x1, ffn_norm, c.eps)
        .unwrap();
    // x1 = x0 + o(att)
    let mut datt = zeros(&[n, qw]);
    be.matmul_nt_backward(&mut datt, Some(d_wo), &dx, &att, wo)
        .unwrap();
    let (mut dq, mut dk, mut dv) = (zeros(&[n, qw]), zeros(&[n, kvw]), zeros(&[n, kvw]));
    be.attention_backward(
        &mut dq, &mut dk, &mut dv, &datt, &q, &k, &vv, &att, &lse, c.heads, c.kv_heads, 0,
    )
    .unwrap();
    be.rope_backward(&mut dq, c.heads, 0, c.theta).unwrap();
    be.rope_backward(&mut dk, c.kv_heads, 0, c.theta).unwrap();
    let mut dh = zeros(&[n, d]);
    be.matmul_nt_backward(&mut dh, Some(d_wq), &dq, &h1, wq)
        .unwrap();
    be.matmul_nt_backward(&mut dh, Some(d_wk), &dk, &h1, wk)
        .unwrap();
    be.matmul_nt_backward(&mut dh, Some(d_wv), &dv, &h1, wv)
        .unwrap();
    be.rmsnorm_backward(&mut dx, d_attn_norm, &dh, &x0, attn_norm, c.eps)
        .unwrap();
    be.embedding_backward(d_embed, &dx, &ids).unwrap();

    // against the f64 model
    let p64: Vec<Vec<f64>> = params.iter().map(|p| f64s(p)).collect();
    let loss = c.loss_f64(&p64, &ids, &targets);
    let counted = (n - 1) as f64;
    common::assert_close_f64("loss", &[loss_sum / counted as f32], &[loss], TOL);
    for (i, name) in NAMES.iter().enumerate() {
        let want = fd(&p64[i], |pi| {
            let mut p = p64.clone();
            p[i] = pi.to_vec();
            c.loss_f64(&p, &ids, &targets)
        });
        common::assert_close_f64(
            &format!("d{name}"),
            &be.download(&g[i]).unwrap(),
            &want,
            TOL,
        );
    }
}

/// drop(x) of `Backend::dropout` with (p, seed), over x's flat indices.
fn dropout_f64(x: &[f64], dropout: Option<(f32, u64)>) -> Vec<f64> {
    let Some((p, seed)) = dropout else {
        return x.to_vec();
    };
    let keep = (1.0 / (1.0 - p)) as f64;
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            if engine::backend::dropout_keeps(seed, i as u64, p) {
                v * keep
            } else {
                0.0
            }
        })
        .collect()
}

/// The LoRA branch s·(drop(x)·Aᵀ)·Bᵀ [n, out], and t = drop(x)·Aᵀ [n, r].
fn lora_f64(
    x: &[f64],
    a: &[f64],
    b: &[f64],
    s: f64,
    dropout: Option<(f32, u64)>,
    (n, inp, out, r): (usize, usize, usize, usize),
) -> (Vec<f64>, Vec<f64>) {
    let t = matmul_nt_f64(&dropout_f64(x, dropout), a, n, r, inp);
    let y = matmul_nt_f64(&t, b, n, out, r);
    (y.iter().map(|v| s * v).collect(), t)
}

/// `lora_forward` against the math in f64 (y accumulates, t is
/// overwritten), and `lora_backward`'s dx, dA, dB against finite
/// differences of Σ dy ∘ y, with and without dropout, at sizes spanning
/// several of the op's row blocks (64 rows) and dA's partial sums (256).
#[test]
fn lora_forward_and_backward_match_finite_differences() {
    let mut rng = seeded_rng();
    for (n, inp, out, r, dropout) in [
        (1, 1, 1, 1, None),
        (3, 7, 5, 2, Some((0.5, 11))),
        (70, 9, 6, 3, Some((0.1, 12))),
        (300, 4, 3, 2, None),
    ] {
        let what = format!("n {n} in {inp} out {out} r {r}, dropout {dropout:?}");
        let s = 1.7f32;
        let x = random_vec(&mut rng, n * inp, 1.0);
        let a = random_vec(&mut rng, r * inp, 1.0);
        let b = random_vec(&mut rng, out * r, 1.0);
        let y0 = random_vec(&mut rng, n * out, 1.0);
        let (xt, at, bt) = (
            input(&x, &[n, inp]),
            input(&a, &[r, inp]),
            input(&b, &[out, r]),
        );
        let (x64, a64, b64) = (f64s(&x), f64s(&a), f64s(&b));
        let dims = (n, inp, out, r);
        let (branch, t64) = lora_f64(&x64, &a64, &b64, s as f64, dropout, dims);

        let mut y = accumulator(&y0, &[n, out]);
        let mut t = poisoned(&[n, r]);
        Cpu.lora_forward(&mut y, &mut t, &xt, &at, &bt, s, dropout)
            .unwrap();
        check_grad(&format!("{what}: y"), &y, Some(&y0), &branch);
        check_grad(&format!("{what}: t"), &t, None, &t64);

        let dy = random_vec(&mut rng, n * out, 1.0);
        let (dx0, da0, db0) = (
            random_vec(&mut rng, n * inp, 1.0),
            random_vec(&mut rng, r * inp, 1.0),
            random_vec(&mut rng, out * r, 1.0),
        );
        let mut dx = accumulator(&dx0, &[n, inp]);
        let mut da = accumulator(&da0, &[r, inp]);
        let mut db = accumulator(&db0, &[out, r]);
        let mut dt = poisoned(&[n, r]);
        Cpu.lora_backward(
            &mut dx,
            &mut da,
            &mut db,
            &mut dt,
            &input(&dy, &[n, out]),
            &xt,
            &t,
            &at,
            &bt,
            s,
            dropout,
        )
        .unwrap();
        let dy64 = f64s(&dy);
        let loss = |x: &[f64], a: &[f64], b: &[f64]| {
            contract(&dy64, &lora_f64(x, a, b, s as f64, dropout, dims).0)
        };
        let want_dx = fd(&x64, |x| loss(x, &a64, &b64));
        let want_da = fd(&a64, |a| loss(&x64, a, &b64));
        let want_db = fd(&b64, |b| loss(&x64, &a64, b));
        // dt = s·dy·B
        let want_dt: Vec<f64> = (0..n * r)
            .map(|e| {
                let (i, k) = (e / r, e % r);
                (0..out)
                    .map(|o| s as f64 * dy64[i * out + o] * b64[o * r + k])
                    .sum()
            })
            .collect();
        check_grad(&format!("{what}: dx"), &dx, Some(&dx0), &want_dx);
        check_grad(&format!("{what}: dA"), &da, Some(&da0), &want_da);
        check_grad(&format!("{what}: dB"), &db, Some(&db0), &want_db);
        check_grad(&format!("{what}: dt"), &dt, None, &want_dt);
    }
}
