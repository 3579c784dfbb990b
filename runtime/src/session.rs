//! A node's life in a room, the same natively and in a browser tab:
//!
//! 1. read the model manifest and measure a short self-benchmark on one layer of this very
//!    model with the chosen engine (the planner's speed and memory factor);
//! 2. join the room over the server's WebSocket with that profile;
//! 3. for each assignment: download only the assigned byte ranges (HTTP Range), build the
//!    engine, link to the neighbours over WebRTC (offers and answers relayed by the server),
//!    say `ready`, and run the starter or node loop of [`crate::driver`] — until a newer
//!    assignment replaces it or the connection ends;
//! 4. all along: relay generation requests to the starter loop and its tokens back, and send
//!    a heartbeat with measured stats every second.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::future::{self, Either, LocalBoxFuture};
use futures::{FutureExt, StreamExt};
use mdi_core::manifest::{HandOver, Manifest, ManifestStore, SparseSource};
use mdi_core::node::{Node, NodeConfig};
use mdi_core::sampling::Rng;
use mdi_core::starter::{Event, Finish, SeqRequest, Starter, StarterConfig};
use mdi_core::weights::{LayerWeights, Role, StageSpec, StageWeights};
use mdi_core::{DType, RawTensor};
use url::Url;
use web_time::Instant;

use crate::driver::{self, Command, DriverStats, Hops, SharedStats};
use crate::exec::BoxExec;
use crate::platform::{Backend, ControlTx, Platform};
use crate::protocol::{
    self, Assignment, FinishReason, NodeId, NodeKind, NodeReport, Profile, Signal, SignalKind,
    ToNode, ToServer,
};

/// Largest piece of a range fetched in one request: progress granularity, and a bound on
/// what one response holds in memory.
const FETCH_PIECE: u64 = 4 << 20;

/// Header naming the node on its downloads, so the server can count what each node fetched.
pub const NODE_HEADER: &str = "x-mdi-node";

/// How a node joins.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The server, `http://host:port` or `https://host:port`.
    pub server: String,
    pub room: String,
    pub token: Option<String>,
    pub name: String,
    pub kind: NodeKind,
    /// Bytes the node may spend on weights and KV caches.
    pub memory_budget: u64,
    pub backend: Backend,
    /// Extra one-way latency on the node's incoming links, to emulate a slower network in
    /// benchmarks (zero: none). Native only.
    pub link_delay: Duration,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("bad server URL `{url}`: {reason}")]
    Url { url: String, reason: String },
    #[error("{0}")]
    Platform(String),
    #[error("the server refused to let this node join: {0}")]
    Refused(String),
    #[error("the model manifest from the server is unusable: {0}")]
    Manifest(String),
    #[error("the server closed the connection")]
    Closed,
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
}

type Result<T, E = SessionError> = std::result::Result<T, E>;

/// What a node tells its owner (the page, the command line) as it goes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Status {
    /// The self-benchmark is done.
    Profiled {
        backend: String,
        adapter: String,
        gmacs: f64,
    },
    Joined {
        id: NodeId,
        room: String,
    },
    Assigned {
        epoch: u64,
        index: u32,
        n_nodes: u32,
        layers: [usize; 2],
        starter: bool,
    },
    Unassigned {
        reason: String,
    },
    Downloading {
        done: u64,
        total: u64,
        /// Bytes found in the platform's cache rather than downloaded.
        cached: u64,
    },
    Ready {
        epoch: u64,
    },
    /// The current assignment failed (the node waits for the next one).
    Failed {
        message: String,
    },
}

/// Receives [`Status`] updates.
pub type StatusSink = Rc<dyn Fn(&Status)>;

/// A sink that drops every update.
pub fn no_status() -> StatusSink {
    Rc::new(|_| {})
}

/// What the connection loop and the assignment loop share.
struct State {
    id: NodeId,
    /// The running starter's command channel, when this node is the starter and ready.
    commands: Option<mpsc::UnboundedSender<Command>>,
    stats: SharedStats,
    epoch: u64,
    weight_bytes: u64,
    /// Signals for epochs not linked yet.
    early_signals: Vec<(NodeId, Signal)>,
    /// The previous node of the running ring, whose garbage the heartbeat reports.
    prev: Option<NodeId>,
}

/// What every step of a session needs.
struct Ctx<'a> {
    platform: &'a dyn Platform,
    opts: &'a NodeOptions,
    base: Url,
    auth: Vec<(String, String)>,
    manifest: Manifest,
    backend: Backend,
    tx: Rc<dyn ControlTx>,
    state: Rc<RefCell<State>>,
    status: StatusSink,
}

