//! The command line on the tiny models: what works, and that bad input gets
//! one line naming the file and what is wrong, with a non-zero exit — never a
//! panic.

mod common;

use common::{fixture, Golden};
use std::path::{Path, PathBuf};
use std::process::Output;

/// Runs engine; model commands get `--device cpu`, so that stderr holds only
/// what the test is about (`auto` adds a line naming the device it chose).
fn engine(args: &[&str]) -> Output {
    let mut cmd = common::engine_command(args);
    if matches!(args.first(), Some(&"generate" | &"score")) {
        cmd.args(["--device", "cpu"]);
    }
    cmd.output().unwrap()
}

/// A copy of a tiny model folder with the test tokenizer, for tests that break it.
fn model_copy(variant: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model_copy(variant, &tmp.path().join("model"));
    (tmp, dir)
}

/// Rewrites the config.json of a model copy; returns its path.
fn edit_config(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, edit(text)).unwrap();
    cfg
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const TEXT: &str = "w11 w250 w3 w77 w77 w140 w9 w319 w0 w42";

#[test]
fn score_json_matches_library_and_golden_model() {
    let (_tmp, dir) = model_copy("model");
    let out = engine(&["score", "--model", s(&dir), "--json", "--text", TEXT]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u64> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids, [11, 250, 3, 77, 77, 140, 9, 319, 0, 42]);
    let lps: Vec<f64> = v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(lps.len(), 9);
    assert!(lps.iter().all(|&l| l < 0.0 && l.is_finite()));
    let nll = v["nll"].as_f64().unwrap();
    assert!((nll + lps.iter().sum::<f64>()).abs() < 1e-6);
    assert!((v["ppl"].as_f64().unwrap() - (nll / 9.0).exp()).abs() < 1e-6);
}

