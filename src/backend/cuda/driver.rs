//! The seam between the CUDA device and what runs its kernels: a real GPU
//! through cudarc, or the CPU emulator (kernels/emu). Everything above this
//! trait is the same code for both.

use crate::error::Result;
use std::ffi::c_void;

/// A device address (on the emulator: a host address).
pub type DevicePtr = u64;

pub trait GpuDriver: Send + Sync + 'static {
    /// Human-readable name, for messages.
    fn name(&self) -> String;

    fn alloc(&self, bytes: usize) -> Result<DevicePtr>;

    /// # Safety
    /// `ptr` came from `alloc` of this driver and is not used afterwards.
    unsafe fn free(&self, ptr: DevicePtr);

    /// # Safety
    /// `dst..dst+src.len()` lies inside one live allocation.
    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<()>;

    /// # Safety
    /// `src..src+dst.len()` lies inside one live allocation.
    unsafe fn download(&self, dst: &mut [u8], src: DevicePtr) -> Result<()>;

    /// # Safety
    /// Both ranges lie inside live allocations and do not overlap.
    unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()>;

    /// Fills `bytes` bytes at `dst` with zero.
    ///
    /// # Safety
    /// The range lies inside one live allocation.
    unsafe fn zero(&self, dst: DevicePtr, bytes: usize) -> Result<()>;

    /// Launches kernel `name` (an `extern "C" __global__` entry point of
    /// kernels/*.cu); `args[i]` points at the value of its i-th parameter, as
    /// for cuLaunchKernel.
    ///
    /// # Safety
    /// The argument types and count match the kernel's parameters, and every
    /// pointer argument addresses live allocations large enough for what the
    /// kernel touches with this grid and block.
    unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<()>;

    /// Waits for all launched work.
    fn synchronize(&self) -> Result<()>;
}

/// The CPU emulator: device memory is host memory, kernels run as fibers.
#[cfg(feature = "emu")]
pub struct Emu {
    // Live allocations and their layouts, so `free` can return them.
    allocs: std::sync::Mutex<std::collections::HashMap<DevicePtr, std::alloc::Layout>>,
    // The lane order of every launch.
    order: super::emu::LaneOrder,
}

#[cfg(feature = "emu")]
impl Emu {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self::with_lane_order(super::emu::LaneOrder::Default)
    }

    /// An emulator whose launches all run in `order`, whatever the
    /// process-wide setting: a test can run an op through the `Backend`
    /// in both orders side by side.
    pub fn with_lane_order(order: super::emu::LaneOrder) -> Self {
        Emu {
            allocs: Default::default(),
            order,
        }
    }
}

#[cfg(feature = "emu")]
impl GpuDriver for Emu {
    fn name(&self) -> String {
        "CUDA emulator (CPU)".into()
    }

    fn alloc(&self, bytes: usize) -> Result<DevicePtr> {
        // 256-byte alignment, like cudaMalloc; never zero-sized.
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), 256)
            .map_err(|e| crate::Error::Invalid(format!("allocation of {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(crate::Error::Invalid(format!(
                "out of memory allocating {bytes} bytes"
            )));
        }
        self.allocs.lock().unwrap().insert(ptr as DevicePtr, layout);
        Ok(ptr as DevicePtr)
    }

    unsafe fn free(&self, ptr: DevicePtr) {
        if let Some(layout) = self.allocs.lock().unwrap().remove(&ptr) {
            // SAFETY: allocated by `alloc` above with this layout.
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }

    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn download(&self, dst: &mut [u8], src: DevicePtr) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    unsafe fn zero(&self, dst: DevicePtr, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { super::emu::launch_ordered(name, grid, block, shared_mem_bytes, args, self.order) }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(()) // launches run to completion before they return
    }
}
