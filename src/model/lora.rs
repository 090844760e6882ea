//! LoRA adapters for the Llama projections, stored in Hugging Face PEFT's
//! format, and merging them into a model's weights.
//!
//! A LoRA on a linear layer `y = W x` (W: [out, in]) adds `scaling · B A x`
//! with A: [r, in], B: [out, r] and `scaling = alpha / r` (rsLoRA:
//! `alpha / sqrt(r)`). Merging replaces W by `W + scaling · B A`.
//!
//! The on-disk format is what `PeftModel.save_pretrained` writes (checked
//! against PEFT 0.21 by tests/fixtures/make_peft_adapter.py):
//!
//! - `adapter_config.json` with `peft_type: "LORA"`, `r`, `lora_alpha`,
//!   `lora_dropout`, `target_modules`, `use_rslora`, `bias: "none"`,
//!   `task_type: "CAUSAL_LM"` and `base_model_name_or_path`;
//! - `adapter_model.safetensors` with, for every layer `i` and target,
//!   `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in]
//!   and `...q_proj.lora_B.weight` [out, r] (the MLP projections under
//!   `mlp.` instead of `self_attn.`).
//!
//! Initialisation follows PEFT's `LoraLayer.reset_lora_parameters` for
//! `init_lora_weights=True`: `nn.init.kaiming_uniform_(A, a=sqrt(5))` and B
//! zero. Kaiming-uniform draws from U(−bound, bound) with
//! `bound = gain · sqrt(3 / fan_in)`, `gain = sqrt(2 / (1 + a²)) = sqrt(1/3)`,
//! and A's fan_in is `in`, so `bound = 1 / sqrt(in)`. (The values themselves
//! come from engine's seeded RNG, not torch's.)

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::folder::{
    copy_model_side_files, short_f64, write_dir_atomically, write_json, write_safetensors,
};
use crate::model::weights::SafetensorsFiles;
use crate::tensor::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// File names of a PEFT adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A projection of a Llama layer that a LoRA can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    /// The module name, as in PEFT's `target_modules` (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// The module path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Target::QProj => "self_attn.q_proj",
            Target::KProj => "self_attn.k_proj",
            Target::VProj => "self_attn.v_proj",
            Target::OProj => "self_attn.o_proj",
            Target::GateProj => "mlp.gate_proj",
            Target::UpProj => "mlp.up_proj",
            Target::DownProj => "mlp.down_proj",
        }
    }

    /// `[out, in]` of the adapted weight in a model with config `c`.
    pub fn shape(self, c: &LlamaConfig) -> [usize; 2] {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match self {
            Target::QProj => [qw, d],
            Target::KProj | Target::VProj => [kvw, d],
            Target::OProj => [d, qw],
            Target::GateProj | Target::UpProj => [f, d],
            Target::DownProj => [d, f],
        }
    }

    /// The HF name of the adapted weight in layer `layer`.
    pub fn weight_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.weight", self.module())
    }

    /// PEFT's names of A and B for layer `layer`.
    pub fn peft_names(self, layer: usize) -> [String; 2] {
        let p = format!("base_model.model.model.layers.{layer}.{}", self.module());
        [format!("{p}.lora_A.weight"), format!("{p}.lora_B.weight")]
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown LoRA target module '{s}'; the Llama projections are {}",
                    names(&Target::ALL)
                ))
            })
    }
}

fn names(targets: &[Target]) -> String {
    targets
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a comma-separated target list (`q_proj,v_proj`; `all-linear` or
/// `all` for the seven projections). Spaces are ignored and duplicates
/// dropped; the result is in [`Target::ALL`] order.
pub fn parse_targets(s: &str) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "all-linear" || part == "all" {
            out.extend(Target::ALL);
        } else {
            out.push(part.parse()?);
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!(
            "no LoRA target modules in '{s}'; give a comma-separated list of {}",
            names(&Target::ALL)
        )));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The hyper-parameters of a LoRA adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// Dropout on the adapter's input during training (not used by merging).
    pub dropout: f32,
    /// In [`Target::ALL`] order, without duplicates.
    pub targets: Vec<Target>,
    /// rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.
    pub rslora: bool,
}

