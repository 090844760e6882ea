//! `engine kernels check`: compiles every kernel file for the given GPU
//! architectures with no GPU present (NVRTC → PTX → ptxas) and reports, per
//! kernel entry point, its registers, static shared memory, stack frame and
//! register spills. Any compile error or spill fails the check.

use crate::backend::cuda::nvrtc::{self, Arch, Compiler, Options};
use crate::backend::cuda::sources;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::fmt;
use std::path::Path;
use std::process::Command;

/// What ptxas says about one function compiled for one architecture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// The kernel file, e.g. `elementwise.cu`.
    pub file: String,
    /// The function's (PTX) name.
    pub kernel: String,
    /// `sm_80`, ...
    pub arch: String,
    /// A `__global__` entry point (false: a device function ptxas kept apart).
    pub entry: bool,
    pub registers: u32,
    /// Static shared memory (`__shared__` arrays), bytes.
    pub smem_bytes: u64,
    pub stack_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
}

impl KernelStats {
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// The result of a check: one row per function × architecture.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// e.g. "12.8".
    pub nvrtc_version: String,
    /// ptxas's version line, e.g. "Cuda compilation tools, release 12.8, V12.8.93".
    pub ptxas_version: String,
    pub rows: Vec<KernelStats>,
}

impl Report {
    /// The rows that spill registers to local memory.
    pub fn spilling(&self) -> Vec<&KernelStats> {
        self.rows.iter().filter(|r| r.spills()).collect()
    }

    /// An error naming every function that spills, if any does.
    pub fn ensure_no_spills(&self) -> Result<()> {
        let spills = self.spilling();
        if spills.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = spills
            .iter()
            .map(|r| {
                format!(
                    "{} {} on {} ({} bytes stored, {} bytes loaded)",
                    r.file, r.kernel, r.arch, r.spill_store_bytes, r.spill_load_bytes
                )
            })
            .collect();
        Err(Error::Invalid(format!(
            "register spills in {} kernel(s): {}",
            spills.len(),
            list.join("; ")
        )))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "NVRTC {}, ptxas {}",
            self.nvrtc_version, self.ptxas_version
        )?;
        let name = |r: &KernelStats| {
            if r.entry {
                r.kernel.clone()
            } else {
                format!("{} (device fn)", r.kernel)
            }
        };
        let wf = self
            .rows
            .iter()
            .map(|r| r.file.len())
            .chain([4])
            .max()
            .unwrap_or(4);
        let wk = self
            .rows
            .iter()
            .map(|r| name(r).len())
            .chain([6])
            .max()
            .unwrap_or(6);
        writeln!(
            f,
            "{:wf$}  {:wk$}  {:7}  {:>4}  {:>10}  {:>11}  {:>20}",
            "file", "kernel", "arch", "regs", "smem bytes", "stack bytes", "spills (st/ld bytes)"
        )?;
        for r in &self.rows {
            let spills = format!("{}/{}", r.spill_store_bytes, r.spill_load_bytes);
            let mark = if r.spills() { "  SPILLS" } else { "" };
            writeln!(
                f,
                "{:wf$}  {:wk$}  {:7}  {:>4}  {:>10}  {:>11}  {:>20}{mark}",
                r.file,
                name(r),
                r.arch,
                r.registers,
                r.smem_bytes,
                r.stack_bytes,
                spills
            )?;
        }
        let n = self.rows.iter().filter(|r| r.entry).count();
        let s = self.spilling().len();
        write!(f, "{n} kernel builds, {s} with spills")
    }
}

/// Compiles every embedded kernel file for every architecture in `archs`
/// (`sm_80`, `sm_90`, ...) and returns the table; fails on a compile error or
/// on a spill.
pub fn check(archs: &[String]) -> Result<Report> {
    let report = inspect(archs)?;
    report.ensure_no_spills()?;
    Ok(report)
}

