//! Text ⇄ token ids, and chat templates.
//!
//! The tokenizer comes from `tokenizer.json` when a checkpoint has one; GGUF files carry the
//! vocabulary, merges, token types and pre-tokenizer name in their metadata instead, and
//! [`Tokenizer::from_gguf`] builds the same byte-level BPE from them. Special tokens written in
//! a prompt (`<|im_start|>`) become single ids. Chat prompts are rendered from the model's own
//! Jinja template, with bounded instructions and output (the messages come from API callers).

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::error::{Error, Result};
use crate::gguf::{Gguf, Value};

/// GGUF token types that mark control and user-defined tokens, matched whole in a prompt.
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// A tokenizer plus what the model says about prompts: BOS, EOS and the chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json` (which applies its own BOS rules), with the chat
    /// template from `tokenizer_config.json` if given.
    pub fn from_json(json: &[u8], chat_template: Option<String>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(tok_err)?;
        Ok(Self {
            inner,
            bos: None,
            add_bos: false,
            chat_template,
        })
    }

    /// Build the tokenizer described by GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let file = &g.file;
        let model = g.get("tokenizer.ggml.model").and_then(Value::as_str);
        if model != Some("gpt2") {
            return Err(Error::Tokenizer(format!(
                "{file}: tokenizer model {model:?} is not supported (byte-level BPE `gpt2` is)"
            )));
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            g.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| Error::Tokenizer(format!("{file}: no `{key}` array")))?
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        Error::Tokenizer(format!("{file}: `{key}` holds a non-string"))
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("{file}: merge `{m}` has no space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // No word cache: `tokenizers` keeps it in a thread-local map keyed per BPE
            // instance and never removes an instance's entry when it is dropped, so every
            // tokenizer built from a file (the fuzzer builds millions) would leave memory
            // behind on each thread that used it. Prompts are short; merging words afresh costs
            // little.
            .cache_capacity(0)
            .build()
            .map_err(tok_err)?;

        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // SmolLM and several others split every digit on its own before the GPT-2 regex.
            "smollm" | "starcoder" | "refact" | "qwen2" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "gpt2" | "default" => byte_level.into(),
            other => {
                return Err(Error::Tokenizer(format!(
                    "{file}: pre-tokenizer `{other}` is not supported (smollm, gpt2 are)"
                )))
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let types = g.get("tokenizer.ggml.token_type").and_then(Value::as_array);
        let special: Vec<AddedToken> = match types {
            Some(types) => tokens
                .iter()
                .zip(types)
                .filter(|(_, t)| {
                    matches!(
                        t.as_u64(),
                        Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)
                    )
                })
                .map(|(s, _)| AddedToken::from(s.to_string(), true).normalized(false))
                .collect(),
            None => Vec::new(),
        };
        inner.add_special_tokens(special).map_err(tok_err)?;

        let id = |key: &str| g.get(key).and_then(Value::as_u64).map(|v| v as u32);
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Serialise as `tokenizer.json`.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tok_err)
    }

    /// Encode text: special tokens written in it become single ids. With `add_bos`, BOS is
    /// added when the model asks for it (raw prompts); rendered chat templates write their own.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_bos).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decode ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Decode ids to the text a reader sees: special tokens (EOS, `<|im_end|>`) left out.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Render the model's chat template for one user message, ready for generation.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        self.chat(&[("user", user)])
    }

    /// Render the model's chat template for a conversation of `(role, content)` messages,
    /// ready for the assistant's next turn.
    pub fn chat(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate("the model has no chat template; use a raw prompt".into())
        })?;
        render_chat(template, messages, self.bos_token().as_deref())
    }

    fn bos_token(&self) -> Option<String> {
        self.bos.and_then(|id| self.inner.id_to_token(id))
    }
}

/// Template instructions one rendering may run: a real chat template spends tens per
/// message, so this bounds the time a looping template can take, not real conversations.
pub const TEMPLATE_FUEL: u64 = 4_000_000;

/// The most bytes a rendered prompt may have: a template adds markup around the messages, so
/// a few times the input and a fixed allowance; past it a template is looping, not rendering.
pub fn max_rendered_bytes(template: &str, messages: &[(&str, &str)]) -> usize {
    let input = messages.iter().fold(template.len(), |a, (r, c)| {
        a.saturating_add(r.len()).saturating_add(c.len())
    });
    input.saturating_mul(4).saturating_add(64 << 10)
}

/// Writes into memory until a limit, then fails: what stops a template from printing without
/// end.
struct Bounded {
    out: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len().saturating_add(buf.len()) > self.limit {
            return Err(std::io::Error::other(format!(
                "the rendered prompt passes {} bytes",
                self.limit
            )));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Render a Jinja chat template over `(role, content)` messages with a generation prompt.
/// Messages come from API callers and templates from model files, so rendering is bounded:
/// [`TEMPLATE_FUEL`] instructions and [`max_rendered_bytes`] of output.
pub fn render_chat(template: &str, messages: &[(&str, &str)], bos: Option<&str>) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    // Templates written for Python's Jinja call string methods such as `.strip()`.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    let limit = max_rendered_bytes(template, messages);
    let messages: Vec<_> = messages
        .iter()
        .map(|(role, content)| minijinja::context! { role => role, content => content })
        .collect();
    let mut out = Bounded {
        out: Vec::new(),
        limit,
    };
    env.get_template("chat")
        .and_then(|t| {
            t.render_captured_to(
                minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => bos.unwrap_or(""),
                },
                &mut out,
            )
        })
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    String::from_utf8(out.out)
        .map_err(|_| Error::ChatTemplate("the template rendered invalid UTF-8".into()))
}
