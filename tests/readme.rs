//! Every command in README.md's ```sh blocks runs, as written, and exits 0:
//! a README example can no longer break silently.
//!
//! How: the blocks are read from README.md (a line ending in `\` goes on on
//! the next; `#` lines are comments), and each command runs through
//! `bash -c`, in order, in a fresh folder that holds README.md, a copy of
//! examples/ and links to models/ and tests/, so that what the commands
//! write (runs/…) lands there and every run starts clean. The one rewrite:
//! `target/release/engine` and `cargo run --release --` become the engine
//! binary under test (the build this test belongs to).
//!
//! A command that ends in `&` (`engine serve … &`) starts in the
//! background, its output in a log file, and is killed when the test ends;
//! the commands after it wait for it as README's do (`curl --retry`).
//!
//! A command that cannot run here is listed in SKIPPED with the reason; a
//! README command neither run nor listed cannot exist, and neither can a
//! SKIPPED entry that matches no command. The slow ones (minutes of
//! training) run with ENGINE_README_SLOW=1. The real models are needed:
//! without them the test is skipped, unless ENGINE_REQUIRE_MODELS=1 (CI).
//! `cargo test --release --test readme -- --nocapture` shows each command's
//! time.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Commands not run, matched by their start, and why.
const SKIPPED: &[(&str, &str)] = &[
    (
        "scripts/test",
        "the whole test suite, which runs this test",
    ),
    (
        "scripts/cuda-tools.sh",
        "scripts/test runs it before the tests (it downloads ~310 MB of CUDA wheels into .cuda/)",
    ),
    (
        "target/release/engine kernels check --arch sm_80,sm_90",
        "scripts/test runs this exact command before the tests, and tests/kernels_check.rs checks it",
    ),
    (
        "cargo build --release --features emu",
        "a build: this test runs in one (the emulator command after it runs when that build has --features emu)",
    ),
    (
        "benches/",
        "benchmarks: they install PyTorch, sentence-transformers or faiss into .venv and time for minutes",
    ),
    (
        "cargo bench",
        "benchmarks: minutes in the emulator; the --device cuda line needs a GPU",
    ),
];

/// Commands that take minutes on the 2-core development VM: run with
/// ENGINE_README_SLOW=1, else skipped saying so.
const SLOW: &[(&str, &str)] = &[
    (
        "target/release/engine finetune --model models/smollm2-135m-instruct --data examples/cite/train.jsonl",
        "7 min of LoRA training",
    ),
    (
        "target/release/engine ask --model models/smollm2-135m-instruct --adapter runs/cite-lora",
        "needs runs/cite-lora, the 7-minute run above",
    ),
    (
        "python3 examples/cite/evaluate.py",
        "3 min of generation, and needs runs/cite-lora",
    ),
];

/// What some commands must print on stdout (README says so next to them).
const EXPECT: &[(&str, &str)] = &[
    (
        "curl -s http://127.0.0.1:8080/v1/chat/completions",
        "The capital of France is Paris.",
    ),
    (
        ".venv-client/bin/python examples/serve/client.py",
        "captain: Ahoy! Stockholm be the capital of Sweden",
    ),
    (
        "curl -s http://127.0.0.1:8080/v1/adapters",
        "\"id\":\"captain\"",
    ),
    (
        "models/fetch.sh && cargo run --release -- generate",
        "The capital of France is Paris.",
    ),
    (
        "target/release/engine quantize --model models/smollm2-135m-instruct --type q4_k",
        "(61 F32, 16 Q4_K, 166 Q5_0, 14 Q6_K, 15 Q8_0;",
    ),
    (
        "target/release/engine generate --model runs/smollm2-q4_k",
        " Paris.\n\nThe answer is:",
    ),
    (
        "target/release/engine info --model models/smollm2-135m-instruct",
        "<|im_start|>assistant",
    ),
    (
        "target/release/engine index search --index runs/kb",
        "examples/quillmark-kb/docs/travel-policy.md:18-21",
    ),
    (
        "target/release/engine ask --model models/smollm2-135m-instruct --index runs/kb",
        "€180",
    ),
    (
        "target/release/engine generate --model models/smollm2-135m-instruct --chat --prompt \"What is the capital of France?\" --device emu",
        "Paris",
    ),
];

