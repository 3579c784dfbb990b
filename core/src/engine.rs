//! The contract every engine of a ring node meets — the CPU oracle and the GPU engine: run
//! this stage's layers for one sequence, and (at the starter) the final norm + LM head.

use crate::error::Result;
use crate::oracle::StageInput;
use crate::weights::StageSpec;

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

/// One stage of the model for any number of sequences, each with its own cache.
pub trait StageEngine {
    /// A sequence's KV cache for this stage's layers.
    type Cache;

    fn spec(&self) -> &StageSpec;

    /// An empty cache for `max_positions` positions.
    fn new_cache(&mut self, max_positions: usize) -> Result<Self::Cache>;

    /// Positions a cache already holds: the next token's position.
    fn cache_len(&self, cache: &Self::Cache) -> usize;

    /// Bytes a cache of `max_positions` positions takes, for memory caps and plans.
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
}
