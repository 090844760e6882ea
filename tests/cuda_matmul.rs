//! The matmul kernels of kernels/matmul.cu, version 1 (tiled, CUDA cores) and
//! version 2 (tensor cores: mma.sync, ldmatrix, cp.async), launched by name in
//! the CPU emulator and compared with the CPU device and with each other.
//!
//! out[n, m] = x[n, k] · w[m, k]ᵀ on bf16-representable random inputs. Each
//! output buffer is poisoned with NaN and has a NaN tail past its n·m
//! elements that must survive the launch (no write outside the matrix).
//! Shapes fit no tile; some inputs start one element past a 16-byte boundary,
//! which takes version 2 off its cp.async path even when k % 8 == 0.
//!
//! Version 1 also takes f32 x and w (`matmul_nt_f32`, the flat-IP index's
//! scores): full-precision random inputs, so a kernel that rounded them to
//! bf16 would miss the f32 tolerance by orders of magnitude; offsets of 1–3
//! elements take its 16-byte loads off their aligned path.
//!
//! `Backend::matmul_nt_invariant` through the device: a row alone and in a
//! batch get the same kernel and the same bits.
#![cfg(feature = "emu")]

mod common;

use common::max_rel_err;
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::{DevicePtr, Emu, GpuDriver};
use engine::backend::cuda::emu::{self, LaneOrder};
use engine::backend::cuda::Cuda;
use engine::backend::Backend;
use engine::tensor::DType::{self, BF16, F32};
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ffi::c_void;
use std::time::Instant;

/// bf16 outputs: one rounding of each element, against the largest reference value.
const BF16_TOL: f32 = 1e-2;
/// f32 outputs from bf16 inputs: only the summation order differs.
const F32_TOL: f32 = 1e-5;
/// NaN elements after each output, which no launch may touch.
const TAIL: usize = 37;

/// One version of the kernel: its two entry points and launch configuration.
struct Version {
    bf16: &'static str,
    f32: &'static str,
    /// Output rows (rows of x) and columns (rows of w) per block.
    tile: (usize, usize),
    threads: u32,
}

const V1: Version = Version {
    bf16: "matmul_nt_bf16",
    f32: "matmul_nt_bf16_f32",
    tile: (64, 64),
    threads: 256,
};

const V2: Version = Version {
    bf16: "matmul_nt_mma_bf16",
    f32: "matmul_nt_mma_bf16_f32",
    tile: (64, 128),
    threads: 128,
};

fn gpu() -> Cuda<Emu> {
    Cuda::new(Emu::new())
}

