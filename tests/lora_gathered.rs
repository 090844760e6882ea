//! `lora_gathered` of the CPU device (the reference): many LoRA adapters of
//! different ranks over one batch, against an f64 reference and against
//! `lora_forward` applied per adapter to its rows; its batch invariance (a
//! row's bits whatever else is in the batch); rows without an adapter and
//! adapters no row names left alone; and its errors on bad batches.

mod common;

use common::{assert_close_f64, max_rel_err, seeded_rng};
use engine::backend::cpu::Cpu;
use engine::backend::{Backend, LoraRef, NO_ADAPTER};
use engine::tensor::DType::F32;
use engine::tensor::Tensor;
use engine::Error;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// f32 outputs against an f64 reference or another f32 path, relative to
/// the largest reference value.
const F32_TOL: f32 = 1e-5;

fn data(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn up(x: &[f32], rows: usize, cols: usize) -> Tensor<Cpu> {
    Cpu.upload(x.to_vec(), &[rows, cols], F32).unwrap()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One adapter's weights on the host: A [r, in], B [out, r], scaling s.
struct Weights {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    s: f32,
}

impl Weights {
    /// Scaled so that the branch is about as large as y's values: t has
    /// entries of about 1/3, s·t·Bᵀ of about s/5.
    fn new(rng: &mut StdRng, inp: usize, out: usize, r: usize, s: f32) -> Self {
        Weights {
            a: data(rng, r * inp, 1.0 / (inp as f32).sqrt()),
            b: data(rng, out * r, 1.0 / (r as f32).sqrt()),
            r,
            s,
        }
    }
}

/// The adapters on the CPU device: (A, B) tensors, and their `LoraRef`s.
struct Uploaded {
    tensors: Vec<(Tensor<Cpu>, Tensor<Cpu>, f32)>,
}

impl Uploaded {
    fn new(ws: &[Weights], inp: usize, out: usize) -> Self {
        let tensors = ws
            .iter()
            .map(|w| (up(&w.a, w.r, inp), up(&w.b, out, w.r), w.s))
            .collect();
        Uploaded { tensors }
    }

    fn refs(&self) -> Vec<LoraRef<'_, Cpu>> {
        (self.tensors.iter())
            .map(|(a, b, scale)| LoraRef {
                a,
                b,
                scale: *scale,
            })
            .collect()
    }
}

/// y + s·(x·Aᵀ)·Bᵀ per row, in f64.
fn reference(
    y: &[f32],
    x: &[f32],
    ws: &[Weights],
    row_adapter: &[u32],
    (inp, out): (usize, usize),
) -> Vec<f64> {
    let mut want: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    for (i, &a) in row_adapter.iter().enumerate() {
        if a == NO_ADAPTER {
            continue;
        }
        let w = &ws[a as usize];
        let x = &x[i * inp..][..inp];
        let t: Vec<f64> = (0..w.r)
            .map(|j| {
                let a = &w.a[j * inp..][..inp];
                x.iter().zip(a).map(|(&x, &a)| x as f64 * a as f64).sum()
            })
            .collect();
        for c in 0..out {
            let b = &w.b[c * w.r..][..w.r];
            let sum: f64 = t.iter().zip(b).map(|(&t, &b)| t * b as f64).sum();
            want[i * out + c] += w.s as f64 * sum;
        }
    }
    want
}

fn run(
    y: &[f32],
    x: &[f32],
    adapters: &Uploaded,
    row_adapter: &[u32],
    (inp, out): (usize, usize),
) -> Vec<f32> {
    let n = row_adapter.len();
    let mut yt = up(y, n, out);
    Cpu.lora_gathered(&mut yt, &up(x, n, inp), &adapters.refs(), row_adapter)
        .unwrap();
    Cpu.download(&yt).unwrap()
}

/// Rows' adapters: each of `adapters` and NO_ADAPTER in turn, shuffled.
fn mixed(rng: &mut StdRng, n: usize, adapters: u32) -> Vec<u32> {
    let mut rows: Vec<u32> = (0..n as u32)
        .map(|i| match i % (adapters + 1) {
            a if a == adapters => NO_ADAPTER,
            a => a,
        })
        .collect();
    rows.shuffle(rng);
    rows
}

/// SmolLM2-135M's projections (in, out): q and o, k and v, gate and up,
/// down; and a small odd one.
const WIDTHS: [(usize, usize); 5] = [(576, 576), (576, 192), (576, 1536), (1536, 576), (37, 11)];

#[test]
fn matches_f64_reference_and_leaves_other_rows_alone() {
    let mut rng = seeded_rng("LORA_SEED");
    for (inp, out) in WIDTHS {
        for n in [1, 7, 33] {
            // Ranks 4, 8, 16, and one adapter no row names, all NaN: it must
            // not be read.
            let ws = vec![
                Weights::new(&mut rng, inp, out, 4, 2.0),
                Weights::new(&mut rng, inp, out, 8, 0.5),
                Weights::new(&mut rng, inp, out, 16, 1.0),
                Weights {
                    a: vec![f32::NAN; 2 * inp],
                    b: vec![f32::NAN; out * 2],
                    r: 2,
                    s: 1.0,
                },
            ];
            let adapters = Uploaded::new(&ws, inp, out);
            let row_adapter = mixed(&mut rng, n, 3);
            let y0 = data(&mut rng, n * out, 1.0);
            let mut x = data(&mut rng, n * inp, 1.0);
            // A row without an adapter is not read either.
            for (i, &a) in row_adapter.iter().enumerate() {
                if a == NO_ADAPTER {
                    x[i * inp..][..inp].fill(f32::NAN);
                }
            }
            let got = run(&y0, &x, &adapters, &row_adapter, (inp, out));
            let want = reference(&y0, &x, &ws, &row_adapter, (inp, out));
            let what = format!("in {inp} out {out} n {n}, rows {row_adapter:?}");
            assert_close_f64(&what, &got, &want, F32_TOL as f64);
            for (i, &a) in row_adapter.iter().enumerate() {
                let row = i * out..(i + 1) * out;
                if a == NO_ADAPTER {
                    assert_eq!(bits(&got[row.clone()]), bits(&y0[row]), "{what}: row {i}");
                } else {
                    // The branch is there, far above the tolerance.
                    let moved = max_rel_err(&got[row.clone()], &y0[row]);
                    assert!(
                        moved > 1e3 * F32_TOL,
                        "{what}: row {i} moved only {moved:e}"
                    );
                }
            }
        }
    }
}

/// The same sum as `lora_forward` run adapter by adapter on its rows.
#[test]
fn matches_lora_forward_per_adapter() {
    let mut rng = seeded_rng("LORA_SEED");
    for (inp, out) in WIDTHS {
        let n = 40;
        let ws: Vec<Weights> = [(4, 2.0), (8, 0.25), (16, 1.5)]
            .iter()
            .map(|&(r, s)| Weights::new(&mut rng, inp, out, r, s))
            .collect();
        let adapters = Uploaded::new(&ws, inp, out);
        let row_adapter = mixed(&mut rng, n, 3);
        let y0 = data(&mut rng, n * out, 1.0);
        let x = data(&mut rng, n * inp, 1.0);
        let got = run(&y0, &x, &adapters, &row_adapter, (inp, out));

        let mut want = y0.clone();
        for (a, w) in ws.iter().enumerate() {
            let rows: Vec<usize> = (0..n).filter(|&i| row_adapter[i] == a as u32).collect();
            let m = rows.len();
            let xs: Vec<f32> = rows
                .iter()
                .flat_map(|&i| x[i * inp..][..inp].to_vec())
                .collect();
            let ys: Vec<f32> = rows
                .iter()
                .flat_map(|&i| y0[i * out..][..out].to_vec())
                .collect();
            let mut yt = up(&ys, m, out);
            let mut t = Cpu.zeros(&[m, w.r], F32).unwrap();
            let (at, bt) = (up(&w.a, w.r, inp), up(&w.b, out, w.r));
            Cpu.lora_forward(&mut yt, &mut t, &up(&xs, m, inp), &at, &bt, w.s, None)
                .unwrap();
            let ys = Cpu.download(&yt).unwrap();
            for (k, &i) in rows.iter().enumerate() {
                want[i * out..][..out].copy_from_slice(&ys[k * out..][..out]);
            }
        }
        let err = max_rel_err(&got, &want);
        assert!(
            err <= F32_TOL,
            "in {inp} out {out}: max relative error {err:e} against lora_forward"
        );
    }
}

/// A row's bits are the same alone, at other places in batches of other
/// sizes, and next to rows of other adapters or none.
#[test]
fn batch_invariant() {
    let mut rng = seeded_rng("LORA_SEED");
    let (inp, out) = (576, 192);
    let ws: Vec<Weights> = [(4, 2.0), (8, 0.5), (16, 1.0)]
        .iter()
        .map(|&(r, s)| Weights::new(&mut rng, inp, out, r, s))
        .collect();
    let adapters = Uploaded::new(&ws, inp, out);
    let (xr, yr) = (data(&mut rng, inp, 1.0), data(&mut rng, out, 1.0));
    for a in 0..3u32 {
        let alone = run(&yr, &xr, &adapters, &[a], (inp, out));
        assert_ne!(bits(&alone), bits(&yr), "adapter {a} changed nothing");
        for n in [2, 5, 64, 300] {
            let mut row_adapter = mixed(&mut rng, n, 3);
            let at = rng.random_range(0..n);
            row_adapter[at] = a;
            let mut x = data(&mut rng, n * inp, 1.0);
            let mut y = data(&mut rng, n * out, 1.0);
            x[at * inp..][..inp].copy_from_slice(&xr);
            y[at * out..][..out].copy_from_slice(&yr);
            let got = run(&y, &x, &adapters, &row_adapter, (inp, out));
            assert_eq!(
                bits(&got[at * out..][..out]),
                bits(&alone),
                "adapter {a}: row {at} of {n} differs from the row alone"
            );
        }
    }
}

/// Bad batches are errors, with y untouched; empty ones do nothing.
#[test]
fn bad_batches_are_errors() {
    let mut rng = seeded_rng("LORA_SEED");
    let (n, inp, out) = (3, 8, 6);
    let ws: Vec<Weights> = [(2, 1.0), (4, 1.0)]
        .iter()
        .map(|&(r, s)| Weights::new(&mut rng, inp, out, r, s))
        .collect();
    let good = Uploaded::new(&ws, inp, out);
    let y0 = data(&mut rng, n * out, 1.0);
    let x = up(&data(&mut rng, n * inp, 1.0), n, inp);
    let mut y = up(&y0, n, out);
    /// The call fails with `Error::Invalid` naming the op, y unwritten;
    /// returns the message.
    fn check(
        what: &str,
        y: &mut Tensor<Cpu>,
        x: &Tensor<Cpu>,
        adapters: &[LoraRef<'_, Cpu>],
        row_adapter: &[u32],
    ) -> String {
        let before = bits(&Cpu.download(y).unwrap());
        let err = Cpu.lora_gathered(y, x, adapters, row_adapter).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{what}: {err}");
        assert!(err.to_string().contains("lora_gathered"), "{what}: {err}");
        assert_eq!(bits(&Cpu.download(y).unwrap()), before, "{what}: y written");
        err.to_string()
    }
    let refs = good.refs();
    let msg = check("short row_adapter", &mut y, &x, &refs, &[0, 1]);
    assert!(msg.contains("2 row_adapter entries for 3 rows"), "{msg}");
    let msg = check("index past the adapters", &mut y, &x, &refs, &[0, 2, 1]);
    assert!(msg.contains("row 1 names adapter 2 of 2"), "{msg}");
    check("u32::MAX - 1", &mut y, &x, &refs, &[0, u32::MAX - 1, 1]);

    let wide_a = up(&data(&mut rng, 2 * (inp + 1), 1.0), 2, inp + 1);
    let b = &good.tensors[0].1;
    let bad = [LoraRef {
        a: &wide_a,
        b,
        scale: 1.0,
    }];
    let msg = check("A of the wrong width", &mut y, &x, &bad, &[0, 0, 0]);
    assert!(msg.contains("adapter 0's A [2, 9]"), "{msg}");
    let a = &good.tensors[1].0; // rank 4 beside a B of rank 2
    let bad = [refs[0], LoraRef { a, b, scale: 1.0 }];
    let msg = check("B of another rank", &mut y, &x, &bad, &[0, 0, 0]);
    assert!(msg.contains("adapter 1's B [6, 2] is not [6, 4]"), "{msg}");
    let tall_b = up(&data(&mut rng, (out + 1) * 2, 1.0), out + 1, 2);
    let bad = [LoraRef {
        a: &good.tensors[0].0,
        b: &tall_b,
        scale: 1.0,
    }];
    check("B of the wrong height", &mut y, &x, &bad, &[NO_ADAPTER; 3]);
    let empty_a = Cpu.zeros(&[0, inp], F32).unwrap();
    let empty_b = Cpu.zeros(&[out, 0], F32).unwrap();
    let bad = [LoraRef {
        a: &empty_a,
        b: &empty_b,
        scale: 1.0,
    }];
    check("rank 0", &mut y, &x, &bad, &[0, 0, 0]);
    let x_short = up(&data(&mut rng, 2 * inp, 1.0), 2, inp);
    let msg = check("x of other rows", &mut y, &x_short, &refs, &[0, 1]);
    assert!(msg.contains("rows differ"), "{msg}");

    // Nothing to do: no adapter named, or no rows.
    Cpu.lora_gathered(&mut y, &x, &[], &[NO_ADAPTER; 3])
        .unwrap();
    assert_eq!(bits(&Cpu.download(&y).unwrap()), bits(&y0));
    let (mut y_none, x_none) = (up(&[], 0, out), up(&[], 0, inp));
    Cpu.lora_gathered(&mut y_none, &x_none, &refs, &[]).unwrap();
}
