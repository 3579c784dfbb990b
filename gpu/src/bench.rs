//! The GPU benchmark behind `mdi bench`: decode and prefill speed of a [`GpuEngine`], each
//! kernel's share of a decode step with its achieved GB/s and GFLOP/s, and three adapter probes
//! that give the bounds those rates are held to: a streaming-read kernel, an FMA kernel, and the
//! cost of launching one dispatch (on CPU drivers such as lavapipe a dispatch wakes a thread
//! pool, which can cost as much as a small matrix-vector product itself).
//!
//! Kernel times come from replaying the recorded decode step one role at a time (all of that
//! role's dispatches in one compute pass, several repetitions): where the device has timestamp
//! queries, from the GPU timestamps written at the start and end of each pass; otherwise from
//! the wall clock of the replays. The sum of the roles is printed next to the measured step, so
//! launch and readback overhead stay visible.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use mdi_core::engine::StageInput;
use mdi_core::engine::{StageEngine, StageOutput, Want};
use mdi_core::weights::{RawTensor, StageWeights};
use mdi_core::Config;
use wgpu::util::DeviceExt;

use crate::context::GpuContext;
use crate::engine::GpuEngine;
use crate::error::{Error, Result};
use crate::kernels::Dispatch;
use crate::launch::KernelRole;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Prompt length of the prefill measurement (also the engine's chunk size).
    pub prefill_tokens: usize,
    /// Greedy decode steps timed after the prompt.
    pub decode_tokens: usize,
    /// Repetitions of each kernel role when profiling a decode step.
    pub kernel_reps: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            prefill_tokens: 128,
            decode_tokens: 32,
            kernel_reps: 10,
        }
    }
}

/// One kernel role's part of a decode step.
#[derive(Debug, Clone)]
pub struct KernelRow {
    pub role: &'static str,
    /// Dispatches of this role in one step.
    pub dispatches: usize,
    pub ms_per_step: f64,
    /// Of the sum over roles.
    pub share: f64,
    pub gb_s: f64,
    pub gflop_s: f64,
}

/// Everything measured, with the adapter it ran on.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub adapter: String,
    pub backend: String,
    pub device_type: String,
    /// How kernel times were taken.
    pub timing: String,
    pub layers: usize,
    /// Weight bytes one decode step streams.
    pub weight_bytes: u64,
    pub decode_tokens: usize,
    pub decode_tok_s: f64,
    /// Position of the last profiled decode step (attention reads that many positions).
    pub decode_position: usize,
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    /// Sum of the kernel rows: a decode step without submit and readback overhead.
    pub kernels_ms: f64,
    pub kernels: Vec<KernelRow>,
    pub stream_gb_s: f64,
    pub fma_gflop_s: f64,
    /// Seconds one dispatch costs before its work starts ([`launch_probe`]).
    pub launch_s: f64,
}

fn bench_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Args {
        kernel: "bench",
        reason: format!("{what}: {e}"),
    }
}

fn wait(ctx: &GpuContext) -> Result<()> {
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| Error::Device(e.to_string()))?;
    ctx.check()
}

/// Seconds per repetition of recording `dispatches` into one pass and submitting, after a
/// warm-up run.
fn time_dispatches(ctx: &GpuContext, dispatches: &[&Dispatch], reps: usize) -> Result<f64> {
    let run = || {
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("bench"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench"),
                timestamp_writes: None,
            });
            for d in dispatches {
                d.record(&mut pass);
            }
        }
        ctx.queue.submit([encoder.finish()]);
    };
    run();
    wait(ctx)?;
    let t = Instant::now();
    for _ in 0..reps {
        run();
    }
    wait(ctx)?;
    Ok(t.elapsed().as_secs_f64() / reps.max(1) as f64)
}

