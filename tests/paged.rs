//! The serving ops of the CPU device (the reference): `rope_rows` against
//! `rope`, `scatter_rows`, and `attention_paged` against the contiguous
//! `attention` and an f64 reference, its batch invariance (a row's bits
//! whatever else is in the batch), and its errors on bad batches.

mod common;

use common::paged::{data, Batch, Dims, SeqData};
use common::{assert_close_f64, max_rel_err, seeded_rng};
use engine::backend::cpu::attention::{paged_with, PagedDims};
use engine::backend::cpu::matmul_invariant::Isa;
use engine::backend::cpu::Cpu;
use engine::backend::{Backend, PagedSeq};
use engine::tensor::DType::F32;
use engine::tensor::Tensor;
use engine::Error;
use rand::seq::SliceRandom;
use rand::Rng;

/// f32 outputs against an f64 reference or another f32 path: relative to
/// the largest reference value.
const F32_TOL: f32 = 1e-5;
/// What out holds before a call, in rows no sequence covers.
const SENTINEL: f32 = 12345.0;

/// SmolLM2-135M's attention: 9 heads over 3 kv heads of 64.
const SMOLLM2: Dims = Dims {
    heads: 9,
    kv_heads: 3,
    hd: 64,
    block_size: 16,
};

fn up(x: &[f32], rows: usize, cols: usize) -> Tensor<Cpu> {
    Cpu.upload(x.to_vec(), &[rows, cols], F32).unwrap()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Runs `attention_paged` on a batch; out starts as SENTINEL everywhere.
fn run(b: &Batch) -> Vec<f32> {
    let (d, w) = (b.d, b.d.width());
    let mut out = up(&vec![SENTINEL; b.n * w], b.n, w);
    let q = up(&b.q, b.n, w);
    let k = up(&b.k_pool, b.num_slots, d.kv_width());
    let v = up(&b.v_pool, b.num_slots, d.kv_width());
    Cpu.attention_paged(
        &mut out,
        &q,
        &k,
        &v,
        &b.paged_seqs(),
        d.heads,
        d.kv_heads,
        d.block_size,
    )
    .unwrap();
    Cpu.download(&out).unwrap()
}

/// Sequence s's rows of a batch's output.
fn rows_of<'a>(b: &Batch, out: &'a [f32], s: usize) -> &'a [f32] {
    let w = b.d.width();
    &out[b.rows[s] * w..(b.rows[s] + b.seqs[s].rows) * w]
}

/// The CPU device's contiguous attention of one sequence's rows.
fn contiguous(d: Dims, s: &SeqData) -> Vec<f32> {
    let (w, kvw) = (d.width(), d.kv_width());
    let mut out = Cpu.zeros(&[s.rows, w], F32).unwrap();
    let (k, v) = (up(&s.k, s.ctx, kvw), up(&s.v, s.ctx, kvw));
    let pos0 = s.ctx - s.rows;
    Cpu.attention(
        &mut out,
        None,
        &up(&s.q, s.rows, w),
        &k,
        &v,
        d.heads,
        d.kv_heads,
        pos0,
    )
    .unwrap();
    Cpu.download(&out).unwrap()
}

