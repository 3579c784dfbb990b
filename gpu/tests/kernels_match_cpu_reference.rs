//! Every kernel against a plain CPU reference, on fresh seeded random inputs (never zeros), odd
//! sizes and outputs poisoned with NaN before each run, with explicit tolerances: relative L2
//! error ≤ 1e-5 on f32 paths; quantized products ≤ 1e-4 against the same oracle applied to the
//! dequantized weights (`mdi_core::quant::dequantize`). A kernel that skips an element, reads
//! past its inputs (the KV cache beyond the causal window is NaN too) or decodes a block wrongly
//! fails here.
//!
//! Bodies take `&GpuContext` and are written once: natively each `#[test]` wrapper runs its body
//! on one shared device (lavapipe without a GPU); on wasm32 each `#[wasm_bindgen_test]` wrapper
//! runs the same body in headless Chromium's WebGPU (SwiftShader: no shader-f16, 256 invocations
//! per workgroup), see `scripts/test-browser.sh`. Without an adapter the tests fail with
//! instructions instead of passing vacuously.

use anyhow::{ensure, Context, Result};
use mdi_core::quant::{dequantize, quantize, DType};
use mdi_gpu::buffers::{read_f32, read_u32, upload};
use mdi_gpu::layout::packed_shape;
use mdi_gpu::{
    submit, AttentionShape, Dispatch, GpuContext, GpuWeight, Kernels, KvBuffers, Product,
    RopeLayout, RopeTable, Strategy, Tuning,
};

#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

/// Progress lines (tolerance margins): stderr natively, the browser console on wasm32, where
/// stderr goes nowhere. Both show with `--nocapture` or on failure.
macro_rules! note {
    ($($t:tt)*) => {{
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!($($t)*);
        #[cfg(target_arch = "wasm32")]
        wasm_bindgen_test::console_log!($($t)*);
    }};
}

// ---------- helpers ----------

/// xorshift64*: tiny, seeded, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }
}

/// Relative L2 error of `got` against `want` (NaN if any value is NaN, which fails checks).
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) -> Result<()> {
    let err = rel_l2(got, want);
    // Visible with --nocapture: how far inside the tolerance each path is.
    note!("{what}: relative L2 error {err:.1e} (tolerance {tol:.0e})");
    ensure!(err <= tol, "{what}: relative L2 error {err:e} > {tol:e}");
    Ok(())
}

/// A buffer of `n` f32 NaNs (varied payloads), so unwritten outputs cannot pass.
fn poisoned(ctx: &GpuContext, n: usize) -> mdi_gpu::wgpu::Buffer {
    let nan: Vec<u32> = (0..n as u32)
        .map(|i| 0x7fc0_0000 | (i & 0x3f_ffff))
        .collect();
    upload(ctx, "poisoned", &nan)
}

async fn run(ctx: &GpuContext, dispatches: &[Dispatch]) {
    submit(ctx, dispatches);
}

#[cfg(not(target_arch = "wasm32"))]
fn shared_context() -> &'static GpuContext {
    use std::sync::OnceLock;
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| match pollster::block_on(GpuContext::new()) {
        Ok(ctx) => ctx,
        Err(e) => panic!("GPU kernel tests need an adapter: {e}"),
    })
}

/// The browser's device, opened by the first test and kept for the page's lifetime (tests in
/// one page run one after another on the single JS thread).
#[cfg(target_arch = "wasm32")]
async fn shared_context() -> std::rc::Rc<GpuContext> {
    use std::cell::RefCell;
    use std::rc::Rc;
    thread_local!(static CTX: RefCell<Option<Rc<GpuContext>>> = const { RefCell::new(None) });
    if let Some(ctx) = CTX.with(|c| c.borrow().clone()) {
        return ctx;
    }
    let ctx = match GpuContext::new().await {
        Ok(ctx) => Rc::new(ctx),
        Err(e) => panic!("GPU kernel tests need a WebGPU adapter in the browser: {e}"),
    };
    note!("browser adapter: {:?}", ctx.info);
    CTX.with(|c| *c.borrow_mut() = Some(ctx.clone()));
    ctx
}

