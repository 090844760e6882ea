//! `engine finetune` end to end on the tiny random Llama with its word-level
//! tokenizer: LoRA and full runs, what --out holds, resume equivalence,
//! interrupts, and bad input (one line each, never a panic, nothing
//! half-written).

mod common;

use common::{sixteen_texts, tiny_model_copy};
use engine::backend::cpu::Cpu;
use engine::model::lora::{parse_targets, LoraConfig};
use engine::train::batch::Layout;
use engine::train::schedule::{Decay, Length};
use engine::train::trainer::{finetune, Outcome, RunPaths, TrainOptions};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;

/// The engine binary with `args`, on the CPU.
fn cpu_engine(args: &[&str]) -> Command {
    let mut cmd = common::engine_command(args);
    cmd.args(["--device", "cpu"]);
    cmd
}

fn engine(args: &[&str]) -> Output {
    cpu_engine(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The train records of metrics.jsonl: (step, loss).
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

const LORA: &[&str] = &[
    "--lora-rank",
    "8",
    "--lora-alpha",
    "16",
    "--batch",
    "4",
    "--seq-len",
    "8",
    "--lr",
    "1e-2",
    "--seed",
    "3",
];

/// A LoRA run writes a PEFT adapter that score --adapter loads, the metrics
/// and the loss curve, and overfits the 16 texts: the mean loss falls from
/// ~7 (the random model) below 0.5 in 80 steps (measured: 0.13).
#[test]
fn lora_run_overfits_and_writes_its_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = (
        tiny_model_copy("model", &tmp.path().join("model")),
        sixteen_texts(tmp.path()),
    );
    let out = tmp.path().join("run");
    let mut args = vec![
        "finetune",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--eval",
        s(&data),
    ];
    args.extend(LORA);
    args.extend([
        "--steps",
        "80",
        "--eval-every",
        "40",
        "--save-every",
        "40",
        "--out",
        s(&out),
    ]);
    let stdout = ok(&engine(&args));
    assert!(stdout.contains("trained 80 steps"), "{stdout}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.svg",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(out.join("checkpoint-40/trainer_state.json").exists());
    assert!(!out.join(".result-tmp").exists());
    let l = losses(&out);
    assert_eq!(l.len(), 80);
    assert!(l[0].1 > 5.0, "first loss {}", l[0].1);
    assert!(l[79].1 < 0.5, "loss after 80 steps {}", l[79].1);
    let evals = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(evals.matches("eval_loss").count(), 2);

    // The adapter applies: the trained texts score far better with it.
    let text = "w100 w10 w23 w36";
    let nll = |adapter: Option<&Path>| {
        let mut a = vec!["score", "--model", s(&m), "--json", "--text", text];
        if let Some(ad) = adapter {
            a.extend(["--adapter", s(ad)]);
        }
        let v: Value = serde_json::from_str(&ok(&engine(&a))).unwrap();
        v["nll"].as_f64().unwrap()
    };
    let (base, tuned) = (nll(None), nll(Some(&out)));
    assert!(tuned < base / 2.0, "nll {base} → {tuned}");
}

/// Resume equivalence: the steps after a checkpoint, run again from that
/// checkpoint in a fresh folder, have the losses of the uninterrupted run
/// (to 1e-6), and the final adapters are identical; `elapsed_s` continues
/// from the checkpoint's training time.
#[test]
fn resumed_run_reproduces_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = (
        tiny_model_copy("model", &tmp.path().join("model")),
        sixteen_texts(tmp.path()),
    );
    let whole = tmp.path().join("whole");
    let common_args = |out: &Path| {
        let mut a: Vec<String> = ["finetune", "--model", s(&m), "--data", s(&data)]
            .map(String::from)
            .to_vec();
        a.extend(LORA.iter().map(|x| x.to_string()));
        a.extend(
            [
                "--lora-dropout",
                "0.1",
                "--steps",
                "12",
                "--save-every",
                "6",
                "--grad-accum",
                "2",
                "--out",
                s(out),
            ]
            .map(String::from),
        );
        a
    };
    let run = |a: &[String]| engine(&a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&run(&common_args(&whole)));
    // The stopped run: its folder as it was after step 6.
    let stopped = tmp.path().join("stopped");
    std::fs::create_dir(&stopped).unwrap();
    let ck = stopped.join("checkpoint-6");
    std::fs::create_dir(&ck).unwrap();
    for e in std::fs::read_dir(whole.join("checkpoint-6")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), ck.join(e.file_name())).unwrap();
    }
    let mut a = common_args(&stopped);
    a.extend(["--resume".into(), s(&stopped).into()]);
    let out = run(&a);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    let (want, got) = (losses(&whole), losses(&stopped));
    assert_eq!(got.len(), 6);
    for (g, w) in got.iter().zip(&want[6..]) {
        assert_eq!(g.0, w.0);
        assert!(
            (g.1 - w.1).abs() <= 1e-6,
            "step {}: {} vs {}",
            g.0,
            g.1,
            w.1
        );
    }
    let read = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(read(&whole), read(&stopped), "final adapters differ");
    // The training time goes on from the checkpoint's, step by step.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("trainer_state.json")).unwrap())
            .unwrap();
    let mut last = state["elapsed_s"].as_f64().unwrap();
    assert!(last > 0.0, "{state}");
    for v in std::fs::read_to_string(stopped.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
    {
        let t = v["elapsed_s"].as_f64().unwrap();
        assert!(t > last, "elapsed_s {t} after {last}: {v}");
        last = t;
    }
}

