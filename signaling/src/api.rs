//! The OpenAI-compatible API: `GET /v1/models` and `POST /v1/chat/completions`, streaming
//! (server-sent events in OpenAI's chunk format, ending with `data: [DONE]`) or not.
//!
//! The server renders the model's chat template and tokenizes, so a bad request is refused
//! before it reaches the ring; the starter node samples; the server turns tokens back into
//! text, holding back what could still become a `stop` string, and cancels the sequence on
//! every node when a stop string matches or the client goes away.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use mdi_core::SamplingParams;
use mdi_runtime::protocol::FinishReason;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::room::{GenerateRequest, StreamItem};
use crate::AppState;

/// Most `stop` strings a request may give (as OpenAI allows).
const MAX_STOPS: usize = 4;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            code: Some("not_found"),
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong token: send `Authorization: Bearer TOKEN` with the \
                      server's --token"
                .into(),
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            code: None,
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            code: Some("ring_unavailable"),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": Value::Null,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `GET /v1/models`
pub async fn models(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = app.check_token(&headers) {
        return e.into_response();
    }
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.model.id,
            "object": "model",
            "created": app.started,
            "owned_by": "mdi",
        }],
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// The fields of a chat completion request this server reads; others are ignored, as
/// OpenAI clients send many.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessage>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not in OpenAI's API; many servers accept it.
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
}

