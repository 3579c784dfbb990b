//! The contract every engine of a ring node meets — the CPU oracle, the GPU engine and any
//! later one: run this stage's layers for one sequence, and (at the starter) the final norm +
//! LM head.
//!
//! The ring's state machines ([`crate::node::Node`], [`crate::starter::Starter`]) never call
//! an engine themselves. They are *split-phase*: they hand out a [`Job`] ("run these inputs of
//! sequence 7 with its cache") and take its [`Done`] back later. A blocking engine runs a job
//! with [`Job::run`]; a browser engine awaits its GPU readback in between; a threaded driver
//! runs it on a compute thread. The state machines stay free of I/O and of any executor.

use crate::error::{Error, Result};
use crate::weights::StageSpec;

/// What flows into a stage: token ids at the starter, hidden states everywhere else.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    /// Token ids, one per position.
    Tokens(&'a [u32]),
    /// Hidden states, (n_tokens, hidden).
    Hidden(&'a [f32]),
}

/// What a forward pass should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Hidden states of every token, for the next node of the ring.
    Hidden,
    /// All logits of the last token (for sampling). Needs a stage with the head.
    Logits,
    /// Only the id of the largest logit: greedy decoding reads back one number.
    Argmax,
}

/// What flows out of a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutput {
    /// Hidden states, (n_tokens, hidden).
    Hidden(Vec<f32>),
    /// Logits of the last token, (vocab).
    Logits(Vec<f32>),
    /// The greedy choice after the last token.
    Token(u32),
}

/// One stage of the model for any number of sequences, each with its own cache. Engines that
/// can block (every native engine) implement this; [`Job::run`] drives them.
pub trait StageEngine {
    /// A sequence's KV cache for this stage's layers.
    type Cache;

    fn spec(&self) -> &StageSpec;

    /// An empty cache for `max_positions` positions.
    fn new_cache(&mut self, max_positions: usize) -> Result<Self::Cache>;

    /// Positions a cache already holds: the next token's position.
    fn cache_len(&self, cache: &Self::Cache) -> usize;

    /// Bytes a cache of `max_positions` positions takes, for memory caps and plans. Linear in
    /// `max_positions`.
    fn cache_bytes(&self, max_positions: usize) -> usize;

    /// Run the stage's layers on `input`, the sequence's next tokens, starting at the cache's
    /// length; then the head too unless `want` is [`Want::Hidden`].
    fn forward(
        &mut self,
        cache: &mut Self::Cache,
        input: StageInput<'_>,
        want: Want,
    ) -> Result<StageOutput>;

    /// Only the final norm + LM head on one hidden row (hidden): the starter runs this when
    /// a token's activations come back around the ring.
    fn head(&mut self, hidden: &[f32], want: Want) -> Result<StageOutput>;

    /// The head on several sequences' hidden rows at once (when several tokens come back
    /// around the ring together); outputs in the same order, each what [`head`](Self::head)
    /// would return for it, a bad row's error its own. Engines that can read the head matrix
    /// once for all rows override this.
    fn head_batch(&mut self, rows: &[(&[f32], Want)]) -> Vec<Result<StageOutput>> {
        rows.iter()
            .map(|(hidden, want)| self.head(hidden, *want))
            .collect()
    }

    /// Several sequences' next tokens at once, each with its own cache and position; outputs
    /// in the same order, each exactly what [`forward`](Self::forward) would return for it.
    /// Engines that can read each weight once for the whole batch override this.
    fn forward_batch(
        &mut self,
        items: &mut [BatchItem<'_, Self::Cache>],
    ) -> Vec<Result<StageOutput>> {
        items
            .iter_mut()
            .map(|it| self.forward(it.cache, it.input, it.want))
            .collect()
    }
}

/// One sequence's part of a [`StageEngine::forward_batch`].
pub struct BatchItem<'a, C> {
    pub cache: &'a mut C,
    pub input: StageInput<'a>,
    pub want: Want,
}

/// Owned input of a [`Job`].
#[derive(Debug, Clone, PartialEq)]
pub enum JobInput {
    Tokens(Vec<u32>),
    /// (n_tokens, hidden)
    Hidden(Vec<f32>),
}

impl JobInput {
    pub fn as_stage_input(&self) -> StageInput<'_> {
        match self {
            JobInput::Tokens(t) => StageInput::Tokens(t),
            JobInput::Hidden(h) => StageInput::Hidden(h),
        }
    }
}

/// Where the KV cache of a forward job comes from.
#[derive(Debug)]
pub enum CacheSlot<C> {
    /// The sequence's first job on this stage: make a cache of this many positions.
    New { positions: usize },
    /// The sequence's cache, lent to the job and returned in its [`Done`].
    Lent(C),
}

/// What a job asks of the engine.
#[derive(Debug)]
pub enum Task<C> {
    /// Run the stage's layers (and the head unless `want` is [`Want::Hidden`]).
    Forward {
        cache: CacheSlot<C>,
        input: JobInput,
        want: Want,
    },
    /// Only the final norm + LM head on one hidden row.
    Head { hidden: Vec<f32>, want: Want },
}

/// One unit of engine work for one sequence, handed out by a node or the starter.
#[derive(Debug)]
pub struct Job<C> {
    pub seq: u64,
    pub task: Task<C>,
}

/// A finished [`Job`]: the sequence's cache comes back with the output.
#[derive(Debug)]
pub struct Done<C> {
    pub seq: u64,
    /// The cache the job used (made or lent); `None` for head jobs or when making it failed.
    pub cache: Option<C>,
    pub output: Result<StageOutput>,
}

impl<C> Job<C> {
    /// Run the job on a blocking engine.
    pub fn run<E: StageEngine<Cache = C> + ?Sized>(self, engine: &mut E) -> Done<C> {
        let seq = self.seq;
        match self.task {
            Task::Head { hidden, want } => Done {
                seq,
                cache: None,
                output: engine.head(&hidden, want),
            },
            Task::Forward { cache, input, want } => {
                let mut cache = match cache {
                    CacheSlot::Lent(c) => c,
                    CacheSlot::New { positions } => match engine.new_cache(positions) {
                        Ok(c) => c,
                        Err(e) => {
                            return Done {
                                seq,
                                cache: None,
                                output: Err(e),
                            }
                        }
                    },
                };
                let output = engine.forward(&mut cache, input.as_stage_input(), want);
                Done {
                    seq,
                    cache: Some(cache),
                    output,
                }
            }
        }
    }

    /// Tokens this job feeds through the stage (0 for a head job).
    pub fn n_tokens(&self, hidden: usize) -> usize {
        match &self.task {
            Task::Forward {
                input: JobInput::Tokens(t),
                ..
            } => t.len(),
            Task::Forward {
                input: JobInput::Hidden(h),
                ..
            } => h.len() / hidden.max(1),
            Task::Head { .. } => 0,
        }
    }
}

/// The hidden rows of a forward output, or an error naming what came instead.
pub fn expect_hidden(output: StageOutput) -> Result<Vec<f32>> {
    match output {
        StageOutput::Hidden(h) => Ok(h),
        other => Err(Error::Engine(format!(
            "the stage returned {} where hidden states were asked for",
            describe(&other)
        ))),
    }
}

fn describe(o: &StageOutput) -> String {
    match o {
        StageOutput::Hidden(h) => format!("{} hidden values", h.len()),
        StageOutput::Logits(l) => format!("{} logits", l.len()),
        StageOutput::Token(t) => format!("token {t}"),
    }
}
