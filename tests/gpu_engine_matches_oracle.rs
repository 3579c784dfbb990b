//! The GPU engine computes what the CPU oracle computes: on small random models in every weight
//! type (F32, F16, Q8_0, Q4_0, Q4_1), prefill in several chunks and then decode steps give the
//! oracle's logits (relative L2 ≤ 1e-5 for f32 weights, ≤ 1e-4 otherwise), a partial stage hands
//! on the oracle's hidden states, GPU argmax picks the oracle's token, and bad inputs and a
//! full context are errors. On the default model, greedy decoding of the golden chat prompt
//! gives the 8 golden ids and step-0 logits within 0.02 of the reference.
//! A wrong kernel binding, a stale position word, a cache mix-up between chunks or a head that
//! reads the wrong row fails here. Without a GPU adapter (natively: lavapipe) these tests fail
//! with instructions rather than pass vacuously.

use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Context, Result};
use mdi_core::sampling::{argmax, Rng};
use mdi_core::weights::TensorStore;
use mdi_core::{
    Config, DType, Error, Oracle, StageEngine, StageInput, StageOutput, StageSpec, StageWeights,
    Want,
};
use mdi_gpu::{GpuContext, GpuEngine};
use mdi_tests::tiny::{Shape, TinyModel};

fn context() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| match pollster::block_on(GpuContext::new()) {
        Ok(ctx) => Arc::new(ctx),
        Err(e) => panic!("the GPU engine tests need a GPU adapter: {e}"),
    })
    .clone()
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn close(what: &str, got: &StageOutput, want: &StageOutput, tol: f64) -> Result<()> {
    let (g, w) = match (got, want) {
        (StageOutput::Logits(g), StageOutput::Logits(w))
        | (StageOutput::Hidden(g), StageOutput::Hidden(w)) => (g, w),
        _ => bail!("{what}: output kinds differ: {got:?} vs {want:?}"),
    };
    ensure!(
        g.len() == w.len(),
        "{what}: {} values, oracle {}",
        g.len(),
        w.len()
    );
    let err = rel_l2(g, w);
    eprintln!("{what}: relative L2 {err:.1e} (tolerance {tol:.0e})");
    ensure!(err <= tol, "{what}: relative L2 error {err:e} > {tol:e}");
    Ok(())
}

fn logits(out: &StageOutput) -> Result<&[f32]> {
    match out {
        StageOutput::Logits(l) => Ok(l),
        other => bail!("expected logits, got {other:?}"),
    }
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-4
    }
}

fn load(
    store: &dyn TensorStore,
    config: &Config,
    spec: &StageSpec,
) -> StageWeights<mdi_core::RawTensor> {
    StageWeights::load(store, config, spec).expect("stage weights")
}

/// Whole model: chunked prefill, decode with logits, and a second sequence decoded with GPU
/// argmax, all against the oracle.
fn whole_model(shape: Shape, dtype: DType, seed: u64) -> Result<()> {
    let tiny = TinyModel::random(shape, seed);
    let store = tiny.gguf_store(dtype);
    let config = tiny.gguf_config(dtype);
    let spec = StageSpec::whole(&config);
    let oracle = Oracle::new(config.clone(), load(&store, &config, &spec))?;
    // max_batch 4: the 7-token prompt runs as 4 + 3.
    let mut gpu = GpuEngine::new(context(), config.clone(), load(&store, &config, &spec), 4)?;
    let tol = tolerance(dtype);
    let what = format!("{dtype} {shape:?}");

    let mut rng = Rng::new(seed ^ 0x5eed);
    let prompt: Vec<u32> = (0..7)
        .map(|_| (rng.next_u64() % config.vocab as u64) as u32)
        .collect();
    let mut oc = oracle.new_cache(32);
    let mut gc = gpu.new_cache(32)?;
    let mut ga = gpu.new_cache(32)?; // the argmax sequence
    let mut ids = prompt.clone();
    for step in 0..6 {
        let want = oracle.forward(&mut oc, StageInput::Tokens(&ids), Want::Logits)?;
        let got = gpu.forward(&mut gc, StageInput::Tokens(&ids), Want::Logits)?;
        close(&format!("{what} step {step} logits"), &got, &want, tol)?;
        let best = argmax(logits(&want)?);
        let token = gpu.forward(&mut ga, StageInput::Tokens(&ids), Want::Argmax)?;
        ensure!(
            token == StageOutput::Token(best),
            "{what} step {step}: GPU argmax {token:?}, oracle {best}"
        );
        ensure!(
            gpu.cache_len(&gc) == oc.len(),
            "{what}: cache lengths differ"
        );
        ids = vec![best];
    }
    // The head alone, on a row of its own.
    let row: Vec<f32> = (0..config.hidden)
        .map(|_| rng.next_f32() * 2.0 - 1.0)
        .collect();
    close(
        &format!("{what} head"),
        &gpu.head(&row, Want::Logits)?,
        &oracle.head(&row, Want::Logits)?,
        tol,
    )?;
    Ok(())
}

