//! The runtime's [`Platform`] on a native machine: tokio-tungstenite for the control channel,
//! reqwest for ranged downloads, webrtc-rs (through `mdi-transport`) for links, and engines on
//! compute threads. Needs to run inside a tokio runtime.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use futures::{SinkExt, StreamExt};
use mdi_core::{Config, Oracle, RawTensor, StageWeights};
use mdi_gpu::{GpuContext, GpuEngine};
use mdi_transport::webrtc::{WebRtcConfig, WebRtcPeer};
use mdi_transport::{Inbox, Link};
use tokio::sync::{mpsc, OnceCell};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::exec::{BoxExec, ThreadedExec};
use crate::lock;
use crate::platform::{
    Answering, Backend, ControlChannel, ControlRx, ControlTx, Offering, Platform, PlatformResult,
};
use crate::protocol::MAX_CONTROL_MESSAGE;

/// Longest prompt chunk a GPU stage runs in one submit.
const GPU_MAX_BATCH: usize = 128;
/// Most sequences the CPU engine runs as one batch (each weight read once for all).
const CPU_MAX_BATCH: usize = 8;

/// A native machine, linking over loopback when the server is on loopback and over the LAN
/// otherwise.
pub struct NativePlatform {
    http: reqwest::Client,
    /// TLS trusting the server's pinned certificate, when a fingerprint was given.
    pinned: Option<Arc<rustls::ClientConfig>>,
    gpu: OnceCell<Option<Arc<GpuContext>>>,
    /// Where WebRTC sockets bind, and whether only loopback candidates are used.
    rtc_bind: IpAddr,
    loopback: bool,
    /// Threads of the CPU engine (0: one per core).
    cpu_threads: usize,
    /// Where downloaded tensors are kept for later assignments, if anywhere.
    cache_dir: Option<PathBuf>,
    /// Bytes the cache directory may hold; the least recently used entries go first.
    cache_max: u64,
    /// Bytes its entries took at the last look, plus what this process wrote since: the
    /// folder is scanned again only when this passes `cache_max` (or before the first put).
    cache_used: std::sync::Mutex<Option<u64>>,
}

/// What the tensor cache of a node may hold on disk when not told otherwise.
pub const DEFAULT_CACHE_MAX: u64 = 4 << 30;

/// What a native node adds to [`NodeOptions`](crate::session::NodeOptions).
#[derive(Debug, Clone, Default)]
pub struct NativeOptions {
    /// Threads of the CPU engine (0: one per core this process may use).
    pub cpu_threads: usize,
    /// Trust an https server by this SHA-256 certificate fingerprint.
    pub fingerprint: Option<String>,
    /// Keep downloaded tensors here, so a new plan (after a node leaves, or a restart) takes
    /// the byte ranges this machine already has from disk instead of the server.
    pub cache_dir: Option<PathBuf>,
    /// Bytes `cache_dir` may hold (0: [`DEFAULT_CACHE_MAX`]); the least recently used entries
    /// are deleted to stay under it.
    pub cache_max: u64,
}

