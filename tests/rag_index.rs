//! The flat inner-product index: search against an f64 brute-force
//! reference, add / remove / replace / reopen, refusal of another embedder,
//! clear errors on bad input and corrupt files, crash safety under SIGKILL,
//! and readers searching while a writer commits.

mod common;

use engine::rag::index::{Index, Piece, Writer, MANIFEST};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const EMBEDDER: &str = "test-embedder v1";

/// Vector values: small integers (every dot product exact in f32, and
/// plenty of ties) or uniform floats.
fn random_vectors(rng: &mut StdRng, n: usize, dim: usize, ints: bool) -> Vec<f32> {
    (0..n * dim)
        .map(|_| {
            if ints {
                rng.random_range(-3i32..=3) as f32
            } else {
                rng.random_range(-1.0f32..1.0)
            }
        })
        .collect()
}

/// Pieces whose text names the source and the piece, so the reference can
/// find a row's vector from its record.
fn pieces(source: &str, n: usize) -> Vec<Piece> {
    (0..n)
        .map(|j| Piece {
            line_start: 3 * j + 1,
            line_end: 3 * j + 3,
            text: format!("{source}#{j} \"quoted\"\nand a second line"),
        })
        .collect()
}

/// The top k of `rows` (id, vector) for `query`, in f64: score descending,
/// id ascending.
fn reference(rows: &[(usize, &[f32])], query: &[f32], k: usize) -> Vec<(usize, f64)> {
    let mut all: Vec<(usize, f64)> = rows
        .iter()
        .map(|(id, v)| {
            let s = v
                .iter()
                .zip(query)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            (*id, s)
        })
        .collect();
    all.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

fn message(e: engine::error::Error) -> String {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "a multi-line error: {msg}");
    msg
}

/// What the reference expects: each source's pieces and vectors.
type Content = HashMap<String, (Vec<Piece>, Vec<f32>)>;

/// Builds an index in `dir` with `count` live rows spread over several
/// sources, one of them replaced and one removed along the way (so the
/// files hold dead rows, or were compacted). Returns the live content.
fn build(rng: &mut StdRng, dir: &Path, count: usize, dim: usize, ints: bool) -> Content {
    let mut content = Content::new();
    let mut w = Writer::create(dir, EMBEDDER, dim).unwrap();
    // A source removed later, and one replaced later.
    for name in ["gone.md", "replaced.md"] {
        let n = rng.random_range(0..=count.min(40));
        let v = random_vectors(rng, n, dim, ints);
        w.add(name, "h0", &pieces(name, n), &v).unwrap();
    }
    w.commit().unwrap();
    let mut w = Writer::open(dir).unwrap();
    let mut left = count;
    let mut i = 0;
    while i == 0 || left > 0 {
        let n = if i == 0 {
            rng.random_range(0..=left)
        } else {
            rng.random_range(1..=left.div_ceil(3))
        };
        let name = if i == 0 {
            "replaced.md".to_string()
        } else {
            format!("docs/f{i:03}.md")
        };
        let v = random_vectors(rng, n, dim, ints);
        let p = pieces(&name, n);
        w.add(&name, &format!("h{i}"), &p, &v).unwrap();
        content.insert(name, (p, v));
        left -= n;
        i += 1;
    }
    assert!(w.remove("gone.md"));
    w.commit().unwrap();
    content
}

/// (id, vector) of every live row, checked against the content through the
/// row's record.
fn rows_of<'a>(index: &'a Index, content: &Content) -> Vec<(usize, &'a [f32])> {
    let mut rows = Vec::new();
    let mut seen = 0;
    for s in index.sources() {
        let (p, v) = &content[&s.source];
        assert_eq!(s.ids.len(), p.len(), "{}", s.source);
        for id in s.ids.clone() {
            let chunk = index.chunk(id).unwrap();
            assert_eq!(chunk.source, s.source);
            let j: usize = chunk.text[s.source.len() + 1..]
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(chunk.text, p[j].text);
            assert_eq!((chunk.line_start, chunk.line_end), (3 * j + 1, 3 * j + 3));
            let d = index.dim();
            assert_eq!(index.vector(id).unwrap(), &v[j * d..(j + 1) * d]);
            rows.push((id, index.vector(id).unwrap()));
            seen += 1;
        }
    }
    assert_eq!(seen, index.len());
    assert_eq!(
        seen,
        content.values().map(|(p, _)| p.len()).sum::<usize>(),
        "live rows"
    );
    rows
}

