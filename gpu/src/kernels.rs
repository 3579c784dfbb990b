//! Kernel-level executor: compiles each [`Variant`] once (pipelines cached by its key) and
//! turns buffers plus sizes into [`Dispatch`]es, after checking that every index the kernel
//! will touch lies inside its buffer (WGSL clamps out-of-bounds accesses silently, so a wrong
//! size would otherwise give wrong numbers instead of an error).
//!
//! A `Dispatch` owns its bind group and parameter buffer, so the engine can build the
//! dispatches of a layer once and replay them; tests build, run and read back.
//! Buffers are bound whole; offsets into them are element offsets in the parameters, which
//! avoids the binding-offset alignment rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mdi_shaders::{render, RopeLayout, Strategy, Variant, MAX_HEAD_DIM};
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
    /// Workgroup size of attention (positions scored per step).
    pub attention_wg: u32,
    /// Workgroup size of argmax.
    pub argmax_wg: u32,
}

impl Tuning {
    /// For CPU drivers (lavapipe): one row per invocation, as few barriers as possible.
    pub const CPU: Tuning = Tuning {
        strategy: Strategy::RowPerThread,
        wg: 64,
        reduce_wg: 64,
        attention_wg: 8,
        argmax_wg: 64,
    };

    /// For GPUs: cooperative rows.
    pub const GPU: Tuning = Tuning {
        strategy: Strategy::RowPerWorkgroup,
        wg: 64,
        reduce_wg: 64,
        attention_wg: 64,
        argmax_wg: 256,
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
pub struct KvCache<'a> {
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
        if head_dim == 0 || head_dim % 2 != 0 {
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
    // matvec: accumulate, pad, pad; matmul: y_stride, n_tokens, accumulate.
    a: u32,
    b: u32,
    c: u32,
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
    pad: u32,
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
                    "workgroup size {} is not a power of two up to 256",
                    variant.workgroup_size()
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
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
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
        if out_offset % 4 != 0 {
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

    fn check_product(&self, kernel: &'static str, w: &GpuWeight, a: &Product) -> Result<()> {
        if a.x_offset % 4 != 0 {
            return Err(Error::args(
                kernel,
                format!("x_offset {} is not a multiple of 4", a.x_offset),
            ));
        }
        if (a.y_stride as usize) < w.rows && a.n_tokens > 1 {
            return Err(Error::args(
                kernel,
                format!(
                    "y_stride {} is less than the {} rows of `{}`",
                    a.y_stride, w.rows, w.name
                ),
            ));
        }
        let t = a.n_tokens as u64;
        need(kernel, "x", a.x, extent(a.x_offset, t * w.cols as u64))?;
        let y_end = if t == 0 {
            0
        } else {
            extent(a.y_offset, (t - 1) * a.y_stride as u64 + w.rows as u64)
        };
        need(kernel, "y", a.y, y_end)
    }

    /// y (+)= W·x for one token (decode). One dispatch per part of W.
    pub fn matvec(&self, ctx: &GpuContext, w: &GpuWeight, a: &Product) -> Result<Vec<Dispatch>> {
        const K: &str = "matvec";
        if a.n_tokens != 1 {
            return Err(Error::args(K, format!("{} tokens: use matmul", a.n_tokens)));
        }
        self.check_product(K, w, a)?;
        let strategy = self.tuning.strategy;
        let wg = match strategy {
            Strategy::RowPerThread => self.tuning.wg,
            Strategy::RowPerWorkgroup => self.tuning.reduce_wg,
        };
        let variant = Variant::Matvec {
            weights: w.format,
            strategy,
            wg,
        };
        w.parts
            .iter()
            .map(|part| {
                let groups = match strategy {
                    Strategy::RowPerThread => (part.rows as u64).div_ceil(wg as u64),
                    Strategy::RowPerWorkgroup => part.rows as u64,
                };
                let p = ProductParams {
                    rows: part.rows,
                    cols: w.cols as u32,
                    q_offset: part.q_offset,
                    x_offset: a.x_offset,
                    y_offset: a.y_offset + part.row_start,
                    a: a.accumulate as u32,
                    b: 0,
                    c: 0,
                };
                let grid = self.grid(ctx, K, groups)?;
                self.dispatch(ctx, variant, &p, &[&part.buffer, a.x, a.y], grid)
            })
            .collect()
    }

    /// Y (+)= X·Wᵀ for `n_tokens` tokens (prefill), each weight unit decoded once for many
    /// tokens (a 64×32 tile on GPUs, 8 tokens per invocation on CPU adapters).
    pub fn matmul(&self, ctx: &GpuContext, w: &GpuWeight, a: &Product) -> Result<Vec<Dispatch>> {
        const K: &str = "matmul";
        self.check_product(K, w, a)?;
        let strategy = self.tuning.strategy;
        let variant = Variant::Matmul {
            weights: w.format,
            strategy,
            wg: self.tuning.wg,
        };
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        let ty = a.n_tokens.div_ceil(mdi_shaders::MATMUL_TILE_TOKENS);
        w.parts
            .iter()
            .map(|part| {
                let grid = match strategy {
                    Strategy::RowPerThread => {
                        let groups = a.n_tokens.div_ceil(mdi_shaders::MATMUL_TOKENS_PER_THREAD);
                        let invocations = part.rows as u64 * groups as u64;
                        self.grid(ctx, K, invocations.div_ceil(self.tuning.wg as u64))?
                    }
                    Strategy::RowPerWorkgroup => {
                        let tx = part.rows.div_ceil(mdi_shaders::MATMUL_TILE_ROWS);
                        if tx > max || ty > max {
                            return Err(Error::Limit {
                                what: format!("matmul tiles of `{}`", w.name),
                                needed: tx.max(ty) as u64,
                                limit: max as u64,
                            });
                        }
                        [tx, ty, 1]
                    }
                };
                let p = ProductParams {
                    rows: part.rows,
                    cols: w.cols as u32,
                    q_offset: part.q_offset,
                    x_offset: a.x_offset,
                    y_offset: a.y_offset + part.row_start,
                    a: a.y_stride,
                    b: a.n_tokens,
                    c: a.accumulate as u32,
                };
                self.dispatch(ctx, variant, &p, &[&part.buffer, a.x, a.y], grid)
            })
            .collect()
    }

    /// [`Kernels::matvec`] for one token, [`Kernels::matmul`] for more.
    pub fn linear(&self, ctx: &GpuContext, w: &GpuWeight, a: &Product) -> Result<Vec<Dispatch>> {
        if a.n_tokens == 1 {
            self.matvec(ctx, w, a)
        } else {
            self.matmul(ctx, w, a)
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

    fn check_attention(
        kernel: &'static str,
        s: &AttentionShape,
        cache: &KvCache,
        n_tokens: u32,
        p0: u32,
    ) -> Result<()> {
        if s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
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
        cache: &KvCache,
        k_new: &wgpu::Buffer,
        v_new: &wgpu::Buffer,
        src_offset: u32,
        n_tokens: u32,
        p0: u32,
    ) -> Result<Dispatch> {
        const K: &str = "kv_write";
        Self::check_attention(K, shape, cache, n_tokens, p0)?;
        let n = n_tokens as u64 * shape.n_kv_heads as u64 * shape.head_dim as u64;
        need(K, "k_new", k_new, extent(src_offset, n))?;
        need(K, "v_new", v_new, extent(src_offset, n))?;
        let p = KvWriteParams {
            n_tokens,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            max_positions: shape.max_positions,
            p0,
            cache_offset: cache.offset,
            src_offset,
            pad: 0,
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
        cache: &KvCache,
        q: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n_tokens: u32,
        p0: u32,
    ) -> Result<Dispatch> {
        const K: &str = "attention";
        Self::check_attention(K, shape, cache, n_tokens, p0)?;
        let n = n_tokens as u64 * shape.n_heads as u64 * shape.head_dim as u64;
        need(K, "q", q, n)?;
        need(K, "out", out, n)?;
        let p = AttentionParams {
            n_tokens,
            n_heads: shape.n_heads,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            p0,
            max_positions: shape.max_positions,
            cache_offset: cache.offset,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
        };
        let grid = self.grid(ctx, K, n_tokens as u64 * shape.n_heads as u64)?;
        let variant = Variant::Attention {
            wg: self.tuning.attention_wg,
        };
        self.dispatch(ctx, variant, &p, &[q, cache.k, cache.v, out], grid)
    }

    fn elementwise(
        &self,
        ctx: &GpuContext,
        kernel: &'static str,
        variant: Variant,
        inputs: [&wgpu::Buffer; 2],
        out: &wgpu::Buffer,
        n: u32,
    ) -> Result<Dispatch> {
        need(kernel, "first input", inputs[0], n as u64)?;
        need(kernel, "second input", inputs[1], n as u64)?;
        need(kernel, "out", out, n as u64)?;
        let p = CountParams {
            n,
            offset: 0,
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
        let v = Variant::Swiglu { wg: self.tuning.wg };
        self.elementwise(ctx, "swiglu", v, [gate, up], out, n)
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
        self.elementwise(ctx, "add", v, [a, b], out, n)
    }

    /// out[0] = first index of the maximum of x[offset..offset+n], out[1] = its f32 bits.
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
