//! `Llama::forward_batch`, the serving forward: against the transformers
//! golden logits on the tiny Llamas, batch invariance (a sequence's logits
//! are the same bits alone and inside batches of any make-up, chunked or
//! not, with or without other adapters), and on the CUDA device in the
//! emulator against the CPU.

mod common;

use common::{fixture, Golden};
use engine::backend::cpu::Cpu;
use engine::backend::{Backend, NO_ADAPTER};
use engine::model::adapter::Lora;
use engine::model::batch::{Batch, PagedKv};
use engine::model::llama::Llama;
use engine::model::lora::{LoraAdapter, LoraConfig, Target};
use engine::tensor::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 16;
/// Blocks each test sequence owns (it never needs more).
const BLOCKS_PER_SEQ: usize = 8;

/// A sequence's rows in one step: its id, the tokens at positions
/// `start..`, whether its logits are wanted, and its adapter slot.
#[derive(Clone, Copy)]
struct Rows<'a> {
    seq: usize,
    start: usize,
    ids: &'a [u32],
    logits: bool,
    adapter: u32,
}

fn rows(seq: usize, start: usize, ids: &[u32]) -> Rows<'_> {
    Rows {
        seq,
        start,
        ids,
        logits: true,
        adapter: NO_ADAPTER,
    }
}

