//! Checkpoints of a fine-tuning run: everything needed to continue it as if
//! it had never stopped, in one folder written atomically (a temporary
//! sibling, then a rename), so an interrupted save never leaves a
//! half-written checkpoint.
//!
//! `checkpoint-{step}/` holds
//! - the trained weights, in the format users load: a PEFT adapter
//!   (`adapter_config.json`, `adapter_model.safetensors`) for LoRA, or a
//!   complete HF model folder (f32 `model.safetensors`, `config.json`, the
//!   tokenizer files) for full fine-tuning;
//! - `optimizer.safetensors`: AdamW's moments, `m.{name}` and `v.{name}` for
//!   every trained tensor (HF or PEFT names), f32;
//! - `trainer_state.json`: the optimizer steps done, the data position, the
//!   base model's fingerprint and the run's settings (a resumed run must use
//!   the same ones to reproduce the uninterrupted run). Dropout masks are a
//!   function of (seed, step, micro-batch), so there is no RNG state to keep.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::folder::{
    copy_model_side_files, write_dir_atomically, write_json, write_safetensors,
};
use crate::model::llama::Llama;
use crate::model::lora::LoraAdapter;
use crate::model::train_step::{param_list, param_names, AdamWState, Grads};
use crate::model::weights::SafetensorsFiles;
use crate::tensor::DType;
use crate::train::batch::DataPosition;
use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const FORMAT: &str = "engine-checkpoint";

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: String,
    pub version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// The next training micro-batch.
    pub data: DataPosition,
    /// The base model folder, for people reading the file.
    pub base_model: String,
    /// [`fingerprint`] of the base model: a resume must start from it.
    pub fingerprint: String,
    /// The settings that shape the run (see `trainer::RunSettings`).
    pub run: Json,
    /// Seconds of training up to this checkpoint, over every run that led
    /// to it, so that `elapsed_s` in metrics.jsonl goes on across a resume
    /// (0 in checkpoints written before the field).
    #[serde(default)]
    pub elapsed_s: f64,
}

impl TrainerState {
    pub fn new(
        step: u64,
        data: DataPosition,
        base: &Path,
        fingerprint: String,
        run: Json,
        elapsed_s: f64,
    ) -> Self {
        TrainerState {
            format: FORMAT.into(),
            version: 1,
            step,
            data,
            base_model: base.display().to_string(),
            fingerprint,
            run,
            elapsed_s,
        }
    }
}

/// The folder of the checkpoint after `step` optimizer steps.
pub fn checkpoint_dir(out: &Path, step: u64) -> PathBuf {
    out.join(format!("checkpoint-{step}"))
}

/// Saves a checkpoint of `model` (its adapter when it has one, else every
/// weight) and `opt` into `dir`, atomically.
pub fn save<B: Backend>(
    dir: &Path,
    model: &Llama<B>,
    model_dir: &Path,
    opt: &AdamWState<B>,
    state: &TrainerState,
) -> Result<()> {
    let is_checkpoint = |d: &Path| d.join(STATE_FILE).exists();
    write_dir_atomically(dir, "checkpoint", is_checkpoint, |tmp| {
        write_weights(tmp, model, model_dir, opt.master.as_ref())?;
        let be = &model.backend;
        let names = trained_names(model);
        let mut plan = Vec::new();
        let mut tensors = Vec::new();
        for (which, set) in [("m", &opt.m), ("v", &opt.v)] {
            for (name, t) in names.iter().zip(set.tensors()) {
                plan.push((format!("{which}.{name}"), t.shape.clone(), Dtype::F32));
                tensors.push(t);
            }
        }
        write_safetensors(&tmp.join(OPTIMIZER_FILE), &plan, |i| {
            be.download(tensors[i])
        })?;
        let json = serde_json::to_value(state).expect("the state serializes");
        write_json(&tmp.join(STATE_FILE), &json)
    })
}

/// Writes the trained weights into the existing folder `dir`: the adapter's
/// PEFT files, or (full fine-tuning) a complete model folder: f32
/// `model.safetensors` plus the base folder's other files (config,
/// tokenizer).
///
/// With f32 master weights (`AdamWState::master`, on a bf16 device) the
/// masters are written, not their rounded working copies.
pub fn write_weights<B: Backend>(
    dir: &Path,
    model: &Llama<B>,
    model_dir: &Path,
    masters: Option<&Grads<B>>,
) -> Result<()> {
    let be = &model.backend;
    if let Some(lora) = &model.adapter {
        let trained = masters.and_then(Grads::lora).unwrap_or(lora);
        return trained.download(be)?.write_files(dir);
    }
    let params = param_list(masters.and_then(Grads::full).unwrap_or(&model.weights));
    let plan: Vec<_> = param_names(&model.weights)
        .into_iter()
        .zip(&params)
        .map(|(n, t)| (n, t.shape.clone(), Dtype::F32))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &plan, |i| {
        be.download(params[i])
    })?;
    copy_model_side_files(model_dir, dir)?;
    Ok(())
}

