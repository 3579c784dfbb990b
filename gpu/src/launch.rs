//! What each kernel launch of the engine is for and what it moves and computes, so the
//! benchmark can attribute the time of a decode step to roles and compare each role's achieved
//! GB/s and GFLOP/s with the adapter's probes. The engine only tags its launches; the tables
//! live in [`crate::bench`].

use crate::kernels::Dispatch;

/// What a kernel launch is for, so the benchmark can attribute time to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelRole {
    Embed,
    AttnNorm,
    Qkv,
    Bias,
    Rope,
    KvWrite,
    Attention,
    AttnOut,
    FfnNorm,
    GateUp,
    Swiglu,
    Down,
    HeadNorm,
    Head,
    Argmax,
}

impl KernelRole {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            KernelRole::Embed => "embed",
            KernelRole::AttnNorm => "attn rmsnorm",
            KernelRole::Qkv => "q/k/v matvec",
            KernelRole::Bias => "q/k/v bias",
            KernelRole::Rope => "rope",
            KernelRole::KvWrite => "kv write",
            KernelRole::Attention => "attention",
            KernelRole::AttnOut => "attn out matvec",
            KernelRole::FfnNorm => "ffn rmsnorm",
            KernelRole::GateUp => "gate/up matvec",
            KernelRole::Swiglu => "swiglu",
            KernelRole::Down => "down matvec",
            KernelRole::HeadNorm => "final rmsnorm",
            KernelRole::Head => "LM head matvec",
            KernelRole::Argmax => "argmax",
        }
    }
}

/// One recorded launch plus what it moves and computes (for achieved GB/s and GFLOP/s).
#[derive(Debug)]
// Only the native benchmark reads the cost fields.
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
pub(crate) struct Step {
    pub d: Dispatch,
    pub role: KernelRole,
    /// Bytes read and written (whole operation on the first dispatch of a split weight).
    pub bytes: u64,
    pub flops: u64,
}

pub(crate) fn steps(ds: Vec<Dispatch>, role: KernelRole, bytes: u64, flops: u64) -> Vec<Step> {
    ds.into_iter()
        .enumerate()
        .map(|(i, d)| {
            let first = i == 0;
            Step {
                d,
                role,
                bytes: if first { bytes } else { 0 },
                flops: if first { flops } else { 0 },
            }
        })
        .collect()
}

pub(crate) fn step(d: Dispatch, role: KernelRole, bytes: u64, flops: u64) -> Step {
    Step {
        d,
        role,
        bytes,
        flops,
    }
}
