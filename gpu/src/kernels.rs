//! Kernel-level executor: compiles each [`Variant`] once (pipelines cached by its key) and
//! turns buffers plus sizes into [`Dispatch`]es, after checking that every index the kernel
//! will touch lies inside its buffer (WGSL clamps out-of-bounds accesses silently, so a wrong
//! size would otherwise give wrong numbers instead of an error).
//!
//! A `Dispatch` owns its bind group and parameter buffer, so the engine can build the
//! dispatches of a layer once and replay them; tests build, run and read back.
//! Buffers are bound whole; offsets into them are element offsets in the parameters, which
//! avoids the binding-offset alignment rules. The one exception is the uniform window through
//! which CPU adapters read a product's input ([`Tuning::uniform_x`]): at most 64 KiB, bound
//! from an aligned offset, with the rest of the offset in the parameters.
//!
//! Why the CPU variants look as they do (lavapipe, Mesa 22): every storage-buffer load is a
//! loop over the SIMD lanes, one scalar per lane and component, so the number of loaded
//! components bounds a kernel; uniform loads at a lane-uniform index are one load and a
//! broadcast (other uniform loads a vector gather); barriers split a shader into coroutines; and
//! private arrays indexed by loop counters live in memory, so the hot loops are written out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mdi_shaders::{
    render, RopeLayout, Strategy, Variant, MATVEC_ROWS_PER_THREAD, MAX_ATTENTION_GROUP,
    MAX_ATTENTION_GROUP_DIM, MAX_ATTENTION_SPLITS, MAX_HEAD_DIM, MAX_X_WINDOW,
};
use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::weights::GpuWeight;

/// Which variant of each kernel to run: barrier-free kernels for CPU adapters, workgroup
/// reductions for real GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Row mapping of matvec and RMSNorm.
    pub strategy: Strategy,
    /// Workgroup size of elementwise kernels and of row-per-thread kernels.
    pub wg: u32,
    /// Workgroup size of row-per-workgroup reductions.
    pub reduce_wg: u32,
    /// Workgroup size of attention (positions scored per step; with `RowPerThread`, (token,
    /// KV head) pairs per workgroup).
    pub attention_wg: u32,
    /// Workgroup size of argmax.
    pub argmax_wg: u32,
    /// Workgroup size of row-per-thread matvec (small, so short matrices still make several
    /// workgroups for a CPU driver's threads).
    pub matvec_wg: u32,
    /// Position splits of decode attention with row-per-thread kernels (1: one pass).
    pub attention_splits: u32,
    /// Bind matvec's x as a uniform where possible (CPU drivers load uniforms at a uniform
    /// index once per SIMD group instead of lane by lane).
    pub uniform_x: bool,
}

impl Tuning {
    /// For CPU drivers (lavapipe): a few rows per invocation, no barriers, inputs of products
    /// read as uniforms, decode attention split over positions.
    pub const CPU: Tuning = Tuning {
        strategy: Strategy::RowPerThread,
        wg: 64,
        reduce_wg: 64,
        attention_wg: 8,
        argmax_wg: 64,
        matvec_wg: 16,
        attention_splits: 16,
        uniform_x: true,
    };

    /// For GPUs: cooperative rows.
    pub const GPU: Tuning = Tuning {
        strategy: Strategy::RowPerWorkgroup,
        wg: 64,
        reduce_wg: 64,
        attention_wg: 64,
        argmax_wg: 256,
        matvec_wg: 64,
        attention_splits: 1,
        uniform_x: false,
    };

    /// Picks by adapter type, with workgroups clamped to the device's invocation limit.
    pub fn for_context(ctx: &GpuContext) -> Tuning {
        let t = if ctx.is_cpu() {
            Tuning::CPU
        } else {
            Tuning::GPU
        };
        let max = ctx.limits.max_compute_invocations_per_workgroup.max(1);
        // Largest power of two not above the limit.
        let cap = 1u32 << (31 - max.leading_zeros());
        Tuning {
            wg: t.wg.min(cap),
            reduce_wg: t.reduce_wg.min(cap),
            attention_wg: t.attention_wg.min(cap),
            argmax_wg: t.argmax_wg.min(cap),
            matvec_wg: t.matvec_wg.min(cap),
            ..t
        }
    }
}

/// One recorded kernel launch: pipeline, bindings, parameters and grid.
#[derive(Debug)]
pub struct Dispatch {
    /// The variant key, for profiling and error messages.
    pub key: String,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    /// The uniform parameter buffer (binding 0); rewrite it to change sizes or positions.
    pub params: wgpu::Buffer,
    pub workgroups: [u32; 3],
}

impl Dispatch {
    /// Records the launch into a compute pass.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }
}

/// Records `dispatches` in order into one compute pass (wgpu orders dependent dispatches).
pub fn encode(encoder: &mut wgpu::CommandEncoder, dispatches: &[Dispatch]) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("mdi kernels"),
        timestamp_writes: None,
    });
    for d in dispatches {
        d.record(&mut pass);
    }
}

/// Encodes and submits `dispatches` (does not wait).
pub fn submit(ctx: &GpuContext, dispatches: &[Dispatch]) {
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("mdi") });
    encode(&mut encoder, dispatches);
    ctx.queue.submit([encoder.finish()]);
}

