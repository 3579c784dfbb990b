//! Single-node generation: the starter's one-node mode on a blocking engine, so `mdi generate`
//! runs the very loop of prefill, sampling and stopping that a ring's starter runs. Tokens
//! reach the caller as they are chosen.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mdi_core::starter::{Event, Finish, SeqRequest, Starter, StarterConfig};
use mdi_core::wire::WireDtype;
use mdi_core::{SamplingParams, StageEngine};

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
    /// Until the first token: the prompt's prefill.
    pub prefill: Duration,
    /// From the first token to the last.
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
pub fn generate<E: StageEngine + ?Sized>(
    engine: &mut E,
    req: &Request,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let mut starter = Starter::new(StarterConfig {
        n_nodes: 1,
        hidden: 0,
        wire: WireDtype::F32,
        max_message: usize::MAX,
        context: req.context,
        in_flight: 1,
        kv_bytes_per_position: engine.cache_bytes(1) as u64,
        kv_cap_bytes: u64::MAX,
    });
    starter.submit(
        0,
        SeqRequest {
            prompt_tokens: req.prompt_tokens.clone(),
            max_tokens: req.max_tokens,
            params: req.params,
            eos_ids: req.eos_ids.clone(),
        },
    );
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut tokens = Vec::new();
    let mut finish = None;
    let mut events = Vec::new();
    starter.pump(&mut events);
    loop {
        for e in events.drain(..) {
            match e {
                Event::Token { token, .. } => {
                    first.get_or_insert_with(Instant::now);
                    tokens.push(token);
                    on_token(token)?;
                }
                Event::Done { finish: f, .. } => finish = Some(f),
                Event::NodeError { message, .. } => bail!("{message}"),
            }
        }
        let Some(job) = starter.next_job() else {
            break;
        };
        let done = job.run(engine);
        starter.complete(done, &mut events);
    }
    let end = Instant::now();
    let first = first.unwrap_or(end);
    match finish {
        Some(Finish::Error(e)) => bail!("{e}"),
        None => bail!("generation stopped without finishing"),
        Some(f) => Ok(Generation {
            tokens,
            prefill: first - start,
            decode: end - first,
            hit_context: f == Finish::Context,
        }),
    }
}