/// Layers [1, 3) only: hidden states in, hidden states out.
fn partial_stage(dtype: DType, seed: u64) -> Result<()> {
    let tiny = TinyModel::random(Shape::default(), seed);
    let store = tiny.gguf_store(dtype);
    let config = tiny.gguf_config(dtype);
    let spec = StageSpec {
        layers: 1..3,
        embed: false,
        head: false,
    };
    let oracle = Oracle::new(config.clone(), load(&store, &config, &spec))?;
    let mut gpu = GpuEngine::new(context(), config.clone(), load(&store, &config, &spec), 8)?;
    let mut rng = Rng::new(seed);
    let mut oc = oracle.new_cache(16);
    let mut gc = gpu.new_cache(16)?;
    for (step, n) in [5usize, 1, 1, 3].into_iter().enumerate() {
        let h: Vec<f32> = (0..n * config.hidden)
            .map(|_| rng.next_f32() * 2.0 - 1.0)
            .collect();
        let want = oracle.forward(&mut oc, StageInput::Hidden(&h), Want::Hidden)?;
        let got = gpu.forward(&mut gc, StageInput::Hidden(&h), Want::Hidden)?;
        close(
            &format!("{dtype} layers 1..3 step {step} hidden"),
            &got,
            &want,
            tolerance(dtype),
        )?;
    }
    // Tokens into a stage without the embedding, and logits from one without the head.
    ensure!(gpu
        .forward(&mut gc, StageInput::Tokens(&[1]), Want::Hidden)
        .is_err());
    let h = vec![0.5; config.hidden];
    ensure!(gpu
        .forward(&mut gc, StageInput::Hidden(&h), Want::Logits)
        .is_err());
    ensure!(gpu.head(&h, Want::Logits).is_err());
    Ok(())
}

#[test]
fn every_weight_type_matches_the_oracle() -> Result<()> {
    for (i, dtype) in [
        DType::F32,
        DType::F16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
    ]
    .into_iter()
    .enumerate()
    {
        whole_model(Shape::default(), dtype, 11 + i as u64)?;
    }
    Ok(())
}

#[test]
fn tied_head_and_qkv_biases_match_the_oracle() -> Result<()> {
    let shape = Shape {
        tied: true,
        qkv_bias: true,
        n_heads: 4,
        n_kv_heads: 1,
        ..Shape::default()
    };
    whole_model(shape, DType::Q8_0, 7)
}

#[test]
fn a_partial_stage_hands_on_the_oracles_hidden_states() -> Result<()> {
    for (i, dtype) in [DType::F32, DType::Q4_1].into_iter().enumerate() {
        partial_stage(dtype, 21 + i as u64)?;
    }
    Ok(())
}

