//! GPU executor at kernel level: device setup ([`GpuContext`]), weights kept quantized in GPU
//! memory ([`GpuWeight`], repacked by [`layout`]), and the WGSL kernels of `mdi-shaders` turned
//! into [`Dispatch`]es by [`Kernels`]. Runs natively through wgpu (Vulkan, Metal, DX12) and in
//! the browser through WebGPU; nothing here blocks except the native readback poll.
//! [`GpuEngine`] runs a ring node's stage with them, behind the same contract as the CPU oracle.

#[cfg(not(target_arch = "wasm32"))]
pub mod bench;
pub mod buffers;
pub mod context;
pub mod engine;
pub mod error;
pub mod kernels;
pub mod launch;
pub mod layout;
pub mod weights;

pub use context::GpuContext;
pub use engine::{GpuCache, GpuEngine};
pub use error::{Error, Result};
pub use kernels::{
    encode, rope_table, submit, AttentionShape, Dispatch, Kernels, KvBuffers, Product, RopeTable,
    Split, Tuning, P0_PARAM_OFFSET,
};
pub use mdi_shaders::{RopeLayout, Strategy, Variant, WeightFormat};
pub use weights::{GpuWeight, WeightPart};
pub use wgpu;