impl LoraConfig {
    /// A checked config: rank ≥ 1, finite alpha, dropout in [0, 1), at least
    /// one target.
    pub fn new(
        rank: usize,
        alpha: f32,
        dropout: f32,
        targets: Vec<Target>,
        rslora: bool,
    ) -> Result<Self> {
        let mut targets = targets;
        targets.sort();
        targets.dedup();
        let c = LoraConfig {
            rank,
            alpha,
            dropout,
            targets,
            rslora,
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Invalid(
                "LoRA rank must be at least 1 (got 0)".into(),
            ));
        }
        if !self.alpha.is_finite() {
            return Err(Error::Invalid(format!(
                "LoRA alpha must be a finite number (got {})",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!(
                "LoRA dropout must be in [0, 1) (got {})",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Invalid(
                "LoRA needs at least one target module".into(),
            ));
        }
        Ok(())
    }

    /// PEFT's names of an adapter's tensors over `layers` layers: per layer,
    /// per target, A then B (the order of `LoraAdapter`'s and `Lora`'s
    /// tensors).
    pub fn tensor_names(&self, layers: usize) -> Vec<String> {
        (0..layers)
            .flat_map(|i| self.targets.iter().flat_map(move |t| t.peft_names(i)))
            .collect()
    }

    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// One adapted projection: A [rank, inp] and B [out, rank], row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub out: usize,
    pub inp: usize,
}

impl LoraPair {
    /// `w += scaling · B A` for w: [out, inp] row-major.
    pub fn merge_into(&self, w: &mut [f32], rank: usize, scaling: f32) {
        assert_eq!(w.len(), self.out * self.inp);
        let mut delta = vec![0f32; self.inp];
        for (o, row) in w.chunks_exact_mut(self.inp).enumerate() {
            delta.fill(0.0);
            for k in 0..rank {
                let b = self.b[o * rank + k];
                let a = &self.a[k * self.inp..(k + 1) * self.inp];
                for (d, &a) in delta.iter_mut().zip(a) {
                    *d += b * a;
                }
            }
            for (w, d) in row.iter_mut().zip(&delta) {
                *w += d * scaling;
            }
        }
    }
}

/// A LoRA adapter for every layer of a Llama model.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    /// `layers[i][j]` adapts `config.targets[j]` of layer `i`.
    pub layers: Vec<Vec<LoraPair>>,
    /// Written as `base_model_name_or_path` when known.
    pub base_model: Option<String>,
}

impl LoraAdapter {
    /// A 64-bit hash (xxh3) of the adapter's scaling and weights: what it
    /// computes, whatever it is called. Cached keys and values are keyed by
    /// it, so an adapter reloaded under the same name never meets the
    /// cache entries of its old weights.
    pub fn content_hash(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&self.config.scaling().to_le_bytes());
        for t in &self.config.targets {
            h.update(t.name().as_bytes());
        }
        for pair in self.layers.iter().flatten() {
            h.update(bytemuck::cast_slice(&pair.a));
            h.update(bytemuck::cast_slice(&pair.b));
        }
        h.digest()
    }

