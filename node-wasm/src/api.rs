//! The page's entry points. Work lives in plain Rust; only this file speaks `wasm_bindgen`.
//!
//! ```js
//! import init, { start_node } from "./pkg/node_wasm.js";
//! await init();
//! const node = start_node(JSON.stringify({server: location.origin, room, token, name}),
//!                         json => show(JSON.parse(json)));
//! node.leave();
//! ```
//!
//! `on_status` receives the runtime's status updates as JSON (`profiled`, `joined`,
//! `assigned`, `downloading`, `ready`, `unassigned`, `failed`), then `{"type": "left"}` or
//! `{"type": "error", "message"}` when the node stops.

use std::rc::Rc;

use futures::channel::oneshot;
use futures::future::{self, Either};
use mdi_runtime::platform::Backend;
use mdi_runtime::protocol::NodeKind;
use mdi_runtime::session::{self, NodeOptions, Status};
use serde::Deserialize;
use wasm_bindgen::prelude::*;

use crate::platform::BrowserPlatform;

/// Runs when the module is instantiated: readable panics and logs in the console.
#[wasm_bindgen(start)]
pub fn init() {
    console_error_panic_hook::set_once();
    let config = tracing_wasm::WASMLayerConfigBuilder::new()
        .set_max_level(tracing::Level::INFO)
        .set_report_logs_in_timings(false)
        .build();
    tracing_wasm::set_as_global_default_with_config(config);
}

/// What the page passes to [`start_node`], as JSON.
#[derive(Debug, Deserialize)]
struct Options {
    server: String,
    room: Option<String>,
    token: Option<String>,
    name: Option<String>,
    /// Bytes.
    memory_budget: Option<f64>,
    /// `auto`, `gpu`, `cpu`.
    backend: Option<String>,
}

/// A running node; [`leave`](Self::leave) makes it leave the room.
#[wasm_bindgen]
pub struct NodeHandle {
    stop: Option<oneshot::Sender<()>>,
}

#[wasm_bindgen]
impl NodeHandle {
    /// Leaves the room cleanly.
    pub fn leave(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn emit(on_status: &js_sys::Function, json: &str) {
    let _ = on_status.call1(&JsValue::NULL, &JsValue::from_str(json));
}

/// Joins a room and serves as a ring node until [`NodeHandle::leave`], the page closing, the
/// server going away or the GPU being lost.
#[wasm_bindgen]
pub fn start_node(options: &str, on_status: js_sys::Function) -> Result<NodeHandle, JsError> {
    let o: Options = serde_json::from_str(options)
        .map_err(|e| JsError::new(&format!("start_node options: {e}")))?;
    let backend =
        Backend::parse(o.backend.as_deref().unwrap_or("auto")).map_err(|e| JsError::new(&e))?;
    let budget = o.memory_budget.unwrap_or(1024.0 * 1024.0 * 1024.0);
    if !(budget.is_finite() && budget >= 1.0) {
        return Err(JsError::new(
            "memory_budget must be a positive number of bytes",
        ));
    }
    let name = o
        .name
        .unwrap_or_else(|| format!("tab-{:04x}", (js_sys::Math::random() * 65536.0) as u32));
    let opts = NodeOptions {
        server: o.server,
        room: o.room.unwrap_or_else(|| "default".into()),
        token: o.token.filter(|t| !t.is_empty()),
        name,
        kind: NodeKind::Browser,
        memory_budget: budget as u64,
        backend,
        link_delay: std::time::Duration::ZERO,
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (lost_tx, lost_rx) = oneshot::channel::<String>();
    let status_fn = on_status.clone();
    let sink: session::StatusSink = Rc::new(move |s: &Status| {
        if let Ok(json) = serde_json::to_string(s) {
            emit(&status_fn, &json);
        }
    });
    wasm_bindgen_futures::spawn_local(async move {
        let platform = BrowserPlatform::new(lost_tx);
        let lost_message = Rc::new(std::cell::RefCell::new(None::<String>));
        let lm = lost_message.clone();
        let stop = Box::pin(async move {
            match future::select(stop_rx, lost_rx).await {
                Either::Left(_) => {}
                Either::Right((Ok(m), _)) => *lm.borrow_mut() = Some(m),
                // The platform dropped its sender without a loss: nothing to stop for.
                Either::Right((Err(_), _)) => future::pending::<()>().await,
            }
        });
        let result = session::run(&platform, opts, sink, stop).await;
        let lost = lost_message.borrow().clone();
        let json = match (lost, result) {
            (Some(m), _) => serde_json::json!({
                "type": "error",
                "message": format!(
                    "the GPU device was lost ({m}); this tab left the ring. Reload the page to join again."
                ),
            }),
            (None, Ok(())) => serde_json::json!({"type": "left"}),
            (None, Err(e)) => serde_json::json!({"type": "error", "message": e.to_string()}),
        };
        emit(&on_status, &json.to_string());
    });
    Ok(NodeHandle {
        stop: Some(stop_tx),
    })
}
