//! A tiny model written with the project's own encoders: the seeds of the file targets. Every
//! tensor role and every block format appears, with metadata of every GGUF value type and a
//! byte-level BPE vocabulary, so mutations start from files the readers accept.

use mdi_core::gguf::{GgufWriter, Value};
use mdi_core::manifest::{Manifest, ManifestFile};
use mdi_core::weights::{Naming, Role, SafetensorsStore, StageSpec, LAYER_ROLES};
use mdi_core::{Config, DType, MemSource, RopeLayout};

use crate::engine::Rng;

/// The tiny model's configuration (rows of 32 values: one block of every quantized format).
pub fn config() -> Config {
    Config {
        arch: "llama".into(),
        n_layers: 2,
        hidden: 32,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 16,
        ffn: 32,
        vocab: TOKENS.len(),
        rope_base: 10_000.0,
        rope_layout: RopeLayout::AdjacentPairs,
        norm_eps: 1e-5,
        tied_embeddings: false,
        qkv_bias: false,
        bos_id: Some(0),
        eos_ids: vec![1],
        add_bos: false,
        context: 64,
    }
}

/// A byte-level BPE vocabulary (`Ġ` is the space) with two control tokens.
pub const TOKENS: [&str; 32] = [
    "<|im_start|>",
    "<|im_end|>",
    "h",
    "e",
    "l",
    "o",
    "Ġ",
    "w",
    "r",
    "d",
    "a",
    "i",
    "n",
    "s",
    "t",
    "u",
    "he",
    "ll",
    "hell",
    "hello",
    "Ġw",
    "or",
    "Ġwor",
    "ld",
    "Ġworld",
    "1",
    "2",
    "!",
    "?",
    "Ċ",
    "us",
    "er",
];

const MERGES: [&str; 9] = [
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
];

/// A short chat template in the ChatML style, written for these tests.
pub const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Every tensor of the model with `naming`, in the given block formats in turn.
pub fn tensors(
    naming: Naming,
    dtypes: &[DType],
    seed: u64,
) -> Vec<(String, DType, Vec<usize>, Vec<u8>)> {
    let c = config();
    let mut rng = Rng::new(seed);
    let spec = StageSpec::whole(&c);
    let mut out = Vec::new();
    for (k, (role, layer)) in mdi_core::manifest::stage_tensors(&c, &spec)
        .into_iter()
        .enumerate()
    {
        let shape = role.shape(&c);
        let n: usize = shape.iter().product();
        let dtype = dtypes[k % dtypes.len()];
        let values: Vec<f32> = (0..n)
            .map(|_| (rng.next_u64() % 2000) as f32 / 1000.0 - 1.0)
            .collect();
        let bytes = mdi_core::quant::quantize(dtype, &values);
        out.push((naming.tensor_name(role, layer), dtype, shape, bytes));
    }
    // Roles the config leaves out (biases) are not written: the loader must not ask for them.
    debug_assert!(LAYER_ROLES.contains(&Role::Bq));
    out
}

/// The tiny model as a GGUF file.
pub fn gguf(dtypes: &[DType], seed: u64) -> Vec<u8> {
    let c = config();
    let mut w = GgufWriter::new();
    let s = |v: &str| Value::String(v.to_string());
    w.metadata("general.architecture", s("llama"))
        .metadata("general.name", s("fuzz"))
        .metadata("llama.block_count", Value::U32(c.n_layers as u32))
        .metadata("llama.embedding_length", Value::U32(c.hidden as u32))
        .metadata("llama.attention.head_count", Value::U32(c.n_heads as u32))
        .metadata(
            "llama.attention.head_count_kv",
            Value::U64(c.n_kv_heads as u64),
        )
        .metadata("llama.feed_forward_length", Value::I32(c.ffn as i32))
        .metadata("llama.context_length", Value::U32(c.context as u32))
        .metadata("llama.rope.freq_base", Value::F32(c.rope_base))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F64(1e-5))
        .metadata("tokenizer.ggml.model", s("gpt2"))
        .metadata("tokenizer.ggml.pre", s("smollm"))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(TOKENS.iter().map(|t| s(t)).collect()),
        )
        .metadata(
            "tokenizer.ggml.token_type",
            Value::Array(
                (0..TOKENS.len())
                    .map(|i| Value::I32(if i < 2 { 3 } else { 1 }))
                    .collect(),
            ),
        )
        .metadata(
            "tokenizer.ggml.merges",
            Value::Array(MERGES.iter().map(|m| s(m)).collect()),
        )
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(0))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(1))
        .metadata("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .metadata("tokenizer.chat_template", s(CHAT_TEMPLATE))
        // Every other value type, nested arrays included.
        .metadata("fuzz.u8", Value::U8(7))
        .metadata("fuzz.i8", Value::I8(-7))
        .metadata("fuzz.u16", Value::U16(700))
        .metadata("fuzz.i16", Value::I16(-700))
        .metadata("fuzz.i64", Value::I64(-1))
        .metadata(
            "fuzz.nested",
            Value::Array(vec![
                Value::Array(vec![Value::U8(1), Value::U8(2)]),
                Value::Array(vec![Value::U8(3)]),
            ]),
        );
    for (name, dtype, shape, bytes) in tensors(Naming::Gguf, dtypes, seed) {
        w.tensor(name, dtype, &shape, bytes);
    }
    w.to_bytes()
}

/// The tiny model as a Hugging Face `config.json`.
pub fn hf_config_json() -> String {
    let c = config();
    serde_json::json!({
        "model_type": "llama",
        "hidden_size": c.hidden,
        "intermediate_size": c.ffn,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "vocab_size": c.vocab,
        "rope_theta": c.rope_base,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": false,
        "bos_token_id": 0,
        "eos_token_id": [1],
        "max_position_embeddings": c.context,
    })
    .to_string()
}

/// The tiny model as one `.safetensors` file (F32, F16 and BF16 tensors).
pub fn safetensors(seed: u64) -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let ts = tensors(
        Naming::HuggingFace,
        &[DType::F32, DType::F16, DType::BF16],
        seed,
    );
    let views: Vec<(String, TensorView<'_>)> = ts
        .iter()
        .filter_map(|(name, dtype, shape, bytes)| {
            let d = match dtype {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                _ => Dtype::BF16,
            };
            TensorView::new(d, shape.clone(), bytes)
                .ok()
                .map(|v| (name.clone(), v))
        })
        .collect();
    safetensors::tensor::serialize(views, None).unwrap_or_default()
}

/// The manifest a server would publish for the safetensors model, as JSON.
pub fn manifest_json(seed: u64) -> Vec<u8> {
    let bytes = safetensors(seed);
    let len = bytes.len() as u64;
    let Ok(store) =
        SafetensorsStore::open("model", vec![MemSource::new("model.safetensors", bytes)])
    else {
        return Vec::new();
    };
    let files = vec![ManifestFile {
        url: "/model/file/0".into(),
        len,
        sha256: "00".repeat(32),
    }];
    Manifest::build(
        "fuzz",
        &config_hf(),
        Naming::HuggingFace,
        &store,
        files,
        None,
        Some(CHAT_TEMPLATE.into()),
    )
    .ok()
    .and_then(|m| serde_json::to_vec(&m).ok())
    .unwrap_or_default()
}

/// The configuration `config.json` describes (rotate-half RoPE, as Hugging Face files).
pub fn config_hf() -> Config {
    Config {
        rope_layout: RopeLayout::RotateHalf,
        add_bos: false,
        ..config()
    }
}
