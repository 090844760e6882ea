//! NVRTC and ptxas on the kernels, with no GPU: every embedded kernel file
//! compiles for sm_80 and sm_90 without spills, compile errors carry NVRTC's
//! log, spills are caught, and the disk cache is used.
//!
//! Needs the CUDA tools of scripts/cuda-tools.sh (in .cuda/); the tests skip
//! with a message when they are missing, unless ENGINE_REQUIRE_CUDA_TOOLS=1.

use engine::backend::cuda::nvrtc::{self, Arch, Compiler, Options};
use engine::kernels_check;

/// True when NVRTC and ptxas are usable; otherwise says why and returns false
/// (or fails, when ENGINE_REQUIRE_CUDA_TOOLS=1).
fn tools() -> bool {
    let missing = match (nvrtc::nvrtc_version(), nvrtc::ptxas_path()) {
        (Ok(_), Ok(_)) => return true,
        (Err(e), _) | (_, Err(e)) => e,
    };
    if std::env::var("ENGINE_REQUIRE_CUDA_TOOLS").is_ok_and(|v| v == "1") {
        panic!("ENGINE_REQUIRE_CUDA_TOOLS=1 but the CUDA tools are missing: {missing}");
    }
    eprintln!("skipped: {missing}");
    false
}

fn compiler() -> (tempfile::TempDir, Compiler) {
    let dir = tempfile::tempdir().unwrap();
    let c = Compiler::with_cache_dir(dir.path().join("kernels")).unwrap();
    (dir, c)
}

fn opts(arch: &str) -> Options {
    Options::new(Arch::parse(arch).unwrap())
}

#[test]
fn every_kernel_compiles_without_spills() {
    if !tools() {
        return;
    }
    let archs = ["sm_80".to_string(), "sm_90".to_string()];
    let report = kernels_check::check(&archs).unwrap_or_else(|e| panic!("{e}"));
    println!("{report}");
    for (file, _) in engine::backend::cuda::sources::KERNELS {
        for arch in &archs {
            assert!(
                report
                    .rows
                    .iter()
                    .any(|r| r.file == *file && r.arch == *arch && r.entry),
                "no kernel of {file} in the report for {arch}"
            );
        }
    }
}

/// Uses a bf16 header from the CUDA include folder and a __shared__ array.
const GOOD: &str = r#"
#include <cuda_bf16.h>
extern "C" __global__ void scale_bf16(__nv_bfloat16* out, const __nv_bfloat16* in, float s, int n) {
    __shared__ float tile[256];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = i < n ? __bfloat162float(in[i]) : 0.0f;
    __syncthreads();
    if (i < n) out[i] = __float2bfloat16(tile[threadIdx.x] * s);
}
"#;

#[test]
fn table_has_registers_and_shared_memory() {
    if !tools() {
        return;
    }
    let (_dir, c) = compiler();
    let report =
        kernels_check::inspect_sources(&c, &[("good.cu", GOOD)], &[opts("sm_80"), opts("sm_90")])
            .unwrap();
    assert_eq!(report.rows.len(), 2, "{report}");
    for (row, arch) in report.rows.iter().zip(["sm_80", "sm_90"]) {
        assert_eq!(
            (row.file.as_str(), row.kernel.as_str()),
            ("good.cu", "scale_bf16")
        );
        assert_eq!(row.arch, arch);
        assert!(row.registers > 0 && row.entry);
        assert_eq!(row.smem_bytes, 256 * 4);
        assert!(!row.spills());
    }
    report.ensure_no_spills().unwrap();
    let table = report.to_string();
    assert!(
        table.contains("scale_bf16") && table.contains("1024"),
        "{table}"
    );
}

#[test]
fn compile_error_carries_the_nvrtc_log() {
    if !tools() {
        return;
    }
    let (_dir, c) = compiler();
    let src = "extern \"C\" __global__ void broken(float* x) {\n    x[0] = not_declared;\n}\n";
    let err = c
        .compile_source("broken.cu", src, &opts("sm_80"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("broken.cu"), "{err}");
    assert!(err.contains("not_declared"), "{err}");
    assert!(err.contains("compute_80"), "{err}");
    // Nothing is cached for a failed compile.
    assert_eq!(c.cache_hits(), 0);
    let err2 = c.compile_source("broken.cu", src, &opts("sm_80"));
    assert!(err2.is_err());
}

/// 64 values live at once across a reduction, under a cap of 32 registers.
const SPILLS: &str = r#"
extern "C" __global__ void spill_f32(float* out, const float* in) {
    float v[64];
    const float* p = in + (blockIdx.x * blockDim.x + threadIdx.x) * 64;
#pragma unroll
    for (int i = 0; i < 64; i++) v[i] = p[i];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 64; i++) s += v[i] * v[63 - i];
    float* q = out + (blockIdx.x * blockDim.x + threadIdx.x) * 64;
#pragma unroll
    for (int i = 0; i < 64; i++) q[i] = v[(i * 7) & 63] * s + v[i];
}
"#;

