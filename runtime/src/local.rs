//! A ring inside one process: each node on its own thread with only its own layers, linked by
//! real transports (WebRTC data channels over loopback, or bounded in-process channels), run
//! by the same starter and node loops as separate devices. `mdi generate --nodes N` and the
//! ring benchmark use it; it needs no server.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use mdi_core::node::{Node, NodeConfig};
use mdi_core::plan::{plan, ModelCost, NodeProfile};
use mdi_core::ring::stage_specs;
use mdi_core::starter::{Event, Finish, SeqRequest, Starter, StarterConfig};
use mdi_core::wire::WireDtype;
use mdi_core::{Config, RawTensor, StageWeights, TensorStore};
use mdi_transport::{Inbox, Link};

use crate::driver::{self, Command, DriverStats, Hops, SharedStats};
use crate::exec::BoxExec;

/// Which transport links neighbouring nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// WebRTC data channels over loopback, as between real devices.
    WebRtc,
    /// Bounded in-process channels.
    InProcess,
}

/// How to run the ring.
#[derive(Debug, Clone)]
pub struct RingOptions {
    pub nodes: usize,
    pub in_flight: usize,
    pub wire: WireDtype,
    pub transport: TransportKind,
}

/// One node's share and what it measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStats {
    pub layers: [usize; 2],
    /// Stored (file) bytes of the tensors this node loaded.
    pub weight_bytes: u64,
    /// Bytes of weights its engine holds, as allocated (f32 for the oracle).
    pub engine_bytes: u64,
    pub kv_bytes_peak: u64,
    /// Most sequences the node ran as one batch.
    pub peak_batch: usize,
}

/// What a ring run produced.
#[derive(Debug)]
pub struct RingRun {
    /// Per request: generated ids and how it ended.
    pub tokens: Vec<Vec<u32>>,
    pub finish: Vec<Option<Finish>>,
    pub elapsed: Duration,
    pub per_node: Vec<NodeStats>,
    /// Round trips of pings over each hop, in milliseconds.
    pub hop_rtt_ms: Vec<f64>,
    /// Bytes of the message of one decode hop.
    pub decode_hop_bytes: Option<usize>,
    pub node_errors: Vec<String>,
}

impl RingRun {
    pub fn generated(&self) -> usize {
        self.tokens.iter().map(Vec::len).sum()
    }