/// Full fine-tuning writes a complete model folder that loads, with the
/// same tokenizer; an interrupt before a step saves a checkpoint and says
/// so, and resuming it finishes the run.
#[test]
fn full_run_and_interrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = (
        tiny_model_copy("model", &tmp.path().join("model")),
        sixteen_texts(tmp.path()),
    );
    let out = tmp.path().join("full");
    let opts = TrainOptions {
        lora: None,
        length: Length::Steps(3),
        batch: 4,
        grad_accum: 1,
        seq_len: 8,
        layout: Layout::Pack,
        lr: 1e-3,
        min_lr: 0.0,
        warmup: 1,
        decay: Decay::Cosine,
        weight_decay: 0.01,
        betas: (0.9, 0.999),
        eps: 1e-8,
        max_grad_norm: 1.0,
        seed: 1,
        eval_every: 0,
        save_every: 0,
        recompute: false,
        weights: Default::default(),
    };
    let paths = RunPaths {
        model: &m,
        data: &data,
        eval: None,
        out: &out,
        resume: None,
    };
    let stop = AtomicBool::new(true);
    match finetune(Cpu, &paths, &opts, &stop, false).unwrap() {
        Outcome::Interrupted { step, checkpoint } => {
            assert_eq!(step, 0);
            assert!(checkpoint.join("model.safetensors").exists());
            assert!(checkpoint.join("tokenizer.json").exists());
        }
        other => panic!("not interrupted: {other:?}"),
    }
    let paths = RunPaths {
        resume: Some(&out),
        ..paths
    };
    let go = AtomicBool::new(false);
    match finetune(Cpu, &paths, &opts, &go, false).unwrap() {
        Outcome::Finished { steps, .. } => assert_eq!(steps, 3),
        other => panic!("{other:?}"),
    }
    let v: Value = serde_json::from_str(&ok(&engine(&[
        "score",
        "--model",
        s(&out),
        "--json",
        "--text",
        "w100 w10 w23",
    ])))
    .unwrap();
    assert!(v["nll"].as_f64().unwrap().is_finite());
    // the LoRA library path takes the same options
    let lora = LoraConfig::new(2, 4.0, 0.0, parse_targets("q_proj").unwrap(), false).unwrap();
    assert_eq!(lora.scaling(), 2.0);
}

#[test]
fn bad_input_is_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = (
        tiny_model_copy("model", &tmp.path().join("model")),
        sixteen_texts(tmp.path()),
    );
    let out = tmp.path().join("o");
    let run = |data: &Path, extra: &[&str]| {
        let mut a = vec![
            "finetune",
            "--model",
            s(&m),
            "--data",
            s(data),
            "--out",
            s(&out),
        ];
        a.extend(extra);
        engine(&a)
    };
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    common::assert_fails_with(
        &run(&empty, &["--lora-rank", "4"]),
        &["empty.jsonl", "empty"],
    );
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"w1 w2\"}\n{\"text\": oops}\n").unwrap();
    common::assert_fails_with(&run(&bad, &["--lora-rank", "4"]), &["bad.jsonl", "line 2"]);
    common::assert_fails_with(
        &run(
            &data,
            &["--lora-rank", "4", "--lora-targets", "q_proj,qkv_proj"],
        ),
        &["qkv_proj"],
    );
    common::assert_fails_with(&run(&data, &["--lora-rank", "0"]), &["rank"]);
    let long = tmp.path().join("long_prompts.jsonl");
    std::fs::write(
        &long,
        "{\"prompt\": \"w1 w2 w3 w4 w5\", \"completion\": \"w6\"}\n",
    )
    .unwrap();
    common::assert_fails_with(
        &run(&long, &["--lora-rank", "4", "--seq-len", "3"]),
        &["long_prompts.jsonl", "--seq-len 3"],
    );
    assert!(!out.exists(), "a failed run left {}", out.display());

    // A resume folder from another model's run is refused.
    let other = tiny_model_copy("untied", &tmp.path().join("untied"));
    let run_other = tmp.path().join("other-run");
    ok(&engine(&[
        "finetune",
        "--model",
        s(&other),
        "--data",
        s(&data),
        "--lora-rank",
        "2",
        "--steps",
        "2",
        "--save-every",
        "1",
        "--seq-len",
        "8",
        "--out",
        s(&run_other),
    ]));
    let mut a = vec![
        "finetune",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--lora-rank",
        "2",
    ];
    a.extend([
        "--steps",
        "2",
        "--seq-len",
        "8",
        "--out",
        s(&run_other),
        "--resume",
        s(&run_other),
    ]);
    common::assert_fails_with(&engine(&a), &["checkpoint-1", "another model"]);
    // ... and one with other settings names the setting.
    let mut a = vec![
        "finetune",
        "--model",
        s(&other),
        "--data",
        s(&data),
        "--lora-rank",
        "4",
    ];
    a.extend([
        "--steps",
        "2",
        "--seq-len",
        "8",
        "--out",
        s(&run_other),
        "--resume",
        s(&run_other),
    ]);
    common::assert_fails_with(&engine(&a), &["lora_rank 2 → 4"]);
    // A new run into a used folder is refused, and the folder kept.
    let a = [
        "finetune",
        "--model",
        s(&other),
        "--data",
        s(&data),
        "--lora-rank",
        "2",
        "--steps",
        "2",
        "--seq-len",
        "8",
        "--out",
        s(&run_other),
    ];
    common::assert_fails_with(&engine(&a), &["not empty", "--resume"]);
    assert!(run_other.join("adapter_model.safetensors").exists());
    // Neither method, or both, is a usage error from clap (exit 2).
    let out2 = engine(&[
        "finetune",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
    ]);
    assert_eq!(out2.status.code(), Some(2));
}