#[test]
fn search_matches_the_f64_reference_exactly_on_integer_vectors() {
    let mut rng = common::seeded_rng("RAG_INDEX_SEED");
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (0, 4),
        (1, 1),
        (7, 3),
        (100, 1),
        (1023, 16),
        (1024, 2),
        (1025, 16),
        (2500, 40),
        (3000, 384),
    ];
    for (case, &(count, dim)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("ix{case}"));
        let content = build(&mut rng, &dir, count, dim, true);
        let index = Index::open(&dir).unwrap();
        assert_eq!(index.len(), count);
        let rows = rows_of(&index, &content);
        for nq in [1, 3, 64] {
            let queries = random_vectors(&mut rng, nq, dim, true);
            for k in [0, 1, 5, count.saturating_sub(1), count, count + 5] {
                let got = index.search_ids(&queries, k).unwrap();
                assert_eq!(got.len(), nq);
                for (q, got) in got.iter().enumerate() {
                    let query = &queries[q * dim..(q + 1) * dim];
                    let want = reference(&rows, query, k);
                    let got_ids: Vec<usize> = got.iter().map(|h| h.0).collect();
                    let want_ids: Vec<usize> = want.iter().map(|h| h.0).collect();
                    assert_eq!(
                        got_ids, want_ids,
                        "count {count} dim {dim} k {k} query {q} of {nq}"
                    );
                    for (g, w) in got.iter().zip(&want) {
                        assert_eq!(g.1 as f64, w.1, "an integer score is exact");
                    }
                    if q == 0 {
                        let hits = index.search(query, k).unwrap();
                        let ids: Vec<usize> = hits.iter().map(|h| h.id).collect();
                        assert_eq!(ids, want_ids, "single query, count {count} k {k}");
                        for h in &hits {
                            assert_eq!(h.chunk, index.chunk(h.id).unwrap());
                        }
                    }
                }
            }
        }
    }
}

/// On the CUDA device (emulated): the f32 GEMM and the top-k kernel give the
/// f64 reference's ids and exact scores on integer vectors, over several
/// device blocks and around dead rows.
#[cfg(feature = "emu")]
#[test]
fn device_search_matches_the_f64_reference() {
    use engine::rag::search::DeviceVectors;
    let g = common::emu::gpu();
    let mut rng = common::seeded_rng("RAG_INDEX_SEED");
    let tmp = tempfile::tempdir().unwrap();
    for (case, &(count, dim)) in [(0, 4), (1, 1), (7, 3), (300, 16), (1000, 40)]
        .iter()
        .enumerate()
    {
        let dir = tmp.path().join(format!("ix{case}"));
        let content = build(&mut rng, &dir, count, dim, true);
        let index = Index::open(&dir).unwrap();
        let rows = rows_of(&index, &content);
        let blocks = DeviceVectors::upload_blocks(&g, &index, 97).unwrap();
        for nq in [1, 5] {
            let queries = random_vectors(&mut rng, nq, dim, true);
            for k in [1, 5, count, count + 5] {
                let got = blocks.search_ids(&g, &queries, k).unwrap();
                let hits = index.search_batch_on(&g, &queries, k).unwrap();
                assert_eq!((got.len(), hits.len()), (nq, nq));
                for q in 0..nq {
                    let want = reference(&rows, &queries[q * dim..(q + 1) * dim], k);
                    let exact: Vec<(usize, f64)> =
                        got[q].iter().map(|&(id, s)| (id, s as f64)).collect();
                    assert_eq!(exact, want, "count {count} dim {dim} k {k} query {q}");
                    let ids: Vec<(usize, f64)> =
                        hits[q].iter().map(|h| (h.id, h.score as f64)).collect();
                    assert_eq!(ids, want, "one block: count {count} k {k} query {q}");
                }
            }
        }
    }
}