/// The commands of README.md's ```sh blocks, continuation lines joined and
/// runs of spaces made one.
fn readme_commands(readme: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut current = String::new();
    for line in readme.lines() {
        if !in_sh {
            in_sh = line.trim_end() == "```sh";
            continue;
        }
        if line.starts_with("```") {
            assert!(current.is_empty(), "a ```sh block ends in '\\': {current}");
            in_sh = false;
            continue;
        }
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                commands.push(current.split_whitespace().collect::<Vec<_>>().join(" "));
                current.clear();
            }
        }
    }
    commands
}

fn lookup<'a>(table: &'a [(&str, &str)], command: &str) -> Option<&'a str> {
    table
        .iter()
        .find(|(start, _)| command.starts_with(start))
        .map(|&(_, v)| v)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            if entry.file_name() != "__pycache__" {
                copy_dir(&src, &dst);
            }
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The servers a README block starts in the background, killed at the end
/// (a failing command too).
struct Background(Vec<std::process::Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn every_readme_command_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let smollm = "smollm2-135m-instruct";
    let needs = [
        (smollm, &["model.safetensors", "tokenizer.json"][..]),
        (
            "all-minilm-l6-v2",
            &["model.safetensors", "tokenizer.json"][..],
        ),
        (".downloads", &["SmolLM2-135M-Instruct.Q4_1.gguf"][..]),
    ];
    for (name, files) in needs {
        if common::real_model(name, files).is_none() {
            return;
        }
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let commands = readme_commands(&readme);
    assert!(
        commands.len() > 30,
        "only {} commands found",
        commands.len()
    );
    for (start, _) in SKIPPED.iter().chain(SLOW).chain(EXPECT) {
        assert!(
            commands.iter().any(|c| c.starts_with(start)),
            "{start:?} matches no command of README.md: update the table"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    std::fs::copy(root.join("README.md"), work.join("README.md")).unwrap();
    copy_dir(&root.join("examples"), &work.join("examples"));
    for dir in ["models", "tests", ".venv-client"] {
        std::os::unix::fs::symlink(root.join(dir), work.join(dir)).unwrap();
    }
    let mut background = Background(Vec::new());
    let engine = PathBuf::from(env!("CARGO_BIN_EXE_engine"));
    let engine = engine.to_str().unwrap();
    let slow = std::env::var("ENGINE_README_SLOW").as_deref() == Ok("1");
    let start = Instant::now();
    let (mut ran, mut skipped) = (0, 0);
    for command in &commands {
        let why = lookup(SKIPPED, command)
            .map(str::to_string)
            .or_else(|| match lookup(SLOW, command) {
                Some(why) if !slow => Some(format!("{why} (ENGINE_README_SLOW=1 runs it)")),
                _ => None,
            })
            .or_else(|| {
                (command.contains("--device emu") && !cfg!(feature = "emu"))
                    .then(|| "--device emu needs the test built with --features emu".into())
            });
        if let Some(why) = why {
            eprintln!("skipped: {command}\n         {why}");
            skipped += 1;
            continue;
        }
        // (In this order: the binary's own path ends in target/release/engine.)
        let script = command
            .replace("target/release/engine", engine)
            .replace("cargo run --release --", engine);
        if let Some(script) = script.strip_suffix('&') {
            let log = std::fs::File::create(work.join(format!("background-{ran}.log"))).unwrap();
            let child = Command::new("bash")
                .args(["-c", &format!("exec {script}")])
                .current_dir(work)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            eprintln!("started: {command}");
            background.0.push(child);
            ran += 1;
            continue;
        }
        let t = Instant::now();
        let out = Command::new("bash")
            .args(["-c", &format!("set -euo pipefail\n{script}")])
            .current_dir(work)
            .output()
            .unwrap();
        eprintln!("{:>7.1} s  {command}", t.elapsed().as_secs_f64());
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && !stderr.contains("panicked"),
            "README command failed ({}):\n{command}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        );
        if let Some(want) = lookup(EXPECT, command) {
            assert!(
                stdout.contains(want),
                "README command:\n{command}\nprinted no {want:?}:\n{stdout}"
            );
        }
        ran += 1;
    }
    // `python3 examples/cite/make_data.py` regenerates the training set
    // "byte for byte", README says.
    for f in ["train.jsonl", "eval.jsonl"] {
        let rel = Path::new("examples/cite").join(f);
        assert!(
            std::fs::read(work.join(&rel)).unwrap() == std::fs::read(root.join(&rel)).unwrap(),
            "make_data.py did not reproduce {}",
            rel.display()
        );
    }
    eprintln!(
        "{ran} README commands ran in {:.0} s; {skipped} skipped",
        start.elapsed().as_secs_f64()
    );
}