/// Inputs and output of a matrix product with a [`GpuWeight`]: Y (+)= X·Wᵀ.
#[derive(Debug, Clone, Copy)]
pub struct Product<'a> {
    /// (n_tokens, cols) f32 from `x_offset` (a multiple of 4).
    pub x: &'a wgpu::Buffer,
    pub x_offset: u32,
    pub n_tokens: u32,
    /// (n_tokens, y_stride) f32 from `y_offset`; row r of W lands in column r.
    pub y: &'a wgpu::Buffer,
    pub y_offset: u32,
    /// Elements between tokens in `y` (at least the weight's rows).
    pub y_stride: u32,
    /// Add to `y` instead of overwriting it (fuses the residual add).
    pub accumulate: bool,
}

/// Head counts and cache size of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    /// Positions one sequence's cache holds.
    pub max_positions: u32,
}

/// One layer's KV cache of one sequence: two buffers of (n_kv_heads, max_positions, head_dim)
/// f32 starting at element `offset`.
#[derive(Debug, Clone, Copy)]
pub struct KvBuffers<'a> {
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub offset: u32,
}

/// Precomputed RoPE angles on the GPU: (max_positions, head_dim/2) pairs of (cos, sin).
#[derive(Debug)]
pub struct RopeTable {
    pub buffer: wgpu::Buffer,
    pub head_dim: u32,
    pub max_positions: u32,
}

/// The RoPE table on the CPU: for position p and pair i < head_dim/2, (cos, sin) of
/// p·base^(−2i/head_dim), computed in f64 and rounded once.
pub fn rope_table(head_dim: usize, base: f64, max_positions: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(max_positions * half * 2);
    for p in 0..max_positions {
        for i in 0..half {
            let theta = base.powf(-2.0 * i as f64 / head_dim as f64);
            let (s, c) = (p as f64 * theta).sin_cos();
            out.push(c as f32);
            out.push(s as f32);
        }
    }
    out
}

impl RopeTable {
    /// Uploads the table for `max_positions` positions.
    pub fn new(ctx: &GpuContext, head_dim: u32, base: f64, max_positions: u32) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::args(
                "rope",
                format!("head_dim {head_dim} must be even"),
            ));
        }
        let data = rope_table(head_dim as usize, base, max_positions as usize);
        let bytes = data.len() as u64 * 4;
        if bytes > ctx.max_binding_bytes() {
            return Err(Error::Limit {
                what: format!("RoPE table for {max_positions} positions"),
                needed: bytes,
                limit: ctx.max_binding_bytes(),
            });
        }
        Ok(RopeTable {
            buffer: crate::buffers::upload(ctx, "rope table", &data),
            head_dim,
            max_positions,
        })
    }
}

// Parameter blocks, laid out exactly as the `Params` structs of the WGSL files.

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ProductParams {
    rows: u32,
    cols: u32,
    q_offset: u32,
    x_offset: u32,
    y_offset: u32,
    // matvec: accumulate, split_row, split_offset; matmul: y_stride, n_tokens, accumulate.
    a: u32,
    b: u32,
    c: u32,
    // matvec: split2_row, split2_offset, pad...;
    // matmul: split_row, split_offset, split2_row, split2_offset, split_stride, split2_stride.
    d: [u32; 8],
}

/// Where the rows of a stacked weight from `row` on go: to `y_offset`, `y_stride` elements
/// between tokens (in place of the product's `y_offset` and `y_stride`), so matrices stacked in
/// one weight (FFN gate and up; Q, K and V) are computed by one dispatch into their own
/// regions. Up to [`MAX_SPLITS`] per product, in increasing `row`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub row: u32,
    pub y_offset: u32,
    pub y_stride: u32,
}

/// Most [`Split`]s of one product.
pub const MAX_SPLITS: usize = 2;

