//! The whole GPU engine — prefill, then decode steps that feed back the greedy token — against
//! the CPU oracle on a small random model (GQA, Q4_1/Q8_0 weights, both RoPE layouts, a tied
//! head): logits within 1e-3 relative L2 at every step, greedy tokens equal. Written once: a
//! `#[test]` natively (lavapipe without a GPU) and a `#[wasm_bindgen_test]` in headless
//! Chromium's WebGPU (SwiftShader), so a kernel variant or plan that is only wrong in the
//! browser fails here and not in a user's tab.

use std::sync::Arc;

use anyhow::{ensure, Result};
use mdi_core::sampling::{argmax, Rng};
use mdi_core::weights::{LayerWeights, StageSpec, StageWeights};
use mdi_core::{Config, DType, Oracle, RawTensor, RopeLayout, StageInput, StageOutput, Want};
use mdi_gpu::{GpuContext, GpuEngine};

#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

macro_rules! note {
    ($($t:tt)*) => {{
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!($($t)*);
        #[cfg(target_arch = "wasm32")]
        wasm_bindgen_test::console_log!($($t)*);
    }};
}

fn config(layout: RopeLayout) -> Config {
    let mut c = Config::from_hf_json(
        &serde_json::json!({
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 320,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 160,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true,
            "eos_token_id": 2,
            "max_position_embeddings": 64,
        })
        .to_string(),
    )
    .expect("a valid config");
    c.rope_layout = layout;
    c
}

fn tensor(rng: &mut Rng, dtype: DType, shape: &[usize], scale: f32) -> RawTensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
        .collect();
    RawTensor {
        name: "random".into(),
        dtype,
        shape: shape.to_vec(),
        bytes: mdi_core::quant::quantize(dtype, &v),
    }
}

fn weights(c: &Config, dt: DType, seed: u64) -> StageWeights<RawTensor> {
    let mut r = Rng::new(seed);
    let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
    let norm = |r: &mut Rng| {
        let v: Vec<f32> = (0..h).map(|_| 0.8 + 0.4 * r.next_f32()).collect();
        RawTensor {
            name: "norm".into(),
            dtype: DType::F32,
            shape: vec![h],
            bytes: mdi_core::quant::quantize(DType::F32, &v),
        }
    };
    let layers = (0..c.n_layers)
        .map(|_| LayerWeights {
            attn_norm: norm(&mut r),
            wq: tensor(&mut r, dt, &[q, h], 0.15),
            wk: tensor(&mut r, dt, &[kv, h], 0.15),
            wv: tensor(&mut r, dt, &[kv, h], 0.15),
            wo: tensor(&mut r, dt, &[h, q], 0.15),
            bq: None,
            bk: None,
            bv: None,
            ffn_norm: norm(&mut r),
            gate: tensor(&mut r, dt, &[f, h], 0.15),
            up: tensor(&mut r, dt, &[f, h], 0.15),
            down: tensor(&mut r, dt, &[h, f], 0.1),
        })
        .collect();
    StageWeights {
        spec: StageSpec::whole(c),
        embed: Some(tensor(&mut r, DType::Q8_0, &[c.vocab, h], 1.0)),
        layers,
        output_norm: Some(norm(&mut r)),
        head: None,
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-20)).sqrt()
}

fn logits(o: StageOutput) -> Result<Vec<f32>> {
    match o {
        StageOutput::Logits(l) => Ok(l),
        other => anyhow::bail!("expected logits, got {other:?}"),
    }
}

async fn engine_matches_oracle(ctx: Arc<GpuContext>) -> Result<()> {
    for (case, (layout, dt)) in [
        (RopeLayout::AdjacentPairs, DType::Q4_1),
        (RopeLayout::RotateHalf, DType::Q8_0),
    ]
    .into_iter()
    .enumerate()
    {
        let c = config(layout);
        let w = weights(&c, dt, 11 + case as u64);
        let oracle = Oracle::new(c.clone(), w.clone())?;
        let mut engine = GpuEngine::new(ctx.clone(), c.clone(), w, 8)?;
        let mut ocache = oracle.new_cache(40);
        let mut gcache = engine.new_gpu_cache(40)?;
        let mut rng = Rng::new(5 + case as u64);
        // 13 prompt tokens: more than one prefill chunk of 8.
        let mut input: Vec<u32> = (0..13)
            .map(|_| (rng.next_u64() % c.vocab as u64) as u32)
            .collect();
        let mut worst = 0f32;
        for step in 0..8 {
            let want =
                logits(oracle.forward(&mut ocache, StageInput::Tokens(&input), Want::Logits)?)?;
            let got = logits(
                engine
                    .forward_async(&mut gcache, StageInput::Tokens(&input), Want::Logits)
                    .await?,
            )?;
            let e = rel_l2(&got, &want);
            worst = worst.max(e);
            ensure!(
                e <= 1e-3,
                "case {case} ({layout:?}, {dt:?}) step {step}: logits differ by {e:.2e} (relative L2)"
            );
            let t = argmax(&want);
            ensure!(
                argmax(&got) == t,
                "case {case} step {step}: greedy token differs"
            );
            input = vec![t];
        }
        note!("case {case} ({layout:?}, {dt:?}): worst relative L2 {worst:.2e} over 8 steps");
    }
    Ok(())
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn gpu_engine_matches_oracle_step_by_step() {
    let ctx = Arc::new(pollster::block_on(GpuContext::new()).expect("a GPU adapter (lavapipe)"));
    let name = ctx.info.name.clone();
    if let Err(e) = pollster::block_on(engine_matches_oracle(ctx)) {
        panic!("on {name}: {e:#}");
    }
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn gpu_engine_matches_oracle_step_by_step() {
    let ctx = Arc::new(GpuContext::new().await.expect("WebGPU in the browser"));
    let name = format!("{:?}", ctx.info);
    if let Err(e) = engine_matches_oracle(ctx).await {
        panic!("on {name}: {e:#}");
    }
}