/// The adapter for failure messages (browsers report no name, so the backend too).
fn adapter(ctx: &GpuContext) -> String {
    format!("{:?} adapter `{}`", ctx.info.backend, ctx.info.name)
}

fn both_tunings() -> [Tuning; 2] {
    [Tuning::CPU, Tuning::GPU]
}

/// Random weights of `dtype` as (raw bytes, dequantized values).
fn random_weights(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let raw = quantize(dtype, &rng.vec(rows * cols));
    let mut deq = vec![0f32; rows * cols];
    dequantize(dtype, &raw, &mut deq);
    (raw, deq)
}

/// A per-part byte limit that fits `rows` rows, to force splitting of small test matrices.
fn part_limit(dtype: DType, rows: usize, cols: usize) -> u64 {
    packed_shape(dtype, rows, cols).words as u64 * 4
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-4
    }
}

/// Columns for a dtype: odd for the 8-value float units, whole blocks for quantized types.
fn odd_cols(dtype: DType) -> usize {
    if dtype.is_quantized() {
        96 + 32
    } else {
        96 + 40
    }
}

// ---------- oracles ----------

/// y[t, r] = sum_c w[r, c] x[t, c] in f64.
fn cpu_matmul(w: &[f32], x: &[f32], rows: usize, cols: usize, tokens: usize) -> Vec<f32> {
    let mut y = vec![0f32; tokens * rows];
    for t in 0..tokens {
        for r in 0..rows {
            let s: f64 = (0..cols)
                .map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64)
                .sum();
            y[t * rows + r] = s as f32;
        }
    }
    y
}

/// RoPE straight from the definition, θ_i = base^(−2i/head_dim), in f64.
fn cpu_rope(
    x: &mut [f32],
    positions: &[u32],
    n_heads: usize,
    hd: usize,
    base: f64,
    layout: RopeLayout,
) {
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let b = (t * n_heads + h) * hd;
            for i in 0..hd / 2 {
                let theta = pos as f64 * base.powf(-2.0 * i as f64 / hd as f64);
                let (a, c) = match layout {
                    RopeLayout::AdjacentPairs => (b + 2 * i, b + 2 * i + 1),
                    RopeLayout::RotateHalf => (b + i, b + i + hd / 2),
                };
                let (x0, x1) = (x[a] as f64, x[c] as f64);
                x[a] = (x0 * theta.cos() - x1 * theta.sin()) as f32;
                x[c] = (x0 * theta.sin() + x1 * theta.cos()) as f32;
            }
        }
    }
}

/// Causal GQA attention over caches (n_kv, max_pos, hd), in f64.
fn cpu_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionShape,
    tokens: usize,
    p0: usize,
) -> Vec<f32> {
    let (nh, nkv, hd, mp) = (
        s.n_heads as usize,
        s.n_kv_heads as usize,
        s.head_dim as usize,
        s.max_positions as usize,
    );
    let mut out = vec![0f32; tokens * nh * hd];
    let scale = 1.0 / (hd as f64).sqrt();
    for t in 0..tokens {
        for h in 0..nh {
            let kvh = h / (nh / nkv);
            let qv = &q[(t * nh + h) * hd..][..hd];
            let n = p0 + t + 1;
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    let kr = &k[(kvh * mp + j) * hd..][..hd];
                    qv.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 = (0..n)
                    .map(|j| e[j] * v[(kvh * mp + j) * hd + d] as f64)
                    .sum();
                out[(t * nh + h) * hd + d] = (acc / z) as f32;
            }
        }
    }
    out
}

// ---------- bodies ----------

