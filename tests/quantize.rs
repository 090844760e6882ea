//! Quantization: the block quantizers against gguf-py and ggml-quants.c
//! (tests/fixtures/make_quant_fixtures.py), quantize → dequantize round trips,
//! and `engine quantize` end to end.

mod common;

use common::{engine, fixture, Golden};
use engine::quant::dequant::dequantize_vec;
use engine::quant::quantize::{first_nonfinite_block, quantize, quantize_rows};
use engine::quant::GgmlType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;

const ROW: usize = 512;

/// Every type's bytes are those gguf-py (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0)
/// or ggml's reference quantizers (Q4_K, Q6_K) wrote for the same rows.
#[test]
fn quantizers_match_gguf_py_and_ggml() {
    let path = fixture("quant/quant_expected.safetensors");
    let golden = Golden::open(&path);
    let input = golden.f32("input");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rows = input.len() / ROW;
    for (name, ty) in [
        ("f16", GgmlType::F16),
        ("bf16", GgmlType::BF16),
        ("q8_0", GgmlType::Q8_0),
        ("q4_0", GgmlType::Q4_0),
        ("q4_1", GgmlType::Q4_1),
        ("q5_0", GgmlType::Q5_0),
        ("q4_k", GgmlType::Q4_K),
        ("q6_k", GgmlType::Q6_K),
    ] {
        let want = st.tensor(name).unwrap();
        let want = want.data();
        let row_bytes = want.len() / rows;
        for r in 0..rows {
            let mut got = vec![0u8; row_bytes];
            quantize(ty, &input[r * ROW..(r + 1) * ROW], &mut got).unwrap();
            let w = &want[r * row_bytes..(r + 1) * row_bytes];
            if let Some(i) = (0..row_bytes).find(|&i| got[i] != w[i]) {
                panic!(
                    "{ty}: row {r}, byte {i} (block {}): got {:#04x}, reference {:#04x}",
                    i / ty.type_size(),
                    got[i],
                    w[i]
                );
            }
        }
        // The parallel path writes the same bytes.
        assert_eq!(quantize_rows(ty, &input, ROW).unwrap(), want, "{ty}");
    }
}

fn rmse(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

/// quantize → dequantize stays within each type's error: every value within
/// half a quantization step of its block (plus the rounding of the block's
/// f16 scales; a whole step for the K types, whose sub-block scales are
/// themselves quantized), and the K types closer than the 32-block types of
/// as many bits.
#[test]
fn round_trip_errors() {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 64 * ROW;
    let x: Vec<f32> = (0..n)
        .map(|i| {
            let scale = [0.02f32, 1.0, 30.0][i / ROW % 3];
            (rng.random::<f32>() - 0.5) * 2.0 * scale
        })
        .collect();
    let mut errors = Vec::new();
    for &ty in engine::quant::quantize::QUANTIZABLE {
        let q = quantize_rows(ty, &x, ROW).unwrap();
        assert_eq!(q.len(), ty.bytes_for(n).unwrap(), "{ty}");
        assert_eq!(first_nonfinite_block(ty, &q), None, "{ty}");
        let y = dequantize_vec(ty, &q, n).unwrap();
        // The largest error allowed in each block, relative to its largest |x|.
        let step = match ty {
            GgmlType::F32 => 0.0,
            GgmlType::F16 => 1.0 / 1024.0,
            GgmlType::BF16 => 1.0 / 128.0,
            GgmlType::Q8_0 => 1.0 / 127.0,
            // Levels −8..7 of d = max / −8: the side opposite max clips a step.
            GgmlType::Q4_0 => 2.0 / 8.0,
            GgmlType::Q4_1 => 2.0 / 15.0,
            GgmlType::Q5_0 => 2.0 / 16.0,
            GgmlType::Q4_K => 2.0 * 2.0 / 15.0,
            GgmlType::Q6_K => 2.0 / 32.0,
            _ => unreachable!(),
        };
        // Block types also round their scales to f16 (2⁻¹¹ relative, times
        // up to a few levels' worth).
        let slack = if ty.block_size() > 1 {
            1.0 / 512.0
        } else {
            0.0
        };
        let bs = ty.block_size().max(32);
        for (b, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (a, c)) in xb.iter().zip(yb).enumerate() {
                assert!(
                    (a - c).abs() <= (step * 0.5 + slack) * amax,
                    "{ty}: block {b} value {i}: {a} came back as {c} (|max| {amax})"
                );
            }
        }
        errors.push((ty, rmse(&x, &y)));
    }
    let err = |t| errors.iter().find(|(ty, _)| *ty == t).unwrap().1;
    println!("rmse: {errors:?}");
    assert!(err(GgmlType::Q4_K) < err(GgmlType::Q4_0));
    assert!(err(GgmlType::Q6_K) < err(GgmlType::Q5_0));
    assert!(err(GgmlType::Q8_0) < err(GgmlType::Q6_K));
    assert_eq!(err(GgmlType::F32), 0.0);
}