fn rng() -> StdRng {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// Random values already representable in bf16, so every device sees the same inputs.
fn data(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
        .collect()
}

/// Random f32 values in (-1, 1), most of them not representable in bf16.
fn data_f32(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// A bf16 (or f32) matrix on the emulator that starts `offset` elements into
/// its buffer (offset 1 puts every row off a 16-byte boundary), and the same
/// on the CPU.
struct Input {
    cpu: Tensor<Cpu>,
    gpu: Tensor<Cuda<Emu>>,
    offset: usize,
}

impl Input {
    fn new(g: &Cuda<Emu>, values: &[f32], rows: usize, cols: usize, offset: usize) -> Self {
        Self::of(g, values, rows, cols, offset, BF16)
    }

    fn of(
        g: &Cuda<Emu>,
        values: &[f32],
        rows: usize,
        cols: usize,
        offset: usize,
        dtype: DType,
    ) -> Self {
        let mut padded = vec![0.0; offset];
        padded.extend_from_slice(values);
        Input {
            cpu: Cpu.upload(values.to_vec(), &[rows, cols], F32).unwrap(),
            gpu: g.upload(padded, &[offset + rows * cols], dtype).unwrap(),
            offset,
        }
    }

    fn ptr(&self) -> u64 {
        self.gpu.buf.ptr + (self.offset * self.gpu.dtype.size()) as u64
    }
}

struct Case<'a> {
    x: &'a Input,
    w: &'a Input,
    n: usize,
    m: usize,
    k: usize,
}

/// Runs one kernel of `v` into a fresh NaN-poisoned output of `dtype` and
/// returns the n·m results, after checking the tail past them is still NaN.
fn run(g: &Cuda<Emu>, v: &Version, dtype: DType, c: &Case, order: LaneOrder) -> Vec<f32> {
    let name = match dtype {
        F32 => v.f32,
        BF16 => v.bf16,
        other => panic!("matmul output {other}"),
    };
    run_kernel(g, name, v, dtype, c, order)
}

/// `run` for the entry point `name`, launched with `v`'s tile and block.
fn run_kernel(
    g: &Cuda<Emu>,
    name: &str,
    v: &Version,
    dtype: DType,
    c: &Case,
    order: LaneOrder,
) -> Vec<f32> {
    let (n, m, k) = (c.n, c.m, c.k);
    assert_eq!(c.x.cpu.shape, [n, k]);
    assert_eq!(c.w.cpu.shape, [m, k]);
    let out = g
        .upload(vec![f32::NAN; n * m + TAIL], &[n * m + TAIL], dtype)
        .unwrap();
    let grid = (m.div_ceil(v.tile.1) as u32, n.div_ceil(v.tile.0) as u32, 1);
    let (mut out_p, mut x_p, mut w_p) = (out.buf.ptr, c.x.ptr(), c.w.ptr());
    let [mut n_i, mut m_i, mut k_i] = [n, m, k].map(|d| i32::try_from(d).unwrap());
    let mut args: [*mut c_void; 6] = [
        (&mut out_p as *mut u64).cast(),
        (&mut x_p as *mut u64).cast(),
        (&mut w_p as *mut u64).cast(),
        (&mut n_i as *mut i32).cast(),
        (&mut m_i as *mut i32).cast(),
        (&mut k_i as *mut i32).cast(),
    ];
    // SAFETY: the kernel's parameters are (Out*, const In*, const In*, int n,
    // int m, int k) and each slot points to a live u64 device pointer or i32
    // of that order. out holds n·m elements of `dtype` (plus the tail), x and
    // w hold n·k and m·k elements of their own dtype (the kernel's In: bf16,
    // or f32 for matmul_nt_f32) past their offsets, and the kernels read
    // and write only inside [n, k], [m, k] and [n, m] for any grid that
    // covers the output, which this one does with the version's tile.
    unsafe { emu::launch_ordered(name, grid, (v.threads, 1, 1), 0, &mut args, order) }
        .unwrap_or_else(|e| panic!("{name} n{n} m{m} k{k}: {e}"));
    let mut got = g.download(&out).unwrap();
    let tail = got.split_off(n * m);
    assert!(
        tail.iter().all(|t| t.is_nan()),
        "{name} n{n} m{m} k{k} wrote past its output"
    );
    got
}

fn reference(c: &Case) -> Vec<f32> {
    let mut out = Cpu.zeros(&[c.n, c.m], F32).unwrap();
    Cpu.matmul_nt(&mut out, &c.x.cpu, &c.w.cpu).unwrap();
    Cpu.download(&out).unwrap()
}

/// Both versions, both output types, against the CPU and each other.
fn check_case(g: &Cuda<Emu>, c: &Case) {
    let what = format!(
        "[{},{}]·[{},{}]ᵀ (offsets {}, {})",
        c.n, c.k, c.m, c.k, c.x.offset, c.w.offset
    );
    let want = reference(c);
    let mut f32_out = Vec::new();
    for v in [&V1, &V2] {
        for (dtype, tol) in [(F32, F32_TOL), (BF16, BF16_TOL)] {
            let got = run(g, v, dtype, c, LaneOrder::Default);
            let err = max_rel_err(&got, &want);
            let name = if dtype == F32 { v.f32 } else { v.bf16 };
            assert!(
                err <= tol,
                "{name} {what}: max relative error {err:e} > {tol:e}"
            );
            if dtype == F32 {
                f32_out.push(got);
            }
        }
    }
    let err = max_rel_err(&f32_out[1], &f32_out[0]);
    assert!(err <= F32_TOL, "v2 vs v1 {what}: {err:e}");
}

#[test]
fn ragged_shapes() {
    let (g, mut r) = (gpu(), rng());
    let t = Instant::now();
    // Every (n, m) from SIZES, each with two k from SIZES: k never a multiple
    // of 8, so version 2 takes its plain-load path; no size fits a tile.
    const SIZES: [usize; 7] = [1, 7, 17, 63, 65, 130, 257];
    let mut shapes = vec![(1, 1, 1)];
    for (i, &n) in SIZES.iter().enumerate() {
        for (j, &m) in SIZES.iter().enumerate() {
            shapes.push((n, m, SIZES[(i + j) % 7]));
            shapes.push((n, m, SIZES[(i + 2 * j + 3) % 7]));
        }
    }
    for (n, m, k) in shapes {
        let x = Input::new(&g, &data(&mut r, n * k), n, k, 0);
        let w = Input::new(&g, &data(&mut r, m * k), m, k, 0);
        check_case(
            &g,
            &Case {
                x: &x,
                w: &w,
                n,
                m,
                k,
            },
        );
    }
    eprintln!("ragged shapes: {:.2?}", t.elapsed());
}

#[test]
fn k_multiple_of_8_aligned_and_not() {
    let (g, mut r) = (gpu(), rng());
    let t = Instant::now();
    // k % 8 == 0: cp.async when both inputs are 16-byte aligned, the plain
    // path when either starts one element further; partial k tiles (k % 32
    // != 0) and ragged n, m in both.
    for (n, m, k) in [
        (1, 1, 8),
        (64, 128, 32),
        (65, 129, 40),
        (1, 200, 64),
        (130, 257, 136),
        (63, 65, 256),
    ] {
        let xv = data(&mut r, n * k);
        let wv = data(&mut r, m * k);
        for (xo, wo) in [(0, 0), (1, 0), (0, 1)] {
            let x = Input::new(&g, &xv, n, k, xo);
            let w = Input::new(&g, &wv, m, k, wo);
            check_case(
                &g,
                &Case {
                    x: &x,
                    w: &w,
                    n,
                    m,
                    k,
                },
            );
        }
    }
    eprintln!("k % 8 == 0, aligned and not: {:.2?}", t.elapsed());
}

#[test]
fn model_sized() {
    // SmolLM2-135M's q/o projections over a 128-token prompt.
    let (g, mut r) = (gpu(), rng());
    let (n, m, k) = (128, 576, 576);
    let x = Input::new(&g, &data(&mut r, n * k), n, k, 0);
    let w = Input::new(&g, &data(&mut r, m * k), m, k, 0);
    let c = Case {
        x: &x,
        w: &w,
        n,
        m,
        k,
    };
    let want = reference(&c);
    let mut f32_out = Vec::new();
    for v in [&V1, &V2] {
        for (dtype, tol) in [(F32, F32_TOL), (BF16, BF16_TOL)] {
            let t = Instant::now();
            let got = run(&g, v, dtype, &c, LaneOrder::Default);
            let name = if dtype == F32 { v.f32 } else { v.bf16 };
            eprintln!("{name} [{n},{k}]·[{m},{k}]ᵀ: {:.2?}", t.elapsed());
            let err = max_rel_err(&got, &want);
            assert!(err <= tol, "{name}: max relative error {err:e} > {tol:e}");
            if dtype == F32 {
                f32_out.push(got);
            }
        }
    }
    let err = max_rel_err(&f32_out[1], &f32_out[0]);
    assert!(err <= F32_TOL, "v2 vs v1: {err:e}");
}

#[test]
fn mma_lane_order_does_not_matter() {
    // Every lane computes its own outputs from the whole warp's fragments, so
    // reversing the order of the lanes and blocks must not change a bit.
    let (g, mut r) = (gpu(), rng());
    for (n, m, k, off) in [(70, 140, 72, 0), (33, 100, 45, 0), (17, 9, 64, 1)] {
        let x = Input::new(&g, &data(&mut r, n * k), n, k, off);
        let w = Input::new(&g, &data(&mut r, m * k), m, k, 0);
        let c = Case {
            x: &x,
            w: &w,
            n,
            m,
            k,
        };
        let fwd = run(&g, &V2, F32, &c, LaneOrder::Forward);
        let rev = run(&g, &V2, F32, &c, LaneOrder::Reverse);
        let same = fwd
            .iter()
            .zip(&rev)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "n{n} m{m} k{k}: forward and reverse lane order differ"
        );
    }
}