async fn embed_gathers_rows(ctx: &GpuContext) -> Result<()> {
    let mut rng = Rng::new(1);
    let kernels = Kernels::new(ctx);
    let (rows, tokens) = (37usize, 5usize);
    for dtype in DType::ALL {
        let cols = odd_cols(dtype);
        let (raw, deq) = random_weights(&mut rng, dtype, rows, cols);
        // A small part limit splits the table into several bindings, as the LM head needs.
        let table = GpuWeight::upload_with_part_limit(
            ctx,
            "embd",
            dtype,
            rows,
            cols,
            &raw,
            part_limit(dtype, 12, cols),
        )?;
        ensure!(
            table.parts.len() >= 3,
            "{dtype}: {} parts",
            table.parts.len()
        );
        let mut ids: Vec<u32> = (0..tokens).map(|_| rng.below(rows as u32)).collect();
        ids[0] = rows as u32 - 1;
        ids[1] = 0;
        let out_offset = 8usize;
        let out = poisoned(ctx, out_offset + tokens * cols);
        let ids_buf = upload(ctx, "ids", &ids);
        let d = kernels.embed(
            ctx,
            &table,
            &ids_buf,
            tokens as u32,
            &out,
            out_offset as u32,
        )?;
        run(ctx, &d).await;
        let got = read_f32(ctx, &out, out_offset + tokens * cols).await?;
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| deq[i as usize * cols..][..cols].to_vec())
            .collect();
        ensure!(
            got[out_offset..] == want[..],
            "{dtype}: embedding rows differ"
        );
    }
    Ok(())
}

async fn rms_norm_matches(ctx: &GpuContext) -> Result<()> {
    let mut rng = Rng::new(2);
    let (rows, n, eps) = (5usize, 150usize, 1e-5f32);
    for tuning in both_tunings() {
        let kernels = Kernels::with_tuning(tuning);
        let x = rng.vec(rows * n);
        let w = rng.vec(n);
        let out = poisoned(ctx, rows * n);
        let d = kernels.rms_norm(
            ctx,
            &upload(ctx, "x", &x),
            &upload(ctx, "w", &w),
            &out,
            rows as u32,
            n as u32,
            eps,
        )?;
        run(ctx, &[d]).await;
        let got = read_f32(ctx, &out, rows * n).await?;
        let mut want = vec![0f32; rows * n];
        for r in 0..rows {
            let row = &x[r * n..][..n];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for i in 0..n {
                want[r * n + i] = (row[i] as f64 * inv * w[i] as f64) as f32;
            }
        }
        check(&format!("rmsnorm {:?}", tuning.strategy), &got, &want, 1e-5)?;
    }
    Ok(())
}

async fn matvec_matches(ctx: &GpuContext) -> Result<()> {
    let mut rng = Rng::new(3);
    let rows = 37usize;
    for tuning in both_tunings() {
        let kernels = Kernels::with_tuning(tuning);
        for dtype in DType::ALL {
            let cols = odd_cols(dtype);
            let (raw, deq) = random_weights(&mut rng, dtype, rows, cols);
            let limit = part_limit(dtype, 16, cols);
            let w = GpuWeight::upload_with_part_limit(ctx, "w", dtype, rows, cols, &raw, limit)?;
            ensure!(w.parts.len() >= 2, "{dtype}: {} parts", w.parts.len());
            let x = rng.vec(4 + cols);
            let xb = upload(ctx, "x", &x);
            let want = cpu_matmul(&deq, &x[4..], rows, cols, 1);
            let what = format!("matvec {dtype} {:?}", tuning.strategy);

            // Overwrite, at an output offset.
            let y = poisoned(ctx, 3 + rows);
            let a = Product {
                x: &xb,
                x_offset: 4,
                n_tokens: 1,
                y: &y,
                y_offset: 3,
                y_stride: rows as u32,
                accumulate: false,
            };
            run(ctx, &kernels.matvec(ctx, &w, &a)?).await;
            let got = read_f32(ctx, &y, 3 + rows).await?;
            check(&what, &got[3..], &want, tolerance(dtype))?;

            // Accumulate onto a residual.
            let resid = rng.vec(rows);
            let y = upload(ctx, "resid", &resid);
            let a = Product {
                y: &y,
                y_offset: 0,
                accumulate: true,
                ..a
            };
            run(ctx, &kernels.matvec(ctx, &w, &a)?).await;
            let got = read_f32(ctx, &y, rows).await?;
            let want: Vec<f32> = want.iter().zip(&resid).map(|(a, b)| a + b).collect();
            check(&format!("{what} accumulate"), &got, &want, tolerance(dtype))?;
        }
    }
    Ok(())
}

