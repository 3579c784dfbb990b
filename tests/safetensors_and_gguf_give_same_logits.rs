//! The same random Llama written as a Hugging Face safetensors checkpoint (rotate-half RoPE)
//! and as GGUF (Q/K rows permuted to adjacent pairs, as the converters do) gives the same
//! logits at every step: both RoPE layouts and both loaders agree. Quantized GGUF copies agree
//! with an f32 model over the same dequantized values.

use mdi_core::weights::TensorStore;
use mdi_core::{Config, DType, Oracle, StageInput, StageOutput, StageSpec, StageWeights, Want};
use mdi_tests::max_abs_diff;
use mdi_tests::tiny::{Shape, TinyModel};

/// Logits after each step: a 5-token prefill, then 4 single tokens.
fn run(store: &dyn TensorStore, config: &Config) -> Vec<Vec<f32>> {
    let spec = StageSpec::whole(config);
    let oracle = Oracle::new(
        config.clone(),
        StageWeights::load(store, config, &spec).unwrap(),
    )
    .unwrap();
    let mut cache = oracle.new_cache(16);
    let mut out = Vec::new();
    for input in [&[5u32, 17, 3, 99, 42][..], &[7], &[8], &[120], &[0]] {
        match oracle
            .forward(&mut cache, StageInput::Tokens(input), Want::Logits)
            .unwrap()
        {
            StageOutput::Logits(l) => out.push(l),
            other => panic!("{other:?}"),
        }
    }
    out
}

fn check(shape: Shape, seed: u64) {
    let tiny = TinyModel::random(shape, seed);
    let hf_config = tiny.config();
    let gguf_config = tiny.gguf_config(DType::F32);
    assert_eq!(hf_config.qkv_bias, shape.qkv_bias);
    assert_eq!(gguf_config.qkv_bias, shape.qkv_bias);
    assert_eq!(gguf_config.tied_embeddings, shape.tied);
    let a = run(&tiny.safetensors_store(), &hf_config);
    let b = run(&tiny.gguf_store(DType::F32), &gguf_config);
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(a, b);
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "step {step}: diff {diff} (scale {scale})"
        );
    }
}

#[test]
fn rotate_half_and_adjacent_pairs_agree() {
    check(Shape::default(), 1);
}

#[test]
fn agree_with_tied_embeddings_and_qkv_biases() {
    check(
        Shape {
            tied: true,
            qkv_bias: true,
            n_kv_heads: 1,
            ..Shape::default()
        },
        2,
    );
    check(
        Shape {
            n_heads: 8,
            n_kv_heads: 8,
            hidden: 128,
            ..Shape::default()
        },
        3,
    );
}

#[test]
fn quantized_gguf_matches_f32_over_the_same_values() {
    let tiny = TinyModel::random(Shape::default(), 4);
    for dtype in [
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
    ] {
        // Rebuild an f32 model from the dequantized weights: the engines must agree exactly
        // up to float summation order.
        let store = tiny.gguf_store(dtype);
        let mut exact = TinyModel::random(Shape::default(), 4);
        for (name, dims, data) in &mut exact.tensors {
            if dims.len() == 2 {
                let q = mdi_core::quant::quantize(dtype, data);
                mdi_core::quant::dequantize(dtype, &q, data);
            }
            let _ = name;
        }
        let config = tiny.gguf_config(dtype);
        let a = run(&store, &config);
        let b = run(&exact.gguf_store(DType::F32), &config);
        for (a, b) in a.iter().zip(&b) {
            let diff = max_abs_diff(a, b);
            assert!(diff <= 1e-4, "{dtype}: diff {diff}");
        }
    }
}