impl NativePlatform {
    /// A platform for a node of the server at `server` (an http(s) URL). With `fingerprint`
    /// (the SHA-256 of the server's certificate, hex, colons optional) an `https` server is
    /// trusted by that certificate alone, as for a self-signed one made by `signaling --tls`.
    pub fn new(server: &str, fingerprint: Option<&str>) -> PlatformResult<Self> {
        let url = url::Url::parse(server).map_err(|e| format!("bad server URL `{server}`: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("the server URL `{server}` has no host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let ip = resolve(host, port)?;
        let loopback = ip.is_loopback();
        let rtc_bind = if loopback {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            local_ip_towards(SocketAddr::new(ip, port))?
        };
        let pinned = match fingerprint {
            Some(f) => Some(Arc::new(crate::pinned::client_config(f)?)),
            None => None,
        };
        let mut http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if let Some(c) = &pinned {
            http = http.use_preconfigured_tls((**c).clone());
        }
        let http = http
            .build()
            .map_err(|e| format!("cannot set up HTTP: {e}"))?;
        Ok(Self {
            pinned,
            http,
            gpu: OnceCell::new(),
            rtc_bind,
            loopback,
            cpu_threads: 0,
            cache_dir: None,
            cache_max: DEFAULT_CACHE_MAX,
            cache_used: std::sync::Mutex::new(None),
        })
    }

    /// Keep downloaded tensors in `dir` (made when first needed), at most `max` bytes of them
    /// (0: [`DEFAULT_CACHE_MAX`]).
    pub fn with_cache_dir(mut self, dir: Option<PathBuf>, max: u64) -> Self {
        self.cache_dir = dir;
        self.cache_max = if max == 0 { DEFAULT_CACHE_MAX } else { max };
        self
    }

    /// The file of cache entry `key`. Keys come from the server's manifest, so they are
    /// hashed rather than used as a path.
    fn cache_path(&self, key: &str) -> Option<PathBuf> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(key.as_bytes());
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.cache_dir.as_ref().map(|d| d.join(name))
    }

    /// Threads for the CPU engine (several nodes sharing one machine split its cores).
    pub fn with_cpu_threads(mut self, threads: usize) -> Self {
        self.cpu_threads = threads;
        self
    }

    /// A platform that shares an already opened GPU (several nodes in one process).
    pub fn with_gpu(mut self, ctx: Option<Arc<GpuContext>>) -> Self {
        self.gpu = OnceCell::new_with(Some(ctx));
        self
    }

    async fn gpu(&self) -> Option<Arc<GpuContext>> {
        self.gpu
            .get_or_init(|| async {
                match GpuContext::new().await {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        tracing::info!("no GPU: {e}");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    async fn build_exec(
        &self,
        backend: Backend,
        config: Config,
        weights: StageWeights<RawTensor>,
    ) -> PlatformResult<BoxExec> {
        match backend {
            Backend::Gpu => {
                let ctx = self.gpu().await.ok_or("no GPU adapter")?;
                let engine = GpuEngine::new(ctx.clone(), config, weights, GPU_MAX_BATCH)
                    .map_err(|e| format!("GPU engine: {e}"))?;
                let bytes = engine.weight_bytes();
                let name = format!("gpu ({})", ctx.info.name);
                Ok(Box::new(ThreadedExec::new(engine, bytes, name)) as BoxExec)
            }
            Backend::Cpu | Backend::Auto => {
                let engine = mdi_cpu::CpuEngine::new(config, weights, self.cpu_threads)
                    .map_err(|e| e.to_string())?;
                let bytes = engine.weight_bytes();
                Ok(Box::new(ThreadedExec::with_batch(
                    engine,
                    bytes,
                    "cpu",
                    CPU_MAX_BATCH,
                )) as BoxExec)
            }
            Backend::Oracle => {
                let oracle = Oracle::new(config, weights).map_err(|e| e.to_string())?;
                let bytes = oracle.weight_bytes();
                Ok(Box::new(ThreadedExec::new(oracle, bytes, "oracle")) as BoxExec)
            }
        }
    }

    fn rtc_config(&self, label: String) -> WebRtcConfig {
        WebRtcConfig {
            label,
            bind_addr: SocketAddr::new(self.rtc_bind, 0),
            loopback_only: self.loopback,
            resolve_mdns: !self.loopback,
            ..WebRtcConfig::default()
        }
    }
}

fn resolve(host: &str, port: u16) -> PlatformResult<IpAddr> {
    use std::net::ToSocketAddrs;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| format!("`{host}` has no address"))
}

/// The local address the OS would use to reach `peer` (nothing is sent).
fn local_ip_towards(peer: SocketAddr) -> PlatformResult<IpAddr> {
    let any = match peer {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
    };
    let s = UdpSocket::bind(any).map_err(|e| format!("cannot find a local address: {e}"))?;
    s.connect(peer)
        .map_err(|e| format!("no route to the server at {peer}: {e}"))?;
    s.local_addr()
        .map(|a| a.ip())
        .map_err(|e| format!("cannot find a local address: {e}"))
}

struct WsTx {
    out: mpsc::UnboundedSender<WsMessage>,
}

impl ControlTx for WsTx {
    fn send(&self, text: String) -> LocalBoxFuture<'static, PlatformResult<()>> {
        let r = self
            .out
            .send(WsMessage::text(text))
            .map_err(|_| "the connection to the server is closed".to_string());
        Box::pin(async move { r })
    }

    fn close(&self) -> LocalBoxFuture<'static, ()> {
        let _ = self.out.send(WsMessage::Close(None));
        Box::pin(async {})
    }
}

type WsRead = futures::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

struct WsRx {
    read: WsRead,
}

impl ControlRx for WsRx {
    fn recv(&mut self) -> LocalBoxFuture<'_, Option<PlatformResult<String>>> {
        Box::pin(async move {
            loop {
                match self.read.next().await? {
                    Ok(WsMessage::Text(t)) => return Some(Ok(t.to_string())),
                    Ok(WsMessage::Close(_)) => return None,
                    Ok(WsMessage::Binary(_)) => {
                        return Some(Err("the server sent a binary message".into()))
                    }
                    // Pings are answered by tungstenite itself.
                    Ok(_) => continue,
                    Err(e) => return Some(Err(format!("WebSocket: {e}"))),
                }
            }
        })
    }
}

struct NativeOffering(WebRtcPeer);

impl Offering for NativeOffering {
    fn finish(
        self: Box<Self>,
        answer: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(Link, Inbox)>> {
        let mut peer = self.0;
        Box::pin(async move {
            peer.accept_answer(&answer)
                .await
                .map_err(|e| e.to_string())?;
            peer.open_channel().await.map_err(|e| e.to_string())
        })
    }
}

struct NativeAnswering(WebRtcPeer);

impl Answering for NativeAnswering {
    fn finish(self: Box<Self>) -> LocalBoxFuture<'static, PlatformResult<(Link, Inbox)>> {
        let peer = self.0;
        Box::pin(async move { peer.accept_channel().await.map_err(|e| e.to_string()) })
    }
}

impl Platform for NativePlatform {
    fn connect(&self, url: &str) -> LocalBoxFuture<'static, PlatformResult<ControlChannel>> {
        let url = url.to_string();
        let connector = self
            .pinned
            .clone()
            .map(tokio_tungstenite::Connector::Rustls);
        Box::pin(async move {
            let config = WebSocketConfig::default()
                .max_message_size(Some(MAX_CONTROL_MESSAGE))
                .max_frame_size(Some(MAX_CONTROL_MESSAGE));
            let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
                url.as_str(),
                Some(config),
                false,
                connector,
            )
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
            let (mut write, read) = ws.split();
            let (out, mut rx) = mpsc::unbounded_channel::<WsMessage>();
            // One writer task owns the socket's sending half.
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    let close = matches!(m, WsMessage::Close(_));
                    if write.send(m).await.is_err() || close {
                        break;
                    }
                }
                let _ = write.close().await;
            });
            Ok((
                Box::new(WsTx { out }) as Box<dyn ControlTx>,
                Box::new(WsRx { read }) as Box<dyn ControlRx>,
            ))
        })
    }

    fn fetch(
        &self,
        url: &str,
        range: Option<Range<u64>>,
        headers: Vec<(String, String)>,
    ) -> LocalBoxFuture<'static, PlatformResult<Vec<u8>>> {
        let mut req = self.http.get(url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(r) = &range {
            req = req.header(
                reqwest::header::RANGE,
                format!("bytes={}-{}", r.start, r.end.saturating_sub(1)),
            );
        }
        let url = url.to_string();
        Box::pin(async move {
            let what = match &range {
                Some(r) => format!("{url} bytes {}..{}", r.start, r.end),
                None => url.clone(),
            };
            let resp = req.send().await.map_err(|e| format!("GET {what}: {e}"))?;
            let status = resp.status();
            let expected = if range.is_some() { 206 } else { 200 };
            if status.as_u16() != expected {
                let body = resp.text().await.unwrap_or_default();
                return Err(format!(
                    "GET {what}: HTTP {status}: {}",
                    body.chars().take(300).collect::<String>()
                ));
            }
            if let (Some(r), Some(len)) = (&range, resp.content_length()) {
                if len != r.end - r.start {
                    return Err(format!("GET {what}: the server sent {len} bytes"));
                }
            }
            resp.bytes()
                .await
                .map(|b| b.to_vec())
                .map_err(|e| format!("GET {what}: {e}"))
        })
    }

    fn offer(
        &self,
        label: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(String, Box<dyn Offering>)>> {
        let config = self.rtc_config(label);
        Box::pin(async move {
            let mut peer = WebRtcPeer::new(config).await.map_err(|e| e.to_string())?;
            let offer = peer.create_offer().await.map_err(|e| e.to_string())?;
            Ok((offer, Box::new(NativeOffering(peer)) as Box<dyn Offering>))
        })
    }

    fn answer(
        &self,
        label: String,
        offer: String,
    ) -> LocalBoxFuture<'static, PlatformResult<(String, Box<dyn Answering>)>> {
        let config = self.rtc_config(label);
        Box::pin(async move {
            let mut peer = WebRtcPeer::new(config).await.map_err(|e| e.to_string())?;
            let answer = peer.accept_offer(&offer).await.map_err(|e| e.to_string())?;
            Ok((
                answer,
                Box::new(NativeAnswering(peer)) as Box<dyn Answering>,
            ))
        })
    }

    fn resolve(&self, backend: Backend) -> LocalBoxFuture<'_, PlatformResult<(Backend, String)>> {
        Box::pin(async move {
            match backend {
                Backend::Gpu => match self.gpu().await {
                    Some(ctx) => Ok((Backend::Gpu, ctx.info.name.clone())),
                    None => Err(
                        "--backend gpu: no GPU adapter found; install a Vulkan driver \
                                 (on Debian: mesa-vulkan-drivers) or use --backend cpu"
                            .into(),
                    ),
                },
                // A software adapter (lavapipe) is slower than the CPU engine on the same cores.
                Backend::Auto => match self.gpu().await {
                    Some(ctx) if !ctx.is_cpu() => Ok((Backend::Gpu, ctx.info.name.clone())),
                    _ => Ok((Backend::Cpu, self.cpu_description())),
                },
                Backend::Cpu => Ok((Backend::Cpu, self.cpu_description())),
                Backend::Oracle => Ok((Backend::Oracle, cpu_name())),
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
            let exec = self.build_exec(backend, config, weights).await;
            // The download and the loaded tensors were freed as the engine took its copy;
            // hand those pages back so the node's resident memory is what it holds.
            release_freed_memory();
            exec
        })
    }

    fn sleep(&self, d: Duration) -> LocalBoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }

    fn rss_bytes(&self) -> Option<u64> {
        rss_bytes()
    }

    fn cache_get(&self, key: String) -> LocalBoxFuture<'_, Option<Vec<u8>>> {
        let path = self.cache_path(&key);
        Box::pin(async move {
            let path = path?;
            tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut f = std::fs::File::options()
                    .read(true)
                    .write(true)
                    .open(path)
                    .ok()?;
                // The caller checks the length; a damaged entry is downloaded again.
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).ok()?;
                // Used now: the entry moves to the back of the eviction order.
                let _ = f.set_modified(std::time::SystemTime::now());
                Some(bytes)
            })
            .await
            .ok()
            .flatten()
        })
    }

    fn cache_put(&self, key: String, bytes: Vec<u8>) -> LocalBoxFuture<'_, ()> {
        let path = self.cache_path(&key);
        let dir = self.cache_dir.clone();
        let max = self.cache_max;
        Box::pin(async move {
            let (Some(path), Some(dir)) = (path, dir) else {
                return;
            };
            if bytes.len() as u64 > max {
                return;
            }
            // Written aside and renamed: another node on this machine, or a crash, never sees
            // half an entry.
            let tmp = path.with_extension(format!("part{}", std::process::id()));
            let stored = async {
                tokio::fs::create_dir_all(&dir).await?;
                tokio::fs::write(&tmp, &bytes).await?;
                tokio::fs::rename(&tmp, &path).await
            };
            if let Err(e) = stored.await {
                tracing::warn!("cannot keep a downloaded tensor in {}: {e}", dir.display());
                let _ = tokio::fs::remove_file(&tmp).await;
                return;
            }
            let used = {
                let mut used = lock(&self.cache_used);
                *used = used.map(|u| u + bytes.len() as u64);
                *used
            };
            if used.is_some_and(|u| u <= max) {
                return;
            }
            match tokio::task::spawn_blocking(move || evict(&dir, max, &path)).await {
                Ok(Ok((_, left))) => *lock(&self.cache_used) = Some(left),
                Ok(Err(e)) => tracing::warn!("cannot trim the tensor cache: {e}"),
                Err(_) => {}
            }
        })
    }
}