/// Joins `opts.room` and serves as a ring node until the connection ends or `stop` resolves
/// (then it leaves the room cleanly).
pub async fn run(
    platform: &dyn Platform,
    opts: NodeOptions,
    status: StatusSink,
    stop: LocalBoxFuture<'_, ()>,
) -> Result<()> {
    let base = Url::parse(&opts.server).map_err(|e| SessionError::Url {
        url: opts.server.clone(),
        reason: e.to_string(),
    })?;
    let auth: Vec<(String, String)> = opts
        .token
        .iter()
        .map(|t| ("authorization".to_string(), format!("Bearer {t}")))
        .collect();
    let manifest_url = join(&base, "/model/manifest")?;
    let manifest = fetch_manifest(platform, &manifest_url, auth.clone()).await?;
    let (backend, adapter) = platform
        .resolve(opts.backend)
        .await
        .map_err(SessionError::Platform)?;
    // A device measures itself once per model and engine: a reloaded tab brings the same
    // figures, so the plan (and the layers it has cached) stay the same.
    let key = format!(
        "profile/{}/{}/{adapter}",
        manifest.files.first().map_or("", |f| f.sha256.as_str()),
        format!("{backend:?}").to_lowercase()
    );
    let kept = platform
        .cache_get(key.clone())
        .await
        .and_then(|b| serde_json::from_slice::<Profile>(&b).ok())
        .filter(|p| p.speed.is_finite() && p.speed > 0.0 && p.weight_factor.is_finite());
    let profile = match kept {
        Some(p) => Profile {
            memory_budget: opts.memory_budget,
            ..p
        },
        None => {
            let p =
                self_benchmark(platform, backend, &adapter, &manifest, opts.memory_budget).await?;
            if let Ok(bytes) = serde_json::to_vec(&p) {
                platform.cache_put(key, bytes).await;
            }
            p
        }
    };
    tracing::info!(
        "profile: {} on {}, {:.2} GMAC/s, weight factor {:.2}",
        profile.backend,
        profile.adapter,
        profile.speed / 1e9,
        profile.weight_factor
    );
    status(&Status::Profiled {
        backend: profile.backend.clone(),
        adapter: profile.adapter.clone(),
        gmacs: profile.speed / 1e9,
    });

    let mut ws_url = join(&base, "/ws")?;
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    ws_url.set_scheme(scheme).map_err(|_| SessionError::Url {
        url: opts.server.clone(),
        reason: "cannot make a WebSocket URL of it".into(),
    })?;
    let (tx, mut rx) = platform
        .connect(ws_url.as_str())
        .await
        .map_err(SessionError::Platform)?;
    let tx: Rc<dyn ControlTx> = Rc::from(tx);
    send(
        &*tx,
        &ToServer::Join {
            room: opts.room.clone(),
            token: opts.token.clone(),
            name: opts.name.clone(),
            kind: opts.kind,
            profile,
        },
    )
    .await?;
    let (id, heartbeat_ms) = match recv(&mut *rx).await? {
        ToNode::Welcome {
            id, heartbeat_ms, ..
        } => (id, heartbeat_ms),
        ToNode::Refused { reason } => return Err(SessionError::Refused(reason)),
        other => {
            return Err(SessionError::Protocol(format!(
                "expected welcome, got {other:?}"
            )))
        }
    };
    tracing::info!("joined room `{}` as node {id} ({})", opts.room, opts.name);
    status(&Status::Joined {
        id,
        room: opts.room.clone(),
    });

    let state = Rc::new(RefCell::new(State {
        id,
        commands: None,
        stats: Arc::new(Mutex::new(DriverStats::default())),
        epoch: 0,
        weight_bytes: 0,
        early_signals: Vec::new(),
        prev: None,
    }));
    // An assignment, or the reason this node is left out of the ring.
    let (assign_tx, assign_rx) = mpsc::unbounded::<Result<Assignment, String>>();
    let (signal_tx, signal_rx) = mpsc::unbounded::<(NodeId, Signal)>();

    let reader = {
        let tx = tx.clone();
        let state = state.clone();
        async move {
            loop {
                let msg = match rx.recv().await {
                    None => return Err(SessionError::Closed),
                    Some(Err(e)) => return Err(SessionError::Platform(e)),
                    Some(Ok(m)) => m,
                };
                let msg: ToNode = match protocol::decode(&msg) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("ignoring a message from the server: {e}");
                        continue;
                    }
                };
                match msg {
                    ToNode::Assign(a) => {
                        let _ = assign_tx.unbounded_send(Ok(a));
                    }
                    ToNode::Unassigned { reason, .. } => {
                        tracing::info!("not in the ring: {reason}");
                        let _ = assign_tx.unbounded_send(Err(reason));
                    }
                    ToNode::Signal { from, signal } => {
                        let _ = signal_tx.unbounded_send((from, signal));
                    }
                    ToNode::Generate {
                        request,
                        prompt_tokens,
                        max_tokens,
                        sampling,
                        eos_ids,
                    } => {
                        let req = SeqRequest {
                            prompt_tokens,
                            max_tokens,
                            params: sampling,
                            eos_ids,
                        };
                        let sent = state.borrow().commands.as_ref().map(|c| {
                            c.unbounded_send(Command::Submit { id: request, req })
                                .is_ok()
                        });
                        if sent != Some(true) {
                            let m = ToServer::Finished {
                                request,
                                finish: FinishReason::Error,
                                message: Some("this node is not a ready starter".into()),
                            };
                            send(&*tx, &m).await?;
                        }
                    }
                    ToNode::Cancel { request } => {
                        if let Some(c) = state.borrow().commands.as_ref() {
                            let _ = c.unbounded_send(Command::Cancel { id: request });
                        }
                    }
                    ToNode::Error { message } => tracing::warn!("server: {message}"),
                    ToNode::Welcome { .. } | ToNode::Refused { .. } => {}
                }
            }
        }
    };

    let heartbeat = {
        let tx = tx.clone();
        let state = state.clone();
        async move {
            let mut last = (Instant::now(), 0u64);
            // (epoch, previous node, count) of the last garbage report.
            let mut reported = (0u64, None::<NodeId>, 0u64);
            loop {
                platform
                    .sleep(Duration::from_millis(heartbeat_ms.max(100)))
                    .await;
                let mut garbage = None;
                let report = {
                    let st = state.borrow();
                    let s = crate::lock(&st.stats).clone();
                    if (st.epoch, st.prev) != (reported.0, reported.1) {
                        reported = (st.epoch, st.prev, 0);
                    }
                    if let Some(from) = st.prev.filter(|_| s.garbage > reported.2) {
                        reported.2 = s.garbage;
                        garbage = Some(ToServer::Garbage {
                            epoch: st.epoch,
                            from,
                            count: s.garbage,
                            example: s.last_garbage.clone().unwrap_or_default(),
                        });
                    }
                    let now = Instant::now();
                    let dt = now.duration_since(last.0).as_secs_f64().max(1e-6);
                    let tok_s = s.tokens.saturating_sub(last.1) as f64 / dt;
                    last = (now, s.tokens);
                    NodeReport {
                        epoch: st.epoch,
                        tok_s,
                        rtt_ms: s.recent_rtt_ms(),
                        weight_bytes: st.weight_bytes,
                        kv_bytes: s.kv_bytes,
                        rss_bytes: platform.rss_bytes(),
                        wasm_memory_bytes: platform.wasm_memory_bytes(),
                        sequences: s.sequences,
                        queued: s.queued,
                        peak_sequences: s.peak_sequences,
                        busy_s: s.busy_s,
                        steps: s.steps,
                        jobs: s.jobs,
                        job_busy_s: s.job_busy_s,
                    }
                };
                send(&*tx, &ToServer::Stats(report)).await?;
                if let Some(g) = garbage {
                    tracing::warn!("reporting the previous node: {g:?}");
                    send(&*tx, &g).await?;
                }
            }
        }
    };

    let ctx = Ctx {
        platform,
        opts: &opts,
        base: base.clone(),
        auth: auth.clone(),
        manifest,
        backend,
        tx: tx.clone(),
        state: state.clone(),
        status: status.clone(),
    };
    let assignments = assignment_loop(&ctx, assign_rx, signal_rx);

    let outcome = {
        let work = future::select(
            Box::pin(reader),
            future::select(Box::pin(heartbeat), Box::pin(assignments)),
        );
        match future::select(Box::pin(work), stop).await {
            Either::Left((r, _)) => match r {
                Either::Left((r, _)) => r,
                Either::Right((Either::Left((r, _)), _)) => r,
                Either::Right((Either::Right((r, _)), _)) => r,
            },
            Either::Right(((), _)) => {
                tracing::info!("leaving the room");
                Ok(())
            }
        }
    };
    // Whatever ended the session, say goodbye if the server still listens.
    let _ = send(&*tx, &ToServer::Leave).await;
    tx.close().await;
    outcome
}

