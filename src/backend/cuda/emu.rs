//! The CPU emulator of the CUDA execution model (kernels/emu), compiled by
//! build.rs from the same kernels/*.cu sources NVRTC compiles for a GPU.
//!
//! Kernels are launched by name with cuLaunchKernel's argument array. Device
//! memory is host memory: pointers in the arguments are host addresses. A
//! launch runs to completion before it returns; launches are serialized.
//! Failures inside a kernel — a deadlock, a divergent `__syncthreads`, a warp
//! shuffle some of whose lanes never arrive, `__trap()` — come back as
//! [`Error::Invalid`] naming the kernel and the block, never as a hang.
//!
//! Lane order: `ENGINE_EMU_REVERSE_LANES=1` in the environment (read at the
//! first launch, unless [`set_reverse_lanes`] was called before) makes every
//! launch run the threads of each warp, and the blocks, in reverse order, to
//! shake out code that relies on lane order.

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};

extern "C" {
    fn emu_launch(
        name: *const c_char,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        smem_bytes: c_uint,
        args: *mut *mut c_void,
        nargs: c_int,
        lane_order: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn emu_has_kernel(name: *const c_char) -> c_int;
    fn emu_kernel_param_count(name: *const c_char) -> c_int;
    fn emu_kernel_count() -> usize;
    fn emu_kernel_name(i: usize) -> *const c_char;
    fn emu_set_reverse_lanes(on: c_int);
    fn emu_reverse_lanes() -> c_int;
    fn emu_set_workers(n: c_int);
    fn emu_workers() -> c_int;
}

/// The order in which a launch runs the threads of each warp and the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneOrder {
    /// The process-wide setting ([`set_reverse_lanes`], or the environment).
    Default,
    Forward,
    Reverse,
}

/// Launches kernel `name` on `grid` blocks of `block` threads with
/// `shared_mem_bytes` of dynamic shared memory, and waits for it.
///
/// `args` is cuLaunchKernel's `kernelParams`: `args[i]` points to the value
/// of the kernel's i-th parameter. Their number is checked against the
/// kernel's; their types are not.
///
/// # Safety
/// Each `args[i]` must point to a live value of exactly the type of the
/// kernel's i-th parameter, and every pointer among those values must be
/// valid, for the whole launch, for all the reads and writes the kernel does
/// with this grid and these arguments (as on a GPU, but here an out-of-bounds
/// access is undefined behaviour in this process).
pub unsafe fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_mem_bytes: u32,
    args: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        launch_ordered(
            name,
            grid,
            block,
            shared_mem_bytes,
            args,
            LaneOrder::Default,
        )
    }
}

/// [`launch`] with an explicit lane order for this launch only (tests that
/// compare both orders use this rather than the process-wide switch, which
/// other threads may be using).
///
/// # Safety
/// As for [`launch`].
pub unsafe fn launch_ordered(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_mem_bytes: u32,
    args: &mut [*mut c_void],
    order: LaneOrder,
) -> Result<()> {
    let cname = c_name(name)?;
    let nargs = c_int::try_from(args.len())
        .map_err(|_| Error::Invalid(format!("kernel {name}: too many arguments")))?;
    let order = match order {
        LaneOrder::Default => -1,
        LaneOrder::Forward => 0,
        LaneOrder::Reverse => 1,
    };
    let mut err = vec![0u8; 2048];
    // SAFETY: cname is NUL-terminated; `args` has `nargs` entries, which the
    // emulator checks against the kernel's parameter count before reading
    // them; the values they point to are the caller's contract; `err` is a
    // writable buffer of the given length.
    let rc = unsafe {
        emu_launch(
            cname.as_ptr(),
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            shared_mem_bytes,
            args.as_mut_ptr(),
            nargs,
            order,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let msg = CStr::from_bytes_until_nul(&err)
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("kernel {name}: launch failed"));
    Err(Error::Invalid(format!("CUDA emulator: {msg}")))
}

/// Whether the emulator has a kernel (an `extern "C" __global__` function of
/// kernels/*.cu or kernels/emu/selftest.cu) named `name`.
pub fn has_kernel(name: &str) -> bool {
    match CString::new(name) {
        // SAFETY: a NUL-terminated string.
        Ok(c) => unsafe { emu_has_kernel(c.as_ptr()) != 0 },
        Err(_) => false,
    }
}

/// The number of parameters of kernel `name`, if the emulator has it.
pub fn param_count(name: &str) -> Option<usize> {
    let c = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string.
    let n = unsafe { emu_kernel_param_count(c.as_ptr()) };
    usize::try_from(n).ok()
}

/// The names of all kernels the emulator can launch, sorted.
pub fn kernel_names() -> Vec<String> {
    // SAFETY: no arguments.
    let n = unsafe { emu_kernel_count() };
    (0..n)
        .filter_map(|i| {
            // SAFETY: i < n; the emulator returns a static NUL-terminated
            // string or null.
            let p = unsafe { emu_kernel_name(i) };
            // SAFETY: non-null pointers from emu_kernel_name are valid C strings.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        })
        .collect()
}

/// Runs later launches (that do not choose their own [`LaneOrder`]) with the
/// threads of each warp, and the blocks, in reverse order. Overrides
/// `ENGINE_EMU_REVERSE_LANES`.
pub fn set_reverse_lanes(on: bool) {
    // SAFETY: plain setter.
    unsafe { emu_set_reverse_lanes(c_int::from(on)) }
}

/// Whether launches run in reverse lane order by default.
pub fn reverse_lanes() -> bool {
    // SAFETY: plain getter.
    unsafe { emu_reverse_lanes() != 0 }
}

/// Sets the number of worker threads that run blocks in parallel (0: one per
/// hardware thread, the default).
pub fn set_workers(n: usize) {
    let n = c_int::try_from(n).unwrap_or(c_int::MAX);
    // SAFETY: plain setter.
    unsafe { emu_set_workers(n) }
}

/// The number of worker threads launches use.
pub fn workers() -> usize {
    // SAFETY: plain getter.
    unsafe { emu_workers() as usize }
}

fn c_name(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| Error::Invalid(format!("kernel name {name:?} contains NUL")))
}
