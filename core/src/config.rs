//! One model configuration for every weight format: what the oracle, the GPU engine and the
//! partition planner need to know about a Llama-family transformer.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gguf::Gguf;

/// Largest dimension (hidden size, heads, vocabulary, context...) a configuration may state.
pub const MAX_DIM: usize = 1 << 24;
/// Most layers a configuration may state.
pub const MAX_LAYERS: usize = 1 << 12;

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RopeLayout {
    /// Dimensions (2i, 2i+1) rotate together: GGUF files of the llama architecture, whose
    /// converter permuted the Q/K rows to this order.
    AdjacentPairs,
    /// Dimensions (i, i + head_dim/2) rotate together: Hugging Face checkpoints.
    RotateHalf,
}

/// Shape and constants of a Llama-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Architecture name as the file states it (`llama`, `qwen2`, `mistral`).
    pub arch: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Inner size of the SwiGLU feed-forward block.
    pub ffn: usize,
    pub vocab: usize,
    pub rope_base: f32,
    pub rope_layout: RopeLayout,
    pub norm_eps: f32,
    /// The LM head reuses the token embedding.
    pub tied_embeddings: bool,
    /// Q, K and V projections carry biases (Qwen2).
    pub qkv_bias: bool,
    pub bos_id: Option<u32>,
    /// Ids that end a sequence.
    pub eos_ids: Vec<u32>,
    /// Prepend BOS to raw prompts.
    pub add_bos: bool,
    /// Longest context the model was trained for.
    pub context: usize,
}

impl Config {
    /// Query heads that share one KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the concatenated KV heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Check that the numbers describe a model we can run.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v) in [
            ("layers", self.n_layers),
            ("hidden size", self.hidden),
            ("heads", self.n_heads),
            ("KV heads", self.n_kv_heads),
            ("head size", self.head_dim),
            ("FFN size", self.ffn),
            ("vocabulary", self.vocab),
            ("context", self.context),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        // Files and manifests come from anywhere: bound every dimension so that the products
        // engines and planners compute (checked below) cannot wrap, on 32-bit targets too.
        for (name, v, max) in [
            ("layers", self.n_layers, MAX_LAYERS),
            ("hidden size", self.hidden, MAX_DIM),
            ("heads", self.n_heads, MAX_DIM),
            ("KV heads", self.n_kv_heads, MAX_DIM),
            ("head size", self.head_dim, MAX_DIM),
            ("FFN size", self.ffn, MAX_DIM),
            ("vocabulary", self.vocab, MAX_DIM),
            ("context", self.context, MAX_DIM),
        ] {
            if v > max {
                return bad(format!("{name} {v} is more than the {max} supported"));
            }
        }
        let product = |a: usize, b: usize| (a as u64).checked_mul(b as u64);
        let fits = |v: Option<u64>| v.is_some_and(|v| usize::try_from(v).is_ok());
        let q = product(self.n_heads, self.head_dim);
        let kv = product(self.n_kv_heads, self.head_dim);
        for (name, v) in [
            ("query width", q),
            (
                "query projection",
                q.and_then(|q| q.checked_mul(self.hidden as u64)),
            ),
            ("KV width", kv),
            (
                "KV cache of one layer",
                kv.and_then(|kv| kv.checked_mul(self.context as u64)),
            ),
            ("FFN matrix", product(self.ffn, self.hidden)),
            ("embedding", product(self.vocab, self.hidden)),
        ] {
            if !fits(v) {
                return bad(format!("the {name} has too many values for this machine"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} query heads cannot be grouped over {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head size {} is odd: RoPE needs pairs",
                self.head_dim
            ));
        }
        if !(self.rope_base > 0.0 && self.norm_eps >= 0.0) {
            return bad(format!(
                "RoPE base {} / norm eps {} out of range",
                self.rope_base, self.norm_eps
            ));
        }
        Ok(())
    }

    /// Read the configuration from GGUF metadata (`{arch}.block_count` and friends).
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Config(format!("{}: no general.architecture", g.file)))?
            .to_string();
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(Error::Config(format!(
                "{}: architecture `{arch}` is not supported (llama, qwen2, mistral are)",
                g.file
            )));
        }
        let int = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            g.get(&full)
                .and_then(|v| v.as_u64())
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| Error::Config(format!("{}: missing or bad `{full}`", g.file)))
        };
        let float = |key: &str, default: f64| -> f32 {
            g.get(&format!("{arch}.{key}"))
                .and_then(|v| v.as_f64())
                .unwrap_or(default) as f32
        };
        let hidden = int("embedding_length")?;
        let n_heads = int("attention.head_count")?;
        let n_kv_heads = int("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = int("attention.key_length")
            .or_else(|_| int("rope.dimension_count"))
            .unwrap_or(hidden / n_heads.max(1));
        let vocab = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| Error::Config(format!("{}: no vocabulary size", g.file)))?,
        };
        let id = |key: &str| {
            g.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
        };
        let config = Config {
            n_layers: int("block_count")?,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn: int("feed_forward_length")?,
            vocab,
            rope_base: float("rope.freq_base", 10_000.0),
            rope_layout: if arch == "qwen2" {
                // Qwen2 GGUF files keep the Hugging Face (NeoX) rotation.
                RopeLayout::RotateHalf
            } else {
                RopeLayout::AdjacentPairs
            },
            norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            tied_embeddings: g.tensor("output.weight").is_none(),
            qkv_bias: g.tensor("blk.0.attn_q.bias").is_some(),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            context: int("context_length").unwrap_or(2048),
            arch,
        };
        config.validate()?;
        Ok(config)
    }

    /// Read the configuration from a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Ids {
            One(u32),
            Many(Vec<u32>),
        }
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            model_type: Option<String>,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            vocab_size: usize,
            rope_theta: Option<f32>,
            rms_norm_eps: Option<f32>,
            #[serde(default)]
            tie_word_embeddings: bool,
            #[serde(default)]
            attention_bias: bool,
            bos_token_id: Option<u32>,
            eos_token_id: Option<Ids>,
            max_position_embeddings: Option<usize>,
        }
        let hf: Hf =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        let arch = hf.model_type.unwrap_or_else(|| "llama".to_string());
        if !matches!(arch.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(Error::Config(format!(
                "config.json: model_type `{arch}` is not supported (llama, qwen2, mistral are)"
            )));
        }
        let n_heads = hf.num_attention_heads;
        let config = Config {
            n_layers: hf.num_hidden_layers,
            hidden: hf.hidden_size,
            n_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(n_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / n_heads.max(1)),
            ffn: hf.intermediate_size,
            vocab: hf.vocab_size,
            rope_base: hf.rope_theta.unwrap_or(10_000.0),
            rope_layout: RopeLayout::RotateHalf,
            norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            tied_embeddings: hf.tie_word_embeddings,
            qkv_bias: hf.attention_bias || arch == "qwen2",
            bos_id: hf.bos_token_id,
            eos_ids: match hf.eos_token_id {
                None => Vec::new(),
                Some(Ids::One(id)) => vec![id],
                Some(Ids::Many(ids)) => ids,
            },
            add_bos: false,
            context: hf.max_position_embeddings.unwrap_or(2048),
            arch,
        };
        config.validate()?;
        Ok(config)
    }
}
