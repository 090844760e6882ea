//! Batched decoding without HTTP: how output tokens/s grows with the number
//! of sequences decoded together, the serving engine's core (benches/serve.sh
//! measures the same through `engine serve`, next to llama-server). For each
//! batch size N, N requests of different prompts are added to one `Engine`
//! at once; the prefill (until every request has its first token) and the
//! decode that follows are timed apart. Prints one JSON line per N.
//!
//!   cargo bench --bench batch_decode -- [--model DIR] [--batches 1,4,16,64]
//!     [--prompt-tokens P] [--decode-tokens M] [--threads T]

mod common;

use engine::backend::cpu::Cpu;
use engine::backend::sample::SamplerConfig;
use engine::infer::engine::{Engine, EngineConfig, Event, Request};
use engine::infer::generate::BLOCK_SIZE;
use engine::infer::metrics::Metrics;
use engine::model::llama::Llama;
use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

struct Args {
    model: PathBuf,
    batches: Vec<usize>,
    prompt_tokens: usize,
    decode_tokens: usize,
    threads: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        model: PathBuf::from("models/smollm2-135m-instruct"),
        batches: vec![1, 4, 16, 64],
        prompt_tokens: 128,
        decode_tokens: 64,
        threads: common::all_cores(),
    };
    common::each_flag(|flag, value| match flag {
        "--model" => args.model = value.into(),
        "--batches" => {
            args.batches = value
                .split(',')
                .map(|b| b.parse().expect("--batches: a list like 1,4,16"))
                .collect()
        }
        "--prompt-tokens" => args.prompt_tokens = value.parse().expect("--prompt-tokens"),
        "--decode-tokens" => args.decode_tokens = value.parse().expect("--decode-tokens"),
        "--threads" => args.threads = value.parse().expect("--threads"),
        other => panic!("unknown argument {other}"),
    });
    args
}

fn main() {
    let args = parse_args();
    common::in_pool(args.threads, || run(args));
}

/// Prompt `i`: ids from a fixed linear congruential sequence, different for
/// every request so that the prefix cache shares nothing.
fn prompt(i: usize, len: usize, vocab: usize) -> Vec<u32> {
    let mut s = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Skip the first ids (special tokens).
            (100 + (s >> 33) as usize % (vocab - 100)) as u32
        })
        .collect()
}

fn run(args: Args) {
    let model = Llama::load(Cpu, &args.model).expect("load model");
    let vocab = model.config.vocab_size;
    for &n in &args.batches {
        let per_seq = (args.prompt_tokens + args.decode_tokens + 1).div_ceil(BLOCK_SIZE);
        let cfg = EngineConfig {
            max_batch_tokens: 512,
            max_seqs: n,
            block_size: BLOCK_SIZE,
            num_blocks: n * per_seq,
        };
        let mut engine = Engine::new(&model, cfg, Arc::new(Metrics::default())).unwrap();
        // Requests that have their first token, and tokens in all.
        let first_tokens = Rc::new(Cell::new(0usize));
        let tokens = Rc::new(Cell::new(0usize));
        for i in 0..n {
            let req = Request {
                prompt: prompt(i, args.prompt_tokens, vocab),
                max_tokens: args.decode_tokens + 1,
                sampler: SamplerConfig::default(),
                stop_ids: Vec::new(),
                logprobs: None,
                adapter: None,
            };
            let (first_tokens, tokens) = (first_tokens.clone(), tokens.clone());
            let mut seen = false;
            let sink = Box::new(move |e: Event| {
                if let Event::Token(_) = e {
                    tokens.set(tokens.get() + 1);
                    if !seen {
                        seen = true;
                        first_tokens.set(first_tokens.get() + 1);
                    }
                }
                true
            });
            engine.add(req, sink).unwrap();
        }
        let start = Instant::now();
        let mut steps = 0;
        while first_tokens.get() < n {
            engine.step().unwrap();
            steps += 1;
        }
        let prefill = start.elapsed().as_secs_f64();
        let (decoded_before, decode_start, prefill_steps) = (tokens.get(), Instant::now(), steps);
        while !engine.is_idle() {
            engine.step().unwrap();
            steps += 1;
        }
        let decode = decode_start.elapsed().as_secs_f64();
        let decoded = tokens.get() - decoded_before;
        assert_eq!(tokens.get(), n * (args.decode_tokens + 1));
        let result = serde_json::json!({
            "batch": n,
            "prefill_tok_s": ((n * args.prompt_tokens) as f64 / prefill).round(),
            "prefill_steps": prefill_steps,
            "decode_tok_s": (decoded as f64 / decode * 10.0).round() / 10.0,
            "decode_step_ms": (decode / (steps - prefill_steps) as f64 * 1e4).round() / 10.0,
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens,
        });
        println!("{result}");
    }
}
