//! engine's side of the flat inner-product search benchmark, measured the way
//! benches/faiss_index.py measures faiss's IndexFlatIP: `--rows` random unit
//! vectors of `--dim` in an index folder (built once, reused while rows and
//! dim match), `--queries` random unit queries searched one at a time
//! (single) and in batches of 64 for their `--k` best ids and scores (no
//! chunk records read: the same work as faiss's `search`). The best of
//! `--repeats` passes after a warm-up pass. Prints one JSON line, and writes
//! the ids it found to DIR/engine-ids.u32 for the other side to compare.
//!
//!   cargo bench --bench index -- --dir DIR [--rows N] [--dim D] [--queries Q]
//!     [--k K] [--repeats R] [--threads T]
//! benches/index.sh runs it next to faiss and prints the ratios.

mod common;

use engine::rag::index::{Index, Piece, Writer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Args {
    dir: PathBuf,
    rows: usize,
    dim: usize,
    queries: usize,
    k: usize,
    repeats: usize,
    threads: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: PathBuf::new(),
        rows: 100_000,
        dim: 384,
        queries: 256,
        k: 10,
        repeats: 3,
        threads: common::all_cores(),
    };
    common::each_flag(|flag, value| match flag {
        "--dir" => args.dir = value.into(),
        "--rows" => args.rows = value.parse().expect("--rows"),
        "--dim" => args.dim = value.parse().expect("--dim"),
        "--queries" => args.queries = value.parse().expect("--queries"),
        "--k" => args.k = value.parse().expect("--k"),
        "--repeats" => args.repeats = value.parse().expect("--repeats"),
        "--threads" => args.threads = value.parse().expect("--threads"),
        other => panic!("unknown argument {other}"),
    });
    assert!(!args.dir.as_os_str().is_empty(), "--dir DIR is required");
    args
}

/// n random unit vectors of dim d (uniform in the cube, then normalised).
fn unit_vectors(rng: &mut StdRng, n: usize, d: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    for row in v.chunks_mut(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Opens the index in `dir`, first building it when it is missing or holds
/// another shape: sources of 10 000 rows each, one tiny record per row.
fn index_of(dir: &Path, rows: usize, dim: usize) -> Index {
    if let Ok(index) = Index::open(dir) {
        if index.len() == rows && index.dim() == dim {
            return index;
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    let mut writer = Writer::create(dir, "bench/random", dim).expect("create the index");
    for (s, start) in (0..rows).step_by(10_000).enumerate() {
        let n = 10_000.min(rows - start);
        let pieces: Vec<Piece> = (0..n)
            .map(|i| Piece {
                line_start: i + 1,
                line_end: i + 1,
                text: format!("row {}", start + i),
            })
            .collect();
        let vectors = unit_vectors(&mut rng, n, dim);
        writer
            .add(&format!("part-{s}"), "-", &pieces, &vectors)
            .expect("add rows");
    }
    writer.commit().expect("commit the index");
    eprintln!(
        "built {rows} × {dim} in {} in {:.1} s",
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Index::open(dir).expect("open the index just built")
}

fn main() {
    let args = parse_args();
    common::in_pool(args.threads, || run(args));
}

fn run(args: Args) {
    let (d, k) = (args.dim, args.k);
    let index = index_of(&args.dir, args.rows, d);
    let queries = unit_vectors(&mut StdRng::seed_from_u64(2), args.queries, d);
    std::fs::write(
        args.dir.join("queries.f32"),
        bytemuck::cast_slice::<f32, u8>(&queries),
    )
    .expect("write queries.f32");

    // One pass: (seconds single, seconds batched, ids of the single pass).
    let pass = || {
        let t0 = Instant::now();
        let mut ids = Vec::with_capacity(args.queries * k);
        for q in queries.chunks(d) {
            let hits = index.search_ids(q, k).expect("search").pop().unwrap();
            ids.extend(hits.iter().map(|&(id, _)| id as u32));
        }
        let single = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for batch in queries.chunks(64 * d) {
            index.search_ids(batch, k).expect("search a batch");
        }
        (single, t1.elapsed().as_secs_f64(), ids)
    };
    let (_, _, ids) = pass(); // warm-up: maps the vectors in
    let (mut single, mut batched) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..args.repeats {
        let (s, b, _) = pass();
        single = single.min(s);
        batched = batched.min(b);
    }
    std::fs::write(
        args.dir.join("engine-ids.u32"),
        bytemuck::cast_slice::<u32, u8>(&ids),
    )
    .expect("write engine-ids.u32");
    let qps = |s: f64| (args.queries as f64 / s).round();
    let result = serde_json::json!({
        "impl": "engine",
        "rows": args.rows,
        "dim": d,
        "k": k,
        "queries": args.queries,
        "threads": args.threads,
        "single_qps": qps(single),
        "batch64_qps": qps(batched),
    });
    println!("{result}");
}
