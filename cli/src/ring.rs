//! A ring of nodes inside one process, each on its own thread holding only its own layers,
//! linked by real transports (WebRTC data channels over loopback by default). The starter and
//! the nodes are the sans-IO state machines of `mdi_core`; this file only moves their bytes.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use mdi_core::node::{Node, NodeConfig};
use mdi_core::plan::{plan, ModelCost, NodeProfile};
use mdi_core::ring::stage_specs;
use mdi_core::starter::{Event, Finish, SeqRequest, Starter, StarterConfig};
use mdi_core::wire::{self, Message, WireDtype};
use mdi_core::{Config, Oracle, RawTensor, StageEngine, StageWeights};
use mdi_transport::{Inbox, Link};

use crate::Model;

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

/// One node's share, as the summary reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStats {
    pub layers: [usize; 2],
    /// Weight bytes this node read from the model file (stored, quantized size).
    pub weight_bytes: u64,
    pub kv_bytes_peak: usize,
}

/// What a ring run produced.
#[derive(Debug)]
pub struct RingRun {
    /// Per request: generated ids and how it ended.
    pub tokens: Vec<Vec<u32>>,
    pub finish: Vec<Option<Finish>>,
    pub elapsed: Duration,
    pub per_node: Vec<NodeStats>,
    /// Transport latency of decode hops (one token's activations), in milliseconds.
    pub hop_latency_ms: Vec<f64>,
    /// Bytes of the messages of one decode hop.
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

    pub fn hop_latency_p50(&self) -> Option<f64> {
        percentile(&self.hop_latency_ms, 0.5)
    }
}

pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * p).round() as usize])
}

/// Send times of activation messages, keyed by (receiving node, sequence, position, offset),
/// so the receiver can tell how long the transport took. One process, one clock.
#[derive(Default)]
struct HopClock {
    sent: Mutex<HashMap<(usize, u64, u32, u32), Instant>>,
    decode_ms: Mutex<Vec<f64>>,
    decode_bytes: Mutex<Option<usize>>,
}

impl HopClock {
    fn sent(&self, to: usize, msg: &[u8]) {
        if let Ok(Message::Activation(c)) = wire::decode(msg) {
            let mut m = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            m.insert((to, c.seq, c.first_pos, c.offset), Instant::now());
        }
    }

    fn received(&self, at: usize, msg: &[u8]) {
        if let Ok(Message::Activation(c)) = wire::decode(msg) {
            let mut m = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = m.remove(&(at, c.seq, c.first_pos, c.offset)) {
                if c.n_tokens == 1 {
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    self.decode_ms
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(ms);
                    *self.decode_bytes.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.len());
                }
            }
        }
    }
}

/// Links for a ring of `n` positions: `(outgoing of i, incoming of i)`, where i sends to i+1.
async fn ring_links(
    n: usize,
    kind: TransportKind,
) -> Result<(Vec<Link>, Vec<Inbox>, Vec<Box<dyn Send>>)> {
    let mut out: Vec<Link> = Vec::with_capacity(n);
    let mut inb: Vec<Option<Inbox>> = (0..n).map(|_| None).collect();
    let mut keep: Vec<Box<dyn Send>> = Vec::new();
    for i in 0..n {
        let to = (i + 1) % n;
        match kind {
            TransportKind::InProcess => {
                let cfg = mdi_transport::in_process::InProcessConfig::default();
                let (l, r) = mdi_transport::in_process::link(&cfg, &format!("{i}->{to}"));
                out.push(l);
                inb[to] = Some(r);
            }
            TransportKind::WebRtc => {
                let ((a_tx, a_rx), (b_tx, b_rx)) = mdi_transport::webrtc::connect_pair_in_process()
                    .await
                    .with_context(|| format!("linking node {i} to node {to} over WebRTC"))?;
                out.push(a_tx);
                inb[to] = Some(b_rx);
                // The reverse direction is unused; keep it open so the connection stays up.
                keep.push(Box::new((a_rx, b_tx)));
            }
        }
    }
    let inb = inb
        .into_iter()
        .map(|l| l.expect("every inbox made"))
        .collect();
    Ok((out, inb, keep))
}

/// Run `requests` through a ring of `opts.nodes` CPU-oracle nodes.
pub fn run_ring(model: &Model, requests: Vec<SeqRequest>, opts: &RingOptions) -> Result<RingRun> {
    run_ring_with(model, requests, opts, |config, weights| {
        Ok(Oracle::new(config.clone(), weights)?)
    })
}