async fn matmul_matches(ctx: &GpuContext) -> Result<()> {
    let mut rng = Rng::new(4);
    let rows = 101usize; // two row tiles, the second partial
    let cases = both_tunings().map(|t| DType::ALL.map(|d| (t, d)));
    for (tuning, dtype) in cases.into_iter().flatten() {
        let kernels = Kernels::with_tuning(tuning);
        let strategy = tuning.strategy;
        let cols = odd_cols(dtype);
        let (raw, deq) = random_weights(&mut rng, dtype, rows, cols);
        let limit = part_limit(dtype, 70, cols);
        let w = GpuWeight::upload_with_part_limit(ctx, "w", dtype, rows, cols, &raw, limit)?;
        ensure!(w.parts.len() == 2, "{dtype}: {} parts", w.parts.len());
        for tokens in [5usize, 33] {
            let x = rng.vec(tokens * cols);
            let xb = upload(ctx, "x", &x);
            let stride = rows + 3;
            let y = poisoned(ctx, tokens * stride);
            let a = Product {
                x: &xb,
                x_offset: 0,
                n_tokens: tokens as u32,
                y: &y,
                y_offset: 0,
                y_stride: stride as u32,
                accumulate: false,
            };
            run(ctx, &kernels.matmul(ctx, &w, &a)?).await;
            let got = read_f32(ctx, &y, tokens * stride).await?;
            let got: Vec<f32> = (0..tokens)
                .flat_map(|t| got[t * stride..][..rows].to_vec())
                .collect();
            let want = cpu_matmul(&deq, &x, rows, cols, tokens);
            check(
                &format!("matmul {dtype} {strategy:?} T={tokens}"),
                &got,
                &want,
                tolerance(dtype),
            )?;

            let resid = rng.vec(tokens * rows);
            let y = upload(ctx, "resid", &resid);
            let a = Product {
                y: &y,
                y_stride: rows as u32,
                accumulate: true,
                ..a
            };
            run(ctx, &kernels.matmul(ctx, &w, &a)?).await;
            let got = read_f32(ctx, &y, tokens * rows).await?;
            let want: Vec<f32> = want.iter().zip(&resid).map(|(a, b)| a + b).collect();
            check(
                &format!("matmul {dtype} {strategy:?} T={tokens} accumulate"),
                &got,
                &want,
                tolerance(dtype),
            )?;
        }
    }
    Ok(())
}

async fn rope_rotates_both_layouts(ctx: &GpuContext) -> Result<()> {
    let mut rng = Rng::new(5);
    let kernels = Kernels::new(ctx);
    let (tokens, n_heads, hd, base) = (5usize, 6usize, 64usize, 100_000f64);
    let table = RopeTable::new(ctx, hd as u32, base, 64)?;
    for layout in [RopeLayout::AdjacentPairs, RopeLayout::RotateHalf] {
        let positions: Vec<u32> = vec![0, 1, 17, 40, 63];
        let x = rng.vec(2 + tokens * n_heads * hd);
        let xb = upload(ctx, "x", &x);
        let pb = upload(ctx, "positions", &positions);
        let d = kernels.rope(
            ctx,
            &table,
            layout,
            &xb,
            2,
            &pb,
            tokens as u32,
            n_heads as u32,
        )?;
        run(ctx, &[d]).await;
        let got = read_f32(ctx, &xb, x.len()).await?;
        let mut want = x.clone();
        cpu_rope(&mut want[2..], &positions, n_heads, hd, base, layout);
        ensure!(got[..2] == x[..2], "rope wrote before x_offset");
        check(&format!("rope {layout:?}"), &got[2..], &want[2..], 1e-5)?;
    }
    Ok(())
}

