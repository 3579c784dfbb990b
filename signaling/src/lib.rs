//! The `signaling` server: the place a ring's devices find each other.
//!
//! - `/ws`: nodes join rooms, get their assignments, and exchange WebRTC offers and answers
//!   through it ([`ws`], [`room`]).
//! - `/model/manifest` and `/model/file/{i}`: the model, by HTTP Range, so that each node
//!   downloads only its own layers ([`model`]).
//! - `/v1/models`, `/v1/chat/completions`: an OpenAI-compatible API whose requests become
//!   sequences in the ring ([`api`]).
//! - `/api/ring` and `/`: the ring's state, for pages and tests ([`status`]).
//!
//! [`app`] builds the router in one place so tests can serve it on port 0.

pub mod api;
pub mod join;
pub mod local;
pub mod model;
pub mod room;
pub mod status;
pub mod tls;
pub mod ws;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap};
use axum::routing::{get, post};
use axum::Router;

use crate::api::ApiError;
use crate::model::ServedModel;
use crate::room::Hub;

/// The room the API serves and nodes join unless they name another.
pub const DEFAULT_ROOM: &str = "default";

/// Largest HTTP request body accepted (a chat request).
pub const MAX_BODY: usize = 1 << 20;

/// Everything the handlers share.
pub struct AppState {
    pub model: ServedModel,
    pub token: Option<String>,
    pub default_max_tokens: usize,
    /// Unix time the server started (the model's `created`).
    pub started: u64,
    /// The page (`web/`: index.html, app.js, the wasm bundle in pkg/), if there is one.
    pub web_dir: Option<std::path::PathBuf>,
    /// How phones reach this server (for join links).
    pub reach: join::Reach,
    /// The TLS certificate's SHA-256 fingerprint, when serving HTTPS.
    pub fingerprint: Option<String>,
    hub: Mutex<Hub>,
}

impl AppState {
    pub fn new(
        model: ServedModel,
        hub: Hub,
        token: Option<String>,
        default_max_tokens: usize,
    ) -> Self {
        Self {
            model,
            token,
            default_max_tokens,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            web_dir: None,
            reach: join::Reach {
                public_url: None,
                bound: None,
                scheme: "http",
            },
            fingerprint: None,
            hub: Mutex::new(hub),
        }
    }

    /// The rooms. Never held across an await.
    pub fn hub(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `Authorization: Bearer TOKEN` when the server has a token.
    pub fn check_token(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(want) = &self.token else {
            return Ok(());
        };
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if got == Some(want.as_str()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }
}

/// The folder of the web page in this source tree (used when `--web` is not given).
pub fn default_web_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web")
}

/// The server's routes.
pub fn app(state: Arc<AppState>) -> Router {
    let web = state
        .web_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("web"));
    Router::new()
        .route("/", get(status::index))
        .route("/status", get(status::page))
        .nest_service("/web", tower_http::services::ServeDir::new(web))
        .route("/api/ring", get(status::ring))
        .route("/api/join", get(join::join))
        .route("/ws", get(ws::upgrade))
        .route("/model/manifest", get(model::manifest))
        .route("/model/file/{index}", get(model::file))
        .route("/v1/models", get(api::models))
        .route("/v1/chat/completions", post(api::chat_completions))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Runs the rooms' periodic work (heartbeat timeouts, settled joins, queue deadlines) until
/// the state is dropped.
pub fn spawn_ticker(state: &Arc<AppState>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            every.tick().await;
            let Some(app) = weak.upgrade() else { break };
            app.hub().tick(&app.model.facts);
        }
    });
}