fn join(base: &Url, path: &str) -> Result<Url> {
    base.join(path).map_err(|e| SessionError::Url {
        url: base.to_string(),
        reason: e.to_string(),
    })
}

async fn send(tx: &dyn ControlTx, msg: &ToServer) -> Result<()> {
    tx.send(protocol::encode(msg))
        .await
        .map_err(SessionError::Platform)
}

async fn recv(rx: &mut dyn crate::platform::ControlRx) -> Result<ToNode> {
    match rx.recv().await {
        None => Err(SessionError::Closed),
        Some(Err(e)) => Err(SessionError::Platform(e)),
        Some(Ok(m)) => protocol::decode(&m).map_err(SessionError::Protocol),
    }
}

async fn fetch_manifest(
    platform: &dyn Platform,
    url: &Url,
    auth: Vec<(String, String)>,
) -> Result<Manifest> {
    let bytes = platform
        .fetch(url.as_str(), None, auth)
        .await
        .map_err(SessionError::Platform)?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| SessionError::Manifest(e.to_string()))?;
    m.validate()
        .map_err(|e| SessionError::Manifest(e.to_string()))?;
    Ok(m)
}

/// Random values quantized to `dtype`, (rows, cols).
fn random_tensor(rng: &mut Rng, name: &str, dtype: DType, shape: &[usize]) -> RawTensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| (rng.next_f32() - 0.5) * 0.2).collect();
    RawTensor {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        bytes: mdi_core::quant::quantize(dtype, &values),
    }
}

