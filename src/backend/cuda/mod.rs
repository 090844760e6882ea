//! The CUDA device (being built): kernels from kernels/*.cu, compiled by NVRTC
//! for a real GPU or by the host C++ compiler for the CPU emulator.

#[cfg(feature = "emu")]
pub mod emu;