#[test]
fn rope_rows_is_rope_bit_for_bit() {
    let mut r = seeded_rng("PAGED_SEED");
    for (n, heads, hd, pos0) in [
        (1, 1, 2, 3),
        (3, 3, 16, 0),
        (17, 9, 64, 20),
        (5, 2, 6, 1000),
    ] {
        let x = data(&mut r, n * heads * hd, 2.0);
        let mut a = up(&x, n, heads * hd);
        Cpu.rope(&mut a, heads, pos0, 100_000.0).unwrap();
        let mut b = up(&x, n, heads * hd);
        let positions: Vec<u32> = (pos0..pos0 + n).map(|p| p as u32).collect();
        Cpu.rope_rows(&mut b, heads, &positions, 100_000.0).unwrap();
        assert_eq!(
            bits(&a.buf),
            bits(&b.buf),
            "n{n} h{heads} hd{hd} pos0 {pos0}"
        );
        assert_ne!(bits(&a.buf), bits(&x), "rope left x alone");

        // Rows at scattered positions: each row as `rope` turns it alone.
        let positions: Vec<u32> = (0..n).map(|_| r.random_range(0..5000)).collect();
        let mut b = up(&x, n, heads * hd);
        Cpu.rope_rows(&mut b, heads, &positions, 100_000.0).unwrap();
        let w = heads * hd;
        for (i, &p) in positions.iter().enumerate() {
            let mut one = up(&x[i * w..(i + 1) * w], 1, w);
            Cpu.rope(&mut one, heads, p as usize, 100_000.0).unwrap();
            assert_eq!(
                bits(&one.buf),
                bits(&b.buf[i * w..(i + 1) * w]),
                "row {i} at {p}"
            );
        }
    }
    let mut x = up(&[0.5; 16], 2, 8);
    let err = Cpu.rope_rows(&mut x, 2, &[1, 2, 3], 1e4).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
}

