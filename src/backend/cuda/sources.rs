//! The kernel sources, embedded in the binary so that NVRTC can compile them
//! on a machine that has only the `engine` executable.
//!
//! Adding a kernel file: put it in kernels/ and add a line to [`KERNELS`]; a
//! test fails while a `.cu` (or `.cuh`) file in kernels/ is missing here.

/// `("name.cu", text of kernels/name.cu)`.
macro_rules! kernel_file {
    ($name:literal) => {
        ($name, include_str!(concat!("../../../kernels/", $name)))
    };
}

/// Headers the kernel files may `#include "..."`, as (file name, text). They
/// are written to a folder on the NVRTC include path before compiling.
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../../../kernels/common.cuh"))];

/// Every kernel file, as (file name, text).
pub const KERNELS: &[(&str, &str)] = &[
    kernel_file!("attention.cu"),
    kernel_file!("elementwise.cu"),
    kernel_file!("lora.cu"),
    kernel_file!("matmul.cu"),
    kernel_file!("norm.cu"),
    kernel_file!("paged.cu"),
    kernel_file!("quant.cu"),
    kernel_file!("sampling.cu"),
    kernel_file!("topk.cu"),
];

/// A `__global__` entry point of the embedded kernel files.
#[derive(Clone, Debug, PartialEq)]
pub struct EntryPoint {
    pub file: &'static str,
    pub name: String,
    pub params: usize,
}

/// Every `__global__` entry point, with the file it is in and its parameter
/// count (read from the declaration, `__launch_bounds__(...)` skipped).
pub fn entry_points() -> Vec<EntryPoint> {
    let mut found = Vec::new();
    for (file, text) in KERNELS {
        for decl in text.split("__global__ void").skip(1) {
            let mut decl = decl.trim_start();
            if let Some(rest) = decl.strip_prefix("__launch_bounds__") {
                decl = rest.split_once(')').map_or("", |(_, r)| r).trim_start();
            }
            let Some((name, params)) = decl.split_once('(') else {
                continue;
            };
            let params = params.split_once(')').map_or("", |(p, _)| p);
            let params = if params.trim().is_empty() {
                0
            } else {
                params.split(',').count()
            };
            found.push(EntryPoint {
                file,
                name: name.trim().to_string(),
                params,
            });
        }
    }
    found
}

/// The text of the kernel file `name` (e.g. `elementwise.cu`).
pub fn kernel(name: &str) -> Option<&'static str> {
    KERNELS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The `.cu` / `.cuh` files of kernels/ (not of kernels/emu/).
    fn files_on_disk(ext: &str) -> Vec<(String, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&p).unwrap())
            })
            .collect();
        files.sort();
        files
    }

    fn check(table: &[(&str, &str)], ext: &str, table_name: &str) {
        let mut listed: Vec<(String, String)> = table
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        listed.sort();
        let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let disk = files_on_disk(ext);
        assert_eq!(
            names(&listed),
            names(&disk),
            "src/backend/cuda/sources.rs: {table_name} must list every kernels/*.{ext} file"
        );
        assert_eq!(listed, disk, "embedded text differs from the file");
    }

    #[test]
    fn every_kernel_file_is_embedded() {
        check(KERNELS, "cu", "KERNELS");
    }

    #[test]
    fn every_header_is_embedded() {
        check(HEADERS, "cuh", "HEADERS");
    }

    #[test]
    fn entry_points_are_found_with_their_parameters() {
        let eps = entry_points();
        let find = |n: &str| eps.iter().find(|e| e.name == n).cloned();
        let mm = find("matmul_nt_bf16").unwrap();
        assert_eq!((mm.file, mm.params), ("matmul.cu", 6));
        // Declared with __launch_bounds__ between `void` and the name.
        assert_eq!(find("sample_f32").unwrap().params, 7);
        assert!(
            find("matmul_nt_tiled").is_none(),
            "a device function is no entry point"
        );
    }

    #[test]
    fn lookup() {
        for (name, text) in KERNELS {
            assert_eq!(kernel(name), Some(*text));
        }
        assert_eq!(kernel("no-such-file.cu"), None);
    }
}
