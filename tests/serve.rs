//! `engine serve` on SmolLM2, driven by the official `openai` Python client
//! (tests/serve_client.py; scripts/test installs it into .venv-client).
//! Each test starts its own server on a free port of 127.0.0.1.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const MODEL_NAME: &str = "smollm2-135m-instruct";
const QUESTION: &str = "What is the capital of France?";

fn model() -> Option<PathBuf> {
    common::real_model(
        MODEL_NAME,
        &["config.json", "model.safetensors", "tokenizer.json"],
    )
}

/// The client's Python, or None (the test skips) unless
/// ENGINE_REQUIRE_OPENAI=1 (CI), where its absence fails the test.
fn python() -> Option<PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-client/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import openai, httpx"])
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    if std::env::var("ENGINE_REQUIRE_OPENAI").as_deref() == Ok("1") {
        panic!("the openai client is missing: run scripts/test (it installs .venv-client)");
    }
    eprintln!("skipped: no .venv-client with the openai package (scripts/test installs it)");
    None
}

/// A running `engine serve`, killed when dropped.
struct Server {
    child: Child,
    base: String,
    /// The name requests give as `model`.
    name: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_engine"))
            .args(["serve", "--device", "cpu", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The startup line names the address the server listens on.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("engine serve: http://") {
                break rest.split(' ').next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            base: format!("http://{addr}/v1"),
            name: match extra.iter().position(|&a| a == "--served-model-name") {
                Some(i) => extra[i + 1].to_string(),
                None => MODEL_NAME.to_string(),
            },
        }
    }

    /// Runs one mode of serve_client.py against this server.
    fn client(&self, py: &Path, mode: &str, args: &[&str]) {
        let out = Command::new(py)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_client.py"))
            .args([mode, &self.base, &self.name])
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "serve_client.py {mode} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("ok {mode}")), "{stdout}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `engine generate --chat`'s greedy answer to `prompt`, with `extra` flags.
fn generate(model: &Path, extra: &[&str], prompt: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args([
            "generate", "--device", "cpu", "--chat", "--prompt", prompt, "--model",
        ])
        .arg(model)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end_matches('\n')
        .to_string()
}

#[test]
fn the_openai_client_gets_what_engine_generate_gets() {
    let (Some(model), Some(py)) = (model(), python()) else {
        return;
    };
    let expected = generate(&model, &[], QUESTION);
    assert_eq!(expected, "The capital of France is Paris.");
    let server = Server::start(&model, &[]);
    server.client(&py, "api", &[&expected, QUESTION]);
}

#[test]
fn adapters_are_served_by_name_and_loaded_by_name_only() {
    let (Some(model), Some(py)) = (model(), python()) else {
        return;
    };
    let fixture = common::fixture("smollm2_lora/adapter");
    let question = "What do bees make?";
    let base = generate(&model, &["--max-tokens", "30"], question);
    let with_adapter = generate(
        &model,
        &["--max-tokens", "30", "--adapter", fixture.to_str().unwrap()],
        question,
    );
    assert_ne!(base, with_adapter, "the fixture adapter changes the answer");
    // --adapter-dir holds a copy as "dyn", and "escape", a link to a copy
    // outside it.
    let tmp = tempfile::tempdir().unwrap();
    let (dir, outside) = (tmp.path().join("adapters"), tmp.path().join("outside"));
    for d in [dir.join("dyn"), outside.clone()] {
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixture.join(f), d.join(f)).unwrap();
        }
    }
    std::os::unix::fs::symlink(&outside, dir.join("escape")).unwrap();
    let named = format!("cap={}", fixture.display());
    let server = Server::start(
        &model,
        &["--adapter", &named, "--adapter-dir", dir.to_str().unwrap()],
    );
    server.client(&py, "adapters", &[&base, &with_adapter, question]);
}

#[test]
fn retrieval_embeddings_and_documents_while_serving() {
    let (Some(model), Some(py)) = (model(), python()) else {
        return;
    };
    let Some(embedder) = common::real_model(
        "all-minilm-l6-v2",
        &["config.json", "model.safetensors", "tokenizer.json"],
    ) else {
        return;
    };
    // What `engine embed` gives, for the server's vectors to equal.
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args([
            "embed",
            "--json",
            "--text",
            "hello world",
            "--text",
            "Bees make honey.",
            "--model",
        ])
        .arg(&embedder)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    let expected = tmp.path().join("expected.json");
    std::fs::write(&expected, &out.stdout).unwrap();
    let index = tmp.path().join("index");
    let server = Server::start(
        &model,
        &[
            "--index",
            index.to_str().unwrap(),
            "--embedder",
            embedder.to_str().unwrap(),
        ],
    );
    server.client(
        &py,
        "rag",
        &["all-minilm-l6-v2", expected.to_str().unwrap()],
    );
    // A source is a label: nothing was written outside the index.
    let mut entries: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["expected.json", "index"]);
}

#[test]
fn concurrent_streams_with_and_without_an_adapter_each_get_their_solo_text() {
    let (Some(model), Some(py)) = (model(), python()) else {
        return;
    };
    let named = format!("cap={}", common::fixture("smollm2_lora/adapter").display());
    let server = Server::start(&model, &["--max-batch-tokens", "256", "--adapter", &named]);
    server.client(&py, "concurrent", &[]);
}

#[test]
fn a_client_that_disconnects_frees_its_blocks() {
    let (Some(model), Some(py)) = (model(), python()) else {
        return;
    };
    let server = Server::start(&model, &[]);
    server.client(&py, "disconnect", &[]);
}

#[test]
fn an_api_key_is_required_when_set() {
    let (Some(model), Some(py)) = (model(), python()) else {
        return;
    };
    // Also --host and --served-model-name: the client must use the new name.
    let server = Server::start(
        &model,
        &[
            "--api-key",
            "sesame",
            "--host",
            "127.0.0.1",
            "--served-model-name",
            "house-model",
        ],
    );
    server.client(&py, "auth", &["sesame"]);
}

#[test]
fn a_full_queue_answers_429() {
    let (Some(model), Some(py)) = (model(), python()) else {
        return;
    };
    let server = Server::start(&model, &["--max-seqs", "1", "--max-queue", "0"]);
    server.client(&py, "overload", &[]);
}

#[test]
fn sigterm_finishes_the_streams_in_flight_and_exits_0() {
    let (Some(model), Some(py)) = (model(), python()) else {
        return;
    };
    let mut server = Server::start(&model, &[]);
    let mut client = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_client.py"))
        .args(["stream_until_killed", &server.base, MODEL_NAME])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "streaming");
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(client.wait().unwrap().success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.starts_with("finished length")),
        "the stream did not finish: {rest:?}"
    );
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn bad_flags_get_one_line() {
    let Some(model) = model() else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["serve", "--device", "cpu", "--kv-cache-mib", "0", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kv-cache-mib"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