#[test]
fn search_matches_the_f64_reference_on_float_vectors() {
    let mut rng = common::seeded_rng("RAG_INDEX_SEED");
    let tmp = tempfile::tempdir().unwrap();
    for (case, &(count, dim)) in [(500, 8), (5000, 384)].iter().enumerate() {
        let dir = tmp.path().join(format!("ix{case}"));
        let content = build(&mut rng, &dir, count, dim, false);
        let index = Index::open(&dir).unwrap();
        let rows = rows_of(&index, &content);
        let score_of: HashMap<usize, &[f32]> = rows.iter().copied().collect();
        let nq = 64;
        let queries = random_vectors(&mut rng, nq, dim, false);
        for k in [1, 10, 100] {
            let got = index.search_ids(&queries, k).unwrap();
            for (q, got) in got.iter().enumerate() {
                let query = &queries[q * dim..(q + 1) * dim];
                let want = reference(&rows, query, k);
                assert_eq!(got.len(), want.len());
                let exact = |id: usize| reference(&[(id, score_of[&id])], query, 1)[0].1;
                let scale = (dim as f64).sqrt();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // The f32 score is the f64 one to rounding.
                    assert!((g.1 as f64 - exact(g.0)).abs() <= 1e-5 * scale, "score");
                    // A different id only where the exact scores tie to rounding.
                    if g.0 != w.0 {
                        assert!(
                            (exact(g.0) - w.1).abs() <= 1e-5 * scale,
                            "k {k} query {q} rank {i}: id {} (score {}) where the reference has {} ({})",
                            g.0,
                            exact(g.0),
                            w.0,
                            w.1
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn duplicate_vectors_rank_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ix");
    let dim = 5;
    let mut w = Writer::create(&dir, EMBEDDER, dim).unwrap();
    let same = [0.5f32, -1.0, 2.0, 0.0, 1.0];
    for s in 0..4 {
        let n = 700;
        let v: Vec<f32> = (0..n).flat_map(|_| same).collect();
        w.add(&format!("s{s}"), "h", &pieces(&format!("s{s}"), n), &v)
            .unwrap();
    }
    w.commit().unwrap();
    // Dead rows at the front: the first source's are skipped.
    let mut w = Writer::open(&dir).unwrap();
    assert!(w.remove("s0"));
    w.commit().unwrap();
    let index = Index::open(&dir).unwrap();
    let hits = index.search_ids(&same, 1500).unwrap().remove(0);
    let first = index.source("s1").unwrap().ids.start;
    let ids: Vec<usize> = hits.iter().map(|h| h.0).collect();
    let mut live: Vec<usize> = ["s1", "s2", "s3"]
        .iter()
        .flat_map(|s| index.source(s).unwrap().ids)
        .collect();
    live.sort();
    assert_eq!(ids, live[..1500]);
    assert_eq!(ids[0], first);
    assert!(hits.iter().all(|h| h.1 == hits[0].1));
}

/// Per source, in path order: (path, hash, its rows as (first line, last
/// line, text, vector bits)). Ids are left out: compaction renumbers them.
type Snapshot = Vec<(String, String, Vec<(usize, usize, String, Vec<u32>)>)>;

fn snapshot(index: &Index) -> Snapshot {
    index
        .sources()
        .into_iter()
        .map(|s| {
            let rows = s
                .ids
                .clone()
                .map(|id| {
                    let c = index.chunk(id).unwrap();
                    assert_eq!(c.source, s.source);
                    let bits = index.vector(id).unwrap().iter().map(|x| x.to_bits());
                    (c.line_start, c.line_end, c.text, bits.collect())
                })
                .collect();
            (s.source, s.hash, rows)
        })
        .collect()
}

fn data_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "writer.lock")
        .collect();
    names.sort();
    names
}

#[test]
fn add_remove_replace_reopen_and_compact() {
    let mut rng = common::seeded_rng("RAG_INDEX_SEED");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("kb");
    let dim = 6;
    let index = Index::create(&dir, EMBEDDER, dim).unwrap();
    assert!(index.is_empty());
    assert_eq!(index.search_ids(&[1.0; 6], 3).unwrap(), vec![vec![]]);
    assert_eq!(
        data_files(&dir),
        ["chunks-1.jsonl", MANIFEST, "offsets-1.u64", "vectors-1.f32"]
    );

    let va = random_vectors(&mut rng, 10, dim, false);
    let vb = random_vectors(&mut rng, 40, dim, false);
    let mut w = Writer::open(&dir).unwrap();
    w.add("a.md", "ha", &pieces("a.md", 10), &va).unwrap();
    w.add("b.md", "hb", &pieces("b.md", 40), &vb).unwrap();
    w.add("empty.md", "he", &[], &[]).unwrap();
    assert_eq!(w.source_hash("a.md"), Some("ha"));
    // Nothing is visible before the commit.
    assert!(Index::open(&dir).unwrap().is_empty());
    w.commit().unwrap();
    assert!(index.reload().unwrap().is_some());
    let index = Index::open(&dir).unwrap();
    assert!(index.reload().unwrap().is_none());
    assert_eq!(index.len(), 50);
    let names: Vec<(String, String, usize)> = index
        .sources()
        .into_iter()
        .map(|s| (s.source, s.hash, s.ids.len()))
        .collect();
    assert_eq!(
        names,
        [
            ("a.md".into(), "ha".into(), 10),
            ("b.md".into(), "hb".into(), 40),
            ("empty.md".into(), "he".into(), 0)
        ]
    );
    // Row 13 is b.md's piece 3.
    let hits = index.search(&vb[3 * dim..4 * dim], 50).unwrap();
    let hit = hits.iter().find(|h| h.id == 13).unwrap();
    assert_eq!(hit.chunk.source, "b.md");
    assert_eq!(hit.chunk.text, pieces("b.md", 40)[3].text);
    assert_eq!((hit.chunk.line_start, hit.chunk.line_end), (10, 12));

    // A writer dropped without committing changes nothing.
    let before = snapshot(&index);
    let mut w = Writer::open(&dir).unwrap();
    w.add("c.md", "hc", &pieces("c.md", 3), &va[..3 * dim])
        .unwrap();
    assert!(w.remove("a.md"));
    drop(w);
    assert_eq!(snapshot(&Index::open(&dir).unwrap()), before);

    // Replace a.md (10 of 58 rows dead: no compaction), add c.md.
    let va2 = random_vectors(&mut rng, 5, dim, false);
    let mut w = Writer::open(&dir).unwrap();
    w.add("a.md", "ha2", &pieces("a.md", 5), &va2).unwrap();
    w.add("c.md", "hc", &pieces("c.md", 3), &va[..3 * dim])
        .unwrap();
    assert!(!w.remove("nothing.md"));
    w.commit().unwrap();
    let after = Index::open(&dir).unwrap();
    assert_eq!(after.len(), 48);
    assert_eq!(after.source("a.md").unwrap().hash, "ha2");
    assert_eq!(after.source("a.md").unwrap().ids, 50..55);
    assert!(data_files(&dir).contains(&"vectors-1.f32".to_string()));
    // Old a.md chunks are gone from search; the old snapshot still has them.
    let q = &va[..dim];
    for h in after.search(q, 48).unwrap() {
        assert!(h.id >= 10, "dead row {} returned", h.id);
    }
    assert_eq!(snapshot(&index), before);
    assert!(after.vector(0).is_err());
    assert!(message(after.chunk(0).unwrap_err()).contains("no chunk with id 0"));

    // Remove b.md: 50 of 58 rows dead, so the commit compacts.
    let mut w = Writer::open(&dir).unwrap();
    assert!(w.remove("b.md"));
    w.commit().unwrap();
    assert_eq!(
        data_files(&dir),
        ["chunks-2.jsonl", MANIFEST, "offsets-2.u64", "vectors-2.f32"]
    );
    let compacted = Index::open(&dir).unwrap();
    assert_eq!(compacted.len(), 8);
    let mut want = snapshot(&after);
    want.retain(|s| s.0 != "b.md");
    assert_eq!(snapshot(&compacted), want);
    assert_eq!(compacted.source("a.md").unwrap().ids, 0..5);
    // Snapshots opened before still read their (deleted) generation.
    assert_eq!(snapshot(&index), before);
    let old = index.search(q, 100).unwrap();
    assert_eq!(old.len(), 50);
    assert!(old.iter().any(|h| h.id == 0 && h.chunk.source == "a.md"));

    // An explicit compaction of an index with no dead rows keeps it as is.
    let mut w = Writer::open(&dir).unwrap();
    w.compact();
    w.commit().unwrap();
    assert_eq!(snapshot(&Index::open(&dir).unwrap()), want);
    assert!(data_files(&dir).contains(&"vectors-3.f32".to_string()));
}

#[test]
fn a_different_embedder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ix");
    Index::create(&dir, EMBEDDER, 8).unwrap();
    let msg = message(Writer::open_or_create(&dir, "other-model", 8).unwrap_err());
    assert!(
        msg.contains(EMBEDDER) && msg.contains("other-model"),
        "{msg}"
    );
    let msg = message(Writer::open_or_create(&dir, EMBEDDER, 16).unwrap_err());
    assert!(msg.contains("dim 8") && msg.contains("dim 16"), "{msg}");
    let index = Index::open(&dir).unwrap();
    assert!(index.check_embedder(EMBEDDER, 8).is_ok());
    assert!(index.check_embedder(EMBEDDER, 9).is_err());
    let msg = message(Index::open_for(&dir, "other-model", 8).unwrap_err());
    assert!(msg.contains("other-model"), "{msg}");
    assert_eq!(Index::open_for(&dir, EMBEDDER, 8).unwrap().dim(), 8);
    assert!(Writer::open_or_create(&dir, EMBEDDER, 8).is_ok());
    let msg = message(Writer::create(&dir, EMBEDDER, 8).err().unwrap());
    assert!(msg.contains("exists"), "{msg}");
    let msg = message(
        Writer::create(tmp.path().join("z"), EMBEDDER, 0)
            .err()
            .unwrap(),
    );
    assert!(msg.contains("dim 0"), "{msg}");
}

#[test]
fn bad_input_gets_one_clear_line() {
    let mut rng = common::seeded_rng("RAG_INDEX_SEED");
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let msg = message(Index::open(&missing).unwrap_err());
    assert!(
        msg.contains("no index here") && msg.contains("missing"),
        "{msg}"
    );
    let msg = message(Writer::open(&missing).err().unwrap());
    assert!(msg.contains("no index here"), "{msg}");

    let dir = tmp.path().join("ix");
    let dim = 4;
    let v = random_vectors(&mut rng, 50, dim, false);
    let mut w = Writer::create(&dir, EMBEDDER, dim).unwrap();
    w.add("a", "h", &pieces("a", 50), &v).unwrap();
    // Vectors that do not fit the pieces, or hold NaN.
    let msg = message(w.add("b", "h", &pieces("b", 2), &v[..7]).unwrap_err());
    assert!(msg.contains("2 pieces") && msg.contains("got 7"), "{msg}");
    let mut nan = v[..8].to_vec();
    nan[5] = f32::NAN;
    let msg = message(w.add("b", "h", &pieces("b", 2), &nan).unwrap_err());
    assert!(msg.contains("non-finite"), "{msg}");
    w.commit().unwrap();

    let index = Index::open(&dir).unwrap();
    let msg = message(index.search(&[1.0; 3], 2).unwrap_err());
    assert!(msg.contains("3 values") && msg.contains("dim 4"), "{msg}");
    let msg = message(index.search_batch(&[1.0; 7], 2).unwrap_err());
    assert!(msg.contains("7 values"), "{msg}");
    assert!(index.search_batch(&[], 2).is_err());
    let msg = message(
        index
            .search(&[1.0, f32::INFINITY, 0.0, 0.0], 2)
            .unwrap_err(),
    );
    assert!(msg.contains("inf"), "{msg}");
    drop(index);

    // Corruptions, each on a fresh copy.
    let corrupt = |name: &str, f: &dyn Fn(&Path)| -> String {
        let copy = tmp.path().join(name);
        copy_dir(&dir, &copy);
        f(&copy);
        let r = Index::open(&copy).and_then(|ix| {
            ix.search_batch(&v[..8], 50)?;
            Ok(ix)
        });
        message(r.unwrap_err())
    };
    let truncate = |file: &'static str, by: u64| {
        move |d: &Path| {
            let p = d.join(file);
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len - by)
                .unwrap();
        }
    };
    let msg = corrupt("c1", &truncate("vectors-1.f32", 4));
    assert!(
        msg.contains("vectors-1.f32") && msg.contains("truncated"),
        "{msg}"
    );
    let msg = corrupt("c2", &truncate("offsets-1.u64", 8));
    assert!(
        msg.contains("offsets-1.u64") && msg.contains("truncated"),
        "{msg}"
    );
    let msg = corrupt("c3", &truncate("chunks-1.jsonl", 1));
    assert!(
        msg.contains("chunks-1.jsonl") && msg.contains("truncated"),
        "{msg}"
    );
    let msg = corrupt("c4", &|d| {
        std::fs::remove_file(d.join("vectors-1.f32")).unwrap()
    });
    assert!(msg.contains("vectors-1.f32"), "{msg}");
    let msg = corrupt("c5", &|d| {
        std::fs::write(d.join(MANIFEST), "{\"format\": ").unwrap()
    });
    assert!(
        msg.contains(MANIFEST) && msg.contains("not a valid"),
        "{msg}"
    );
    let msg = corrupt("c6", &|d| {
        std::fs::write(d.join(MANIFEST), "[1, 2]").unwrap()
    });
    assert!(msg.contains(MANIFEST) && msg.contains("format"), "{msg}");
    let edit = |from: &'static str, to: &'static str| {
        move |d: &Path| {
            let p = d.join(MANIFEST);
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.contains(from), "{text}");
            std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
        }
    };
    let msg = corrupt("c7", &edit("\"version\": 1", "\"version\": 7"));
    assert!(msg.contains("version 7"), "{msg}");
    let msg = corrupt("c8", &edit("\"rows\": 50", "\"rows\": 60"));
    assert!(msg.contains("truncated"), "{msg}");
    let msg = corrupt("c9", &edit("\"rows\": 50", "\"rows\": 49"));
    assert!(msg.contains("lie past"), "{msg}");
    let msg = corrupt("c10", &edit("\"dim\": 4", "\"dim\": \"four\""));
    assert!(msg.contains(MANIFEST), "{msg}");
    // Garbage inside a chunk record: found when a hit reads it.
    let msg = corrupt("c11", &|d| {
        let p = d.join("chunks-1.jsonl");
        let mut bytes = std::fs::read(&p).unwrap();
        for b in bytes.iter_mut().filter(|b| **b == b'{') {
            *b = b'#';
        }
        std::fs::write(&p, bytes).unwrap();
    });
    assert!(
        msg.contains("chunks-1.jsonl") && msg.contains("row"),
        "{msg}"
    );
    // Offsets out of order.
    let msg = corrupt("c12", &|d| {
        let p = d.join("offsets-1.u64");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, bytes).unwrap();
    });
    assert!(msg.contains("offsets-1.u64"), "{msg}");
    // NaN in the vectors (bit rot) ranks last rather than panicking.
    let copy = tmp.path().join("c13");
    copy_dir(&dir, &copy);
    let p = copy.join("vectors-1.f32");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    let hits = Index::open(&copy)
        .unwrap()
        .search_ids(&[1.0; 4], 50)
        .unwrap();
    assert_eq!(hits[0].len(), 50);
    assert_eq!(hits[0][49].0, 0);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

