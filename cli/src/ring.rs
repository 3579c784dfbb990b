//! `mdi generate --nodes N`: a ring inside this process, each node on its own thread holding
//! only its own layers, linked by real transports — the runtime's in-process ring with the
//! engine the command line chose.

use std::sync::Arc;

use anyhow::Result;
use mdi_core::starter::SeqRequest;
use mdi_core::Oracle;
use mdi_gpu::{GpuContext, GpuEngine};
use mdi_runtime::exec::{BoxExec, ThreadedExec};
pub use mdi_runtime::local::{percentile, NodeStats, RingOptions, RingRun, TransportKind};

use crate::Model;

/// Run `requests` through a ring of CPU-oracle nodes.
pub fn run_ring(model: &Model, requests: Vec<SeqRequest>, opts: &RingOptions) -> Result<RingRun> {
    mdi_runtime::local::run_ring(
        &model.config,
        model.store.as_ref(),
        requests,
        opts,
        |config, weights| {
            let oracle = Oracle::new(config.clone(), weights)?;
            let bytes = oracle.weight_bytes();
            Ok(Box::new(ThreadedExec::new(oracle, bytes, "oracle")) as BoxExec)
        },
    )
}

/// Run `requests` through a ring of CPU-engine nodes, the machine's cores shared among them.
pub fn run_ring_cpu(
    model: &Model,
    requests: Vec<SeqRequest>,
    opts: &RingOptions,
) -> Result<RingRun> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / opts.nodes.max(1)).max(1);
    mdi_runtime::local::run_ring(
        &model.config,
        model.store.as_ref(),
        requests,
        opts,
        move |config, weights| {
            let engine = mdi_cpu::CpuEngine::new(config.clone(), weights, threads)?;
            let bytes = engine.weight_bytes();
            Ok(Box::new(ThreadedExec::with_batch(engine, bytes, "cpu", 8)) as BoxExec)
        },
    )
}

/// Run `requests` through a ring of GPU nodes sharing one device.
pub fn run_ring_gpu(
    model: &Model,
    requests: Vec<SeqRequest>,
    opts: &RingOptions,
    ctx: Arc<GpuContext>,
) -> Result<RingRun> {
    mdi_runtime::local::run_ring(
        &model.config,
        model.store.as_ref(),
        requests,
        opts,
        move |config, weights| {
            let engine = GpuEngine::new(ctx.clone(), config.clone(), weights, 128)?;
            let bytes = engine.weight_bytes();
            Ok(Box::new(ThreadedExec::new(engine, bytes, "gpu")) as BoxExec)
        },
    )
}
