//! [`GpuEngine`]: one stage of the model on the GPU, meeting the same [`StageEngine`](mdi_core::StageEngine) contract
//! as the CPU oracle. Weights stay quantized in GPU memory; every buffer, bind group and
//! pipeline is made once and replayed: a decode step writes the token id and its position
//! (two `write_buffer`s), copies the position into the `p0` word of each layer's KV-write and
//! attention parameters inside the command encoder, and submits once. Prompts run in chunks of
//! at most `max_batch` tokens through activation scratch allocated for that many rows; the
//! dispatches of a chunk size are built on first use and kept (a few sizes, least recently used
//! dropped). Each sequence's cache is its own set of per-layer K and V buffers, so no binding
//! holds more than one layer.
//!
//! Reading back is asynchronous (`map_async`), so the engine also runs in the browser through
//! [`GpuEngine::forward_async`] / [`GpuEngine::head_async`]; natively the [`StageEngine`](mdi_core::StageEngine)
//! methods block on them with pollster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[cfg(not(target_arch = "wasm32"))]
use mdi_core::engine::StageEngine;
use mdi_core::engine::{StageInput, StageOutput, Want};
use mdi_core::weights::{RawTensor, StageSpec, StageWeights};
use mdi_core::Config;
use mdi_shaders::MAX_HEAD_DIM;

use crate::buffers;
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::kernels::{
    AttentionShape, Kernels, KvBuffers as KvRef, Product, RopeTable, Split, P0_PARAM_OFFSET,
};
use crate::launch::{step, steps, KernelRole, Step};
use crate::weights::GpuWeight;

/// Prefill plans kept per engine (and KV plans per cache), besides the decode plan.
const KEPT_PLANS: usize = 4;

/// Usage of the buffers results are copied into for reading back.
const READBACK: wgpu::BufferUsages =
    wgpu::BufferUsages::MAP_READ.union(wgpu::BufferUsages::COPY_DST);

/// One transformer block's weights on the GPU.
struct GpuLayer {
    attn_norm: wgpu::Buffer, // (hidden) f32
    attn_in: AttnIn,
    wo: GpuWeight, // (hidden, q_dim)
    /// Q, K, V biases repeated for every row of a chunk: (max_batch, q_dim|kv_dim) each, so the
    /// plain elementwise add applies them.
    bias: Option<[wgpu::Buffer; 3]>,
    ffn_norm: wgpu::Buffer, // (hidden) f32
    ffn_in: FfnIn,
    down: GpuWeight, // (hidden, ffn)
}

/// The attention's Q, K and V matrices: stacked into one (q_dim + 2·kv_dim, hidden) weight when
/// every layer allows it (one type, no biases), so one product dispatch computes all three into
/// their regions of the `qkv` scratch (see [`GpuEngine::qkv_at`]).
enum AttnIn {
    Stacked(GpuWeight),
    Separate([GpuWeight; 3]),
}

impl AttnIn {
    fn weights(&self) -> Vec<&GpuWeight> {
        match self {
            AttnIn::Stacked(w) => vec![w],
            AttnIn::Separate(ws) => ws.iter().collect(),
        }
    }
}

/// The FFN's gate and up matrices: stacked into one (2·ffn, hidden) weight when they share a
/// type, so one product dispatch computes both (into the two halves of the `gate_up` scratch).
enum FfnIn {
    Stacked(GpuWeight),
    Separate(GpuWeight, GpuWeight),
}

impl FfnIn {
    fn weights(&self) -> Vec<&GpuWeight> {
        match self {
            FfnIn::Stacked(w) => vec![w],
            FfnIn::Separate(g, u) => vec![g, u],
        }
    }
}

/// Activation scratch for up to `max_batch` tokens, and the readback staging buffers.
struct Scratch {
    ids: wgpu::Buffer,       // (max_batch) u32
    positions: wgpu::Buffer, // (max_batch) u32; word 0 is also the chunk's p0
    x: wgpu::Buffer,         // (max_batch, hidden): the residual stream
    xn: wgpu::Buffer,        // (max_batch, hidden): normed
    q: wgpu::Buffer,         // (max_batch, n_heads, head_dim)
    k: wgpu::Buffer,         // (max_batch, n_kv_heads, head_dim)
    v: wgpu::Buffer,         // (max_batch, n_kv_heads, head_dim)
    /// Products before their bias, (max_batch, q_dim|kv_dim|kv_dim), when the model has biases.
    raw_qkv: Option<[wgpu::Buffer; 3]>,
    /// Q, K and V of a chunk of n tokens from stacked weights: (n, q_dim) at 0, then (n, kv_dim)
    /// twice, when the layers' Q/K/V are stacked.
    qkv: Option<wgpu::Buffer>,
    att: wgpu::Buffer,         // (max_batch, n_heads, head_dim)
    gate_up: wgpu::Buffer,     // (2, max_batch, ffn): gate rows, then up rows
    act: wgpu::Buffer,         // (max_batch, ffn)
    last: wgpu::Buffer,        // (hidden): the row the head reads
    normed: wgpu::Buffer,      // (hidden)
    logits: wgpu::Buffer,      // (vocab)
    best: wgpu::Buffer,        // (2) u32: argmax index, value bits
    read_hidden: wgpu::Buffer, // (max_batch, hidden), MAP_READ
    read_logits: wgpu::Buffer, // (vocab), MAP_READ
    read_best: wgpu::Buffer,   // (2) u32, MAP_READ
}

