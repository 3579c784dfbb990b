//! Small buffer helpers shared by the executor and tests: create storage buffers, upload
//! slices, and read buffers back asynchronously (natively by polling the device, in the
//! browser by awaiting the mapping callback).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{Error, Result};

/// Usage of buffers the kernels read and write, which tests and the engine also fill and read.
/// UNIFORM too: CPU drivers read a matvec's x faster as a uniform (see `Tuning::uniform_x`).
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::UNIFORM)
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// A storage buffer holding `data`. Empty data gets one zero word (bindings cannot be empty).
pub fn upload<T: bytemuck::Pod>(ctx: &GpuContext, label: &str, data: &[T]) -> wgpu::Buffer {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let padded;
    let contents = if !bytes.len().is_multiple_of(4) || bytes.is_empty() {
        let mut v = bytes.to_vec();
        v.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
        padded = v;
        &padded[..]
    } else {
        bytes
    };
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: STORAGE,
        })
}

/// An uninitialised (zeroed) storage buffer of `bytes` bytes, rounded up to whole words.
pub fn storage(ctx: &GpuContext, label: &str, bytes: u64) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes.div_ceil(4).max(1) * 4,
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

type MapSlot = Arc<
    Mutex<(
        Option<std::result::Result<(), wgpu::BufferAsyncError>>,
        Option<Waker>,
    )>,
>;

/// Completes when the map callback has run.
struct MapFuture(MapSlot);

impl Future for MapFuture {
    type Output = std::result::Result<(), wgpu::BufferAsyncError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = match self.0.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        match slot.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                slot.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Copies `bytes` bytes from the start of `buffer` (a multiple of 4) to the CPU.
/// Also reports any device error raised by earlier work.
pub async fn read_bytes(ctx: &GpuContext, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
    // wgpu does not expose labels, so errors name the buffer by its size.
    let label = format!("of {} bytes", buffer.size());
    if bytes == 0 {
        return Ok(Vec::new());
    }
    if !bytes.is_multiple_of(4) || bytes > buffer.size() {
        return Err(Error::Readback {
            buffer: label,
            reason: format!(
                "cannot read {bytes} bytes of a {}-byte buffer",
                buffer.size()
            ),
        });
    }
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("readback"),
        size: bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("readback"),
        });
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
    ctx.queue.submit([encoder.finish()]);

    let slot: MapSlot = Arc::new(Mutex::new((None, None)));
    let sink = slot.clone();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let mut s = match sink.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.0 = Some(r);
        if let Some(w) = s.1.take() {
            w.wake();
        }
    });
    // Natively nothing runs the callback unless the device is polled; in the browser the
    // event loop does, and poll is a no-op.
    #[cfg(not(target_arch = "wasm32"))]
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Device(e.to_string()))?;
    MapFuture(slot).await.map_err(|e| Error::Readback {
        buffer: label.clone(),
        reason: e.to_string(),
    })?;
    ctx.check()?;
    let view = staging.get_mapped_range(..).map_err(|e| Error::Readback {
        buffer: label,
        reason: e.to_string(),
    })?;
    let out = view.to_vec();
    drop(view);
    staging.unmap();
    Ok(out)
}

/// Reads `n` f32 values from the start of `buffer`.
pub async fn read_f32(ctx: &GpuContext, buffer: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
    let bytes = read_bytes(ctx, buffer, n as u64 * 4).await?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads `n` u32 values from the start of `buffer`.
pub async fn read_u32(ctx: &GpuContext, buffer: &wgpu::Buffer, n: usize) -> Result<Vec<u32>> {
    let bytes = read_bytes(ctx, buffer, n as u64 * 4).await?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