#[test]
fn scatter_rows_writes_the_named_rows_only() {
    let mut r = seeded_rng("PAGED_SEED");
    let (slots_n, d) = (40, 24);
    let before = data(&mut r, slots_n * d, 4.0);
    let mut dst = up(&before, slots_n, d);
    let mut all: Vec<u32> = (0..slots_n as u32).collect();
    all.shuffle(&mut r);
    let slots = &all[..13];
    let src = data(&mut r, slots.len() * d, 4.0);
    Cpu.scatter_rows(&mut dst, &up(&src, slots.len(), d), slots)
        .unwrap();
    let mut want = before.clone();
    for (i, &s) in slots.iter().enumerate() {
        want[s as usize * d..][..d].copy_from_slice(&src[i * d..][..d]);
    }
    assert_eq!(bits(&dst.buf), bits(&want));

    // Bad slot mappings fail and write nothing.
    let one = up(&src[..d], 1, d);
    let two = up(&src[..2 * d], 2, d);
    let narrow = up(&src[..d - 1], 1, d - 1);
    for (what, src, slots) in [
        ("slot out of range", &one, &[slots_n as u32][..]),
        ("width", &narrow, &[0][..]),
        ("duplicate slot", &two, &[3, 3][..]),
        ("slot count", &two, &[1][..]),
    ] {
        let mut dst = up(&before, slots_n, d);
        match Cpu.scatter_rows(&mut dst, src, slots) {
            Err(Error::Invalid(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(bits(&dst.buf), bits(&before), "{what}: dst changed");
    }
}

/// A ragged SmolLM2 batch: decode rows over several blocks, a first
/// prefill chunk, a later chunk of a prompt, ctx not a multiple of 16.
fn ragged(r: &mut rand::rngs::StdRng, d: Dims) -> Vec<SeqData> {
    [(1, 50), (9, 9), (1, 33), (6, 41), (1, 17), (12, 30)]
        .into_iter()
        .map(|(rows, ctx)| SeqData::new(r, d, rows, ctx))
        .collect()
}

#[test]
fn attention_paged_matches_contiguous_attention_and_f64() {
    let mut r = seeded_rng("PAGED_SEED");
    let small = Dims {
        heads: 4,
        kv_heads: 1,
        hd: 8,
        block_size: 3,
    };
    for d in [SMOLLM2, small] {
        let seqs = ragged(&mut r, d);
        let b = Batch::new(&mut r, d, &seqs, 1);
        let out = run(&b);
        for (s, seq) in seqs.iter().enumerate() {
            let what = format!("{d:?} seq {s} (rows {}, ctx {})", seq.rows, seq.ctx);
            let got = rows_of(&b, &out, s);
            let want = contiguous(d, seq);
            let err = max_rel_err(got, &want);
            assert!(err <= F32_TOL, "{what}: vs attention {err:e}");
            // Fewer rows than attention's GEMM path takes: the same
            // arithmetic as its loop, so the same bits.
            if seq.rows < 8 {
                assert_eq!(bits(got), bits(&want), "{what}: not attention's bits");
            }
            assert_close_f64(&what, got, &seq.reference(d), F32_TOL as f64);
        }
        let w = d.width();
        for row in (0..b.n).filter(|&row| !b.covered(row)) {
            assert!(
                out[row * w..(row + 1) * w].iter().all(|&x| x == SENTINEL),
                "uncovered row {row} written"
            );
        }
    }
}

#[test]
fn attention_paged_is_batch_invariant() {
    let mut r = seeded_rng("PAGED_SEED");
    let d = SMOLLM2;
    // The sequence under test: a later chunk of 5 rows of a 37-token prompt.
    let me = SeqData::new(&mut r, d, 5, 37);
    let alone = Batch::new(&mut r, d, std::slice::from_ref(&me), 0);
    let want = rows_of(&alone, &run(&alone), 0).to_vec();
    let mut batches: Vec<(String, Vec<SeqData>, usize)> = Vec::new();
    let other = |r: &mut _, rows, ctx| SeqData::new(r, d, rows, ctx);
    batches.push((
        "after a decode row".into(),
        vec![other(&mut r, 1, 70), me.clone()],
        0,
    ));
    batches.push((
        "before a big prefill".into(),
        vec![me.clone(), other(&mut r, 40, 40)],
        2,
    ));
    let mut many: Vec<SeqData> = (0..7)
        .map(|i| other(&mut r, 1 + i % 3, 20 + 7 * i))
        .collect();
    many.insert(4, me.clone());
    batches.push(("among seven".into(), many, 1));
    for (what, seqs, gap) in &batches {
        let at = seqs.iter().position(|s| s.q == me.q).unwrap();
        let b = Batch::new(&mut r, d, seqs, *gap);
        assert_eq!(bits(rows_of(&b, &run(&b), at)), bits(&want), "{what}");
    }
    // Its rows as a decode row each, or as two smaller chunks, in one batch.
    let w = d.width();
    let parts: Vec<SeqData> = (0..5).map(|i| me.part(d, i, 1)).collect();
    let b = Batch::new(&mut r, d, &parts, 1);
    let out = run(&b);
    for i in 0..5 {
        assert_eq!(
            bits(rows_of(&b, &out, i)),
            bits(&want[i * w..(i + 1) * w]),
            "decode row {i}"
        );
    }
    let parts = [me.part(d, 0, 2), me.part(d, 2, 3)];
    let b = Batch::new(&mut r, d, &parts, 0);
    let out = run(&b);
    assert_eq!(
        bits(rows_of(&b, &out, 0)),
        bits(&want[..2 * w]),
        "chunk of 2"
    );
    assert_eq!(
        bits(rows_of(&b, &out, 1)),
        bits(&want[2 * w..]),
        "chunk of 3"
    );
}

/// The same bits on every instruction set this processor has: the
/// arithmetic is defined lane by lane. Head widths of 64, of 40 (a partial
/// chunk of 16 lanes) and of 144 (more chunks than one pass holds); groups
/// of 3, 2, 6 and 1 query heads a key/value head.
#[test]
fn attention_paged_gives_the_same_bits_on_every_instruction_set() {
    let mut r = seeded_rng("PAGED_SEED");
    let odd = |hd, block_size| Dims {
        heads: 4,
        kv_heads: 2,
        hd,
        block_size,
    };
    let groups = |heads, kv_heads| Dims {
        heads,
        kv_heads,
        hd: 48,
        block_size: 4,
    };
    for d in [
        SMOLLM2,
        odd(40, 3),
        odd(144, 5),
        groups(12, 2),
        groups(3, 3),
    ] {
        let seqs = ragged(&mut r, d);
        let b = Batch::new(&mut r, d, &seqs, 1);
        let mut rows = vec![None; b.n];
        for s in b.paged_seqs() {
            for i in 0..s.rows {
                rows[s.row + i] = Some((s.blocks, s.ctx - s.rows + i));
            }
        }
        let dims = PagedDims {
            heads: d.heads,
            kv_heads: d.kv_heads,
            hd: d.hd,
            block_size: d.block_size,
        };
        let run = |isa| {
            let mut out = vec![SENTINEL; b.n * d.width()];
            paged_with(isa, &mut out, &b.q, &b.k_pool, &b.v_pool, &rows, dims);
            out
        };
        let want = run(Isa::Portable);
        for (s, seq) in seqs.iter().enumerate() {
            let what = format!("{d:?} seq {s}");
            assert_close_f64(
                &what,
                rows_of(&b, &want, s),
                &seq.reference(d),
                F32_TOL as f64,
            );
        }
        for isa in [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|i| i.available())
        {
            assert_eq!(bits(&run(isa)), bits(&want), "{d:?}: {isa:?}");
        }
    }
}

#[test]
fn attention_paged_rejects_bad_batches() {
    let mut r = seeded_rng("PAGED_SEED");
    let d = Dims {
        heads: 4,
        kv_heads: 2,
        hd: 8,
        block_size: 4,
    };
    let seqs = [
        SeqData::new(&mut r, d, 3, 10),
        SeqData::new(&mut r, d, 1, 6),
    ];
    let b = Batch::new(&mut r, d, &seqs, 0);
    let (w, kvw) = (d.width(), d.kv_width());
    let q = up(&b.q, b.n, w);
    let k = up(&b.k_pool, b.num_slots, kvw);
    let v = up(&b.v_pool, b.num_slots, kvw);
    let good = b.paged_seqs();
    let num_blocks = (b.num_slots / d.block_size) as u32;
    let far = [0, num_blocks];
    let with = |i: usize, f: &dyn Fn(&mut PagedSeq<'_>)| {
        let mut s = good.clone();
        f(&mut s[i]);
        s
    };
    let cases: Vec<(&str, Vec<PagedSeq>, usize, usize)> = vec![
        ("rows > ctx", with(1, &|s| s.rows = 7), 4, 2),
        ("rows outside q", with(1, &|s| s.row = 4), 4, 2),
        (
            "too few blocks",
            with(0, &|s| s.blocks = &s.blocks[..2]),
            4,
            2,
        ),
        (
            "block id out of range",
            {
                let mut s = good.clone();
                s[1].blocks = &far;
                s
            },
            4,
            2,
        ),
        ("shared rows", with(1, &|s| s.row = 2), 4, 2),
        ("heads not a multiple of kv_heads", good.clone(), 4, 3),
        ("block size not dividing the pool", good.clone(), 4, 2),
    ];
    for (i, (what, seqs, heads, kv_heads)) in cases.iter().enumerate() {
        // The last case asks for blocks of 5 over a pool of 8 blocks of 4.
        let block_size = if i == cases.len() - 1 {
            5
        } else {
            d.block_size
        };
        let mut out = up(&vec![SENTINEL; b.n * w], b.n, w);
        match Cpu.attention_paged(&mut out, &q, &k, &v, seqs, *heads, *kv_heads, block_size) {
            Err(Error::Invalid(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
        assert!(
            out.buf.iter().all(|&x| x == SENTINEL),
            "{what}: out written"
        );
    }
    // And the good batch passes.
    let mut out = up(&vec![SENTINEL; b.n * w], b.n, w);
    Cpu.attention_paged(&mut out, &q, &k, &v, &good, 4, 2, 4)
        .unwrap();
    assert!(out.buf.iter().all(|x| x.is_finite() && *x != SENTINEL));
}