/// Seconds per repetition of `dispatches` in one compute pass, from timestamps written at the
/// pass's start and end (after a warm-up run); `None` without timestamp queries.
fn time_dispatches_gpu(
    ctx: &GpuContext,
    dispatches: &[&Dispatch],
    reps: usize,
) -> Result<Option<f64>> {
    if !ctx
        .device
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY)
    {
        return Ok(None);
    }
    let reps = reps.clamp(1, 1024);
    let count = 2 * reps as u32;
    let queries = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("bench timestamps"),
        ty: wgpu::QueryType::Timestamp,
        count,
    });
    let resolved = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("bench timestamps"),
        size: count as u64 * wgpu::QUERY_SIZE as u64,
        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    time_dispatches(ctx, dispatches, 0)?; // warm-up
    let mut encoder = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("bench"),
        });
    for i in 0..reps as u32 {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("bench"),
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &queries,
                beginning_of_pass_write_index: Some(2 * i),
                end_of_pass_write_index: Some(2 * i + 1),
            }),
        });
        for d in dispatches {
            d.record(&mut pass);
        }
    }
    encoder.resolve_query_set(&queries, 0..count, &resolved, 0);
    ctx.queue.submit([encoder.finish()]);
    let words = pollster::block_on(crate::buffers::read_u32(ctx, &resolved, 2 * count as usize))?;
    let ticks: Vec<u64> = words
        .chunks_exact(2)
        .map(|w| w[0] as u64 | (w[1] as u64) << 32)
        .collect();
    let total: u64 = ticks
        .chunks_exact(2)
        .map(|p| p[1].saturating_sub(p[0]))
        .sum();
    let ns = total as f64 * ctx.queue.get_timestamp_period() as f64;
    Ok(Some(ns * 1e-9 / reps as f64))
}

/// Seconds per repetition of `dispatches` in one pass: from GPU timestamps where the device
/// has them (second value `true`), else from the wall clock of the replays.
fn time_best(ctx: &GpuContext, dispatches: &[&Dispatch], reps: usize) -> Result<(f64, bool)> {
    Ok(match time_dispatches_gpu(ctx, dispatches, reps)? {
        Some(s) => (s, true),
        None => (time_dispatches(ctx, dispatches, reps)?, false),
    })
}

/// Builds a probe pipeline and its bind group over `buffers` (binding 0 is the uniform).
fn probe(
    ctx: &GpuContext,
    name: &str,
    source: &str,
    params: &[u32; 4],
    buffers: &[&wgpu::Buffer],
    threads: u32,
) -> Result<Dispatch> {
    let module = ctx
        .device
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
    let pipeline = Arc::new(
        ctx.device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            }),
    );
    let params = ctx
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(name),
            contents: bytemuck::cast_slice(params),
            usage: wgpu::BufferUsages::UNIFORM,
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
        label: Some(name),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    ctx.check()?;
    Ok(Dispatch {
        key: name.to_string(),
        pipeline,
        bind_group,
        params,
        workgroups: [threads.div_ceil(64), 1, 1],
    })
}

/// Streaming-read probe: GB/s of summing a 64 MiB buffer (less where the binding limit is
/// smaller), one contiguous run per invocation.
pub fn stream_probe(ctx: &GpuContext, reps: usize) -> Result<f64> {
    let bytes = (64u64 << 20).min(ctx.max_binding_bytes() / 2 * 2);
    let per_thread = 1024u32; // vec4s: 16 KiB per invocation
    let threads = (bytes / 16 / per_thread as u64) as u32;
    let bytes = threads as u64 * per_thread as u64 * 16;
    let src = crate::buffers::storage(ctx, "stream probe source", bytes);
    let dst = crate::buffers::storage(ctx, "stream probe out", threads as u64 * 4);
    let d = probe(
        ctx,
        "probe_stream",
        include_str!("probes/stream.wgsl"),
        &[threads, per_thread, 0, 0],
        &[&src, &dst],
        threads,
    )?;
    let s = time_dispatches(ctx, &[&d], reps)?;
    Ok(bytes as f64 / s / 1e9)
}

/// FMA probe: GFLOP/s of register-only vec4 fused multiply-adds.
pub fn fma_probe(ctx: &GpuContext, reps: usize) -> Result<f64> {
    let (threads, iters) = (16384u32, 2048u32);
    let dst = crate::buffers::storage(ctx, "fma probe out", threads as u64 * 4);
    let d = probe(
        ctx,
        "probe_fma",
        include_str!("probes/fma.wgsl"),
        &[threads, iters, 0.999f32.to_bits(), 1e-3f32.to_bits()],
        &[&dst],
        threads,
    )?;
    let s = time_dispatches(ctx, &[&d], reps)?;
    Ok(threads as f64 * iters as f64 * 64.0 / s / 1e9)
}

/// Launch probe: seconds one dispatch costs before any work, from a run of 32 one-invocation
/// dispatches that each wait for the one before (as a decode step's kernels do).
pub fn launch_probe(ctx: &GpuContext, reps: usize) -> Result<f64> {
    const RUN: usize = 32;
    let dst = crate::buffers::storage(ctx, "launch probe out", 4);
    let d = probe(
        ctx,
        "probe_launch",
        include_str!("probes/launch.wgsl"),
        &[1, 0, 0.5f32.to_bits(), 1.0f32.to_bits()],
        &[&dst],
        1,
    )?;
    let (s, _) = time_best(ctx, &vec![&d; RUN], reps)?;
    Ok(s / RUN as f64)
}