/// The engine-side dispatches of one chunk size: everything but the cache-bound kernels.
pub(crate) struct DispatchPlan {
    pub n: u32,
    pub embed: Vec<Step>,
    /// Per layer: norm, Q/K/V, RoPE (before the KV write) and the rest of the block (after
    /// attention).
    pub layers: Vec<(Vec<Step>, Vec<Step>)>,
}

/// A cache's KV-write and attention dispatches for one chunk size, per layer.
pub(crate) struct KvPlan {
    pub n: u32,
    /// Per layer: the KV write, then attention (one or two dispatches).
    pub layers: Vec<Vec<Step>>,
}

/// One sequence's KV cache for a stage's layers, on the GPU.
pub struct GpuCache {
    engine: u64,
    /// Per layer: keys and values, each (n_kv_heads, max_positions, head_dim) f32.
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    max_positions: usize,
    len: usize,
    /// Most recently used first.
    pub(crate) plans: Vec<KvPlan>,
}

impl GpuCache {
    /// Positions already processed: the next token's position.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.max_positions
    }
}

impl std::fmt::Debug for GpuCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCache")
            .field("layers", &self.k.len())
            .field("len", &self.len)
            .field("max_positions", &self.max_positions)
            .finish()
    }
}

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// One stage of a Llama-family model on the GPU (see the module docs).
pub struct GpuEngine {
    id: u64,
    pub(crate) ctx: Arc<GpuContext>,
    pub(crate) kernels: Kernels,
    config: Config,
    spec: StageSpec,
    max_batch: usize,
    embed: Option<GpuWeight>,
    layers: Vec<GpuLayer>,
    output_norm: Option<wgpu::Buffer>,
    head: Option<GpuWeight>,
    rope: RopeTable,
    scratch: Scratch,
    /// The one-token plan, kept for the engine's life.
    pub(crate) decode: Option<DispatchPlan>,
    /// Prefill plans, most recently used first.
    prefill: Vec<DispatchPlan>,
    /// Final norm, LM head, and argmax (last).
    pub(crate) head_steps: Vec<Step>,
}

fn mdi_err(e: Error) -> mdi_core::Error {
    match e {
        // Wrong shapes or sizes are the caller's; everything else is the device's.
        Error::Args { .. } | Error::Tensor { .. } => {
            mdi_core::Error::Input(format!("GPU engine: {e}"))
        }
        _ => mdi_core::Error::Engine(format!("GPU: {e}")),
    }
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Limit {
        what: what.to_string(),
        needed: v as u64,
        limit: u32::MAX as u64,
    })
}

