//! The tokenizer built from the default model's GGUF metadata reproduces the reference prompt
//! ids exactly and round-trips awkward text; a regression in the BPE, the digit pre-tokenizer
//! or special-token parsing changes ids and fails here.

use mdi_core::Tokenizer;
use mdi_tests::{default_model, golden_chat};

#[test]
fn golden_chat_prompt_gives_its_16_ids() -> anyhow::Result<()> {
    let golden = golden_chat()?;
    let tok = &default_model()?.tokenizer;
    let ids = tok.encode(&golden.prompt, true)?;
    assert_eq!(ids.len(), 16);
    assert_eq!(ids, golden.prompt_tokens);
    assert_eq!(tok.decode(&ids)?, golden.prompt);
    Ok(())
}

#[test]
fn special_tokens_in_text_are_single_ids() -> anyhow::Result<()> {
    let tok = &default_model()?.tokenizer;
    assert_eq!(tok.encode("<|im_start|>", true)?, vec![1]);
    assert_eq!(tok.encode("<|im_end|>", true)?, vec![2]);
    assert_eq!(tok.encode("<|endoftext|>", true)?, vec![0]);
    Ok(())
}

#[test]
fn digits_are_split_one_by_one() -> anyhow::Result<()> {
    let tok = &default_model()?.tokenizer;
    let ids = tok.encode("12345", true)?;
    assert_eq!(ids.len(), 5, "{ids:?}");
    for (id, d) in ids.iter().zip('1'..='5') {
        assert_eq!(tok.decode(&[*id])?, d.to_string());
    }
    Ok(())
}

#[test]
fn awkward_text_round_trips() -> anyhow::Result<()> {
    let tok = &default_model()?.tokenizer;
    for text in [
        "Digits 0123456789 and 3.14159, 1e-10",
        "Grüße aus Köln — naïve café, Ελληνικά, 日本語のテキスト, русский",
        "Emoji 🦀🚀👩‍👩‍👧 and flags 🇫🇷",
        "runs   of spaces\t\ttabs\n\n\nnewlines \r\n and trailing   ",
        "  leading spaces",
        "<|im_start|>user\nmixed <|im_end|> specials<|im_end|>\n",
    ] {
        let ids = tok.encode(text, true)?;
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids)?, text, "ids {ids:?}");
    }
    Ok(())
}

#[test]
fn tokenizer_json_export_loads_back_with_the_same_ids() -> anyhow::Result<()> {
    let golden = golden_chat()?;
    let tok = &default_model()?.tokenizer;
    let json = tok.to_json()?;
    let again = Tokenizer::from_json(json.as_bytes(), None)?;
    assert_eq!(again.encode(&golden.prompt, true)?, golden.prompt_tokens);
    let text = "Numbers 2026 and émojis 🦀";
    assert_eq!(again.encode(text, true)?, tok.encode(text, true)?);
    Ok(())
}

#[test]
fn chat_template_renders_the_models_own_format() -> anyhow::Result<()> {
    let tok = &default_model()?.tokenizer;
    let prompt = tok.chat_prompt("What is the capital of France?")?;
    // SmolLM2's template adds its default system message when none is given.
    assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt}");
    assert!(prompt.ends_with(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ));
    let ids = tok.encode(&prompt, false)?;
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&t| t == 1).count(), 3);
    Ok(())
}