/// `matmul_nt_f32` of full-precision inputs against the CPU device.
fn check_f32_case(g: &Cuda<Emu>, c: &Case) {
    assert_eq!((c.x.gpu.dtype, c.w.gpu.dtype), (F32, F32));
    let got = run_kernel(g, "matmul_nt_f32", &V1, F32, c, LaneOrder::Default);
    let err = max_rel_err(&got, &reference(c));
    assert!(
        err <= F32_TOL,
        "matmul_nt_f32 [{},{}]·[{},{}]ᵀ (offsets {}, {}): max relative error {err:e} > {F32_TOL:e}",
        c.n,
        c.k,
        c.m,
        c.k,
        c.x.offset,
        c.w.offset
    );
}

#[test]
fn f32_inputs_through_the_backend() {
    // What the flat-IP index does: f32 tensors uploaded as f32, scored by
    // the CUDA device's matmul_nt into a NaN-poisoned f32 output whose tail
    // past n·m must survive.
    let (g, mut r) = (gpu(), rng());
    let t = Instant::now();
    for n in [1, 3, 64, 65] {
        for m in [1, 63, 1000] {
            for k in [1, 5, 384] {
                let (xv, wv) = (data_f32(&mut r, n * k), data_f32(&mut r, m * k));
                let x = g.upload(xv.clone(), &[n, k], F32).unwrap();
                let w = g.upload(wv.clone(), &[m, k], F32).unwrap();
                let mut out = g
                    .upload(vec![f32::NAN; n * m + TAIL], &[n * m + TAIL], F32)
                    .unwrap();
                out.shape = vec![n, m];
                g.matmul_nt(&mut out, &x, &w).unwrap();
                out.shape = vec![n * m + TAIL];
                let mut got = g.download(&out).unwrap();
                let tail = got.split_off(n * m);
                assert!(
                    tail.iter().all(|v| v.is_nan()),
                    "n{n} m{m} k{k}: wrote past its output"
                );
                let mut want = Cpu.zeros(&[n, m], F32).unwrap();
                let (cx, cw) = (
                    Cpu.upload(xv, &[n, k], F32).unwrap(),
                    Cpu.upload(wv, &[m, k], F32).unwrap(),
                );
                Cpu.matmul_nt(&mut want, &cx, &cw).unwrap();
                let err = max_rel_err(&got, &Cpu.download(&want).unwrap());
                assert!(
                    err <= F32_TOL,
                    "f32 [{n},{k}]·[{m},{k}]ᵀ: max relative error {err:e} > {F32_TOL:e}"
                );
            }
        }
    }
    eprintln!("f32 through the backend: {:.2?}", t.elapsed());
}