#[test]
fn score_file_equals_score_text() {
    let (tmp, dir) = model_copy("model");
    let file = tmp.path().join("text.txt");
    std::fs::write(&file, TEXT).unwrap();
    let a = engine(&["score", "--model", s(&dir), "--json", "--text", TEXT]);
    let b = engine(&["score", "--model", s(&dir), "--json", "--file", s(&file)]);
    assert!(a.status.success() && b.status.success());
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn greedy_generation_is_deterministic_and_seeded_sampling_reproducible() {
    let (_tmp, dir) = model_copy("untied");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            s(&dir),
            "--prompt",
            "w1 w2 w3",
            "--max-tokens",
            "12",
        ];
        args.extend_from_slice(extra);
        let out = engine(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let greedy = run(&[]);
    assert_eq!(greedy.split_whitespace().count(), 12, "{greedy:?}");
    assert_eq!(greedy, run(&["--temperature", "0"]));
    let sampled = [
        "--temperature",
        "1.5",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "3",
    ];
    assert_eq!(run(&sampled), run(&sampled));
}

#[test]
fn info_describes_the_model() {
    let (_tmp, dir) = model_copy("sharded_bf16");
    let out = engine(&["info", "--model", s(&dir)]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "parameters        106816",
        "bf16",
        "/ 2 (head dim 16)",
        "context length    128",
        "chat template     none (generate --chat and ask need one)",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

#[test]
fn info_shows_the_chat_template() {
    let (_tmp, dir) = model_copy("model");
    let template =
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let cfg = serde_json::json!({"chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let out = engine(&["info", "--model", s(&dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "chat template     yes: below",
        "    {% for m in messages %}<|im_start|>{{ m.role }}",
        "  user \"Hello!\" becomes:",
        "    <|im_start|>user\n    Hello!<|im_end|>\n    <|im_start|>assistant",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

/// A folder that does not exist gets the same one line from every command
/// that takes one, naming the flag's kind of folder and the path.
#[test]
fn missing_folders_say_so_in_every_command() {
    let (tmp, dir) = model_copy("model");
    let nope = tmp.path().join("nope");
    let (nope, dir) = (s(&nope), s(&dir));
    let adapter = fixture("lora/peft_adapter");
    let adapter = s(&adapter);
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, "{\"text\": \"w1 w2\"}\n").unwrap();
    let out_dir = tmp.path().join("out");
    let (data, out_dir) = (s(&data), s(&out_dir));
    let model = format!("model folder {nope} does not exist");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["score", "--model", nope, "--text", TEXT],
            model.clone(),
        ),
        (
            vec!["generate", "--model", nope, "--prompt", "w1"],
            model.clone(),
        ),
        (vec!["info", "--model", nope], model.clone()),
        (vec!["embed", "--model", nope, "--text", "x"], model.clone()),
        (
            vec![
                "merge",
                "--model",
                nope,
                "--adapter",
                adapter,
                "--out",
                out_dir,
            ],
            model.clone(),
        ),
        (
            vec![
                "finetune",
                "--model",
                nope,
                "--data",
                data,
                "--lora-rank",
                "2",
                "--out",
                out_dir,
            ],
            model.clone(),
        ),
        (
            vec![
                "ask",
                "--model",
                nope,
                "--index",
                nope,
                "--embedder",
                dir,
                "q",
            ],
            model.clone(),
        ),
        (
            vec!["score", "--model", dir, "--adapter", nope, "--text", TEXT],
            format!("adapter folder {nope} does not exist"),
        ),
        (
            vec!["merge", "--model", dir, "--adapter", nope, "--out", out_dir],
            format!("adapter folder {nope} does not exist"),
        ),
        (
            vec!["index", "add", "--index", out_dir, "--embedder", nope, dir],
            format!("embedder folder {nope} does not exist"),
        ),
        (
            vec![
                "index",
                "search",
                "--index",
                out_dir,
                "--embedder",
                nope,
                "q",
            ],
            format!("embedder folder {nope} does not exist"),
        ),
    ];
    for (args, want) in cases {
        let out = engine(&args);
        common::assert_fails_with(&out, &[&format!("error: {want}")]);
    }
    // A path under models/ points at the script that makes the real models.
    let out = engine(&["info", "--model", "models/no-such-model"]);
    common::assert_fails_with(
        &out,
        &[
            "model folder models/no-such-model does not exist",
            "models/fetch.sh",
        ],
    );
}

#[test]
fn truncated_safetensors() {
    let (_tmp, dir) = model_copy("model");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        let out = engine(&["score", "--model", s(&dir), "--text", TEXT]);
        common::assert_fails_with(&out, &[s(&file), "not a valid safetensors file"]);
    }
}

#[test]
fn tensor_with_the_wrong_shape() {
    let (_tmp, dir) = model_copy("model");
    edit_config(&dir, |t| {
        t.replace("\"intermediate_size\": 160", "\"intermediate_size\": 161")
    });
    let out = engine(&["score", "--model", s(&dir), "--text", TEXT]);
    common::assert_fails_with(
        &out,
        &[
            "model.safetensors",
            "gate_proj.weight has shape [160, 64], expected [161, 64]",
        ],
    );
}

#[test]
fn missing_tensor() {
    let (_tmp, dir) = model_copy("untied");
    edit_config(&dir, |t| {
        t.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3")
    });
    let out = engine(&["score", "--model", s(&dir), "--text", TEXT]);
    common::assert_fails_with(
        &out,
        &[
            "model.safetensors",
            "tensor model.layers.2.input_layernorm.weight is missing",
        ],
    );
}

#[test]
fn missing_config_field() {
    let (_tmp, dir) = model_copy("model");
    let cfg = edit_config(&dir, |t| {
        let mut v: serde_json::Value = serde_json::from_str(&t).unwrap();
        v.as_object_mut().unwrap().remove("hidden_size");
        v.to_string()
    });
    let out = engine(&["score", "--model", s(&dir), "--text", TEXT]);
    common::assert_fails_with(&out, &[s(&cfg), "missing or zero field \"hidden_size\""]);
}

#[test]
fn unknown_architecture() {
    let (_tmp, dir) = model_copy("model");
    let cfg = edit_config(&dir, |t| {
        t.replace("\"llama\"", "\"gpt2\"")
            .replace("LlamaForCausalLM", "GPT2LMHeadModel")
    });
    let out = engine(&["info", "--model", s(&dir)]);
    common::assert_fails_with(&out, &[s(&cfg), "unsupported architecture GPT2LMHeadModel"]);
}

#[test]
fn corrupt_config_json() {
    let (_tmp, dir) = model_copy("model");
    let cfg = edit_config(&dir, |_| "{\"model_type\": \"llama\", ".into());
    let out = engine(&["score", "--model", s(&dir), "--text", TEXT]);
    common::assert_fails_with(&out, &[s(&cfg), "not a valid config.json"]);
}

#[test]
fn bad_flags_and_text() {
    let (tmp, dir) = model_copy("model");
    let out = engine(&[
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "w1",
        "--top-p",
        "1.5",
    ]);
    common::assert_fails_with(&out, &["--top-p"]);
    let out = engine(&["score", "--model", s(&dir), "--text", "w1"]);
    common::assert_fails_with(&out, &["at least 2 tokens"]);
    let missing = tmp.path().join("nope.txt");
    let out = engine(&["score", "--model", s(&dir), "--file", s(&missing)]);
    common::assert_fails_with(&out, &[s(&missing)]);
    // A prompt longer than the context (128 positions).
    let long = vec!["w5"; 200].join(" ");
    let out = engine(&["generate", "--model", s(&dir), "--prompt", &long]);
    common::assert_fails_with(&out, &["context"]);
    // A scoring window the model cannot hold, or too small to predict.
    for w in ["129", "1"] {
        let out = engine(&["score", "--model", s(&dir), "--text", TEXT, "--window", w]);
        common::assert_fails_with(&out, &["window of", "context of 128"]);
    }
}

/// A negative count reaches the flag's parser, whose message names the
/// value and the flag; clap used to answer "unexpected argument '-5'".
#[test]
fn negative_counts_name_the_value() {
    let (_tmp, dir) = model_copy("model");
    for (flag, cmd) in [
        ("--max-tokens", "generate"),
        ("--top-k", "generate"),
        ("--window", "score"),
    ] {
        let mut args = vec!["--model", s(&dir), flag, "-5"];
        args.insert(0, cmd);
        args.extend(if cmd == "generate" {
            ["--prompt", "w1"]
        } else {
            ["--text", TEXT]
        });
        let out = engine(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("invalid value '-5' for '{flag} <"))
                && err.contains("must be 0 or more"),
            "{err}"
        );
        assert!(!err.contains("unexpected argument"), "{err}");
    }
    let out = engine(&[
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "w1",
        "--max-tokens",
        "2.5",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a whole number"));
    // A negative float reaches the command's own check.
    let out = engine(&[
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "w1",
        "--temperature",
        "-1",
    ]);
    common::assert_fails_with(&out, &["--temperature must be a number ≥ 0, got -1"]);
}

/// --max-tokens 0 generates nothing, and the rate line has no rate for
/// what was not timed (it printed "100000000" tok/s for the prompt).
#[test]
fn zero_max_tokens_generates_nothing() {
    let (_tmp, dir) = model_copy("model");
    let out = engine(&[
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "w1 w2 w3",
        "--max-tokens",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "[prompt 3 tokens | generated 0 tokens]\n"
    );
    // With tokens, both rates are there, and finite.
    let out = engine(&[
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "w1 w2 w3",
        "--max-tokens",
        "4",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("[prompt 3 tokens, ") && err.contains("| generated 4 tokens, "),
        "{err}"
    );
    assert_eq!(err.matches(" tok/s").count(), 2, "{err}");
}

/// Ids of a text of `n` tokens ("wN" is token N in the test tokenizer).
fn words(n: usize) -> (String, Vec<u32>) {
    let ids: Vec<u32> = (0..n).map(|i| ((i * 37 + 11) % 300) as u32).collect();
    let text: Vec<String> = ids.iter().map(|i| format!("w{i}")).collect();
    (text.join(" "), ids)
}

fn score_json(dir: &Path, text: &str, extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = vec!["score", "--model", s(dir), "--json", "--text", text];
    args.extend_from_slice(extra);
    let out = engine(&args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    (serde_json::from_slice(&out.stdout).unwrap(), err)
}

fn logprobs(v: &serde_json::Value) -> Vec<f64> {
    v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A text longer than the context (128 here) is scored in windows that
/// advance by half a window: every token once, each with the context its
/// window gives — the same numbers as scoring that window's text alone.
#[test]
fn score_long_text_in_windows() {
    let (_tmp, dir) = model_copy("model");
    let n = 300;
    let (text, ids) = words(n);
    let (v, err) = score_json(&dir, &text, &[]);
    // Windows [0,128) [64,192) [128,256) [192,300).
    assert!(
        err.contains(
            "300 tokens: longer than a window of 128, scored in 4 windows advancing by 64"
        ),
        "{err}"
    );
    let all = logprobs(&v);
    assert_eq!(all.len(), n - 1);
    assert!(all.iter().all(|l| l.is_finite() && *l < 0.0));
    let alone = |from: usize, to: usize| {
        let t: Vec<String> = ids[from..to].iter().map(|i| format!("w{i}")).collect();
        logprobs(&score_json(&dir, &t.join(" "), &[]).0)
    };
    // Token t's value is index t - 1; window [s, e) scores the tokens past
    // the previous window's end.
    assert_eq!(all[..127], alone(0, 128)[..]);
    for (start, first, end) in [(64, 128, 192), (128, 192, 256), (192, 256, 300)] {
        let w = alone(start, end);
        assert_eq!(
            all[first - 1..end - 1],
            w[first - start - 1..],
            "window at {start}"
        );
    }
    let nll: f64 = -all.iter().sum::<f64>();
    assert!((v["nll"].as_f64().unwrap() - nll).abs() < 1e-6 * nll);
    // --window sets the window: 100 tokens in windows of 40 that advance by 20.
    let (text, _) = words(100);
    let (small, err) = score_json(&dir, &text, &["--window", "40"]);
    assert!(err.contains("scored in 4 windows advancing by 20"), "{err}");
    assert_eq!(logprobs(&small).len(), 99);
    let (whole, err) = score_json(&dir, &text, &[]);
    assert_eq!(err, "", "a text that fits is one window, silently");
    // The first window's 39 tokens agree; later ones see less context.
    assert_eq!(logprobs(&small)[..39], logprobs(&whole)[..39]);
    assert_ne!(logprobs(&small), logprobs(&whole));
}

/// A plain CPU run prints nothing about devices; `--device auto` given
/// explicitly says which device it took, and why not a GPU.
#[test]
fn plain_generate_prints_no_device_line() {
    let (_tmp, dir) = model_copy("model");
    let out = common::engine(&[
        "generate",
        "--model",
        s(&dir),
        "--prompt",
        "w1 w2",
        "--max-tokens",
        "2",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if engine::backend::cuda::real::unavailable_reason().is_some() {
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("[prompt 2 tokens"), "{err}");
        assert!(!err.contains("CUDA") && !err.contains("device"), "{err}");
    } else {
        assert!(err.starts_with("device: "), "a GPU is named: {err}");
    }
}

#[test]
fn golden_fixture_is_consistent_with_cli_ids() {
    // The CLI tokenizer maps "wN" to id N, so the golden ids round-trip as text.
    let g = Golden::open(&fixture("tiny_llama/golden.safetensors"));
    let ids = g.i32("model.input_ids");
    let text: Vec<String> = ids.iter().map(|i| format!("w{i}")).collect();
    let (_tmp, dir) = model_copy("model");
    let out = engine(&[
        "score",
        "--model",
        s(&dir),
        "--json",
        "--text",
        &text.join(" "),
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<f32> = v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    common::assert_close("cli logprobs", &got, &g.f32("model.logprobs"), 1e-5);
}

fn score_nll(dir: &Path, text: &str) -> f64 {
    let out = engine(&["score", "--model", s(dir), "--json", "--text", text]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nll"].as_f64().unwrap()
}

#[test]
fn convert_each_dtype_then_load() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = fixture("gguf/tiny_llama.gguf");
    let text = "hello world, the model reads 42 tokens";
    let mut nll = Vec::new();
    for dtype in ["f32", "bf16", "f16"] {
        let dir = tmp.path().join(dtype);
        let out = engine(&["convert", s(&gguf), s(&dir), "--dtype", dtype]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = engine(&["info", "--model", s(&dir)]);
        let info = String::from_utf8(info.stdout).unwrap();
        assert!(
            info.contains(&format!("stored dtypes     {dtype}")),
            "{info}"
        );
        nll.push(score_nll(&dir, text));
    }
    // Half-precision storage rounds each weight by at most 2⁻⁸ (bf16) or
    // 2⁻¹¹ (f16) relative; the score moves a little, never wildly.
    assert!((nll[1] - nll[0]).abs() < 0.01 * nll[0], "{nll:?}");
    assert!((nll[2] - nll[0]).abs() < 0.002 * nll[0], "{nll:?}");
}

#[test]
fn convert_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("gguf/tiny_llama.gguf")).unwrap();
    let trunc = tmp.path().join("trunc.gguf");
    std::fs::write(&trunc, &bytes[..1000]).unwrap();
    let out_dir = tmp.path().join("out");
    let out = engine(&["convert", s(&trunc), s(&out_dir)]);
    common::assert_fails_with(&out, &[s(&trunc), "truncated"]);
    assert!(
        !out_dir.exists(),
        "a failed convert left {}",
        out_dir.display()
    );

    let missing = tmp.path().join("missing.gguf");
    let out = engine(&["convert", s(&missing), s(&out_dir)]);
    common::assert_fails_with(&out, &[s(&missing), "No such file"]);

    let out = engine(&[
        "convert",
        s(&fixture("gguf/tiny_llama.gguf")),
        s(&out_dir),
        "--dtype",
        "f64",
    ]);
    common::assert_fails_with(&out, &["unknown dtype 'f64'"]);
}

#[test]
fn device_choice() {
    let (_tmp, dir) = model_copy("model");
    // auto: a GPU if one can be used, else the CPU, saying which and why.
    let out = common::engine(&[
        "score",
        "--model",
        s(&dir),
        "--text",
        TEXT,
        "--device",
        "auto",
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("device: "), "{err}");
    if engine::backend::cuda::real::unavailable_reason().is_some() {
        assert!(err.contains("device: cpu (no CUDA GPU: "), "{err}");
        let out = common::engine(&[
            "score",
            "--model",
            s(&dir),
            "--text",
            TEXT,
            "--device",
            "cuda",
        ]);
        common::assert_fails_with(&out, &["--device cuda", "libcuda"]);
    }
}

#[test]
fn merge_a_peft_adapter() {
    let (tmp, dir) = model_copy("model");
    let adapter = fixture("lora/peft_adapter");
    let merged = tmp.path().join("merged");
    let out = engine(&[
        "merge",
        "--model",
        s(&dir),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("merged 14 of 20 tensors (rank 4"));
    // The merged folder is a complete model that differs from the base.
    let (base, with) = (score_nll(&dir, TEXT), score_nll(&merged, TEXT));
    assert!((base - with).abs() > 1e-3, "{base} vs {with}");
    // --adapter applies it unmerged: the same scores as the merged model.
    let out = engine(&[
        "score",
        "--model",
        s(&dir),
        "--adapter",
        s(&adapter),
        "--json",
        "--text",
        TEXT,
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let unmerged = v["nll"].as_f64().unwrap();
    assert!(
        ((unmerged - with) / with).abs() < 1e-5,
        "unmerged {unmerged} vs merged {with}"
    );
    let out = engine(&[
        "generate",
        "--model",
        s(&dir),
        "--adapter",
        s(&adapter),
        "--prompt",
        "w5 w7",
        "--max-tokens",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An adapter whose tensors do not fit is refused, naming the file.
    let bad = tmp.path().join("bad_adapter");
    std::fs::create_dir(&bad).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(f), bad.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(bad.join("adapter_config.json")).unwrap();
    assert!(cfg.contains("\"r\": 4"));
    std::fs::write(
        bad.join("adapter_config.json"),
        cfg.replace("\"r\": 4", "\"r\": 8"),
    )
    .unwrap();
    let out = engine(&[
        "score",
        "--model",
        s(&dir),
        "--adapter",
        s(&bad),
        "--text",
        TEXT,
    ]);
    common::assert_fails_with(&out, &["adapter_model.safetensors", "lora_A"]);
    // A second merge into the same folder is refused, and the folder kept.
    let out = engine(&[
        "merge",
        "--model",
        s(&dir),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ]);
    common::assert_fails_with(&out, &[s(&merged), "not empty"]);
    assert_eq!(score_nll(&merged, TEXT), with);
    let out = engine(&[
        "merge",
        "--model",
        s(&dir),
        "--adapter",
        s(&dir),
        "--out",
        s(&tmp.path().join("m2")),
    ]);
    common::assert_fails_with(&out, &["adapter_config.json"]);
}