impl NativePlatform {
    fn cpu_description(&self) -> String {
        let threads = if self.cpu_threads == 0 {
            num_cpus()
        } else {
            self.cpu_threads
        };
        format!(
            "{}, {:?}, {threads} thread(s)",
            cpu_name(),
            mdi_cpu::Kernels::best().isa()
        )
    }
}

/// Deletes the least recently used entries of the tensor cache `dir` until its entries take
/// at most `max` bytes, never `keep` (the entry just written). Entries are the files named by
/// [`NativePlatform::cache_path`] (64 hex digits); anything else in the folder, such as another
/// node's half-written entry, is left alone. Returns the bytes deleted and the bytes left.
fn evict(dir: &std::path::Path, max: u64, keep: &std::path::Path) -> std::io::Result<(u64, u64)> {
    let mut entries = Vec::new();
    let mut total = 0u64;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let is_entry = name
            .to_str()
            .is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        let Ok(meta) = e.metadata() else { continue };
        if !is_entry || !meta.is_file() {
            continue;
        }
        total += meta.len();
        let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        entries.push((used, meta.len(), e.path()));
    }
    entries.sort();
    let mut deleted = 0;
    for (_, len, path) in entries {
        if total <= max {
            break;
        }
        if path == keep {
            continue;
        }
        // Another node on this machine may have deleted it first.
        if std::fs::remove_file(&path).is_ok() {
            deleted += len;
        }
        total -= len;
    }
    Ok((deleted, total))
}

