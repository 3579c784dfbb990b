//! Device setup, kept apart from the work: a [`GpuContext`] owns the adapter, device and queue
//! and is passed by reference to everything that uploads, encodes or reads back.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// An opened GPU device and what is known about it.
pub struct GpuContext {
    pub instance: wgpu::Instance,
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// Name, backend and type (a `Cpu` adapter such as lavapipe gets barrier-free kernels).
    pub info: wgpu::AdapterInfo,
    /// The limits the device was created with.
    pub limits: wgpu::Limits,
    /// First uncaptured device error, surfaced by [`GpuContext::check`] instead of a panic.
    errors: Arc<Mutex<Option<String>>>,
}

impl GpuContext {
    /// Opens the default adapter (high performance preferred) and a device on it.
    ///
    /// The device is first requested with default limits (portable), then, if the adapter
    /// refuses those, with the adapter's own limits: some adapters (older mobile GPUs,
    /// SwiftShader configurations) offer less than the defaults.
    pub async fn new() -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter(e.to_string()))?;
        Self::from_adapter(instance, adapter).await
    }

    /// Opens a device on a chosen adapter.
    pub async fn from_adapter(instance: wgpu::Instance, adapter: wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        let adapter_limits = adapter.limits();
        // Large weight tensors want big storage bindings: ask for the defaults plus the
        // adapter's buffer sizes, and fall back to the adapter's limits wholesale.
        let wanted = wgpu::Limits {
            max_storage_buffer_binding_size: adapter_limits.max_storage_buffer_binding_size,
            max_buffer_size: adapter_limits.max_buffer_size,
            max_uniform_buffer_binding_size: adapter_limits.max_uniform_buffer_binding_size,
            ..Default::default()
        };
        let mut last_error = String::new();
        // Timestamp queries where offered: the benchmark times kernels with them.
        let features = adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        for limits in [wanted, adapter_limits] {
            let desc = wgpu::DeviceDescriptor {
                label: Some("mdi"),
                required_features: features,
                required_limits: limits.clone(),
                ..Default::default()
            };
            match adapter.request_device(&desc).await {
                Ok((device, queue)) => {
                    let errors = Arc::new(Mutex::new(None));
                    let sink = errors.clone();
                    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                        if let Ok(mut slot) = sink.lock() {
                            slot.get_or_insert_with(|| e.to_string());
                        }
                    }));
                    return Ok(GpuContext {
                        instance,
                        adapter,
                        device,
                        queue,
                        info,
                        limits,
                        errors,
                    });
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(Error::RequestDevice {
            adapter: info.name,
            reason: last_error,
        })
    }

    /// Whether the adapter is a CPU implementation (lavapipe, SwiftShader reported as CPU).
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Largest byte size one storage binding (and so one weight part) may have.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Returns the first device error reported since the last check, if any.
    pub fn check(&self) -> Result<()> {
        let taken = match self.errors.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        match taken {
            Some(e) => Err(Error::Device(e)),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("device_type", &self.info.device_type)
            .finish()
    }
}
