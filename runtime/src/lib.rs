//! The node runtime shared by native nodes (`mdi node`, the server's local nodes, the
//! in-process ring) and browser tabs: it drives the sans-IO starter and node of `mdi-core`
//! over `mdi-transport` links and talks to the `signaling` server.
//!
//! - [`protocol`]: the JSON control messages between a node and the server.
//! - [`exec`]: engines behind one awaitable interface (a compute thread natively, the GPU's
//!   awaited readback in a browser).
//! - [`driver`]: the starter and node loops over real links.
//! - [`platform`]: what a machine must provide (WebSocket, HTTP Range, WebRTC, engines).
//! - [`session`]: a node's life in a room: profile, join, download its layers, link, serve.
//! - `native` and `local` (not on wasm32): the native platform and the in-process ring.
//!
//! Builds for wasm32; the browser supplies its own [`platform::Platform`].

pub mod driver;
pub mod exec;
#[cfg(not(target_family = "wasm"))]
pub mod local;
#[cfg(not(target_family = "wasm"))]
pub mod native;
#[cfg(not(target_family = "wasm"))]
pub mod pinned;
pub mod platform;
pub mod protocol;
pub mod session;

pub use exec::{BoxExec, CacheHandle, Exec};

/// Locks `m`, going on with its value if a thread panicked while holding it: the runtime's
/// shared state (statistics, queues) stays usable, and the panic is reported where it
/// happened.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
pub use platform::{Backend, Platform};
pub use session::NodeOptions;
