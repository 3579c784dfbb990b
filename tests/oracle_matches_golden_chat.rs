//! The CPU oracle on the default model reproduces the reference: the golden chat prompt decodes
//! greedily to its 8 ids, and the logits after the prompt lie within 0.02 of the reference's.
//! Any error in dequantization, RoPE, grouped-query attention or the tied head fails this.

use mdi::generate::{generate, Request};
use mdi_core::{Oracle, SamplingParams, StageInput, StageOutput, StageSpec, StageWeights, Want};
use mdi_tests::{default_model, golden_chat, max_abs_diff};

fn oracle() -> anyhow::Result<Oracle> {
    let model = default_model()?;
    let spec = StageSpec::whole(&model.config);
    let weights = StageWeights::load(model.store.as_ref(), &model.config, &spec)?;
    Ok(Oracle::new(model.config.clone(), weights)?)
}

#[test]
fn step0_logits_are_within_0_02_of_the_reference() -> anyhow::Result<()> {
    let golden = golden_chat()?;
    let oracle = oracle()?;
    let mut cache = oracle.new_cache(64);
    let out = oracle.forward(
        &mut cache,
        StageInput::Tokens(&golden.prompt_tokens),
        Want::Logits,
    )?;
    let StageOutput::Logits(logits) = out else {
        panic!("expected logits, got {out:?}");
    };
    assert_eq!(logits.len(), golden.step0_logits.len());
    let diff = max_abs_diff(&logits, &golden.step0_logits);
    println!(
        "max |oracle - reference| over {} logits: {diff:.5}",
        logits.len()
    );
    assert!(diff <= 0.02, "max abs diff {diff} > 0.02");
    Ok(())
}

#[test]
fn greedy_decode_gives_the_8_reference_ids() -> anyhow::Result<()> {
    let golden = golden_chat()?;
    let model = default_model()?;
    let mut oracle = oracle()?;
    let req = Request {
        prompt_tokens: golden.prompt_tokens.clone(),
        max_tokens: 32,
        params: SamplingParams::default(),
        eos_ids: model.config.eos_ids.clone(),
        context: model.config.context,
    };
    let mut streamed = Vec::new();
    let gen = generate(&mut oracle, &req, |t| {
        streamed.push(t);
        Ok(())
    })?;
    assert_eq!(gen.tokens, golden.greedy_tokens);
    assert_eq!(streamed, golden.greedy_tokens);
    assert_eq!(model.tokenizer.decode(&gen.tokens)?, golden.greedy_text);
    println!(
        "oracle: prefill {:.1} tok/s, decode {:.1} tok/s",
        gen.prefill_tok_s(golden.prompt_tokens.len()),
        gen.decode_tok_s()
    );
    Ok(())
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() -> anyhow::Result<()> {
    let model = default_model()?;
    let mut oracle = oracle()?;
    let req = Request {
        prompt_tokens: vec![260; 40],
        max_tokens: 4,
        params: SamplingParams::default(),
        eos_ids: model.config.eos_ids.clone(),
        context: 32,
    };
    let err = generate(&mut oracle, &req, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("40 tokens") && err.contains("32"), "{err}");
    // The cache itself refuses positions past its capacity.
    let mut cache = oracle.new_cache(8);
    let err = oracle
        .forward(&mut cache, StageInput::Tokens(&[260; 9]), Want::Argmax)
        .unwrap_err();
    assert!(matches!(err, mdi_core::Error::ContextFull { .. }), "{err}");
    Ok(())
}
