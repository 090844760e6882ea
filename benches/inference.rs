//! engine's side of the CPU inference benchmark (f32, batch 1), measured the
//! way benches/pytorch_inference.py measures PyTorch: prefill = one forward
//! over the prompt into a fresh KV cache (plus the last position's logits);
//! decode = greedy single-token steps with the cache, prefill excluded; the
//! median of --repeats runs after a warm-up. Prints one JSON line.
//!
//!   cargo bench --bench inference -- --model DIR --prompt-ids FILE [--decode-tokens M]
//!     [--repeats R] [--threads T]
//! benches/inference.sh runs it next to PyTorch and prints the ratios.

mod common;

use engine::backend::cpu::Cpu;
use engine::backend::sample::argmax;
use engine::backend::Backend;
use engine::model::llama::Llama;
use engine::tensor::DType::F32;
use std::path::PathBuf;
use std::time::Instant;

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
    let c = &model.config;
    let n = ids.len();
    let mut acts = model.new_activations(n).unwrap();
    let mut hidden = Cpu.zeros(&[n, c.hidden_size], F32).unwrap();
    let mut last = Cpu.zeros(&[1, c.hidden_size], F32).unwrap();
    let mut logits = Cpu.zeros(&[1, c.vocab_size], F32).unwrap();

    let mut run = |timings: Option<(&mut Vec<f64>, &mut Vec<f64>)>| {
        let t0 = Instant::now();
        let mut cache = model.new_cache(n + args.decode_tokens).unwrap();
        model
            .forward(&mut hidden, &ids, &mut cache, &mut acts)
            .unwrap();
        Cpu.copy_rows(&mut last, 0, &hidden, n - 1, 1).unwrap();
        model.logits(&mut logits, &last).unwrap();
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut next = argmax(&logits.buf);
        for _ in 0..args.decode_tokens {
            model
                .forward(&mut hidden, &[next], &mut cache, &mut acts)
                .unwrap();
            model.logits(&mut logits, &hidden).unwrap();
            next = argmax(&logits.buf);
        }
        let decode = t1.elapsed().as_secs_f64();
        if let Some((p, d)) = timings {
            p.push(prefill);
            d.push(decode);
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