#[test]
fn bad_arguments_are_errors() {
    let x = vec![1.0f32; 100];
    let msg = quantize_rows(GgmlType::Q4_K, &x, 100)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("Q4_K"), "{msg}");
    let msg = quantize_rows(GgmlType::Q2_K, &[0.0; 256], 256)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("quantizing to ggml type Q2_K is not supported"),
        "{msg}"
    );
    assert!(quantize(GgmlType::Q8_0, &[0.0; 32], &mut [0u8; 33]).is_err());
    // A value beyond f16's range makes an infinite scale, which is caught.
    let mut big = vec![0.0f32; 32];
    big[3] = 1e7;
    let q = quantize_rows(GgmlType::Q8_0, &big, 32).unwrap();
    assert_eq!(first_nonfinite_block(GgmlType::Q8_0, &q), Some(0));
}

// ---- engine quantize, end to end ----

use engine::convert::convert;
use engine::model::config::LlamaConfig;
use engine::model::folder::write_safetensors;
use engine::model::gguf::{Gguf, Value};
use engine::model::llama_gguf::{tensor_names, Hparams};
use engine::model::quant_types::FileType;
use engine::tensor::DType;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `engine quantize`, which must succeed; returns its summary line.
fn quantize_cli(model: &Path, ftype: FileType, out: &Path) -> String {
    let o = engine(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--type",
        ftype.name(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "quantize {ftype}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains(&format!("tensors as {ftype}")), "{stdout}");
    stdout
}

/// `engine quantize` fails with one line on stderr containing `want`.
fn quantize_fails(args: &[&str], want: &str) {
    let mut all = vec!["quantize"];
    all.extend_from_slice(args);
    let o = engine(&all);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(want),
        "{stderr}"
    );
}

/// tests/fixtures/gguf/tiny_llama.gguf (hidden 32, byte-level BPE
/// tokenizer) converted to an f32 HF folder under `dir`.
fn tiny_hf(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-hf");
    convert(&fixture("gguf/tiny_llama.gguf"), &out, DType::F32).unwrap();
    out
}

/// A random llama with rows of 256 (so K types apply) and 8 layers (so
/// llama.cpp's "more bits" layers differ from the rest), tied embeddings,
/// and the tiny GGUF's tokenizer; `poison` puts a NaN in one weight.
fn synthetic(dir: &Path, poison: bool) -> PathBuf {
    let out = dir.join(if poison { "poisoned" } else { "synthetic" });
    std::fs::create_dir_all(&out).unwrap();
    let tok = tiny_hf(dir);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), out.join(f)).unwrap();
    }
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 265,
        "max_position_embeddings": 256, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    });
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    let names = tensor_names(&Hparams::from_config(&cfg), 265, true);
    let plan: Vec<_> = names
        .iter()
        .map(|n| (n.hf.clone(), n.shape.clone(), safetensors::Dtype::F32))
        .collect();
    let mut rng = StdRng::seed_from_u64(3);
    write_safetensors(&out.join("model.safetensors"), &plan, |i| {
        let n: usize = plan[i].1.iter().product();
        let mut v: Vec<f32> = if plan[i].1.len() == 1 {
            (0..n)
                .map(|_| 1.0 + 0.1 * (rng.random::<f32>() - 0.5))
                .collect()
        } else {
            (0..n).map(|_| 0.2 * (rng.random::<f32>() - 0.5)).collect()
        };
        if poison && plan[i].0 == "model.layers.3.mlp.up_proj.weight" {
            v[700] = f32::NAN;
        }
        Ok(v)
    })
    .unwrap();
    out
}