/// Run `requests` through a ring whose nodes run engines made by `make` from their stage's
/// weights (the CPU oracle, or the GPU engine on a shared device).
pub fn run_ring_with<E>(
    model: &Model,
    requests: Vec<SeqRequest>,
    opts: &RingOptions,
    make: impl Fn(&Config, StageWeights<RawTensor>) -> Result<E>,
) -> Result<RingRun>
where
    E: StageEngine + Send + 'static,
{
    let n = opts.nodes;
    let config = &model.config;
    if n == 0 {
        bail!("a ring needs at least one node");
    }
    // All nodes share this machine: equal speed. Ask for an even spread of weight memory
    // (a 1/N share + 5%) and fall back to no memory limit when the model's pieces cannot be
    // spread that evenly.
    let cost = ModelCost::from_store(model.store.as_ref(), config)?;
    let even = cost.total_weight_bytes() / n as u64 * 105 / 100;
    let partition = plan(
        &cost,
        &vec![
            NodeProfile {
                memory_budget: even,
                speed: 1.0
            };
            n
        ],
        0,
    )
    .or_else(|_| {
        let unlimited = NodeProfile {
            memory_budget: u64::MAX / 4,
            speed: 1.0,
        };
        plan(&cost, &vec![unlimited; n], 0)
    })?;
    let ranges: Vec<_> = partition.nodes.iter().map(|a| a.layers.clone()).collect();
    let specs = stage_specs(&ranges);
    let per_node_weights: Vec<u64> = partition.nodes.iter().map(|a| a.weight_bytes).collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (links, inboxes, keep) = if n > 1 {
        runtime.block_on(ring_links(n, opts.transport))?
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    let max_message = links
        .iter()
        .map(Link::max_message_size)
        .min()
        .unwrap_or(64 * 1024);

    let mut engines = Vec::with_capacity(n);
    for spec in &specs {
        let weights = StageWeights::load(model.store.as_ref(), config, spec)
            .with_context(|| format!("loading layers {:?}", spec.layers))?;
        engines.push(make(config, weights)?);
    }
    let clock = Arc::new(HopClock::default());
    let handle = runtime.handle().clone();
    let n_requests = requests.len();
    let mut engines = engines.into_iter();
    let starter_engine = engines.next().expect("n >= 1");
    let mut links = links.into_iter();
    let mut inboxes = inboxes.into_iter();
    let starter_link = links.next();
    let starter_inbox = inboxes.next();

    // Secondary nodes: receive, compute, send on.
    let mut node_threads = Vec::new();
    for (i, ((engine, link), mut inbox)) in engines.zip(links).zip(inboxes).enumerate() {
        let index = i + 1;
        let cfg = NodeConfig {
            index: index as u32,
            is_last: index + 1 == n,
            hidden: config.hidden,
            wire: opts.wire,
            max_message,
            default_positions: config.context,
            max_tokens: config.context,
            kv_cap_bytes: usize::MAX,
        };
        let (handle, clock) = (handle.clone(), clock.clone());
        node_threads.push(thread::spawn(move || -> Result<usize> {
            let mut node = Node::new(cfg, engine);
            while let Some(msg) = handle.block_on(inbox.recv()) {
                clock.received(index, &msg);
                for out in node.handle(&msg) {
                    clock.sent((index + 1) % n, &out);
                    if handle.block_on(link.send(out)).is_err() {
                        // The next node is gone: the ring is shutting down.
                        return Ok(node.kv_bytes().1);
                    }
                }
            }
            handle.block_on(link.close());
            Ok(node.kv_bytes().1)
        }));
    }

    let starter_cfg = StarterConfig {
        n_nodes: n,
        hidden: config.hidden,
        wire: opts.wire,
        max_message,
        context: config.context,
        in_flight: opts.in_flight.max(1),
    };
    let (events_tx, events_rx) = mpsc::channel::<Event>();
    let start = Instant::now();
    let starter_thread = {
        let (handle, clock) = (handle.clone(), clock.clone());
        thread::spawn(move || -> Result<usize> {
            let mut starter = Starter::new(starter_cfg, starter_engine);
            for (i, r) in requests.into_iter().enumerate() {
                starter.submit(i, r);
            }
            let mut events = Vec::new();
            let mut outgoing = starter.pump(&mut events);
            let mut inbox = starter_inbox;
            loop {
                for e in events.drain(..) {
                    let _ = events_tx.send(e);
                }
                if let Some(link) = &starter_link {
                    for m in outgoing.drain(..) {
                        clock.sent(1 % n, &m);
                        handle
                            .block_on(link.send(m))
                            .map_err(|e| anyhow!("sending to node 1: {e}"))?;
                    }
                }
                if starter.is_idle() {
                    break;
                }
                let Some(inbox) = inbox.as_mut() else {
                    bail!("a one-node ring stalled with sequences in flight");
                };
                let msg = handle
                    .block_on(inbox.recv())
                    .ok_or_else(|| anyhow!("the ring closed with sequences in flight"))?;
                clock.received(0, &msg);
                outgoing = starter.handle(&msg, &mut events);
            }
            if let Some(link) = &starter_link {
                handle.block_on(link.close());
            }
            Ok(starter.kv_bytes().1)
        })
    };

    let mut tokens = vec![Vec::new(); n_requests];
    let mut finish = vec![None; n_requests];
    let mut node_errors = Vec::new();
    for e in events_rx {
        match e {
            Event::Token { index, token } => tokens[index].push(token),
            Event::Done { index, finish: f } => finish[index] = Some(f),
            Event::NodeError { node, message } => {
                node_errors.push(format!("node {node}: {message}"))
            }
        }
    }
    let elapsed = start.elapsed();
    let mut kv_peaks = vec![starter_thread
        .join()
        .map_err(|_| anyhow!("the starter thread panicked"))??];
    for (i, t) in node_threads.into_iter().enumerate() {
        kv_peaks.push(t.join().map_err(|_| anyhow!("node {} panicked", i + 1))??);
    }
    drop(keep);
    runtime.shutdown_timeout(Duration::from_secs(1));
    let per_node = ranges
        .iter()
        .zip(&per_node_weights)
        .zip(&kv_peaks)
        .map(|((r, &w), &k)| NodeStats {
            layers: [r.start, r.end],
            weight_bytes: w,
            kv_bytes_peak: k,
        })
        .collect();
    let hop_latency_ms =
        std::mem::take(&mut *clock.decode_ms.lock().unwrap_or_else(|p| p.into_inner()));
    let decode_hop_bytes = *clock.decode_bytes.lock().unwrap_or_else(|p| p.into_inner());
    Ok(RingRun {
        tokens,
        finish,
        elapsed,
        per_node,
        hop_latency_ms,
        decode_hop_bytes,
        node_errors,
    })
}