async fn attention_is_causal_gqa(ctx: &GpuContext) -> Result<()> {
    let mut rng = Rng::new(6);
    let shape = AttentionShape {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 64,
        max_positions: 40,
    };
    let (nkv, hd, mp) = (2usize, 64usize, 40usize);
    let layer = nkv * mp * hd;
    for (wg, tuning) in [1, 8, 64]
        .into_iter()
        .flat_map(|wg| both_tunings().map(|t| (wg, t)))
    {
        let kernels = Kernels::with_tuning(Tuning {
            attention_wg: wg,
            ..tuning
        });
        // Two layers in one buffer; this is layer 1. Everything starts as NaN, so reading any
        // position past a token's causal window poisons its output.
        let kc = poisoned(ctx, 2 * layer);
        let vc = poisoned(ctx, 2 * layer);
        let cache = KvBuffers {
            k: &kc,
            v: &vc,
            offset: layer as u32,
        };
        let mut k_cpu = vec![f32::NAN; layer];
        let mut v_cpu = vec![f32::NAN; layer];
        // Prefill 11 tokens, then a chunk of 5, then one decode step.
        let mut p0 = 0usize;
        for tokens in [11usize, 5, 1] {
            let n = tokens * nkv * hd;
            let (k_new, v_new) = (rng.vec(n), rng.vec(n));
            let q = rng.vec(tokens * 6 * hd);
            let out = poisoned(ctx, q.len());
            let kb = upload(ctx, "k", &k_new);
            let vb = upload(ctx, "v", &v_new);
            let qb = upload(ctx, "q", &q);
            let d1 =
                kernels.kv_write(ctx, &shape, &cache, &kb, &vb, 0, tokens as u32, p0 as u32)?;
            let d2 = kernels.attention(ctx, &shape, &cache, &qb, &out, tokens as u32, p0 as u32)?;
            run(ctx, &[d1, d2]).await;
            for t in 0..tokens {
                for h in 0..nkv {
                    for d in 0..hd {
                        k_cpu[(h * mp + p0 + t) * hd + d] = k_new[(t * nkv + h) * hd + d];
                        v_cpu[(h * mp + p0 + t) * hd + d] = v_new[(t * nkv + h) * hd + d];
                    }
                }
            }
            let got_k = read_f32(ctx, &kc, 2 * layer).await?;
            let got_v = read_f32(ctx, &vc, 2 * layer).await?;
            let same = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
            };
            ensure!(
                same(&got_k[layer..], &k_cpu) && same(&got_v[layer..], &v_cpu),
                "kv_write: cache differs at p0={p0}"
            );
            ensure!(
                got_k[..layer].iter().all(|v| v.is_nan()),
                "kv_write touched another layer"
            );
            let got = read_f32(ctx, &out, q.len()).await?;
            let want = cpu_attention(&q, &k_cpu, &v_cpu, &shape, tokens, p0);
            check(
                &format!("attention wg={wg} T={tokens} p0={p0}"),
                &got,
                &want,
                1e-5,
            )?;
            p0 += tokens;
        }
    }
    Ok(())
}

async fn swiglu_and_add_match(ctx: &GpuContext) -> Result<()> {
    let mut rng = Rng::new(7);
    let kernels = Kernels::new(ctx);
    let n = 1003usize;
    let (a, b) = (rng.vec(n), rng.vec(n));
    let (ab, bb) = (upload(ctx, "a", &a), upload(ctx, "b", &b));
    let out1 = poisoned(ctx, n);
    let out2 = poisoned(ctx, n);
    let d1 = kernels.swiglu(ctx, &ab, &bb, &out1, n as u32)?;
    let d2 = kernels.add(ctx, &ab, &bb, &out2, n as u32)?;
    run(ctx, &[d1, d2]).await;
    let want: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(g, u)| (*g as f64 / (1.0 + (-*g as f64).exp()) * *u as f64) as f32)
        .collect();
    check("swiglu", &read_f32(ctx, &out1, n).await?, &want, 1e-5)?;
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    ensure!(read_f32(ctx, &out2, n).await? == want, "add differs");
    Ok(())
}