/// The written file's tensors: GGUF name → (type, ne).
fn tensor_types(g: &Gguf) -> BTreeMap<String, (GgmlType, Vec<usize>)> {
    g.tensors()
        .iter()
        .map(|t| (t.name.clone(), (t.ggml_type, t.ne.clone())))
        .collect()
}

/// What every written file must be, whatever its source: llama metadata as
/// the source model's config has it, the file type, and — converted back by
/// `engine convert` — the original weights through quantize → dequantize
/// (or the very weights, for a GGUF source's tensor that kept its type), and
/// the same tokenizer files.
fn check_written(out: &Path, ftype: FileType, orig: &Path, source: Option<&Gguf>) {
    let g = Gguf::open(out).unwrap();
    assert_eq!((g.version, g.alignment), (3, 32));
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_u32("general.file_type").unwrap(), ftype.id());
    assert_eq!(g.get_u32("general.quantization_version").unwrap(), 2);
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    let cfg = LlamaConfig::from_file(&orig.join("config.json")).unwrap();
    let hp = Hparams::read(&g).unwrap();
    assert_eq!(hp, Hparams::from_config(&cfg));
    // Tensors in llama-quantize's order: outside the layers first, then by layer.
    let order: Vec<_> = g
        .tensors()
        .iter()
        .map(|t| engine::quantize::llama_cpp_order(&t.name))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");

    let tmp = tempfile::tempdir().unwrap();
    let back = tmp.path().join("back");
    convert(out, &back, DType::F32).unwrap();
    let names = tensor_names(&hp, cfg.vocab_size, cfg.tie_word_embeddings);
    let got = Golden::open(&back.join("model.safetensors"));
    let st = engine::model::weights::SafetensorsFiles::open_dir(orig).unwrap();
    for n in &names {
        let t = g.tensor_info(&n.gguf).unwrap();
        let w = st.load_f32(&n.hf, &n.shape).unwrap();
        let kept = source.is_some_and(|s| s.tensor_info(&n.gguf).unwrap().ggml_type == t.ggml_type);
        let want = if kept {
            w
        } else {
            let cols = *n.shape.last().unwrap();
            let q = quantize_rows(t.ggml_type, &w, cols).unwrap();
            dequantize_vec(t.ggml_type, &q, w.len()).unwrap()
        };
        let have = got.f32(&n.hf);
        assert!(
            have.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{ftype}: {} ({}) differs from dequant(quant(original))",
            n.hf,
            t.ggml_type
        );
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let read = |d: &Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(d.join(f)).unwrap()).unwrap()
        };
        assert_eq!(read(&back), read(orig), "{ftype}: {f}");
    }
}

/// The types llama.cpp gives the synthetic model: its rows of 256 take
/// every K type, so nothing falls back.
#[test]
fn quantize_synthetic_model_every_type() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synthetic(tmp.path(), false);
    for ftype in FileType::ALL {
        let out = tmp.path().join(format!("{ftype}.gguf"));
        let line = quantize_cli(&model, ftype, &out);
        assert!(!line.contains("fell back"), "{line}");
        let g = Gguf::open(&out).unwrap();
        let types = tensor_types(&g);
        assert_eq!(types.len(), 1 + 8 * 9 + 1);
        let default = ftype.default_type();
        for (name, (ty, ne)) in &types {
            let layer: Option<usize> = name
                .strip_prefix("blk.")
                .map(|r| r.split('.').next().unwrap().parse().unwrap());
            let want = if ne.len() == 1 {
                GgmlType::F32
            } else if name == "token_embd.weight" {
                // Tied: the output head's type.
                if ftype == FileType::Q8_0 {
                    GgmlType::Q8_0
                } else {
                    GgmlType::Q6_K
                }
            } else if ftype == FileType::Q4_K
                && (name.contains("attn_v") || name.contains("ffn_down"))
                && [0, 3, 6, 7].contains(&layer.unwrap())
            {
                GgmlType::Q6_K
            } else {
                default
            };
            assert_eq!(*ty, want, "{ftype}: {name}");
        }
        assert_eq!(types["blk.0.attn_q.weight"].1, vec![256, 256]);
        assert_eq!(types["blk.0.attn_k.weight"].1, vec![256, 128]);
        assert_eq!(
            g.get("general.name"),
            Some(&Value::String("synthetic".into()))
        );
        check_written(&out, ftype, &model, None);
    }
}

