//! Serving's many-adapter LoRA kernel (`lora_gathered_bf16` in
//! kernels/lora.cu) in the CPU emulator, through the CUDA device's
//! `Backend::lora_gathered`, against the CPU device, in both lane orders:
//! three adapters of different ranks and rows without one interleaved, at
//! SmolLM2-135M's widths, at ranks 1 to the kernel's limit of 128, for decode
//! batches and a prompt chunk of a few hundred rows. y accumulates into random
//! values; rows without an adapter must keep their bits, as must a row past
//! y's shape. Rows of x without an adapter, a row past x's shape and an
//! adapter no row names hold NaN: a kernel that reads them fails.
#![cfg(feature = "emu")]

mod common;

use common::emu::data;
use common::{max_rel_err, seeded_rng};
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::Emu;
use engine::backend::cuda::emu::LaneOrder;
use engine::backend::cuda::Cuda;
use engine::backend::{Backend, LoraRef, NO_ADAPTER};
use engine::tensor::DType::{self, BF16, F32};
use engine::tensor::Tensor;
use engine::Error;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// bf16 outputs, measured against the largest reference value (as in
/// cuda_ops.rs and cuda_paged.rs).
const BF16_TOL: f32 = 1e-2;

/// The emulated device in each lane order.
fn gpus() -> [(LaneOrder, Cuda<Emu>); 2] {
    [LaneOrder::Forward, LaneOrder::Reverse].map(|o| (o, Cuda::new(Emu::with_lane_order(o))))
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One adapter's weights on the host (bf16-representable): A [r, in],
/// B [out, r], scaling s; scaled so that the branch is about as large as
/// y's values.
struct Weights {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    s: f32,
}

impl Weights {
    fn new(rng: &mut StdRng, inp: usize, out: usize, r: usize, s: f32) -> Self {
        Weights {
            a: data(rng, r * inp, 1.0 / (inp as f32).sqrt()),
            b: data(rng, out * r, 1.0 / (r as f32).sqrt()),
            r,
            s,
        }
    }

    /// An adapter no row names: NaN everywhere.
    fn unused(inp: usize, out: usize) -> Self {
        Weights {
            a: vec![f32::NAN; 2 * inp],
            b: vec![f32::NAN; out * 2],
            r: 2,
            s: 1.0,
        }
    }
}

/// `ws` as tensors of one device, for `refs`.
fn upload<B: Backend>(
    dev: &B,
    ws: &[Weights],
    (inp, out): (usize, usize),
    dtype: DType,
) -> Vec<(Tensor<B>, Tensor<B>, f32)> {
    ws.iter()
        .map(|w| {
            let a = dev.upload(w.a.clone(), &[w.r, inp], dtype).unwrap();
            let b = dev.upload(w.b.clone(), &[out, w.r], dtype).unwrap();
            (a, b, w.s)
        })
        .collect()
}

fn refs<B: Backend>(t: &[(Tensor<B>, Tensor<B>, f32)]) -> Vec<LoraRef<'_, B>> {
    t.iter()
        .map(|(a, b, scale)| LoraRef {
            a,
            b,
            scale: *scale,
        })
        .collect()
}

/// `rows` of width `cols` on the device, with one more row past the shape
/// holding `spare`: the tensor's buffer is rows + 1 rows long.
fn with_spare_row(g: &Cuda<Emu>, v: &[f32], cols: usize, spare: f32) -> Tensor<Cuda<Emu>> {
    let rows = v.len() / cols;
    let mut all = v.to_vec();
    all.extend(std::iter::repeat_n(spare, cols));
    let mut t = g.upload(all, &[rows + 1, cols], BF16).unwrap();
    t.shape[0] = rows;
    t
}

/// Rows' adapters: 0, 1, …, adapters − 1 and NO_ADAPTER in turn, shuffled.
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