#[test]
fn a_full_context_and_bad_inputs_are_errors() -> Result<()> {
    let tiny = TinyModel::random(Shape::default(), 3);
    let store = tiny.gguf_store(DType::Q4_0);
    let config = tiny.gguf_config(DType::Q4_0);
    let spec = StageSpec::whole(&config);
    let mut gpu = GpuEngine::new(context(), config.clone(), load(&store, &config, &spec), 4)?;
    let mut cache = gpu.new_cache(8)?;
    let nine: Vec<u32> = (0..9).collect();
    match gpu.forward(&mut cache, StageInput::Tokens(&nine), Want::Logits) {
        Err(Error::ContextFull {
            position: 8,
            context: 8,
        }) => {}
        other => bail!("9 tokens into 8 positions: {other:?}"),
    }
    ensure!(
        gpu.cache_len(&cache) == 0,
        "a refused call advanced the cache"
    );
    gpu.forward(&mut cache, StageInput::Tokens(&nine[..8]), Want::Argmax)?;
    match gpu.forward(&mut cache, StageInput::Tokens(&[3]), Want::Argmax) {
        Err(Error::ContextFull { .. }) => {}
        other => bail!("a token past the context: {other:?}"),
    }
    let mut cache = gpu.new_cache(8)?;
    let bad = config.vocab as u32;
    let e = gpu
        .forward(&mut cache, StageInput::Tokens(&[1, bad]), Want::Logits)
        .err()
        .context("an id past the vocabulary was accepted")?;
    ensure!(
        e.to_string().contains(&bad.to_string()),
        "error does not name the id: {e}"
    );
    ensure!(gpu
        .forward(&mut cache, StageInput::Tokens(&[]), Want::Logits)
        .is_err());
    ensure!(gpu
        .forward(&mut cache, StageInput::Hidden(&[0.0; 64]), Want::Logits)
        .is_err());
    ensure!(gpu.head(&[0.0; 3], Want::Logits).is_err());
    // A cache belongs to the engine that made it.
    let mut other = GpuEngine::new(context(), config.clone(), load(&store, &config, &spec), 2)?;
    ensure!(other
        .forward(&mut cache, StageInput::Tokens(&[1]), Want::Logits)
        .is_err());
    ensure!(gpu.cache_len(&cache) == 0);
    Ok(())
}

#[test]
fn default_model_greedy_decodes_the_golden_chat() -> Result<()> {
    let model = mdi_tests::default_model()?;
    let golden = mdi_tests::golden_chat()?;
    let config = model.config.clone();
    let spec = StageSpec::whole(&config);
    let weights = StageWeights::load(&*model.store, &config, &spec)?;
    let mut gpu = GpuEngine::new(context(), config, weights, 32)?;
    let mut cache = gpu.new_cache(64)?;
    let out = gpu.forward(
        &mut cache,
        StageInput::Tokens(&golden.prompt_tokens),
        Want::Logits,
    )?;
    let step0 = logits(&out)?;
    let diff = mdi_tests::max_abs_diff(step0, &golden.step0_logits);
    eprintln!("default model step-0 logits: max abs diff {diff:.4} (tolerance 0.02)");
    ensure!(
        diff <= 0.02,
        "step-0 logits differ from the reference by {diff}"
    );
    let mut ids = vec![argmax(step0)];
    while ids.len() < golden.greedy_tokens.len() {
        let last = ids[ids.len() - 1];
        match gpu.forward(&mut cache, StageInput::Tokens(&[last]), Want::Argmax)? {
            StageOutput::Token(t) => ids.push(t),
            other => bail!("argmax gave {other:?}"),
        }
    }
    ensure!(
        ids == golden.greedy_tokens,
        "greedy ids {ids:?}, golden {:?}",
        golden.greedy_tokens
    );
    Ok(())
}

/// Not a check: prints the GPU benchmark table for the default model (`-- --ignored
/// --nocapture`).
#[test]
#[ignore]
fn bench_default_model() -> Result<()> {
    let model = mdi_tests::default_model()?;
    let config = model.config.clone();
    let weights = StageWeights::load(&*model.store, &config, &StageSpec::whole(&config))?;
    let report = mdi_gpu::bench::run(context(), config, weights, &Default::default())?;
    mdi_gpu::bench::print_table(&report);
    Ok(())
}