/// Ctrl-C (SIGINT) during a run: the step in progress finishes, a checkpoint
/// is written, and the process says how to resume and exits with 130.
#[test]
fn sigint_saves_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = (
        tiny_model_copy("model", &tmp.path().join("model")),
        sixteen_texts(tmp.path()),
    );
    let out = tmp.path().join("run");
    let mut args: Vec<&str> = vec!["finetune", "--model", s(&m), "--data", s(&data)];
    args.extend(LORA);
    args.extend(["--steps", "100000", "--save-every", "0", "--out", s(&out)]);
    let child = cpu_engine(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait for the first steps to be logged
    let metrics = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 60, "no steps logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let done = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let state = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("checkpoint-"))
        .expect("a checkpoint");
    let step: u64 = state["checkpoint-".len()..].parse().unwrap();
    assert!(step >= 3);
    // the log holds exactly the steps the checkpoint has
    assert_eq!(losses(&out).len() as u64, step);
    assert!(out.join(&state).join("adapter_model.safetensors").exists());
}

/// The act_mib records of metrics.jsonl, one per train record.
fn act_mib(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            v["act_mib"]
                .as_f64()
                .expect("a train record without act_mib")
        })
        .collect()
}

/// --recompute: the same losses (recomputation repeats the forward's ops
/// exactly, LoRA dropout masks included) in less activation memory, which
/// every train record reports as act_mib; and a run is resumed with or
/// without it, as it does not change the numbers.
#[test]
fn recompute_keeps_the_losses_and_uses_less_activation_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, data) = (
        tiny_model_copy("model", &tmp.path().join("model")),
        sixteen_texts(tmp.path()),
    );
    let run = |out: &Path, extra: &[&str]| {
        let mut a = vec!["finetune", "--model", s(&m), "--data", s(&data)];
        a.extend(LORA);
        a.extend(["--lora-dropout", "0.1", "--steps", "2", "--save-every", "1"]);
        a.extend(["--out", s(out)]);
        a.extend(extra);
        let done = engine(&a);
        ok(&done);
        String::from_utf8_lossy(&done.stderr).into_owned()
    };
    let (kept, recomputed) = (tmp.path().join("kept"), tmp.path().join("recomputed"));
    let err = run(&kept, &[]);
    assert!(
        err.contains("activations: ") && !err.contains("recomputed"),
        "{err}"
    );
    let err = run(&recomputed, &["--recompute"]);
    assert!(err.contains("(recomputed per layer)"), "{err}");
    assert_eq!(losses(&kept), losses(&recomputed));
    let (a, b) = (act_mib(&kept), act_mib(&recomputed));
    assert_eq!((a.len(), b.len()), (2, 2));
    assert!(
        a[0] > 0.0 && b[0] > 0.0 && b[0] < a[0],
        "act_mib {a:?} vs {b:?}"
    );
    // Resuming the run without it from its step-1 checkpoint, with it,
    // redoes step 2 with the same loss.
    let want = losses(&kept);
    let err = run(&kept, &["--recompute", "--resume", s(&kept)]);
    assert!(err.contains("resuming from"), "{err}");
    assert_eq!(losses(&kept), want);
    assert_eq!(act_mib(&kept), vec![a[0], b[1]]);
}
