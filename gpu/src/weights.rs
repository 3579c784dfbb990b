//! Weight matrices resident in GPU memory, still quantized: repacked (see [`crate::layout`])
//! and split by rows into parts that each fit one storage binding.

use mdi_core::quant::DType;
use mdi_shaders::WeightFormat;
use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::layout::{packed_shape, repack, split_rows, weight_format};

/// A row range of a weight matrix in its own buffer.
#[derive(Debug)]
pub struct WeightPart {
    /// First matrix row held.
    pub row_start: u32,
    /// Rows held.
    pub rows: u32,
    /// vec4 index where the quant bytes start (the kernels' `q_offset`).
    pub q_offset: u32,
    pub buffer: wgpu::Buffer,
}

/// A (rows, cols) weight matrix (y = W·x: rows are outputs) on the GPU.
#[derive(Debug)]
pub struct GpuWeight {
    pub name: String,
    pub dtype: DType,
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<WeightPart>,
}

impl GpuWeight {
    /// Uploads the raw (GGML block layout) bytes of a matrix, split so that every part fits
    /// the device's storage-binding limit.
    pub fn upload(
        ctx: &GpuContext,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        raw: &[u8],
    ) -> Result<Self> {
        Self::upload_with_part_limit(ctx, name, dtype, rows, cols, raw, ctx.max_binding_bytes())
    }

    /// Like [`GpuWeight::upload`] with an explicit byte limit per part (tests use a small one
    /// to exercise splitting); it is clamped to the device's own limit.
    pub fn upload_with_part_limit(
        ctx: &GpuContext,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        raw: &[u8],
        max_part_bytes: u64,
    ) -> Result<Self> {
        let limit = max_part_bytes.min(ctx.max_binding_bytes());
        if rows > u32::MAX as usize || cols > u32::MAX as usize {
            return Err(Error::tensor(
                name,
                format!("shape ({rows}, {cols}) is too large"),
            ));
        }
        let ranges = split_rows(name, dtype, rows, cols, limit)?;
        if dtype.bytes_for(rows * cols) != Some(raw.len()) {
            return Err(Error::tensor(
                name,
                format!(
                    "{dtype} ({rows}, {cols}) but {} bytes were given",
                    raw.len()
                ),
            ));
        }
        let row_bytes = raw.len() / rows;
        let mut parts = Vec::with_capacity(ranges.len());
        for r in ranges {
            let words = repack(
                name,
                dtype,
                &raw[r.start * row_bytes..r.end * row_bytes],
                r.len(),
                cols,
            )?;
            let buffer = ctx
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(&format!("{name}[{}..{}]", r.start, r.end)),
                    contents: bytemuck::cast_slice(&words),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                });
            parts.push(WeightPart {
                row_start: r.start as u32,
                rows: r.len() as u32,
                q_offset: packed_shape(dtype, r.len(), cols).q_offset as u32,
                buffer,
            });
        }
        Ok(GpuWeight {
            name: name.to_string(),
            dtype,
            format: weight_format(dtype),
            rows,
            cols,
            parts,
        })
    }
}
