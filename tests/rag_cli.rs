//! `engine index add|rm|ls|search` end to end on the example knowledge base
//! (examples/quillmark-kb) with the real all-MiniLM-L6-v2 embedder, and the
//! commands' errors on bad input. Skipped when the embedder is absent, unless
//! ENGINE_REQUIRE_MODELS=1 (CI).

mod common;

use common::{engine, engine_command, engine_ok};
use std::path::{Path, PathBuf};

fn embedder_dir() -> Option<PathBuf> {
    common::real_model("all-minilm-l6-v2", &["model.safetensors"])
}

/// Fails cleanly: exit code 1, one line of stderr holding every needle.
fn fails(args: &[&str], needles: &[&str]) {
    common::assert_fails_with(&engine(args), needles);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `engine index search --json`'s hits.
fn search_json(
    index: &Path,
    emb: &Path,
    k: usize,
    device: &str,
    query: &str,
) -> Vec<serde_json::Value> {
    let k = k.to_string();
    let out = engine_ok(&[
        "index",
        "search",
        "--index",
        s(index),
        "--embedder",
        s(emb),
        "-k",
        &k,
        "--json",
        "--device",
        device,
        query,
    ]);
    serde_json::from_str(&out).unwrap()
}

/// The retrieval check: for every example question the document
/// holding its answer is among the top 3 chunks' sources.
#[test]
fn every_example_question_finds_its_source_in_the_top_3() {
    let Some(emb) = embedder_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("kb");
    engine_ok(&[
        "index",
        "add",
        "--index",
        s(&index),
        "--embedder",
        s(&emb),
        "examples/quillmark-kb/docs",
    ]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quillmark-kb");
    let questions = std::fs::read_to_string(root.join("questions.jsonl")).unwrap();
    // With the emulator built in, the first questions also go through the
    // CUDA device: embedded there, searched by its GEMM and top-k kernels.
    let devices: &[&str] = if cfg!(feature = "emu") {
        &["cpu", "emu"]
    } else {
        &["cpu"]
    };
    for (i, line) in questions.lines().enumerate() {
        let q: serde_json::Value = serde_json::from_str(line).unwrap();
        let (question, source) = (
            q["question"].as_str().unwrap(),
            q["source"].as_str().unwrap(),
        );
        for &device in if i < 2 { devices } else { &["cpu"] } {
            let hits = search_json(&index, &emb, 3, device, question);
            let want = format!("examples/quillmark-kb/{source}");
            assert!(
                hits.iter().any(|h| h["source"] == want.as_str()),
                "{question:?} on {device}: {want} not in the top 3: {hits:#?}"
            );
        }
    }
}

/// add, add again (unchanged), change a file (replaced), rm, ls.
#[test]
fn add_replace_remove_and_list() {
    let Some(emb) = embedder_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (index, docs) = (tmp.path().join("kb"), tmp.path().join("docs"));
    std::fs::create_dir_all(docs.join("sub")).unwrap();
    std::fs::write(
        docs.join("a.md"),
        "# Alpha\n\nThe alpha valve opens at 3 bar.\n",
    )
    .unwrap();
    std::fs::write(
        docs.join("sub/b.txt"),
        "The beta pump runs at 40 litres a minute.\n",
    )
    .unwrap();
    std::fs::write(docs.join("empty.txt"), "  \n\n").unwrap();
    let add = [
        "index",
        "add",
        "--index",
        s(&index),
        "--embedder",
        s(&emb),
        s(&docs),
    ];
    let first = engine(&add);
    assert!(first.status.success());
    assert!(String::from_utf8_lossy(&first.stdout).contains("added 2 file(s)"));
    assert!(String::from_utf8_lossy(&first.stderr).contains("empty.txt: no text, skipped"));
    assert!(engine_ok(&add).contains("added 0 file(s) (0 chunks), 2 unchanged"));
    std::fs::write(
        docs.join("a.md"),
        "# Alpha\n\nThe alpha valve now opens at 5 bar.\n",
    )
    .unwrap();
    assert!(engine_ok(&add).contains("added 1 file(s) (1 chunks), 1 unchanged"));
    let search = |q: &str| search_json(&index, &emb, 5, "cpu", q);
    let hits = search("At what pressure does the alpha valve open?");
    assert_eq!(hits.len(), 2);
    assert!(
        hits[0]["text"].as_str().unwrap().contains("5 bar"),
        "{hits:?}"
    );
    engine_ok(&["index", "rm", "--index", s(&index), s(&docs.join("sub"))]);
    let ls = engine_ok(&["index", "ls", "--index", s(&index)]);
    assert!(
        ls.contains("1 chunk(s) from 1 file(s)") && ls.contains("a.md") && !ls.contains("b.txt"),
        "{ls}"
    );
    assert_eq!(search("beta pump").len(), 1);
}

/// Bad input gets one line and exit code 1, and the index is left as it was.
#[test]
fn bad_input_fails_cleanly() {
    let Some(emb) = embedder_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("kb");
    let missing = tmp.path().join("nope");
    fails(
        &[
            "index",
            "search",
            "--index",
            s(&missing),
            "--embedder",
            s(&emb),
            "anything",
        ],
        &["nope"],
    );
    fails(&["index", "ls", "--index", s(&missing)], &["nope"]);
    fails(
        &[
            "index",
            "add",
            "--index",
            s(&index),
            "--embedder",
            s(&emb),
            s(&missing),
        ],
        &["nope"],
    );
    let binary = tmp.path().join("blob.txt");
    std::fs::write(&binary, [0x89u8, b'P', b'N', b'G', 0, 1, 2, 3]).unwrap();
    fails(
        &[
            "index",
            "add",
            "--index",
            s(&index),
            "--embedder",
            s(&emb),
            s(&binary),
        ],
        &["blob.txt", "binary"],
    );
    let odd = tmp.path().join("data.bin");
    std::fs::write(&odd, "text").unwrap();
    fails(
        &[
            "index",
            "add",
            "--index",
            s(&index),
            "--embedder",
            s(&emb),
            s(&odd),
        ],
        &["data.bin"],
    );

    // An index built with one embedder refuses another (here: the same
    // weights under a changed configuration, so another identity).
    let good = tmp.path().join("good.md");
    std::fs::write(&good, "The gamma gate closes at dusk.\n").unwrap();
    engine_ok(&[
        "index",
        "add",
        "--index",
        s(&index),
        "--embedder",
        s(&emb),
        s(&good),
    ]);
    let other = tmp.path().join("other-embedder");
    std::fs::create_dir_all(other.join("1_Pooling")).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        std::fs::copy(emb.join(f), other.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(emb.join("config.json")).unwrap();
    std::fs::write(other.join("config.json"), config.replace("1e-12", "1e-11")).unwrap();
    fails(
        &[
            "index",
            "search",
            "--index",
            s(&index),
            "--embedder",
            s(&other),
            "gate",
        ],
        &["embedder"],
    );
    fails(
        &[
            "index",
            "add",
            "--index",
            s(&index),
            "--embedder",
            s(&other),
            s(&good),
        ],
        &["embedder"],
    );
    fails(
        &["index", "rm", "--index", s(&index), "not-there.md"],
        &["not-there.md"],
    );
    assert!(engine_ok(&["index", "ls", "--index", s(&index)]).contains("1 chunk(s) from 1 file(s)"));
}

/// `engine ask --json`: the retrieved passages (numbered, with source,
/// lines and score), the answer, and only citations of those passages. The
/// answer's quality is not asserted: SmolLM2-135M reads passages poorly.
#[test]
fn ask_answers_from_passages_and_lists_citations() {
    let Some(emb) = embedder_dir() else { return };
    let Some(model) = common::real_model("smollm2-135m-instruct", &["model.safetensors"]) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("kb");
    engine_ok(&[
        "index",
        "add",
        "--index",
        s(&index),
        "--embedder",
        s(&emb),
        "examples/quillmark-kb/docs",
    ]);
    let question = "What is the hotel limit per night in Tier-1 cities?";
    let out = engine_ok(&[
        "ask",
        "--model",
        s(&model),
        "--index",
        s(&index),
        "--embedder",
        s(&emb),
        "-k",
        "2",
        "--max-tokens",
        "40",
        "--device",
        "cpu",
        "--json",
        question,
    ]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!doc["answer"].as_str().unwrap().is_empty());
    let passages = doc["passages"].as_array().unwrap();
    assert_eq!(passages.len(), 2);
    assert_eq!(passages[0]["n"], 1);
    assert_eq!(
        passages[0]["source"],
        "examples/quillmark-kb/docs/travel-policy.md"
    );
    for c in doc["citations"].as_array().unwrap() {
        assert!(passages.contains(c), "{c} is not a retrieved passage");
    }
    let missing = tmp.path().join("nope");
    fails(
        &[
            "ask",
            "--model",
            s(&model),
            "--index",
            s(&missing),
            "--embedder",
            s(&emb),
            "--device",
            "cpu",
            question,
        ],
        &["nope"],
    );
}

/// `engine index add` killed (SIGKILL) at moments spread over its run leaves
/// an index that opens and holds exactly what it held before the add or all
/// of the add; the next add finishes the job.
#[cfg(unix)]
#[test]
fn index_add_killed_at_any_moment_leaves_before_or_after() {
    use engine::rag::index::Index;
    use std::collections::BTreeSet;
    let Some(emb) = embedder_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (first, more) = (tmp.path().join("first"), tmp.path().join("more"));
    std::fs::create_dir_all(&first).unwrap();
    std::fs::create_dir_all(&more).unwrap();
    for i in 0..3 {
        std::fs::write(
            first.join(format!("f{i}.md")),
            format!("# File {i}\n\nFact number {i}.\n"),
        )
        .unwrap();
    }
    for i in 0..20 {
        let body: String = (0..12)
            .map(|j| format!("Paragraph {j} of note {i} about valve {}.\n\n", i * 7 + j))
            .collect();
        std::fs::write(
            more.join(format!("n{i:02}.md")),
            format!("# Note {i}\n\n{body}"),
        )
        .unwrap();
    }
    let base = tmp.path().join("base");
    engine_ok(&[
        "index",
        "add",
        "--index",
        s(&base),
        "--embedder",
        s(&emb),
        s(&first),
    ]);
    let sources = |dir: &Path| -> BTreeSet<String> {
        Index::open(dir)
            .unwrap()
            .sources()
            .into_iter()
            .map(|s| s.source)
            .collect()
    };
    let before = sources(&base);
    let copy = |to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(&base).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    // The whole add, timed, gives the after state and the kill window.
    let full = tmp.path().join("full");
    copy(&full);
    // `engine index add` of the new documents into the index at `dir`.
    fn add<'a>(dir: &'a Path, emb: &'a Path, more: &'a Path) -> [&'a str; 7] {
        [
            "index",
            "add",
            "--index",
            s(dir),
            "--embedder",
            s(emb),
            s(more),
        ]
    }
    let start = std::time::Instant::now();
    engine_ok(&add(&full, &emb, &more));
    let window = start.elapsed();
    let after = sources(&full);
    assert_eq!(after.len(), before.len() + 20);
    let (mut saw_before, mut saw_after) = (0, 0);
    // Kills spread from the start to past the end of the timed add's run.
    for i in 0..6 {
        let dir = tmp.path().join(format!("kill{i}"));
        copy(&dir);
        let mut child = engine_command(&add(&dir, &emb, &more))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(window.mul_f64(i as f64 / 4.0));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let now = sources(&dir);
        assert!(
            now == before || now == after,
            "kill {i}: {} sources",
            now.len()
        );
        if now == before {
            saw_before += 1
        } else {
            saw_after += 1
        }
        engine_ok(&add(&dir, &emb, &more));
        assert_eq!(sources(&dir), after, "kill {i}: the next add finishes");
    }
    eprintln!("killed 6 adds: {saw_before} left the before state, {saw_after} the after state");
    assert!(saw_before > 0, "no kill landed before the commit");
}
