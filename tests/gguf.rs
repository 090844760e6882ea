//! GGUF import: the reader, dequantization against gguf-py, bad input, and
//! `convert` of a tiny llama (fixtures made by
//! tests/fixtures/make_gguf_fixtures.py).
//!
//! Set `ENGINE_SMOLLM2_GGUF` to the SmolLM2-135M-Instruct GGUF to also convert
//! the real model (to `ENGINE_SMOLLM2_OUT`, default /tmp/smollm2-hf).

use engine::convert::{convert, MARKER};
use engine::model::gguf::{Gguf, Value};
use engine::model::llama_gguf::unpermute_rows;
use engine::quant::dequant::{dequantize, GgmlType};
use engine::tensor::DType;
use engine::Error;
use safetensors::SafeTensors;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s(t: &safetensors::tensor::TensorView) -> Vec<f32> {
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Dequantization is bit-identical to gguf-py: dequant.rs performs the same
/// f32 operations in the same order (e.g. Q4_K: (d * sc) * q - dmin * m,
/// with no fused multiply-add), so no tolerance is needed.
#[test]
fn dequantization_matches_gguf_py() {
    let g = Gguf::open(fixture("dequant.gguf")).unwrap();
    let bytes = read(&fixture("dequant_expected.safetensors"));
    let expected = SafeTensors::deserialize(&bytes).unwrap();
    let mut seen = BTreeSet::new();
    for (name, view) in expected.tensors() {
        let (shape, got) = g.tensor_f32(&name).unwrap();
        assert_eq!(shape, view.shape(), "{name}: shape");
        let want = f32s(&view);
        assert_eq!(got.len(), want.len(), "{name}: length");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "{name}[{i}]: got {a}, gguf-py {b}"
            );
        }
        seen.insert(g.tensor_info(&name).unwrap().ggml_type.name());
    }
    let all: BTreeSet<&str> = [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
    ]
    .into();
    assert_eq!(seen, all);
    // The 3-d tensor: GGUF lists ne = [64, 2, 3]; the row-major shape is reversed.
    let t = g.tensor_info("f32").unwrap();
    assert_eq!(t.ne, vec![64, 2, 3]);
    assert_eq!(t.shape(), vec![3, 2, 64]);
}

#[test]
fn metadata_of_every_value_type() {
    let g = Gguf::open(fixture("dequant.gguf")).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.data_start % 32, 0);
    assert_eq!(g.get("test.u8"), Some(&Value::U8(200)));
    assert_eq!(g.get("test.i8"), Some(&Value::I8(-100)));
    assert_eq!(g.get("test.u16"), Some(&Value::U16(60000)));
    assert_eq!(g.get("test.i16"), Some(&Value::I16(-30000)));
    assert_eq!(g.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(g.get("test.i32"), Some(&Value::I32(-2_000_000_000)));
    assert_eq!(g.get_f32("test.f32").unwrap(), 0.25);
    assert!(g.get_bool("test.bool").unwrap());
    assert_eq!(g.get_u64("test.u64").unwrap(), 1 << 60);
    assert_eq!(g.get("test.i64"), Some(&Value::I64(-(1 << 60))));
    assert_eq!(g.get("test.f64"), Some(&Value::F64(-1.5e300)));
    assert_eq!(g.get_str("test.string").unwrap(), "héllo");
    assert_eq!(g.get_str("general.architecture").unwrap(), "test");
    assert_eq!(
        g.get_str_array("test.array_str").unwrap(),
        vec!["a", "", "ünï"]
    );
    assert_eq!(g.get_int_array("test.array_i32").unwrap(), vec![1, -2, 3]);

    // Typed getters say what is wrong, and where.
    let msg = g.get_u32("llama.block_count").unwrap_err().to_string();
    assert!(msg.contains("dequant.gguf"), "{msg}");
    assert!(
        msg.contains("missing metadata key llama.block_count"),
        "{msg}"
    );
    let msg = g.get_str("test.u32").unwrap_err().to_string();
    assert!(
        msg.contains("test.u32 is a u32, expected a string"),
        "{msg}"
    );
    let msg = g.get_u32("test.i32").unwrap_err().to_string();
    assert!(msg.contains("test.i32 is negative"), "{msg}");
    let msg = g.get_u32("test.u64").unwrap_err().to_string();
    assert!(msg.contains("test.u64 is too large"), "{msg}");
    let msg = g.tensor_f32("nope").unwrap_err().to_string();
    assert!(msg.contains("missing tensor 'nope'"), "{msg}");
}

