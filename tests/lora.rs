//! LoRA adapters in HF PEFT's format against PEFT itself
//! (tests/fixtures/make_peft_adapter.py): loading PEFT's adapter, merging it
//! into the tiny random Llama and comparing logits with PEFT's, save/load
//! round trips, PEFT's key names and config fields, and bad inputs.

mod common;

use common::{assert_close, fixture, Golden};
use engine::backend::cpu::Cpu;
use engine::backend::Backend;
use engine::model::config::LlamaConfig;
use engine::model::llama::Llama;
use engine::model::lora::{
    merge_to_dir, parse_targets, LoraAdapter, LoraConfig, Target, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
use engine::tensor::DType::F32;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    fixture("tiny_llama/model")
}

fn model_config() -> LlamaConfig {
    LlamaConfig::from_file(&model_dir().join("config.json")).unwrap()
}

fn peft_dir() -> PathBuf {
    fixture("lora/peft_adapter")
}

fn logits(model: &Llama<Cpu>, ids: &[u32]) -> Vec<f32> {
    let c = &model.config;
    let n = ids.len();
    let mut cache = model.new_cache(n).unwrap();
    let mut acts = model.new_activations(n).unwrap();
    let mut hidden = Cpu.zeros(&[n, c.hidden_size], F32).unwrap();
    model
        .forward(&mut hidden, ids, &mut cache, &mut acts)
        .unwrap();
    let mut out = Cpu.zeros(&[n, c.vocab_size], F32).unwrap();
    model.logits(&mut out, &hidden).unwrap();
    Cpu.download(&out).unwrap()
}

fn golden_ids(g: &Golden) -> Vec<u32> {
    g.i32("input_ids").into_iter().map(|v| v as u32).collect()
}

#[test]
fn peft_adapter_loads_with_its_config() {
    let a = LoraAdapter::load(&peft_dir(), &model_config()).unwrap();
    assert_eq!(a.config.rank, 4);
    assert_eq!(a.config.alpha, 8.0);
    assert_eq!(a.config.scaling(), 2.0);
    assert!(!a.config.rslora);
    assert_eq!(a.config.targets, Target::ALL.to_vec());
    assert_eq!(a.layers.len(), 2);
    assert_eq!(a.base_model.as_deref(), Some("tiny_llama/model"));
    let gate = a.get(1, Target::GateProj).unwrap();
    assert_eq!((gate.out, gate.inp), (160, 64));
    assert_eq!((gate.a.len(), gate.b.len()), (4 * 64, 160 * 4));
    assert!(gate.b.iter().any(|&v| v != 0.0));
}