/// From a GGUF (the tiny llama: rows of 32 and 64, untied, Q8_0 / Q4_1 / F32
/// tensors): every K type falls back, tensors that keep their type are
/// copied, and the metadata is the source's with the new file type.
#[test]
fn quantize_tiny_gguf_every_type() {
    let tmp = tempfile::tempdir().unwrap();
    let src_path = fixture("gguf/tiny_llama.gguf");
    let src = Gguf::open(&src_path).unwrap();
    let orig = tiny_hf(tmp.path());
    for ftype in FileType::ALL {
        let out = tmp.path().join(format!("{ftype}.gguf"));
        quantize_cli(&src_path, ftype, &out);
        let g = Gguf::open(&out).unwrap();
        let types = tensor_types(&g);
        let ty = |n: &str| types[n].0;
        assert_eq!(types.len(), src.tensors().len());
        for t in src.tensors() {
            assert_eq!(types[&t.name].1, t.ne, "{}", t.name);
        }
        assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
        // Rows of 32: a K type falls back (Q4_K → Q5_0, Q6_K → Q8_0); the
        // untied output head takes Q6_K, then Q8_0.
        let (matrix, more_bits) = match ftype {
            FileType::Q4_K => (GgmlType::Q5_0, GgmlType::Q8_0),
            FileType::Q6_K => (GgmlType::Q8_0, GgmlType::Q8_0),
            other => (other.default_type(), other.default_type()),
        };
        assert_eq!(ty("output.weight"), GgmlType::Q8_0, "{ftype}");
        assert_eq!(ty("token_embd.weight"), matrix, "{ftype}");
        assert_eq!(ty("blk.0.attn_v.weight"), matrix, "{ftype}");
        assert_eq!(ty("blk.1.attn_v.weight"), more_bits, "{ftype}");
        assert_eq!(ty("blk.1.ffn_down.weight"), more_bits, "{ftype}");
        assert_eq!(ty("blk.1.attn_q.weight"), matrix, "{ftype}");
        // The source's metadata, all of it, with the new file type.
        for (k, v) in &src.metadata {
            if k != "general.file_type" && k != "general.quantization_version" {
                assert_eq!(g.get(k), Some(v), "{k}");
            }
        }
        check_written(&out, ftype, &orig, Some(&src));
    }
}