/// Most steps (and positions) of the self-benchmark. Short: nodes that start together on
/// one machine (tests, the cluster bench) time themselves at once, and a longer run overlaps
/// more of the others'.
const BENCH_STEPS: u32 = 128;

/// The self-benchmark's steps are timed in windows of at least this long (or one step).
const BENCH_WINDOW: Duration = Duration::from_millis(10);

/// The typical time per step of a run whose steps ended at `ends` (from `start`): steps in
/// consecutive windows of at least [`BENCH_WINDOW`], the median window's mean. A window spans
/// several periods of a CPU quota (a node capped at half a CPU runs in short bursts, and a
/// single step is either at full speed or stopped halfway), and the median drops the windows
/// another process took the CPU in.
fn typical_step(start: Instant, ends: &[Instant]) -> Duration {
    let mut windows = Vec::new();
    let (mut from, mut steps) = (start, 0u32);
    for &end in ends {
        steps += 1;
        let span = end.saturating_duration_since(from);
        if span >= BENCH_WINDOW {
            windows.push(span / steps);
            (from, steps) = (end, 0);
        }
    }
    if windows.is_empty() && steps > 0 {
        windows.push(ends[ends.len() - 1].saturating_duration_since(start) / steps);
    }
    windows.sort();
    windows.get(windows.len() / 2).copied().unwrap_or_default()
}

/// Times decode steps of one layer of this model (random weights stored in the types of the
/// model's first layer) on `backend`: the node's speed in multiply-adds per second, and how
/// many bytes its engine holds per stored weight byte.
async fn self_benchmark(
    platform: &dyn Platform,
    backend: Backend,
    adapter: &str,
    manifest: &Manifest,
    memory_budget: u64,
) -> Result<Profile> {
    let c = &manifest.config;
    let mut rng = Rng::new(0x5eed);
    let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
    // The configuration comes from the server: a layer this node could not hold must fail
    // here, with a reason, not abort on an allocation.
    let layer_values = [(h, q), (h, kv), (h, kv), (q, h), (f, h), (f, h), (h, f)]
        .iter()
        .try_fold(0u64, |a, &(x, y)| {
            a.checked_add((x as u64).checked_mul(y as u64)?)
        });
    if layer_values
        .and_then(|v| v.checked_mul(4))
        .is_none_or(|b| b > memory_budget)
    {
        return Err(SessionError::Manifest(format!(
            "one layer of this model takes more than this node's memory budget of \
             {memory_budget} bytes as f32"
        )));
    }
    let mut t = |role: Role, shape: &[usize]| {
        let name = manifest.naming.tensor_name(role, 0);
        let dtype = manifest.tensor(&name).map_or(DType::F32, |t| t.dtype);
        random_tensor(&mut rng, &name, dtype, shape)
    };
    let layer = LayerWeights {
        attn_norm: t(Role::AttnNorm, &[h]),
        wq: t(Role::Wq, &[q, h]),
        wk: t(Role::Wk, &[kv, h]),
        wv: t(Role::Wv, &[kv, h]),
        wo: t(Role::Wo, &[h, q]),
        bq: c.qkv_bias.then(|| t(Role::Bq, &[q])),
        bk: c.qkv_bias.then(|| t(Role::Bk, &[kv])),
        bv: c.qkv_bias.then(|| t(Role::Bv, &[kv])),
        ffn_norm: t(Role::FfnNorm, &[h]),
        gate: t(Role::Gate, &[f, h]),
        up: t(Role::Up, &[f, h]),
        down: t(Role::Down, &[h, f]),
    };
    let stored: u64 = [
        &layer.wq,
        &layer.wk,
        &layer.wv,
        &layer.wo,
        &layer.gate,
        &layer.up,
        &layer.down,
        &layer.attn_norm,
        &layer.ffn_norm,
    ]
    .iter()
    .map(|t| t.bytes.len() as u64)
    .sum();
    let weights = StageWeights {
        spec: StageSpec {
            layers: 0..1,
            embed: false,
            head: false,
        },
        embed: None,
        layers: vec![layer],
        output_norm: None,
        head: None,
    };
    let mut one = c.clone();
    one.n_layers = 1;
    let exec = platform
        .exec(backend, &one, weights)
        .await
        .map_err(SessionError::Platform)?;
    let mut node: Node<crate::exec::CacheHandle> = Node::new(NodeConfig {
        index: 1,
        is_last: false,
        hidden: h,
        wire: mdi_core::wire::WireDtype::F32,
        max_message: usize::MAX,
        max_positions: BENCH_STEPS as usize,
        max_tokens: BENCH_STEPS as usize,
        max_sequences: 1,
        max_partials: 1,
        max_held_bytes: u64::MAX,
        kv_bytes_per_position: exec.kv_bytes_per_position() as u64,
        kv_cap_bytes: u64::MAX,
    });
    let start = mdi_core::wire::encode_control(&mdi_core::wire::Control::Start {
        seq: 1,
        positions: BENCH_STEPS,
    });
    node.handle(&start);
    let x: Vec<f32> = (0..h).map(|_| rng.next_f32() - 0.5).collect();
    let mut ends = Vec::with_capacity(BENCH_STEPS as usize);
    let began = Instant::now();
    let mut timed_from = began;
    // Two warm-up steps (pipeline compilation, first-touch), then up to BENCH_STEPS - 2 timed
    // steps or 1.5 s of them.
    for i in 0..BENCH_STEPS {
        let frames = mdi_core::wire::encode_activation(
            1,
            i,
            h,
            &x,
            mdi_core::wire::WireDtype::F32,
            usize::MAX,
        );
        for f in frames {
            node.handle(&f);
        }
        let Some(job) = node.next_job() else { break };
        let done = exec.submit(job).await;
        if let Err(e) = &done.output {
            return Err(SessionError::Platform(format!(
                "self-benchmark failed: {e}"
            )));
        }
        node.complete(done);
        let now = Instant::now();
        match i {
            0 => {}
            1 => timed_from = now,
            _ => ends.push(now),
        }
        if began.elapsed() > Duration::from_millis(1500) && ends.len() >= 3 {
            break;
        }
    }
    let step = typical_step(timed_from, &ends);
    // In the planner's units: one layer's multiply-adds per token.
    let speed = mdi_core::plan::ModelCost::layer_macs(c) / step.as_secs_f64().max(1e-9);
    let weight_factor = (exec.weight_bytes() as f64 / stored as f64).max(1.0);
    Ok(Profile {
        memory_budget,
        backend: match backend {
            Backend::Gpu => "gpu",
            Backend::Cpu => "cpu",
            Backend::Oracle => "oracle",
            Backend::Auto => "auto",
        }
        .into(),
        adapter: adapter.to_string(),
        speed,
        weight_factor,
    })
}

