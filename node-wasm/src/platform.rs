//! The node runtime's [`Platform`] in a browser tab.

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::future::LocalBoxFuture;
use futures::StreamExt;
use js_sys::Uint8Array;
use mdi_core::{Config, Oracle, RawTensor, StageWeights};
use mdi_gpu::{GpuContext, GpuEngine};
use mdi_runtime::exec::{BoxExec, GpuAsyncExec, InlineExec};
use mdi_runtime::platform::{
    Answering, Backend, ControlChannel, ControlRx, ControlTx, Offering, Platform, PlatformResult,
};
use mdi_transport::{Inbox, Link};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    BinaryType, Cache, CloseEvent, Headers, MessageEvent, Request, RequestInit, Response, WebSocket,
};

/// Longest prompt chunk a GPU stage runs in one submit (SwiftShader allows 256 invocations
/// per workgroup; the kernels do not depend on it).
const GPU_MAX_BATCH: usize = 64;
/// The Cache API bucket holding downloaded tensors.
const CACHE_NAME: &str = "mdi-model";

/// Text of a JS exception or value.
pub fn js_text(e: &JsValue) -> String {
    e.as_string()
        .or_else(|| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .unwrap_or_else(|| format!("{e:?}"))
}

/// Resolves after `ms` milliseconds.
pub async fn sleep_ms(ms: i32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        if let Ok(f) = js_sys::Reflect::get(&global, &JsValue::from_str("setTimeout"))
            .and_then(|f| f.dyn_into::<js_sys::Function>())
        {
            let _ = f.call2(&global, &resolve, &JsValue::from(ms));
        }
    });
    let _ = JsFuture::from(promise).await;
}

/// The page's `fetch` (a window's, or a worker's).
async fn global_fetch(req: &Request) -> Result<Response, String> {
    let promise = if let Some(w) = web_sys::window() {
        w.fetch_with_request(req)
    } else {
        let scope: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
        scope.fetch_with_request(req)
    };
    JsFuture::from(promise)
        .await
        .map_err(|e| js_text(&e))?
        .dyn_into::<Response>()
        .map_err(|_| "fetch returned something other than a Response".to_string())
}

async fn cache() -> Option<Cache> {
    let storage = web_sys::window()?.caches().ok()?;
    JsFuture::from(storage.open(CACHE_NAME))
        .await
        .ok()?
        .dyn_into::<Cache>()
        .ok()
}

/// A browser tab as a ring node's machine.
pub struct BrowserPlatform {
    gpu: RefCell<Option<Option<Arc<GpuContext>>>>,
    /// Told when the GPU device is lost.
    lost: Arc<Mutex<Option<oneshot::Sender<String>>>>,
}

impl BrowserPlatform {
    /// `lost` receives a message if the GPU device is lost while the node runs.
    pub fn new(lost: oneshot::Sender<String>) -> Self {
        Self {
            gpu: RefCell::new(None),
            lost: Arc::new(Mutex::new(Some(lost))),
        }
    }

    async fn gpu(&self) -> Option<Arc<GpuContext>> {
        if let Some(g) = self.gpu.borrow().as_ref() {
            return g.clone();
        }
        let has_webgpu = web_sys::window()
            .map(|w| w.navigator())
            .is_some_and(|n| js_sys::Reflect::has(&n, &JsValue::from_str("gpu")).unwrap_or(false));
        let ctx = if has_webgpu {
            match GpuContext::new().await {
                Ok(c) => {
                    // The engine's API shares a context through an Arc (natively, across
                    // threads); a tab has one thread, so nothing crosses one here.
                    #[allow(clippy::arc_with_non_send_sync)]
                    let c = Arc::new(c);
                    let lost = self.lost.clone();
                    c.device.set_device_lost_callback(move |reason, message| {
                        if let Some(tx) = lost.lock().ok().and_then(|mut s| s.take()) {
                            let _ = tx.send(format!("{reason:?}: {message}"));
                        }
                    });
                    Some(c)
                }
                Err(e) => {
                    tracing::warn!("WebGPU is present but unusable: {e}");
                    None
                }
            }
        } else {
            None
        };
        *self.gpu.borrow_mut() = Some(ctx.clone());
        ctx
    }
}