fn with_adapter(r: Rows<'_>, adapter: u32) -> Rows<'_> {
    Rows { adapter, ..r }
}

/// Runs `steps` through `forward_batch` with a fresh cache (sequence s owns
/// blocks s·8 … s·8+7) and returns, per step, the logits of each entry that
/// asked for them, keyed by sequence.
fn run<B: Backend>(
    model: &Llama<B>,
    adapters: &[Option<&Lora<B>>],
    steps: &[Vec<Rows<'_>>],
) -> Vec<Vec<(usize, Vec<f32>)>> {
    let c = &model.config;
    let be = &model.backend;
    let seqs = 1 + steps.iter().flatten().map(|r| r.seq).max().unwrap();
    let mut kv = PagedKv::new(
        be,
        c.num_layers,
        c.num_kv_heads * c.head_dim,
        seqs * BLOCKS_PER_SEQ,
        BLOCK,
    )
    .unwrap();
    let max_rows = steps
        .iter()
        .map(|s| s.iter().map(|r| r.ids.len()).sum::<usize>())
        .max()
        .unwrap();
    let mut acts = model.new_activations(max_rows).unwrap();
    let mut logits = be.zeros(&[seqs, c.vocab_size], DType::F32).unwrap();
    let mut out = Vec::new();
    for step in steps {
        let mut batch = Batch::default();
        for r in step {
            let blocks: Vec<u32> = (0..BLOCKS_PER_SEQ)
                .map(|b| (r.seq * BLOCKS_PER_SEQ + b) as u32)
                .collect();
            batch.push_seq(r.ids, r.start, &blocks, BLOCK, r.adapter, r.logits);
        }
        model
            .forward_batch(&mut logits, &batch, &mut kv, &mut acts, adapters)
            .unwrap();
        let all = be.download(&logits).unwrap();
        let wanted = step.iter().filter(|r| r.logits).map(|r| r.seq);
        out.push(
            wanted
                .zip(all.chunks_exact(c.vocab_size))
                .map(|(s, l)| (s, l.to_vec()))
                .collect(),
        );
    }
    out
}

/// The logits of sequence `seq` in every step that gave them.
fn of(out: &[Vec<(usize, Vec<f32>)>], seq: usize) -> Vec<Vec<f32>> {
    out.iter()
        .flatten()
        .filter(|(s, _)| *s == seq)
        .map(|(_, l)| l.clone())
        .collect()
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|l| l.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn golden_ids(g: &Golden) -> Vec<u32> {
    g.i32("model.input_ids")
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

#[test]
fn golden_logits_prefill_then_decode() {
    let g = Golden::open(&fixture("tiny_llama/golden.safetensors"));
    let model = Llama::load(Cpu, &fixture("tiny_llama/model")).unwrap();
    let ids = golden_ids(&g);
    let want = g.f32("model.logits_incremental");
    let v = model.config.vocab_size;
    // Prefill 10 (the logits of each prompt row), then one token a step.
    let mut prefill = Batch::default();
    let blocks: Vec<u32> = (0..BLOCKS_PER_SEQ as u32).collect();
    prefill.push_seq(&ids[..10], 0, &blocks, BLOCK, NO_ADAPTER, true);
    prefill.logit_rows = (0..10).collect();
    let be = &model.backend;
    let c = &model.config;
    let mut kv = PagedKv::new(be, c.num_layers, c.num_kv_heads * c.head_dim, 8, BLOCK).unwrap();
    let mut acts = model.new_activations(10).unwrap();
    let mut logits = be.zeros(&[10, v], DType::F32).unwrap();
    model
        .forward_batch(&mut logits, &prefill, &mut kv, &mut acts, &[])
        .unwrap();
    let mut got = be.download(&logits).unwrap();
    for (i, &id) in ids.iter().enumerate().skip(10) {
        let mut step = Batch::default();
        step.push_seq(&[id], i, &blocks, BLOCK, NO_ADAPTER, true);
        model
            .forward_batch(&mut logits, &step, &mut kv, &mut acts, &[])
            .unwrap();
        got.extend(be.download(&logits).unwrap());
    }
    common::assert_close("forward_batch incremental", &got, &want, 1e-5);
}

/// A sequence (0) computed in very different batches: alone in one
/// chunk; among others before and after it; cut into chunks around other
/// sequences' decode rows. Its logits after the prompt and after one
/// decoded token must be the same bits every time.
fn check_invariance<B: Backend>(model: &Llama<B>, adapters: &[Option<&Lora<B>>], adapter: u32) {
    let mut rng = StdRng::seed_from_u64(7);
    let v = model.config.vocab_size as u32;
    let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..v)).collect() };
    let (a, b, c) = (tokens(37), tokens(9), tokens(50));
    let next = [11u32];
    let ad = |r| with_adapter(r, adapter);
    let alone = vec![vec![ad(rows(0, 0, &a))], vec![ad(rows(0, a.len(), &next))]];
    let among = vec![
        vec![rows(1, 0, &b), ad(rows(0, 0, &a)), ad(rows(2, 0, &c))],
        vec![
            ad(rows(2, c.len(), &next)),
            rows(1, b.len(), &next),
            ad(rows(0, a.len(), &next)),
        ],
    ];
    let first_chunk = Rows {
        logits: false,
        ..ad(rows(0, 0, &a[..13]))
    };
    let chunked = vec![
        vec![first_chunk, rows(1, 0, &b)],
        vec![rows(1, b.len(), &next), ad(rows(0, 13, &a[13..]))],
        vec![ad(rows(0, a.len(), &next)), ad(rows(2, 0, &c))],
    ];
    let want = bits(&of(&run(model, adapters, &alone), 0));
    assert_eq!(want.len(), 2);
    for (name, steps) in [("among others", &among), ("chunked", &chunked)] {
        let got = bits(&of(&run(model, adapters, steps), 0));
        assert!(got == want, "sequence 0's logits differ {name}");
    }
}

/// An adapter on every projection with random A and B, so that it moves
/// the logits.
fn random_adapter(model: &Llama<Cpu>, seed: u64) -> LoraAdapter {
    let config = LoraConfig::new(4, 8.0, 0.0, Target::ALL.to_vec(), false).unwrap();
    let mut adapter = LoraAdapter::init(config, &model.config, seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for pair in adapter.layers.iter_mut().flatten() {
        pair.b
            .iter_mut()
            .for_each(|b| *b = rng.random_range(-0.5..0.5));
    }
    adapter
}

#[test]
fn a_sequence_gets_the_same_bits_in_any_batch() {
    let dir = common::real_model(
        "smollm2-135m-instruct",
        &["config.json", "model.safetensors"],
    )
    .unwrap_or_else(|| fixture("tiny_llama/model"));
    let model = Llama::load(Cpu, &dir).unwrap();
    check_invariance(&model, &[], NO_ADAPTER);
    let lora = Lora::upload(&Cpu, &random_adapter(&model, 3), DType::F32).unwrap();
    let other = Lora::upload(&Cpu, &random_adapter(&model, 4), DType::F32).unwrap();
    // Sequence 0 with adapter slot 1, others with slot 0 or none.
    check_invariance(&model, &[Some(&other), Some(&lora)], 1);
}

#[test]
fn an_adapter_changes_only_its_own_rows() {
    let model = Llama::load(Cpu, &fixture("tiny_llama/model")).unwrap();
    let lora = Lora::upload(&Cpu, &random_adapter(&model, 5), DType::F32).unwrap();
    let p: Vec<u32> = (1..20).collect();
    let steps = |adapter: u32| {
        vec![vec![
            Rows {
                adapter,
                ..rows(0, 0, &p)
            },
            rows(1, 0, &p),
        ]]
    };
    let plain = run(&model, &[Some(&lora)], &steps(NO_ADAPTER));
    let adapted = run(&model, &[Some(&lora)], &steps(0));
    assert_eq!(bits(&of(&plain, 1)), bits(&of(&adapted, 1)));
    assert_eq!(bits(&of(&plain, 0)), bits(&of(&plain, 1)));
    let moved = of(&plain, 0)[0]
        .iter()
        .zip(&of(&adapted, 0)[0])
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "the adapter changed nothing ({moved})");
}

#[cfg(feature = "emu")]
mod emu {
    use super::*;
    use engine::backend::cuda::driver::Emu;
    use engine::backend::cuda::Cuda;

    /// bf16 through two layers against the f32 CPU (as tests/cuda_model.rs).
    const LOGITS_TOL: f32 = 3e-2;

    #[test]
    fn forward_batch_on_the_emulator_follows_the_cpu() {
        let dir = fixture("tiny_llama/model");
        let cpu = Llama::load(Cpu, &dir).unwrap();
        let gpu = Llama::load(Cuda::new(Emu::new()), &dir).unwrap();
        let host = random_adapter(&cpu, 9);
        let lora_cpu = Lora::upload(&Cpu, &host, DType::F32).unwrap();
        let lora_gpu = Lora::upload(&gpu.backend, &host, DType::BF16).unwrap();
        let p: Vec<u32> = (3..40).collect();
        let q: Vec<u32> = (5..14).collect();
        let next = [7u32];
        let steps = vec![
            vec![
                Rows {
                    adapter: 0,
                    ..rows(0, 0, &p)
                },
                rows(1, 0, &q[..4]),
            ],
            vec![
                Rows {
                    adapter: 0,
                    ..rows(0, p.len(), &next)
                },
                rows(1, 4, &q[4..]),
            ],
        ];
        let want = run(&cpu, &[Some(&lora_cpu)], &steps);
        let got = run(&gpu, &[Some(&lora_gpu)], &steps);
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert_eq!(g.0, w.0);
            let err = common::max_rel_err(&g.1, &w.1);
            assert!(err <= LOGITS_TOL, "sequence {}: {err:e}", g.0);
        }
    }
}
