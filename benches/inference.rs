//! engine's side of the CPU inference benchmark (f32, batch 1), measured the
//! way benches/pytorch_inference.py measures PyTorch: prefill = the prompt
//! through a fresh KV cache to the first token; decode = greedy single-token
//! steps with the cache, prefill excluded; the median of --repeats runs
//! after a warm-up. engine runs the request as `engine generate` does: the
//! serving engine's batched path with a batch of one. Prints one JSON line.
//!
//!   cargo bench --bench inference -- --model DIR --prompt-ids FILE [--decode-tokens M]
//!     [--repeats R] [--threads T]
//! benches/inference.sh runs it next to PyTorch and prints the ratios.

mod common;

use engine::backend::cpu::Cpu;
use engine::backend::sample::SamplerConfig;
use engine::infer::generate::{generate, GenerateOptions};
use engine::model::llama::Llama;
use std::path::PathBuf;

struct Args {
    model: PathBuf,
    prompt_ids: PathBuf,
    decode_tokens: usize,
    repeats: usize,
    threads: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        model: PathBuf::from("models/smollm2-135m-instruct"),
        prompt_ids: PathBuf::new(),
        decode_tokens: 64,
        repeats: 3,
        threads: common::all_cores(),
    };
    common::each_flag(|flag, value| match flag {
        "--model" => args.model = value.into(),
        "--prompt-ids" => args.prompt_ids = value.into(),
        "--decode-tokens" => args.decode_tokens = value.parse().expect("--decode-tokens"),
        "--repeats" => args.repeats = value.parse().expect("--repeats"),
        "--threads" => args.threads = value.parse().expect("--threads"),
        other => panic!("unknown argument {other}"),
    });
    args
}

fn main() {
    let args = parse_args();
    common::in_pool(args.threads, || run(args));
}

fn run(args: Args) {
    let ids: Vec<u32> = serde_json::from_str(
        &std::fs::read_to_string(&args.prompt_ids).expect("--prompt-ids FILE (a JSON list)"),
    )
    .expect("prompt ids: a JSON list of token ids");
    let model = Llama::load(Cpu, &args.model).expect("load model");
    let n = ids.len();
    // One request through the engine, as `engine generate` runs it: greedy,
    // no stop token, the first token after the prefill and `decode_tokens`
    // more.
    let opts = GenerateOptions {
        max_tokens: args.decode_tokens + 1,
        sampler: SamplerConfig::default(),
        stop_ids: Vec::new(),
    };
    let run = |timings: Option<(&mut Vec<f64>, &mut Vec<f64>)>| {
        let g = generate(&model, None, &ids, &opts, |_| Ok(())).unwrap();
        assert_eq!(g.ids.len(), args.decode_tokens + 1);
        if let Some((p, d)) = timings {
            p.push(g.prefill.as_secs_f64());
            d.push(g.decode.as_secs_f64());
        }
    };
    run(None); // warm-up
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        run(Some((&mut prefill, &mut decode)));
    }
    let result = serde_json::json!({
        "impl": "engine",
        "prefill_tok_s": (n as f64 / common::median(prefill) * 100.0).round() / 100.0,
        "decode_tok_s": (args.decode_tokens as f64 / common::median(decode) * 100.0).round() / 100.0,
        "peak_rss_mb": (common::peak_rss_mb() * 10.0).round() / 10.0,
        "threads": args.threads,
        "prompt_tokens": n,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
    });
    println!("{result}");
}