/// The CPU engine's kernels in this bundle: simd128 where the page loaded the SIMD build
/// (a browser with WebAssembly SIMD), else scalar.
fn cpu_description() -> String {
    format!("wasm CPU engine, {}", mdi_cpu::Kernels::best().isa())
}

fn describe(ctx: &GpuContext) -> String {
    let i = &ctx.info;
    let parts: Vec<&str> = [i.name.as_str(), i.driver.as_str(), i.driver_info.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        "WebGPU".into()
    } else {
        format!("WebGPU {}", parts.join(" "))
    }
}

/// A socket's callbacks, alive as long as the socket is used.
type Handlers = Rc<Vec<Closure<dyn FnMut(JsValue)>>>;

struct WsTx {
    ws: WebSocket,
    _handlers: Handlers,
}

impl ControlTx for WsTx {
    fn send(&self, text: String) -> LocalBoxFuture<'static, PlatformResult<()>> {
        let r = if self.ws.ready_state() == WebSocket::OPEN {
            self.ws
                .send_with_str(&text)
                .map_err(|e| format!("WebSocket: {}", js_text(&e)))
        } else {
            Err("the connection to the server is closed".into())
        };
        Box::pin(async move { r })
    }

    fn close(&self) -> LocalBoxFuture<'static, ()> {
        let _ = self.ws.close();
        Box::pin(async {})
    }
}

struct WsRx {
    rx: mpsc::UnboundedReceiver<Option<Result<String, String>>>,
    _handlers: Handlers,
}

impl ControlRx for WsRx {
    fn recv(&mut self) -> LocalBoxFuture<'_, Option<PlatformResult<String>>> {
        Box::pin(async move { self.rx.next().await.flatten() })
    }
}

struct TabOffering(mdi_transport::browser::BrowserOffering);

impl Offering for TabOffering {
    fn finish(
        self: Box<Self>,
        answer: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(Link, Inbox)>> {
        Box::pin(async move { self.0.finish(&answer).await.map_err(|e| e.to_string()) })
    }
}

struct TabAnswering(mdi_transport::browser::BrowserAnswering);

impl Answering for TabAnswering {
    fn finish(self: Box<Self>) -> LocalBoxFuture<'static, PlatformResult<(Link, Inbox)>> {
        Box::pin(async move { self.0.finish().await.map_err(|e| e.to_string()) })
    }
}