/// Measures a whole-model (or any head-holding) stage on `ctx`; see the module docs.
pub fn run(
    ctx: Arc<GpuContext>,
    config: Config,
    weights: StageWeights<RawTensor>,
    opts: &BenchOptions,
) -> Result<BenchReport> {
    let info = ctx.info.clone();
    let vocab = config.vocab as u64;
    let n_prefill = opts.prefill_tokens.max(1);
    let mut engine = GpuEngine::new(ctx.clone(), config, weights, n_prefill)?;
    if !engine.spec().embed || !engine.spec().head {
        return Err(bench_err(
            "stage",
            "the benchmark needs a stage with the embedding and the head",
        ));
    }
    let prompt: Vec<u32> = (0..n_prefill as u64)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let positions = n_prefill + opts.decode_tokens + 2;
    let greedy = |engine: &mut GpuEngine, cache: &mut _, ids: &[u32]| -> Result<u32> {
        match engine.forward(cache, StageInput::Tokens(ids), Want::Argmax) {
            Ok(StageOutput::Token(t)) => Ok(t),
            Ok(other) => Err(bench_err("forward", format!("{other:?}"))),
            Err(e) => Err(bench_err("forward", e)),
        }
    };
    // Warm-up: the first use of each pipeline compiles it.
    {
        let mut cache = engine.new_gpu_cache(positions)?;
        let t = greedy(&mut engine, &mut cache, &prompt)?;
        greedy(&mut engine, &mut cache, &[t])?;
    }
    let mut cache = engine.new_gpu_cache(positions)?;
    let t0 = Instant::now();
    let mut token = greedy(&mut engine, &mut cache, &prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for _ in 0..opts.decode_tokens {
        token = greedy(&mut engine, &mut cache, &[token])?;
    }
    let decode_s = t0.elapsed().as_secs_f64();
    let decode_position = engine.cache_len(&cache);

    // Profile the recorded decode step, role by role.
    let c = engine.config().clone();
    let attention_bytes = (c.n_heads * decode_position * c.head_dim * 8 + 2 * c.q_dim() * 4) as u64;
    let attention_flops = (4 * c.n_heads * decode_position * c.head_dim) as u64;
    let mut groups: BTreeMap<KernelRole, (Vec<&Dispatch>, u64, u64)> = BTreeMap::new();
    let decode = engine
        .decode
        .as_ref()
        .ok_or_else(|| bench_err("profile", "no decode plan"))?;
    let kv = cache
        .plans
        .iter()
        .find(|p| p.n == 1)
        .ok_or_else(|| bench_err("profile", "no decode KV plan"))?;
    let mut all = decode.embed.iter().collect::<Vec<_>>();
    for ((pre, post), pair) in decode.layers.iter().zip(&kv.layers) {
        all.extend(pre.iter().chain(pair).chain(post));
    }
    all.extend(&engine.head_steps);
    for s in all {
        let e = groups.entry(s.role).or_default();
        e.0.push(&s.d);
        // (Split attention's combine pass is counted with its first pass.)
        if s.role == KernelRole::Attention && !s.d.key.contains("_combine") {
            e.1 += attention_bytes;
            e.2 += attention_flops;
        } else {
            e.1 += s.bytes;
            e.2 += s.flops;
        }
    }
    let mut kernels = Vec::new();
    let mut timestamps = true;
    for (role, (ds, bytes, flops)) in &groups {
        let (s, stamped) = time_best(&ctx, ds, opts.kernel_reps)?;
        timestamps &= stamped;
        kernels.push(KernelRow {
            role: role.name(),
            dispatches: ds.len(),
            ms_per_step: s * 1e3,
            share: 0.0,
            gb_s: *bytes as f64 / s / 1e9,
            gflop_s: *flops as f64 / s / 1e9,
        });
    }
    let kernels_ms: f64 = kernels.iter().map(|k| k.ms_per_step).sum();
    for k in &mut kernels {
        k.share = k.ms_per_step / kernels_ms;
    }
    let stream_gb_s = stream_probe(&ctx, 10)?;
    let fma_gflop_s = fma_probe(&ctx, 3)?;
    let launch_s = launch_probe(&ctx, opts.kernel_reps)?;
    Ok(BenchReport {
        adapter: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        timing: if timestamps {
            format!(
                "GPU timestamps at the start and end of a pass, {} replays per kernel role",
                opts.kernel_reps
            )
        } else {
            format!(
                "wall clock of {} replays per kernel role (no timestamp queries on this device)",
                opts.kernel_reps
            )
        },
        layers: c.n_layers,
        weight_bytes: engine.weight_bytes(),
        decode_tokens: opts.decode_tokens,
        decode_tok_s: opts.decode_tokens as f64 / decode_s,
        decode_position,
        prefill_tokens: n_prefill,
        prefill_tok_s: n_prefill as f64 / prefill_s,
        kernels_ms,
        kernels,
        stream_gb_s,
        fma_gflop_s,
        launch_s,
    })
}

/// Prints the report as a table: what was measured, the value, on which adapter, against
/// which bound.
pub fn print_table(r: &BenchReport) {
    let on = format!("{} ({}, {})", r.adapter, r.backend, r.device_type);
    println!("GPU benchmark on {on}");
    println!("kernel times: {}", r.timing);
    // Every row names its adapter (short form), so rows pasted elsewhere keep their context.
    let short = r.adapter.split(' ').next().unwrap_or("?").to_string();
    println!(
        "{:<40} {:>10} {:<8} {:<12} bound / target",
        "measured", "value", "unit", "on"
    );
    let row = |what: &str, v: f64, unit: &str, bound: String| {
        println!("{what:<40} {v:>10.2} {unit:<8} {short:<12} {bound}");
    };
    let stream_bound = r.stream_gb_s * 1e9 / r.weight_bytes.max(1) as f64;
    row(
        "probe: streaming read",
        r.stream_gb_s,
        "GB/s",
        "adapter bound for memory-bound kernels".into(),
    );
    row(
        "probe: vec4 FMA",
        r.fma_gflop_s,
        "GFLOP/s",
        "adapter bound for compute-bound kernels".into(),
    );
    row(
        "probe: dispatch launch",
        r.launch_s * 1e6,
        "µs",
        "paid by every dispatch before its work".into(),
    );
    row(
        &format!("decode, greedy, {} steps", r.decode_tokens),
        r.decode_tok_s,
        "tok/s",
        format!(
            "target ≥ 15; weight streaming bound {stream_bound:.1} ({:.1} MB/token at probe GB/s)",
            r.weight_bytes as f64 / 1e6
        ),
    );
    row(
        &format!("prefill, {}-token prompt", r.prefill_tokens),
        r.prefill_tok_s,
        "tok/s",
        format!(
            "target ≥ 2× decode = {:.1} ({:.1}× reached)",
            2.0 * r.decode_tok_s,
            r.prefill_tok_s / r.decode_tok_s.max(1e-9)
        ),
    );
    let dispatches: usize = r.kernels.iter().map(|k| k.dispatches).sum();
    row(
        "decode step: sum of kernel roles",
        r.kernels_ms,
        "ms",
        format!(
            "measured step {:.2} ms (the rest is submit + readback); {dispatches} dispatches \
             × launch probe = {:.2} ms of it",
            1e3 / r.decode_tok_s.max(1e-9),
            dispatches as f64 * r.launch_s * 1e3
        ),
    );
    println!(
        "decode step at position {} ({} layers), per kernel role:",
        r.decode_position, r.layers
    );
    println!(
        "{:<18} {:>5} {:>9} {:>7} {:>9} {:>9} {:<12} bound",
        "kernel role", "disp", "ms/step", "share", "GB/s", "GFLOP/s", "on"
    );
    for k in &r.kernels {
        let bw = 100.0 * k.gb_s / r.stream_gb_s.max(1e-9);
        let fl = 100.0 * k.gflop_s / r.fma_gflop_s.max(1e-9);
        let bound = if k.role.contains("matvec") {
            // Launches are not the kernel's work: split them off with the launch probe, and
            // give the share of the probe that even a kernel with no cost past its launches
            // could show here.
            let s = k.ms_per_step * 1e-3;
            let bytes = k.gb_s * 1e9 * s;
            let launches = k.dispatches as f64 * r.launch_s;
            let at_probe = bytes / (r.stream_gb_s.max(1e-9) * 1e9);
            let cap = 100.0 * at_probe / (launches + at_probe);
            let work = if s > launches {
                format!("{:.0}%", 100.0 * at_probe / (s - launches))
            } else {
                "-".into()
            };
            format!(
                "{bw:.0}% of stream probe (target ≥ 70%; launches cap it at {cap:.0}%; \
                 {work} without launches), {fl:.0}% of FMA probe"
            )
        } else {
            format!("{bw:.0}% of stream probe, {fl:.0}% of FMA probe")
        };
        println!(
            "{:<18} {:>5} {:>9.3} {:>6.1}% {:>9.2} {:>9.2} {short:<12} {bound}",
            k.role,
            k.dispatches,
            k.ms_per_step,
            100.0 * k.share,
            k.gb_s,
            k.gflop_s
        );
    }
}
