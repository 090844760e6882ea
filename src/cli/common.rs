//! What several commands share: the device choice, model folders and their
//! check, model loading, and the value parsers of numeric flags.

use anyhow::{bail, Context, Result};
use engine::backend::cuda::driver::GpuDriver;
use engine::backend::cuda::real::Real;
use engine::backend::Backend;
use engine::model::llama::Llama;
use engine::model::lora::LoraAdapter;
use engine::model::quant_types::Weights;
use std::path::Path;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The first CUDA GPU if one can be used, else the CPU.
    Auto,
    /// The CPU (f32).
    Cpu,
    /// The first CUDA GPU (bf16 kernels compiled by NVRTC).
    Cuda,
    /// The CUDA kernels in the CPU emulator (a build with `--features emu`).
    Emu,
}

/// An opened device (one per process, so its size does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Device {
    Cpu,
    Cuda(Real),
    #[cfg(feature = "emu")]
    Emu,
}

/// Opens the device `choice` names (None: `auto`, not given on the command
/// line). stderr names the device when it is a GPU; when `auto` falls back
/// to the CPU it says so, and why, only if `--device auto` was given
/// explicitly — a plain CPU run prints nothing about devices.
pub fn open_device(choice: Option<DeviceArg>) -> Result<Device> {
    Ok(match choice.unwrap_or(DeviceArg::Auto) {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => {
            let gpu = Real::new(0).context("--device cuda")?;
            eprintln!("device: {}", gpu.name());
            Device::Cuda(gpu)
        }
        #[cfg(feature = "emu")]
        DeviceArg::Emu => Device::Emu,
        #[cfg(not(feature = "emu"))]
        DeviceArg::Emu => bail!("--device emu needs engine built with `--features emu`"),
        DeviceArg::Auto => match Real::new(0) {
            Ok(gpu) => {
                eprintln!("device: {}", gpu.name());
                Device::Cuda(gpu)
            }
            Err(why) => {
                if choice.is_some() {
                    eprintln!("device: cpu (no CUDA GPU: {why})");
                }
                Device::Cpu
            }
        },
    })
}

/// The device of a job whose CUDA kernels have run only in the emulator so
/// far (training, the encoder): `auto` is the CPU, saying why when
/// `--device auto` was given; `cuda` or `emu` tries them.
pub fn cpu_unless_asked(choice: Option<DeviceArg>, what: &str) -> Result<Device> {
    match choice {
        None => Ok(Device::Cpu),
        Some(DeviceArg::Auto) => {
            eprintln!(
                "device: cpu ({what} on CUDA is verified only in the emulator so far; \
                 --device cuda tries it)"
            );
            Ok(Device::Cpu)
        }
        other => open_device(other),
    }
}

/// Runs `$body` with `$be` bound to the backend of `$device`.
macro_rules! on_device {
    ($device:expr, |$be:ident| $body:expr) => {
        match $device {
            $crate::cli::common::Device::Cpu => {
                let $be = engine::backend::cpu::Cpu;
                $body
            }
            $crate::cli::common::Device::Cuda(gpu) => {
                let $be = engine::backend::cuda::Cuda::new(gpu);
                $body
            }
            #[cfg(feature = "emu")]
            $crate::cli::common::Device::Emu => {
                let $be =
                    engine::backend::cuda::Cuda::new(engine::backend::cuda::driver::Emu::new());
                $body
            }
        }
    };
}
pub(crate) use on_device;

/// The one check of every folder a flag names (`--model`, `--adapter`,
/// `--embedder`), before anything reads it: `error: model folder X does not
/// exist`, the same in every command.
pub fn folder(what: &str, dir: &Path) -> Result<()> {
    if !dir.exists() {
        // The real models' folders are made by a script: say which.
        let hint = match dir.parent().and_then(Path::file_name) {
            Some(p) if p == "models" => {
                " (models/fetch.sh makes models/smollm2-135m-instruct and models/all-minilm-l6-v2)"
            }
            _ => "",
        };
        bail!("{what} folder {} does not exist{hint}", dir.display());
    }
    if !dir.is_dir() {
        bail!("{what} folder {} is not a folder", dir.display());
    }
    Ok(())
}

/// The check of `--model` where a GGUF file may stand for the folder: a
/// folder, or a file ending in `.gguf`.
pub fn model_path(path: &Path) -> Result<()> {
    if path.is_file() {
        if path
            .extension()
            .is_none_or(|e| !e.eq_ignore_ascii_case("gguf"))
        {
            bail!(
                "model {} is a file but not a .gguf file (--model takes an HF model folder or a GGUF file)",
                path.display()
            );
        }
        return Ok(());
    }
    folder("model", path)
}

/// Loads a model (folder or GGUF) and, when given, applies a LoRA adapter
/// to it.
pub fn load_model<B: Backend>(
    be: B,
    dir: &Path,
    adapter: Option<&Path>,
    weights: Weights,
) -> Result<Llama<B>> {
    model_path(dir)?;
    if let Some(adapter) = adapter {
        folder("adapter", adapter)?;
    }
    let mut llm = Llama::load_as(be, dir, weights)?;
    if let Some(adapter) = adapter {
        let lora = LoraAdapter::load(adapter, &llm.config)?;
        llm.set_adapter(&lora)?;
    }
    Ok(llm)
}

/// Loads a model (folder or GGUF) and, when given, a LoRA adapter for it,
/// kept apart: generation takes adapters per request (`infer::generate`).
pub fn load_model_and_adapter<B: Backend>(
    be: B,
    dir: &Path,
    adapter: Option<&Path>,
    weights: Weights,
) -> Result<(Llama<B>, Option<LoraAdapter>)> {
    model_path(dir)?;
    if let Some(adapter) = adapter {
        folder("adapter", adapter)?;
    }
    let llm = Llama::load_as(be, dir, weights)?;
    let lora = match adapter {
        Some(dir) => Some(LoraAdapter::load(dir, &llm.config)?),
        None => None,
    };
    Ok((llm, lora))
}

/// A count flag (`--max-tokens`, `--batch`, …): a whole number ≥ 0. With
/// `allow_negative_numbers` on the flag, `--max-tokens -5` reaches this
/// parser and reads "invalid value '-5' for '--max-tokens <N>': …" instead
/// of clap's "unexpected argument '-5'".
pub fn count(s: &str) -> Result<usize, String> {
    s.trim().parse().map_err(|_| not_a_count(s))
}

/// As [`count`], for u64 flags (steps, seeds).
pub fn count_u64(s: &str) -> Result<u64, String> {
    s.trim().parse().map_err(|_| not_a_count(s))
}

fn not_a_count(s: &str) -> String {
    if s.trim().parse::<i128>().is_ok_and(|v| v < 0) {
        "must be 0 or more".into()
    } else {
        "must be a whole number (0, 1, 2, …)".into()
    }
}

/// `n` per second of `d`, or None when nothing was timed (no tokens, or no
/// time: `--max-tokens 0` runs nothing).
pub fn rate(n: usize, d: std::time::Duration) -> Option<f64> {
    (n > 0 && !d.is_zero()).then(|| n as f64 / d.as_secs_f64())
}

/// `--weights`: the format of a model folder's matrices at load.
pub fn weights(s: &str) -> Result<Weights, String> {
    s.parse().map_err(|e: engine::Error| e.to_string())
}
