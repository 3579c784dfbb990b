//! The single-node generation loop: prefill the prompt in one call, then decode token by token
//! until EOS or the token budget, handing each token to the caller as it is chosen.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mdi_core::{Sampler, SamplingParams, StageEngine, StageInput, StageOutput, Want};

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub eos_ids: Vec<u32>,
    /// The model's context length: prompt plus generated tokens must fit.
    pub context: usize,
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, EOS included when it was produced.
    pub tokens: Vec<u32>,
    pub prefill: Duration,
    pub decode: Duration,
    /// Stopped because the context was full rather than on EOS or the token budget.
    pub hit_context: bool,
}

impl Generation {
    pub fn prefill_tok_s(&self, prompt_len: usize) -> f64 {
        prompt_len as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Tokens per second over the decode steps (every token after the first).
    pub fn decode_tok_s(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        steps as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Run `req` on `engine` (a whole-model stage), calling `on_token` for each new token.
pub fn generate<E: StageEngine>(
    engine: &mut E,
    req: &Request,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let n_prompt = req.prompt_tokens.len();
    if n_prompt == 0 {
        bail!("the prompt is empty");
    }
    if n_prompt >= req.context {
        bail!(
            "the prompt has {n_prompt} tokens but the model's context holds {} positions \
             (including at least one generated token); shorten the prompt",
            req.context
        );
    }
    if req.max_tokens == 0 {
        return Ok(Generation {
            tokens: Vec::new(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            hit_context: false,
        });
    }
    // The last generated token is never fed back, so it needs no cache position.
    let positions = (n_prompt + req.max_tokens - 1).min(req.context);
    let mut cache = engine.new_cache(positions)?;
    let mut sampler = Sampler::new(req.params);
    let mode = if req.params.is_greedy() {
        Want::Argmax
    } else {
        Want::Logits
    };
    let mut pick = |out: StageOutput| -> Result<u32> {
        match out {
            StageOutput::Token(t) => Ok(t),
            StageOutput::Logits(l) => Ok(sampler.sample(&l)),
            StageOutput::Hidden(_) => bail!("the engine does not run the head"),
        }
    };

    let start = Instant::now();
    let out = engine.forward(&mut cache, StageInput::Tokens(&req.prompt_tokens), mode)?;
    let mut token = pick(out)?;
    let prefill = start.elapsed();

    let start = Instant::now();
    let mut tokens = vec![token];
    on_token(token)?;
    let mut hit_context = false;
    while tokens.len() < req.max_tokens && !req.eos_ids.contains(&token) {
        if n_prompt + tokens.len() > positions {
            hit_context = true;
            break;
        }
        let out = engine.forward(&mut cache, StageInput::Tokens(&[token]), mode)?;
        token = pick(out)?;
        tokens.push(token);
        on_token(token)?;
    }
    Ok(Generation {
        tokens,
        prefill,
        decode: start.elapsed(),
        hit_context,
    })
}