/// The kernel against the CPU device on one batch of `n` rows over adapters
/// of `ranks` (rank, s), plus an unused NaN adapter.
fn check_case(
    rng: &mut StdRng,
    (order, g): (LaneOrder, &Cuda<Emu>),
    (inp, out): (usize, usize),
    ranks: &[(usize, f32)],
    n: usize,
) {
    let mut ws: Vec<Weights> = ranks
        .iter()
        .map(|&(r, s)| Weights::new(rng, inp, out, r, s))
        .collect();
    let used = ws.len() as u32;
    ws.push(Weights::unused(inp, out));
    let row_adapter = mixed(rng, n, used);
    let y0 = data(rng, n * out, 1.0);
    let mut x = data(rng, n * inp, 1.0);
    for (i, &a) in row_adapter.iter().enumerate() {
        if a == NO_ADAPTER {
            x[i * inp..][..inp].fill(f32::NAN);
        }
    }
    let what = format!("{order:?} in {inp} out {out} ranks {ranks:?} n {n}");

    let mut yc = Cpu.upload(y0.clone(), &[n, out], F32).unwrap();
    let xc = Cpu.upload(x.clone(), &[n, inp], F32).unwrap();
    let cpu_ws = upload(&Cpu, &ws, (inp, out), F32);
    Cpu.lora_gathered(&mut yc, &xc, &refs(&cpu_ws), &row_adapter)
        .unwrap();
    let want = Cpu.download(&yc).unwrap();

    const SENTINEL: f32 = 12288.0; // bf16-representable
    let mut yg = with_spare_row(g, &y0, out, SENTINEL);
    let xg = with_spare_row(g, &x, inp, f32::NAN);
    let gpu_ws = upload(g, &ws, (inp, out), BF16);
    g.lora_gathered(&mut yg, &xg, &refs(&gpu_ws), &row_adapter)
        .unwrap();
    yg.shape[0] = n + 1;
    let all = g.download(&yg).unwrap();
    let (got, spare) = all.split_at(n * out);

    let err = max_rel_err(got, &want);
    assert!(err <= BF16_TOL, "{what}: max relative error {err:e}");
    assert!(
        spare.iter().all(|&v| v == SENTINEL),
        "{what}: spare row written"
    );
    // Each adapter's branch is well above the tolerance in some row (one
    // row's may be small: a rank-1 branch is one number times B), so that a
    // kernel that skipped the adapter would fail.
    let mut moved = vec![0f32; ranks.len()];
    for (i, &a) in row_adapter.iter().enumerate() {
        let row = i * out..(i + 1) * out;
        if a == NO_ADAPTER {
            assert_eq!(bits(&got[row.clone()]), bits(&y0[row]), "{what}: row {i}");
        } else {
            let m = &mut moved[a as usize];
            *m = m.max(max_rel_err(&want[row.clone()], &y0[row]));
        }
    }
    for (a, m) in moved.iter().enumerate() {
        assert!(
            *m > 5.0 * BF16_TOL,
            "{what}: adapter {a} moved y only {m:e}"
        );
    }
}

/// SmolLM2-135M's projections (in, out): q and o, k and v, gate and up,
/// down; three adapters of ranks 4, 8 and 16, decode batches.
#[test]
fn matches_cpu_at_smollm2_widths() {
    let mut rng = seeded_rng("LORA_SEED");
    let ranks = [(4, 2.0), (8, 0.5), (16, 1.0)];
    for (order, g) in gpus() {
        for widths in [(576, 576), (576, 192), (576, 1536), (1536, 576)] {
            check_case(&mut rng, (order, &g), widths, &ranks, 9);
        }
    }
}

/// Ranks from 1 to the kernel's limit, widths past one staged chunk of x
/// (512) and one pass of the block's threads (256), and a prompt chunk of a
/// few hundred rows.
#[test]
fn matches_cpu_at_edge_ranks_and_widths() {
    let mut rng = seeded_rng("LORA_SEED");
    for (order, g) in gpus() {
        let g = (order, &g);
        check_case(&mut rng, g, (40, 24), &[(1, 8.0), (128, 0.5), (3, 1.0)], 13);
        check_case(&mut rng, g, (1100, 300), &[(8, 1.0), (33, 0.5)], 5);
        check_case(&mut rng, g, (64, 48), &[(4, 2.0), (8, 1.0), (16, 0.5)], 300);
    }
}