// ---------------------------------------------------------------- crashes

const CHILD_DIR: &str = "ENGINE_RAG_CRASH_CHILD_DIR";
const CHILD_MODE: &str = "ENGINE_RAG_CRASH_CHILD_MODE";
const CRASH_DIM: usize = 256;

/// The index every crash run starts from: 30 sources of 200 rows.
fn crash_before(dir: &Path) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut w = Writer::create(dir, EMBEDDER, CRASH_DIM).unwrap();
    for s in 0..30 {
        let name = format!("s{s:02}");
        let v = random_vectors(&mut rng, 200, CRASH_DIM, false);
        w.add(&name, "h0", &pieces(&name, 200), &v).unwrap();
    }
    w.commit().unwrap();
}

/// The change a crash run makes, in one commit. Mode 0 appends (two sources
/// replaced, one removed, 40 added); mode 1 replaces most sources, so the
/// commit compacts into a new generation.
/// `opened` runs once the writer holds the lock.
fn crash_change(dir: &Path, mode: u64, opened: impl FnOnce()) {
    let mut rng = StdRng::seed_from_u64(2 + mode);
    let mut w = Writer::open(dir).unwrap();
    opened();
    let (replace, add) = if mode == 0 { (2, 40) } else { (20, 10) };
    for s in 0..replace {
        let name = format!("s{s:02}");
        let v = random_vectors(&mut rng, 150, CRASH_DIM, false);
        w.add(&name, "h1", &pieces(&name, 150), &v).unwrap();
    }
    w.remove("s29");
    for s in 0..add {
        let name = format!("new/n{s:02}");
        let v = random_vectors(&mut rng, 250, CRASH_DIM, false);
        w.add(&name, "h1", &pieces(&name, 250), &v).unwrap();
    }
    w.commit().unwrap();
}