    /// A fresh adapter, initialised as PEFT does (see the module docs):
    /// A ~ U(−1/sqrt(in), 1/sqrt(in)), B = 0. Deterministic for a seed.
    pub fn init(config: LoraConfig, model: &LlamaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let r = config.rank;
        let layers = (0..model.num_layers)
            .map(|_| {
                config
                    .targets
                    .iter()
                    .map(|t| {
                        let [out, inp] = t.shape(model);
                        let bound = 1.0 / (inp as f32).sqrt();
                        LoraPair {
                            a: (0..r * inp)
                                .map(|_| rng.random_range(-bound..bound))
                                .collect(),
                            b: vec![0.0; out * r],
                            out,
                            inp,
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(LoraAdapter {
            config,
            layers,
            base_model: None,
        })
    }

    pub fn get(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        let j = self.config.targets.iter().position(|&t| t == target)?;
        self.layers.get(layer).map(|l| &l[j])
    }

    pub fn get_mut(&mut self, layer: usize, target: Target) -> Option<&mut LoraPair> {
        let j = self.config.targets.iter().position(|&t| t == target)?;
        self.layers.get_mut(layer).map(|l| &mut l[j])
    }

    /// The pair that adapts the HF weight `name`
    /// (`model.layers.{i}.self_attn.q_proj.weight`), if any.
    pub fn for_weight(&self, name: &str) -> Option<&LoraPair> {
        let rest = name.strip_prefix("model.layers.")?;
        let (i, module) = rest.split_once('.')?;
        let module = module.strip_suffix(".weight")?;
        let layer: usize = i.parse().ok()?;
        let target = Target::ALL.into_iter().find(|t| t.module() == module)?;
        self.get(layer, target)
    }

    /// `W += scaling · B A` for every adapted weight in `weights` (HF names,
    /// row-major f32). Every adapted weight must be there with its shape.
    pub fn merge_into(&self, weights: &mut HashMap<String, Vec<f32>>) -> Result<()> {
        let (r, s) = (self.config.rank, self.config.scaling());
        for (i, layer) in self.layers.iter().enumerate() {
            for (t, pair) in self.config.targets.iter().zip(layer) {
                let name = t.weight_name(i);
                let w = weights.get_mut(&name).ok_or_else(|| {
                    Error::Invalid(format!("merging LoRA: the model has no weight {name}"))
                })?;
                if w.len() != pair.out * pair.inp {
                    return Err(Error::Invalid(format!(
                        "merging LoRA: weight {name} has {} values, the adapter expects [{}, {}]",
                        w.len(),
                        pair.out,
                        pair.inp
                    )));
                }
                pair.merge_into(w, r, s);
            }
        }
        Ok(())
    }

    /// The tensors of `adapter_model.safetensors`, by PEFT name, in order.
    fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let r = self.config.rank;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (t, p) in self.config.targets.iter().zip(layer) {
                let [a, b] = t.peft_names(i);
                out.push((a, vec![r, p.inp], p.a.as_slice()));
                out.push((b, vec![p.out, r], p.b.as_slice()));
            }
        }
        out
    }

    /// `adapter_config.json` as PEFT writes it (the fields PEFT needs; the
    /// others take PEFT's defaults when it loads the file).
    pub fn config_json(&self) -> Json {
        let c = &self.config;
        let alpha = if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e9 {
            json!(c.alpha as i64)
        } else {
            json!(short_f64(c.alpha))
        };
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": c.rank,
            "lora_alpha": alpha,
            "lora_dropout": short_f64(c.dropout),
            "target_modules": c.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "use_rslora": c.rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
            "revision": null,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into
    /// `dir`, atomically: into a temporary sibling folder that is then
    /// renamed. An existing `dir` is replaced if it is empty or holds an
    /// adapter; any other existing folder is refused.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let is_adapter = |d: &Path| d.join(ADAPTER_CONFIG).exists();
        write_dir_atomically(dir, "lora", is_adapter, |tmp| self.write_files(tmp))
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into the
    /// existing folder `dir` (a temporary one: see [`LoraAdapter::save`]).
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(ADAPTER_CONFIG), &self.config_json())?;
        let tensors = self.tensors();
        let plan: Vec<_> = tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), s.clone(), Dtype::F32))
            .collect();
        write_safetensors(&dir.join(ADAPTER_WEIGHTS), &plan, |i| {
            Ok(tensors[i].2.to_vec())
        })
    }

    /// PEFT's names of every tensor, in the order of `Lora::tensors` (per
    /// layer, per target, A then B).
    pub fn tensor_names(&self) -> Vec<String> {
        self.config.tensor_names(self.layers.len())
    }

    /// Loads a PEFT LoRA adapter folder for a model with config `model`.
    /// Every tensor's shape is checked against the model (an adapter made for
    /// another model is refused, naming the file and tensor); unknown and
    /// missing tensors are errors.
    pub fn load(dir: &Path, model: &LlamaConfig) -> Result<Self> {
        let cpath = dir.join(ADAPTER_CONFIG);
        let text = fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
        let (config, base_model) = parse_adapter_config(&text, &cpath)?;
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let bytes = fs::read(&wpath).map_err(|e| Error::io(&wpath, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&wpath, format!("not a valid safetensors file: {e}")))?;
        let bad = |msg: String| Error::format(&wpath, msg);

        let r = config.rank;
        let mut slots: Vec<Vec<[Option<Vec<f32>>; 2]>> = (0..model.num_layers)
            .map(|_| vec![[None, None]; config.targets.len()])
            .collect();
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0)); // deterministic error messages
        for (name, view) in tensors {
            let (layer, target, which) = parse_peft_name(&name).ok_or_else(|| {
                bad(format!(
                    "unexpected tensor {name}: engine reads LoRA A/B weights of the Llama projections (base_model.model.model.layers.{{i}}.self_attn.q_proj.lora_A.weight, ...)"
                ))
            })?;
            if layer >= model.num_layers {
                return Err(bad(format!(
                    "tensor {name} is for layer {layer}, but the model has {} layers: the adapter was made for a different model",
                    model.num_layers
                )));
            }
            let j = config
                .targets
                .iter()
                .position(|&t| t == target)
                .ok_or_else(|| {
                    bad(format!(
                        "tensor {name} adapts {target}, which is not in target_modules ({}) of {ADAPTER_CONFIG}",
                        names(&config.targets)
                    ))
                })?;
            let [out, inp] = target.shape(model);
            let want = if which == 0 { [r, inp] } else { [out, r] };
            if view.shape() != want {
                return Err(bad(format!(
                    "tensor {name} has shape {:?}, expected {want:?} for r={r} on this model: the adapter was made for a different model (or r in {ADAPTER_CONFIG} is wrong)",
                    view.shape()
                )));
            }
            let values = DType::from_safetensors(view.dtype()).map(|t| t.decode(view.data()));
            let values = values.ok_or_else(|| {
                bad(format!(
                    "tensor {name} has dtype {:?}; engine reads f32, bf16 and f16",
                    view.dtype()
                ))
            })?;
            if slots[layer][j][which].replace(values).is_some() {
                return Err(bad(format!("tensor {name} appears twice")));
            }
        }
        let mut layers = Vec::with_capacity(model.num_layers);
        for (i, layer) in slots.into_iter().enumerate() {
            let mut pairs = Vec::with_capacity(layer.len());
            for (&t, [a, b]) in config.targets.iter().zip(layer) {
                let [an, bn] = t.peft_names(i);
                let a = a.ok_or_else(|| bad(format!("tensor {an} is missing")))?;
                let b = b.ok_or_else(|| bad(format!("tensor {bn} is missing")))?;
                let [out, inp] = t.shape(model);
                pairs.push(LoraPair { a, b, out, inp });
            }
            layers.push(pairs);
        }
        Ok(LoraAdapter {
            config,
            layers,
            base_model,
        })
    }
}

