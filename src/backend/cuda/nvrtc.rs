//! Run-time compilation of the kernels (kernels/*.cu) to PTX with NVRTC, and a
//! disk cache of the results.
//!
//! NVRTC needs no GPU. Its library (libnvrtc.so.12) is loaded at run time by
//! cudarc; the CUDA headers (cuda_bf16.h, ...) and ptxas come from a CUDA
//! toolkit or from the PyPI wheels that `scripts/cuda-tools.sh` installs into
//! `.cuda/` at the repository root. Where things are looked up:
//!
//! | what        | override              | then                                         |
//! |-------------|-----------------------|----------------------------------------------|
//! | libnvrtc    | `LD_LIBRARY_PATH`     | `.cuda/` tools folder, see [`tools_dir`]      |
//! | headers     | `ENGINE_CUDA_INCLUDE` | `.cuda/`, `$CUDA_HOME/include`, /usr/local/cuda |
//! | ptxas       | `ENGINE_PTXAS`        | `.cuda/`, `$CUDA_HOME/bin`, `PATH`            |
//! | cache       | `ENGINE_KERNEL_CACHE` | `$XDG_CACHE_HOME/engine/kernels`, `~/.cache/engine/kernels` |
//!
//! The cache is keyed by a hash of the kernel file, the headers it may include
//! (kernels/common.cuh), the options, the architecture and the NVRTC version;
//! files are written to a temporary name and renamed, so concurrent processes
//! never read half a file.

use crate::backend::cuda::sources;
use crate::error::{Error, Result};
use cudarc::nvrtc::{CompileError, CompileOptions};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// A GPU architecture, as `sm_80`, `sm_90` or `sm_90a` (`compute_80` is
/// accepted too). NVRTC compiles for its virtual architecture (`compute_80`),
/// ptxas for the real one (`sm_80`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Compute capability times ten plus an optional suffix: `80`, `90a`.
    number: String,
}

impl Arch {
    /// Parses `sm_80`, `compute_80`, `sm_90a` or a bare `80`.
    pub fn parse(s: &str) -> Result<Arch> {
        let t = s.trim();
        let number = t
            .strip_prefix("sm_")
            .or_else(|| t.strip_prefix("compute_"))
            .unwrap_or(t);
        let digits = number.trim_end_matches(['a', 'f']);
        let suffix = &number[digits.len()..];
        let ok = (2..=3).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
            && suffix.len() <= 1;
        if !ok {
            return Err(Error::Invalid(format!(
                "bad GPU architecture {s:?}: expected sm_80, sm_86, sm_89, sm_90, sm_90a, ..."
            )));
        }
        Ok(Arch {
            number: number.to_string(),
        })
    }

    /// The architecture of a device with compute capability `major.minor`.
    pub fn from_compute_capability(major: u32, minor: u32) -> Arch {
        Arch {
            number: format!("{major}{minor}"),
        }
    }

    /// `sm_80`: what ptxas and the driver call it.
    pub fn sm(&self) -> String {
        format!("sm_{}", self.number)
    }

    /// `compute_80`: the virtual architecture NVRTC emits PTX for.
    pub fn compute(&self) -> String {
        format!("compute_{}", self.number)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}", self.number)
    }
}

/// How to compile. The defaults are what the engine runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub arch: Arch,
    /// `--use_fast_math` (approximate division, sqrt, exp; flush to zero).
    pub fast_math: bool,
    /// `--maxrregcount`: a cap on registers per thread.
    pub max_registers: Option<u32>,
}

impl Options {
    pub fn new(arch: Arch) -> Options {
        Options {
            arch,
            fast_math: false,
            max_registers: None,
        }
    }

    /// The NVRTC command line, less the include paths.
    fn flags(&self) -> Vec<String> {
        let mut flags = vec![
            format!("--gpu-architecture={}", self.arch.compute()),
            "-std=c++17".to_string(),
        ];
        if self.fast_math {
            flags.push("--use_fast_math".to_string());
        }
        if let Some(n) = self.max_registers {
            flags.push(format!("--maxrregcount={n}"));
        }
        flags
    }
}