#[test]
fn f32_inputs_aligned_and_not() {
    // The 16-byte loads: k % 4 == 0 with both inputs aligned (every group of
    // 4 inside a row is whole and aligned), the same with either input 1–3
    // elements off (no group aligned), and k % 4 != 0 (rows start at varying
    // alignments, groups straddle row ends).
    let (g, mut r) = (gpu(), rng());
    let t = Instant::now();
    for (n, m, k) in [
        (1, 1, 4),
        (3, 63, 8),
        (65, 70, 20),
        (64, 129, 384),
        (17, 65, 5),
        (66, 33, 18),
        (2, 200, 131),
    ] {
        let xv = data_f32(&mut r, n * k);
        let wv = data_f32(&mut r, m * k);
        for (xo, wo) in [(0, 0), (1, 0), (0, 2), (3, 1)] {
            let x = Input::of(&g, &xv, n, k, xo, F32);
            let w = Input::of(&g, &wv, m, k, wo, F32);
            check_f32_case(
                &g,
                &Case {
                    x: &x,
                    w: &w,
                    n,
                    m,
                    k,
                },
            );
        }
    }
    eprintln!("f32, aligned and not: {:.2?}", t.elapsed());
}

#[test]
#[should_panic(expected = "matmul w is bf16, the kernel takes f32")]
fn f32_and_bf16_inputs_do_not_mix() {
    let g = gpu();
    let x = g.upload(vec![0.5; 6], &[2, 3], F32).unwrap();
    let w = g.upload(vec![0.5; 12], &[4, 3], BF16).unwrap();
    let mut out = g.zeros(&[2, 4], F32).unwrap();
    let _ = g.matmul_nt(&mut out, &x, &w);
}

#[test]
#[should_panic(expected = "matmul output (of f32 x and w) is bf16, the kernel takes f32")]
fn f32_inputs_want_an_f32_output() {
    let g = gpu();
    let x = g.upload(vec![0.5; 6], &[2, 3], F32).unwrap();
    let w = g.upload(vec![0.5; 12], &[4, 3], F32).unwrap();
    let mut out = g.zeros(&[2, 4], BF16).unwrap();
    let _ = g.matmul_nt(&mut out, &x, &w);
}

