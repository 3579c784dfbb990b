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

    /// Bytes of this node's WebAssembly memory, on platforms that run as wasm.
    fn wasm_memory_bytes(&self) -> Option<u64> {
        None
    }

    /// Bytes stored under `key` by an earlier [`cache_put`](Self::cache_put), if this platform
    /// keeps downloads (a browser's Cache API) and still has them.
    fn cache_get(&self, key: String) -> LocalBoxFuture<'_, Option<Vec<u8>>> {
        let _ = key;
        Box::pin(async { None })
    }

    /// Keeps `bytes` under `key` for later sessions, where the platform can.
    fn cache_put(&self, key: String, bytes: Vec<u8>) -> LocalBoxFuture<'_, ()> {
        let _ = (key, bytes);
        Box::pin(async {})
    }
}

/// Parses a byte count: `1073741824`, `512M`, `2G`, `1.5GiB` (K, M, G, T in powers of 1024).
pub fn parse_bytes(s: &str) -> PlatformResult<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a byte count (try 512M or 2G)"))?;
    let scale: u64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("`{s}` has an unknown unit (use K, M, G or T)")),
    };
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_parse() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("3kb"), Ok(3072));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5Q").is_err());
    }
}
