//! Matrix products on the CPU, through the `gemm` crate.

use gemm::Parallelism;

/// out[n, m] = x[n, k] · w[m, k]ᵀ, all row-major.
pub fn matmul_nt(out: &mut [f32], x: &[f32], w: &[f32], n: usize, m: usize, k: usize) {
    assert!(out.len() >= n * m && x.len() >= n * k && w.len() >= m * k);
    let threads = rayon::current_num_threads();
    let parallelism = if n * m * k < 1 << 15 || threads == 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    };
    // SAFETY: the assertion above bounds every index gemm touches: dst is n×m
    // with row stride m, lhs n×k with row stride k, and rhs = wᵀ is k×m read
    // as w[j·k + i] (row stride 1, column stride k).
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            out.as_mut_ptr(),
            1,
            m as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
