//! The contract every engine of a ring node meets — the CPU oracle, the GPU engine, and later
//! the remote stages of the ring: run this stage's layers for one sequence.

use crate::error::Result;
use crate::oracle::StageInput;
use crate::weights::StageSpec;

/// What the head should return, when the stage runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMode {
    /// All logits of the last token (for sampling).
    Logits,
    /// Only the id of the largest logit (greedy decoding: one number crosses back).
    Argmax,
}

/// What flows out of a stage.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutput {
    /// Hidden states, (n_tokens, hidden), for the next node of the ring.
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

    /// Run the stage on `input`, the sequence's next tokens, starting at the cache's length.
    fn forward(
        &mut self,
        cache: &mut Self::Cache,
        input: StageInput<'_>,
        head: HeadMode,
    ) -> Result<StageOutput>;
}