/// Reads PEFT's `adapter_config.json`, refusing the LoRA variants engine
/// does not implement (DoRA, per-module ranks, biases, layer subsets, ...).
pub fn parse_adapter_config(text: &str, path: &Path) -> Result<(LoraConfig, Option<String>)> {
    let v: Json = serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let bad = |msg: String| Error::format(path, msg);
    let obj = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    match field("peft_type").and_then(Json::as_str) {
        Some("LORA") => {}
        other => {
            return Err(bad(format!(
                "peft_type is {}; engine reads LoRA adapters (\"LORA\")",
                other.map_or("missing".to_string(), |s| format!("\"{s}\""))
            )))
        }
    }
    let rank = field("r")
        .and_then(Json::as_u64)
        .ok_or_else(|| bad("r is missing or not a whole number".into()))? as usize;
    let alpha = match field("lora_alpha") {
        None => 8.0, // PEFT's default
        Some(a) => a
            .as_f64()
            .ok_or_else(|| bad("lora_alpha is not a number".into()))? as f32,
    };
    let dropout = match field("lora_dropout") {
        None => 0.0,
        Some(d) => d
            .as_f64()
            .ok_or_else(|| bad("lora_dropout is not a number".into()))? as f32,
    };
    let rslora = field("use_rslora").and_then(Json::as_bool).unwrap_or(false);
    let targets = match field("target_modules") {
        Some(Json::Array(a)) => {
            let mut t = Vec::new();
            for m in a {
                let m = m
                    .as_str()
                    .ok_or_else(|| bad("target_modules holds a non-string".into()))?;
                t.push(m.parse().map_err(|e: Error| bad(e.to_string()))?);
            }
            t
        }
        Some(Json::String(s)) if s == "all-linear" => Target::ALL.to_vec(),
        Some(Json::String(s)) => {
            return Err(Error::Unsupported(format!(
                "{}: target_modules is the pattern \"{s}\"; engine reads a list of module names",
                path.display()
            )))
        }
        _ => return Err(bad("target_modules is missing".into())),
    };
    let unsupported = |what: &str| {
        Error::Unsupported(format!(
            "{}: {what} is not supported by engine's LoRA",
            path.display()
        ))
    };
    if let Some(b) = field("bias").and_then(Json::as_str) {
        if b != "none" {
            return Err(unsupported(&format!("bias \"{b}\"")));
        }
    }
    for flag in ["use_dora", "fan_in_fan_out", "lora_bias"] {
        if field(flag).and_then(Json::as_bool) == Some(true) {
            return Err(unsupported(flag));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if field(pattern)
            .and_then(Json::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(unsupported(pattern));
        }
    }
    for list in ["layers_to_transform", "modules_to_save"] {
        if field(list).is_some() {
            return Err(unsupported(list));
        }
    }
    let config =
        LoraConfig::new(rank, alpha, dropout, targets, rslora).map_err(|e| bad(e.to_string()))?;
    let base = field("base_model_name_or_path")
        .and_then(Json::as_str)
        .map(String::from);
    Ok((config, base))
}

/// `(layer, target, 0 for A / 1 for B)` of a PEFT LoRA tensor name.
fn parse_peft_name(name: &str) -> Option<(usize, Target, usize)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let layer = i.parse().ok()?;
    let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, 0)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, 1)
    };
    let target = Target::ALL.into_iter().find(|t| t.module() == module)?;
    Some((layer, target, which))
}