/// gguf-py's GGUFReader (llama.cpp's own Python reader) opens a written file
/// and sees its tensors as engine's reader does (skipped without .venv).
#[test]
fn gguf_py_reads_written_files() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let has_gguf = python.exists()
        && Command::new(&python)
            .args(["-c", "import gguf"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !has_gguf {
        eprintln!("skipped: no .venv with the gguf package");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = synthetic(tmp.path(), false);
    let out = tmp.path().join("q4_k.gguf");
    quantize_cli(&model, FileType::Q4_K, &out);
    let script = "import json, sys\nfrom gguf import GGUFReader\nr = GGUFReader(sys.argv[1])\n\
        print(json.dumps({'tensors': [[t.name, t.tensor_type.name, [int(d) for d in t.shape]] for t in r.tensors],\
        'arch': r.fields['general.architecture'].contents(), 'tokens': len(r.fields['tokenizer.ggml.tokens'].contents())}))";
    let o = Command::new(&python)
        .args(["-c", script, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let g = Gguf::open(&out).unwrap();
    let want: Vec<_> = g
        .tensors()
        .iter()
        .map(|t| json!([t.name, t.ggml_type.name(), t.ne]))
        .collect();
    assert_eq!(seen["tensors"], json!(want));
    assert_eq!(seen["arch"], "llama");
    assert_eq!(seen["tokens"], 265);
}

/// Bad input: one line on stderr, exit code 1, and no output file (nor a
/// temporary one) left behind.
#[test]
fn quantize_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.gguf");
    let o = out.to_str().unwrap();
    quantize_fails(
        &[
            "--model",
            "/nonexistent/model",
            "--type",
            "q4_k",
            "--out",
            o,
        ],
        "model /nonexistent/model does not exist",
    );
    let tiny = fixture("gguf/tiny_llama.gguf");
    let t = tiny.to_str().unwrap();
    quantize_fails(
        &["--model", t, "--type", "q3_k", "--out", o],
        "unknown quantization type 'q3_k' (expected q8_0, q4_0, q4_1, q4_k or q6_k)",
    );
    quantize_fails(
        &["--model", t, "--type", "q8_0", "--out", t],
        "the output is the input",
    );
    // Another file is not overwritten.
    let notes = tmp.path().join("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();
    quantize_fails(
        &[
            "--model",
            t,
            "--type",
            "q8_0",
            "--out",
            notes.to_str().unwrap(),
        ],
        "exists and is not a GGUF file; not overwriting it",
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me");
    // Architectures other than llama.
    let other = fixture("gguf/dequant.gguf");
    quantize_fails(
        &[
            "--model",
            other.to_str().unwrap(),
            "--type",
            "q8_0",
            "--out",
            o,
        ],
        "architecture 'test' is not supported",
    );
    // A tokenizer GGUF cannot hold (the tiny test models' word-level one).
    let words = common::tiny_model_copy("model", &tmp.path().join("words"));
    quantize_fails(
        &[
            "--model",
            words.to_str().unwrap(),
            "--type",
            "q8_0",
            "--out",
            o,
        ],
        "tokenizer model 'WordLevel' is not supported",
    );
    // A NaN weight, found while the file is being written.
    let poisoned = synthetic(tmp.path(), true);
    quantize_fails(
        &[
            "--model",
            poisoned.to_str().unwrap(),
            "--type",
            "q4_k",
            "--out",
            o,
        ],
        "tensor 'blk.3.ffn_up.weight': value 188 of row 2 is NaN; cannot quantize",
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("gguf"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // An earlier output is replaced.
    quantize_cli(&tiny, FileType::Q8_0, &out);
    quantize_cli(&tiny, FileType::Q4_0, &out);
    assert_eq!(
        Gguf::open(&out)
            .unwrap()
            .get_u32("general.file_type")
            .unwrap(),
        FileType::Q4_0.id()
    );
}

/// SmolLM2-135M-Instruct (models/fetch.sh): Q4_K_M as llama.cpp makes it —
/// the counts of each type llama-quantize reports for it — converted back
/// to the same tokenizer and to dequant(quant(weights)).
#[test]
fn quantize_smollm2() {
    let Some(model) = common::real_model(
        "smollm2-135m-instruct",
        &["config.json", "model.safetensors", "tokenizer.json"],
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-q4_k.gguf");
    let line = quantize_cli(&model, FileType::Q4_K, &out);
    println!("{line}");
    assert!(
        line.contains("(61 F32, 16 Q4_K, 166 Q5_0, 14 Q6_K, 15 Q8_0; 180 fell back,"),
        "{line}"
    );
    check_written(&out, FileType::Q4_K, &model, None);
    let g = Gguf::open(&out).unwrap();
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(g.get_u32("tokenizer.ggml.eos_token_id").unwrap(), 2);
    assert!(g
        .get_str("tokenizer.chat_template")
        .unwrap()
        .contains("<|im_start|>"));
    // The tokenizer convert rebuilds from the GGUF tokenizes as the original.
    let back = tmp.path().join("back");
    convert(&out, &back, DType::BF16).unwrap();
    let a = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let b = tokenizers::Tokenizer::from_file(back.join("tokenizer.json")).unwrap();
    for text in [
        "The capital of France is Paris.",
        "<|im_start|>user\nWhat is 2024 * 17?<|im_end|>\n",
        "  naïve café — 東京 🚀\tfn main() { println!(\"hi\"); }",
    ] {
        assert_eq!(
            a.encode(text, false).unwrap().get_ids(),
            b.encode(text, false).unwrap().get_ids(),
            "{text}"
        );
    }
}