impl GpuEngine {
    /// Uploads a stage's weights (matrices stay in their GGML blocks, split by the binding
    /// limit; norms and biases become f32) and allocates scratch for chunks of up to
    /// `max_batch` tokens.
    pub fn new(
        ctx: Arc<GpuContext>,
        config: Config,
        weights: StageWeights<RawTensor>,
        max_batch: usize,
    ) -> Result<Self> {
        let c = &config;
        c.validate()
            .map_err(|e| Error::args("engine", e.to_string()))?;
        weights
            .spec
            .validate(c)
            .map_err(|e| Error::args("engine", e.to_string()))?;
        if max_batch == 0 {
            return Err(Error::args("engine", "max_batch must be at least 1"));
        }
        if c.head_dim as u32 > MAX_HEAD_DIM {
            return Err(Error::args(
                "engine",
                format!(
                    "head size {} is above the attention kernel's {MAX_HEAD_DIM}",
                    c.head_dim
                ),
            ));
        }
        if weights.layers.len() != weights.spec.layers.len() {
            return Err(Error::args(
                "engine",
                format!(
                    "stage {:?} came with {} layers of weights",
                    weights.spec.layers,
                    weights.layers.len()
                ),
            ));
        }
        let spec = weights.spec.clone();
        let ctx_ref = &*ctx;
        let matrix = |t: &RawTensor| -> Result<GpuWeight> {
            if t.shape.len() != 2 {
                return Err(Error::tensor(
                    &t.name,
                    format!("shape {:?} is not a matrix", t.shape),
                ));
            }
            GpuWeight::upload(ctx_ref, &t.name, t.dtype, t.rows(), t.cols(), &t.bytes)
        };
        let vector = |t: &RawTensor, n: usize, repeat: usize| -> Result<wgpu::Buffer> {
            if t.n_elements() != n {
                return Err(Error::tensor(
                    &t.name,
                    format!("{} values, expected {n}", t.n_elements()),
                ));
            }
            let v = t.to_f32();
            let tiled: Vec<f32> = v.iter().copied().cycle().take(n * repeat).collect();
            Ok(buffers::upload(ctx_ref, &t.name, &tiled))
        };
        // Stack Q/K/V where every layer can: one type, no biases.
        let stack_qkv = weights.layers.iter().all(|l| {
            l.bq.is_none()
                && l.wq.dtype == l.wk.dtype
                && l.wq.dtype == l.wv.dtype
                && l.wq.shape.len() == 2
                && l.wk.shape.len() == 2
                && l.wv.shape.len() == 2
                && l.wq.cols() == l.wk.cols()
                && l.wq.cols() == l.wv.cols()
        });
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in &weights.layers {
            let bias = match (&l.bq, &l.bk, &l.bv) {
                (Some(bq), Some(bk), Some(bv)) => Some([
                    vector(bq, c.q_dim(), max_batch)?,
                    vector(bk, c.kv_dim(), max_batch)?,
                    vector(bv, c.kv_dim(), max_batch)?,
                ]),
                (None, None, None) => None,
                _ => {
                    return Err(Error::tensor(
                        &l.wq.name,
                        "the layer has some but not all of the Q/K/V biases",
                    ))
                }
            };
            layers.push(GpuLayer {
                attn_norm: vector(&l.attn_norm, c.hidden, 1)?,
                attn_in: if stack_qkv {
                    let bytes = [&l.wq.bytes[..], &l.wk.bytes[..], &l.wv.bytes[..]].concat();
                    let rows = l.wq.rows() + l.wk.rows() + l.wv.rows();
                    let name = format!("{} + {} + {}", l.wq.name, l.wk.name, l.wv.name);
                    let w =
                        GpuWeight::upload(ctx_ref, &name, l.wq.dtype, rows, l.wq.cols(), &bytes)?;
                    AttnIn::Stacked(w)
                } else {
                    AttnIn::Separate([matrix(&l.wq)?, matrix(&l.wk)?, matrix(&l.wv)?])
                },
                wo: matrix(&l.wo)?,
                bias,
                ffn_norm: vector(&l.ffn_norm, c.hidden, 1)?,
                ffn_in: if l.gate.dtype == l.up.dtype
                    && l.gate.shape.len() == 2
                    && l.gate.shape == l.up.shape
                {
                    let bytes = [&l.gate.bytes[..], &l.up.bytes[..]].concat();
                    let rows = l.gate.rows() + l.up.rows();
                    let name = format!("{} + {}", l.gate.name, l.up.name);
                    let w = GpuWeight::upload(
                        ctx_ref,
                        &name,
                        l.gate.dtype,
                        rows,
                        l.gate.cols(),
                        &bytes,
                    )?;
                    FfnIn::Stacked(w)
                } else {
                    FfnIn::Separate(matrix(&l.gate)?, matrix(&l.up)?)
                },
                down: matrix(&l.down)?,
            });
        }
        let embed = weights.embed.as_ref().map(&matrix).transpose()?;
        let head = weights.head.as_ref().map(&matrix).transpose()?;
        let output_norm = weights
            .output_norm
            .as_ref()
            .map(|t| vector(t, c.hidden, 1))
            .transpose()?;
        if spec.embed && embed.is_none() {
            return Err(Error::args(
                "engine",
                "the stage embeds but has no embedding",
            ));
        }
        if spec.head && (output_norm.is_none() || (head.is_none() && embed.is_none())) {
            return Err(Error::args(
                "engine",
                "the stage runs the head but lacks the final norm or the head matrix",
            ));
        }
        let has_bias = layers.iter().any(|l| l.bias.is_some());
        let scratch = Scratch::new(ctx_ref, c, max_batch, has_bias, stack_qkv)?;
        let rope = RopeTable::new(
            ctx_ref,
            u32_of("head size", c.head_dim)?,
            c.rope_base as f64,
            u32_of("context", c.context.max(1))?,
        )?;
        let kernels = Kernels::new(ctx_ref);
        let mut engine = GpuEngine {
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            ctx,
            kernels,
            config,
            spec,
            max_batch,
            embed,
            layers,
            output_norm,
            head,
            rope,
            scratch,
            decode: None,
            prefill: Vec::new(),
            head_steps: Vec::new(),
        };
        engine.decode = Some(engine.build_plan(1)?);
        if engine.spec.head {
            engine.head_steps = engine.build_head()?;
        }
        engine.ctx.check()?;
        Ok(engine)
    }

