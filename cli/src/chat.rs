//! `mdi chat`: a conversation in the terminal, with the model's own chat template, answers
//! streamed as they are generated, the history kept within the context (the oldest turns are
//! dropped, with a note, when it fills), `/reset`, `/exit`, and Ctrl-C stopping the current
//! answer without leaving. It runs on a local engine, or through a ring's OpenAI-compatible
//! API with `--server`.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use mdi_core::{Config, SamplingParams, StageEngine, Tokenizer};

use crate::generate::{generate, Request};

/// A chat message: (role, content).
pub type Message = (String, String);

/// How answers are made.
pub trait Answerer {
    /// Answers the conversation `messages` (it ends with the user's turn), calling `on_text`
    /// with each new piece of text. Stops early when `stop` is set. Returns the whole answer
    /// and whether it was stopped.
    fn answer(
        &mut self,
        messages: &[Message],
        stop: &AtomicBool,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<(String, bool)>;

    /// Makes `messages` fit the context, dropping the oldest turns; returns how many turns
    /// were dropped.
    fn fit(&mut self, messages: &mut Vec<Message>) -> Result<usize>;
}

/// Text of `ids` without special tokens, held back while the tail is an incomplete character.
struct Streamer {
    printed: usize,
}

impl Streamer {
    fn new() -> Self {
        Self { printed: 0 }
    }

    fn next<'a>(&mut self, text: &'a str) -> Option<&'a str> {
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed {
            return None;
        }
        if !text.is_char_boundary(self.printed) {
            return None;
        }
        let piece = &text[self.printed..];
        self.printed = text.len();
        Some(piece)
    }
}

/// A whole model on this machine.
pub struct Local<E: StageEngine> {
    pub engine: E,
    pub tokenizer: Tokenizer,
    pub config: Config,
    pub max_tokens: usize,
    pub params: SamplingParams,
}

#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped")
    }
}

impl std::error::Error for Stopped {}

impl<E: StageEngine> Local<E> {
    fn prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let pairs: Vec<(&str, &str)> = messages
            .iter()
            .map(|(r, c)| (r.as_str(), c.as_str()))
            .collect();
        let text = self.tokenizer.chat(&pairs)?;
        Ok(self.tokenizer.encode(&text, false)?)
    }
}

/// Drops the oldest user/assistant pair (keeping a leading system message).
fn drop_oldest(messages: &mut Vec<Message>) -> bool {
    let first = usize::from(messages.first().is_some_and(|(r, _)| r == "system"));
    // Keep at least the last user turn.
    if messages.len() - first <= 1 {
        return false;
    }
    let n = if messages
        .get(first + 1)
        .is_some_and(|(r, _)| r == "assistant")
    {
        2
    } else {
        1
    };
    messages.drain(first..first + n);
    true
}

impl<E: StageEngine> Answerer for Local<E> {
    fn fit(&mut self, messages: &mut Vec<Message>) -> Result<usize> {
        let mut dropped = 0;
        loop {
            let n = self.prompt(messages)?.len();
            // Room for a useful answer: the whole budget, or at least a quarter of the context.
            let room = self.max_tokens.min(self.config.context / 4);
            if n + room <= self.config.context {
                return Ok(dropped);
            }
            if !drop_oldest(messages) {
                bail!(
                    "this message alone takes {n} of the model's {} tokens of context; \
                     send a shorter one",
                    self.config.context
                );
            }
            dropped += 1;
        }
    }

    fn answer(
        &mut self,
        messages: &[Message],
        stop: &AtomicBool,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<(String, bool)> {
        let prompt_tokens = self.prompt(messages)?;
        let req = Request {
            prompt_tokens,
            max_tokens: self.max_tokens,
            params: self.params,
            eos_ids: self.config.eos_ids.clone(),
            context: self.config.context,
        };
        let mut ids = Vec::new();
        let mut streamer = Streamer::new();
        let tok = &self.tokenizer;
        let result = generate(&mut self.engine, &req, |t| {
            if stop.load(Ordering::SeqCst) {
                return Err(Stopped.into());
            }
            ids.push(t);
            let text = tok.decode_text(&ids)?;
            if let Some(piece) = streamer.next(&text) {
                on_text(piece)?;
            }
            Ok(())
        });
        let stopped = match result {
            Ok(_) => false,
            Err(e) if e.is::<Stopped>() => true,
            Err(e) => return Err(e),
        };
        let text = tok.decode_text(&ids)?;
        if !stopped {
            if let Some(piece) = streamer.next(&text) {
                on_text(piece)?;
            }
        }
        Ok((text.trim_end_matches('\u{FFFD}').to_string(), stopped))
    }
}

/// A ring's OpenAI-compatible API.
pub struct Remote {
    pub server: String,
    pub token: Option<String>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub client: reqwest::blocking::Client,
}

impl Answerer for Remote {
    fn fit(&mut self, _messages: &mut Vec<Message>) -> Result<usize> {
        // The server checks the context and says so when a conversation is too long.
        Ok(0)
    }

