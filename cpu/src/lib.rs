//! The fast CPU engine of a ring node: [`CpuEngine`] implements the engine contract
//! ([`mdi_core::StageEngine`]) for devices without a usable GPU, natively and in wasm32.
//!
//! - Weights stay in their stored blocks (F32, F16, BF16, Q8_0, Q4_0, Q4_1) and are
//!   dequantized inside the dot product, so a node holds about its share of the file.
//! - [`kernels`]: SIMD kernels chosen at run time (AVX-512, AVX2 on x86_64; NEON on aarch64;
//!   `simd128` on wasm32 when built with it) over a scalar reference, f32 accumulation.
//! - Threads natively: a pool made once with the engine splits matrix rows and attention
//!   heads; wasm runs single-threaded.
//! - Batches: several sequences' rows (and a prefill's whole prompt) pass each weight matrix
//!   together, each sequence with its own KV cache and positions.
//!
//! The CPU oracle (`mdi_core::Oracle`) stays the plain reference this engine is tested
//! against.

pub mod engine;
pub mod kernels;
pub mod matrix;
mod pool;

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;

pub use engine::{CpuCache, CpuEngine};
pub use kernels::{Isa, Kernels};