    /// Opens the default adapter and builds an engine on it, blocking (native only).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(
        config: Config,
        weights: StageWeights<RawTensor>,
        max_batch: usize,
    ) -> Result<Self> {
        let ctx = Arc::new(pollster::block_on(GpuContext::new())?);
        Self::new(ctx, config, weights, max_batch)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Longest chunk of tokens run in one submit.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Bytes of weights a decode step streams (every layer, plus the head if held).
    pub fn weight_bytes(&self) -> u64 {
        let w = |w: &GpuWeight| w.parts.iter().map(|p| p.buffer.size()).sum::<u64>();
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                let ffn_in: u64 = l.ffn_in.weights().into_iter().map(w).sum();
                let attn_in: u64 = l.attn_in.weights().into_iter().map(w).sum();
                attn_in + w(&l.wo) + ffn_in + w(&l.down)
            })
            .sum();
        layers + self.head_matrix().filter(|_| self.spec.head).map_or(0, w)
    }

    fn head_matrix(&self) -> Option<&GpuWeight> {
        self.head.as_ref().or(self.embed.as_ref())
    }

    fn shape(&self, max_positions: usize) -> Result<AttentionShape> {
        let c = &self.config;
        Ok(AttentionShape {
            n_heads: u32_of("heads", c.n_heads)?,
            n_kv_heads: u32_of("KV heads", c.n_kv_heads)?,
            head_dim: u32_of("head size", c.head_dim)?,
            max_positions: u32_of("positions", max_positions)?,
        })
    }

    /// Where a chunk of `n` tokens keeps its Q, K and V: (buffer, first element) of each,
    /// laid out (n, heads, head_dim). Stacked weights write all three into `qkv`, packed for
    /// the chunk size; otherwise they are the separate `q`, `k` and `v` buffers.
    fn qkv_at(&self, n: u32) -> [(&wgpu::Buffer, u32); 3] {
        let s = &self.scratch;
        match &s.qkv {
            Some(b) => {
                let (q, kv) = (self.config.q_dim() as u32, self.config.kv_dim() as u32);
                [(b, 0), (b, n * q), (b, n * (q + kv))]
            }
            None => [(&s.q, 0), (&s.k, 0), (&s.v, 0)],
        }
    }

    /// The engine-side dispatches for chunks of `n` tokens.
    fn build_plan(&self, n: u32) -> Result<DispatchPlan> {
        let (ctx, k, s, c) = (&*self.ctx, &self.kernels, &self.scratch, &self.config);
        let (hidden, q_dim, kv_dim, ffn) = (
            c.hidden as u32,
            c.q_dim() as u32,
            c.kv_dim() as u32,
            c.ffn as u32,
        );
        let nt = n as u64;
        let wbytes = |w: &GpuWeight| w.parts.iter().map(|p| p.buffer.size()).sum::<u64>();
        // A product's cost: weights once, activations per token.
        let lin = |w: &GpuWeight,
                   x: &wgpu::Buffer,
                   y: &wgpu::Buffer,
                   accumulate: bool,
                   role: KernelRole|
         -> Result<Vec<Step>> {
            let a = Product {
                x,
                x_offset: 0,
                n_tokens: n,
                y,
                y_offset: 0,
                y_stride: w.rows as u32,
                accumulate,
            };
            let bytes = wbytes(w) + nt * 4 * (w.cols + w.rows * (1 + accumulate as usize)) as u64;
            let flops = 2 * nt * (w.rows * w.cols) as u64;
            Ok(steps(k.linear(ctx, w, &a)?, role, bytes, flops))
        };
        // The FFN's gate/up product into `gate_up`, (n, ffn) per half.
        let lin_split = |w: &GpuWeight,
                         x: &wgpu::Buffer,
                         y: &wgpu::Buffer,
                         splits: &[Split]|
         -> Result<Vec<Step>> {
            let a = Product {
                x,
                x_offset: 0,
                n_tokens: n,
                y,
                y_offset: 0,
                y_stride: ffn,
                accumulate: false,
            };
            let bytes = wbytes(w) + nt * 4 * (w.cols + w.rows) as u64;
            let flops = 2 * nt * (w.rows * w.cols) as u64;
            Ok(steps(
                k.linear_split(ctx, w, &a, splits)?,
                KernelRole::GateUp,
                bytes,
                flops,
            ))
        };
        let norm = |w: &wgpu::Buffer, role: KernelRole| -> Result<Step> {
            let d = k.rms_norm(ctx, &s.x, w, &s.xn, n, hidden, c.norm_eps)?;
            Ok(step(
                d,
                role,
                nt * 16 * hidden as u64,
                nt * 4 * hidden as u64,
            ))
        };
        let embed = match (&self.embed, self.spec.embed) {
            (Some(table), true) => {
                let ds = k.embed(ctx, table, &s.ids, n, &s.x, 0)?;
                steps(ds, KernelRole::Embed, nt * 8 * hidden as u64, 0)
            }
            _ => Vec::new(),
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut pre = vec![norm(&l.attn_norm, KernelRole::AttnNorm)?];
            let dst: [&wgpu::Buffer; 3] = match &s.raw_qkv {
                Some([a, b, d]) if l.bias.is_some() => [a, b, d],
                _ => [&s.q, &s.k, &s.v],
            };
            let [(qb, _), (_, k_at), (_, v_at)] = self.qkv_at(n);
            match &l.attn_in {
                AttnIn::Stacked(w) => {
                    let splits = [
                        Split {
                            row: q_dim,
                            y_offset: k_at,
                            y_stride: kv_dim,
                        },
                        Split {
                            row: q_dim + kv_dim,
                            y_offset: v_at,
                            y_stride: kv_dim,
                        },
                    ];
                    let a = Product {
                        x: &s.xn,
                        x_offset: 0,
                        n_tokens: n,
                        y: qb,
                        y_offset: 0,
                        y_stride: q_dim,
                        accumulate: false,
                    };
                    let bytes = wbytes(w) + nt * 4 * (w.cols + w.rows) as u64;
                    let flops = 2 * nt * (w.rows * w.cols) as u64;
                    let ds = k.linear_split(ctx, w, &a, &splits)?;
                    pre.extend(steps(ds, KernelRole::Qkv, bytes, flops));
                }
                AttnIn::Separate([wq, wk, wv]) => {
                    pre.extend(lin(wq, &s.xn, dst[0], false, KernelRole::Qkv)?);
                    pre.extend(lin(wk, &s.xn, dst[1], false, KernelRole::Qkv)?);
                    pre.extend(lin(wv, &s.xn, dst[2], false, KernelRole::Qkv)?);
                }
            }
            if let Some(bias) = &l.bias {
                for ((raw, b), (out, dim)) in
                    dst.iter()
                        .zip(bias)
                        .zip([(&s.q, q_dim), (&s.k, kv_dim), (&s.v, kv_dim)])
                {
                    let d = k.add(ctx, raw, b, out, n * dim)?;
                    pre.push(step(
                        d,
                        KernelRole::Bias,
                        nt * 12 * dim as u64,
                        nt * dim as u64,
                    ));
                }
            }
            let layout = c.rope_layout;
            let [(qb, q_at), (kb, k_at), _] = self.qkv_at(n);
            // One token's q and k are adjacent in the stacked layout: one rotation for both.
            let ropes = if n == 1 && s.qkv.is_some() {
                vec![(qb, q_at, c.n_heads + c.n_kv_heads, q_dim + kv_dim)]
            } else {
                vec![
                    (qb, q_at, c.n_heads, q_dim),
                    (kb, k_at, c.n_kv_heads, kv_dim),
                ]
            };
            for (buf, at, heads, dim) in ropes {
                let d = k.rope(
                    ctx,
                    &self.rope,
                    layout,
                    buf,
                    at,
                    &s.positions,
                    n,
                    heads as u32,
                )?;
                pre.push(step(
                    d,
                    KernelRole::Rope,
                    nt * 16 * dim as u64,
                    nt * 3 * dim as u64,
                ));
            }
            let mut post = lin(&l.wo, &s.att, &s.x, true, KernelRole::AttnOut)?;
            post.push(norm(&l.ffn_norm, KernelRole::FfnNorm)?);
            // Gate in gate_up[0..], up in gate_up[up_at..] (both (n, ffn)).
            let up_at = self.max_batch as u32 * ffn;
            match &l.ffn_in {
                FfnIn::Stacked(w) => {
                    let split = Split {
                        row: ffn,
                        y_offset: up_at,
                        y_stride: ffn,
                    };
                    post.extend(lin_split(w, &s.xn, &s.gate_up, &[split])?);
                }
                FfnIn::Separate(g, u) => {
                    post.extend(lin_split(g, &s.xn, &s.gate_up, &[])?);
                    let split = Split {
                        row: 0,
                        y_offset: up_at,
                        y_stride: ffn,
                    };
                    post.extend(lin_split(u, &s.xn, &s.gate_up, &[split])?);
                }
            }
            let d = k.swiglu_at(ctx, &s.gate_up, &s.gate_up, up_at, &s.act, n * ffn)?;
            post.push(step(
                d,
                KernelRole::Swiglu,
                nt * 12 * ffn as u64,
                nt * 6 * ffn as u64,
            ));
            post.extend(lin(&l.down, &s.act, &s.x, true, KernelRole::Down)?);
            layers.push((pre, post));
        }
        Ok(DispatchPlan { n, embed, layers })
    }

    /// A cache's KV-write and attention dispatches for chunks of `n` tokens (built at p0 = 0;
    /// the position word is copied in before every run).
    fn build_kv_plan(&self, cache: &GpuCache, n: u32) -> Result<KvPlan> {
        let (ctx, k, s, c) = (&*self.ctx, &self.kernels, &self.scratch, &self.config);
        let shape = self.shape(cache.max_positions)?;
        let kv = (n as usize * c.kv_dim()) as u64;
        let mut layers = Vec::with_capacity(cache.k.len());
        for (kb, vb) in cache.k.iter().zip(&cache.v) {
            let r = KvRef {
                k: kb,
                v: vb,
                offset: 0,
            };
            let [(q, _), k_new, v_new] = self.qkv_at(n);
            let w = k.kv_write_at(ctx, &shape, &r, [k_new, v_new], n, 0)?;
            // One token gives too few (token, KV head) pairs to fill a CPU adapter's lanes
            // and cores: split the positions (where the tuning does).
            let a = if n == 1 {
                k.attention_split(ctx, &shape, &r, q, &s.att, n, 0)?
            } else {
                vec![k.attention(ctx, &shape, &r, q, &s.att, n, 0)?]
            };
            // Attention's cost depends on the position; the benchmark fills it in.
            let mut layer = vec![step(w, KernelRole::KvWrite, kv * 16, 0)];
            layer.extend(a.into_iter().map(|d| step(d, KernelRole::Attention, 0, 0)));
            layers.push(layer);
        }
        Ok(KvPlan { n, layers })
    }

    /// Final norm of `last`, the LM head into `logits`, and argmax into `best` (last step).
    fn build_head(&self) -> Result<Vec<Step>> {
        let (ctx, k, s, c) = (&*self.ctx, &self.kernels, &self.scratch, &self.config);
        let (Some(norm), Some(head)) = (&self.output_norm, self.head_matrix()) else {
            return Err(Error::args("engine", "the stage does not hold the head"));
        };
        let hidden = c.hidden as u32;
        let vocab = c.vocab as u32;
        let mut out = vec![step(
            k.rms_norm(ctx, &s.last, norm, &s.normed, 1, hidden, c.norm_eps)?,
            KernelRole::HeadNorm,
            16 * hidden as u64,
            4 * hidden as u64,
        )];
        let a = Product {
            x: &s.normed,
            x_offset: 0,
            n_tokens: 1,
            y: &s.logits,
            y_offset: 0,
            y_stride: vocab,
            accumulate: false,
        };
        let wbytes: u64 = head.parts.iter().map(|p| p.buffer.size()).sum();
        out.extend(steps(
            k.linear(ctx, head, &a)?,
            KernelRole::Head,
            wbytes + 4 * (c.hidden + c.vocab) as u64,
            2 * (c.vocab * c.hidden) as u64,
        ));
        out.push(step(
            k.argmax(ctx, &s.logits, 0, vocab, &s.best)?,
            KernelRole::Argmax,
            4 * vocab as u64,
            vocab as u64,
        ));
        Ok(out)
    }

    /// Makes sure plans for `n`-token chunks exist (engine side and the cache's), most
    /// recently used first.
    fn prepare(&mut self, cache: &mut GpuCache, n: u32) -> Result<()> {
        if n > 1 {
            match self.prefill.iter().position(|p| p.n == n) {
                Some(i) => {
                    let p = self.prefill.remove(i);
                    self.prefill.insert(0, p);
                }
                None => {
                    let p = self.build_plan(n)?;
                    self.prefill.insert(0, p);
                    self.prefill.truncate(KEPT_PLANS);
                }
            }
        }
        match cache.plans.iter().position(|p| p.n == n) {
            Some(i) => {
                let p = cache.plans.remove(i);
                cache.plans.insert(0, p);
            }
            None => {
                let p = self.build_kv_plan(cache, n)?;
                cache.plans.insert(0, p);
                // Keep the decode plan whatever happens.
                if cache.plans.len() > KEPT_PLANS + 1 {
                    if let Some(i) = cache.plans.iter().rposition(|p| p.n != 1) {
                        cache.plans.remove(i);
                    }
                }
            }
        }
        Ok(())
    }

    pub(crate) fn plan(&self, n: u32) -> Option<&DispatchPlan> {
        if n == 1 {
            self.decode.as_ref()
        } else {
            self.prefill.iter().find(|p| p.n == n)
        }
    }

    /// Records the layers of one chunk (after its inputs were written): the position copies,
    /// then one compute pass.
    fn record_layers(&self, encoder: &mut wgpu::CommandEncoder, plan: &DispatchPlan, kv: &KvPlan) {
        for pair in &kv.layers {
            for s in pair {
                encoder.copy_buffer_to_buffer(
                    &self.scratch.positions,
                    0,
                    &s.d.params,
                    P0_PARAM_OFFSET,
                    4,
                );
            }
        }
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("mdi stage"),
            timestamp_writes: None,
        });
        for s in &plan.embed {
            s.d.record(&mut pass);
        }
        for ((pre, post), pair) in plan.layers.iter().zip(&kv.layers) {
            for s in pre.iter().chain(pair).chain(post) {
                s.d.record(&mut pass);
            }
        }
    }

    /// Records the head on `last`, and the copy of its result into the readback buffer.
    fn record_head(&self, encoder: &mut wgpu::CommandEncoder, want: Want) {
        let s = &self.scratch;
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("mdi head"),
                timestamp_writes: None,
            });
            let n = if want == Want::Argmax {
                self.head_steps.len()
            } else {
                self.head_steps.len() - 1
            };
            for st in &self.head_steps[..n] {
                st.d.record(&mut pass);
            }
        }
        if want == Want::Argmax {
            encoder.copy_buffer_to_buffer(&s.best, 0, &s.read_best, 0, 8);
        } else {
            let bytes = self.config.vocab as u64 * 4;
            encoder.copy_buffer_to_buffer(&s.logits, 0, &s.read_logits, 0, bytes);
        }
    }

    async fn read_head(&self, want: Want) -> Result<StageOutput> {
        let s = &self.scratch;
        if want == Want::Argmax {
            let b = map_read(&self.ctx, &s.read_best, 8).await?;
            Ok(StageOutput::Token(u32::from_le_bytes([
                b[0], b[1], b[2], b[3],
            ])))
        } else {
            let b = map_read(&self.ctx, &s.read_logits, self.config.vocab as u64 * 4).await?;
            Ok(StageOutput::Logits(f32s(&b)))
        }
    }

    fn check_cache(&self, cache: &GpuCache) -> mdi_core::Result<()> {
        if cache.engine != self.id {
            return Err(mdi_core::Error::Input(
                "this KV cache was made by another GPU engine".into(),
            ));
        }
        Ok(())
    }

    /// `StageEngine::forward`, without blocking: the tokens (or hidden rows) at positions
    /// `cache.len()..` of the sequence.
    pub async fn forward_async(
        &mut self,
        cache: &mut GpuCache,
        input: StageInput<'_>,
        want: Want,
    ) -> mdi_core::Result<StageOutput> {
        use mdi_core::Error as E;
        self.check_cache(cache)?;
        let c = &self.config;
        let n_total = match input {
            StageInput::Tokens(ids) if self.spec.embed => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= c.vocab) {
                    return Err(E::Input(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        c.vocab
                    )));
                }
                ids.len()
            }
            StageInput::Hidden(h) if !self.spec.embed => {
                if h.len() % c.hidden != 0 {
                    return Err(E::Input(format!(
                        "{} hidden values are not whole rows of {}",
                        h.len(),
                        c.hidden
                    )));
                }
                h.len() / c.hidden
            }
            _ => {
                return Err(E::Input(format!(
                    "stage {:?} (embed: {}) got the wrong kind of input",
                    self.spec.layers, self.spec.embed
                )))
            }
        };
        if n_total == 0 {
            return Err(E::Input("no tokens to process".into()));
        }
        if want != Want::Hidden && !self.spec.head {
            return Err(E::Input(format!(
                "stage {:?} does not hold the head",
                self.spec.layers
            )));
        }
        if cache.len + n_total > cache.max_positions {
            return Err(E::ContextFull {
                position: cache.len + n_total - 1,
                context: cache.max_positions,
            });
        }
        let hidden = c.hidden;
        let mut hidden_out = Vec::new();
        let mut start = 0;
        while start < n_total {
            let m = (n_total - start).min(self.max_batch);
            let last_chunk = start + m == n_total;
            self.prepare(cache, m as u32).map_err(mdi_err)?;
            let s = &self.scratch;
            let q = &self.ctx.queue;
            match input {
                StageInput::Tokens(ids) => {
                    q.write_buffer(&s.ids, 0, bytemuck::cast_slice(&ids[start..start + m]))
                }
                StageInput::Hidden(h) => q.write_buffer(
                    &s.x,
                    0,
                    bytemuck::cast_slice(&h[start * hidden..(start + m) * hidden]),
                ),
            }
            let p0 = (cache.len) as u32;
            let positions: Vec<u32> = (p0..p0 + m as u32).collect();
            q.write_buffer(&s.positions, 0, bytemuck::cast_slice(&positions));

            let (Some(plan), Some(kv)) = (self.plan(m as u32), cache.plans.first()) else {
                return Err(mdi_err(Error::args("engine", "plan missing after prepare")));
            };
            let mut encoder = self
                .ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("mdi") });
            self.record_layers(&mut encoder, plan, kv);
            let row_bytes = hidden as u64 * 4;
            if want == Want::Hidden {
                encoder.copy_buffer_to_buffer(&s.x, 0, &s.read_hidden, 0, m as u64 * row_bytes);
            } else if last_chunk {
                encoder.copy_buffer_to_buffer(
                    &s.x,
                    (m as u64 - 1) * row_bytes,
                    &s.last,
                    0,
                    row_bytes,
                );
                self.record_head(&mut encoder, want);
            }
            q.submit([encoder.finish()]);
            cache.len += m;
            if want == Want::Hidden {
                let b = map_read(&self.ctx, &s.read_hidden, m as u64 * row_bytes)
                    .await
                    .map_err(mdi_err)?;
                hidden_out.extend(f32s(&b));
            }
            start += m;
        }
        if want == Want::Hidden {
            return Ok(StageOutput::Hidden(hidden_out));
        }
        self.read_head(want).await.map_err(mdi_err)
    }

    /// `StageEngine::head`, without blocking: final norm + LM head on one hidden row.
    pub async fn head_async(
        &mut self,
        hidden: &[f32],
        want: Want,
    ) -> mdi_core::Result<StageOutput> {
        let c = &self.config;
        if !self.spec.head || self.head_steps.is_empty() {
            return Err(mdi_core::Error::Input(format!(
                "stage {:?} does not hold the head",
                self.spec.layers
            )));
        }
        if hidden.len() != c.hidden {
            return Err(mdi_core::Error::Input(format!(
                "head input has {} values, expected one row of {}",
                hidden.len(),
                c.hidden
            )));
        }
        let s = &self.scratch;
        self.ctx
            .queue
            .write_buffer(&s.last, 0, bytemuck::cast_slice(hidden));
        let mut encoder = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("mdi head"),
            });
        let want = if want == Want::Hidden {
            Want::Logits
        } else {
            want
        };
        self.record_head(&mut encoder, want);
        self.ctx.queue.submit([encoder.finish()]);
        self.read_head(want).await.map_err(mdi_err)
    }

    /// An empty cache for `max_positions` positions: per layer one K and one V buffer.
    /// Bytes of GPU memory a cache of `max_positions` positions takes: f32 keys and values,
    /// (n_kv_heads, max_positions, head_dim) per layer.
    pub fn kv_cache_bytes(&self, max_positions: usize) -> usize {
        mdi_core::oracle::kv_cache_bytes(&self.config, self.layers.len(), max_positions)
    }

    pub fn new_gpu_cache(&mut self, max_positions: usize) -> Result<GpuCache> {
        let c = &self.config;
        if max_positions == 0 {
            return Err(Error::args("engine", "a cache needs at least one position"));
        }
        let bytes = (c.kv_dim() as u64)
            .saturating_mul(max_positions as u64)
            .saturating_mul(4);
        if bytes > self.ctx.max_binding_bytes() {
            return Err(Error::Limit {
                what: format!(
                    "one layer's K cache of {max_positions} positions (use fewer positions)"
                ),
                needed: bytes,
                limit: self.ctx.max_binding_bytes(),
            });
        }
        if max_positions > self.rope.max_positions as usize {
            // Plans bind the table: rebuild them around a larger one.
            self.rope = RopeTable::new(
                &self.ctx,
                self.rope.head_dim,
                c.rope_base as f64,
                u32_of("positions", max_positions)?,
            )?;
            self.prefill.clear();
            self.decode = Some(self.build_plan(1)?);
        }
        let n = self.layers.len();
        let make = |kind: &str, i: usize| {
            let layer = self.spec.layers.start + i;
            buffers::storage(&self.ctx, &format!("{kind} cache, layer {layer}"), bytes)
        };
        Ok(GpuCache {
            engine: self.id,
            k: (0..n).map(|i| make("K", i)).collect(),
            v: (0..n).map(|i| make("V", i)).collect(),
            max_positions,
            len: 0,
            plans: Vec::new(),
        })
    }
}

