//! The serving kernels of kernels/paged.cu in the CPU emulator, through the
//! CUDA device's `Backend` methods, against the CPU device: `rope_rows`,
//! `scatter_rows` (bit-exact) and `attention_paged` over ragged batches of
//! decode rows and prefill chunks, each in both lane orders. Outputs are
//! poisoned with NaN before each launch, pool slots no sequence owns hold
//! NaN (a kernel that reads a wrong slot fails), and rows no sequence covers
//! must stay NaN.
#![cfg(feature = "emu")]

mod common;

use common::max_rel_err;
use common::paged::{data, Batch, Dims, SeqData};
use common::seeded_rng;
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::Emu;
use engine::backend::cuda::emu::LaneOrder;
use engine::backend::cuda::Cuda;
use engine::backend::Backend;
use engine::tensor::DType::{BF16, F32};
use engine::Error;
use rand::seq::SliceRandom;
use rand::Rng;

/// bf16 outputs, measured against the largest reference value (as in
/// cuda_ops.rs and cuda_attention.rs).
const BF16_TOL: f32 = 1e-2;

/// The emulated device in each lane order.
fn gpus() -> [(LaneOrder, Cuda<Emu>); 2] {
    [LaneOrder::Forward, LaneOrder::Reverse].map(|o| (o, Cuda::new(Emu::with_lane_order(o))))
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn rope_rows_matches_cpu() {
    let mut r = seeded_rng("PAGED_SEED");
    for (order, g) in gpus() {
        for (n, heads, hd) in [(1, 1, 2), (7, 3, 16), (13, 9, 64), (5, 2, 6)] {
            let w = heads * hd;
            let x = data(&mut r, n * w, 2.0);
            let positions: Vec<u32> = (0..n).map(|_| r.random_range(0..3000)).collect();
            let mut c = Cpu.upload(x.clone(), &[n, w], F32).unwrap();
            let mut d = g.upload(x.clone(), &[n, w], BF16).unwrap();
            Cpu.rope_rows(&mut c, heads, &positions, 100_000.0).unwrap();
            g.rope_rows(&mut d, heads, &positions, 100_000.0).unwrap();
            let (want, got) = (Cpu.download(&c).unwrap(), g.download(&d).unwrap());
            let err = max_rel_err(&got, &want);
            let what = format!("{order:?} n{n} h{heads} hd{hd} at {positions:?}");
            assert!(err <= BF16_TOL, "{what}: max relative error {err:e}");
            assert_ne!(bits(&got), bits(&x), "{what}: x untouched");
        }
        let mut x = g.upload(vec![0.5; 16], &[2, 8], BF16).unwrap();
        let err = g.rope_rows(&mut x, 2, &[1], 1e4).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
    }
}

#[test]
fn scatter_rows_matches_cpu_exactly() {
    let mut r = seeded_rng("PAGED_SEED");
    for (order, g) in gpus() {
        for (num_slots, d, n) in [(48, 192, 17), (5, 3, 5), (300, 64, 1)] {
            let before = data(&mut r, num_slots * d, 4.0);
            let src = data(&mut r, n * d, 4.0);
            let mut all: Vec<u32> = (0..num_slots as u32).collect();
            all.shuffle(&mut r);
            let slots = &all[..n];
            let mut c = Cpu.upload(before.clone(), &[num_slots, d], F32).unwrap();
            let cs = Cpu.upload(src.clone(), &[n, d], F32).unwrap();
            Cpu.scatter_rows(&mut c, &cs, slots).unwrap();
            let want = Cpu.download(&c).unwrap();
            for dtype in [BF16, F32] {
                let mut t = g.upload(before.clone(), &[num_slots, d], dtype).unwrap();
                let s = g.upload(src.clone(), &[n, d], dtype).unwrap();
                g.scatter_rows(&mut t, &s, slots).unwrap();
                let got = g.download(&t).unwrap();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{order:?} {dtype} [{num_slots}, {d}] ← {n}"
                );
            }
        }
        let mut t = g.upload(vec![1.0; 8], &[4, 2], BF16).unwrap();
        let s = g.upload(vec![2.0; 2], &[1, 2], BF16).unwrap();
        let err = g.scatter_rows(&mut t, &s, &[4]).unwrap_err();
        assert!(matches!(err, Error::Invalid(_)), "{err}");
        assert!(g.download(&t).unwrap().iter().all(|&x| x == 1.0));
    }
}