/// What [`merge_to_dir`] did.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    pub n_tensors: usize,
    pub n_merged: usize,
    /// Other files copied from the base folder (config, tokenizer, ...).
    pub copied: Vec<String>,
}

/// Writes the HF model folder `out_dir`: the weights of `model_dir` with
/// `adapter` merged in (one `model.safetensors`, each tensor in its original
/// dtype), and every other file of `model_dir` (config.json, tokenizer
/// files, ...) copied. The base may be sharded. Written atomically; an
/// existing non-empty `out_dir` is refused. This is `engine merge`.
pub fn merge_to_dir(
    model_dir: &Path,
    adapter: &LoraAdapter,
    out_dir: &Path,
) -> Result<MergeSummary> {
    let config = LlamaConfig::from_file(&model_dir.join("config.json"))?;
    if adapter.layers.len() != config.num_layers {
        return Err(Error::Invalid(format!(
            "the adapter has {} layers, the model in {} has {}",
            adapter.layers.len(),
            model_dir.display(),
            config.num_layers
        )));
    }
    if let (Ok(a), Ok(b)) = (model_dir.canonicalize(), out_dir.canonicalize()) {
        if a == b {
            return Err(Error::Invalid(format!(
                "{}: the output folder must differ from the model folder",
                out_dir.display()
            )));
        }
    }
    let files = SafetensorsFiles::open_dir(model_dir)?;
    let metas = list_tensors(model_dir)?;
    // Every adapted weight must exist, with the shape the adapter expects.
    for (i, layer) in adapter.layers.iter().enumerate() {
        for (t, p) in adapter.config.targets.iter().zip(layer) {
            let name = t.weight_name(i);
            match metas.iter().find(|m| m.0 == name) {
                None => {
                    return Err(Error::format(
                        model_dir,
                        format!("tensor {name} is missing"),
                    ))
                }
                Some(m) if m.1 != [p.out, p.inp] => {
                    return Err(Error::format(
                        model_dir,
                        format!(
                            "tensor {name} has shape {:?}, the adapter expects [{}, {}]",
                            m.1, p.out, p.inp
                        ),
                    ))
                }
                _ => {}
            }
        }
    }
    let (r, s) = (adapter.config.rank, adapter.config.scaling());
    let mut n_merged = 0;
    let mut copied = Vec::new();
    write_dir_atomically(
        out_dir,
        "merge",
        |_| false,
        |tmp| {
            write_safetensors(&tmp.join("model.safetensors"), &metas, |i| {
                let (name, shape, _) = &metas[i];
                let mut w = files.load_f32(name, shape)?;
                if let Some(p) = adapter.for_weight(name) {
                    p.merge_into(&mut w, r, s);
                    n_merged += 1;
                }
                Ok(w)
            })?;
            copied = copy_model_side_files(model_dir, tmp)?;
            Ok(())
        },
    )?;
    Ok(MergeSummary {
        n_tensors: metas.len(),
        n_merged,
        copied,
    })
}

/// `(name, shape, dtype)` of every tensor of a model folder, sorted by name,
/// read from the safetensors headers.
fn list_tensors(dir: &Path) -> Result<Vec<(String, Vec<usize>, Dtype)>> {
    let index = dir.join("model.safetensors.index.json");
    let shards: Vec<PathBuf> = if index.exists() {
        let text = fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Json = serde_json::from_str(&text)
            .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| Error::format(&index, "no weight_map"))?;
        let mut f: Vec<_> = map
            .values()
            .filter_map(Json::as_str)
            .map(|s| dir.join(s))
            .collect();
        f.sort();
        f.dedup();
        f
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = Vec::new();
    for path in shards {
        let mut file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| Error::io(&path, e))?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(Error::format(&path, "safetensors header is too large"));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(&path, e))?;
        let header: Map<String, Json> = serde_json::from_slice(&header)
            .map_err(|e| Error::format(&path, format!("bad safetensors header: {e}")))?;
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad = || Error::format(&path, format!("bad header entry for tensor {name}"));
            let dtype: Dtype = serde_json::from_value(info.get("dtype").cloned().ok_or_else(bad)?)
                .map_err(|_| bad())?;
            let shape: Vec<usize> =
                serde_json::from_value(info.get("shape").cloned().ok_or_else(bad)?)
                    .map_err(|_| bad())?;
            out.push((name, shape, dtype));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