/// Resident memory of this process (Linux: `VmRSS` of `/proc/self/status`).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The CPU's model name, for profiles.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .map(|n| format!("{n} ({} threads)", num_cpus()))
        .unwrap_or_else(|| format!("CPU ({} threads)", num_cpus()))
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A memory budget when none is given: half of the memory available now, at most 4 GiB.
pub fn default_memory_budget() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    match available {
        Some(kb) => (kb * 1024 / 2).min(4 << 30),
        None => 1 << 30,
    }
}

/// Runs a node session on this thread with its own tokio runtime until it ends or `stop`
/// resolves: what `mdi node` and the server's local nodes do.
pub fn run_node_blocking(
    opts: crate::session::NodeOptions,
    native: NativeOptions,
    status: crate::session::StatusSink,
    stop: impl std::future::Future<Output = ()> + 'static,
) -> Result<(), String> {
    large_allocations_mapped();
    // The threads that move frames and answer pings (the runtime's, and this one, which
    // runs the session) wake promptly; the compute thread keeps the default slice.
    mdi_transport::wakeups::wake_promptly();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| {
            mdi_transport::wakeups::wake_promptly();
        })
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let platform = NativePlatform::new(&opts.server, native.fingerprint.as_deref())?
        .with_cpu_threads(native.cpu_threads)
        .with_cache_dir(native.cache_dir, native.cache_max);
    rt.block_on(async move {
        crate::session::run(&platform, opts, status, Box::pin(stop))
            .await
            .map_err(|e| e.to_string())
    })
}

