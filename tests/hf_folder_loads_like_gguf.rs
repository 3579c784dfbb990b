//! A Hugging Face checkpoint folder (config.json, sharded *.safetensors, tokenizer.json,
//! tokenizer_config.json with a chat template) opens through `mdi::open_model` and generates
//! the same greedy tokens as the same weights written as GGUF.

use mdi::generate::{generate, Request};
use mdi_core::{DType, Oracle, SamplingParams, StageSpec, StageWeights};
use mdi_tests::tiny::{Shape, TinyModel};

#[test]
fn hf_folder_generates_the_same_tokens_as_gguf() -> anyhow::Result<()> {
    // The vocabulary of the default model's tokenizer, so real text can be encoded.
    let tokenizer = &mdi_tests::default_model()?.tokenizer;
    let shape = Shape {
        vocab: 49152,
        n_layers: 2,
        ..Shape::default()
    };
    let tiny = TinyModel::random(shape, 31);
    let dir = std::env::temp_dir().join(format!("mdi-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("config.json"), tiny.config_json())?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_json()?)?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        })
        .to_string(),
    )?;
    // Two shards: the embedding in one file, everything else in the other.
    let (embed, rest): (Vec<_>, Vec<_>) = tiny
        .tensors
        .iter()
        .cloned()
        .partition(|(n, _, _)| n == "model.embed_tokens.weight");
    for (i, part) in [embed, rest].into_iter().enumerate() {
        let shard = TinyModel {
            tensors: part,
            ..TinyModel::random(shape, 31)
        };
        std::fs::write(
            dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            shard.to_safetensors(),
        )?;
    }

    let model = mdi::open_model(&dir)?;
    let chat = model.tokenizer.chat_prompt("  Hello there  ")?;
    assert_eq!(
        chat,
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    );
    let prompt = model.tokenizer.encode(&chat, false)?;
    assert_eq!(prompt, tokenizer.encode(&chat, false)?);

    let run = |store: &dyn mdi_core::TensorStore, config: &mdi_core::Config| {
        let spec = StageSpec::whole(config);
        let weights = StageWeights::load(store, config, &spec).unwrap();
        let mut oracle = Oracle::new(config.clone(), weights).unwrap();
        let req = Request {
            prompt_tokens: prompt.clone(),
            max_tokens: 6,
            params: SamplingParams::default(),
            eos_ids: vec![],
            context: config.context,
        };
        generate(&mut oracle, &req, |_| Ok(())).unwrap().tokens
    };
    let from_folder = run(model.store.as_ref(), &model.config);
    let from_gguf = run(&tiny.gguf_store(DType::F32), &tiny.gguf_config(DType::F32));
    assert_eq!(from_folder.len(), 6);
    assert_eq!(from_folder, from_gguf);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
