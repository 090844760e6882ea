//! The CUDA device: weights and activations in bf16, f32 accumulation, one
//! launcher per kernel of kernels/*.cu. The kernels run on a real GPU or in
//! the CPU emulator, behind the `GpuDriver` seam; this file is the same for both.

pub mod driver;
#[cfg(feature = "emu")]
pub mod emu;
pub mod nvrtc;
pub mod real;
pub mod sources;

use crate::backend::sample::{self, SamplerConfig};
use crate::backend::shapes::LoraDims;
use crate::backend::topk::merge_top_k;
use crate::backend::{
    cpu, mean_scale, shapes, AdamW, AdamWTensors, Backend, LoraRef, PagedSeq, QTensor, IGNORE,
    NO_ADAPTER,
};
use crate::error::{Error, Result};
use crate::quant::{GgmlType, QBytes};
use crate::tensor::{DType, Tensor};
use driver::{DevicePtr, GpuDriver};
use std::ffi::c_void;
use std::sync::Arc;

/// Device memory, freed when dropped.
pub struct DeviceBuffer<D: GpuDriver> {
    pub ptr: DevicePtr,
    pub bytes: usize,
    driver: Arc<D>,
}

impl<D: GpuDriver> Drop for DeviceBuffer<D> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from this driver's alloc and dies here.
        unsafe { self.driver.free(self.ptr) };
    }
}

pub struct Cuda<D: GpuDriver> {
    driver: Arc<D>,
}

impl<D: GpuDriver> Clone for Cuda<D> {
    fn clone(&self) -> Self {
        Cuda {
            driver: self.driver.clone(),
        }
    }
}

/// Kernel arguments in cuLaunchKernel's form: each value in its own 8-byte
/// slot (little-endian, so a 4-byte int or float sits at the slot's start).
#[derive(Default)]
struct Args(Vec<u64>);

impl Args {
    fn ptr(mut self, p: DevicePtr) -> Self {
        self.0.push(p);
        self
    }
    fn int(mut self, v: usize) -> Self {
        let v = i32::try_from(v).expect("size exceeds a kernel's int argument");
        self.0.push(v as u32 as u64);
        self
    }
    fn float(mut self, v: f32) -> Self {
        self.0.push(v.to_bits() as u64);
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.push(v);
        self
    }
}

const THREADS: u32 = 256;

/// Columns per block of `topk_f32`: blocks enough for one query over many
/// vectors to fill the GPU, and at least 16·k, so that the host merges at
/// most a sixteenth of a row.
pub fn top_k_segment(k: usize) -> usize {
    4096.max(16 * k)
}

/// Blocks for a grid-stride loop over `n` elements.
fn blocks_for(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, 65535) as u32
}

/// The largest LoRA rank of kernels/lora.cu (`LORA_MAX_RANK`).
const LORA_MAX_RANK: usize = 128;

/// A LoRA dropout's kernel arguments (p, 1/(1 − p), seed); p = 0 means none.
fn dropout_args(dropout: Option<(f32, u64)>) -> (f32, f32, u64) {
    match dropout {
        Some((p, seed)) if p > 0.0 => (p, 1.0 / (1.0 - p), seed),
        _ => (0.0, 1.0, 0),
    }
}

fn lora_rank_fits(r: usize) -> Result<()> {
    if r > LORA_MAX_RANK {
        return Err(Error::Unsupported(format!(
            "LoRA rank {r} is above the CUDA device's limit of {LORA_MAX_RANK}"
        )));
    }
    Ok(())
}

/// The weight types with product kernels of their own in kernels/quant.cu
/// (`matmul_q_TY_*`, TY as returned); the others are dequantized to bf16
/// for each product.
fn quant_kernel_type(ty: GgmlType) -> Option<&'static str> {
    match ty {
        GgmlType::Q8_0 => Some("q8_0"),
        GgmlType::Q4_0 => Some("q4_0"),
        GgmlType::Q4_1 => Some("q4_1"),
        GgmlType::Q4_K => Some("q4_k"),
        _ => None,
    }
}

/// `matmul_q` with at most this many rows of x takes version 1 (dp4a, 8 rows
/// of x per block), more rows version 2 (int8 tensor cores, 32 per block);
/// both give the same bits.
const MATMUL_Q_MV_ROWS: usize = 8;

fn expect_dtype<D: GpuDriver>(what: &str, t: &Tensor<Cuda<D>>, dtype: DType) {
    assert_eq!(
        t.dtype, dtype,
        "{what} is {}, the kernel takes {dtype}",
        t.dtype
    );
}

impl<D: GpuDriver> Cuda<D> {
    pub fn new(driver: D) -> Self {
        Cuda {
            driver: Arc::new(driver),
        }
    }

    pub fn driver(&self) -> &D {
        &self.driver
    }

    fn alloc(&self, bytes: usize) -> Result<DeviceBuffer<D>> {
        Ok(DeviceBuffer {
            ptr: self.driver.alloc(bytes)?,
            bytes,
            driver: self.driver.clone(),
        })
    }

    /// Token ids, targets or a kernel's table on the device, for one
    /// kernel's use: the caller keeps the buffer alive until that kernel has
    /// run.
    fn upload_slice<T: bytemuck::Pod>(&self, values: &[T]) -> Result<DeviceBuffer<D>> {
        let buf = self.alloc(std::mem::size_of_val(values))?;
        // SAFETY: the allocation holds exactly the values.
        unsafe { self.driver.upload(buf.ptr, bytemuck::cast_slice(values))? };
        Ok(buf)
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        args: Args,
    ) -> Result<()> {
        let mut slots = args.0;
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: every launcher below passes the kernel's parameters in order
        // with their types (device pointers, int, float), and sizes the grid so
        // the kernel stays inside the tensors whose shapes it asserted.
        unsafe { self.driver.launch(name, grid, block, 0, &mut ptrs) }
    }

    /// c [M, N] += a [M, K] · b [K, N] (`matmul_acc_*` in kernels/matmul.cu),
    /// with a and b read through (row, column) strides; b is bf16.
    fn matmul_acc(
        &self,
        c: &mut Tensor<Self>,
        a: &Tensor<Self>,
        (mm, nn, kk): (usize, usize, usize),
        (a_rs, a_cs): (usize, usize),
        b: &DeviceBuffer<D>,
        (b_rs, b_cs): (usize, usize),
    ) -> Result<()> {
        let kernel = match (a.dtype, c.dtype) {
            (DType::BF16, DType::BF16) => "matmul_acc_bf16_bf16",
            (DType::F32, DType::BF16) => "matmul_acc_f32_bf16",
            (DType::BF16, DType::F32) => "matmul_acc_bf16_f32",
            (DType::F32, DType::F32) => "matmul_acc_f32_f32",
            other => panic!("matmul_acc of {other:?}"),
        };
        if mm == 0 || nn == 0 {
            return Ok(());
        }
        let args = Args::default()
            .ptr(c.buf.ptr)
            .ptr(a.buf.ptr)
            .ptr(b.ptr)
            .int(mm)
            .int(nn)
            .int(kk)
            .int(a_rs)
            .int(a_cs)
            .int(b_rs)
            .int(b_cs);
        let grid = (nn.div_ceil(64) as u32, mm.div_ceil(64) as u32, 1);
        self.launch(kernel, grid, (THREADS, 1, 1), args)
    }

