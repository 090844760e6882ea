//! Helpers shared by the integration tests.
#![allow(dead_code)]

#[cfg(feature = "emu")]
pub mod emu;
pub mod paged;
pub mod qblocks;

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Tensors of a safetensors file as f32 (int32 widened), by name.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(path: &Path) -> Self {
        Golden {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor {name} missing"));
        match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::I32 => self.i32(name).into_iter().map(|v| v as f32).collect(),
            d => panic!("{name}: dtype {d:?}"),
        }
    }

    pub fn i32(&self, name: &str) -> Vec<i32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// A real model's folder, models/`name`, when it holds every one of
/// `files` (models/fetch.sh puts them there). When it does not, the test
/// skips, saying why (None) — unless ENGINE_REQUIRE_MODELS=1 (CI), where a
/// missing model fails it.
pub fn real_model(name: &str, files: &[&str]) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    if files.iter().all(|f| dir.join(f).exists()) {
        return Some(dir);
    }
    if std::env::var("ENGINE_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{} is missing: run models/fetch.sh", dir.display());
    }
    eprintln!(
        "skipped: {} is missing (run models/fetch.sh)",
        dir.display()
    );
    None
}

/// Largest |a − b| relative to the largest |b|; NaN never passes.
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        let e = (x - y).abs() / scale;
        if e.is_nan() {
            return f32::INFINITY;
        }
        worst = worst.max(e);
    }
    worst
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = max_rel_err(got, want);
    assert!(err <= tol, "{what}: max relative error {err:e} > {tol:e}");
}

/// max|got − want| / scale ≤ tol against an f64 reference, with every
/// element of `got` finite; a failure names the worst element.
pub fn assert_close_to_scale(what: &str, got: &[f32], want: &[f64], scale: f64, tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|g| !g.is_finite()) {
        panic!("{what}: element {i} is {} (want {})", got[i], want[i]);
    }
    let (worst, err) = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .enumerate()
        .fold((0, 0.0f64), |a, (i, e)| if e > a.1 { (i, e) } else { a });
    let rel = if err == 0.0 { 0.0 } else { err / scale };
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.0e} (element {worst}: got {}, want {}; scale {scale:.4})",
        got[worst],
        want[worst],
    );
}

/// [`assert_close_to_scale`] relative to max|want|.
pub fn assert_close_f64(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    assert_close_to_scale(what, got, want, scale, tol);
}

/// The spare capacity of a CPU output (past its shape) still holds the
/// sentinel: the op wrote nothing there.
pub fn assert_spare_untouched(what: &str, t: &engine::tensor::Tensor<engine::backend::cpu::Cpu>) {
    let numel = t.numel();
    if let Some(i) = t.buf[numel..].iter().position(|&s| s != SENTINEL) {
        panic!(
            "{what}: spare element {} (past numel {numel}) overwritten with {}",
            numel + i,
            t.buf[numel + i]
        );
    }
}

/// A CPU op's output against its f64 reference, and its spare capacity.
pub fn check_cpu_output(
    what: &str,
    out: &engine::tensor::Tensor<engine::backend::cpu::Cpu>,
    want: &[f64],
    tol: f64,
) {
    assert_close_f64(what, &out.buf[..out.numel()], want, tol);
    assert_spare_untouched(what, out);
}

/// Spare capacity past a test tensor's shape, where ops must not write.
pub const SPARE: usize = 7;
/// What the spare capacity of an output holds, checked after the op.
pub const SENTINEL: f32 = 12345.0;

/// A CPU input tensor holding `data`, NaN in its spare capacity (so an op
/// that reads past the shape produces NaN).
pub fn cpu_input(
    data: &[f32],
    shape: &[usize],
) -> engine::tensor::Tensor<engine::backend::cpu::Cpu> {
    use engine::backend::Backend;
    let mut t = engine::backend::cpu::Cpu
        .zeros_with_capacity(shape, data.len() + SPARE, engine::tensor::DType::F32)
        .unwrap();
    assert_eq!(t.numel(), data.len(), "{shape:?}");
    t.buf[..data.len()].copy_from_slice(data);
    t.buf[data.len()..].fill(f32::NAN);
    t
}

/// A CPU tensor the op overwrites: NaN where it must write, the sentinel past
/// the shape.
pub fn cpu_poisoned(shape: &[usize]) -> engine::tensor::Tensor<engine::backend::cpu::Cpu> {
    use engine::backend::Backend;
    let numel: usize = shape.iter().product();
    let mut t = engine::backend::cpu::Cpu
        .zeros_with_capacity(shape, numel + SPARE, engine::tensor::DType::F32)
        .unwrap();
    t.buf[..numel].fill(f32::NAN);
    t.buf[numel..].fill(SENTINEL);
    t
}

/// A fresh random generator, or the one `$var` names; the seed is printed so
/// a failure can be replayed with `var=SEED`.
pub fn seeded_rng(var: &str) -> rand::rngs::StdRng {
    use rand::{Rng, SeedableRng};
    let seed = match std::env::var(var) {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("{var} must be a u64")),
        Err(_) => rand::rng().random(),
    };
    eprintln!("seed {seed} (replay with {var}={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A copy of tests/fixtures/tiny_llama/`variant` at `dest`, with the
/// word-level test tokenizer, for tests that run the model from a folder
/// (or break it). Returns `dest`.
pub fn tiny_model_copy(variant: &str, dest: &Path) -> PathBuf {
    std::fs::create_dir(dest).unwrap();
    for entry in std::fs::read_dir(fixture(&format!("tiny_llama/{variant}"))).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
    }
    std::fs::copy(
        fixture("tiny_llama/tokenizer.json"),
        dest.join("tokenizer.json"),
    )
    .unwrap();
    dest.to_path_buf()
}

/// `dir/train.jsonl`: 16 short {"text"} lines over the tiny vocabulary,
/// each starting with its own word, so every next token is determined by
/// the prefix (a set a model can overfit).
pub fn sixteen_texts(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    let mut text = String::new();
    for i in 0..16 {
        let words: Vec<String> = (0..7)
            .map(|j| format!("w{}", 10 + (i * 7 + j * 13) % 300))
            .collect();
        text.push_str(&format!(
            "{{\"text\": \"w{} {}\"}}\n",
            100 + i,
            words.join(" ")
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// A command's clean failure: exit code 1, no panic, one line on stderr that
/// mentions every one of `needles`.
pub fn assert_fails_with(out: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{err:?} does not mention {n:?}");
    }
}

/// The engine binary with `args`, to run in the repository root: where
/// cargo runs the tests, made explicit because relative paths in `args` (and
/// the names an index keeps of its sources) are taken from there.
pub fn engine_command(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_engine"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

/// Runs the engine binary with `args` exactly as given.
pub fn engine(args: &[&str]) -> std::process::Output {
    engine_command(args).output().unwrap()
}

/// [`engine`], which must succeed: its stdout.
pub fn engine_ok(args: &[&str]) -> String {
    let out = engine(args);
    assert!(
        out.status.success(),
        "engine {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