#[test]
fn merged_peft_adapter_matches_peft_logits() {
    let adapter = LoraAdapter::load(&peft_dir(), &model_config()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let summary = merge_to_dir(&model_dir(), &adapter, &out).unwrap();
    assert_eq!(summary.n_merged, 2 * 7);
    assert!(summary.copied.contains(&"config.json".to_string()));
    let model = Llama::load(Cpu, &out).unwrap();
    let g = Golden::open(&fixture("lora/merged_logits.safetensors"));
    let ids = golden_ids(&g);
    let want = g.f32("logits");
    let got = logits(&model, &ids);
    assert_close("merged vs PEFT", &got, &want, 1e-5);
    // The adapter really changes the model.
    let base = Llama::load(Cpu, &model_dir()).unwrap();
    let err = common::max_rel_err(&logits(&base, &ids), &want);
    assert!(err > 1e-2, "base model already matches: {err:e}");
}

/// Applied unmerged (`--adapter`), the adapter gives PEFT's logits too, in
/// one prefill and token by token through the KV cache.
#[test]
fn unmerged_peft_adapter_matches_peft_logits() {
    let adapter = LoraAdapter::load(&peft_dir(), &model_config()).unwrap();
    let mut model = Llama::load(Cpu, &model_dir()).unwrap();
    model.set_adapter(&adapter).unwrap();
    let g = Golden::open(&fixture("lora/merged_logits.safetensors"));
    let ids = golden_ids(&g);
    let want = g.f32("logits");
    assert_close("unmerged vs PEFT", &logits(&model, &ids), &want, 1e-5);

    let (c, n) = (&model.config, ids.len());
    let mut cache = model.new_cache(n).unwrap();
    let mut acts = model.new_activations(n).unwrap();
    let mut hidden = Cpu.zeros(&[n, c.hidden_size], F32).unwrap();
    let mut out = Cpu.zeros(&[n, c.vocab_size], F32).unwrap();
    let mut got = Vec::new();
    for chunk in [&ids[..5], &ids[5..6], &ids[6..]] {
        model
            .forward(&mut hidden, chunk, &mut cache, &mut acts)
            .unwrap();
        out.shape[0] = chunk.len();
        model.logits(&mut out, &hidden).unwrap();
        got.extend(Cpu.download(&out).unwrap());
    }
    assert_close("unmerged, incremental", &got, &want, 1e-5);

    // download gives back the adapter that was uploaded
    let back = model.adapter.as_ref().unwrap().download(&Cpu).unwrap();
    assert_eq!(back.layers, adapter.layers);
    assert_eq!(back.config, adapter.config);
}

#[test]
fn merge_into_host_weights_matches_merge_to_dir() {
    let adapter = LoraAdapter::load(&peft_dir(), &model_config()).unwrap();
    let st = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&st).unwrap();
    let read = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let name = "model.layers.1.mlp.down_proj.weight";
    let mut weights = HashMap::new();
    for i in 0..adapter.layers.len() {
        for t in &adapter.config.targets {
            weights.insert(t.weight_name(i), read(&t.weight_name(i)));
        }
    }
    let before = weights[name].clone();
    adapter.merge_into(&mut weights).unwrap();
    // By hand: W + 2 · B A for one element.
    let p = adapter.get(1, Target::DownProj).unwrap();
    let (o, i) = (5, 77);
    let ba: f32 = (0..4).map(|k| p.b[o * 4 + k] * p.a[k * p.inp + i]).sum();
    let want = before[o * p.inp + i] + 2.0 * ba;
    assert!((weights[name][o * p.inp + i] - want).abs() <= 1e-6 * want.abs().max(1.0));

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    merge_to_dir(&model_dir(), &adapter, &out).unwrap();
    let merged = std::fs::read(out.join("model.safetensors")).unwrap();
    let merged = SafeTensors::deserialize(&merged).unwrap();
    let from_dir: Vec<f32> = merged
        .tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(from_dir, weights[name]);
    // Weights without an adapter are copied unchanged.
    let norm = "model.norm.weight";
    assert_eq!(
        merged.tensor(norm).unwrap().data(),
        st.tensor(norm).unwrap().data()
    );
    // A second merge into the same folder is refused, the folder left whole.
    let err = merge_to_dir(&model_dir(), &adapter, &out).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn save_load_round_trip_is_exact() {
    let mc = model_config();
    let tmp = tempfile::tempdir().unwrap();
    // PEFT's adapter, re-saved by engine.
    let peft = LoraAdapter::load(&peft_dir(), &mc).unwrap();
    let dir = tmp.path().join("resaved");
    peft.save(&dir).unwrap();
    assert_eq!(LoraAdapter::load(&dir, &mc).unwrap(), peft);
    // A fresh engine adapter with a subset of targets and rsLoRA.
    let cfg =
        LoraConfig::new(3, 6.0, 0.05, parse_targets("v_proj, q_proj").unwrap(), true).unwrap();
    let mut a = LoraAdapter::init(cfg, &mc, 7).unwrap();
    a.base_model = Some("somewhere/tiny".into());
    a.get_mut(0, Target::VProj).unwrap().b[3] = 0.25;
    let dir = tmp.path().join("fresh");
    a.save(&dir).unwrap();
    let back = LoraAdapter::load(&dir, &mc).unwrap();
    assert_eq!(back, a);
    assert_eq!(back.config.scaling(), 6.0 / 3f32.sqrt());
    // Saving again over an adapter folder replaces it; no temporaries remain.
    a.save(&dir).unwrap();
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn init_follows_peft() {
    let mc = model_config();
    let cfg = LoraConfig::new(8, 16.0, 0.0, Target::ALL.to_vec(), false).unwrap();
    let a = LoraAdapter::init(cfg.clone(), &mc, 1).unwrap();
    assert_eq!(a, LoraAdapter::init(cfg.clone(), &mc, 1).unwrap());
    assert_ne!(a, LoraAdapter::init(cfg, &mc, 2).unwrap());
    for layer in &a.layers {
        for p in layer {
            assert!(p.b.iter().all(|&v| v == 0.0));
            let bound = 1.0 / (p.inp as f32).sqrt();
            assert!(p.a.iter().all(|v| v.abs() <= bound));
            // Uniform on [-bound, bound]: the largest draws come close to it.
            let max = p.a.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(max > 0.9 * bound);
        }
    }
}

/// An engine adapter has PEFT's file layout: the same JSON fields and tensor
/// names, shapes and dtype as the adapter PEFT wrote. (PEFT itself loading an
/// engine adapter: run this test with LORA_EXPORT_DIR=DIR, then
/// `.venv/bin/python tests/fixtures/make_peft_adapter.py --check DIR`.)
#[test]
fn engine_adapter_has_peft_layout() {
    let mc = model_config();
    let cfg = LoraConfig::new(4, 8.0, 0.0, Target::ALL.to_vec(), false).unwrap();
    let mut a = LoraAdapter::init(cfg, &mc, 11).unwrap();
    // Non-zero B, so that a PEFT check compares something.
    for (i, layer) in a.layers.iter_mut().enumerate() {
        for (j, p) in layer.iter_mut().enumerate() {
            for (k, b) in p.b.iter_mut().enumerate() {
                *b = (((i * 31 + j * 7 + k) % 13) as f32 - 6.0) * 0.02;
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = match std::env::var_os("LORA_EXPORT_DIR") {
        Some(d) => PathBuf::from(d),
        None => tmp.path().join("engine"),
    };
    a.save(&dir).unwrap();

    let json = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(ADAPTER_CONFIG)).unwrap()).unwrap()
    };
    let (ours, theirs) = (json(&dir), json(&peft_dir()));
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "bias",
        "fan_in_fan_out",
        "use_dora",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let mut t1: Vec<_> = ours["target_modules"].as_array().unwrap().clone();
    let mut t2: Vec<_> = theirs["target_modules"].as_array().unwrap().clone();
    t1.sort_by_key(|v| v.to_string());
    t2.sort_by_key(|v| v.to_string());
    assert_eq!(t1, t2);

    let layout = |d: &Path| {
        let bytes = std::fs::read(d.join(ADAPTER_WEIGHTS)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec(), t.dtype()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(layout(&dir), layout(&peft_dir()));

    if std::env::var_os("LORA_EXPORT_DIR").is_some() {
        // Engine's merged logits, for the Python side to compare with PEFT's.
        let out = tmp.path().join("merged");
        merge_to_dir(&model_dir(), &a, &out).unwrap();
        let model = Llama::load(Cpu, &out).unwrap();
        let g = Golden::open(&fixture("lora/merged_logits.safetensors"));
        let ids = golden_ids(&g);
        let l = logits(&model, &ids);
        let ids_i32: Vec<i32> = ids.iter().map(|&v| v as i32).collect();
        let ib: Vec<u8> = ids_i32.iter().flat_map(|v| v.to_le_bytes()).collect();
        let lb: Vec<u8> = l.iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "input_ids",
                safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![ids.len()], &ib)
                    .unwrap(),
            ),
            (
                "logits",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![ids.len(), mc.vocab_size],
                    &lb,
                )
                .unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, None, &dir.join("engine_logits.safetensors"))
            .unwrap();
    }
}

#[test]
fn bad_config_values_are_clear_errors() {
    let e = LoraConfig::new(0, 8.0, 0.0, Target::ALL.to_vec(), false).unwrap_err();
    assert!(e.to_string().contains("rank must be at least 1"), "{e}");
    let e = parse_targets("q_proj,qkv_proj").unwrap_err().to_string();
    assert!(e.contains("unknown LoRA target module 'qkv_proj'"), "{e}");
    assert!(e.contains("gate_proj"), "{e}");
    assert!(parse_targets(" , ").is_err());
    assert_eq!(
        parse_targets("up_proj,q_proj,up_proj").unwrap(),
        vec![Target::QProj, Target::UpProj]
    );
    assert_eq!(parse_targets("all-linear").unwrap(), Target::ALL.to_vec());
    let e = LoraConfig::new(4, 8.0, 1.5, vec![Target::QProj], false).unwrap_err();
    assert!(e.to_string().contains("dropout"), "{e}");
}

/// Copies the PEFT adapter into a temporary folder, letting `edit` change
/// its config JSON and tensors, and returns the load error.
fn load_edited(
    mc: &LlamaConfig,
    edit_json: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>),
) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft_dir().join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    edit_json(&mut j);
    std::fs::write(dir.join(ADAPTER_CONFIG), j.to_string()).unwrap();
    let bytes = std::fs::read(peft_dir().join(ADAPTER_WEIGHTS)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit_tensors(&mut ts);
    let views: Vec<_> = ts
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(ADAPTER_WEIGHTS)).unwrap();
    LoraAdapter::load(dir, mc).unwrap_err().to_string()
}

