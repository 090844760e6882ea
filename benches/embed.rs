//! engine's side of the CPU embedding benchmark, measured the way
//! benches/embed_st.py measures sentence-transformers: `Embedder::embed` over
//! a JSON list of texts (tokenization, length grouping, padding, forward,
//! pooling and normalisation included; process start and model load
//! excluded), one warm-up call on the first 64 texts, then --repeats timed
//! calls over all of them. Prints one JSON line with the median and best
//! sentences/s; --dump FILE writes the last call's embeddings as raw
//! little-endian f32, one row per text.
//!
//!   cargo bench --bench embed -- --texts FILE [--model DIR] [--batch B]
//!     [--threads T] [--repeats R] [--dump FILE]
//! benches/embed.sh runs it next to sentence-transformers and prints the ratios.

mod common;

use engine::backend::cpu::Cpu;
use engine::model::bert::Embedder;
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    model: PathBuf,
    texts: PathBuf,
    batch: usize,
    threads: usize,
    repeats: usize,
    dump: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        model: PathBuf::from("models/all-minilm-l6-v2"),
        texts: PathBuf::new(),
        batch: 32,
        threads: common::all_cores(),
        repeats: 3,
        dump: None,
    };
    common::each_flag(|flag, value| match flag {
        "--model" => args.model = value.into(),
        "--texts" => args.texts = value.into(),
        "--batch" => args.batch = value.parse().expect("--batch"),
        "--threads" => args.threads = value.parse().expect("--threads"),
        "--repeats" => args.repeats = value.parse().expect("--repeats"),
        "--dump" => args.dump = Some(value.into()),
        other => panic!("unknown argument {other}"),
    });
    assert!(args.repeats > 0, "--repeats must be at least 1");
    args
}

fn main() {
    let args = parse_args();
    common::in_pool(args.threads, || run(args));
}

fn run(args: Args) {
    let texts: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(&args.texts).expect("--texts FILE (a JSON list of strings)"),
    )
    .expect("texts: a JSON list of strings");
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut embedder = Embedder::load(&args.model, Cpu).expect("load model");
    embedder.set_batch_size(args.batch).unwrap();
    let tokens: usize = texts
        .iter()
        .map(|t| embedder.tokenize(t).unwrap().ids.len())
        .sum();

    embedder.embed(&texts[..texts.len().min(64)]).unwrap(); // warm-up
    let (mut seconds, mut last) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let t0 = Instant::now();
        last = embedder.embed(&texts).unwrap();
        seconds.push(t0.elapsed().as_secs_f64());
    }
    if let Some(path) = &args.dump {
        let flat: Vec<f32> = last.concat();
        std::fs::write(path, bytemuck::cast_slice::<f32, u8>(&flat)).expect("write --dump");
    }
    let n = texts.len() as f64;
    let best = seconds.iter().copied().fold(f64::INFINITY, f64::min);
    let round = |x: f64, p: f64| (x * p).round() / p;
    println!(
        "{}",
        serde_json::json!({
            "impl": "engine",
            "sentences": texts.len(),
            "tokens": tokens,
            "sentences_per_s": round(n / common::median(seconds.clone()), 100.0),
            "best_sentences_per_s": round(n / best, 100.0),
            "seconds": seconds.iter().map(|&s| round(s, 1e4)).collect::<Vec<_>>(),
            "threads": args.threads,
            "batch": args.batch,
            "peak_rss_mb": round(common::peak_rss_mb(), 10.0),
        })
    );
}
