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
    kernel_file!("matmul.cu"),
    kernel_file!("norm.cu"),
];

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
    fn lookup() {
        for (name, text) in KERNELS {
            assert_eq!(kernel(name), Some(*text));
        }
        assert_eq!(kernel("no-such-file.cu"), None);
    }
}