/// The names of the trained tensors, in the order of `Grads::tensors`.
fn trained_names<B: Backend>(model: &Llama<B>) -> Vec<String> {
    match &model.adapter {
        Some(lora) => lora.config.tensor_names(lora.layers.len()),
        None => param_names(&model.weights),
    }
}

/// The checkpoint `--resume` names: `path` itself when it holds one, else
/// the latest `checkpoint-N` inside it (a run's `--out` folder).
pub fn find(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let entries = fs::read_dir(path).map_err(|e| Error::io(path, e))?;
    let mut best: Option<(u64, PathBuf)> = None;
    for e in entries {
        let e = e.map_err(|e| Error::io(path, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if e.path().join(STATE_FILE).exists() && best.as_ref().is_none_or(|b| step > b.0) {
            best = Some((step, e.path()));
        }
    }
    best.map(|b| b.1).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: no checkpoint to resume (no {STATE_FILE} here, and no checkpoint-N folder)",
            path.display()
        ))
    })
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not a trainer state: {e}")))?;
    if state.format != FORMAT || state.version != 1 {
        return Err(Error::format(
            &path,
            format!(
                "format {} version {}; this engine reads {FORMAT} version 1",
                state.format, state.version
            ),
        ));
    }
    Ok(state)
}

/// Fills `opt` from a checkpoint's `optimizer.safetensors`; every tensor must
/// be there with the shape of the one it restores.
pub fn load_optimizer<B: Backend>(
    dir: &Path,
    model: &Llama<B>,
    opt: &mut AdamWState<B>,
) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(&path, format!("not a safetensors file: {e}")))?;
    let be = &model.backend;
    let names = trained_names(model);
    for (which, set) in [("m", &mut opt.m), ("v", &mut opt.v)] {
        for (name, t) in names.iter().zip(set.tensors_mut()) {
            let key = format!("{which}.{name}");
            let view = st
                .tensor(&key)
                .map_err(|_| Error::format(&path, format!("tensor {key} is missing")))?;
            if view.shape() != t.shape.as_slice() || view.dtype() != Dtype::F32 {
                return Err(Error::format(
                    &path,
                    format!(
                        "tensor {key} is {:?} {:?}, expected F32 {:?}",
                        view.dtype(),
                        view.shape(),
                        t.shape
                    ),
                ));
            }
            let values = DType::F32.decode(view.data());
            *t = be.upload(values, &t.shape, t.dtype)?;
        }
    }
    Ok(())
}

/// Fills `opt`'s f32 master weights (when the device has them) from a
/// checkpoint's weight files, which hold the masters: a resume on a bf16
/// device then continues from the exact f32 values, not their rounding.
pub fn load_masters<B: Backend>(
    dir: &Path,
    model: &Llama<B>,
    opt: &mut AdamWState<B>,
) -> Result<()> {
    let be = &model.backend;
    let Some(master) = opt.master.as_mut() else {
        return Ok(());
    };
    let values: Vec<Vec<f32>> = match &model.adapter {
        Some(_) => LoraAdapter::load(dir, &model.config)?
            .layers
            .into_iter()
            .flatten()
            .flat_map(|p| [p.a, p.b])
            .collect(),
        None => {
            let files = SafetensorsFiles::open_dir(dir)?;
            param_names(&model.weights)
                .iter()
                .zip(param_list(&model.weights))
                .map(|(name, t)| files.load_f32(name, &t.shape))
                .collect::<Result<_>>()?
        }
    };
    for (t, v) in master.tensors_mut().into_iter().zip(values) {
        *t = be.upload(v, &t.shape, DType::F32)?;
    }
    Ok(())
}

/// A short fingerprint of a model's weights: xxh3 over, for every
/// safetensors file of a model folder (or the GGUF file itself), its length
/// and last MiB (tensor data), after a folder's parsed config. A resume
/// from a run on other weights is refused with it.
pub fn fingerprint(model_dir: &Path) -> Result<String> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut files: Vec<PathBuf> = if model_dir.is_file() {
        vec![model_dir.to_path_buf()]
    } else {
        let config_path = model_dir.join("config.json");
        let config = crate::model::config::LlamaConfig::from_file(&config_path)?;
        h.update(format!("{config:?}").as_bytes());
        fs::read_dir(model_dir)
            .map_err(|e| Error::io(model_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect()
    };
    files.sort();
    for path in files {
        let mut f = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        h.update(&len.to_le_bytes());
        let tail = len.min(1 << 20);
        f.seek(SeekFrom::Start(len - tail))
            .map_err(|e| Error::io(&path, e))?;
        let mut buf = vec![0u8; tail as usize];
        f.read_exact(&mut buf).map_err(|e| Error::io(&path, e))?;
        h.update(&buf);
    }
    Ok(format!("{:016x}", h.digest()))
}