/// The emulator, recording the name of every kernel launched: the emulated
/// mma sums its 16 products in order, as version 1 does, so the two
/// versions agree bit for bit here (not on a GPU) and only the names show
/// a switch between them.
struct Recording {
    emu: Emu,
    launched: std::sync::Mutex<Vec<String>>,
}

impl GpuDriver for Recording {
    fn name(&self) -> String {
        self.emu.name()
    }
    fn alloc(&self, bytes: usize) -> engine::Result<DevicePtr> {
        self.emu.alloc(bytes)
    }
    unsafe fn free(&self, ptr: DevicePtr) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.emu.free(ptr) }
    }
    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> engine::Result<()> {
        // SAFETY: as above.
        unsafe { self.emu.upload(dst, src) }
    }
    unsafe fn download(&self, dst: &mut [u8], src: DevicePtr) -> engine::Result<()> {
        // SAFETY: as above.
        unsafe { self.emu.download(dst, src) }
    }
    unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> engine::Result<()> {
        // SAFETY: as above.
        unsafe { self.emu.copy(dst, src, bytes) }
    }
    unsafe fn zero(&self, dst: DevicePtr, bytes: usize) -> engine::Result<()> {
        // SAFETY: as above.
        unsafe { self.emu.zero(dst, bytes) }
    }
    unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &mut [*mut c_void],
    ) -> engine::Result<()> {
        self.launched.lock().unwrap().push(name.to_string());
        // SAFETY: as above.
        unsafe { self.emu.launch(name, grid, block, shared_mem_bytes, args) }
    }
    fn synchronize(&self) -> engine::Result<()> {
        self.emu.synchronize()
    }
}

/// `Backend::matmul_nt_invariant` on the recording emulator: out [n, m] for
/// x and w uploaded in `dtype`, into an output of `out_dtype`, and the
/// kernels it launched.
fn invariant_rows(
    g: &Cuda<Recording>,
    (x, w): (&[f32], &[f32]),
    (n, m, k): (usize, usize, usize),
    dtype: DType,
    out_dtype: DType,
) -> (Vec<f32>, Vec<String>) {
    let x = g.upload(x.to_vec(), &[n, k], dtype).unwrap();
    let w = g.upload(w.to_vec(), &[m, k], dtype).unwrap();
    let mut out = g.upload(vec![f32::NAN; n * m], &[n, m], out_dtype).unwrap();
    g.driver().launched.lock().unwrap().clear();
    g.matmul_nt_invariant(&mut out, &x, &w).unwrap();
    let launched = std::mem::take(&mut *g.driver().launched.lock().unwrap());
    (g.download(&out).unwrap(), launched)
}

#[test]
fn invariant_rows_alone_equal_rows_in_a_batch() {
    // A decode row alone (n = 1, where matmul_nt takes version 1) and the
    // same row among 37 or 70 (version 2 there; 70 spans two 64-row tiles):
    // the same kernels launched, and bit for bit the same row, for bf16
    // inputs with either output and for f32 inputs. k = 72 takes version
    // 2's cp.async path, k = 45 its plain loads.
    let g = Cuda::new(Recording {
        emu: Emu::new(),
        launched: Default::default(),
    });
    let mut r = rng();
    let t = Instant::now();
    for (m, k) in [(130, 72), (70, 45)] {
        for n in [37, 70] {
            let (xv, wv) = (data(&mut r, n * k), data(&mut r, m * k));
            for (dtype, out_dtype) in [(BF16, BF16), (BF16, F32), (F32, F32)] {
                let what = format!("{dtype}→{out_dtype} m{m} k{k}");
                let (batch, kernels) = invariant_rows(&g, (&xv, &wv), (n, m, k), dtype, out_dtype);
                for i in [0, 16, n - 1] {
                    let x_i = &xv[i * k..(i + 1) * k];
                    let (alone, kernels_1) =
                        invariant_rows(&g, (x_i, &wv), (1, m, k), dtype, out_dtype);
                    assert_eq!(kernels_1, kernels, "{what}: kernels for 1 row and for {n}");
                    let row = &batch[i * m..(i + 1) * m];
                    let same = row
                        .iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}: row {i} of {n} differs from the row alone");
                }
            }
        }
    }
    eprintln!("invariant rows: {:.2?}", t.elapsed());
}