impl Scratch {
    fn new(
        ctx: &GpuContext,
        c: &Config,
        max_batch: usize,
        bias: bool,
        stacked_qkv: bool,
    ) -> Result<Self> {
        let b = max_batch as u64;
        let limit = ctx.max_binding_bytes();
        // At least `min_elems` elements (the limit applies to the elements asked for).
        let padded = |label: &str, elems: u64, min_elems: u64| -> Result<wgpu::Buffer> {
            if elems * 4 > limit {
                return Err(Error::Limit {
                    what: format!(
                        "scratch `{label}` for a chunk of {max_batch} tokens (lower max_batch)"
                    ),
                    needed: elems * 4,
                    limit,
                });
            }
            Ok(buffers::storage(ctx, label, elems.max(min_elems) * 4))
        };
        let make = |label: &str, elems: u64| padded(label, elems, 0);
        // Inputs of matrix products: at least a whole uniform window, so CPU adapters can
        // read them as uniforms in every chunk (see `Tuning::uniform_x`).
        let input =
            |label: &str, elems: u64| padded(label, elems, mdi_shaders::MAX_X_WINDOW as u64 * 4);
        let readback = |label: &str, bytes: u64| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(8).div_ceil(8) * 8,
                usage: READBACK,
                mapped_at_creation: false,
            })
        };
        let (h, q, kv, f) = (
            c.hidden as u64,
            c.q_dim() as u64,
            c.kv_dim() as u64,
            c.ffn as u64,
        );
        let raw_qkv = if bias {
            Some([
                make("q before bias", b * q)?,
                make("k before bias", b * kv)?,
                make("v before bias", b * kv)?,
            ])
        } else {
            None
        };
        Ok(Scratch {
            ids: make("token ids", b)?,
            positions: make("positions", b)?,
            x: make("x", b * h)?,
            xn: input("x normed", b * h)?,
            q: make("q", b * q)?,
            k: make("k", b * kv)?,
            v: make("v", b * kv)?,
            raw_qkv,
            qkv: if stacked_qkv {
                Some(make("q, k and v", b * (q + 2 * kv))?)
            } else {
                None
            },
            att: input("attention out", b * q)?,
            gate_up: make("gate and up", 2 * b * f)?,
            act: input("swiglu out", b * f)?,
            last: make("last row", h)?,
            normed: input("last row normed", h)?,
            logits: make("logits", c.vocab as u64)?,
            best: make("argmax", 2)?,
            read_hidden: readback("read hidden", b * h * 4),
            read_logits: readback("read logits", c.vocab as u64 * 4),
            read_best: readback("read argmax", 8),
        })
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