/// Not a test on its own: the writer process the crash test starts (this
/// test binary, run again with the environment naming the index).
#[test]
fn crash_child_writer() {
    let (Ok(dir), Ok(mode)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_MODE)) else {
        return;
    };
    crash_change(Path::new(&dir), mode.parse().unwrap(), || {
        use std::io::Write;
        let mut out = std::io::stdout();
        writeln!(out, "{OPENED}").unwrap();
        out.flush().unwrap();
    });
}

const OPENED: &str = "crash child: writer open";

/// Starts the writer process and waits until it holds the lock: the kills
/// are timed from there, so that they land while it writes.
fn spawn_writer(dir: &Path, mode: u64) -> (std::process::Child, std::time::Instant) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_writer",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child ended before opening the writer"
        );
        // (after libtest's "test crash_child_writer ... " on the same line)
        if line.trim_end().ends_with(OPENED) {
            break;
        }
    }
    // Keep reading (and dropping) its output so it never blocks on a pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, std::time::Instant::now())
}

#[test]
fn a_writer_killed_at_any_moment_leaves_the_index_before_or_after() {
    let mut rng = common::seeded_rng("RAG_INDEX_SEED");
    let tmp = tempfile::tempdir().unwrap();
    let template = tmp.path().join("template");
    crash_before(&template);
    let before = snapshot(&Index::open(&template).unwrap());
    let mut after = Vec::new();
    let mut full_run = Vec::new();
    for mode in 0..2 {
        let dir = tmp.path().join(format!("after{mode}"));
        copy_dir(&template, &dir);
        // Time a whole child write, to spread the kills over it.
        let (mut child, t) = spawn_writer(&dir, mode);
        assert!(child.wait().unwrap().success());
        full_run.push(t.elapsed());
        let snap = snapshot(&Index::open(&dir).unwrap());
        // The same change made in this process gives the same index.
        let again = tmp.path().join(format!("again{mode}"));
        copy_dir(&template, &again);
        crash_change(&again, mode, || {});
        assert_eq!(snapshot(&Index::open(&again).unwrap()), snap);
        assert_ne!(snap, before);
        after.push(snap);
    }
    eprintln!("a whole writer run takes {full_run:?}");
    let bytes = |dir: &Path| -> Vec<(String, u64)> {
        let names = data_files(dir);
        let len = |n: &String| std::fs::metadata(dir.join(n)).unwrap().len();
        names.iter().map(|n| (n.clone(), len(n))).collect()
    };
    let untouched = bytes(&template);
    // Per mode: kills before the writer wrote anything, while it wrote (the
    // index as before), after it committed.
    let mut seen = [[0; 3]; 2];
    for run in 0..30 {
        let mode = run % 2;
        let dir = tmp.path().join(format!("run{run}"));
        copy_dir(&template, &dir);
        let (mut child, t) = spawn_writer(&dir, mode as u64);
        let wait = full_run[mode].mul_f64(rng.random_range(0.0..1.5));
        std::thread::sleep(wait.saturating_sub(t.elapsed()));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let snap = snapshot(&Index::open(&dir).unwrap());
        let which = if snap == before && bytes(&dir) == untouched {
            0
        } else if snap == before {
            1
        } else if snap == after[mode] {
            2
        } else {
            panic!("run {run} (mode {mode}, killed after {wait:?}): neither before nor after");
        };
        seen[mode][which] += 1;
        // The next writer clears what the killed one left and works.
        crash_change(&dir, mode as u64, || {});
        let snap = snapshot(&Index::open(&dir).unwrap());
        assert_eq!(snap, after[mode], "run {run}: the next writer's result");
        let names = data_files(&dir);
        assert_eq!(names.len(), 4, "run {run}: left-over files {names:?}");
    }
    eprintln!(
        "kills before writing / while writing / after the commit: append {:?}, compaction {:?}",
        seen[0], seen[1]
    );
}

