//! The real GPU behind `GpuDriver`, through cudarc: kernels compiled by NVRTC
//! for the device's own architecture on first use (cached on disk), loaded per
//! kernel file, looked up by name and kept.

use super::driver::{DevicePtr, GpuDriver};
use super::nvrtc::{Arch, Compiler, Options};
use super::sources;
use crate::error::{Error, Result};
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, DriverError};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

pub struct Real {
    ctx: Arc<CudaContext>,
    arch: Arch,
    compiler: Compiler,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

fn driver_err(what: &str, e: DriverError) -> Error {
    Error::Invalid(format!("CUDA {what}: {e:?}"))
}

/// Why no GPU can be used here, or None when the driver library is present.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only probes whether the shared library can be loaded.
    if unsafe { sys::is_culib_present() } {
        None
    } else {
        Some("the CUDA driver library (libcuda.so) is not installed".into())
    }
}

impl Real {
    /// Opens GPU `ordinal`. Fails cleanly (never panics) when there is no
    /// driver, no device or no NVRTC.
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            return Err(Error::Unsupported(why));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("context", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_err("compute capability", e))?;
        Ok(Real {
            ctx,
            arch: Arch::from_compute_capability(major as u32, minor as u32),
            compiler: Compiler::new()?,
            modules: Mutex::default(),
            functions: Mutex::default(),
        })
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let file = kernel_file(name)
            .ok_or_else(|| Error::Invalid(format!("no kernel named {name} in kernels/*.cu")))?;
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let compiled = self
                        .compiler
                        .compile(file, &Options::new(self.arch.clone()))?;
                    let ptx = cudarc::nvrtc::Ptx::from_src(compiled.ptx);
                    let m = self
                        .ctx
                        .load_module(ptx)
                        .map_err(|e| driver_err(&format!("loading {file}"), e))?;
                    modules.insert(file, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| driver_err(&format!("function {name}"), e))?;
        self.functions
            .lock()
            .unwrap()
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// The cudarc context, for code that needs more of CUDA than the
    /// `GpuDriver` seam offers (benchmarks: events, cuBLAS).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_err("bind", e))
    }
}

/// The kernel file that defines entry point `name`.
fn kernel_file(name: &str) -> Option<&'static str> {
    sources::entry_points()
        .into_iter()
        .find(|e| e.name == name)
        .map(|e| e.file)
}

impl GpuDriver for Real {
    fn name(&self) -> String {
        format!("CUDA GPU {} ({})", self.ctx.ordinal(), self.arch)
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        self.bind()?;
        // SAFETY: a plain allocation of at least one byte.
        unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| driver_err("malloc", e))
    }

    unsafe fn free(&self, ptr: DevicePtr) {
        if self.bind().is_ok() {
            // SAFETY: the caller's contract. A failure here cannot be reported
            // from a destructor; the context records it.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller's contract.
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| driver_err("upload", e))
    }

    unsafe fn download(&self, dst: &mut [u8], src: DevicePtr) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller's contract; the synchronous copy waits for the
        // kernels before it on the default stream.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| driver_err("download", e))
    }

    unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller's contract.
        unsafe { result::memcpy_dtod_sync(dst, src, bytes) }.map_err(|e| driver_err("copy", e))
    }

    unsafe fn zero(&self, dst: DevicePtr, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller's contract.
        unsafe { result::memset_d8_sync(dst, 0, bytes) }.map_err(|e| driver_err("memset", e))
    }

    unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.function(name)?;
        self.bind()?;
        // SAFETY: the caller's contract; the null stream orders this launch
        // with the synchronous copies.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                grid,
                block,
                shared_mem_bytes,
                std::ptr::null_mut(),
                args,
            )
        }
        .map_err(|e| driver_err(&format!("launch of {name}"), e))
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| driver_err("synchronize", e))
    }
}
