//! Kernel paths that only CPU adapters take, against references: products that read their
//! input as a uniform window (`Tuning::uniform_x`; matmul over inputs big enough to be cut into
//! several token windows, with an input offset so windows start unaligned and the last one
//! falls back to storage; matvec with an exact window; the storage path for the same
//! products) against a CPU reference, split outputs of stacked weights, and attention split
//! over positions (`Tuning::attention_splits`) against the single-pass kernel (which
//! `kernels_match_cpu_reference` checks against the CPU). Native only.

#![cfg(not(target_arch = "wasm32"))]

use mdi_core::quant::{dequantize, quantize, DType};
use mdi_gpu::buffers::{read_f32, storage, upload};
use mdi_gpu::{
    submit, AttentionShape, GpuContext, GpuWeight, Kernels, KvBuffers, Product, Split, Strategy,
    Tuning,
};

fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 7919 % 2003) as f32 / 1001.5) - 1.0)
        .collect()
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn windowed_products_match() {
    let ctx = pollster::block_on(GpuContext::new()).expect("these tests need an adapter");
    let (rows, cols, x_offset) = (72usize, 1536usize, 4usize);
    for dtype in [DType::F32, DType::Q4_1, DType::Q8_0] {
        let raw = quantize(dtype, &values(1, rows * cols));
        let mut deq = vec![0f32; rows * cols];
        dequantize(dtype, &raw, &mut deq);
        let w = GpuWeight::upload(&ctx, "w", dtype, rows, cols, &raw).expect("upload");
        for tokens in [1usize, 9, 37] {
            let x = values(tokens, x_offset + tokens * cols);
            let xb = upload(&ctx, "x", &x);
            let mut want = vec![0f32; tokens * rows];
            for t in 0..tokens {
                for r in 0..rows {
                    let s: f64 = (0..cols)
                        .map(|c| deq[r * cols + c] as f64 * x[x_offset + t * cols + c] as f64)
                        .sum();
                    want[t * rows + r] = s as f32;
                }
            }
            for uniform_x in [true, false] {
                let kernels = Kernels::with_tuning(Tuning {
                    uniform_x,
                    ..Tuning::CPU
                });
                assert_eq!(kernels.tuning.strategy, Strategy::RowPerThread);
                let y = storage(&ctx, "y", (tokens * rows * 4) as u64);
                let a = Product {
                    x: &xb,
                    x_offset: x_offset as u32,
                    n_tokens: tokens as u32,
                    y: &y,
                    y_offset: 0,
                    y_stride: rows as u32,
                    accumulate: false,
                };
                let d = kernels.linear(&ctx, &w, &a).expect("dispatch");
                if uniform_x && tokens > 9 {
                    assert!(d.len() > 1, "{tokens} tokens of {cols} fit one window");
                    // (The last window may not fit the buffer and fall back to storage.)
                    assert!(d[0].key.contains("_xu"), "no uniform window: {}", d[0].key);
                }
                submit(&ctx, &d);
                let got = pollster::block_on(read_f32(&ctx, &y, tokens * rows)).expect("read");
                ctx.check().expect("device error");
                let err = rel_l2(&got, &want);
                assert!(
                    err <= 1e-5,
                    "{dtype:?} T={tokens} uniform_x={uniform_x}: relative L2 {err:e}"
                );
            }
        }
    }
}

#[test]
fn split_outputs_land_in_both_regions() {
    let ctx = pollster::block_on(GpuContext::new()).expect("these tests need an adapter");
    let (rows, cols, split_row) = (40usize, 64usize, 24usize);
    let raw = quantize(DType::Q8_0, &values(3, rows * cols));
    let mut deq = vec![0f32; rows * cols];
    dequantize(DType::Q8_0, &raw, &mut deq);
    let w = GpuWeight::upload(&ctx, "w", DType::Q8_0, rows, cols, &raw).expect("upload");
    for tuning in [Tuning::CPU, Tuning::GPU] {
        for tokens in [1usize, 5] {
            let x = values(7, tokens * cols);
            let xb = upload(&ctx, "x", &x);
            // Region 1 at 0 and region 2 at 1000, both with a stride of 24 per token.
            let stride = split_row;
            let y = upload(&ctx, "y", &vec![f32::NAN; 1000 + tokens * stride]);
            let a = Product {
                x: &xb,
                x_offset: 0,
                n_tokens: tokens as u32,
                y: &y,
                y_offset: 0,
                y_stride: stride as u32,
                accumulate: false,
            };
            let split = Split {
                row: split_row as u32,
                y_offset: 1000,
                y_stride: stride as u32,
            };
            let d = Kernels::with_tuning(tuning)
                .linear_split(&ctx, &w, &a, &[split])
                .expect("dispatch");
            submit(&ctx, &d);
            let got = pollster::block_on(read_f32(&ctx, &y, 1000 + tokens * stride)).unwrap();
            for t in 0..tokens {
                for r in 0..rows {
                    let want: f32 = (0..cols).map(|c| deq[r * cols + c] * x[t * cols + c]).sum();
                    let at = if r < split_row {
                        t * stride + r
                    } else {
                        1000 + t * stride + r - split_row
                    };
                    assert!(
                        (got[at] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{:?} T={tokens} row {r} token {t}: {} vs {want}",
                        tuning.strategy,
                        got[at]
                    );
                }
            }
        }
    }
}

#[test]
fn split_attention_matches_single_pass() {
    let ctx = pollster::block_on(GpuContext::new()).expect("these tests need an adapter");
    let shape = AttentionShape {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 64,
        max_positions: 80,
    };
    let layer = 2 * 80 * 64;
    let kc = upload(&ctx, "k", &values(11, 2 * layer));
    let vc = upload(&ctx, "v", &values(13, 2 * layer));
    let cache = KvBuffers {
        k: &kc,
        v: &vc,
        offset: layer as u32,
    };
    for (tokens, p0) in [(1u32, 0u32), (1, 50), (3, 20), (1, 79)] {
        let q = upload(
            &ctx,
            "q",
            &values(17 + p0 as usize, tokens as usize * 6 * 64),
        );
        let n = tokens as usize * 6 * 64;
        let single = storage(&ctx, "single", n as u64 * 4);
        let k = Kernels::with_tuning(Tuning::CPU);
        let d = k
            .attention(&ctx, &shape, &cache, &q, &single, tokens, p0)
            .expect("attention");
        submit(&ctx, &[d]);
        let want = pollster::block_on(read_f32(&ctx, &single, n)).unwrap();
        for splits in [2u32, 16, 64] {
            let k = Kernels::with_tuning(Tuning {
                attention_splits: splits,
                ..Tuning::CPU
            });
            let out = upload(&ctx, "out", &vec![f32::NAN; n]);
            let d = k
                .attention_split(&ctx, &shape, &cache, &q, &out, tokens, p0)
                .expect("split attention");
            assert_eq!(d.len(), 2, "not split");
            submit(&ctx, &d);
            let got = pollster::block_on(read_f32(&ctx, &out, n)).unwrap();
            ctx.check().expect("device error");
            let err = rel_l2(&got, &want);
            assert!(
                err <= 1e-5,
                "T={tokens} p0={p0} splits={splits}: relative L2 {err:e}"
            );
        }
    }
}
