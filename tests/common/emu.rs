//! Helpers of the kernel tests that run the CUDA device in the emulator
//! against the CPU device.

use super::max_rel_err;
use engine::backend::cpu::Cpu;
use engine::backend::cuda::driver::Emu;
use engine::backend::cuda::Cuda;
use engine::backend::Backend;
use engine::tensor::DType::{self, F32};
use engine::tensor::Tensor;
use rand::rngs::StdRng;
use rand::Rng;

pub fn gpu() -> Cuda<Emu> {
    Cuda::new(Emu::new())
}

/// Random values already representable in bf16, so both devices see the
/// same inputs.
pub fn data(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| half::bf16::from_f32(rng.random_range(-scale..scale)).to_f32())
        .collect()
}

/// One tensor on each device: the CPU's in f32, the GPU's in its own type.
pub struct Pair {
    pub cpu: Tensor<Cpu>,
    pub gpu: Tensor<Cuda<Emu>>,
}

pub fn pair(g: &Cuda<Emu>, v: &[f32], shape: &[usize], dtype: DType) -> Pair {
    Pair {
        cpu: Cpu.upload(v.to_vec(), shape, F32).unwrap(),
        gpu: g.upload(v.to_vec(), shape, dtype).unwrap(),
    }
}

/// An output pair, the GPU side NaN so that elements a kernel skips show.
pub fn poisoned(g: &Cuda<Emu>, shape: &[usize], dtype: DType) -> Pair {
    let n = shape.iter().product();
    Pair {
        cpu: Cpu.zeros(shape, F32).unwrap(),
        gpu: g.upload(vec![f32::NAN; n], shape, dtype).unwrap(),
    }
}

/// The GPU side within `tol` of the CPU side (max error relative to the
/// largest CPU value).
pub fn check(what: &str, g: &Cuda<Emu>, o: &Pair, tol: f32) {
    let want = Cpu.download(&o.cpu).unwrap();
    let got = g.download(&o.gpu).unwrap();
    let err = max_rel_err(&got, &want);
    assert!(err <= tol, "{what}: max relative error {err:e} > {tol:e}");
}