/// Waits for assignments and serves each until a newer one arrives.
async fn assignment_loop(
    ctx: &Ctx<'_>,
    mut assign_rx: mpsc::UnboundedReceiver<Result<Assignment, String>>,
    mut signal_rx: mpsc::UnboundedReceiver<(NodeId, Signal)>,
) -> Result<()> {
    let (tx, state) = (&ctx.tx, &ctx.state);
    let mut next: Option<Result<Assignment, String>> = None;
    loop {
        let current = match next.take() {
            Some(a) => a,
            None => assign_rx.next().await.ok_or(SessionError::Closed)?,
        };
        let a = match current {
            Ok(a) => a,
            Err(reason) => {
                state.borrow_mut().commands = None;
                (ctx.status)(&Status::Unassigned { reason });
                continue;
            }
        };
        state.borrow_mut().epoch = a.epoch;
        let serve = serve_assignment(ctx, &a, &mut signal_rx);
        let newer = assign_rx.next();
        let outcome = future::select(Box::pin(serve), newer).await;
        match outcome {
            Either::Left((r, _)) => {
                state.borrow_mut().commands = None;
                match r {
                    Ok(()) => tracing::info!("epoch {}: the ring stopped", a.epoch),
                    Err(e) => {
                        tracing::warn!("epoch {}: {e}", a.epoch);
                        (ctx.status)(&Status::Failed { message: e.clone() });
                        send(
                            &**tx,
                            &ToServer::Failed {
                                epoch: a.epoch,
                                message: e,
                            },
                        )
                        .await?;
                    }
                }
            }
            Either::Right((n, _)) => {
                state.borrow_mut().commands = None;
                let mut latest = n.ok_or(SessionError::Closed)?;
                while let Ok(more) = assign_rx.try_recv() {
                    latest = more;
                }
                next = Some(latest);
            }
        }
    }
}

