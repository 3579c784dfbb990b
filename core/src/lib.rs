//! The model side of the ring, free of I/O: configuration, weight formats, tokenizer,
//! sampling and the plain CPU oracle every kernel and the ring are checked against.
//! Builds natively and for `wasm32-unknown-unknown`.
//!
//! - [`source`]: ranged byte sources (a file, an HTTP range reader, memory).
//! - [`gguf`], [`weights`]: GGUF and safetensors tensor tables; a stage loads only its layers.
//! - [`quant`]: element types and block formats (F32, F16, BF16, Q8_0, Q4_0, Q4_1).
//! - [`config`]: one model configuration for every format.
//! - [`tokenizer`]: byte-level BPE from `tokenizer.json` or GGUF metadata; chat templates.
//! - [`oracle`]: the plain f32 forward pass of one stage, with a per-sequence KV cache.
//! - [`sampling`]: greedy, temperature, top-k, top-p with a seeded generator.

pub mod config;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod manifest;
pub mod node;
pub mod oracle;
pub mod plan;
pub mod quant;
pub mod ring;
pub mod sampling;
pub mod source;
pub mod starter;
pub mod tokenizer;
pub mod weights;
pub mod wire;

pub use config::{Config, RopeLayout};
pub use engine::{Done, Job, StageEngine, StageInput, StageOutput, Want};
pub use error::{Error, Result};
pub use oracle::{KvCache, Oracle};
pub use quant::DType;
pub use sampling::{Sampler, SamplingParams};
pub use source::{ByteSource, MemSource};
pub use tokenizer::Tokenizer;
pub use weights::{RawTensor, StageSpec, StageWeights, TensorStore};