impl Platform for BrowserPlatform {
    fn connect(&self, url: &str) -> LocalBoxFuture<'static, PlatformResult<ControlChannel>> {
        let url = url.to_string();
        Box::pin(async move {
            let ws =
                WebSocket::new(&url).map_err(|e| format!("WebSocket {url}: {}", js_text(&e)))?;
            ws.set_binary_type(BinaryType::Arraybuffer);
            let (tx, rx) = mpsc::unbounded::<Option<Result<String, String>>>();
            let (open_tx, open_rx) = oneshot::channel::<Result<(), String>>();
            let open_tx = Rc::new(RefCell::new(Some(open_tx)));
            let t = tx.clone();
            let on_message = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
                if let Ok(ev) = e.dyn_into::<MessageEvent>() {
                    let msg = match ev.data().as_string() {
                        Some(text) => Ok(text),
                        None => Err("the server sent a binary message".to_string()),
                    };
                    let _ = t.unbounded_send(Some(msg));
                }
            });
            let (t, o) = (tx.clone(), open_tx.clone());
            let on_close = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
                let why = e
                    .dyn_into::<CloseEvent>()
                    .map(|c| format!("closed ({} {})", c.code(), c.reason()))
                    .unwrap_or_else(|_| "closed".into());
                if let Some(o) = o.borrow_mut().take() {
                    let _ = o.send(Err(why));
                }
                let _ = t.unbounded_send(None);
            });
            let o = open_tx.clone();
            let on_open = Closure::<dyn FnMut(JsValue)>::new(move |_| {
                if let Some(o) = o.borrow_mut().take() {
                    let _ = o.send(Ok(()));
                }
            });
            ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
            ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
            ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
            let handlers = Rc::new(vec![on_message, on_close, on_open]);
            match open_rx.await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(format!("cannot connect to {url}: {why}")),
                Err(_) => return Err(format!("cannot connect to {url}")),
            }
            Ok((
                Box::new(WsTx {
                    ws,
                    _handlers: handlers.clone(),
                }) as Box<dyn ControlTx>,
                Box::new(WsRx {
                    rx,
                    _handlers: handlers,
                }) as Box<dyn ControlRx>,
            ))
        })
    }

    fn fetch(
        &self,
        url: &str,
        range: Option<Range<u64>>,
        headers: Vec<(String, String)>,
    ) -> LocalBoxFuture<'static, PlatformResult<Vec<u8>>> {
        let url = url.to_string();
        Box::pin(async move {
            let what = match &range {
                Some(r) => format!("{url} bytes {}..{}", r.start, r.end),
                None => url.clone(),
            };
            let h = Headers::new().map_err(|e| js_text(&e))?;
            for (k, v) in &headers {
                h.set(k, v)
                    .map_err(|e| format!("header {k}: {}", js_text(&e)))?;
            }
            if let Some(r) = &range {
                h.set(
                    "range",
                    &format!("bytes={}-{}", r.start, r.end.saturating_sub(1)),
                )
                .map_err(|e| js_text(&e))?;
            }
            let init = RequestInit::new();
            init.set_method("GET");
            init.set_headers(&h);
            let req = Request::new_with_str_and_init(&url, &init)
                .map_err(|e| format!("GET {what}: {}", js_text(&e)))?;
            let resp = global_fetch(&req)
                .await
                .map_err(|e| format!("GET {what}: {e}"))?;
            let expected = if range.is_some() { 206 } else { 200 };
            if resp.status() != expected {
                let body = match resp.text() {
                    Ok(p) => JsFuture::from(p)
                        .await
                        .ok()
                        .and_then(|t| t.as_string())
                        .unwrap_or_default(),
                    Err(_) => String::new(),
                };
                return Err(format!(
                    "GET {what}: HTTP {}: {}",
                    resp.status(),
                    body.chars().take(300).collect::<String>()
                ));
            }
            let buf = JsFuture::from(resp.array_buffer().map_err(|e| js_text(&e))?)
                .await
                .map_err(|e| format!("GET {what}: {}", js_text(&e)))?;
            Ok(Uint8Array::new(&buf).to_vec())
        })
    }

    fn offer(
        &self,
        label: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(String, Box<dyn Offering>)>> {
        Box::pin(async move {
            let (sdp, o) = mdi_transport::browser::offer(&label)
                .await
                .map_err(|e| e.to_string())?;
            Ok((sdp, Box::new(TabOffering(o)) as Box<dyn Offering>))
        })
    }

    fn answer(
        &self,
        label: String,
        offer: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(String, Box<dyn Answering>)>> {
        Box::pin(async move {
            let (sdp, a) = mdi_transport::browser::answer(&label, &offer)
                .await
                .map_err(|e| e.to_string())?;
            Ok((sdp, Box::new(TabAnswering(a)) as Box<dyn Answering>))
        })
    }

    fn resolve(&self, backend: Backend) -> LocalBoxFuture<'_, PlatformResult<(Backend, String)>> {
        Box::pin(async move {
            match backend {
                Backend::Gpu => match self.gpu().await {
                    Some(ctx) => Ok((Backend::Gpu, describe(&ctx))),
                    None => Err("this browser has no usable WebGPU; open the page without \
                                 backend=gpu to join as a CPU node"
                        .into()),
                },
                // As natively: a software adapter (the browser's fallback, SwiftShader in
                // Chromium) is slower than the CPU engine on the same cores.
                Backend::Auto => match self.gpu().await {
                    Some(ctx) if !ctx.is_cpu() => Ok((Backend::Gpu, describe(&ctx))),
                    Some(_) => Ok((
                        Backend::Cpu,
                        format!("{} (WebGPU is a software fallback)", cpu_description()),
                    )),
                    None => Ok((Backend::Cpu, format!("{} (no WebGPU)", cpu_description()))),
                },
                Backend::Cpu => Ok((Backend::Cpu, cpu_description())),
                Backend::Oracle => Ok((Backend::Oracle, "wasm CPU oracle".into())),
            }
        })
    }

    fn exec(
        &self,
        backend: Backend,
        config: &Config,
        weights: StageWeights<RawTensor>,
    ) -> LocalBoxFuture<'_, PlatformResult<BoxExec>> {
        let config = config.clone();
        Box::pin(async move {
            if backend == Backend::Gpu {
                let ctx = self.gpu().await.ok_or("no WebGPU device")?;
                let engine = GpuEngine::new(ctx, config, weights, GPU_MAX_BATCH)
                    .map_err(|e| format!("GPU engine: {e}"))?;
                return Ok(Box::new(GpuAsyncExec::new(engine)) as BoxExec);
            }
            if backend == Backend::Oracle {
                let oracle = Oracle::new(config, weights).map_err(|e| e.to_string())?;
                let bytes = oracle.weight_bytes();
                return Ok(Box::new(InlineExec::new(oracle, bytes, "oracle (wasm)")) as BoxExec);
            }
            // One thread: a tab has no worker pool.
            let engine = mdi_cpu::CpuEngine::new(config, weights, 1).map_err(|e| e.to_string())?;
            let bytes = engine.weight_bytes();
            Ok(Box::new(InlineExec::with_batch(engine, bytes, "cpu (wasm)", 8)) as BoxExec)
        })
    }

    fn sleep(&self, d: Duration) -> LocalBoxFuture<'static, ()> {
        let ms = d.as_millis().min(i32::MAX as u128) as i32;
        Box::pin(sleep_ms(ms))
    }

    fn rss_bytes(&self) -> Option<u64> {
        // No portable measure of a tab's memory exists outside cross-origin isolation.
        None
    }

    fn wasm_memory_bytes(&self) -> Option<u64> {
        // The module's own linear memory: what its allocations (the CPU engine's weights and
        // caches among them) have made the tab commit, measured rather than summed.
        let memory = wasm_bindgen::memory()
            .dyn_into::<js_sys::WebAssembly::Memory>()
            .ok()?;
        let buffer = memory.buffer().dyn_into::<js_sys::ArrayBuffer>().ok()?;
        Some(buffer.byte_length() as u64)
    }

    fn cache_get(&self, key: String) -> LocalBoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let cache = cache().await?;
            let found = JsFuture::from(cache.match_with_str(&cache_url(&key)))
                .await
                .ok()?;
            let resp = found.dyn_into::<Response>().ok()?;
            let buf = JsFuture::from(resp.array_buffer().ok()?).await.ok()?;
            Some(Uint8Array::new(&buf).to_vec())
        })
    }

    fn cache_put(&self, key: String, mut bytes: Vec<u8>) -> LocalBoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(cache) = cache().await else {
                return;
            };
            let Ok(resp) = Response::new_with_opt_u8_array(Some(&mut bytes)) else {
                return;
            };
            // A full quota only means the next visit downloads again.
            if let Err(e) = JsFuture::from(cache.put_with_str(&cache_url(&key), &resp)).await {
                tracing::info!("not cached ({}): {}", key, js_text(&e));
            }
        })
    }
}

/// The same-origin URL a cached range is stored under (never fetched from the network).
fn cache_url(key: &str) -> String {
    format!("/__mdi_cache/{key}")
}