/// Like [`check`], but a spill is only reported in the table, not an error
/// (the CLI prints the table, then fails).
pub fn inspect(archs: &[String]) -> Result<Report> {
    let archs = archs
        .iter()
        .map(|a| Arch::parse(a))
        .collect::<Result<Vec<_>>>()?;
    if archs.is_empty() {
        return Err(Error::Invalid(
            "no architecture given (--arch sm_80,...)".into(),
        ));
    }
    let compiler = Compiler::new()?;
    let opts: Vec<Options> = archs.into_iter().map(Options::new).collect();
    inspect_sources(&compiler, sources::KERNELS, &opts)
}

/// Compiles each (file name, text) source with each set of options, runs ptxas
/// on the PTX and collects its figures. Fails when any does not compile; the
/// error carries each failing file's name and the compiler's log.
pub fn inspect_sources(
    compiler: &Compiler,
    sources: &[(&str, &str)],
    opts: &[Options],
) -> Result<Report> {
    let ptxas = nvrtc::ptxas_path()?;
    let ptxas_version = ptxas_version(&ptxas)?;
    let jobs: Vec<(&str, &str, &Options)> = sources
        .iter()
        .flat_map(|(name, text)| opts.iter().map(move |o| (*name, *text, o)))
        .collect();
    let results: Vec<Result<Vec<KernelStats>>> = jobs
        .par_iter()
        .map(|(name, text, o)| {
            let compiled = compiler.compile_source(name, text, o)?;
            let log = run_ptxas(&ptxas, &compiled.path, o, name)?;
            Ok(parse_ptxas(name, &o.arch.sm(), &log))
        })
        .collect();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(r) => rows.extend(r),
            Err(e) => errors.push(e),
        }
    }
    if errors.len() > 1 {
        let all: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        return Err(Error::Invalid(format!(
            "{} kernel builds failed:\n{}",
            errors.len(),
            all.join("\n\n")
        )));
    }
    if let Some(e) = errors.pop() {
        return Err(e);
    }
    let (major, minor) = compiler.nvrtc_version();
    Ok(Report {
        nvrtc_version: format!("{major}.{minor}"),
        ptxas_version,
        rows,
    })
}

fn ptxas_version(ptxas: &Path) -> Result<String> {
    let out = Command::new(ptxas)
        .arg("--version")
        .output()
        .map_err(|e| Error::io(ptxas, e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .rev()
        .find(|l| l.contains("release"))
        .and_then(|l| l.rsplit(", ").next())
        .unwrap_or("(unknown version)")
        .trim()
        .to_string())
}

/// Runs `ptxas -arch=sm_XX -v` on a PTX file and returns its info log. A
/// register cap is passed on, as the driver's JIT is given it at load time
/// (NVRTC does not write it into the PTX).
fn run_ptxas(ptxas: &Path, ptx: &Path, opts: &Options, name: &str) -> Result<String> {
    let arch = &opts.arch;
    let cubin = ptx.with_extension(format!("{}.cubin.partial", std::process::id()));
    let mut cmd = Command::new(ptxas);
    cmd.arg(format!("-arch={}", arch.sm())).arg("-v");
    if let Some(n) = opts.max_registers {
        cmd.arg(format!("--maxrregcount={n}"));
    }
    let out = cmd
        .arg("-o")
        .arg(&cubin)
        .arg(ptx)
        .output()
        .map_err(|e| Error::io(ptxas, e));
    let _ = std::fs::remove_file(&cubin);
    let out = out?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(Error::format(
            name,
            format!("ptxas -arch={} failed:\n{}", arch.sm(), log.trim_end()),
        ));
    }
    Ok(log)
}

