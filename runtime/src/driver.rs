//! The loops that drive the sans-IO [`Starter`] and [`Node`] over real links: they read
//! frames from the previous node, hand jobs to an [`Exec`] and await them, and send frames on
//! to the next node — all at once, so a node keeps reading while it computes and while a send
//! waits for the transport's credit. Nothing here blocks or spawns; the same code runs on a
//! native thread and in a browser tab.
//!
//! Each hop is one link with two directions: frames flow forward; the reverse direction
//! carries the [`Control::Pong`] answers to the pings a node sends now and then, which measure
//! the hop's round trip.
//!
//! Memory stays bounded although frames are read eagerly: each sequence has at most one
//! activation anywhere in the ring, and both state machines bound their sequences.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::channel::mpsc;
use futures::future::{FutureExt, LocalBoxFuture};
use futures::StreamExt;
use mdi_core::node::Node;
use mdi_core::starter::{Event, SeqRequest, Starter};
use mdi_core::wire::{self, Control, Message};
use mdi_transport::{Inbox, Link};
use web_time::Instant;

use crate::exec::{CacheHandle, Exec, RuntimeDone};

/// Seconds between round-trip pings on a busy link.
const PING_EVERY_S: f64 = 0.5;

/// The ends a ring position holds.
#[derive(Default)]
pub struct Hops {
    /// To the next node, and the replies coming back from it.
    pub next: Option<(Link, Inbox)>,
    /// From the previous node, and the link for replying to it.
    pub prev: Option<(Inbox, Link)>,
}

/// What a running driver reports; the session reads it for heartbeats.
#[derive(Debug, Clone, Default)]
pub struct DriverStats {
    /// Tokens through this stage so far (the starter counts sampled tokens).
    pub tokens: u64,
    pub kv_bytes: u64,
    pub sequences: usize,
    pub peak_sequences: usize,
    pub queued: usize,
    pub kv_peak: u64,
    /// Last measured round trip to the next node.
    pub rtt_ms: Option<f64>,
    /// The most recent round trips (at most [`RTTS_KEPT`]).
    pub rtts_ms: Vec<f64>,
    /// Messages sent to the next node.
    pub sent_frames: u64,
    /// Bytes of the message carrying one decode token's activations.
    pub decode_frame_bytes: Option<usize>,
    /// Most jobs run as one batch so far.
    pub peak_batch: usize,
}

/// Round trips kept in [`DriverStats::rtts_ms`].
pub const RTTS_KEPT: usize = 256;

impl DriverStats {
    fn rtt(&mut self, ms: f64) {
        self.rtt_ms = Some(ms);
        if self.rtts_ms.len() == RTTS_KEPT {
            self.rtts_ms.remove(0);
        }
        self.rtts_ms.push(ms);
    }

    fn sending(&mut self, msgs: &[Vec<u8>]) {
        if let [m] = msgs {
            // An activation header says how many tokens it carries (bytes 16..20).
            if m.len() > wire::HEADER_BYTES
                && !wire::is_control(m)
                && m[16..20] == 1u32.to_le_bytes()
            {
                self.decode_frame_bytes = Some(m.len());
            }
        }
    }
}

/// Shared, cheaply cloned view of a driver's stats.
pub type SharedStats = Arc<Mutex<DriverStats>>;

/// Why a driver stopped other than being told to.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("the link to the next node closed: {0}")]
    NextClosed(String),
    #[error("the link from the previous node closed")]
    PrevClosed,
}

/// A queue of messages for one link with at most one send in flight.
struct Outbox {
    link: Link,
    queue: VecDeque<Vec<u8>>,
    sending: Option<LocalBoxFuture<'static, mdi_transport::Result<()>>>,
}

impl Outbox {
    fn new(link: Link) -> Self {
        Self {
            link,
            queue: VecDeque::new(),
            sending: None,
        }
    }

    fn push(&mut self, msgs: impl IntoIterator<Item = Vec<u8>>) {
        self.queue.extend(msgs);
        self.start();
    }