/// Allocations from 256 KiB up (weight tensors, downloaded pieces, KV caches) get pages of
/// their own, handed back to the system when freed. glibc otherwise raises this threshold
/// each time such a block is freed, after which a re-planned node's old share and
/// downloads land in the heap and can stay resident there (the cluster bench saw a starter
/// re-planned to fewer layers hold 15 MB more than one planned so from the start).
fn large_allocations_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Returns freed heap pages to the system (glibc keeps them otherwise, and the process's
/// resident memory would count a download that is long gone).
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn temp_dir(what: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("mdi-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Five 100-byte entries, the i-th used i minutes after the first; returns their paths.
    fn entries(dir: &std::path::Path) -> Vec<PathBuf> {
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        (0..5)
            .map(|i| {
                let path = dir.join(format!("{i:064x}"));
                std::fs::write(&path, [i as u8; 100]).unwrap();
                let f = std::fs::File::options().write(true).open(&path).unwrap();
                f.set_modified(t0 + Duration::from_secs(60 * i)).unwrap();
                path
            })
            .collect()
    }

    #[test]
    fn the_tensor_cache_drops_its_least_recently_used_entries_to_stay_under_its_bound() {
        let dir = temp_dir("evict");
        let e = entries(&dir);
        // Not entries: another node's half-written one, and a stranger's file.
        std::fs::write(dir.join(format!("{:064x}.part77", 9)), [0u8; 1000]).unwrap();
        std::fs::write(dir.join("notes.txt"), [0u8; 1000]).unwrap();

        assert_eq!(evict(&dir, 250, &e[4]).unwrap().0, 300);
        let left: Vec<bool> = e.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [false, false, false, true, true]);
        assert!(dir.join(format!("{:064x}.part77", 9)).exists());
        assert!(dir.join("notes.txt").exists());

        // Under the bound: nothing goes.
        assert_eq!(evict(&dir, 250, &e[4]).unwrap().0, 0);
        std::fs::remove_dir_all(&dir).unwrap();

        // The entry just written stays even when it is the oldest.
        let dir = temp_dir("evict-keep");
        let e = entries(&dir);
        assert_eq!(evict(&dir, 250, &e[0]).unwrap().0, 300);
        let left: Vec<bool> = e.iter().map(|p| p.exists()).collect();
        assert_eq!(left, [true, false, false, false, true]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cache_hit_counts_as_a_use_and_an_entry_over_the_bound_is_not_kept() {
        let dir = temp_dir("cache");
        let platform = NativePlatform::new("http://127.0.0.1:9", None)
            .unwrap()
            .with_cache_dir(Some(dir.clone()), 250);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            platform.cache_put("a".into(), vec![1; 100]).await;
            platform.cache_put("b".into(), vec![2; 100]).await;
            // Older than b's, then used again: b is now the least recently used.
            let a = platform.cache_path("a").unwrap();
            let f = std::fs::File::options().write(true).open(&a).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(3600))
                .unwrap();
            assert_eq!(platform.cache_get("a".into()).await, Some(vec![1; 100]));
            platform.cache_put("c".into(), vec![3; 100]).await;
            assert_eq!(platform.cache_get("b".into()).await, None);
            assert_eq!(platform.cache_get("a".into()).await, Some(vec![1; 100]));
            assert_eq!(platform.cache_get("c".into()).await, Some(vec![3; 100]));
            // Larger than the whole cache: not written, nothing else evicted for it.
            platform.cache_put("d".into(), vec![4; 300]).await;
            assert_eq!(platform.cache_get("d".into()).await, None);
            assert_eq!(platform.cache_get("c".into()).await, Some(vec![3; 100]));
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
