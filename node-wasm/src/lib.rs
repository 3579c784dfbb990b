//! A ring node in a browser tab. The tab runs the same node runtime as `mdi node`
//! (`mdi-runtime`'s session, starter and node loops) over the browser's own machinery:
//!
//! - [`platform`]: the runtime's `Platform` on a page — WebSocket, `fetch` with `Range`
//!   (downloads kept in the Cache API, keyed by the model's sha256 and the byte range),
//!   `RTCDataChannel` links (`mdi-transport`'s browser links), the GPU engine on WebGPU with
//!   its readback awaited, or the CPU engine compiled to wasm when there is no WebGPU;
//! - [`api`]: the few `#[wasm_bindgen]` entry points the page calls.
//!
//! Everything is compiled for wasm32 only; on other targets the crate is empty.

#[cfg(target_family = "wasm")]
pub mod api;
#[cfg(target_family = "wasm")]
pub mod platform;