    fn start(&mut self) {
        if self.sending.is_none() {
            if let Some(m) = self.queue.pop_front() {
                let link = self.link.clone();
                self.sending = Some(Box::pin(async move { link.send(m).await }));
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.sending.is_none() && self.queue.is_empty()
    }

    /// Resolves when the send in flight finishes (never, if none is).
    async fn sent(&mut self) -> mdi_transport::Result<()> {
        match self.sending.as_mut() {
            Some(f) => {
                let r = f.await;
                self.sending = None;
                self.start();
                r
            }
            None => futures::future::pending().await,
        }
    }
}

async fn recv_or_pending(inbox: Option<&mut Inbox>) -> Option<Vec<u8>> {
    match inbox {
        Some(i) => i.recv().await,
        None => futures::future::pending().await,
    }
}

/// A batch of jobs in flight on the executor.
type Running = Option<LocalBoxFuture<'static, Vec<RuntimeDone>>>;

async fn run_or_pending(job: &mut Running) -> Vec<RuntimeDone> {
    match job.as_mut() {
        Some(f) => {
            let d = f.await;
            *job = None;
            d
        }
        None => futures::future::pending().await,
    }
}

/// Sends pings to the next node and turns pongs into round trips.
struct Pinger {
    sent: HashMap<u64, Instant>,
    last: Option<Instant>,
    nonce: u64,
}

impl Pinger {
    fn new() -> Self {
        Self {
            sent: HashMap::new(),
            last: None,
            nonce: 0,
        }
    }

    /// A ping to send now, if one is due.
    fn due(&mut self) -> Option<Vec<u8>> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t).as_secs_f64() < PING_EVERY_S)
        {
            return None;
        }
        self.last = Some(now);
        self.nonce += 1;
        // Unanswered pings are forgotten after a few rounds.
        self.sent.retain(|&n, _| n + 4 > self.nonce);
        self.sent.insert(self.nonce, now);
        Some(wire::encode_control(&Control::Ping { nonce: self.nonce }))
    }

    fn pong(&mut self, msg: &[u8]) -> Option<f64> {
        match wire::decode(msg) {
            Ok(Message::Control(Control::Pong { nonce })) => self
                .sent
                .remove(&nonce)
                .map(|t| t.elapsed().as_secs_f64() * 1e3),
            _ => None,
        }
    }
}

/// A ping from the previous node, answered with this pong.
fn pong_for(msg: &[u8]) -> Option<Vec<u8>> {
    if !wire::is_control(msg) {
        return None;
    }
    match wire::decode(msg) {
        Ok(Message::Control(Control::Ping { nonce })) => {
            Some(wire::encode_control(&Control::Pong { nonce }))
        }
        _ => None,
    }
}

fn lock(stats: &SharedStats) -> std::sync::MutexGuard<'_, DriverStats> {
    stats.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drives a secondary node until its previous link closes (Ok) or its next link fails.
pub async fn run_node(
    mut node: Node<CacheHandle>,
    exec: &dyn Exec,
    hops: Hops,
    stats: SharedStats,
) -> Result<(), DriverError> {
    let (Some((next, mut next_back)), Some((mut prev, prev_back))) = (hops.next, hops.prev) else {
        return Err(DriverError::PrevClosed);
    };
    let mut out = Outbox::new(next);
    let mut replies = Outbox::new(prev_back);
    let mut running: Running = None;
    let mut pinger = Pinger::new();
    let mut back_open = true;
    enum Wake {
        Done(Vec<RuntimeDone>),
        Sent(mdi_transport::Result<()>),
        Replied(mdi_transport::Result<()>),
        Back(Option<Vec<u8>>),
        Msg(Option<Vec<u8>>),
    }
    loop {
        if running.is_none() {
            // Several sequences ready at once (S > N) run as one batch: each weight is read
            // once for all of them.
            let jobs = node.next_jobs(exec.max_batch());
            if !jobs.is_empty() {
                let mut s = lock(&stats);
                s.peak_batch = s.peak_batch.max(jobs.len());
                drop(s);
                running = Some(exec.submit_batch(jobs));
            }
        }
        {
            // After every event: an `End` frees KV as surely as a job fills it.
            let st = node.stats();
            let mut s = lock(&stats);
            s.tokens = st.tokens;
            s.kv_bytes = st.kv_bytes as u64;
            s.kv_peak = st.kv_peak as u64;
            s.sequences = st.sequences;
            s.peak_sequences = s.peak_sequences.max(st.sequences);
            s.queued = st.queued;
        }
        let wake = futures::select_biased! {
            d = run_or_pending(&mut running).fuse() => Wake::Done(d),
            r = out.sent().fuse() => Wake::Sent(r),
            r = replies.sent().fuse() => Wake::Replied(r),
            m = recv_or_pending(back_open.then_some(&mut next_back)).fuse() => Wake::Back(m),
            m = prev.recv().fuse() => Wake::Msg(m),
        };
        match wake {
            Wake::Done(batch) => {
                let mut msgs = Vec::new();
                for done in batch {
                    msgs.extend(node.complete(done));
                }
                if !msgs.is_empty() {
                    out.push(pinger.due());
                }
                lock(&stats).sending(&msgs);
                out.push(msgs);
            }
            Wake::Sent(r) => {
                if let Err(e) = r {
                    return Err(DriverError::NextClosed(e.to_string()));
                }
                lock(&stats).sent_frames += 1;
            }
            Wake::Replied(r) => {
                // A previous node that stopped reading replies is not fatal: frames still flow.
                if r.is_err() {
                    replies.queue.clear();
                }
            }
            Wake::Back(Some(m)) => {
                if let Some(ms) = pinger.pong(&m) {
                    lock(&stats).rtt(ms);
                }
            }
            Wake::Back(None) => back_open = false,
            Wake::Msg(Some(m)) => match pong_for(&m) {
                Some(p) => replies.push([p]),
                None => {
                    let msgs = node.handle(&m);
                    out.push(msgs);
                }
            },
            Wake::Msg(None) => {
                // The ring is being torn down: pass on what is queued, then stop.
                while !out.is_idle() {
                    if out.sent().await.is_err() {
                        break;
                    }
                }
                out.link.close().await;
                return Ok(());
            }
        }
    }
}