type MapSlot = Arc<
    Mutex<(
        Option<std::result::Result<(), wgpu::BufferAsyncError>>,
        Option<std::task::Waker>,
    )>,
>;

/// Completes when a buffer's map callback has run.
struct Mapped(MapSlot);

impl std::future::Future for Mapped {
    type Output = std::result::Result<(), wgpu::BufferAsyncError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.0.take() {
            Some(r) => std::task::Poll::Ready(r),
            None => {
                slot.1 = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }
}

/// Maps the first `bytes` of a persistent readback buffer, copies them out and unmaps it
/// (no buffer is created). Reports device errors raised by the work before it.
pub(crate) async fn map_read(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    bytes: u64,
) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::Readback {
        buffer: format!("of {} bytes", buffer.size()),
        reason,
    };
    let slot: MapSlot = Arc::new(Mutex::new((None, None)));
    let sink = slot.clone();
    buffer.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
        let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = Some(r);
        if let Some(w) = s.1.take() {
            w.wake();
        }
    });
    // Natively the callback runs only when the device is polled; in the browser the event
    // loop runs it.
    #[cfg(not(target_arch = "wasm32"))]
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Device(e.to_string()))?;
    Mapped(slot).await.map_err(|e| fail(e.to_string()))?;
    ctx.check()?;
    let out = {
        let view = buffer
            .get_mapped_range(0..bytes)
            .map_err(|e| fail(e.to_string()))?;
        view.to_vec()
    };
    buffer.unmap();
    Ok(out)
}

/// The blocking contract, natively only: it waits on the readback with pollster. In the browser
/// nothing may block, so there the runtime awaits [`GpuEngine::forward_async`] and
/// [`GpuEngine::head_async`] directly.
#[cfg(not(target_arch = "wasm32"))]
impl StageEngine for GpuEngine {
    type Cache = GpuCache;

    fn spec(&self) -> &StageSpec {
        &self.spec
    }

    fn new_cache(&mut self, max_positions: usize) -> mdi_core::Result<GpuCache> {
        self.new_gpu_cache(max_positions).map_err(mdi_err)
    }

    fn cache_len(&self, cache: &GpuCache) -> usize {
        cache.len
    }

    fn cache_bytes(&self, max_positions: usize) -> usize {
        self.kv_cache_bytes(max_positions)
    }

    fn forward(
        &mut self,
        cache: &mut GpuCache,
        input: StageInput<'_>,
        want: Want,
    ) -> mdi_core::Result<StageOutput> {
        pollster::block_on(self.forward_async(cache, input, want))
    }

    fn head(&mut self, hidden: &[f32], want: Want) -> mdi_core::Result<StageOutput> {
        pollster::block_on(self.head_async(hidden, want))
    }
}