// ---------------------------------------------------------------- readers

/// The vector of piece j of source s in the concurrency test: the reader
/// can recompute it from the record it gets back.
fn known_vector(source: &str, j: usize, dim: usize) -> Vec<f32> {
    let seed = source
        .bytes()
        .fold(j as u64, |h, b| h.wrapping_mul(31) + b as u64);
    random_vectors(&mut StdRng::seed_from_u64(seed), 1, dim, false)
}

#[test]
fn readers_search_consistent_snapshots_while_a_writer_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("ix");
    let dim = 16;
    Index::create(&dir, EMBEDDER, dim).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            for round in 0..40 {
                let mut w = Writer::open(&dir).unwrap();
                // Keep 5 sources, rewritten in turn (compactions happen).
                let name = format!("s{}", round % 5);
                let n = 50 + round * 7;
                let p: Vec<Piece> = (0..n)
                    .map(|j| Piece {
                        line_start: j,
                        line_end: j,
                        text: format!("{name}:{j}:{round}"),
                    })
                    .collect();
                let v: Vec<f32> = (0..n)
                    .flat_map(|j| known_vector(&format!("{name}:{j}:{round}"), j, dim))
                    .collect();
                w.add(&name, &format!("{round}"), &p, &v).unwrap();
                w.commit().unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        for t in 0..3 {
            let (dir, done) = (&dir, &done);
            scope.spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                let mut checks = 0;
                let mut index = Index::open(dir).unwrap();
                while !done.load(std::sync::atomic::Ordering::SeqCst) || checks < 5 {
                    if let Some(newer) = index.reload().unwrap() {
                        index = newer;
                    }
                    let sources = index.sources();
                    let total: usize = sources.iter().map(|s| s.ids.len()).sum();
                    assert_eq!(total, index.len());
                    let q = random_vectors(&mut rng, 2, dim, false);
                    for hits in index.search_batch(&q, 20).unwrap() {
                        assert_eq!(hits.len(), 20.min(total));
                        for h in hits {
                            // The record belongs to a source of this snapshot
                            // and matches the row's vector.
                            let s = index.source(&h.chunk.source).unwrap();
                            assert!(s.ids.contains(&h.id));
                            assert_eq!(s.hash, h.chunk.text.rsplit(':').next().unwrap());
                            let want = known_vector(&h.chunk.text, h.chunk.line_start, dim);
                            assert_eq!(index.vector(h.id).unwrap(), &want[..]);
                        }
                    }
                    checks += 1;
                }
            });
        }
        writer.join().unwrap();
    });
}