#[test]
fn attention_paged_matches_cpu() {
    let mut r = seeded_rng("PAGED_SEED");
    let smollm2 = Dims {
        heads: 9,
        kv_heads: 3,
        hd: 64,
        block_size: 16,
    };
    // (dims, [(rows, ctx)]): decode rows over several blocks, first prefill
    // chunks, later chunks of a prompt (ctx − rows > 0); ctx mostly not a
    // multiple of the block size.
    let cases = [
        (
            smollm2,
            vec![(1, 50), (7, 7), (1, 33), (5, 29), (1, 16), (1, 70)],
        ),
        (
            Dims {
                heads: 4,
                kv_heads: 1,
                hd: 16,
                block_size: 3,
            },
            vec![(1, 11), (4, 4), (3, 10), (1, 1)],
        ),
        (
            Dims {
                heads: 2,
                kv_heads: 2,
                hd: 128,
                block_size: 8,
            },
            vec![(2, 21), (1, 9)],
        ),
    ];
    for (order, g) in gpus() {
        for (d, shape) in &cases {
            let seqs: Vec<SeqData> = shape
                .iter()
                .map(|&(rows, ctx)| SeqData::new(&mut r, *d, rows, ctx))
                .collect();
            let b = Batch::new(&mut r, *d, &seqs, 1);
            let (w, kvw, n) = (d.width(), d.kv_width(), b.n);
            let paged = b.paged_seqs();
            let (heads, kv_heads, bs) = (d.heads, d.kv_heads, d.block_size);

            let up = |x: &[f32], rows| {
                Cpu.upload(x.to_vec(), &[rows, x.len() / rows], F32)
                    .unwrap()
            };
            let mut out = up(&vec![f32::NAN; n * w], n);
            let (q, k, v) = (
                up(&b.q, n),
                up(&b.k_pool, b.num_slots),
                up(&b.v_pool, b.num_slots),
            );
            Cpu.attention_paged(&mut out, &q, &k, &v, &paged, heads, kv_heads, bs)
                .unwrap();
            let want = Cpu.download(&out).unwrap();

            let dup =
                |x: &[f32], rows| g.upload(x.to_vec(), &[rows, x.len() / rows], BF16).unwrap();
            let mut out = dup(&vec![f32::NAN; n * w], n);
            let (q, k, v) = (
                dup(&b.q, n),
                dup(&b.k_pool, b.num_slots),
                dup(&b.v_pool, b.num_slots),
            );
            assert_eq!(k.rows_cols(), (b.num_slots, kvw));
            g.attention_paged(&mut out, &q, &k, &v, &paged, heads, kv_heads, bs)
                .unwrap();
            let got = g.download(&out).unwrap();

            let what = format!("{order:?} {d:?} {shape:?}");
            let covered: Vec<usize> = (0..n).filter(|&row| b.covered(row)).collect();
            let pick = |x: &[f32]| -> Vec<f32> {
                covered
                    .iter()
                    .flat_map(|&row| x[row * w..(row + 1) * w].to_vec())
                    .collect()
            };
            let err = max_rel_err(&pick(&got), &pick(&want));
            assert!(err <= BF16_TOL, "{what}: max relative error {err:e}");
            for row in (0..n).filter(|&row| !b.covered(row)) {
                assert!(
                    got[row * w..(row + 1) * w].iter().all(|x| x.is_nan()),
                    "{what}: uncovered row {row} written"
                );
            }
        }
    }
}