async fn argmax_is_exact(ctx: &GpuContext) -> Result<()> {
    let mut rng = Rng::new(8);
    for tuning in both_tunings() {
        let kernels = Kernels::with_tuning(tuning);
        let n = 49152 + 7;
        let mut x = rng.vec(5 + n);
        // Ties resolve to the lowest index; NaN never wins.
        let (first, second) = (5 + 1000 + rng.below(40000) as usize, 5 + 45000);
        x[first] = 3.5;
        x[second] = 3.5;
        x[3] = 100.0; // before the offset: must be ignored
        x[5 + 17] = f32::NAN;
        let out = poisoned(ctx, 2);
        let d = kernels.argmax(ctx, &upload(ctx, "x", &x), 5, n as u32, &out)?;
        run(ctx, &[d]).await;
        let got = read_u32(ctx, &out, 2).await?;
        ensure!(
            got[0] as usize == first - 5,
            "argmax {:?}: {} vs {}",
            tuning.strategy,
            got[0],
            first - 5
        );
        ensure!(
            f32::from_bits(got[1]) == 3.5,
            "argmax value {}",
            f32::from_bits(got[1])
        );
    }
    Ok(())
}

async fn bad_arguments_are_errors(ctx: &GpuContext) -> Result<()> {
    let kernels = Kernels::new(ctx);
    let small = poisoned(ctx, 10);
    let big = poisoned(ctx, 1000);
    ensure!(
        kernels.add(ctx, &small, &big, &big, 100).is_err(),
        "short input accepted"
    );
    ensure!(
        kernels.argmax(ctx, &big, 0, 0, &big).is_err(),
        "empty argmax accepted"
    );
    let shape = AttentionShape {
        n_heads: 6,
        n_kv_heads: 4,
        head_dim: 64,
        max_positions: 4,
    };
    let cache = KvBuffers {
        k: &big,
        v: &big,
        offset: 0,
    };
    ensure!(
        kernels
            .attention(ctx, &shape, &cache, &big, &big, 1, 0)
            .is_err(),
        "6 heads over 4 KV heads accepted"
    );
    let raw = quantize(DType::Q4_1, &[0.5; 64]);
    let e = GpuWeight::upload(ctx, "w", DType::Q4_1, 2, 32, &raw[..20])
        .err()
        .context("short weights accepted")?;
    ensure!(
        e.to_string().contains("`w`"),
        "error does not name the tensor: {e}"
    );
    ensure!(
        GpuWeight::upload(ctx, "w", DType::F32, 1, 12, &[0; 48]).is_err(),
        "12 f32 columns accepted"
    );
    Ok(())
}

async fn cpu_adapters_get_row_per_thread_kernels(ctx: &GpuContext) -> Result<()> {
    let t = Tuning::for_context(ctx);
    ensure!(
        ctx.is_cpu() == (t.strategy == Strategy::RowPerThread),
        "{:?}: {t:?}",
        ctx.info
    );
    let max = ctx.limits.max_compute_invocations_per_workgroup;
    ensure!(
        [t.wg, t.reduce_wg, t.attention_wg, t.argmax_wg]
            .iter()
            .all(|&wg| wg <= max),
        "{t:?} exceeds {max} invocations per workgroup"
    );
    Ok(())
}

// ---------- wrappers: one module per body, `#[test]` natively, `#[wasm_bindgen_test]` on wasm32 ----------

macro_rules! on_every_target {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[cfg(not(target_arch = "wasm32"))]
            #[test]
            fn on_default_adapter() {
                let ctx = super::shared_context();
                if let Err(e) = pollster::block_on(super::$name(ctx)) {
                    panic!("{} on {}: {e:#}", stringify!($name), super::adapter(&ctx));
                }
            }

            #[cfg(target_arch = "wasm32")]
            #[wasm_bindgen_test::wasm_bindgen_test]
            async fn on_default_adapter() {
                let ctx = super::shared_context().await;
                if let Err(e) = super::$name(&ctx).await {
                    panic!("{} on {}: {e:#}", stringify!($name), super::adapter(&ctx));
                }
            }
        }
    )*};
}

on_every_target!(
    embed_gathers_rows,
    rms_norm_matches,
    matvec_matches,
    matmul_matches,
    rope_rotates_both_layouts,
    attention_is_causal_gqa,
    swiglu_and_add_match,
    argmax_is_exact,
    bad_arguments_are_errors,
    cpu_adapters_get_row_per_thread_kernels,
);