/// The result of one compilation.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The kernel file's name, e.g. `elementwise.cu`.
    pub name: String,
    pub arch: Arch,
    pub ptx: String,
    /// Where the PTX is cached on disk.
    pub path: PathBuf,
    /// True when it came from the disk cache without running NVRTC.
    pub cached: bool,
}

// --- where the tools are -------------------------------------------------

/// The folder holding the PyPI wheels' `nvidia/` tree installed by
/// scripts/cuda-tools.sh: `$ENGINE_CUDA_TOOLS/site/nvidia` when that variable
/// is set, else `.cuda/site/nvidia` in the current directory or one of its
/// parents, next to the executable (target/release/engine) or in this source
/// tree.
pub fn tools_dir() -> Option<PathBuf> {
    let has = |root: &Path| {
        let d = root.join("site").join("nvidia");
        d.is_dir().then_some(d)
    };
    if let Some(root) = std::env::var_os("ENGINE_CUDA_TOOLS") {
        return has(Path::new(&root));
    }
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    starts
        .iter()
        .flat_map(|s| s.ancestors())
        .find_map(|dir| has(&dir.join(".cuda")))
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn cuda_homes() -> Vec<PathBuf> {
    let mut homes: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env_path(v))
        .collect();
    homes.push(PathBuf::from("/usr/local/cuda"));
    homes
}

/// The CUDA headers folder (the one with cuda_bf16.h), if any is found.
pub fn include_dir() -> Option<PathBuf> {
    if let Some(dir) = env_path("ENGINE_CUDA_INCLUDE") {
        return Some(dir);
    }
    let mut candidates = Vec::new();
    if let Some(t) = tools_dir() {
        candidates.push(t.join("cuda_runtime").join("include"));
    }
    candidates.extend(cuda_homes().into_iter().map(|h| h.join("include")));
    candidates
        .into_iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
}

/// The ptxas binary: `$ENGINE_PTXAS`, the one in `.cuda/`, a CUDA toolkit's or
/// the first on `PATH`.
pub fn ptxas_path() -> Result<PathBuf> {
    if let Some(p) = env_path("ENGINE_PTXAS") {
        if !p.is_file() {
            return Err(Error::Unsupported(format!(
                "ENGINE_PTXAS={}: no such file",
                p.display()
            )));
        }
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if let Some(t) = tools_dir() {
        candidates.push(t.join("cuda_nvcc").join("bin").join("ptxas"));
    }
    candidates.extend(
        cuda_homes()
            .into_iter()
            .map(|h| h.join("bin").join("ptxas")),
    );
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("ptxas")));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::Unsupported(
            "ptxas not found: run scripts/cuda-tools.sh, or set ENGINE_PTXAS to a ptxas binary"
                .into(),
        )
    })
}

/// The kernel cache folder: `$ENGINE_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/engine/kernels`, else `~/.cache/engine/kernels`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = env_path("ENGINE_KERNEL_CACHE") {
        return d;
    }
    let base = env_path("XDG_CACHE_HOME")
        .or_else(|| env_path("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("engine").join("kernels")
}

// --- loading libnvrtc ------------------------------------------------------

#[cfg(target_os = "linux")]
mod dl {
    use std::ffi::{c_char, c_int, c_void, CString};
    use std::path::Path;

    const RTLD_NOW: c_int = 2;
    const RTLD_GLOBAL: c_int = 0x100;

    extern "C" {
        fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    }

    /// Loads a shared library by absolute path and keeps it loaded for the
    /// life of the process, so that a later `dlopen` of its soname (which is
    /// what cudarc does) finds it already there.
    pub fn preload(path: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: `c` is a NUL-terminated path; the handle is deliberately
        // never closed. libnvrtc's initialisers have no preconditions.
        !unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) }.is_null()
    }
}

#[cfg(not(target_os = "linux"))]
mod dl {
    pub fn preload(_path: &std::path::Path) -> bool {
        false
    }
}

fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library names cudarc would use.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Makes sure libnvrtc can be loaded, from the library path or from `.cuda/`,
/// and returns its version. Every NVRTC call in engine goes through here first:
/// cudarc panics when the library is missing, this returns an error instead.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    static VERSION: OnceLock<std::result::Result<(i32, i32), String>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            if !nvrtc_present() {
                let lib = tools_dir().map(|t| t.join("cuda_nvrtc").join("lib"));
                let loaded = lib
                    .as_ref()
                    .is_some_and(|l| dl::preload(&l.join("libnvrtc.so.12")));
                if !(loaded && nvrtc_present()) {
                    return Err(
                        "NVRTC (libnvrtc.so.12) not found: run scripts/cuda-tools.sh, \
                                or add the folder holding libnvrtc to LD_LIBRARY_PATH"
                            .to_string(),
                    );
                }
            }
            let (mut major, mut minor) = (0, 0);
            // SAFETY: the library is present (checked above), so cudarc's
            // symbol lookup does not panic; both out-pointers are valid.
            let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
            rc.result()
                .map_err(|e| format!("nvrtcVersion failed: {e}"))?;
            Ok((major, minor))
        })
        .clone()
        .map_err(Error::Unsupported)
}

/// True when NVRTC can be loaded (never panics).
pub fn nvrtc_available() -> bool {
    nvrtc_version().is_ok()
}

// --- the compiler and its cache ---------------------------------------------

/// A 64-bit hash (xxh3) of the parts, each with a length prefix so that
/// ("ab","c") ≠ ("a","bc"). Stable across Rust versions, unlike
/// `DefaultHasher`.
fn parts_hash(parts: &[&[u8]]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.digest()
}

/// Compiles kernel sources to PTX with NVRTC, through a disk cache. Cheap to
/// create; safe to share between threads.
pub struct Compiler {
    cache_dir: PathBuf,
    include_dir: Option<PathBuf>,
    version: (i32, i32),
    hits: AtomicUsize,
    misses: AtomicUsize,
}

impl Compiler {
    /// A compiler with the default cache folder ([`default_cache_dir`]).
    /// Fails with a clear error when NVRTC is not installed.
    pub fn new() -> Result<Compiler> {
        Compiler::with_cache_dir(default_cache_dir())
    }

    pub fn with_cache_dir(cache_dir: impl Into<PathBuf>) -> Result<Compiler> {
        let version = nvrtc_version()?;
        let cache_dir = cache_dir.into();
        std::fs::create_dir_all(&cache_dir).map_err(|e| Error::io(&cache_dir, e))?;
        Ok(Compiler {
            cache_dir,
            include_dir: include_dir(),
            version,
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
        })
    }