/// Downloads a stage's tensors, piece by piece, reporting progress; tensors the platform
/// kept from an earlier session (a browser's Cache API) are taken from there instead.
async fn download(
    ctx: &Ctx<'_>,
    spec: &StageSpec,
    node: NodeId,
    epoch: u64,
) -> std::result::Result<Vec<SparseSource>, String> {
    let (platform, base, manifest) = (ctx.platform, &ctx.base, &ctx.manifest);
    let mut sources: Vec<SparseSource> = manifest
        .files
        .iter()
        .map(|f| SparseSource::new(f.url.clone(), f.len))
        .collect();
    let tensors = manifest.stage_tensors(spec).map_err(|e| e.to_string())?;
    // The manifest is checked, but its sizes still come from the server: refuse an assignment
    // that cannot fit this node before holding any of it.
    let total = tensors
        .iter()
        .try_fold(0u64, |a, t| a.checked_add(t.at.len))
        .filter(|&t| t <= ctx.opts.memory_budget)
        .ok_or_else(|| {
            format!(
                "layers {:?} need more than this node's memory budget of {} bytes",
                spec.layers, ctx.opts.memory_budget
            )
        })?;
    let (mut done, mut cached) = (0u64, 0u64);
    let mut headers = ctx.auth.clone();
    headers.push((NODE_HEADER.to_string(), node.to_string()));
    let mut last_report: Option<Instant> = None;
    for t in tensors {
        let file = manifest
            .files
            .get(t.at.file)
            .ok_or_else(|| format!("tensor `{}` is in an unlisted file", t.name))?;
        let end =
            t.at.offset
                .checked_add(t.at.len)
                .ok_or_else(|| format!("tensor `{}` ends past any file", t.name))?;
        let start = t.at.offset;
        // Keyed by the file's content and the byte range, so any plan reuses what it finds.
        let key = format!("{}/{start}-{end}", file.sha256);
        let bytes = match platform.cache_get(key.clone()).await {
            Some(b) if b.len() as u64 == t.at.len => {
                cached += t.at.len;
                b
            }
            _ => {
                let url = base
                    .join(&file.url)
                    .map_err(|e| format!("{}: {e}", file.url))?;
                // Within the memory budget (checked above), so it fits this machine's usize.
                let mut bytes = Vec::with_capacity(usize::try_from(t.at.len).unwrap_or(0));
                let mut at = start;
                while at < end {
                    let to = (at + FETCH_PIECE).min(end);
                    let piece = platform
                        .fetch(url.as_str(), Some(at..to), headers.clone())
                        .await?;
                    if piece.len() as u64 != to - at {
                        return Err(format!(
                            "{url}: asked for bytes {at}..{to} and got {} bytes",
                            piece.len()
                        ));
                    }
                    bytes.extend_from_slice(&piece);
                    at = to;
                }
                platform.cache_put(key, bytes.clone()).await;
                bytes
            }
        };
        sources
            .get_mut(t.at.file)
            .ok_or_else(|| format!("tensor `{}` is in an unlisted file", t.name))?
            .insert(start, bytes)
            .map_err(|e| e.to_string())?;
        done += t.at.len;
        if last_report.is_none_or(|l| l.elapsed() > Duration::from_millis(200)) || done == total {
            last_report = Some(Instant::now());
            (ctx.status)(&Status::Downloading {
                done,
                total,
                cached,
            });
            let p = ToServer::Progress {
                epoch,
                done,
                total,
                cached,
            };
            ctx.tx.send(protocol::encode(&p)).await?;
        }
    }
    Ok(sources)
}