/// A request checked and tokenized.
struct Prepared {
    prompt_tokens: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn prepare(app: &AppState, req: ChatRequest) -> Result<Prepared, ApiError> {
    if let Some(m) = &req.model {
        if m != &app.model.id && m != "default" {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{m}` is not served here; use `{}` (or `default`)",
                    app.model.id
                ),
                kind: "invalid_request_error",
                code: Some("model_not_found"),
            });
        }
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported"));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("`messages` is empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::bad_request(format!(
                "messages[{i}].role `{}` is not one of system, user, assistant",
                m.role
            )));
        }
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(x)) => t.push_str(x),
                        (k, _) => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}]: content parts of type `{k}` are not supported"
                            )))
                        }
                    }
                }
                t
            }
        };
        // The template knows system, user and assistant.
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        messages.push((role.to_string(), text));
    }
    let pairs: Vec<(&str, &str)> = messages
        .iter()
        .map(|(r, c)| (r.as_str(), c.as_str()))
        .collect();
    let tok = &app.model.tokenizer;
    let prompt = tok
        .chat(&pairs)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let prompt_tokens = tok
        .encode(&prompt, false)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let context = app.model.config.context;
    if prompt_tokens.len() >= context {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "the messages take {} tokens but the model's context holds {context} \
                 (including at least one generated token); shorten them",
                prompt_tokens.len()
            ),
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
        });
    }
    let room = context - prompt_tokens.len();
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(n) if n < 1 => {
            return Err(ApiError::bad_request(format!(
                "max_tokens must be at least 1, got {n}"
            )))
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(room),
        None => app.default_max_tokens.min(room),
    };
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!(
            "temperature must be within 0..=2, got {temperature}"
        )));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(format!(
            "top_p must be within (0, 1], got {top_p}"
        )));
    }
    let top_k = match req.top_k {
        Some(k) if k < 0 => {
            return Err(ApiError::bad_request(format!("top_k must be ≥ 0, got {k}")))
        }
        Some(k) => k as usize,
        None => 0,
    };
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad_request(format!(
            "stop takes at most {MAX_STOPS} non-empty strings of at most 256 bytes"
        )));
    }
    let stream = req.stream.unwrap_or(false);
    Ok(Prepared {
        prompt_tokens,
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: req.seed.unwrap_or(0) as u64,
        },
        stop,
        stream,
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// Cancels the request on the ring unless it finished: dropping it (the client went away, the
/// handler was cancelled) stops the sequence on every node.
struct Guard {
    app: Arc<AppState>,
    id: u64,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!("request {}: the client went away; cancelling", self.id);
            self.app.hub().cancel(crate::DEFAULT_ROOM, self.id);
        }
    }
}

/// Turns tokens into text as they come: holds back an incomplete UTF-8 tail and anything that
/// could still be the start of a stop string; finds stop strings.
struct Detok {
    ids: Vec<u32>,
    text: String,
    emitted: usize,
    stop: Vec<String>,
    eos: Vec<u32>,
    /// Tokens sampled, EOS included (the usage count).
    sampled: usize,
}

impl Detok {
    fn new(stop: Vec<String>, eos: Vec<u32>) -> Self {
        Self {
            ids: Vec::new(),
            text: String::new(),
            emitted: 0,
            stop,
            eos,
            sampled: 0,
        }
    }

    /// Adds tokens; returns new text to send and whether a stop string ended the answer.
    fn push(&mut self, app: &AppState, tokens: &[u32]) -> (String, bool) {
        self.sampled += tokens.len();
        self.ids
            .extend(tokens.iter().filter(|t| !self.eos.contains(t)));
        if let Ok(t) = app.model.tokenizer.decode_text(&self.ids) {
            self.text = t;
        }
        self.advance()
    }

    /// What of `self.text` can be sent now, and whether a stop string ended the answer.
    fn advance(&mut self) -> (String, bool) {
        // Where a stop string matches, the answer ends before it.
        let from = self
            .emitted
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let hit = self
            .stop
            .iter()
            .filter_map(|s| {
                let start = (from..=self.text.len()).find(|&i| self.text.is_char_boundary(i))?;
                self.text[start..].find(s.as_str()).map(|p| start + p)
            })
            .min();
        if let Some(end) = hit {
            let end = end.max(self.emitted);
            let delta = self.text[self.emitted..end].to_string();
            self.text.truncate(end);
            self.emitted = end;
            return (delta, true);
        }
        let mut safe = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            safe = self.text.trim_end_matches('\u{FFFD}').len();
        }
        // Keep back the longest tail that begins some stop string.
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if self.text.len() >= k
                    && self.text.is_char_boundary(self.text.len() - k)
                    && s.is_char_boundary(k)
                    && self.text.ends_with(&s[..k])
                {
                    safe = safe.min(self.text.len() - k);
                    break;
                }
            }
        }
        if safe > self.emitted && self.text.is_char_boundary(safe) {
            let delta = self.text[self.emitted..safe].to_string();
            self.emitted = safe;
            (delta, false)
        } else {
            (String::new(), false)
        }
    }

    /// What is left to send when the answer ends.
    fn finish(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest.trim_end_matches('\u{FFFD}').to_string()
    }
}

fn finish_reason(f: FinishReason, stopped: bool) -> &'static str {
    if stopped {
        return "stop";
    }
    match f {
        FinishReason::Eos | FinishReason::Cancelled | FinishReason::Error => "stop",
        FinishReason::MaxTokens | FinishReason::Context => "length",
    }
}

/// Most bytes of an oversized body the server reads and throws away before it answers 413.
/// A server that answers without reading the body closes a socket with unread data in it,
/// and the kernel's reset can reach the client before the answer does: it sees a broken
/// connection instead of the 413. Past this, the connection is simply closed.
const MAX_DRAIN: usize = 16 * crate::MAX_BODY;

/// How long the server keeps reading an oversized body it will refuse.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// A request body of at most `limit` bytes, or `None` when it is longer (the rest read and
/// dropped, up to [`MAX_DRAIN`] bytes and [`DRAIN_TIME`]); memory stays within `limit`.
async fn read_body(body: Body, limit: usize) -> Result<Option<Vec<u8>>, ApiError> {
    let mut data = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = data.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            let mut seen = buf.len() + chunk.len();
            drop(buf);
            let drain = async {
                while seen <= MAX_DRAIN {
                    match data.next().await {
                        Some(Ok(c)) => seen += c.len(),
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf))
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(State(app): State<Arc<AppState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // The body is read (or, past the limit, drained) before any answer; see [`MAX_DRAIN`].
    let body = read_body(body, crate::MAX_BODY).await;
    if let Err(e) = app.check_token(&parts.headers) {
        return e.into_response();
    }
    let body = match body {
        Ok(Some(b)) => b,
        Ok(None) => {
            return ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!(
                    "the request body is longer than the limit of {} bytes",
                    crate::MAX_BODY
                ),
                kind: "invalid_request_error",
                code: None,
            }
            .into_response()
        }
        Err(e) => return e.into_response(),
    };
    let request = Request::from_parts(parts, Body::from(body));
    let req = match Json::<ChatRequestBody>::from_request(request, &()).await {
        Ok(Json(ChatRequestBody(r))) => r,
        Err(e) => {
            // 415 without a JSON content type, 400 for anything else that is not the JSON we
            // read.
            let e: JsonRejection = e;
            return ApiError {
                status: e.status(),
                message: format!("bad request body: {}", e.body_text()),
                kind: "invalid_request_error",
                code: None,
            }
            .into_response();
        }
    };
    let p = match prepare(&app, req) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let n_prompt = p.prompt_tokens.len();
    let submitted = app.hub().submit(
        crate::DEFAULT_ROOM,
        GenerateRequest {
            prompt_tokens: p.prompt_tokens,
            max_tokens: p.max_tokens,
            sampling: p.sampling,
            eos_ids: app.model.config.eos_ids.clone(),
        },
    );
    let (id, rx) = match submitted {
        Ok(x) => x,
        Err(e) => return ApiError::unavailable(e).into_response(),
    };
    let guard = Guard {
        app: app.clone(),
        id,
        done: false,
    };
    let detok = Detok::new(p.stop, app.model.config.eos_ids.clone());
    let created = unix_now();
    let cid = format!("chatcmpl-{id}");
    if p.stream {
        let stream = sse_stream(
            app.clone(),
            guard,
            rx,
            detok,
            cid,
            created,
            n_prompt,
            p.include_usage,
        );
        Sse::new(stream).into_response()
    } else {
        complete(app, guard, rx, detok, cid, created, n_prompt).await
    }
}

/// The request body, parsed by serde into [`ChatRequest`].
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct ChatRequestBody(ChatRequest);

async fn complete(
    app: Arc<AppState>,
    mut guard: Guard,
    mut rx: mpsc::UnboundedReceiver<StreamItem>,
    mut detok: Detok,
    cid: String,
    created: u64,
    n_prompt: usize,
) -> Response {
    let mut content = String::new();
    let reason = loop {
        match rx.recv().await {
            Some(StreamItem::Tokens(t)) => {
                let (delta, stopped) = detok.push(&app, &t);
                content.push_str(&delta);
                if stopped {
                    app.hub().cancel(crate::DEFAULT_ROOM, guard.id);
                    break "stop";
                }
            }
            Some(StreamItem::Finished(FinishReason::Error, m)) => {
                guard.done = true;
                return ApiError::unavailable(m.unwrap_or_else(|| "the ring failed".into()))
                    .into_response();
            }
            Some(StreamItem::Finished(f, _)) => {
                content.push_str(&detok.finish());
                break finish_reason(f, false);
            }
            None => {
                guard.done = true;
                return ApiError::unavailable("the request was dropped").into_response();
            }
        }
    };
    guard.done = true;
    Json(json!({
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": app.model.id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": reason,
        }],
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": detok.sampled,
            "total_tokens": n_prompt + detok.sampled,
        },
    }))
    .into_response()
}

fn chunk(app: &AppState, cid: &str, created: u64, delta: Value, reason: Option<&str>) -> Event {
    Event::default().data(
        json!({
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": app.model.id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        })
        .to_string(),
    )
}

struct SseState {
    app: Arc<AppState>,
    guard: Guard,
    rx: mpsc::UnboundedReceiver<StreamItem>,
    detok: Detok,
    cid: String,
    created: u64,
    n_prompt: usize,
    include_usage: bool,
    queue: std::collections::VecDeque<Event>,
    started: bool,
    ended: bool,
}

#[allow(clippy::too_many_arguments)]
fn sse_stream(
    app: Arc<AppState>,
    guard: Guard,
    rx: mpsc::UnboundedReceiver<StreamItem>,
    detok: Detok,
    cid: String,
    created: u64,
    n_prompt: usize,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let state = SseState {
        app,
        guard,
        rx,
        detok,
        cid,
        created,
        n_prompt,
        include_usage,
        queue: Default::default(),
        started: false,
        ended: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.queue.pop_front() {
                return Some((Ok(e), s));
            }
            if s.ended {
                // Dropping the state drops the guard, done by now.
                return None;
            }
            if !s.started {
                s.started = true;
                let e = chunk(
                    &s.app,
                    &s.cid,
                    s.created,
                    json!({"role": "assistant", "content": ""}),
                    None,
                );
                s.queue.push_back(e);
                continue;
            }
            let (text, reason, error) = match s.rx.recv().await {
                Some(StreamItem::Tokens(t)) => {
                    let (delta, stopped) = s.detok.push(&s.app, &t);
                    if stopped {
                        s.app.hub().cancel(crate::DEFAULT_ROOM, s.guard.id);
                        (delta, Some("stop"), None)
                    } else {
                        (delta, None, None)
                    }
                }
                Some(StreamItem::Finished(FinishReason::Error, m)) => (
                    String::new(),
                    None,
                    Some(m.unwrap_or_else(|| "the ring failed".into())),
                ),
                Some(StreamItem::Finished(f, _)) => {
                    (s.detok.finish(), Some(finish_reason(f, false)), None)
                }
                None => (String::new(), None, Some("the request was dropped".into())),
            };
            if !text.is_empty() {
                let e = chunk(&s.app, &s.cid, s.created, json!({"content": text}), None);
                s.queue.push_back(e);
            }
            if let Some(m) = error {
                s.guard.done = true;
                s.ended = true;
                let err = ApiError::unavailable(m);
                s.queue
                    .push_back(Event::default().data(err.body().to_string()));
                s.queue.push_back(Event::default().data("[DONE]"));
                continue;
            }
            if let Some(r) = reason {
                s.guard.done = true;
                s.ended = true;
                let e = chunk(&s.app, &s.cid, s.created, json!({}), Some(r));
                s.queue.push_back(e);
                if s.include_usage {
                    let usage = json!({
                        "id": s.cid,
                        "object": "chat.completion.chunk",
                        "created": s.created,
                        "model": s.app.model.id,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": s.n_prompt,
                            "completion_tokens": s.detok.sampled,
                            "total_tokens": s.n_prompt + s.detok.sampled,
                        },
                    });
                    s.queue.push_back(Event::default().data(usage.to_string()));
                }
                s.queue.push_back(Event::default().data("[DONE]"));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds text pieces as if each came from a new token; returns what was sent.
    fn raw(stop: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut d = Detok::new(stop.iter().map(|s| s.to_string()).collect(), vec![]);
        let mut out = String::new();
        for p in pieces {
            d.text.push_str(p);
            let (delta, stopped) = d.advance();
            out.push_str(&delta);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&d.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_cut_the_answer_and_partial_matches_are_held_back() {
        assert_eq!(
            raw(&["\n\n"], &["Hello", " world", "\n", "\nmore"]),
            ("Hello world".into(), true)
        );
        assert_eq!(
            raw(&["END"], &["abc E", "N", "x"]),
            ("abc ENx".into(), false)
        );
        assert_eq!(raw(&[], &["a", "b"]), ("ab".into(), false));
        // Nothing of a possible stop string is sent before it is known not to be one.
        let mut d = Detok::new(vec!["STOP".into()], vec![]);
        d.text = "go ST".into();
        assert_eq!(d.advance(), ("go ".into(), false));
        d.text.push_str("OP now");
        assert_eq!(d.advance(), ("".into(), true));
        assert_eq!(d.text, "go ");
        // An incomplete UTF-8 tail waits for the rest of the character.
        let mut d = Detok::new(vec![], vec![]);
        d.text = "é\u{FFFD}".into();
        assert_eq!(d.advance(), ("é".into(), false));
    }
}
