//! Small random Llama models, written the way real checkpoints are: Hugging Face safetensors
//! (rotate-half RoPE) and GGUF (Q/K rows permuted to adjacent pairs, as the converters do).

use std::collections::HashMap;

use mdi_core::gguf::{GgufWriter, Value};
use mdi_core::sampling::Rng;
use mdi_core::weights::{GgufStore, SafetensorsStore};
use mdi_core::{Config, DType, MemSource, RopeLayout};

/// Shape of a tiny model.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub tied: bool,
    pub qkv_bias: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            n_layers: 4,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 2,
            ffn: 96,
            vocab: 128,
            tied: false,
            qkv_bias: false,
        }
    }
}

/// A random model: tensors by Hugging Face name, row-major f32.
pub struct TinyModel {
    pub shape: Shape,
    pub head_dim: usize,
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn normal(rng: &mut Rng) -> f32 {
    // Box–Muller.
    let u1 = rng.next_f32().max(1e-7);
    let u2 = rng.next_f32();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl TinyModel {
    pub fn random(shape: Shape, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let hd = shape.hidden / shape.n_heads;
        let (h, q, kv, f) = (
            shape.hidden,
            shape.n_heads * hd,
            shape.n_kv_heads * hd,
            shape.ffn,
        );
        let mut tensors = Vec::new();
        let mut add = |name: String, dims: Vec<usize>, scale: f32, offset: f32| {
            let n = dims.iter().product();
            let data = (0..n).map(|_| offset + scale * normal(&mut rng)).collect();
            tensors.push((name, dims, data));
        };
        add(
            "model.embed_tokens.weight".into(),
            vec![shape.vocab, h],
            1.0,
            0.0,
        );
        for i in 0..shape.n_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let ws = 1.0 / (h as f32).sqrt();
            add(p("input_layernorm.weight"), vec![h], 0.1, 1.0);
            add(p("self_attn.q_proj.weight"), vec![q, h], ws, 0.0);
            add(p("self_attn.k_proj.weight"), vec![kv, h], ws, 0.0);
            add(p("self_attn.v_proj.weight"), vec![kv, h], ws, 0.0);
            add(p("self_attn.o_proj.weight"), vec![h, q], ws, 0.0);
            if shape.qkv_bias {
                add(p("self_attn.q_proj.bias"), vec![q], 0.2, 0.0);
                add(p("self_attn.k_proj.bias"), vec![kv], 0.2, 0.0);
                add(p("self_attn.v_proj.bias"), vec![kv], 0.2, 0.0);
            }
            add(p("post_attention_layernorm.weight"), vec![h], 0.1, 1.0);
            add(p("mlp.gate_proj.weight"), vec![f, h], ws, 0.0);
            add(p("mlp.up_proj.weight"), vec![f, h], ws, 0.0);
            add(
                p("mlp.down_proj.weight"),
                vec![h, f],
                1.0 / (f as f32).sqrt(),
                0.0,
            );
        }
        add("model.norm.weight".into(), vec![h], 0.1, 1.0);
        if !shape.tied {
            add(
                "lm_head.weight".into(),
                vec![shape.vocab, h],
                1.0 / (h as f32).sqrt(),
                0.0,
            );
        }
        Self {
            shape,
            head_dim: hd,
            tensors,
        }
    }

    /// The configuration a loader should derive (Hugging Face layout).
    pub fn config(&self) -> Config {
        Config::from_hf_json(&self.config_json()).expect("tiny config is valid")
    }

    pub fn config_json(&self) -> String {
        let s = &self.shape;
        serde_json::json!({
            "model_type": "llama",
            "hidden_size": s.hidden,
            "intermediate_size": s.ffn,
            "num_hidden_layers": s.n_layers,
            "num_attention_heads": s.n_heads,
            "num_key_value_heads": s.n_kv_heads,
            "vocab_size": s.vocab,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": s.tied,
            "attention_bias": s.qkv_bias,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "max_position_embeddings": 256,
        })
        .to_string()
    }

    /// A safetensors file holding every tensor as f32.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(n, s, d)| {
                (
                    n.clone(),
                    s.clone(),
                    d.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: HashMap<String, safetensors::tensor::TensorView<'_>> = bytes
            .iter()
            .map(|(n, s, b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .expect("consistent view");
                (n.clone(), view)
            })
            .collect();
        safetensors::serialize(&views, None).expect("serialise")
    }

    pub fn safetensors_store(&self) -> SafetensorsStore<MemSource> {
        let src = MemSource::new("tiny.safetensors", self.to_safetensors());
        SafetensorsStore::open("tiny", vec![src]).expect("open safetensors")
    }

    /// Reorder the rows of one projection from rotate-half to adjacent pairs, per head.
    fn permute_rows(&self, data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let hd = self.head_dim;
        let half = hd / 2;
        let mut out = vec![0.0; data.len()];
        for r in 0..rows {
            let (head, within) = (r / hd, r % hd);
            // New row 2i + j holds old row j·half + i.
            let (i, j) = (within / 2, within % 2);
            let src = head * hd + j * half + i;
            out[r * cols..(r + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
        }
        out
    }

    /// A GGUF file (llama architecture) with matrices stored as `dtype`, norms as F32.
    pub fn to_gguf(&self, dtype: DType) -> Vec<u8> {
        let s = &self.shape;
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", Value::U32(s.n_layers as u32))
            .metadata("llama.context_length", Value::U32(256))
            .metadata("llama.embedding_length", Value::U32(s.hidden as u32))
            .metadata("llama.feed_forward_length", Value::U32(s.ffn as u32))
            .metadata("llama.attention.head_count", Value::U32(s.n_heads as u32))
            .metadata(
                "llama.attention.head_count_kv",
                Value::U32(s.n_kv_heads as u32),
            )
            .metadata("llama.rope.freq_base", Value::F32(10000.0))
            .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
            .metadata("llama.vocab_size", Value::U32(s.vocab as u32))
            .metadata("tokenizer.ggml.bos_token_id", Value::U32(1))
            .metadata("tokenizer.ggml.eos_token_id", Value::U32(2));
        for (name, dims, data) in &self.tensors {
            let gguf_name = gguf_name(name);
            let is_qk = name.contains("q_proj") || name.contains("k_proj");
            let data = if is_qk {
                let cols = if dims.len() == 2 { dims[1] } else { 1 };
                self.permute_rows(data, dims[0], cols)
            } else {
                data.clone()
            };
            let dt = if dims.len() == 2 { dtype } else { DType::F32 };
            w.tensor(gguf_name, dt, dims, mdi_core::quant::quantize(dt, &data));
        }
        w.to_bytes()
    }

    pub fn gguf_store(&self, dtype: DType) -> GgufStore<MemSource> {
        GgufStore::open(MemSource::new("tiny.gguf", self.to_gguf(dtype))).expect("open gguf")
    }

    /// The GGUF-side configuration: the same model with adjacent-pair RoPE.
    pub fn gguf_config(&self, dtype: DType) -> Config {
        let c = Config::from_gguf(&self.gguf_store(dtype).gguf).expect("gguf config");
        assert_eq!(c.rope_layout, RopeLayout::AdjacentPairs);
        c
    }
}

fn gguf_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (layer, tail) = rest.split_once('.').expect("layer index");
        let t = match tail {
            "input_layernorm.weight" => "attn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "self_attn.q_proj.bias" => "attn_q.bias",
            "self_attn.k_proj.bias" => "attn_k.bias",
            "self_attn.v_proj.bias" => "attn_v.bias",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            other => panic!("unknown tensor {other}"),
        };
        return format!("blk.{layer}.{t}");
    }
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight",
        "model.norm.weight" => "output_norm.weight",
        "lm_head.weight" => "output.weight",
        other => panic!("unknown tensor {other}"),
    }
    .to_string()
}