/// One assignment: download, build, link, run.
async fn serve_assignment(
    ctx: &Ctx<'_>,
    a: &Assignment,
    signal_rx: &mut mpsc::UnboundedReceiver<(NodeId, Signal)>,
) -> std::result::Result<(), String> {
    let (manifest, tx, state) = (&ctx.manifest, &ctx.tx, &ctx.state);
    let config = &manifest.config;
    let starter = a.is_starter();
    let spec = StageSpec {
        layers: a.layers[0]..a.layers[1],
        embed: starter,
        head: starter,
    };
    let id = state.borrow().id;
    tracing::info!(
        "epoch {}: position {} of {}, layers {:?}{}",
        a.epoch,
        a.index,
        a.n_nodes,
        spec.layers,
        if starter { " (starter)" } else { "" }
    );
    (ctx.status)(&Status::Assigned {
        epoch: a.epoch,
        index: a.index,
        n_nodes: a.n_nodes,
        layers: a.layers,
        starter,
    });
    let sources = download(ctx, &spec, id, a.epoch).await?;
    let exec: BoxExec = {
        // Each tensor's downloaded bytes move into the loaded stage, not copied.
        let sources = sources.into_iter().map(HandOver::new).collect();
        let store = ManifestStore::new(manifest.clone(), sources).map_err(|e| e.to_string())?;
        let weights = StageWeights::load(&store, config, &spec).map_err(|e| e.to_string())?;
        // The downloaded pieces go with the store: only the engine's copy stays resident.
        drop(store);
        ctx.platform.exec(ctx.backend, config, weights).await?
    };
    state.borrow_mut().weight_bytes = exec.weight_bytes();
    let hops = link(ctx, a, signal_rx).await?;
    // What this node holds is known now: the server has it before the ring is ready, not
    // only at the next heartbeat.
    let held = NodeReport {
        epoch: a.epoch,
        tok_s: 0.0,
        rtt_ms: None,
        weight_bytes: exec.weight_bytes(),
        kv_bytes: 0,
        rss_bytes: ctx.platform.rss_bytes(),
        wasm_memory_bytes: ctx.platform.wasm_memory_bytes(),
        sequences: 0,
        queued: 0,
        peak_sequences: 0,
        busy_s: 0.0,
        steps: 0,
        jobs: 0,
        job_busy_s: 0.0,
    };
    send(&**tx, &ToServer::Stats(held))
        .await
        .map_err(|e| e.to_string())?;
    send(&**tx, &ToServer::Ready { epoch: a.epoch })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("epoch {}: ready", a.epoch);
    (ctx.status)(&Status::Ready { epoch: a.epoch });

    let stats: SharedStats = Arc::new(Mutex::new(DriverStats::default()));
    state.borrow_mut().stats = stats.clone();
    state.borrow_mut().prev = a.prev;
    let max_message = hops
        .next
        .as_ref()
        .map(|(l, _)| l.max_message_size())
        .unwrap_or(64 * 1024);
    let n = a.n_nodes as usize;
    if starter {
        let s: Starter<crate::exec::CacheHandle> = Starter::new(StarterConfig {
            n_nodes: n,
            hidden: config.hidden,
            wire: a.wire,
            max_message,
            context: a.max_positions.min(config.context),
            in_flight: a.in_flight.max(1),
            kv_bytes_per_position: exec.kv_bytes_per_position() as u64,
            kv_cap_bytes: a.kv_cap_bytes,
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded();
        let (ev_tx, mut ev_rx) = mpsc::unbounded::<Event>();
        state.borrow_mut().commands = Some(cmd_tx);
        let batching = driver::Batching::new(n, |d| ctx.platform.sleep(d));
        let run = driver::run_starter(s, &*exec, hops, cmd_rx, ev_tx, stats, batching);
        let forward = async {
            while let Some(e) = ev_rx.next().await {
                let m = match e {
                    Event::Token { id, token } => ToServer::Tokens {
                        request: id,
                        tokens: vec![token],
                    },
                    Event::Done { id, finish } => {
                        let (finish, message) = match finish {
                            Finish::Eos => (FinishReason::Eos, None),
                            Finish::MaxTokens => (FinishReason::MaxTokens, None),
                            Finish::Context => (FinishReason::Context, None),
                            Finish::Cancelled => (FinishReason::Cancelled, None),
                            Finish::Error(m) => (FinishReason::Error, Some(m)),
                        };
                        ToServer::Finished {
                            request: id,
                            finish,
                            message,
                        }
                    }
                    Event::NodeError { node, message } => {
                        tracing::warn!("ring node {node}: {message}");
                        continue;
                    }
                };
                if let Err(e) = send(&**tx, &m).await {
                    return e.to_string();
                }
            }
            "the starter stopped".to_string()
        };
        let outcome = future::select(Box::pin(run), Box::pin(forward)).await;
        match outcome {
            Either::Left((r, _)) => r.map_err(|e| e.to_string()),
            Either::Right((e, _)) => Err(e),
        }
    } else {
        let node: Node<crate::exec::CacheHandle> = Node::new(NodeConfig {
            index: a.index,
            is_last: a.index + 1 == a.n_nodes,
            hidden: config.hidden,
            wire: a.wire,
            max_message,
            max_positions: a.max_positions.min(config.context),
            max_tokens: a.max_positions.min(config.context),
            // Room for the starter's sequences twice over: only a peer that opens sequences
            // it never uses reaches the limit, and then the least recently active go.
            max_sequences: a.in_flight.clamp(1, 1 << 16) * 2,
            // One peer sends the chunks of one activation in order: one at a time, one spare.
            max_partials: 2,
            max_held_bytes: NodeConfig::default_held_bytes(
                a.max_positions.min(config.context),
                config.hidden,
            ),
            kv_bytes_per_position: exec.kv_bytes_per_position() as u64,
            kv_cap_bytes: a.kv_cap_bytes,
        });
        let batching = driver::Batching::new(n, |d| ctx.platform.sleep(d));
        driver::run_node(node, &*exec, hops, stats, batching)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Links this node to its neighbours for assignment `a`: offers to the next node, answers the
/// previous node's offer; the server relays the descriptions.
async fn link(
    ctx: &Ctx<'_>,
    a: &Assignment,
    signal_rx: &mut mpsc::UnboundedReceiver<(NodeId, Signal)>,
) -> std::result::Result<Hops, String> {
    let (platform, tx, state, name) = (ctx.platform, &ctx.tx, &ctx.state, &ctx.opts.name);
    let mut hops = Hops::default();
    if a.n_nodes <= 1 {
        return Ok(hops);
    }
    let (Some(next), Some(prev)) = (a.next, a.prev) else {
        return Err("a ring of several nodes needs both neighbours".into());
    };
    let (offer, offering) = platform.offer(format!("{name}->next")).await?;
    let m = ToServer::Signal {
        to: next,
        signal: Signal {
            epoch: a.epoch,
            kind: SignalKind::Offer,
            sdp: offer,
        },
    };
    tx.send(protocol::encode(&m)).await?;
    // Signals that arrived before we were ready for this epoch.
    let mut pending: Vec<(NodeId, Signal)> = std::mem::take(&mut state.borrow_mut().early_signals);
    let mut answer_from_next: Option<String> = None;
    let mut answering = None;
    while answer_from_next.is_none() || answering.is_none() {
        let (from, signal) = match pending.pop() {
            Some(s) => s,
            None => signal_rx
                .next()
                .await
                .ok_or("the connection to the server closed")?,
        };
        if signal.epoch > a.epoch {
            state.borrow_mut().early_signals.push((from, signal));
            continue;
        }
        if signal.epoch < a.epoch {
            continue;
        }
        match signal.kind {
            SignalKind::Answer if from == next && answer_from_next.is_none() => {
                answer_from_next = Some(signal.sdp);
            }
            SignalKind::Offer if from == prev && answering.is_none() => {
                let (answer, ans) = platform.answer(format!("{name}<-prev"), signal.sdp).await?;
                let m = ToServer::Signal {
                    to: prev,
                    signal: Signal {
                        epoch: a.epoch,
                        kind: SignalKind::Answer,
                        sdp: answer,
                    },
                };
                tx.send(protocol::encode(&m)).await?;
                answering = Some(ans);
            }
            kind => tracing::debug!("ignoring a {kind:?} from node {from}"),
        }
    }
    let (Some(answer), Some(answering)) = (answer_from_next, answering) else {
        return Err("linking ended early".into());
    };
    let (next_link, prev_link) =
        futures::future::join(offering.finish(answer), answering.finish()).await;
    let (l, back) = next_link?;
    let (back_tx, inbox) = prev_link?;
    #[cfg(not(target_family = "wasm"))]
    let (back, inbox) = {
        let delayed = |i| {
            mdi_transport::shaping::delayed(i, ctx.opts.link_delay)
                .map_err(|e| format!("cannot start a thread to delay the links: {e}"))
        };
        (delayed(back)?, delayed(inbox)?)
    };
    hops.next = Some((l, back));
    hops.prev = Some((inbox, back_tx));
    Ok(hops)
}

/// A boxed future that never resolves: a session without a stop signal.
pub fn never<'a>() -> LocalBoxFuture<'a, ()> {
    future::pending().boxed_local()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps ending at these offsets (ms) from the start.
    fn ends(start: Instant, ms: &[f64]) -> Vec<Instant> {
        ms.iter()
            .map(|m| start + Duration::from_secs_f64(m / 1e3))
            .collect()
    }

    #[test]
    fn a_quota_that_stops_every_other_step_halfway_is_timed_at_its_average_speed() {
        // 0.4 ms of work per step at half a CPU in 2 ms periods (1 ms running, 1 ms stopped):
        // steps take 0.4 ms or 1.4 ms; the median single step would say full speed.
        let start = Instant::now();
        let (mut t, mut ran) = (0f64, 0f64);
        let mut offsets = Vec::new();
        for _ in 0..100 {
            let mut left = 0.4f64;
            while left > 0.0 {
                let room = (1.0 - ran).min(left);
                (t, ran, left) = (t + room, ran + room, left - room);
                if ran >= 1.0 - 1e-9 {
                    (t, ran) = (t + 1.0, 0.0);
                }
            }
            offsets.push(t);
        }
        let step = typical_step(start, &ends(start, &offsets)).as_secs_f64() * 1e3;
        assert!(
            (step - 0.8).abs() < 0.08,
            "{step} ms a step, not the average 0.8"
        );
    }

    #[test]
    fn windows_another_process_took_do_not_count_and_slow_steps_stand_alone() {
        let start = Instant::now();
        // 1 ms steps, with 50 ms lost around step 30.
        let offsets: Vec<f64> = (1..=100)
            .map(|i| i as f64 + if i >= 30 { 50.0 } else { 0.0 })
            .collect();
        let step = typical_step(start, &ends(start, &offsets)).as_secs_f64() * 1e3;
        assert!((step - 1.0).abs() < 0.05, "{step}");
        // Steps longer than a window: the median step.
        let offsets = [20.0, 45.0, 65.0, 200.0, 220.0];
        let step = typical_step(start, &ends(start, &offsets)).as_secs_f64() * 1e3;
        assert!((step - 20.0).abs() < 0.01, "{step}");
        // Too few to fill a window: their mean.
        let step = typical_step(start, &ends(start, &[1.0, 2.0, 3.0])).as_secs_f64() * 1e3;
        assert!((step - 1.0).abs() < 0.01, "{step}");
        assert_eq!(typical_step(start, &[]), Duration::ZERO);
    }
}