#[test]
fn unsupported_types_are_named() {
    let err = dequantize(GgmlType::Q2_K, &[0; 84], &mut [0.0; 256]).unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    assert!(err.to_string().contains("Q2_K"), "{err}");
    // A wrong byte count is an error, not a panic.
    assert!(dequantize(GgmlType::Q4_0, &[0; 17], &mut [0.0; 32]).is_err());

    // A GGUF tensor of a type ggml knows but engine does not dequantize:
    // relabel the Q4_K tensor as Q2_K (same block size, fewer bytes).
    let mut bytes = read(&fixture("dequant.gguf"));
    let type_at = tensor_info_at(&bytes, "q4_k") + 4 + 2 * 8;
    bytes[type_at..type_at + 4].copy_from_slice(&10u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q2_k.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let g = Gguf::open(&path).unwrap();
    let err = g.tensor_f32("q4_k").unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("q2_k.gguf: tensor 'q4_k'"), "{msg}");
    assert!(msg.contains("ggml type Q2_K is not supported"), "{msg}");
}

/// Writes `bytes` to a temporary file called `name`, opens it, and returns
/// the error message (which must name the file).
fn open_err(bytes: &[u8], name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let msg = match Gguf::open(&path) {
        Ok(_) => panic!("{name}: opened a bad file"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(name), "message does not name the file: {msg}");
    msg
}

/// Where the tensor info of `name` starts in the image: just after its name.
fn tensor_info_at(bytes: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .unwrap_or_else(|| panic!("tensor info {name} not found"));
    at + pat.len()
}

#[test]
fn bad_files_give_errors_not_panics() {
    let good = read(&fixture("dequant.gguf"));
    let g = Gguf::open(fixture("dequant.gguf")).unwrap();
    let data_start = g.data_start;

    let msg = open_err(&[], "empty.gguf");
    assert!(msg.contains("too short"), "{msg}");
    let msg = open_err(&good[..10], "cut_header.gguf");
    assert!(msg.contains("too short"), "{msg}");
    let msg = open_err(&good[..300], "cut_metadata.gguf");
    assert!(msg.contains("metadata entry"), "{msg}");
    assert!(msg.contains("past the end of the file"), "{msg}");
    let cut = tensor_info_at(&good, "q4_0") + 6;
    let msg = open_err(&good[..cut], "cut_tensor_infos.gguf");
    assert!(msg.contains("tensor info 4: 'q4_0'"), "{msg}");
    assert!(msg.contains("past the end of the file"), "{msg}");
    let msg = open_err(&good[..good.len() - 100], "cut_data.gguf");
    assert!(msg.contains("tensor 'q6_k'"), "{msg}");
    assert!(msg.contains("past the end of the file"), "{msg}");

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    let msg = open_err(&bad, "magic.gguf");
    assert!(msg.contains("not a GGUF file"), "{msg}");

    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&7u32.to_le_bytes());
    let msg = open_err(&bad, "version.gguf");
    assert!(msg.contains("unsupported GGUF version 7"), "{msg}");

    let mut bad = good.clone();
    bad[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let msg = open_err(&bad, "tensor_count.gguf");
    assert!(
        msg.contains("tensor count 1099511627776 cannot fit"),
        "{msg}"
    );

    // The first key's length (right after the 24-byte header).
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let msg = open_err(&bad, "string_len.gguf");
    assert!(
        msg.contains("string of length 9223372036854775807"),
        "{msg}"
    );
    assert!(msg.contains("past the end of the file"), "{msg}");

    // Tensor info after the name: n_dims u32, ne u64 × n_dims, type u32, offset u64.
    let at = tensor_info_at(&good, "f16");
    let type_at = at + 4 + 2 * 8;
    let mut bad = good.clone();
    bad[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let msg = open_err(&bad, "ggml_type.gguf");
    assert!(msg.contains("'f16': unknown ggml type 99"), "{msg}");

    let mut bad = good.clone();
    bad[type_at + 4..type_at + 12].copy_from_slice(&(1u64 << 32).to_le_bytes());
    let msg = open_err(&bad, "offset.gguf");
    assert!(msg.contains("tensor 'f16'"), "{msg}");
    assert!(msg.contains("past the end of the file"), "{msg}");

    let mut bad = good.clone();
    bad[type_at + 4..type_at + 12].copy_from_slice(&u64::MAX.to_le_bytes());
    open_err(&bad, "offset_overflow.gguf");

    let mut bad = good.clone();
    bad[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    let msg = open_err(&bad, "n_dims.gguf");
    assert!(msg.contains("9 dimensions"), "{msg}");

    // Every cut inside the header and metadata, and a sweep of single-byte
    // corruptions there: never a panic (corrupted files may still parse).
    // (Thousands of small files: use a RAM disk where there is one.)
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let path = dir.path().join("sweep.gguf");
    for cut in 0..data_start {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert!(Gguf::open(&path).is_err(), "cut at {cut} opened");
    }
    for at in 0..data_start {
        for v in [0x00, 0xff, 0x7f] {
            let mut bad = good.clone();
            bad[at] = v;
            std::fs::write(&path, &bad).unwrap();
            if let Ok(g) = Gguf::open(&path) {
                for t in g.tensors() {
                    let _ = g.tensor_f32(&t.name);
                }
            }
        }
    }
}

#[test]
fn convert_refuses_other_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let err = convert(
        &fixture("dequant.gguf"),
        &dir.path().join("out"),
        DType::F32,
    )
    .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("dequant.gguf"), "{msg}");
    assert!(
        msg.contains("architecture 'test' is not supported"),
        "{msg}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    // 2 heads of dim 4 → llama.cpp stores, per head, rows [0, 2, 1, 3].
    let rows: Vec<f32> = [0, 2, 1, 3, 4, 6, 5, 7].iter().map(|&r| r as f32).collect();
    assert_eq!(
        unpermute_rows(&rows, 8, 1, 2),
        (0..8).map(|r| r as f32).collect::<Vec<_>>()
    );
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&read(path)).unwrap()
}

#[test]
fn convert_tiny_llama() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-hf");
    let summary = convert(&fixture("tiny_llama.gguf"), &out, DType::F32).unwrap();
    assert_eq!(summary.arch, "llama");
    assert_eq!(summary.n_layers, 2);
    assert_eq!(summary.vocab_size, 265);
    assert_eq!(summary.n_tensors, 2 + 2 * 9 + 1);
    assert!(!summary.tied_embeddings);
    assert_eq!(summary.source_types["Q8_0"], 4);
    println!("{summary}");

    // Weights: un-permuted q/k and dequantized FFN equal what the script wrote.
    let bytes = read(&out.join("model.safetensors"));
    let got = SafeTensors::deserialize(&bytes).unwrap();
    let want_bytes = read(&fixture("tiny_llama_expected.safetensors"));
    let want = SafeTensors::deserialize(&want_bytes).unwrap();
    let names = |s: &SafeTensors| {
        s.names()
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(names(&got), names(&want));
    let mut n_params = 0;
    for (name, w) in want.tensors() {
        let g = got.tensor(&name).unwrap();
        assert_eq!(g.shape(), w.shape(), "{name}");
        assert_eq!(f32s(&g), f32s(&w), "{name}");
        n_params += w.shape().iter().product::<usize>();
    }
    assert_eq!(summary.n_params, n_params);

    let cfg = json(&out.join("config.json"));
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["hidden_size"], 32);
    assert_eq!(cfg["intermediate_size"], 64);
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["num_attention_heads"], 4);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["head_dim"], 8);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["rope_theta"], 100000.0);
    assert_eq!(cfg["vocab_size"], 265);
    assert_eq!(cfg["max_position_embeddings"], 256);
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["bos_token_id"], 1);
    assert_eq!(cfg["eos_token_id"], 2);
    assert_eq!(cfg["torch_dtype"], "float32");
    // engine's own config parser accepts it.
    let parsed = engine::model::config::LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(parsed.num_kv_heads, 2);
    let gen = json(&out.join("generation_config.json"));
    assert_eq!(gen["eos_token_id"], 2);

    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(tc["model_max_length"], 256);
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>assistant"));

    // The tokenizer loads; digits are split one by one (SmolLM's Digits
    // pre-tokenizer); merges apply; control tokens are special.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("hello world 123", false).unwrap();
    assert_eq!(
        enc.get_tokens(),
        ["hello", "Ġw", "o", "r", "l", "d", "Ġ", "1", "2", "3"]
    );
    let enc = tok.encode("<|im_start|>user<think>", false).unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap(), 3);
    assert_eq!(
        tok.decode(enc.get_ids(), true).unwrap(),
        "user<think>",
        "control tokens are skipped, user-defined ones are not"
    );
    let tj = json(&out.join("tokenizer.json"));
    let added = tj["added_tokens"].as_array().unwrap();
    assert_eq!(added.len(), 4);
    assert_eq!(added[3]["special"], false);

    // Converting again replaces a folder made by convert; no temp folders stay.
    assert!(out.join(MARKER).exists());
    let summary = convert(&fixture("tiny_llama.gguf"), &out, DType::BF16).unwrap();
    assert_eq!(summary.dtype, DType::BF16);
    let bytes = read(&out.join("model.safetensors"));
    let got = SafeTensors::deserialize(&bytes).unwrap();
    let q = got
        .tensor("model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.dtype(), safetensors::Dtype::BF16);
    let want_q = f32s(
        &want
            .tensor("model.layers.1.self_attn.q_proj.weight")
            .unwrap(),
    );
    let got_q: Vec<f32> = q
        .data()
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let want_q: Vec<f32> = want_q
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(got_q, want_q);
    assert_eq!(json(&out.join("config.json"))["torch_dtype"], "bfloat16");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["tiny-hf"]);
}

