//! The Llama forward pass against PyTorch/transformers on tiny random models
//! (tests/fixtures/make_tiny_llama.py): tied and untied embeddings, GQA, f32
//! and sharded bf16 safetensors, full prefill and prefill + cached decode.

mod common;

use common::{assert_close, fixture, Golden};
use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::infer::score::score;
use engine::model::llama::Llama;
use engine::tensor::DType::F32;

fn golden() -> Golden {
    Golden::open(&fixture("tiny_llama/golden.safetensors"))
}

fn ids(g: &Golden, variant: &str) -> Vec<u32> {
    g.i32(&format!("{variant}.input_ids"))
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// Logits of every position, feeding the tokens in the given chunk sizes.
fn logits(model: &Llama<Cpu>, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
    let c = &model.config;
    let mut cache = model.new_cache(ids.len()).unwrap();
    let max = *chunks.iter().max().unwrap();
    let mut acts = model.new_activations(max).unwrap();
    let mut hidden = Cpu.zeros(&[max, c.hidden_size], F32).unwrap();
    let mut out = Vec::new();
    let mut start = 0;
    for &n in chunks {
        let part = &ids[start..start + n];
        start += n;
        model
            .forward(&mut hidden, part, &mut cache, &mut acts)
            .unwrap();
        let mut logits = Cpu.zeros(&[n, c.vocab_size], F32).unwrap();
        model.logits(&mut logits, &hidden).unwrap();
        out.extend(Cpu.download(&logits).unwrap());
    }
    assert_eq!(start, ids.len());
    out
}

fn check_variant(variant: &str) {
    let g = golden();
    let model = Llama::load(Cpu, &fixture(&format!("tiny_llama/{variant}"))).unwrap();
    let ids = ids(&g, variant);
    let want = g.f32(&format!("{variant}.logits"));
    assert_close(
        &format!("{variant} full"),
        &logits(&model, &ids, &[ids.len()]),
        &want,
        1e-5,
    );
    // Prefill 10, then decode one token at a time through the KV cache.
    let mut chunks = vec![10];
    chunks.extend(std::iter::repeat_n(1, ids.len() - 10));
    let want_inc = g.f32(&format!("{variant}.logits_incremental"));
    assert_close(
        &format!("{variant} incremental"),
        &logits(&model, &ids, &chunks),
        &want_inc,
        1e-5,
    );
    let s = score(&model, &ids).unwrap();
    assert_close(
        &format!("{variant} logprobs"),
        &s.logprobs,
        &g.f32(&format!("{variant}.logprobs")),
        1e-5,
    );
}

#[test]
fn tied_f32_matches_transformers() {
    check_variant("model");
}

#[test]
fn sharded_bf16_matches_transformers() {
    check_variant("sharded_bf16");
}

#[test]
fn untied_matches_transformers() {
    check_variant("untied");
}