    /// NVRTC's version, e.g. (12, 8).
    pub fn nvrtc_version(&self) -> (i32, i32) {
        self.version
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Compilations answered from the disk cache so far.
    pub fn cache_hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// Compilations that ran NVRTC so far.
    pub fn cache_misses(&self) -> usize {
        self.misses.load(Ordering::Relaxed)
    }

    /// Compiles one embedded kernel file (`elementwise.cu`) of
    /// [`sources::KERNELS`].
    pub fn compile(&self, file: &str, opts: &Options) -> Result<Compiled> {
        let text = sources::kernel(file).ok_or_else(|| {
            let known: Vec<&str> = sources::KERNELS.iter().map(|(n, _)| *n).collect();
            Error::Invalid(format!(
                "no kernel file {file:?}; the kernel files are: {}",
                known.join(", ")
            ))
        })?;
        self.compile_source(file, text, opts)
    }

    /// Compiles a kernel source given as text, named `name` in messages. It may
    /// `#include "common.cuh"` (the embedded headers, [`sources::HEADERS`]) and
    /// the CUDA headers.
    pub fn compile_source(&self, name: &str, source: &str, opts: &Options) -> Result<Compiled> {
        let flags = opts.flags();
        let version = format!("nvrtc {}.{}", self.version.0, self.version.1);
        let mut parts: Vec<&[u8]> = vec![b"engine-ptx-v1", version.as_bytes()];
        parts.extend(flags.iter().map(|f| f.as_bytes()));
        for (n, t) in sources::HEADERS {
            parts.push(n.as_bytes());
            parts.push(t.as_bytes());
        }
        parts.push(source.as_bytes());
        let key = parts_hash(&parts);
        let stem = Path::new(name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("kernel");
        let stem: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let path = self.cache_dir.join(format!(
            "{stem}.{}.nvrtc{}{}.{key:016x}.ptx",
            opts.arch.sm(),
            self.version.0,
            self.version.1
        ));

        if let Ok(ptx) = std::fs::read_to_string(&path) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Compiled {
                name: name.to_string(),
                arch: opts.arch.clone(),
                ptx,
                path,
                cached: true,
            });
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let ptx = self.run_nvrtc(name, source, flags)?;
        write_atomically(&path, ptx.as_bytes())?;
        Ok(Compiled {
            name: name.to_string(),
            arch: opts.arch.clone(),
            ptx,
            path,
            cached: false,
        })
    }

    /// Writes the embedded headers into a folder of the cache named by their
    /// hash (so two versions of engine never overwrite each other's), once.
    fn headers_dir(&self) -> Result<PathBuf> {
        let parts: Vec<&[u8]> = sources::HEADERS
            .iter()
            .flat_map(|(n, t)| [n.as_bytes(), t.as_bytes()])
            .collect();
        let dir = self
            .cache_dir
            .join("include")
            .join(format!("{:016x}", parts_hash(&parts)));
        for (name, text) in sources::HEADERS {
            let path = dir.join(name);
            let same = std::fs::read(&path).is_ok_and(|b| b == text.as_bytes());
            if !same {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                write_atomically(&path, text.as_bytes())?;
            }
        }
        Ok(dir)
    }

    fn run_nvrtc(&self, name: &str, source: &str, flags: Vec<String>) -> Result<String> {
        if source.contains('\0') {
            return Err(Error::format(name, "kernel source contains a NUL byte"));
        }
        let mut include_paths = vec![self.headers_dir()?.to_string_lossy().into_owned()];
        if let Some(d) = &self.include_dir {
            include_paths.push(d.to_string_lossy().into_owned());
        }
        let opts = CompileOptions {
            include_paths,
            options: flags.clone(),
            name: Some(name.to_string()),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| {
            let msg = match e {
                CompileError::CompileError { log, .. } => {
                    let mut msg = format!(
                        "NVRTC failed ({}):\n{}",
                        flags.join(" "),
                        log.to_string_lossy().trim_end()
                    );
                    if self.include_dir.is_none() {
                        msg.push_str(
                            "\n(no CUDA include folder was found: run scripts/cuda-tools.sh \
                             or set ENGINE_CUDA_INCLUDE)",
                        );
                    }
                    msg
                }
                other => format!("NVRTC failed: {other}"),
            };
            Error::format(name, msg)
        })?;
        Ok(ptx.to_src())
    }
}

/// Writes `bytes` to a temporary file next to `path`, then renames it over
/// `path`: readers see the old file, or the new one whole.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{n}.partial", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        let a = Arch::parse("sm_80").unwrap();
        assert_eq!((a.sm(), a.compute()), ("sm_80".into(), "compute_80".into()));
        assert_eq!(Arch::parse("compute_90a").unwrap().sm(), "sm_90a");
        assert_eq!(Arch::parse("86").unwrap().to_string(), "sm_86");
        assert_eq!(
            Arch::from_compute_capability(9, 0),
            Arch::parse("sm_90").unwrap()
        );
        for bad in ["", "sm_", "sm_8x", "gfx90a", "sm_080", "sm_90ab"] {
            assert!(Arch::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags() {
        let mut o = Options::new(Arch::parse("sm_90").unwrap());
        assert_eq!(o.flags(), ["--gpu-architecture=compute_90", "-std=c++17"]);
        o.fast_math = true;
        o.max_registers = Some(32);
        assert!(o.flags().contains(&"--use_fast_math".to_string()));
        assert!(o.flags().contains(&"--maxrregcount=32".to_string()));
    }

    #[test]
    fn hash_separates_parts() {
        assert_ne!(parts_hash(&[b"ab", b"c"]), parts_hash(&[b"a", b"bc"]));
        assert_eq!(parts_hash(&[b"x"]), parts_hash(&[b"x"]));
    }

    #[test]
    fn missing_nvrtc_is_an_error_not_a_panic() {
        // Whether or not NVRTC is installed here, asking must not panic.
        match nvrtc_version() {
            Ok((major, _)) => assert!(major >= 11),
            Err(e) => assert!(e.to_string().contains("cuda-tools.sh"), "{e}"),
        }
    }
}