#[test]
fn bad_adapters_are_clear_errors() {
    let mc = model_config();
    // An adapter made for a model with another hidden size.
    let mut other = mc.clone();
    other.intermediate_size = 128;
    let e = LoraAdapter::load(&peft_dir(), &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains(ADAPTER_WEIGHTS), "{e}");
    assert!(
        e.contains("gate_proj.lora_B.weight") || e.contains("mlp."),
        "{e}"
    );
    assert!(e.contains("different model"), "{e}");
    // Fewer layers in the model than in the adapter.
    let mut other = mc.clone();
    other.num_layers = 1;
    let e = LoraAdapter::load(&peft_dir(), &other)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer 1") && e.contains("different model"),
        "{e}"
    );

    let e = load_edited(&mc, |j| j["r"] = 0.into(), |_| {});
    assert!(e.contains("rank must be at least 1"), "{e}");
    let e = load_edited(&mc, |j| j["r"] = 8.into(), |_| {});
    assert!(
        e.contains("layers.0.mlp.down_proj.lora_A.weight has shape [4, 160], expected [8, 160]"),
        "{e}"
    );
    let e = load_edited(
        &mc,
        |j| j["target_modules"] = serde_json::json!(["q_proj", "wq"]),
        |_| {},
    );
    assert!(
        e.contains("unknown LoRA target module 'wq'") && e.contains(ADAPTER_CONFIG),
        "{e}"
    );
    let e = load_edited(
        &mc,
        |j| j["target_modules"] = serde_json::json!(["q_proj"]),
        |_| {},
    );
    assert!(e.contains("not in target_modules"), "{e}");
    let e = load_edited(&mc, |j| j["peft_type"] = "IA3".into(), |_| {});
    assert!(e.contains("peft_type"), "{e}");
    let e = load_edited(&mc, |j| j["use_dora"] = true.into(), |_| {});
    assert!(e.contains("use_dora is not supported"), "{e}");
    let missing = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    let e = load_edited(&mc, |_| {}, |ts| ts.retain(|t| t.0 != missing));
    assert!(e.contains(&format!("tensor {missing} is missing")), "{e}");
    let e = load_edited(
        &mc,
        |_| {},
        |ts| {
            ts.push((
                "base_model.model.lm_head.lora_A.weight".into(),
                vec![4, 64],
                vec![0; 4 * 64 * 4],
            ))
        },
    );
    assert!(
        e.contains("unexpected tensor base_model.model.lm_head.lora_A.weight"),
        "{e}"
    );
    assert!(LoraAdapter::load(Path::new("/nonexistent/adapter"), &mc)
        .unwrap_err()
        .to_string()
        .contains(ADAPTER_CONFIG));
}