/// On the device too, a row's bits do not depend on the rest of the batch.
#[test]
fn batch_invariant() {
    let mut rng = seeded_rng("LORA_SEED");
    let (inp, out, n) = (576, 192, 11);
    let ws: Vec<Weights> = [(4, 2.0), (8, 0.5), (16, 1.0)]
        .iter()
        .map(|&(r, s)| Weights::new(&mut rng, inp, out, r, s))
        .collect();
    for (order, g) in gpus() {
        let gpu_ws = upload(&g, &ws, (inp, out), BF16);
        let row_adapter = mixed(&mut rng, n, 3);
        let (x, y0) = (data(&mut rng, n * inp, 1.0), data(&mut rng, n * out, 1.0));
        let mut y = g.upload(y0.clone(), &[n, out], BF16).unwrap();
        let xt = g.upload(x.clone(), &[n, inp], BF16).unwrap();
        g.lora_gathered(&mut y, &xt, &refs(&gpu_ws), &row_adapter)
            .unwrap();
        let batch = g.download(&y).unwrap();
        for (i, &a) in row_adapter.iter().enumerate() {
            let mut yi = g
                .upload(y0[i * out..][..out].to_vec(), &[1, out], BF16)
                .unwrap();
            let xi = g
                .upload(x[i * inp..][..inp].to_vec(), &[1, inp], BF16)
                .unwrap();
            g.lora_gathered(&mut yi, &xi, &refs(&gpu_ws), &[a]).unwrap();
            assert_eq!(
                bits(&g.download(&yi).unwrap()),
                bits(&batch[i * out..][..out]),
                "{order:?}: row {i} (adapter {a}) alone differs from in the batch"
            );
        }
    }
}

/// Ranks above the kernel's limit and other element types are refused;
/// bad batches are `Error::Invalid`; y is untouched.
#[test]
fn refusals_and_errors() {
    let mut rng = seeded_rng("LORA_SEED");
    let g = Cuda::new(Emu::new());
    let (n, inp, out) = (2, 8, 4);
    let y0 = data(&mut rng, n * out, 1.0);
    let mut y = g.upload(y0.clone(), &[n, out], BF16).unwrap();
    let x = g
        .upload(data(&mut rng, n * inp, 1.0), &[n, inp], BF16)
        .unwrap();
    let mut fails = |what: &str, l: &[LoraRef<'_, Cuda<Emu>>], ra: &[u32]| {
        let err = g.lora_gathered(&mut y, &x, l, ra).unwrap_err();
        assert_eq!(
            bits(&g.download(&y).unwrap()),
            bits(&y0),
            "{what}: y written"
        );
        err
    };
    let big = upload(
        &g,
        &[Weights::new(&mut rng, inp, out, 129, 1.0)],
        (inp, out),
        BF16,
    );
    let err = fails("rank 129", &refs(&big), &[0, NO_ADAPTER]);
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("rank 129"), "{err}");

    let ws = [Weights::new(&mut rng, inp, out, 4, 1.0)];
    let f32_ws = upload(&g, &ws, (inp, out), F32);
    let err = fails("f32 adapter", &refs(&f32_ws), &[0, 0]);
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(err.to_string().contains("A is f32"), "{err}");

    let ok = upload(&g, &ws, (inp, out), BF16);
    let err = fails("index past the adapters", &refs(&ok), &[1, 0]);
    assert!(matches!(err, Error::Invalid(_)), "{err}");

    // A whole batch in f32: a consistent batch, but not the kernel's type.
    let mut y32 = g.upload(y0.clone(), &[n, out], F32).unwrap();
    let x32 = g
        .upload(data(&mut rng, n * inp, 1.0), &[n, inp], F32)
        .unwrap();
    let err = g
        .lora_gathered(&mut y32, &x32, &refs(&f32_ws), &[0, 0])
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
}