/// (split_row, split_offset, stride) of a part whose first row is `row_start`, with the
/// offsets moved on by `t_start` tokens (a token chunk's start). Unused entries never apply.
fn split_params(splits: &[Split], row_start: u32, t_start: u32) -> [(u32, u32, u32); MAX_SPLITS] {
    let mut out = [(u32::MAX, 0, 0); MAX_SPLITS];
    for (o, s) in out.iter_mut().zip(splits) {
        let sr = s.row.saturating_sub(row_start);
        let offset = s.y_offset + (row_start + sr - s.row) + t_start * s.y_stride;
        *o = (sr, offset, s.y_stride);
    }
    out
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    n_tokens: u32,
    cols: u32,
    q_offset: u32,
    row_start: u32,
    rows: u32,
    out_offset: u32,
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    n_rows: u32,
    n: u32,
    eps: f32,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    n_tokens: u32,
    n_heads: u32,
    head_dim: u32,
    x_offset: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct KvWriteParams {
    n_tokens: u32,
    n_kv_heads: u32,
    head_dim: u32,
    max_positions: u32,
    p0: u32,
    cache_offset: u32,
    src_offset: u32,
    v_src_offset: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttentionParams {
    n_tokens: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    p0: u32,
    max_positions: u32,
    cache_offset: u32,
    scale: f32,
}

/// Byte offset of `p0` (the first new token's position) in the parameters of both
/// [`Kernels::kv_write`] and [`Kernels::attention`] dispatches. An engine replays those
/// dispatches at the next position by copying one word there (`copy_buffer_to_buffer` inside
/// its command encoder) instead of rebuilding bind groups every token.
pub const P0_PARAM_OFFSET: u64 = std::mem::offset_of!(AttentionParams, p0) as u64;

const _: () =
    assert!(std::mem::offset_of!(KvWriteParams, p0) == std::mem::offset_of!(AttentionParams, p0));

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CountParams {
    n: u32,
    offset: u32,
    pad: [u32; 2],
}

/// Fails unless `buffer` holds `elems` 4-byte elements.
fn need(kernel: &'static str, what: &str, buffer: &wgpu::Buffer, elems: u64) -> Result<()> {
    if elems * 4 > buffer.size() {
        return Err(Error::args(
            kernel,
            format!(
                "{what} needs {elems} elements ({} bytes) but its buffer has {} bytes",
                elems * 4,
                buffer.size()
            ),
        ));
    }
    Ok(())
}

/// Sum of u32 sizes in u64, so checks cannot overflow.
fn extent(offset: u32, count: u64) -> u64 {
    offset as u64 + count
}

/// Compiled pipelines plus the tuning that picks variants.
#[derive(Debug)]
pub struct Kernels {
    pub tuning: Tuning,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
}

impl Kernels {
    /// Kernels tuned for the context's adapter.
    pub fn new(ctx: &GpuContext) -> Self {
        Self::with_tuning(Tuning::for_context(ctx))
    }

    /// Kernels with explicit variant choices (tests run both strategies on one device).
    pub fn with_tuning(tuning: Tuning) -> Self {
        Kernels {
            tuning,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    /// The pipeline of `variant`, compiled on first use.
    pub fn pipeline(
        &self,
        ctx: &GpuContext,
        variant: &Variant,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if !variant.is_valid() {
            return Err(Error::args(
                variant.kernel().name(),
                format!(
                    "{}: the workgroup size is not a power of two up to 256, or a size is \
                     out of the kernel's range",
                    variant.key()
                ),
            ));
        }
        if variant.workgroup_size() > ctx.limits.max_compute_invocations_per_workgroup {
            return Err(Error::Limit {
                what: format!("kernel {}", variant.key()),
                needed: variant.workgroup_size() as u64,
                limit: ctx.limits.max_compute_invocations_per_workgroup as u64,
            });
        }
        let key = variant.key();
        let mut cache = match self.pipelines.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let module = ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&key),
                source: wgpu::ShaderSource::Wgsl(render(variant).into()),
            });
        let pipeline = Arc::new(ctx.device.create_compute_pipeline(
            &wgpu::ComputePipelineDescriptor {
                label: Some(&key),
                layout: None,
                module: &module,
                entry_point: Some(variant.entry_point()),
                compilation_options: Default::default(),
                cache: None,
            },
        ));
        cache.insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// A 1-D grid of `groups` workgroups, spilling into y past the per-dimension limit
    /// (the kernels rebuild the linear index from both).
    fn grid(&self, ctx: &GpuContext, what: &str, groups: u64) -> Result<[u32; 3]> {
        let max = ctx.limits.max_compute_workgroups_per_dimension.max(1) as u64;
        if groups <= max {
            return Ok([groups as u32, 1, 1]);
        }
        let y = groups.div_ceil(max);
        if y > max {
            return Err(Error::Limit {
                what: format!("{what} workgroups"),
                needed: groups,
                limit: max * max,
            });
        }
        Ok([max as u32, y as u32, 1])
    }

    fn dispatch<P: bytemuck::Pod>(
        &self,
        ctx: &GpuContext,
        variant: Variant,
        params: &P,
        buffers: &[&wgpu::Buffer],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let resources = buffers.iter().map(|b| b.as_entire_binding()).collect();
        self.dispatch_bound(ctx, variant, params, resources, workgroups)
    }

    /// [`Kernels::dispatch`] with explicit resources for bindings 1.. (ranges of buffers).
    fn dispatch_bound<P: bytemuck::Pod>(
        &self,
        ctx: &GpuContext,
        variant: Variant,
        params: &P,
        resources: Vec<wgpu::BindingResource<'_>>,
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let entries = (1..).zip(resources).collect();
        self.dispatch_entries(ctx, variant, params, entries, workgroups)
    }

    /// [`Kernels::dispatch`] with explicit (binding, resource) pairs after the parameters.
    fn dispatch_entries<P: bytemuck::Pod>(
        &self,
        ctx: &GpuContext,
        variant: Variant,
        params: &P,
        resources: Vec<(u32, wgpu::BindingResource<'_>)>,
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let pipeline = self.pipeline(ctx, &variant)?;
        let key = variant.key();
        let params = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(&key),
                contents: bytemuck::bytes_of(params),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: params.as_entire_binding(),
        }];
        for (binding, resource) in resources {
            entries.push(wgpu::BindGroupEntry { binding, resource });
        }
        let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&key),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Ok(Dispatch {
            key,
            pipeline,
            bind_group,
            params,
            workgroups,
        })
    }

    /// Gathers rows `ids[0..n_tokens]` of `table` into `out` (n_tokens, cols) at element
    /// `out_offset` (a multiple of 4). One dispatch per part of the table. The ids live on the
    /// GPU, so the caller checks them against the vocabulary: an id past the table leaves its
    /// output row untouched.
    pub fn embed(
        &self,
        ctx: &GpuContext,
        table: &GpuWeight,
        ids: &wgpu::Buffer,
        n_tokens: u32,
        out: &wgpu::Buffer,
        out_offset: u32,
    ) -> Result<Vec<Dispatch>> {
        const K: &str = "embed";
        let cols = table.cols as u64;
        if !out_offset.is_multiple_of(4) {
            return Err(Error::args(
                K,
                format!("out_offset {out_offset} is not a multiple of 4"),
            ));
        }
        need(K, "ids", ids, n_tokens as u64)?;
        need(K, "out", out, extent(out_offset, n_tokens as u64 * cols))?;
        let variant = Variant::Embed {
            weights: table.format,
            wg: self.tuning.wg,
        };
        let units = n_tokens as u64 * (cols / table.format.unit() as u64);
        let grid = self.grid(ctx, K, units.div_ceil(self.tuning.wg as u64))?;
        table
            .parts
            .iter()
            .map(|part| {
                let p = EmbedParams {
                    n_tokens,
                    cols: cols as u32,
                    q_offset: part.q_offset,
                    row_start: part.row_start,
                    rows: part.rows,
                    out_offset,
                    pad: [0; 2],
                };
                self.dispatch(ctx, variant, &p, &[&part.buffer, ids, out], grid)
            })
            .collect()
    }

    /// RMSNorm of `n_rows` rows of `n` values: out = x / rms(x) · weight (f32 weight of `n`).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        ctx: &GpuContext,
        x: &wgpu::Buffer,
        weight: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n_rows: u32,
        n: u32,
        eps: f32,
    ) -> Result<Dispatch> {
        const K: &str = "rmsnorm";
        let total = n_rows as u64 * n as u64;
        need(K, "x", x, total)?;
        need(K, "weight", weight, n as u64)?;
        need(K, "out", out, total)?;
        let (variant, groups) = match self.tuning.strategy {
            Strategy::RowPerThread => (
                Variant::RmsNorm {
                    strategy: Strategy::RowPerThread,
                    wg: self.tuning.wg,
                },
                (n_rows as u64).div_ceil(self.tuning.wg as u64),
            ),
            Strategy::RowPerWorkgroup => (
                Variant::RmsNorm {
                    strategy: Strategy::RowPerWorkgroup,
                    wg: self.tuning.reduce_wg,
                },
                n_rows as u64,
            ),
        };
        let p = NormParams {
            n_rows,
            n,
            eps,
            pad: 0,
        };
        let grid = self.grid(ctx, K, groups)?;
        self.dispatch(ctx, variant, &p, &[x, weight, out], grid)
    }

    fn check_product(
        &self,
        kernel: &'static str,
        w: &GpuWeight,
        a: &Product,
        splits: &[Split],
    ) -> Result<()> {
        if splits.len() > MAX_SPLITS || splits.windows(2).any(|p| p[0].row > p[1].row) {
            return Err(Error::args(
                kernel,
                format!("{splits:?}: at most {MAX_SPLITS} splits, in increasing rows"),
            ));
        }
        // The regions of y: (first element, stride, rows).
        let mut regions = vec![(a.y_offset, a.y_stride, 0usize)];
        let mut start = 0usize;
        for s in splits {
            let row = (s.row as usize).min(w.rows);
            if let Some(last) = regions.last_mut() {
                last.2 = row - start;
            }
            regions.push((s.y_offset, s.y_stride, 0));
            start = row;
        }
        if let Some(last) = regions.last_mut() {
            last.2 = w.rows - start;
        }
        if !a.x_offset.is_multiple_of(4) {
            return Err(Error::args(
                kernel,
                format!("x_offset {} is not a multiple of 4", a.x_offset),
            ));
        }
        for &(_, stride, rows) in &regions {
            if (stride as usize) < rows && a.n_tokens > 1 {
                return Err(Error::args(
                    kernel,
                    format!(
                        "y_stride {stride} is less than the {rows} rows of `{}` it separates",
                        w.name
                    ),
                ));
            }
        }
        let t = a.n_tokens as u64;
        need(kernel, "x", a.x, extent(a.x_offset, t * w.cols as u64))?;
        let end = |offset: u32, stride: u32, rows: usize| {
            if t == 0 || rows == 0 {
                0
            } else {
                extent(offset, (t - 1) * stride as u64 + rows as u64)
            }
        };
        for (offset, stride, rows) in regions {
            need(kernel, "y", a.y, end(offset, stride, rows))?;
        }
        Ok(())
    }

    /// y (+)= W·x for one token (decode). One dispatch per part of W.
    pub fn matvec(&self, ctx: &GpuContext, w: &GpuWeight, a: &Product) -> Result<Vec<Dispatch>> {
        self.matvec_split(ctx, w, a, &[])
    }

    /// [`Kernels::matvec`] with the rows of a stacked weight written to regions by `splits`.
    pub fn matvec_split(
        &self,
        ctx: &GpuContext,
        w: &GpuWeight,
        a: &Product,
        splits: &[Split],
    ) -> Result<Vec<Dispatch>> {
        const K: &str = "matvec";
        if a.n_tokens != 1 {
            return Err(Error::args(K, format!("{} tokens: use matmul", a.n_tokens)));
        }
        self.check_product(K, w, a, splits)?;
        let strategy = self.tuning.strategy;
        let (wg, rows) = match strategy {
            Strategy::RowPerThread => (self.tuning.matvec_wg, MATVEC_ROWS_PER_THREAD),
            Strategy::RowPerWorkgroup => (self.tuning.reduce_wg, 1),
        };
        // CPU drivers read x much faster as a uniform: bind the vec4s the kernel reads, when
        // the buffer allows it and they fit the uniform binding limit.
        let x_vec4s = (a.x_offset as u64 + w.cols as u64).div_ceil(4);
        let x_window = if self.tuning.uniform_x
            && strategy == Strategy::RowPerThread
            && a.x.usage().contains(wgpu::BufferUsages::UNIFORM)
            && x_vec4s <= MAX_X_WINDOW as u64
            && x_vec4s * 16 <= ctx.limits.max_uniform_buffer_binding_size
            && x_vec4s * 16 <= a.x.size()
        {
            x_vec4s as u32
        } else {
            0
        };
        let variant = Variant::Matvec {
            weights: w.format,
            strategy,
            wg,
            x_window,
        };
        w.parts
            .iter()
            .map(|part| {
                let groups = match strategy {
                    Strategy::RowPerThread => (part.rows as u64).div_ceil(rows as u64 * wg as u64),
                    Strategy::RowPerWorkgroup => part.rows as u64,
                };
                let [s1, s2] = split_params(splits, part.row_start, 0);
                let p = ProductParams {
                    rows: part.rows,
                    cols: w.cols as u32,
                    q_offset: part.q_offset,
                    x_offset: a.x_offset,
                    y_offset: a.y_offset + part.row_start,
                    a: a.accumulate as u32,
                    b: s1.0,
                    c: s1.1,
                    d: [s2.0, s2.1, 0, 0, 0, 0, 0, 0],
                };
                let grid = self.grid(ctx, K, groups)?;
                let x = match x_window {
                    0 => a.x.as_entire_binding(),
                    n => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: a.x,
                        offset: 0,
                        size: std::num::NonZeroU64::new(n as u64 * 16),
                    }),
                };
                let resources = vec![part.buffer.as_entire_binding(), x, a.y.as_entire_binding()];
                self.dispatch_bound(ctx, variant, &p, resources, grid)
            })
            .collect()
    }

    /// Y (+)= X·Wᵀ for `n_tokens` tokens (prefill), each weight unit decoded once for many
    /// tokens (a 64×32 tile on GPUs, 8 tokens per invocation on CPU adapters).
    pub fn matmul(&self, ctx: &GpuContext, w: &GpuWeight, a: &Product) -> Result<Vec<Dispatch>> {
        self.matmul_split(ctx, w, a, &[])
    }

    /// [`Kernels::matmul`] with the rows of a stacked weight written to regions by `splits`.
    pub fn matmul_split(
        &self,
        ctx: &GpuContext,
        w: &GpuWeight,
        a: &Product,
        splits: &[Split],
    ) -> Result<Vec<Dispatch>> {
        const K: &str = "matmul";
        self.check_product(K, w, a, splits)?;
        let strategy = self.tuning.strategy;
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        let check = |tx: u32, ty: u32| -> Result<[u32; 3]> {
            if tx > max || ty > max {
                return Err(Error::Limit {
                    what: format!("matmul workgroups of `{}`", w.name),
                    needed: tx.max(ty) as u64,
                    limit: max as u64,
                });
            }
            Ok([tx, ty, 1])
        };
        if strategy == Strategy::RowPerWorkgroup {
            let variant = Variant::Matmul {
                weights: w.format,
                strategy,
                wg: self.tuning.wg,
                x_window: 0,
            };
            let ty = a.n_tokens.div_ceil(mdi_shaders::MATMUL_TILE_TOKENS);
            return w
                .parts
                .iter()
                .map(|part| {
                    let grid = check(part.rows.div_ceil(mdi_shaders::MATMUL_TILE_ROWS), ty)?;
                    let [s1, s2] = split_params(splits, part.row_start, 0);
                    let p = ProductParams {
                        rows: part.rows,
                        cols: w.cols as u32,
                        q_offset: part.q_offset,
                        x_offset: a.x_offset,
                        y_offset: a.y_offset + part.row_start,
                        a: a.y_stride,
                        b: a.n_tokens,
                        c: a.accumulate as u32,
                        d: [s1.0, s1.1, s2.0, s2.1, s1.2, s2.2, 0, 0],
                    };
                    self.dispatch(ctx, variant, &p, &[&part.buffer, a.x, a.y], grid)
                })
                .collect();
        }
        // Row per thread. On CPU drivers X is read as a uniform window of whole tokens, one
        // dispatch per window; otherwise (or where a window cannot be bound) from storage.
        let wg = self.tuning.wg;
        let tpt = mdi_shaders::MATMUL_TOKENS_PER_THREAD;
        let cols = w.cols as u64;
        let align = ctx.limits.min_uniform_buffer_offset_alignment.max(4) as u64;
        let window_bytes = MAX_X_WINDOW as u64 * 16;
        let chunk = if self.tuning.uniform_x
            && a.x.usage().contains(wgpu::BufferUsages::UNIFORM)
            && window_bytes <= ctx.limits.max_uniform_buffer_binding_size
            && window_bytes <= a.x.size()
        {
            // Tokens per window, leaving room to align the binding's start.
            ((window_bytes - align) / (cols * 4)) as u32 / tpt * tpt
        } else {
            0
        };
        let mut out = Vec::new();
        for part in &w.parts {
            let mut t_start = 0u32;
            while t_start < a.n_tokens {
                let t_n = if chunk == 0 {
                    a.n_tokens
                } else {
                    chunk.min(a.n_tokens - t_start)
                };
                // The bytes of X this chunk reads, and a window binding that holds them.
                let first = 4 * (a.x_offset as u64 + t_start as u64 * cols);
                let len = 4 * t_n as u64 * cols;
                let window = (chunk > 0)
                    .then(|| {
                        let b = (first / align * align)
                            .min((a.x.size() - window_bytes) / align * align);
                        (b + window_bytes >= first + len).then_some(b)
                    })
                    .flatten();
                let (x_window, x_offset, x) = match window {
                    Some(b) => (
                        MAX_X_WINDOW,
                        ((first - b) / 4) as u32,
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: a.x,
                            offset: b,
                            size: std::num::NonZeroU64::new(window_bytes),
                        }),
                    ),
                    None => (0, (first / 4) as u32, a.x.as_entire_binding()),
                };
                let variant = Variant::Matmul {
                    weights: w.format,
                    strategy,
                    wg,
                    x_window,
                };
                let [s1, s2] = split_params(splits, part.row_start, t_start);
                let p = ProductParams {
                    rows: part.rows,
                    cols: w.cols as u32,
                    q_offset: part.q_offset,
                    x_offset,
                    y_offset: a.y_offset + part.row_start + t_start * a.y_stride,
                    a: a.y_stride,
                    b: t_n,
                    c: a.accumulate as u32,
                    d: [s1.0, s1.1, s2.0, s2.1, s1.2, s2.2, 0, 0],
                };
                let per_group = wg * mdi_shaders::MATMUL_ROWS_PER_THREAD;
                let grid = check(part.rows.div_ceil(per_group), t_n.div_ceil(tpt))?;
                let resources = vec![part.buffer.as_entire_binding(), x, a.y.as_entire_binding()];
                out.push(self.dispatch_bound(ctx, variant, &p, resources, grid)?);
                t_start += t_n;
            }
        }
        Ok(out)
    }

    /// [`Kernels::matvec`] for one token, [`Kernels::matmul`] for more.
    pub fn linear(&self, ctx: &GpuContext, w: &GpuWeight, a: &Product) -> Result<Vec<Dispatch>> {
        self.linear_split(ctx, w, a, &[])
    }

    /// [`Kernels::linear`] with the rows of a stacked weight written to regions by `splits`.
    pub fn linear_split(
        &self,
        ctx: &GpuContext,
        w: &GpuWeight,
        a: &Product,
        splits: &[Split],
    ) -> Result<Vec<Dispatch>> {
        if a.n_tokens == 1 {
            self.matvec_split(ctx, w, a, splits)
        } else {
            self.matmul_split(ctx, w, a, splits)
        }
    }

    /// Rotates x (n_tokens, n_heads, table.head_dim) from element `x_offset` in place, token
    /// t at position `positions[t]` (which must be below `table.max_positions`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        ctx: &GpuContext,
        table: &RopeTable,
        layout: RopeLayout,
        x: &wgpu::Buffer,
        x_offset: u32,
        positions: &wgpu::Buffer,
        n_tokens: u32,
        n_heads: u32,
    ) -> Result<Dispatch> {
        const K: &str = "rope";
        let hd = table.head_dim as u64;
        need(K, "positions", positions, n_tokens as u64)?;
        need(
            K,
            "x",
            x,
            extent(x_offset, n_tokens as u64 * n_heads as u64 * hd),
        )?;
        let p = RopeParams {
            n_tokens,
            n_heads,
            head_dim: table.head_dim,
            x_offset,
        };
        let pairs = n_tokens as u64 * n_heads as u64 * (hd / 2);
        let grid = self.grid(ctx, K, pairs.div_ceil(self.tuning.wg as u64))?;
        let variant = Variant::Rope {
            layout,
            wg: self.tuning.wg,
        };
        self.dispatch(ctx, variant, &p, &[positions, &table.buffer, x], grid)
    }

    /// Whether the barrier-free attention (one invocation per token and KV head) serves this
    /// shape under the current tuning; otherwise the workgroup kernel does.
    fn barrier_free_attention(&self, shape: &AttentionShape, cache: &KvBuffers) -> bool {
        let group = shape.n_heads / shape.n_kv_heads.max(1);
        self.tuning.strategy == Strategy::RowPerThread
            && shape.head_dim.is_multiple_of(4)
            && cache.offset.is_multiple_of(4)
            && group <= MAX_ATTENTION_GROUP
            && group * shape.head_dim <= MAX_ATTENTION_GROUP_DIM
    }

    /// Checks an attention call's shapes and buffers and builds its parameters.
    fn attention_params(
        shape: &AttentionShape,
        cache: &KvBuffers,
        q: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n_tokens: u32,
        p0: u32,
    ) -> Result<AttentionParams> {
        const K: &str = "attention";
        Self::check_attention(K, shape, cache, n_tokens, p0)?;
        let n = n_tokens as u64 * shape.n_heads as u64 * shape.head_dim as u64;
        need(K, "q", q, n)?;
        need(K, "out", out, n)?;
        Ok(AttentionParams {
            n_tokens,
            n_heads: shape.n_heads,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            p0,
            max_positions: shape.max_positions,
            cache_offset: cache.offset,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
        })
    }

    fn check_attention(
        kernel: &'static str,
        s: &AttentionShape,
        cache: &KvBuffers,
        n_tokens: u32,
        p0: u32,
    ) -> Result<()> {
        if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
            return Err(Error::args(
                kernel,
                format!(
                    "{} query heads do not group over {} KV heads",
                    s.n_heads, s.n_kv_heads
                ),
            ));
        }
        if s.head_dim == 0 || s.head_dim > MAX_HEAD_DIM {
            return Err(Error::args(
                kernel,
                format!("head_dim {} is not in 1..={MAX_HEAD_DIM}", s.head_dim),
            ));
        }
        if p0 as u64 + n_tokens as u64 > s.max_positions as u64 {
            return Err(Error::args(
                kernel,
                format!(
                    "positions {p0}..{} do not fit a cache of {} positions",
                    p0 as u64 + n_tokens as u64,
                    s.max_positions
                ),
            ));
        }
        let size = s.n_kv_heads as u64 * s.max_positions as u64 * s.head_dim as u64;
        need(kernel, "k cache", cache.k, extent(cache.offset, size))?;
        need(kernel, "v cache", cache.v, extent(cache.offset, size))
    }

    /// Writes the K and V rows (n_tokens, n_kv_heads, head_dim), from element `src_offset` of
    /// `k_new`/`v_new`, into the cache at positions p0..p0+n_tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        ctx: &GpuContext,
        shape: &AttentionShape,
        cache: &KvBuffers,
        k_new: &wgpu::Buffer,
        v_new: &wgpu::Buffer,
        src_offset: u32,
        n_tokens: u32,
        p0: u32,
    ) -> Result<Dispatch> {
        let new = [(k_new, src_offset), (v_new, src_offset)];
        self.kv_write_at(ctx, shape, cache, new, n_tokens, p0)
    }

    /// [`Kernels::kv_write`] with the new K and V rows each at its own (buffer, element
    /// offset); they may share a buffer.
    pub fn kv_write_at(
        &self,
        ctx: &GpuContext,
        shape: &AttentionShape,
        cache: &KvBuffers,
        new: [(&wgpu::Buffer, u32); 2],
        n_tokens: u32,
        p0: u32,
    ) -> Result<Dispatch> {
        const K: &str = "kv_write";
        let [(k_new, k_offset), (v_new, v_offset)] = new;
        Self::check_attention(K, shape, cache, n_tokens, p0)?;
        let n = n_tokens as u64 * shape.n_kv_heads as u64 * shape.head_dim as u64;
        need(K, "k_new", k_new, extent(k_offset, n))?;
        need(K, "v_new", v_new, extent(v_offset, n))?;
        let p = KvWriteParams {
            n_tokens,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            max_positions: shape.max_positions,
            p0,
            cache_offset: cache.offset,
            src_offset: k_offset,
            v_src_offset: v_offset,
        };
        let grid = self.grid(ctx, K, n.div_ceil(self.tuning.wg as u64))?;
        let variant = Variant::KvWrite { wg: self.tuning.wg };
        self.dispatch(ctx, variant, &p, &[k_new, v_new, cache.k, cache.v], grid)
    }

    /// Causal GQA attention of q (n_tokens, n_heads, head_dim) at positions p0.. over the
    /// cache (which already holds those tokens) into out (same shape as q).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        ctx: &GpuContext,
        shape: &AttentionShape,
        cache: &KvBuffers,
        q: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n_tokens: u32,
        p0: u32,
    ) -> Result<Dispatch> {
        const K: &str = "attention";
        let p = Self::attention_params(shape, cache, q, out, n_tokens, p0)?;
        let group = shape.n_heads / shape.n_kv_heads;
        let (variant, groups) = if self.barrier_free_attention(shape, cache) {
            // Barrier-free: one invocation per (token, KV head).
            let wg = self.tuning.attention_wg;
            let v = Variant::AttentionRpt {
                wg,
                head_dim: shape.head_dim,
                group,
                splits: 1,
                combine: false,
            };
            let n = n_tokens as u64 * shape.n_kv_heads as u64;
            (v, n.div_ceil(wg as u64))
        } else {
            let v = Variant::Attention {
                wg: self.tuning.attention_wg,
            };
            (v, n_tokens as u64 * shape.n_heads as u64)
        };
        let grid = self.grid(ctx, K, groups)?;
        self.dispatch(ctx, variant, &p, &[q, cache.k, cache.v, out], grid)
    }

    /// [`Kernels::attention`], split over positions where the tuning asks for it
    /// (`attention_splits` > 1, row-per-thread kernels): a pass per (token, KV head, split)
    /// into a partials buffer made here, then a pass combining them into `out`. Both passes'
    /// parameters hold `p0` at [`P0_PARAM_OFFSET`]. Otherwise the single dispatch of
    /// [`Kernels::attention`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_split(
        &self,
        ctx: &GpuContext,
        shape: &AttentionShape,
        cache: &KvBuffers,
        q: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n_tokens: u32,
        p0: u32,
    ) -> Result<Vec<Dispatch>> {
        const K: &str = "attention";
        let group = shape.n_heads / shape.n_kv_heads.max(1);
        let splits = self.tuning.attention_splits.min(MAX_ATTENTION_SPLITS);
        if splits <= 1 || !self.barrier_free_attention(shape, cache) {
            return Ok(vec![
                self.attention(ctx, shape, cache, q, out, n_tokens, p0)?
            ]);
        }
        let p = Self::attention_params(shape, cache, q, out, n_tokens, p0)?;
        let records = n_tokens as u64 * shape.n_kv_heads as u64 * splits as u64 * group as u64;
        let partials = crate::buffers::storage(
            ctx,
            "attention partials",
            records * (shape.head_dim as u64 / 4 + 1) * 16,
        );
        let wg = self.tuning.attention_wg;
        let variant = |combine| Variant::AttentionRpt {
            wg,
            head_dim: shape.head_dim,
            group,
            splits,
            combine,
        };
        let split_groups =
            (n_tokens as u64 * shape.n_kv_heads as u64 * splits as u64).div_ceil(wg as u64);
        let combine_groups = (n_tokens as u64 * shape.n_heads as u64).div_ceil(wg as u64);
        let split = self.dispatch(
            ctx,
            variant(false),
            &p,
            &[q, cache.k, cache.v, &partials],
            self.grid(ctx, K, split_groups)?,
        )?;
        let combine = self.dispatch_entries(
            ctx,
            variant(true),
            &p,
            vec![
                (1, partials.as_entire_binding()),
                (4, out.as_entire_binding()),
            ],
            self.grid(ctx, K, combine_groups)?,
        )?;
        Ok(vec![split, combine])
    }

    #[allow(clippy::too_many_arguments)]
    fn elementwise(
        &self,
        ctx: &GpuContext,
        kernel: &'static str,
        variant: Variant,
        inputs: [&wgpu::Buffer; 2],
        second_offset: u32,
        out: &wgpu::Buffer,
        n: u32,
    ) -> Result<Dispatch> {
        need(kernel, "first input", inputs[0], n as u64)?;
        need(
            kernel,
            "second input",
            inputs[1],
            extent(second_offset, n as u64),
        )?;
        need(kernel, "out", out, n as u64)?;
        let p = CountParams {
            n,
            offset: second_offset,
            pad: [0; 2],
        };
        let grid = self.grid(ctx, kernel, (n as u64).div_ceil(self.tuning.wg as u64))?;
        self.dispatch(ctx, variant, &p, &[inputs[0], inputs[1], out], grid)
    }

    /// out = silu(gate) · up over `n` elements.
    pub fn swiglu(
        &self,
        ctx: &GpuContext,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n: u32,
    ) -> Result<Dispatch> {
        self.swiglu_at(ctx, gate, up, 0, out, n)
    }

    /// out = silu(gate) · up[up_offset..] over `n` elements (`gate` and `up` may be one
    /// buffer).
    pub fn swiglu_at(
        &self,
        ctx: &GpuContext,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        up_offset: u32,
        out: &wgpu::Buffer,
        n: u32,
    ) -> Result<Dispatch> {
        let v = Variant::Swiglu { wg: self.tuning.wg };
        self.elementwise(ctx, "swiglu", v, [gate, up], up_offset, out, n)
    }

    /// out = a + b over `n` elements.
    pub fn add(
        &self,
        ctx: &GpuContext,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n: u32,
    ) -> Result<Dispatch> {
        let v = Variant::Add { wg: self.tuning.wg };
        self.elementwise(ctx, "add", v, [a, b], 0, out, n)
    }

    /// `out[0]` = first index of the maximum of `x[offset..offset+n]`, `out[1]` = its f32 bits.
    pub fn argmax(
        &self,
        ctx: &GpuContext,
        x: &wgpu::Buffer,
        offset: u32,
        n: u32,
        out: &wgpu::Buffer,
    ) -> Result<Dispatch> {
        const K: &str = "argmax";
        if n == 0 {
            return Err(Error::args(K, "empty vector"));
        }
        need(K, "x", x, extent(offset, n as u64))?;
        need(K, "out", out, 2)?;
        let p = CountParams {
            n,
            offset,
            pad: [0; 2],
        };
        let variant = Variant::Argmax {
            wg: self.tuning.argmax_wg,
        };
        self.dispatch(ctx, variant, &p, &[x, out], [1, 1, 1])
    }
}