#[test]
fn a_spill_is_reported() {
    if !tools() {
        return;
    }
    let (_dir, c) = compiler();
    let mut capped = opts("sm_80");
    capped.max_registers = Some(32);
    let report = kernels_check::inspect_sources(&c, &[("spill.cu", SPILLS)], &[capped]).unwrap();
    let spilling = report.spilling();
    assert_eq!(spilling.len(), 1, "{report}");
    assert_eq!(spilling[0].kernel, "spill_f32");
    assert!(spilling[0].registers <= 32, "{report}");
    let err = report.ensure_no_spills().unwrap_err().to_string();
    assert!(
        err.contains("spill.cu") && err.contains("spill_f32"),
        "{err}"
    );
    assert!(report.to_string().contains("SPILLS"));

    // Without the cap the same kernel fits in registers.
    let report =
        kernels_check::inspect_sources(&c, &[("spill.cu", SPILLS)], &[opts("sm_80")]).unwrap();
    report.ensure_no_spills().unwrap();
}

#[test]
fn second_compile_comes_from_the_disk_cache() {
    if !tools() {
        return;
    }
    let (dir, c) = compiler();
    let t0 = std::time::Instant::now();
    let first = c.compile_source("good.cu", GOOD, &opts("sm_80")).unwrap();
    let cold = t0.elapsed();
    assert!(!first.cached);
    assert!(first.ptx.contains(".entry scale_bf16"), "{}", first.ptx);
    assert!(first.path.is_file());
    let t1 = std::time::Instant::now();
    let second = c.compile_source("good.cu", GOOD, &opts("sm_80")).unwrap();
    let warm = t1.elapsed();
    assert!(second.cached);
    assert_eq!((c.cache_misses(), c.cache_hits()), (1, 1));
    assert_eq!(first.ptx, second.ptx);
    eprintln!("cold compile {cold:?}, cached {warm:?}");

    // Another process (here: another compiler on the same folder) finds it.
    let other = Compiler::with_cache_dir(dir.path().join("kernels")).unwrap();
    assert!(
        other
            .compile_source("good.cu", GOOD, &opts("sm_80"))
            .unwrap()
            .cached
    );
    // A different architecture, option or source is a different entry.
    assert!(
        !other
            .compile_source("good.cu", GOOD, &opts("sm_90"))
            .unwrap()
            .cached
    );
    let mut fast = opts("sm_80");
    fast.fast_math = true;
    assert!(!other.compile_source("good.cu", GOOD, &fast).unwrap().cached);
    let changed = GOOD.replace("* s", "* s + 1.0f");
    assert!(
        !other
            .compile_source("good.cu", &changed, &opts("sm_80"))
            .unwrap()
            .cached
    );
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_architecture_is_a_clear_error() {
    let err = kernels_check::check(&["gfx90a".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("gfx90a"), "{err}");
}

/// With no CUDA tools anywhere, the command fails with a message, not a panic.
#[test]
fn without_the_tools_the_command_says_what_to_do() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(["kernels", "check", "--arch", "sm_80"])
        .current_dir(std::env::temp_dir())
        .env("ENGINE_CUDA_TOOLS", "/nonexistent")
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("ENGINE_PTXAS")
        .env_remove("CUDA_HOME")
        .env_remove("CUDA_PATH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exit code 1 is an error message; 101 would be a panic. (A machine with
    // a system-wide CUDA toolkit finds NVRTC anyway and may even succeed.)
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    if !out.status.success() {
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    if !nvrtc_on_system_path() {
        assert!(stderr.contains("scripts/cuda-tools.sh"), "{stderr}");
    }
}

/// Whether libnvrtc is in the default library search path (a CUDA toolkit
/// installed system-wide), so the check above cannot hide it.
fn nvrtc_on_system_path() -> bool {
    [
        "/usr/local/cuda/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
    ]
    .iter()
    .any(|d| std::path::Path::new(d).join("libnvrtc.so.12").exists())
}
