//! The one error type of the GPU crate. Variants say which kernel, tensor or limit was involved
//! and, where a user can act, what to do.

/// Errors from device setup, weight upload, kernel encoding and readback.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No WebGPU/Vulkan/Metal/DX12 adapter could be found.
    #[error(
        "no GPU adapter found ({0}); natively install a Vulkan driver (on Debian: \
         `apt-get install mesa-vulkan-drivers libvulkan1` gives the lavapipe CPU driver), in a \
         browser use one with WebGPU enabled (Chrome/Edge 113+, or `--enable-unsafe-webgpu`)"
    )]
    NoAdapter(String),
    /// The adapter refused to create a device, even with its own limits.
    #[error("adapter `{adapter}` refused a device: {reason}")]
    RequestDevice { adapter: String, reason: String },
    /// A tensor's shape or type cannot be used by a kernel.
    #[error("tensor `{tensor}`: {reason}")]
    Tensor { tensor: String, reason: String },
    /// A kernel was given sizes, offsets or buffers that do not fit together.
    #[error("{kernel}: {reason}")]
    Args {
        kernel: &'static str,
        reason: String,
    },
    /// A dispatch would exceed a device limit.
    #[error("{what} needs {needed} but the device allows {limit}")]
    Limit {
        what: String,
        needed: u64,
        limit: u64,
    },
    /// Mapping a buffer for readback failed.
    #[error("reading back a buffer {buffer}: {reason}")]
    Readback { buffer: String, reason: String },
    /// The device reported an error (validation, out of memory, device lost).
    #[error("GPU device error: {0}")]
    Device(String),
}

/// Result alias for the GPU crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn args(kernel: &'static str, reason: impl Into<String>) -> Self {
        Error::Args {
            kernel,
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(tensor: &str, reason: impl Into<String>) -> Self {
        Error::Tensor {
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }
}