    /// g(k, c) += scale · Σ_i u[i, k] · drop(v[i, c]) (`lora_grad_*` in
    /// kernels/lora.cu), g(k, c) at g[k·g_sk + c·g_sc]; u [n, r] f32, v
    /// [n, cols]; `drop` is (p, 1/(1 − p), seed).
    #[allow(clippy::too_many_arguments)]
    fn lora_grad(
        &self,
        kernel: &str,
        g: &mut Tensor<Self>,
        u: &Tensor<Self>,
        v: &Tensor<Self>,
        (g_sk, g_sc): (usize, usize),
        scale: f32,
        (p, keep_scale, seed): (f32, f32, u64),
    ) -> Result<()> {
        let (n, r) = u.rows_cols();
        let (_, cols) = v.rows_cols();
        let args = Args::default()
            .ptr(g.buf.ptr)
            .ptr(u.buf.ptr)
            .ptr(v.buf.ptr)
            .int(n)
            .int(cols)
            .int(r)
            .int(g_sk)
            .int(g_sc)
            .float(scale)
            .float(p)
            .float(keep_scale)
            .u64(seed);
        let grid = (
            cols.div_ceil(THREADS as usize) as u32,
            r.div_ceil(16) as u32,
            n.div_ceil(128) as u32,
        );
        self.launch(kernel, grid, (THREADS, 1, 1), args)
    }

    /// out [rows, cols] = the rows `ids` of the quantized w (rows 0..rows in
    /// order without ids), dequantized (`dequant_rows_*` in kernels/quant.cu).
    fn dequant_rows(
        &self,
        out: &mut Tensor<Self>,
        ids: Option<&DeviceBuffer<D>>,
        rows: usize,
        w: &QTensor<Self>,
    ) -> Result<()> {
        assert_eq!(out.shape, [rows, w.cols]);
        let kernel = match out.dtype {
            DType::BF16 => "dequant_rows_bf16",
            DType::F32 => "dequant_rows_f32",
            other => panic!("dequantized rows in {other}"),
        };
        if rows == 0 || w.cols == 0 {
            return Ok(());
        }
        let row_bytes = w.ty.bytes_for(w.cols).expect("checked at upload");
        let grid = u32::try_from(rows).expect("rows fit a grid");
        // SAFETY: w holds w.rows rows of row_bytes (checked at upload) and
        // every id is < w.rows (the callers' checks), so the kernel reads
        // inside w and writes out's rows·cols elements.
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(w.buf.ptr)
            .ptr(ids.map_or(0, |b| b.ptr))
            .int(w.cols)
            .int(row_bytes)
            .int(w.ty.id() as usize);
        self.launch(kernel, (grid, 1, 1), (THREADS, 1, 1), args)
    }

    /// `matmul_nt`, or with `invariant` its batch-invariant form: one kernel
    /// for every n, so that no row's arithmetic changes with the batch.
    ///
    /// Either kernel is batch-invariant on its own: an output element is one
    /// accumulator, of one thread (version 1: a multiply-add per k, k from 0
    /// up) or of one mma fragment (version 2: one mma per 16 k, in order,
    /// each summing that element's own 16 products in the hardware's fixed
    /// way), with no split of k, whatever n is and wherever the row sits in
    /// its tile; rows past n are loaded as zeros and feed only their own
    /// outputs. What is not invariant is `matmul_nt`'s switch between the
    /// two at n = 16. The fixed choice for bf16 is version 2 (tensor cores):
    /// a served batch's rows are mostly prefill, and a decode-only step
    /// leaves a tile as empty in version 1 (64 rows) as in version 2.
    fn launch_matmul_nt(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        invariant: bool,
    ) -> Result<()> {
        let (n, m, k) = shapes::matmul_nt(out, x, w);
        // f32 x and w (the flat-IP index's scores, where bf16 would change
        // the ranking): version 1 in f32 throughout, for every n; the tensor
        // core version takes bf16 only.
        let f32_in = x.dtype == DType::F32;
        let in_dtype = if f32_in { DType::F32 } else { DType::BF16 };
        expect_dtype("matmul x", x, in_dtype);
        expect_dtype("matmul w", w, in_dtype);
        if f32_in {
            expect_dtype("matmul output (of f32 x and w)", out, DType::F32);
        }
        // Version 2 (tensor cores, 64×128 tiles) for prefill-sized products.
        // A decode step has a handful of rows, which would leave most of an
        // mma tile empty: version 1 (64×64 tiles, more blocks) serves those
        // until a GPU run of benches/kernels.rs says better.
        let mma = !f32_in && (invariant || n >= 16);
        let kernel = match (f32_in, out.dtype, mma) {
            (true, _, _) => "matmul_nt_f32",
            (false, DType::BF16, true) => "matmul_nt_mma_bf16",
            (false, DType::F32, true) => "matmul_nt_mma_bf16_f32",
            (false, DType::BF16, false) => "matmul_nt_bf16",
            (false, DType::F32, false) => "matmul_nt_bf16_f32",
            (false, other, _) => panic!("matmul output {other}"),
        };
        if n == 0 || m == 0 {
            return Ok(());
        }
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(x.buf.ptr)
            .ptr(w.buf.ptr)
            .int(n)
            .int(m)
            .int(k);
        if mma {
            let grid = (m.div_ceil(128) as u32, n.div_ceil(64) as u32, 1);
            self.launch(kernel, grid, (128, 1, 1), args)
        } else {
            let grid = (m.div_ceil(64) as u32, n.div_ceil(64) as u32, 1);
            self.launch(kernel, grid, (THREADS, 1, 1), args)
        }
    }
}

impl<D: GpuDriver> Backend for Cuda<D> {
    type Buf = DeviceBuffer<D>;
    type QBuf = DeviceBuffer<D>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn dtype(&self) -> DType {
        DType::BF16
    }