    pub fn tok_s(&self) -> f64 {
        self.generated() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn hop_rtt_p50(&self) -> Option<f64> {
        percentile(&self.hop_rtt_ms, 0.5)
    }
}

pub use crate::driver::percentile;

/// Both directions of each hop: `(next of i, prev of i+1)`.
async fn hop_links(
    n: usize,
    kind: TransportKind,
) -> anyhow::Result<Vec<((Link, Inbox), (Inbox, Link))>> {
    let mut hops = Vec::with_capacity(n);
    for i in 0..n {
        let to = (i + 1) % n;
        let ((a_tx, a_rx), (b_tx, b_rx)) = match kind {
            TransportKind::InProcess => mdi_transport::in_process::pair(&Default::default()),
            TransportKind::WebRtc => mdi_transport::webrtc::connect_pair_in_process()
                .await
                .map_err(|e| anyhow::anyhow!("linking node {i} to node {to} over WebRTC: {e}"))?,
        };
        hops.push(((a_tx, a_rx), (b_rx, b_tx)));
    }
    Ok(hops)
}

/// Plans an even spread of the model over `n` equal nodes on this machine: a 1/N share of the
/// weights (+5%) each, or no memory limit when the pieces cannot be spread that evenly.
pub fn even_plan(cost: &ModelCost, n: usize) -> anyhow::Result<Vec<std::ops::Range<usize>>> {
    let even = cost.total_weight_bytes() / n.max(1) as u64 * 105 / 100;
    let partition = plan(cost, &vec![NodeProfile::new(even, 1.0); n], 0)
        .or_else(|_| plan(cost, &vec![NodeProfile::new(u64::MAX / 4, 1.0); n], 0))?;
    Ok(partition.nodes.iter().map(|a| a.layers.clone()).collect())
}

/// Run `requests` through a ring of `opts.nodes` nodes whose engines `make` builds from
/// their stage's weights.
pub fn run_ring(
    config: &Config,
    store: &dyn TensorStore,
    requests: Vec<SeqRequest>,
    opts: &RingOptions,
    make: impl Fn(&Config, StageWeights<RawTensor>) -> anyhow::Result<BoxExec> + Send + Sync + 'static,
) -> anyhow::Result<RingRun> {
    let n = opts.nodes;
    if n == 0 {
        anyhow::bail!("a ring needs at least one node");
    }
    let cost = ModelCost::from_store(store, config)?;
    let ranges = even_plan(&cost, n)?;
    let specs = stage_specs(&ranges);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut hops: Vec<Hops> = (0..n).map(|_| Hops::default()).collect();
    if n > 1 {
        for (i, (next, prev)) in runtime
            .block_on(hop_links(n, opts.transport))?
            .into_iter()
            .enumerate()
        {
            hops[i].next = Some(next);
            hops[(i + 1) % n].prev = Some(prev);
        }
    }
    let max_message = hops
        .iter()
        .filter_map(|h| h.next.as_ref().map(|(l, _)| l.max_message_size()))
        .min()
        .unwrap_or(64 * 1024);

    let mut stored = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n);
    for spec in &specs {
        let w = StageWeights::load(store, config, spec)
            .map_err(|e| anyhow::anyhow!("loading layers {:?}: {e}", spec.layers))?;
        stored.push(w.stored_bytes());
        weights.push(w);
    }
    let stats: Vec<SharedStats> = (0..n)
        .map(|_| Arc::new(Mutex::new(DriverStats::default())))
        .collect();
    let handle = runtime.handle().clone();
    let n_requests = requests.len();
    let make = Arc::new(make);
    // Engines are built on their nodes' threads: a browser-style executor never moves.
    let (built_tx, built_rx) = std::sync::mpsc::channel::<(usize, anyhow::Result<u64>)>();
    let mut threads = Vec::new();
    let (cmd_tx, cmd_rx) = mpsc::unbounded();
    let (ev_tx, ev_rx) = mpsc::unbounded();
    let mut cmd_rx = Some(cmd_rx);
    let mut ev_tx = Some(ev_tx);
    for (index, (w, h)) in weights.into_iter().zip(hops).enumerate() {
        let (handle, stats, make, built) = (
            handle.clone(),
            stats[index].clone(),
            make.clone(),
            built_tx.clone(),
        );
        let config = config.clone();
        let wire = opts.wire;
        let in_flight = opts.in_flight.max(1);
        let starter_io = (index == 0).then(|| (cmd_rx.take(), ev_tx.take()));
        threads.push(thread::spawn(move || -> anyhow::Result<()> {
            let exec = match make(&config, w) {
                Ok(e) => e,
                Err(e) => {
                    let msg = format!("{e:#}");
                    let _ = built.send((index, Err(e)));
                    anyhow::bail!("node {index}: {msg}");
                }
            };
            let _ = built.send((index, Ok(exec.weight_bytes())));
            drop(built);
            let kv = exec.kv_bytes_per_position();
            if let Some((Some(commands), Some(events))) = starter_io {
                let starter = Starter::new(StarterConfig {
                    n_nodes: n,
                    hidden: config.hidden,
                    wire,
                    max_message,
                    context: config.context,
                    in_flight,
                    kv_bytes_per_position: kv as u64,
                    kv_cap_bytes: u64::MAX,
                });
                return handle
                    .block_on(driver::run_starter(
                        starter,
                        &*exec,
                        h,
                        commands,
                        events,
                        stats,
                        driver::Batching::new(n, |d| Box::pin(tokio::time::sleep(d))),
                    ))
                    .map_err(|e| anyhow::anyhow!("starter: {e}"));
            }
            let node = Node::new(NodeConfig {
                index: index as u32,
                is_last: index + 1 == n,
                hidden: config.hidden,
                wire,
                max_message,
                max_positions: config.context,
                max_tokens: config.context,
                max_sequences: in_flight.saturating_mul(2),
                max_partials: 2,
                max_held_bytes: NodeConfig::default_held_bytes(config.context, config.hidden),
                kv_bytes_per_position: kv as u64,
                kv_cap_bytes: u64::MAX,
            });
            handle
                .block_on(driver::run_node(
                    node,
                    &*exec,
                    h,
                    stats,
                    driver::Batching::new(n, |d| Box::pin(tokio::time::sleep(d))),
                ))
                .map_err(|e| anyhow::anyhow!("node {index}: {e}"))
        }));
    }
    drop(built_tx);
    let mut engine_bytes = vec![0u64; n];
    let mut build_error = None;
    for (i, r) in built_rx {
        match r {
            Ok(b) => engine_bytes[i] = b,
            Err(e) => build_error = Some(e),
        }
    }
    if let Some(e) = build_error {
        // Closing the links ends the threads that did start.
        drop(cmd_tx);
        for t in threads {
            let _ = t.join();
        }
        return Err(e);
    }
    for (i, req) in requests.into_iter().enumerate() {
        let _ = cmd_tx.unbounded_send(Command::Submit { id: i as u64, req });
    }
    // Closing the channel tells the starter to stop once every request has finished.
    drop(cmd_tx);
    let start = Instant::now();
    let mut tokens = vec![Vec::new(); n_requests];
    let mut finish = vec![None; n_requests];
    let mut node_errors = Vec::new();
    for e in futures::executor::block_on_stream(ev_rx) {
        match e {
            Event::Token { id, token } => tokens[id as usize].push(token),
            Event::Done { id, finish: f } => finish[id as usize] = Some(f),
            Event::NodeError { node, message } => {
                node_errors.push(format!("node {node}: {message}"))
            }
        }
    }
    let elapsed = start.elapsed();
    for (i, t) in threads.into_iter().enumerate() {
        t.join()
            .map_err(|_| anyhow::anyhow!("node {i} panicked"))??;
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    let mut hop_rtt_ms = Vec::new();
    let mut decode_hop_bytes = None;
    let per_node = (0..n)
        .map(|i| {
            let s = crate::lock(&stats[i]);
            hop_rtt_ms.extend(&s.rtts_ms);
            decode_hop_bytes = decode_hop_bytes.or(s.decode_frame_bytes);
            NodeStats {
                layers: [ranges[i].start, ranges[i].end],
                weight_bytes: stored[i],
                engine_bytes: engine_bytes[i],
                kv_bytes_peak: s.kv_peak,
                peak_batch: s.peak_batch,
            }
        })
        .collect();
    Ok(RingRun {
        tokens,
        finish,
        elapsed,
        per_node,
        hop_rtt_ms,
        decode_hop_bytes,
        node_errors,
    })
}