/// Work for the starter from the outside (the API, a local caller).
#[derive(Debug)]
pub enum Command {
    Submit { id: u64, req: SeqRequest },
    Cancel { id: u64 },
}

/// Drives the starter. Requests come in through `commands`; every [`Event`] goes out through
/// `events` as it happens. Returns when `commands` has closed and nothing is left in flight,
/// or with an error when a link fails.
pub async fn run_starter(
    mut starter: Starter<CacheHandle>,
    exec: &dyn Exec,
    hops: Hops,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    stats: SharedStats,
) -> Result<(), DriverError> {
    let (mut out, mut next_back) = match hops.next {
        Some((l, b)) => (Some(Outbox::new(l)), Some(b)),
        None => (None, None),
    };
    let (mut prev, mut replies) = match hops.prev {
        Some((i, l)) => (Some(i), Some(Outbox::new(l))),
        None => (None, None),
    };
    let ring = out.is_some();
    let mut running: Running = None;
    let mut commands_open = true;
    let mut pinger = Pinger::new();
    let mut evs = Vec::new();
    loop {
        for e in evs.drain(..) {
            // A dropped receiver means nobody listens any more; keep serving the ring.
            let _ = events.unbounded_send(e);
        }
        {
            let mut s = lock(&stats);
            s.tokens = starter.tokens();
            s.kv_bytes = starter.kv_bytes().0 as u64;
            s.kv_peak = starter.kv_bytes().1 as u64;
            s.sequences = starter.in_flight();
            s.peak_sequences = s.peak_sequences.max(starter.in_flight());
            s.queued = starter.queued();
        }
        if running.is_none() {
            let jobs = starter.next_jobs(exec.max_batch());
            if !jobs.is_empty() {
                let mut s = lock(&stats);
                s.peak_batch = s.peak_batch.max(jobs.len());
                drop(s);
                running = Some(exec.submit_batch(jobs));
            }
        }
        if !commands_open
            && starter.is_idle()
            && running.is_none()
            && out.as_ref().is_none_or(Outbox::is_idle)
        {
            if let Some(o) = &out {
                o.link.close().await;
            }
            // Let the ring wind down: the last `End`s are still on their way back, and the last
            // node must be able to deliver them. The previous node closes once the close has
            // travelled around.
            if let Some(p) = prev.as_mut() {
                while p.recv().await.is_some() {}
            }
            return Ok(());
        }
        let sent = async {
            match out.as_mut() {
                Some(o) => o.sent().await,
                None => futures::future::pending().await,
            }
        };
        let replied = async {
            match replies.as_mut() {
                Some(o) => o.sent().await,
                None => futures::future::pending().await,
            }
        };
        enum Wake {
            Done(Vec<RuntimeDone>),
            Sent(mdi_transport::Result<()>),
            Replied,
            Back(Option<Vec<u8>>),
            Msg(Option<Vec<u8>>),
            Cmd(Option<Command>),
        }
        let wake = futures::select_biased! {
            d = run_or_pending(&mut running).fuse() => Wake::Done(d),
            r = sent.fuse() => Wake::Sent(r),
            _ = replied.fuse() => Wake::Replied,
            m = recv_or_pending(next_back.as_mut()).fuse() => Wake::Back(m),
            m = recv_or_pending(prev.as_mut()).fuse() => Wake::Msg(m),
            c = async {
                if commands_open { commands.next().await } else { futures::future::pending().await }
            }.fuse() => Wake::Cmd(c),
        };
        let msgs = match wake {
            Wake::Done(batch) => {
                let mut msgs = Vec::new();
                for d in batch {
                    msgs.extend(starter.complete(d, &mut evs));
                }
                lock(&stats).sending(&msgs);
                if ring && !msgs.is_empty() {
                    if let (Some(o), Some(p)) = (out.as_mut(), pinger.due()) {
                        o.push([p]);
                    }
                }
                msgs
            }
            Wake::Sent(r) => {
                if let Err(e) = r {
                    return Err(DriverError::NextClosed(e.to_string()));
                }
                lock(&stats).sent_frames += 1;
                Vec::new()
            }
            Wake::Replied => Vec::new(),
            Wake::Back(Some(m)) => {
                if let Some(ms) = pinger.pong(&m) {
                    lock(&stats).rtt(ms);
                }
                Vec::new()
            }
            Wake::Back(None) => {
                next_back = None;
                Vec::new()
            }
            Wake::Msg(Some(m)) => match (pong_for(&m), replies.as_mut()) {
                (Some(p), Some(r)) => {
                    r.push([p]);
                    Vec::new()
                }
                _ => starter.handle(&m, &mut evs),
            },
            Wake::Msg(None) => return Err(DriverError::PrevClosed),
            Wake::Cmd(Some(Command::Submit { id, req })) => {
                starter.submit(id, req);
                starter.pump(&mut evs)
            }
            Wake::Cmd(Some(Command::Cancel { id })) => starter.cancel(id, &mut evs),
            Wake::Cmd(None) => {
                commands_open = false;
                Vec::new()
            }
        };
        if let Some(o) = out.as_mut() {
            o.push(msgs);
        }
    }
}