    fn zeros_with_capacity(
        &self,
        shape: &[usize],
        capacity: usize,
        dtype: DType,
    ) -> Result<Tensor<Self>> {
        let numel: usize = shape.iter().product();
        assert!(capacity >= numel, "capacity {capacity} < shape {shape:?}");
        let buf = self.alloc(capacity * dtype.size())?;
        // SAFETY: the whole fresh allocation.
        unsafe { self.driver.zero(buf.ptr, buf.bytes)? };
        Ok(Tensor {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn upload(&self, data: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "{shape:?}");
        let mut bytes = Vec::with_capacity(data.len() * dtype.size());
        dtype.encode_into(&data, &mut bytes);
        let buf = self.alloc(bytes.len())?;
        // SAFETY: the allocation holds exactly these bytes.
        unsafe { self.driver.upload(buf.ptr, &bytes)? };
        Ok(Tensor {
            buf,
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn download_rows(&self, t: &Tensor<Self>, row: usize, rows: usize) -> Result<Vec<f32>> {
        let (n, d) = t.rows_cols();
        assert!(row + rows <= n, "rows {row}+{rows} of {n}");
        let size = t.dtype.size();
        let mut bytes = vec![0u8; rows * d * size];
        // SAFETY: rows row..row+rows lie inside the tensor's buffer.
        unsafe {
            self.driver
                .download(&mut bytes, t.buf.ptr + (row * d * size) as u64)?
        };
        Ok(t.dtype.decode(&bytes))
    }

    fn zero(&self, t: &mut Tensor<Self>) -> Result<()> {
        // SAFETY: the tensor's first numel() elements lie in its buffer.
        unsafe { self.driver.zero(t.buf.ptr, t.numel() * t.dtype.size()) }
    }

    fn convert(&self, dst: &mut Tensor<Self>, src: &Tensor<Self>) -> Result<()> {
        assert_eq!(dst.shape, src.shape, "convert: shapes differ");
        let n = src.numel();
        if dst.dtype == src.dtype {
            return self.copy_rows(dst, 0, src, 0, src.rows_cols().0);
        }
        let kernel = match (dst.dtype, src.dtype) {
            (DType::BF16, DType::F32) => "convert_f32_bf16",
            (DType::F32, DType::BF16) => "convert_bf16_f32",
            other => panic!("convert of {other:?}"),
        };
        let args = Args::default().ptr(dst.buf.ptr).ptr(src.buf.ptr).int(n);
        self.launch(kernel, (blocks_for(n), 1, 1), (THREADS, 1, 1), args)
    }

    fn copy_rows(
        &self,
        dst: &mut Tensor<Self>,
        dst_row: usize,
        src: &Tensor<Self>,
        src_row: usize,
        rows: usize,
    ) -> Result<()> {
        let d = shapes::copy_rows(dst, dst_row, src, src_row, rows);
        let row_bytes = (d * dst.dtype.size()) as u64;
        // SAFETY: both row ranges lie inside their tensors (asserted above),
        // and two tensors never share a buffer.
        unsafe {
            self.driver.copy(
                dst.buf.ptr + dst_row as u64 * row_bytes,
                src.buf.ptr + src_row as u64 * row_bytes,
                rows * row_bytes as usize,
            )
        }
    }

    fn embedding(&self, out: &mut Tensor<Self>, ids: &[u32], table: &Tensor<Self>) -> Result<()> {
        let (vocab, d) = table.rows_cols();
        assert_eq!(out.shape, [ids.len(), d]);
        expect_dtype("embedding table", table, DType::BF16);
        let kernel = match out.dtype {
            DType::BF16 => "embedding_fwd_bf16",
            DType::F32 => "embedding_fwd_bf16_f32",
            other => panic!("embedding output {other}"),
        };
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {bad} outside vocabulary {vocab}"
            )));
        }
        if ids.is_empty() {
            return Ok(());
        }
        let dev_ids = self.upload_slice(ids)?;
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(dev_ids.ptr)
            .ptr(table.buf.ptr)
            .int(d);
        self.launch(kernel, (ids.len() as u32, 1, 1), (THREADS, 1, 1), args)?;
        // The ids must outlive the kernel.
        self.driver.synchronize()
    }

    fn embedding_backward(
        &self,
        dtable: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        ids: &[u32],
    ) -> Result<()> {
        let (_, d) = shapes::embedding_backward(dtable, dout, ids);
        expect_dtype("dtable", dtable, DType::F32);
        expect_dtype("dout", dout, DType::F32);
        if ids.is_empty() {
            return Ok(());
        }
        let dev_ids = self.upload_slice(ids)?;
        let args = Args::default()
            .ptr(dtable.buf.ptr)
            .ptr(dev_ids.ptr)
            .ptr(dout.buf.ptr)
            .int(d);
        self.launch(
            "embedding_bwd_f32",
            (ids.len() as u32, 1, 1),
            (THREADS, 1, 1),
            args,
        )?;
        // The ids must outlive the kernel.
        self.driver.synchronize()
    }

    fn rmsnorm(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<()> {
        assert_eq!(out.shape, x.shape);
        let (n, d) = x.rows_cols();
        assert_eq!(weight.numel(), d);
        expect_dtype("rmsnorm out", out, DType::BF16);
        expect_dtype("rmsnorm weight", weight, DType::BF16);
        let kernel = match x.dtype {
            DType::BF16 => "rmsnorm_fwd_bf16",
            DType::F32 => "rmsnorm_fwd_f32_bf16",
            other => panic!("rmsnorm input {other}"),
        };
        if n == 0 {
            return Ok(());
        }
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(x.buf.ptr)
            .ptr(weight.buf.ptr)
            .int(d)
            .float(eps);
        self.launch(kernel, (n as u32, 1, 1), (THREADS, 1, 1), args)
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut Tensor<Self>,
        dweight: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<()> {
        let d = shapes::rmsnorm_backward(dx, dweight, dout, x, weight);
        for (what, t, dtype) in [
            ("dx", &*dx, DType::F32),
            ("dweight", &*dweight, DType::F32),
            ("dout", dout, DType::BF16),
            ("x", x, DType::F32),
            ("weight", weight, DType::BF16),
        ] {
            expect_dtype(what, t, dtype);
        }
        let n = x.numel() / d.max(1);
        if n == 0 {
            return Ok(());
        }
        let args = Args::default()
            .ptr(dx.buf.ptr)
            .ptr(dweight.buf.ptr)
            .ptr(dout.buf.ptr)
            .ptr(x.buf.ptr)
            .ptr(weight.buf.ptr)
            .int(d)
            .float(eps);
        self.launch(
            "rmsnorm_bwd_f32_bf16",
            (n as u32, 1, 1),
            (THREADS, 1, 1),
            args,
        )
    }

    fn matmul_nt(&self, out: &mut Tensor<Self>, x: &Tensor<Self>, w: &Tensor<Self>) -> Result<()> {
        self.launch_matmul_nt(out, x, w, false)
    }

    fn matmul_nt_invariant(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
    ) -> Result<()> {
        self.launch_matmul_nt(out, x, w, true)
    }

    fn upload_quant(
        &self,
        data: QBytes,
        ty: GgmlType,
        rows: usize,
        cols: usize,
    ) -> Result<QTensor<Self>> {
        cpu::quant::check(ty, data.len(), rows, cols)?;
        let buf = self.alloc(data.len())?;
        // SAFETY: the allocation holds exactly these bytes.
        unsafe { self.driver.upload(buf.ptr, &data)? };
        Ok(QTensor {
            buf,
            ty,
            rows,
            cols,
        })
    }

    fn matmul_q(&self, out: &mut Tensor<Self>, x: &Tensor<Self>, w: &QTensor<Self>) -> Result<()> {
        let (n, m, k) = shapes::matmul_q(out, x, w);
        expect_dtype("matmul_q x", x, DType::BF16);
        let out_type = match out.dtype {
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            other => panic!("matmul_q output {other}"),
        };
        if n == 0 || m == 0 {
            return Ok(());
        }
        if k == 0 {
            return self.zero(out);
        }
        let Some(ty) = quant_kernel_type(w.ty) else {
            // The plain path: the whole weight in bf16 for this one product.
            let mut wb = self.zeros(&[m, k], DType::BF16)?;
            self.dequant_rows(&mut wb, None, m, w)?;
            self.matmul_nt_invariant(out, x, &wb)?;
            // wb must outlive the kernel.
            return self.driver.synchronize();
        };
        // x in int8 per 32 values: xq [n, k], then (d, Σq) [n, k/32], 8-byte
        // aligned as n·k is a multiple of 32.
        let units = n * k / 32;
        let scratch = self.alloc(n * k + units * 8)?;
        let (xq, xds) = (scratch.ptr, scratch.ptr + (n * k) as u64);
        // SAFETY: x is [n, k] bf16; the scratch holds n·k bytes of xq and
        // `units` pairs of f32 after them.
        let args = Args::default().ptr(xq).ptr(xds).ptr(x.buf.ptr).int(units);
        let blocks = u32::try_from(units.div_ceil(8)).expect("x fits a grid");
        self.launch("quantize_q8_bf16", (blocks, 1, 1), (THREADS, 1, 1), args)?;
        // SAFETY: w holds m rows of row_bytes with k a multiple of its block
        // (checked at upload), xq and xds hold n rows, out is [n, m]; the
        // kernels clamp the rows they read to those and write inside out.
        let row_bytes = w.ty.bytes_for(k).expect("checked at upload");
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(w.buf.ptr)
            .ptr(xq)
            .ptr(xds)
            .int(n)
            .int(m)
            .int(k)
            .int(row_bytes);
        // Tiles of w rows × x rows: QMV_ROWS × QMV_COLS (16 × 8) and
        // QMM_W × QMM_X (32 × 32) in kernels/quant.cu.
        if n <= MATMUL_Q_MV_ROWS {
            let kernel = format!("matmul_q_{ty}_{out_type}");
            let grid = (m.div_ceil(16) as u32, n.div_ceil(8) as u32, 1);
            self.launch(&kernel, grid, (128, 1, 1), args)?;
        } else {
            let kernel = format!("matmul_q_mma_{ty}_{out_type}");
            let grid = (m.div_ceil(32) as u32, n.div_ceil(32) as u32, 1);
            self.launch(&kernel, grid, (256, 1, 1), args)?;
        }
        // The scratch must outlive the kernels.
        self.driver.synchronize()
    }

    fn matmul_q_backward(
        &self,
        dx: &mut Tensor<Self>,
        dy: &Tensor<Self>,
        w: &QTensor<Self>,
    ) -> Result<()> {
        let (n, m, k) = shapes::matmul_q(dy, dx, w);
        if n == 0 || m == 0 || k == 0 {
            return Ok(());
        }
        // LoRA's backward through a frozen base: the weight in bf16 for this
        // one product (the forward has the integer kernels).
        let mut wb = self.zeros(&[m, k], DType::BF16)?;
        self.dequant_rows(&mut wb, None, m, w)?;
        // dx [n, k] += dy [n, m] · w [m, k]
        self.matmul_acc(dx, dy, (n, k, m), (m, 1), &wb.buf, (k, 1))?;
        // wb must outlive the kernel.
        self.driver.synchronize()
    }

    fn embedding_q(
        &self,
        out: &mut Tensor<Self>,
        ids: &[u32],
        table: &QTensor<Self>,
    ) -> Result<()> {
        assert_eq!(out.shape, [ids.len(), table.cols]);
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(Error::Invalid(format!(
                "token id {bad} outside vocabulary {}",
                table.rows
            )));
        }
        if ids.is_empty() || table.cols == 0 {
            return Ok(());
        }
        let dev_ids = self.upload_slice(ids)?;
        self.dequant_rows(out, Some(&dev_ids), ids.len(), table)?;
        // The ids must outlive the kernel.
        self.driver.synchronize()
    }

    fn matmul_nt_backward(
        &self,
        dx: &mut Tensor<Self>,
        dw: Option<&mut Tensor<Self>>,
        dout: &Tensor<Self>,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
    ) -> Result<()> {
        let (n, m, k) = shapes::matmul_nt_backward(dx, dw.as_deref(), dout, x, w);
        expect_dtype("x", x, DType::BF16);
        expect_dtype("w", w, DType::BF16);
        // dx [n, k] += dout [n, m] · w [m, k]
        self.matmul_acc(dx, dout, (n, k, m), (m, 1), &w.buf, (k, 1))?;
        if let Some(dw) = dw {
            // dw [m, k] += doutᵀ [m, n] · x [n, k]
            self.matmul_acc(dw, dout, (m, k, n), (1, m), &x.buf, (k, 1))?;
        }
        Ok(())
    }

    fn lora_forward(
        &self,
        y: &mut Tensor<Self>,
        t: &mut Tensor<Self>,
        x: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        dropout: Option<(f32, u64)>,
    ) -> Result<()> {
        let dims = shapes::lora_forward(y, t, x, a, b);
        lora_rank_fits(dims.r)?;
        for (what, v) in [("y", &*y), ("x", x), ("A", a), ("B", b)] {
            expect_dtype(what, v, DType::BF16);
        }
        expect_dtype("t", t, DType::F32);
        if dims.n == 0 {
            return Ok(());
        }
        let (p, keep_scale, seed) = dropout_args(dropout);
        let args = Args::default()
            .ptr(y.buf.ptr)
            .ptr(t.buf.ptr)
            .ptr(x.buf.ptr)
            .ptr(a.buf.ptr)
            .ptr(b.buf.ptr)
            .int(dims.n)
            .int(dims.inp)
            .int(dims.out)
            .int(dims.r)
            .float(s)
            .float(p)
            .float(keep_scale)
            .u64(seed);
        let grid = (dims.n.div_ceil(16) as u32, 1, 1);
        self.launch("lora_fwd_bf16", grid, (THREADS, 1, 1), args)
    }

    fn lora_backward(
        &self,
        dx: &mut Tensor<Self>,
        da: &mut Tensor<Self>,
        db: &mut Tensor<Self>,
        dt: &mut Tensor<Self>,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        t: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        dropout: Option<(f32, u64)>,
    ) -> Result<()> {
        let dims = shapes::lora_backward(dx, da, db, dt, dy, x, t, a, b);
        lora_rank_fits(dims.r)?;
        for (what, v) in [("dx", &*dx), ("x", x), ("A", a), ("B", b)] {
            expect_dtype(what, v, DType::BF16);
        }
        for (what, v) in [("dA", &*da), ("dB", &*db), ("dt", &*dt), ("t", t)] {
            expect_dtype(what, v, DType::F32);
        }
        let (suffix, grad) = match dy.dtype {
            DType::BF16 => ("bf16", "lora_grad_bf16"),
            DType::F32 => ("f32", "lora_grad_f32"),
            other => panic!("lora_backward of a {other} dy"),
        };
        let LoraDims { n, inp, out, r } = dims;
        if n == 0 {
            return Ok(());
        }
        let (p, keep_scale, seed) = dropout_args(dropout);
        // dt = s·dy·B, dx += drop'(dt·A)
        let args = Args::default()
            .ptr(dx.buf.ptr)
            .ptr(dt.buf.ptr)
            .ptr(dy.buf.ptr)
            .ptr(a.buf.ptr)
            .ptr(b.buf.ptr)
            .int(n)
            .int(inp)
            .int(out)
            .int(r)
            .float(s)
            .float(p)
            .float(keep_scale)
            .u64(seed);
        let grid = (n.div_ceil(16) as u32, 1, 1);
        self.launch(&format!("lora_bwd_x_{suffix}"), grid, (THREADS, 1, 1), args)?;
        // dA [r, in] += dtᵀ·drop(x); dB [out, r] += s·dyᵀ·t
        let drop = (p, keep_scale, seed);
        self.lora_grad("lora_grad_bf16", da, dt, x, (inp, 1), 1.0, drop)?;
        self.lora_grad(grad, db, t, dy, (1, r), s, (0.0, 1.0, 0))
    }

    fn lora_gathered(
        &self,
        y: &mut Tensor<Self>,
        x: &Tensor<Self>,
        adapters: &[LoraRef<'_, Self>],
        row_adapter: &[u32],
    ) -> Result<()> {
        let (n, inp, out) = shapes::lora_gathered(y, x, adapters, row_adapter)?;
        if x.dtype != DType::BF16 {
            return Err(Error::Unsupported(format!(
                "lora_gathered of {} tensors (the kernel takes bf16)",
                x.dtype
            )));
        }
        for l in adapters {
            lora_rank_fits(l.a.rows_cols().0)?;
        }
        if n == 0 || inp == 0 || out == 0 {
            return Ok(());
        }
        // One buffer: the adapter table (`lora_gathered_bf16` in
        // kernels/lora.cu: A, B, r, the bits of s), then one task per row
        // that takes an adapter, row | adapter << 32, in adapter order.
        const WORDS: usize = 4;
        let mut words: Vec<u64> = Vec::with_capacity(adapters.len() * WORDS + n);
        for l in adapters {
            let r = l.a.rows_cols().0 as u64;
            words.extend([l.a.buf.ptr, l.b.buf.ptr, r, l.scale.to_bits() as u64]);
        }
        let table_len = words.len();
        let mut tasks: Vec<u64> = (row_adapter.iter().enumerate())
            .filter(|(_, &a)| a != NO_ADAPTER)
            .map(|(i, &a)| i as u64 | (a as u64) << 32)
            .collect();
        if tasks.is_empty() {
            return Ok(());
        }
        tasks.sort_unstable_by_key(|&t| (t >> 32, t & 0xffff_ffff));
        words.extend(&tasks);
        let dev = self.upload_slice(&words)?;
        let grid = u32::try_from(tasks.len()).expect("tasks fit a grid");
        // SAFETY: every task's row is < n (one task per row, so no two blocks
        // write one row of y) and its adapter < adapters.len(), whose A [r, in]
        // and B [out, r] are bf16 with 1 ≤ r ≤ LORA_MAX_RANK (checked above):
        // the kernel reads x [n, in], A and B, and writes y [n, out], inside
        // those tensors. The tasks start after the table in the buffer.
        let args = Args::default()
            .ptr(y.buf.ptr)
            .ptr(x.buf.ptr)
            .ptr(dev.ptr)
            .ptr(dev.ptr + (table_len * 8) as u64)
            .int(inp)
            .int(out);
        self.launch("lora_gathered_bf16", (grid, 1, 1), (THREADS, 1, 1), args)?;
        // The table must outlive the kernel.
        self.driver.synchronize()
    }

    fn rope(&self, x: &mut Tensor<Self>, heads: usize, pos0: usize, theta: f32) -> Result<()> {
        let (n, hd) = shapes::rope(x, heads);
        expect_dtype("rope x", x, DType::BF16);
        let args = Args::default()
            .ptr(x.buf.ptr)
            .int(n)
            .int(heads)
            .int(hd)
            .int(pos0)
            .float(theta);
        let grid = (blocks_for(n * heads * hd / 2), 1, 1);
        self.launch("rope_fwd_bf16", grid, (THREADS, 1, 1), args)
    }

    fn rope_backward(
        &self,
        dx: &mut Tensor<Self>,
        heads: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<()> {
        let (n, hd) = shapes::rope(dx, heads);
        expect_dtype("rope dx", dx, DType::BF16);
        let args = Args::default()
            .ptr(dx.buf.ptr)
            .int(n)
            .int(heads)
            .int(hd)
            .int(pos0)
            .float(theta);
        let grid = (blocks_for(n * heads * hd / 2), 1, 1);
        self.launch("rope_bwd_bf16", grid, (THREADS, 1, 1), args)
    }

    fn rope_rows(
        &self,
        x: &mut Tensor<Self>,
        heads: usize,
        positions: &[u32],
        theta: f32,
    ) -> Result<()> {
        let (n, hd) = shapes::rope_rows(x, heads, positions)?;
        expect_dtype("rope_rows x", x, DType::BF16);
        if n == 0 {
            return Ok(());
        }
        let dev_positions = self.upload_slice(positions)?;
        // SAFETY: x holds n rows of heads·hd bf16 (checked above), the grid
        // strides over its n·heads·hd/2 pairs, and positions holds n values.
        let args = Args::default()
            .ptr(x.buf.ptr)
            .ptr(dev_positions.ptr)
            .int(n)
            .int(heads)
            .int(hd)
            .float(theta);
        let grid = (blocks_for(n * heads * hd / 2), 1, 1);
        self.launch("rope_rows_bf16", grid, (THREADS, 1, 1), args)?;
        // The positions must outlive the kernel.
        self.driver.synchronize()
    }

    fn scatter_rows(
        &self,
        dst: &mut Tensor<Self>,
        src: &Tensor<Self>,
        slots: &[u32],
    ) -> Result<()> {
        let (n, d) = shapes::scatter_rows(dst, src, slots)?;
        let kernel = match dst.dtype {
            DType::BF16 => "scatter_rows_bf16",
            DType::F32 => "scatter_rows_f32",
            other => {
                return Err(Error::Unsupported(format!("scatter_rows of {other} rows")));
            }
        };
        if n == 0 || d == 0 {
            return Ok(());
        }
        let dev_slots = self.upload_slice(slots)?;
        // SAFETY: every slot is < dst's rows and distinct (checked above), so the
        // blocks write disjoint rows inside dst and read the n rows of src.
        let args = Args::default()
            .ptr(dst.buf.ptr)
            .ptr(src.buf.ptr)
            .ptr(dev_slots.ptr)
            .int(d);
        self.launch(kernel, (n as u32, 1, 1), (THREADS, 1, 1), args)?;
        // The slots must outlive the kernel.
        self.driver.synchronize()
    }

    fn attention_paged(
        &self,
        out: &mut Tensor<Self>,
        q: &Tensor<Self>,
        k_cache: &Tensor<Self>,
        v_cache: &Tensor<Self>,
        seqs: &[PagedSeq<'_>],
        heads: usize,
        kv_heads: usize,
        block_size: usize,
    ) -> Result<()> {
        let (_, hd) =
            shapes::attention_paged(out, q, k_cache, v_cache, seqs, heads, kv_heads, block_size)?;
        if hd > 256 {
            return Err(Error::Unsupported(format!(
                "head_dim {hd} (the paged attention kernel takes up to 256)"
            )));
        }
        for (what, t) in [
            ("out", &*out),
            ("q", q),
            ("k_cache", k_cache),
            ("v_cache", v_cache),
        ] {
            if t.dtype != DType::BF16 {
                return Err(Error::Unsupported(format!(
                    "attention_paged: {what} is {}, the kernel takes bf16",
                    t.dtype
                )));
            }
        }
        // One task per covered row: (row, position, offset of its sequence's
        // block table in the flattened tables).
        let mut tasks: Vec<u32> = Vec::new();
        let mut blocks: Vec<u32> = Vec::new();
        for s in seqs.iter().filter(|s| s.rows > 0) {
            let offset = u32::try_from(blocks.len())
                .map_err(|_| Error::Invalid("attention_paged: block tables too long".into()))?;
            let used = s.ctx.div_ceil(block_size);
            blocks.extend_from_slice(&s.blocks[..used]);
            for i in 0..s.rows {
                let pos = s.ctx - s.rows + i;
                tasks.extend([s.row + i, pos].map(|x| x as u32));
                tasks.push(offset);
            }
        }
        if tasks.is_empty() {
            return Ok(());
        }
        let (dev_tasks, dev_blocks) = (self.upload_slice(&tasks)?, self.upload_slice(&blocks)?);
        // SAFETY: each task's row is inside q and out (and no two tasks share one),
        // its table holds ceil((pos + 1) / block_size) ≤ ceil(ctx /
        // block_size) block ids, each < num_slots / block_size: every slot
        // the kernel reads is a row of k_cache and v_cache (checked above).
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(q.buf.ptr)
            .ptr(k_cache.buf.ptr)
            .ptr(v_cache.buf.ptr)
            .ptr(dev_tasks.ptr)
            .ptr(dev_blocks.ptr)
            .int(heads)
            .int(kv_heads)
            .int(hd)
            .int(block_size);
        let grid = ((tasks.len() / 3) as u32, heads as u32, 1);
        self.launch("attention_paged_bf16", grid, (128, 1, 1), args)?;
        // The tables must outlive the kernel.
        self.driver.synchronize()
    }

    fn attention(
        &self,
        out: &mut Tensor<Self>,
        lse: Option<&mut Tensor<Self>>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        heads: usize,
        kv_heads: usize,
        pos0: usize,
    ) -> Result<()> {
        let (n, hd) = shapes::attention(out, q, k, v, heads, kv_heads, pos0);
        if hd > 256 {
            return Err(Error::Unsupported(format!(
                "head_dim {hd} (the attention kernel takes up to 256)"
            )));
        }
        for (what, t) in [("out", &*out), ("q", q), ("k", k), ("v", v)] {
            expect_dtype(what, t, DType::BF16);
        }
        if let Some(lse) = &lse {
            shapes::attention_lse(lse, heads, n);
            expect_dtype("lse", lse, DType::F32);
        }
        if n == 0 {
            return Ok(());
        }
        let flash = [8, 16, 32, 64, 128].contains(&hd);
        if lse.is_some() && !flash {
            return Err(Error::Unsupported(format!(
                "training attention with head_dim {hd} (the flash kernel takes 8, 16, 32, 64 or 128)"
            )));
        }
        if flash && (n > 1 || lse.is_some()) {
            // Prefill (and training): the flash-style kernel. Its log-sum-exp
            // is for the backward; inference discards it.
            let scratch;
            let lse_ptr = match lse {
                Some(lse) => lse.buf.ptr,
                None => {
                    scratch = self.alloc(heads * n * 4)?;
                    scratch.ptr
                }
            };
            let args = Args::default()
                .ptr(out.buf.ptr)
                .ptr(lse_ptr)
                .ptr(q.buf.ptr)
                .ptr(k.buf.ptr)
                .ptr(v.buf.ptr)
                .int(n)
                .int(heads)
                .int(kv_heads)
                .int(hd)
                .int(pos0);
            let grid = (n.div_ceil(64) as u32, heads as u32, 1);
            self.launch("attention_prefill_bf16", grid, (128, 1, 1), args)?;
            // A scratch lse must outlive the kernel.
            return self.driver.synchronize();
        }
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(q.buf.ptr)
            .ptr(k.buf.ptr)
            .ptr(v.buf.ptr)
            .int(heads)
            .int(kv_heads)
            .int(hd)
            .int(pos0);
        self.launch(
            "attention_fwd_bf16",
            (n as u32, heads as u32, 1),
            (128, 1, 1),
            args,
        )
    }

    fn swiglu(&self, out: &mut Tensor<Self>, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<()> {
        assert_eq!(out.shape, gate.shape);
        assert_eq!(gate.shape, up.shape);
        for (what, t) in [("out", &*out), ("gate", gate), ("up", up)] {
            expect_dtype(what, t, DType::BF16);
        }
        let n = out.numel();
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(gate.buf.ptr)
            .ptr(up.buf.ptr)
            .int(n);
        self.launch(
            "swiglu_fwd_bf16",
            (blocks_for(n), 1, 1),
            (THREADS, 1, 1),
            args,
        )
    }

    fn attention_backward(
        &self,
        dq: &mut Tensor<Self>,
        dk: &mut Tensor<Self>,
        dv: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        out: &Tensor<Self>,
        lse: &Tensor<Self>,
        heads: usize,
        kv_heads: usize,
        pos0: usize,
    ) -> Result<()> {
        let (n, hd) =
            shapes::attention_backward(dq, dk, dv, dout, q, k, v, out, lse, heads, kv_heads, pos0);
        if hd > 256 {
            return Err(Error::Unsupported(format!(
                "head_dim {hd} (the attention backward takes up to 256)"
            )));
        }
        for (what, t) in [
            ("dq", &*dq),
            ("dk", &*dk),
            ("dv", &*dv),
            ("dout", dout),
            ("q", q),
            ("k", k),
            ("v", v),
            ("out", out),
        ] {
            expect_dtype(what, t, DType::BF16);
        }
        expect_dtype("lse", lse, DType::F32);
        if n == 0 {
            return Ok(());
        }
        // D of every (query, head), from the first kernel to the second
        let dsum = self.alloc(n * heads * 4)?;
        let args = Args::default()
            .ptr(dq.buf.ptr)
            .ptr(dsum.ptr)
            .ptr(dout.buf.ptr)
            .ptr(q.buf.ptr)
            .ptr(k.buf.ptr)
            .ptr(v.buf.ptr)
            .ptr(out.buf.ptr)
            .ptr(lse.buf.ptr)
            .int(n)
            .int(heads)
            .int(kv_heads)
            .int(hd)
            .int(pos0);
        let grid = (n as u32, heads as u32, 1);
        self.launch("attention_bwd_dq_bf16", grid, (32, 1, 1), args)?;
        let args = Args::default()
            .ptr(dk.buf.ptr)
            .ptr(dv.buf.ptr)
            .ptr(lse.buf.ptr)
            .ptr(dsum.ptr)
            .ptr(dout.buf.ptr)
            .ptr(q.buf.ptr)
            .ptr(k.buf.ptr)
            .ptr(v.buf.ptr)
            .int(n)
            .int(heads)
            .int(kv_heads)
            .int(hd)
            .int(pos0);
        let grid = ((pos0 + n) as u32, kv_heads as u32, 1);
        self.launch("attention_bwd_dkv_bf16", grid, (32, 1, 1), args)?;
        // D must outlive the kernels.
        self.driver.synchronize()
    }

    fn swiglu_backward(
        &self,
        dgate: &mut Tensor<Self>,
        dup: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<()> {
        shapes::same_shape("swiglu_backward", &[dgate, dup, dout, gate, up]);
        for (what, t) in [
            ("dgate", &*dgate),
            ("dup", &*dup),
            ("dout", dout),
            ("gate", gate),
            ("up", up),
        ] {
            expect_dtype(what, t, DType::BF16);
        }
        let n = dout.numel();
        let args = Args::default()
            .ptr(dgate.buf.ptr)
            .ptr(dup.buf.ptr)
            .ptr(dout.buf.ptr)
            .ptr(gate.buf.ptr)
            .ptr(up.buf.ptr)
            .int(n);
        self.launch(
            "swiglu_bwd_bf16",
            (blocks_for(n), 1, 1),
            (THREADS, 1, 1),
            args,
        )
    }

    fn dropout(&self, x: &mut Tensor<Self>, p: f32, seed: u64) -> Result<()> {
        let kernel = match x.dtype {
            DType::BF16 => "dropout_bf16",
            DType::F32 => "dropout_f32",
            other => panic!("dropout on {other}"),
        };
        let n = x.numel();
        // The scale formed in f32 as the CPU device forms it.
        let keep_scale = 1.0 / (1.0 - p);
        let args = Args::default()
            .ptr(x.buf.ptr)
            .float(p)
            .float(keep_scale)
            .u64(seed)
            .int(n);
        self.launch(kernel, (blocks_for(n), 1, 1), (THREADS, 1, 1), args)
    }

    fn add_scaled(&self, x: &mut Tensor<Self>, y: &Tensor<Self>, alpha: f32) -> Result<()> {
        assert_eq!(x.shape, y.shape);
        let kernel = match (x.dtype, y.dtype) {
            (DType::BF16, DType::BF16) => "add_scaled_bf16",
            (DType::F32, DType::BF16) => "add_scaled_f32_bf16",
            (DType::BF16, DType::F32) => "add_scaled_bf16_f32",
            (DType::F32, DType::F32) => "add_scaled_f32_f32",
            other => panic!("add_scaled of {other:?}"),
        };
        let n = x.numel();
        let args = Args::default()
            .ptr(x.buf.ptr)
            .ptr(y.buf.ptr)
            .float(alpha)
            .int(n);
        self.launch(kernel, (blocks_for(n), 1, 1), (THREADS, 1, 1), args)
    }

    fn log_softmax(&self, out: &mut Tensor<Self>, x: &Tensor<Self>) -> Result<()> {
        assert_eq!(out.shape, x.shape);
        expect_dtype("out", out, DType::F32);
        expect_dtype("x", x, DType::F32);
        let (n, d) = x.rows_cols();
        if n == 0 {
            return Ok(());
        }
        let args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr).int(d);
        self.launch("log_softmax_f32", (n as u32, 1, 1), (THREADS, 1, 1), args)
    }

    fn cross_entropy(
        &self,
        dlogits: Option<&mut Tensor<Self>>,
        logits: &Tensor<Self>,
        targets: &[u32],
        scale: Option<f32>,
    ) -> Result<f32> {
        let (n, vocab) = shapes::cross_entropy(dlogits.as_deref(), logits, targets);
        expect_dtype("logits", logits, DType::F32);
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| t != IGNORE && t as usize >= vocab)
        {
            return Err(Error::Invalid(format!(
                "target {bad} outside vocabulary {vocab}"
            )));
        }
        if n == 0 {
            return Ok(0.0);
        }
        let scale = scale.unwrap_or_else(|| mean_scale(targets));
        let dl = match dlogits {
            Some(t) => {
                expect_dtype("dlogits", t, DType::F32);
                t.buf.ptr
            }
            None => 0, // the kernel's null pointer: no gradient
        };
        let (loss, dev_targets) = (self.alloc(n * 4)?, self.upload_slice(targets)?);
        let args = Args::default()
            .ptr(loss.ptr)
            .ptr(dl)
            .ptr(logits.buf.ptr)
            .ptr(dev_targets.ptr)
            .int(vocab)
            .float(scale);
        self.launch("cross_entropy_f32", (n as u32, 1, 1), (THREADS, 1, 1), args)?;
        let mut bytes = vec![0u8; n * 4];
        // SAFETY: the n-float allocation above; the copy waits for the kernel.
        unsafe { self.driver.download(&mut bytes, loss.ptr)? };
        let sum: f64 = bytemuck::cast_slice::<u8, f32>(&bytes)
            .iter()
            .map(|&l| l as f64)
            .sum();
        Ok(sum as f32)
    }

    fn sum_squares(&self, t: &Tensor<Self>) -> Result<f64> {
        expect_dtype("sum_squares input", t, DType::F32);
        let n = t.numel();
        let out = self.alloc(8)?;
        // SAFETY: the fresh 8-byte allocation.
        unsafe { self.driver.zero(out.ptr, 8)? };
        if n > 0 {
            let args = Args::default().ptr(out.ptr).ptr(t.buf.ptr).int(n);
            let blocks = blocks_for(n).min(1024);
            self.launch("sum_squares_f32", (blocks, 1, 1), (THREADS, 1, 1), args)?;
        }
        let mut bytes = [0u8; 8];
        // SAFETY: the 8-byte allocation above; the copy waits for the kernel.
        unsafe { self.driver.download(&mut bytes, out.ptr)? };
        Ok(f64::from_le_bytes(bytes))
    }

    fn scale(&self, t: &mut Tensor<Self>, s: f32) -> Result<()> {
        expect_dtype("scale input", t, DType::F32);
        let n = t.numel();
        let args = Args::default().ptr(t.buf.ptr).float(s).int(n);
        self.launch("scale_f32", (blocks_for(n), 1, 1), (THREADS, 1, 1), args)
    }

    fn adamw_step(&self, tensors: &mut [AdamWTensors<'_, Self>], hp: &AdamW) -> Result<()> {
        // The table of `adamw_f32` (kernels/elementwise.cu): per tensor its
        // pointers, element count and first block.
        const CHUNK: usize = 4 * THREADS as usize;
        let mut table = Vec::with_capacity(tensors.len() * 7);
        let mut blocks = 0usize;
        for t in tensors.iter() {
            shapes::same_shape("adamw_step", &[t.param, t.m, t.v, t.grad]);
            for (what, x) in [
                ("param", &*t.param),
                ("m", &*t.m),
                ("v", &*t.v),
                ("grad", t.grad),
            ] {
                expect_dtype(what, x, DType::F32);
            }
            let copy = match &t.copy {
                Some(c) => {
                    assert_eq!(c.shape, t.param.shape, "adamw_step: copy's shape");
                    expect_dtype("copy", c, DType::BF16);
                    c.buf.ptr
                }
                None => 0,
            };
            let n = t.param.numel();
            if n == 0 {
                continue;
            }
            let ptrs = [
                t.param.buf.ptr,
                t.m.buf.ptr,
                t.v.buf.ptr,
                t.grad.buf.ptr,
                copy,
            ];
            table.extend(ptrs.into_iter().chain([n as u64, blocks as u64]));
            blocks += n.div_ceil(CHUNK);
        }
        if blocks == 0 {
            return Ok(());
        }
        let c = hp.scalars();
        let table_buf = self.upload_slice(&table)?;
        let args = Args::default()
            .ptr(table_buf.ptr)
            .int(table.len() / 7)
            .float(c.decay)
            .float(c.step_size)
            .float(c.bc2_sqrt)
            .float(c.one_minus_beta1)
            .float(c.one_minus_beta2)
            .float(c.beta2)
            .float(c.eps);
        let grid = u32::try_from(blocks).expect("AdamW blocks fit a grid");
        self.launch("adamw_f32", (grid, 1, 1), (THREADS, 1, 1), args)?;
        // The table must outlive the kernel.
        self.driver.synchronize()
    }

    fn layernorm(
        &self,
        out: &mut Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        bias: &Tensor<Self>,
        eps: f32,
    ) -> Result<()> {
        let d = shapes::layernorm(out, x, weight, bias);
        for (what, t) in [("out", &*out), ("x", x), ("weight", weight), ("bias", bias)] {
            expect_dtype(what, t, DType::BF16);
        }
        let (n, _) = x.rows_cols();
        if n == 0 {
            return Ok(());
        }
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(x.buf.ptr)
            .ptr(weight.buf.ptr)
            .ptr(bias.buf.ptr)
            .int(d)
            .float(eps);
        self.launch(
            "layernorm_fwd_bf16",
            (n as u32, 1, 1),
            (THREADS, 1, 1),
            args,
        )
    }

    fn gelu(&self, out: &mut Tensor<Self>, x: &Tensor<Self>) -> Result<()> {
        shapes::same_shape("gelu", &[out, x]);
        expect_dtype("out", out, DType::BF16);
        expect_dtype("x", x, DType::BF16);
        let n = x.numel();
        let args = Args::default().ptr(out.buf.ptr).ptr(x.buf.ptr).int(n);
        self.launch(
            "gelu_fwd_bf16",
            (blocks_for(n), 1, 1),
            (THREADS, 1, 1),
            args,
        )
    }

    fn add_bias(&self, x: &mut Tensor<Self>, bias: &Tensor<Self>) -> Result<()> {
        let d = shapes::add_bias(x, bias);
        expect_dtype("x", x, DType::BF16);
        expect_dtype("bias", bias, DType::BF16);
        let n = x.numel();
        let args = Args::default()
            .ptr(x.buf.ptr)
            .ptr(bias.buf.ptr)
            .int(n)
            .int(d);
        self.launch(
            "add_bias_bf16",
            (blocks_for(n), 1, 1),
            (THREADS, 1, 1),
            args,
        )
    }

    fn attention_bidirectional(
        &self,
        out: &mut Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        heads: usize,
        lens: &[usize],
    ) -> Result<()> {
        let (seq, hd) = shapes::attention_bidirectional(out, q, k, v, heads, lens);
        if hd > 256 {
            return Err(Error::Unsupported(format!(
                "head_dim {hd} (the attention kernel takes up to 256)"
            )));
        }
        for (what, t) in [("out", &*out), ("q", q), ("k", k), ("v", v)] {
            expect_dtype(what, t, DType::BF16);
        }
        let rows = seq * lens.len();
        if rows == 0 {
            return Ok(());
        }
        let lens: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let dev_lens = self.upload_slice(&lens)?;
        let args = Args::default()
            .ptr(out.buf.ptr)
            .ptr(q.buf.ptr)
            .ptr(k.buf.ptr)
            .ptr(v.buf.ptr)
            .ptr(dev_lens.ptr)
            .int(seq)
            .int(heads)
            .int(hd);
        let grid = (rows as u32, heads as u32, 1);
        self.launch("attention_bidir_bf16", grid, (128, 1, 1), args)?;
        // The lengths must outlive the kernel.
        self.driver.synchronize()
    }

    fn top_k(&self, scores: &Tensor<Self>, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        expect_dtype("scores", scores, DType::F32);
        let (rows, m) = scores.rows_cols();
        let k = k.min(m);
        if rows == 0 || k == 0 {
            return Ok(vec![Vec::new(); rows]);
        }
        let seg = top_k_segment(k);
        let segs = m.div_ceil(seg);
        if segs > 65535 {
            return Err(Error::Invalid(format!("top-k over rows of {m} scores")));
        }
        // Each row's segments x k candidates: segs blocks' best, padded.
        let width = segs * k;
        let (idx, val) = (self.alloc(rows * width * 4)?, self.alloc(rows * width * 4)?);
        let args = Args::default()
            .ptr(idx.ptr)
            .ptr(val.ptr)
            .ptr(scores.buf.ptr)
            .int(m)
            .int(k)
            .int(seg);
        let grid = (rows as u32, segs as u32, 1);
        self.launch("topk_f32", grid, (THREADS, 1, 1), args)?;
        let (mut idx_h, mut val_h) = (vec![0u32; rows * width], vec![0f32; rows * width]);
        // SAFETY: both allocations hold rows·width 4-byte values.
        unsafe {
            self.driver
                .download(bytemuck::cast_slice_mut(&mut idx_h), idx.ptr)?;
            self.driver
                .download(bytemuck::cast_slice_mut(&mut val_h), val.ptr)?;
        }
        Ok(idx_h
            .chunks_exact(width)
            .zip(val_h.chunks_exact(width))
            .map(|(i, v)| merge_top_k(i, v, k))
            .collect())
    }

    fn sample(&self, logits: &Tensor<Self>, cfg: &SamplerConfig, u: f32) -> Result<u32> {
        let (rows, vocab) = logits.rows_cols();
        assert_eq!(rows, 1, "sample takes one row of logits");
        expect_dtype("logits", logits, DType::F32);
        assert!((1..1 << 23).contains(&vocab), "vocabulary of {vocab}");
        let out = self.alloc(4)?;
        let args = Args::default().ptr(out.ptr).ptr(logits.buf.ptr).int(vocab);
        let (kernel, args) = if sample::is_greedy(cfg) {
            ("sample_argmax_f32", args)
        } else {
            let args = args
                .float(cfg.temperature)
                .int(cfg.top_k.min(vocab)) // k ≥ vocab keeps all, as 0 does
                .float(cfg.top_p)
                .float(u);
            ("sample_f32", args)
        };
        self.launch(kernel, (1, 1, 1), (1024, 1, 1), args)?;
        let mut id = [0u8; 4];
        // SAFETY: the 4-byte allocation above; the copy waits for the kernel.
        unsafe { self.driver.download(&mut id, out.ptr)? };
        Ok(u32::from_le_bytes(id))
    }
}
