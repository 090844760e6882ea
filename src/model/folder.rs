//! Writing model folders (and single model files): every output is filled
//! under a temporary name next to it and renamed into place, so a crash or an
//! error never leaves a half-written folder or file where a complete one is
//! expected.

use crate::error::{Error, Result};
use crate::tensor::DType;
use safetensors::tensor::Dtype;
use serde_json::{json, Map, Value as Json};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub fn write_json(path: &Path, v: &Json) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    text.push('\n');
    fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// The f64 whose shortest decimal form is that of `x` (0.05, not
/// 0.05000000074505806).
pub fn short_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// `.NAME.TAG-PID` next to `dir`.
fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file or folder name", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(
        ".{}.{tag}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Fills a temporary sibling of `out` with `fill`, then renames it to `out`,
/// so that `out` is never half-written. An existing `out` must be a folder
/// that is empty or for which `replaceable` holds; it is moved aside first
/// and removed once the new folder is in place.
pub fn write_dir_atomically(
    out: &Path,
    tag: &str,
    replaceable: impl Fn(&Path) -> bool,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let check = || -> Result<bool> {
        if !out.exists() {
            return Ok(false);
        }
        if !out.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: exists and is not a folder",
                out.display()
            )));
        }
        let empty = fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_none();
        if !empty && !replaceable(out) {
            return Err(Error::Invalid(format!(
                "{}: folder exists and is not empty; choose a new output folder or remove it",
                out.display()
            )));
        }
        Ok(true)
    };
    check()?;
    let tmp = sibling(out, &format!("{tag}-tmp"))?;
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let done = fill(&tmp).and_then(|_| {
        if check()? {
            let old = sibling(out, &format!("{tag}-old"))?;
            fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
            fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
            fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
        } else {
            fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
        }
    });
    if done.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    done
}

/// Writes the file `out` by `fill` into a temporary sibling, then renames it
/// over `out`, so that `out` is never half-written; on error the temporary
/// file is removed. `fill` must sync what it writes. Missing parent folders
/// are made.
pub fn write_file_atomically(
    out: &Path,
    tag: &str,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if out.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: is a folder, not a file",
            out.display()
        )));
    }
    let tmp = sibling(out, &format!("{tag}-tmp"))?;
    if let Some(parent) = tmp.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let done = fill(&tmp).and_then(|_| fs::rename(&tmp, out).map_err(|e| Error::io(out, e)));
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done
}

/// Copies a model folder's files other than its weights (config,
/// tokenizer, generation config; not `*.safetensors`, the shard index or
/// hidden files) into `dest`, in name order. Returns the names copied.
pub fn copy_model_side_files(model_dir: &Path, dest: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))? {
        let e = e.map_err(|e| Error::io(model_dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file
            && !name.ends_with(".safetensors")
            && name != "model.safetensors.index.json"
            && !name.starts_with('.')
        {
            names.push(name);
        }
    }
    names.sort();
    for name in &names {
        let (from, to) = (model_dir.join(name), dest.join(name));
        fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
    }
    Ok(names)
}

/// Writes a safetensors file whose tensors are `plan` (name, shape, dtype:
/// F32, BF16 or F16), asking `data(i)` for tensor i's values as f32 one at a
/// time, so that memory holds one tensor, not the model.
pub fn write_safetensors(
    path: &Path,
    plan: &[(String, Vec<usize>, Dtype)],
    mut data: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    let size = |d: Dtype| match d {
        Dtype::F32 => Ok(4),
        Dtype::BF16 | Dtype::F16 => Ok(2),
        other => Err(Error::Unsupported(format!(
            "{}: cannot write dtype {other:?} (engine writes f32, bf16 and f16)",
            path.display()
        ))),
    };
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape, dtype) in plan {
        let end = offset + shape.iter().product::<usize>() * size(*dtype)?;
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_string(&header).expect("JSON values serialize");
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut bytes = Vec::new();
    for (i, (name, shape, dtype)) in plan.iter().enumerate() {
        let values = data(i)?;
        if values.len() != shape.iter().product::<usize>() {
            return Err(Error::Invalid(format!(
                "{}: tensor {name} has {} values for shape {shape:?}",
                path.display(),
                values.len()
            )));
        }
        bytes.clear();
        DType::from_safetensors(*dtype)
            .unwrap_or(DType::F32)
            .encode_into(&values, &mut bytes);
        w.write_all(&bytes).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)
}

/// A model's name, as servers and indexes call it: the last component of
/// its canonical path ("smollm2-135m-instruct" for
/// `models/smollm2-135m-instruct/`), a GGUF file's without `.gguf`
/// ("SmolLM2-135M-Instruct.Q4_1"), or "model" when it has none.
pub fn name(dir: &Path) -> String {
    let path = std::fs::canonicalize(dir).ok();
    let name = if path.as_deref().is_some_and(Path::is_file) {
        path.as_deref().and_then(Path::file_stem)
    } else {
        path.as_deref().and_then(Path::file_name)
    };
    name.map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}
