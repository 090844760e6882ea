//! Reading weights from safetensors files (one file or a sharded set with
//! `model.safetensors.index.json`), memory-mapped with memmap2.

use crate::error::{Error, Result};
use crate::tensor::DType;
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{SafeTensors, TensorInfo};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8-byte length + JSON header).
    data_start: usize,
}

struct Entry {
    shard: usize,
    info: TensorInfo,
}

/// Every tensor of a model folder, by name.
pub struct SafetensorsFiles {
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

impl SafetensorsFiles {
    /// Opens `dir/model.safetensors`, or the shards listed in
    /// `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files = if index.exists() {
            shard_files(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this folder",
            ));
        };
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only; a model file changed underneath a
            // running process is outside what we can defend against (as for
            // every mmap-based loader).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
            for (name, info) in metadata.tensors() {
                let entry = Entry {
                    shard: shards.len(),
                    info: info.clone(),
                };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(Error::format(&path, format!("tensor {name} appears twice")));
                }
            }
            shards.push(Shard {
                path,
                mmap,
                data_start: 8 + header_len,
            });
        }
        Ok(SafetensorsFiles { shards, tensors })
    }

    /// Bytes of tensor `name` as stored, if there is one.
    pub fn nbytes(&self, name: &str) -> Option<usize> {
        let (start, end) = self.tensors.get(name)?.info.data_offsets;
        Some(end - start)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored dtypes, for `engine info`.
    pub fn dtypes(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .tensors
            .values()
            .map(|e| format!("{:?}", e.info.dtype).to_lowercase())
            .collect();
        d.sort();
        d.dedup();
        d
    }

    /// Reads tensor `name`, widened to f32, checking it has `shape`.
    /// Its pages are released afterwards, so loading a whole model holds the
    /// weights once, not twice.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            let path = self
                .shards
                .first()
                .map(|s| s.path.as_path())
                .unwrap_or(Path::new(""));
            Error::format(path, format!("tensor {name} is missing"))
        })?;
        let shard = &self.shards[entry.shard];
        let info = &entry.info;
        if info.shape != shape {
            return Err(Error::format(
                &shard.path,
                format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    info.shape
                ),
            ));
        }
        let (start, end) = info.data_offsets;
        let (start, end) = (shard.data_start + start, shard.data_start + end);
        let bytes = &shard.mmap[start..end];
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
            Error::format(
                &shard.path,
                format!(
                    "tensor {name} has dtype {:?}; engine reads f32, bf16 and f16",
                    info.dtype
                ),
            )
        })?;
        let out = dtype.decode(bytes);
        // SAFETY: the mapping is private and read-only, so dropping its pages
        // loses nothing: a later access reads them from the file again.
        unsafe {
            let _ =
                shard
                    .mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start);
        }
        Ok(out)
    }
}

/// The distinct shard files named by an index file's `weight_map`.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "no \"weight_map\" object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(index, format!("weight_map entry {name} is not a file name"))
        })?;
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}