#[test]
fn convert_refuses_a_foreign_nonempty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let err = convert(&fixture("tiny_llama.gguf"), &out, DType::F32).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("not empty"), "{msg}");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    // An empty folder is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    convert(&fixture("tiny_llama.gguf"), &empty, DType::F16).unwrap();
    assert!(empty.join("model.safetensors").exists());
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF, when `ENGINE_SMOLLM2_GGUF` names it.
#[test]
fn convert_smollm2_if_present() {
    let Some(input) = std::env::var_os("ENGINE_SMOLLM2_GGUF") else {
        eprintln!("ENGINE_SMOLLM2_GGUF not set; skipping");
        return;
    };
    let out = std::env::var_os("ENGINE_SMOLLM2_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/smollm2-hf"));
    let summary = convert(Path::new(&input), &out, DType::F32).unwrap();
    println!("{summary}");
    assert_eq!(summary.n_layers, 30);
    assert_eq!(summary.vocab_size, 49152);
    assert!(summary.tied_embeddings);
    let cfg = engine::model::config::LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads),
        (576, 9, 3)
    );
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("What is 2024?", false).unwrap();
    let tokens = enc.get_tokens();
    assert_eq!(
        tokens[tokens.len() - 5..],
        ["2", "0", "2", "4", "?"],
        "{tokens:?}"
    );
}