    fn answer(
        &mut self,
        messages: &[Message],
        stop: &AtomicBool,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<(String, bool)> {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        let mut req = self
            .client
            .post(format!(
                "{}/v1/chat/completions",
                self.server.trim_end_matches('/')
            ))
            .json(&serde_json::json!({
                "model": "default",
                "messages": msgs,
                "max_tokens": self.max_tokens,
                "temperature": self.params.temperature,
                "top_p": self.params.top_p,
                "seed": self.params.seed,
                "stream": true,
            }));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .with_context(|| format!("cannot reach the server at {}", self.server))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body: serde_json::Value = resp.json().unwrap_or_default();
            bail!(
                "the server answered {status}: {}",
                body["error"]["message"].as_str().unwrap_or("no details")
            );
        }
        let mut text = String::new();
        for line in std::io::BufReader::new(resp).lines() {
            if stop.load(Ordering::SeqCst) {
                // Dropping the response closes the stream; the server cancels the sequence.
                return Ok((text, true));
            }
            let line = line.context("reading the answer")?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let v: serde_json::Value =
                serde_json::from_str(data).context("a malformed event from the server")?;
            if let Some(m) = v["error"]["message"].as_str() {
                bail!("the server failed: {m}");
            }
            if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(piece);
                on_text(piece)?;
            }
        }
        Ok((text, false))
    }
}

/// What the person typed.
enum Line {
    Exit,
    Reset,
    Say(String),
    Nothing,
}

fn parse(line: &str) -> Line {
    match line.trim() {
        "/exit" | "/quit" => Line::Exit,
        "/reset" => Line::Reset,
        "" => Line::Nothing,
        s if s.starts_with('/') => Line::Say(String::new()),
        s => Line::Say(s.to_string()),
    }
}

/// The conversation loop: prompts on `out`, reads turns from `input`, notes on `err`.
pub fn run(
    answerer: &mut dyn Answerer,
    system: Option<String>,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let start = || -> Vec<Message> {
        system
            .iter()
            .map(|s| ("system".to_string(), s.clone()))
            .collect()
    };
    let mut messages = start();
    writeln!(
        err,
        "Chat with the model. Ctrl-C stops an answer, /reset starts over, /exit leaves."
    )?;
    loop {
        write!(out, "> ")?;
        out.flush()?;
        stop.store(false, Ordering::SeqCst);
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let text = match parse(&line) {
            Line::Exit => return Ok(()),
            Line::Reset => {
                messages = start();
                writeln!(err, "(the conversation starts over)")?;
                continue;
            }
            Line::Nothing => continue,
            Line::Say(s) if s.is_empty() => {
                writeln!(err, "(commands: /reset, /exit)")?;
                continue;
            }
            Line::Say(s) => s,
        };
        messages.push(("user".to_string(), text));
        match answerer.fit(&mut messages) {
            Ok(0) => {}
            Ok(n) => writeln!(
                err,
                "(the conversation outgrew the context: the oldest {n} turn{} left it)",
                if n == 1 { "" } else { "s" }
            )?,
            Err(e) => {
                messages.pop();
                writeln!(err, "error: {e:#}")?;
                continue;
            }
        }
        let result = answerer.answer(&messages, stop, &mut |piece| {
            out.write_all(piece.as_bytes())?;
            out.flush()?;
            Ok(())
        });
        match result {
            Ok((answer, stopped)) => {
                writeln!(out)?;
                if stopped {
                    writeln!(err, "(stopped)")?;
                }
                messages.push(("assistant".to_string(), answer));
            }
            Err(e) => {
                writeln!(out)?;
                messages.pop();
                writeln!(err, "error: {e:#}")?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_turns_go_first_and_the_system_message_stays() {
        let m = |r: &str, c: &str| (r.to_string(), c.to_string());
        let mut msgs = vec![
            m("system", "s"),
            m("user", "1"),
            m("assistant", "a1"),
            m("user", "2"),
        ];
        assert!(drop_oldest(&mut msgs));
        assert_eq!(msgs, vec![m("system", "s"), m("user", "2")]);
        assert!(!drop_oldest(&mut msgs), "the last turn stays");
        let mut s = Streamer::new();
        assert_eq!(s.next("ab"), Some("ab"));
        assert_eq!(s.next("ab\u{FFFD}"), None);
        assert_eq!(s.next("abé"), Some("é"));
    }
}
