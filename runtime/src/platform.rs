//! What the node runtime needs from the machine it runs on, as traits: a control channel to
//! the server (a WebSocket), ranged HTTP downloads, WebRTC peers, an engine for a stage, a
//! timer. The native implementation is in [`crate::native`]; the browser's lives with the
//! wasm bindings. Futures are boxed and not `Send`, because browser handles never are.

use std::ops::Range;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use mdi_core::{Config, RawTensor, StageWeights};
use mdi_transport::{Inbox, Link};

use crate::exec::BoxExec;

/// Errors of the platform layer, as text: each names what failed and where.
pub type PlatformResult<T> = Result<T, String>;

/// The sending half of the control channel.
pub trait ControlTx {
    fn send(&self, text: String) -> LocalBoxFuture<'static, PlatformResult<()>>;
    fn close(&self) -> LocalBoxFuture<'static, ()>;
}

/// The receiving half of the control channel.
pub trait ControlRx {
    /// The next text message; `None` once the server closed the connection.
    fn recv(&mut self) -> LocalBoxFuture<'_, Option<PlatformResult<String>>>;
}

/// Both halves of a control channel.
pub type ControlChannel = (Box<dyn ControlTx>, Box<dyn ControlRx>);

/// An offer made, waiting for its answer.
pub trait Offering {
    fn finish(
        self: Box<Self>,
        answer: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(Link, Inbox)>>;
}

/// An answer sent, waiting for the offerer's channel.
pub trait Answering {
    fn finish(self: Box<Self>) -> LocalBoxFuture<'static, PlatformResult<(Link, Inbox)>>;
}

/// The compute backends a node can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The fastest the machine has.
    Auto,
    /// WGSL kernels on the GPU (WebGPU in a browser, Vulkan/Metal/DX12 natively).
    Gpu,
    /// The CPU engine.
    Cpu,
    /// The plain f32 CPU oracle: the reference, slow and 6× the memory of a 4-bit file.
    Oracle,
}

impl Backend {
    pub fn parse(s: &str) -> PlatformResult<Self> {
        match s {
            "auto" => Ok(Backend::Auto),
            "gpu" => Ok(Backend::Gpu),
            "cpu" => Ok(Backend::Cpu),
            "oracle" => Ok(Backend::Oracle),
            other => Err(format!(
                "unknown backend `{other}`: use auto, gpu, cpu or oracle"
            )),
        }
    }
}

/// The machine under the runtime.
pub trait Platform {
    /// Opens the control channel to `url` (a `ws://` or `wss://` URL).
    fn connect(&self, url: &str) -> LocalBoxFuture<'static, PlatformResult<ControlChannel>>;

    /// GETs `url` (a byte range of it, when given) with extra request headers.
    fn fetch(
        &self,
        url: &str,
        range: Option<Range<u64>>,
        headers: Vec<(String, String)>,
    ) -> LocalBoxFuture<'static, PlatformResult<Vec<u8>>>;

    /// Starts a link as the offerer: the offer to relay, and what completes it.
    fn offer(
        &self,
        label: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(String, Box<dyn Offering>)>>;

    /// Answers an offer: the answer to relay, and what completes the link.
    fn answer(
        &self,
        label: String,
        offer: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(String, Box<dyn Answering>)>>;

    /// The backend `Auto` resolves to, and the device's name.
    fn resolve(&self, backend: Backend) -> LocalBoxFuture<'_, PlatformResult<(Backend, String)>>;

    /// Builds the executor of a stage on `backend` (already resolved).
    fn exec(
        &self,
        backend: Backend,
        config: &Config,
        weights: StageWeights<RawTensor>,
    ) -> LocalBoxFuture<'_, PlatformResult<BoxExec>>;

    fn sleep(&self, d: Duration) -> LocalBoxFuture<'static, ()>;

    /// Resident memory of this process, where the platform can tell.
    fn rss_bytes(&self) -> Option<u64>;
}
