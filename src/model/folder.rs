//! Writing model folders: every output folder is filled under a temporary
//! name next to it and renamed into place, so a crash or an error never
//! leaves a half-written folder where a complete one is expected.

use crate::error::{Error, Result};
use serde_json::Value as Json;
use std::fs;
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
        .ok_or_else(|| Error::Invalid(format!("{}: not a folder name", dir.display())))?;
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