/// Reads ptxas's `-v` log:
///
/// ```text
/// ptxas info    : Compiling entry function 'add_f32' for 'sm_80'
/// ptxas info    : Function properties for add_f32
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 10 registers, used 1 barriers, 4096 bytes smem, 368 bytes cmem[0]
/// ```
///
/// A device function that was not inlined gets its own "Function properties"
/// (and "Compiling function"?) lines; it is kept as a row with `entry: false`.
pub fn parse_ptxas(file: &str, arch: &str, log: &str) -> Vec<KernelStats> {
    let mut rows: Vec<KernelStats> = Vec::new();
    // The row the next "Used N registers" line belongs to.
    let mut compiling: Option<usize> = None;
    // The row the next "bytes stack frame" line belongs to.
    let mut properties: Option<usize> = None;
    let row = |rows: &mut Vec<KernelStats>, name: &str, entry: bool| -> usize {
        if let Some(i) = rows.iter().position(|r| r.kernel == name) {
            rows[i].entry |= entry;
            return i;
        }
        rows.push(KernelStats {
            file: file.to_string(),
            kernel: name.to_string(),
            arch: arch.to_string(),
            entry,
            ..Default::default()
        });
        rows.len() - 1
    };
    for line in log.lines() {
        let info = line
            .split_once("info    :")
            .map(|(_, rest)| rest.trim())
            .unwrap_or_else(|| line.trim());
        if let Some(rest) = info.strip_prefix("Compiling entry function ") {
            compiling = quoted(rest).map(|n| row(&mut rows, n, true));
        } else if let Some(rest) = info.strip_prefix("Compiling function ") {
            compiling = quoted(rest).map(|n| row(&mut rows, n, false));
        } else if let Some(rest) = info.strip_prefix("Function properties for ") {
            let name = rest.trim();
            properties = Some(row(&mut rows, name, false));
        } else if info.contains("bytes stack frame") {
            if let Some(i) = properties.take() {
                let r = &mut rows[i];
                for part in info.split(',') {
                    let n = leading_number(part);
                    if part.contains("stack frame") {
                        r.stack_bytes = n;
                    } else if part.contains("spill stores") {
                        r.spill_store_bytes = n;
                    } else if part.contains("spill loads") {
                        r.spill_load_bytes = n;
                    }
                }
            }
        } else if let Some(rest) = info.strip_prefix("Used ") {
            if let Some(i) = compiling.take() {
                let r = &mut rows[i];
                r.registers = leading_number(rest) as u32;
                for part in rest.split(',') {
                    if part.trim_end().ends_with("bytes smem") {
                        r.smem_bytes = leading_number(part);
                    }
                }
            }
        }
    }
    // Device functions only matter when they have a frame or spill.
    rows.retain(|r| r.entry || r.stack_bytes > 0 || r.spills());
    rows
}

/// The text between the first pair of single quotes.
fn quoted(s: &str) -> Option<&str> {
    let start = s.find('\'')? + 1;
    let len = s[start..].find('\'')?;
    Some(&s[start..start + len])
}

fn leading_number(s: &str) -> u64 {
    let s = s.trim_start();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'tiled_f32' for 'sm_80'
ptxas info    : Function properties for tiled_f32
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 8192 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'add_f32' for 'sm_80'
ptxas info    : Function properties for add_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, 372 bytes cmem[0]
ptxas info    : Function properties for helper
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
";

    #[test]
    fn parses_ptxas_log() {
        let rows = parse_ptxas("x.cu", "sm_80", LOG);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let t = &rows[0];
        assert_eq!(
            (t.kernel.as_str(), t.registers, t.smem_bytes, t.stack_bytes),
            ("tiled_f32", 32, 8192, 8)
        );
        assert_eq!((t.spill_store_bytes, t.spill_load_bytes), (4, 12));
        assert!(t.entry && t.spills());
        let a = &rows[1];
        assert_eq!(
            (a.kernel.as_str(), a.registers, a.smem_bytes),
            ("add_f32", 8, 0)
        );
        assert!(!a.spills());
        let report = Report {
            nvrtc_version: "12.8".into(),
            ptxas_version: "V12.8.93".into(),
            rows,
        };
        let err = report.ensure_no_spills().unwrap_err().to_string();
        assert!(err.contains("tiled_f32") && err.contains("sm_80"), "{err}");
        let table = report.to_string();
        assert!(
            table.contains("SPILLS") && table.contains("add_f32"),
            "{table}"
        );
    }
}
