//! Throughput of the main kernels at SmolLM2-135M sizes on the default adapter, printed as a
//! table (run with `cargo test -p mdi-gpu --release --test kernel_throughput -- --ignored
//! --nocapture`). Ignored by default: it measures, it does not assert. Used to pick the
//! [`Tuning`] defaults per adapter type.

#![cfg(not(target_arch = "wasm32"))]

use std::time::Instant;

use mdi_core::quant::{quantize, DType};
use mdi_gpu::buffers::{storage, upload};
use mdi_gpu::{
    submit, AttentionShape, Dispatch, GpuContext, GpuWeight, Kernels, KvBuffers, Product, Strategy,
    Tuning,
};

/// Runs `dispatches` `reps` times after one warm-up (pipeline JIT), returns seconds per rep.
fn time(ctx: &GpuContext, dispatches: &[Dispatch], reps: usize) -> f64 {
    let wait = || {
        ctx.device
            .poll(mdi_gpu::wgpu::PollType::wait_indefinitely())
            .expect("poll");
    };
    submit(ctx, dispatches);
    wait();
    let t = Instant::now();
    for _ in 0..reps {
        submit(ctx, dispatches);
    }
    wait();
    t.elapsed().as_secs_f64() / reps as f64
}

const STRATEGIES: [Strategy; 2] = [Strategy::RowPerThread, Strategy::RowPerWorkgroup];

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0)
        .collect()
}

#[test]
#[ignore]
fn kernel_throughput() {
    let ctx = pollster::block_on(GpuContext::new()).expect("GPU kernel benchmark needs an adapter");
    println!("adapter: {} ({:?})", ctx.info.name, ctx.info.device_type);
    let stream = mdi_gpu::bench::stream_probe(&ctx, 10).expect("stream probe");
    let launch = mdi_gpu::bench::launch_probe(&ctx, 10).expect("launch probe");
    println!(
        "stream probe: {stream:.2} GB/s; launch probe: {:.1} µs per dispatch; uniform binding \
         limit {} bytes",
        launch * 1e6,
        ctx.limits.max_uniform_buffer_binding_size
    );
    println!("{:<44} {:>10} {:>12}", "kernel (shape)", "ms/call", "rate");
    let matrices = [
        ("LM head q8_0 49152x576", DType::Q8_0, 49152, 576),
        ("ffn_up q4_1 1536x576", DType::Q4_1, 1536, 576),
        ("ffn_down q4_1 576x1536", DType::Q4_1, 576, 1536),
        ("attn_q f32 576x576", DType::F32, 576, 576),
    ];
    for (name, dtype, rows, cols) in matrices {
        let raw = quantize(dtype, &values(rows * cols));
        let w = GpuWeight::upload(&ctx, name, dtype, rows, cols, &raw).expect("upload");
        let x = upload(&ctx, "x", &values(cols * 64));
        let y = storage(&ctx, "y", (rows * 64 * 4) as u64);
        let configs = [16u32, 64]
            .map(|wg| (Strategy::RowPerThread, wg))
            .into_iter()
            .chain([(Strategy::RowPerWorkgroup, 64)]);
        for (strategy, matvec_wg) in configs {
            let k = Kernels::with_tuning(Tuning {
                strategy,
                matvec_wg,
                ..Tuning::CPU
            });
            let a = Product {
                x: &x,
                x_offset: 0,
                n_tokens: 1,
                y: &y,
                y_offset: 0,
                y_stride: rows as u32,
                accumulate: false,
            };
            let d = k.matvec(&ctx, &w, &a).expect("matvec");
            let s = time(&ctx, &d, 10);
            let gbs = raw.len() as f64 / s / 1e9;
            println!(
                "{:<44} {:>10.3} {:>8.2} GB/s",
                format!("matvec {strategy:?} wg{matvec_wg} {name}"),
                s * 1e3,
                gbs
            );
        }
        let cases = [16u32, 64].map(|t| STRATEGIES.map(|s| (t, s)));
        for (t, strategy) in cases.into_iter().flatten() {
            let k = Kernels::with_tuning(Tuning {
                strategy,
                ..Tuning::CPU
            });
            let a = Product {
                x: &x,
                x_offset: 0,
                n_tokens: t,
                y: &y,
                y_offset: 0,
                y_stride: rows as u32,
                accumulate: false,
            };
            let d = k.matmul(&ctx, &w, &a).expect("matmul");
            let s = time(&ctx, &d, 3);
            let gflops = 2.0 * (rows * cols) as f64 * t as f64 / s / 1e9;
            println!(
                "{:<44} {:>10.3} {:>6.2} GFLOP/s",
                format!("matmul {strategy:?} T={t} {name}"),
                s * 1e3,
                gflops
            );
        }
    }
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        max_positions: 1024,
    };
    let cache_len = (3 * 1024 * 64 * 4) as u64;
    let kc = upload(&ctx, "k", &values(3 * 1024 * 64));
    let vc = upload(&ctx, "v", &values(3 * 1024 * 64));
    let q = upload(&ctx, "q", &values(16 * 9 * 64));
    let out = storage(&ctx, "out", 16 * 9 * 64 * 4);
    assert!(kc.size() >= cache_len);
    for wg in [1u32, 8, 32, 64] {
        let k = Kernels::with_tuning(Tuning {
            attention_wg: wg,
            ..Tuning::CPU
        });
        let cache = KvBuffers {
            k: &kc,
            v: &vc,
            offset: 0,
        };
        for (t, p0) in [(1u32, 511u32), (16, 496)] {
            let d = k
                .attention(&ctx, &shape, &cache, &q, &out, t, p0)
                .expect("attention");
            let s = time(&ctx, &[d], 5);
            println!(
                "{:<44} {:>10.3}",
                format!("attention wg={wg} T={t} at 512 (9q/3kv x 64)"),
                s * 1e3
            );
            for attention_splits in [8u32, 16, 32] {
                let k = Kernels::with_tuning(Tuning {
                    attention_wg: wg,
                    attention_splits,
                    ..Tuning::CPU
                });
                let d = k
                    .attention_split(&ctx, &shape, &cache, &q, &out, t, p0)
                    .expect("split attention");
                let s = time(&ctx, &d, 5);
                println!(
                    "{:<44} {:>10.3}",
                    format!("attention {attention_splits} splits wg={wg} T={t} at 512"),
                    s * 1e3
                );
            }
        }
    }
}
