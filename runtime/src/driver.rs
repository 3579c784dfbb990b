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
//! activation anywhere in the ring, and both state machines bound their sequences. Against a
//! peer that does not play by those rules: a node stops reading its previous node while more
//! than [`OUT_HIGH_BYTES`] wait to go to the next one (the starter always reads, so the ring
//! cannot deadlock on it), replies wait in a short queue, and a message a link refuses as too
//! large is dropped with a warning instead of ending the loop.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::channel::mpsc;
use futures::future::{FutureExt, LocalBoxFuture};
use futures::StreamExt;
use mdi_core::node::Node;
use mdi_core::starter::{Event, SeqRequest, Starter};
use mdi_core::wire::{self, Control, Message};
use mdi_transport::{Inbox, Link};
use web_time::{Duration, Instant};

use crate::exec::{CacheHandle, Exec, RuntimeDone};
use crate::lock;

/// Seconds between round-trip pings on a busy link.
const PING_EVERY_S: f64 = 0.5;
/// A node reads no more from its previous node while this many bytes wait for the next link.
pub const OUT_HIGH_BYTES: usize = 8 << 20;
/// Pongs waiting for a previous node that does not read them; more are dropped.
const MAX_REPLIES: usize = 16;

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
    /// Seconds the engine spent on this driver's steps.
    pub busy_s: f64,
    /// Steps run, and the jobs (one sequence's input each) they carried.
    pub steps: u64,
    pub jobs: u64,
    /// Each step's seconds times its jobs, summed: the time sequences spent inside steps.
    pub job_busy_s: f64,
    /// Messages from the previous node that could not be read or tied to a live sequence.
    pub garbage: u64,
    /// The last such message's error.
    pub last_garbage: Option<String>,
    /// Bytes of activations the state machine holds (received, not yet run).
    pub held_bytes: u64,
    /// Messages dropped because a link refused them as too large.
    pub oversized: u64,
}

/// The `p` quantile (0..=1) of `xs`, the nearest sample; `None` when there are none.
pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * p).round() as usize])
}

/// Round trips kept in [`DriverStats::rtts_ms`].
pub const RTTS_KEPT: usize = 256;

/// Round trips the reported one is the median of: 8 s of pings.
pub const RTTS_REPORTED: usize = 16;

impl DriverStats {
    /// The median of the last [`RTTS_REPORTED`] round trips: one ping that waited behind a
    /// step of a throttled node moves the last sample, not this.
    pub fn recent_rtt_ms(&self) -> Option<f64> {
        let from = self.rtts_ms.len().saturating_sub(RTTS_REPORTED);
        percentile(&self.rtts_ms[from..], 0.5)
    }

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
    /// Bytes in `queue` and in flight.
    bytes: usize,
    sending: Option<LocalBoxFuture<'static, (usize, mdi_transport::Result<()>)>>,
    /// Messages the link refused as too large, dropped.
    oversized: u64,
}

impl Outbox {
    fn new(link: Link) -> Self {
        Self {
            link,
            queue: VecDeque::new(),
            bytes: 0,
            sending: None,
            oversized: 0,
        }
    }

    fn push(&mut self, msgs: impl IntoIterator<Item = Vec<u8>>) {
        for m in msgs {
            self.bytes += m.len();
            self.queue.push_back(m);
        }
        self.start();
    }

    fn start(&mut self) {
        if self.sending.is_none() {
            if let Some(m) = self.queue.pop_front() {
                let link = self.link.clone();
                let len = m.len();
                self.sending = Some(Box::pin(async move { (len, link.send(m).await) }));
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.sending.is_none() && self.queue.is_empty()
    }

    /// Resolves when the send in flight finishes (never, if none is). A message the link
    /// refuses as too large is dropped (the state machines size theirs to the link, so this is
    /// a bug or a peer's oversized control message, and it must not end the loop).
    async fn sent(&mut self) -> mdi_transport::Result<()> {
        match self.sending.as_mut() {
            Some(f) => {
                let (len, r) = f.await;
                self.sending = None;
                self.bytes -= len;
                self.start();
                match r {
                    Err(e @ mdi_transport::Error::MessageTooLarge { .. }) => {
                        tracing::warn!("dropped a message: {e}");
                        self.oversized += 1;
                        Ok(())
                    }
                    r => r,
                }
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

/// How a driver forms batches. With more sequences in flight than the ring has stages
/// (S > N), each stage can run S / N of them as one batch, reading its weights once for all;
/// but sequences that reach a stage a little apart would each run alone, and a ring settles
/// into that as easily as into batches. So a stage holding fewer ready sequences than its
/// share waits, at most half a step (and [`MAX_LINGER`]), for the rest: once a batch has
/// formed its sequences travel on together, and the wait is not needed again.
///
/// A stage also runs no more than its share at once. Sequences that reach it together (all
/// requests arriving at one moment, or two batches caught up in a queue) would otherwise run
/// as one batch and then travel the ring as one clump, with one stage busy and the others
/// waiting for it; a share at a time, they spread into N batches that keep every stage
/// busy, and the prompts of many requests arriving together are prefilled in a pipeline
/// rather than by each stage in turn.
pub struct Batching<'a> {
    stages: usize,
    sleep: Box<dyn Fn(Duration) -> LocalBoxFuture<'static, ()> + 'a>,
}

/// The longest wait for a batch to fill.
pub const MAX_LINGER: Duration = Duration::from_millis(25);

impl<'a> Batching<'a> {
    /// Batches of `in flight / stages` sequences; `sleep` is the platform's timer.
    pub fn new(
        stages: usize,
        sleep: impl Fn(Duration) -> LocalBoxFuture<'static, ()> + 'a,
    ) -> Self {
        Self {
            stages: stages.max(1),
            sleep: Box::new(sleep),
        }
    }

    /// Runs whatever is ready, never waiting.
    pub fn greedy() -> Self {
        Self::new(usize::MAX, |_| Box::pin(futures::future::pending()))
    }

    fn is_greedy(&self) -> bool {
        self.stages == usize::MAX
    }

    /// The most sequences to run in one step, with `here` in flight at this stage: its share
    /// (all that are ready when batching greedily).
    fn share(&self, here: usize, max_batch: usize) -> usize {
        let max_batch = max_batch.max(1);
        if self.is_greedy() {
            return max_batch;
        }
        here.div_ceil(self.stages).clamp(1, max_batch)
    }
}

enum LingerState {
    Idle,
    Waiting,
    Expired,
}

/// A stage's wait for its batch to fill (see [`Batching`]).
struct Linger {
    state: LingerState,
    timer: Option<LocalBoxFuture<'static, ()>>,
    /// How long the last batch took.
    last_step: Option<Duration>,
}

impl Linger {
    fn new() -> Self {
        Self {
            state: LingerState::Idle,
            timer: None,
            last_step: None,
        }
    }

    /// Whether to run the `ready` sequences now, of `here` in flight at this stage.
    fn run_now(&mut self, b: &Batching<'_>, ready: usize, here: usize, max_batch: usize) -> bool {
        if ready == 0 {
            return false;
        }
        if b.is_greedy() {
            return true;
        }
        let want = b.share(here, max_batch);
        let step = self.last_step.map(|s| (s / 2).min(MAX_LINGER));
        match (step, &self.state) {
            (Some(wait), LingerState::Idle) if ready < want && !wait.is_zero() => {
                self.state = LingerState::Waiting;
                self.timer = Some((b.sleep)(wait));
                false
            }
            (_, LingerState::Waiting) if ready < want => false,
            _ => {
                self.state = LingerState::Idle;
                self.timer = None;
                true
            }
        }
    }

    fn expired(&mut self) {
        self.state = LingerState::Expired;
        self.timer = None;
    }
}

/// A step of `jobs` jobs that began at `started` is done: its time goes to the linger and the
/// busy seconds, and `started` now marks the start of the idle time before the next step.
fn step_done(linger: &mut Linger, started: &mut Instant, stats: &SharedStats, jobs: usize) {
    let took = started.elapsed();
    linger.last_step = Some(took);
    let mut s = lock(stats);
    s.busy_s += took.as_secs_f64();
    s.steps += 1;
    s.jobs += jobs as u64;
    s.job_busy_s += took.as_secs_f64() * jobs as f64;
    drop(s);
    tracing::debug!("step took {took:?}");
    *started = Instant::now();
}

async fn linger_or_pending(timer: &mut Option<LocalBoxFuture<'static, ()>>) {
    match timer.as_mut() {
        Some(t) => t.await,
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

/// Messages the starter takes from its previous link at once, before its next step.
const MAX_TAKEN: usize = 64;

/// Drives a secondary node until its previous link closes (Ok) or its next link fails.
pub async fn run_node(
    mut node: Node<CacheHandle>,
    exec: &dyn Exec,
    hops: Hops,
    stats: SharedStats,
    batching: Batching<'_>,
) -> Result<(), DriverError> {
    let (Some((next, mut next_back)), Some((mut prev, prev_back))) = (hops.next, hops.prev) else {
        return Err(DriverError::PrevClosed);
    };
    let mut out = Outbox::new(next);
    let mut replies = Outbox::new(prev_back);
    let mut running: Running = None;
    let mut pinger = Pinger::new();
    let mut back_open = true;
    let mut linger = Linger::new();
    let mut started = Instant::now();
    enum Wake {
        Done(Vec<RuntimeDone>),
        Sent(mdi_transport::Result<()>),
        Replied(mdi_transport::Result<()>),
        Back(Option<Vec<u8>>),
        Msg(Option<Vec<u8>>),
        Linger,
    }
    loop {
        let st = node.stats();
        if running.is_none() && linger.run_now(&batching, st.queued, st.sequences, exec.max_batch())
        {
            // Several sequences ready at once (S > N) run as one batch, up to this stage's
            // share of those in flight: each weight is read once for all of them.
            let jobs = node.next_jobs(batching.share(st.sequences, exec.max_batch()));
            if !jobs.is_empty() {
                let mut s = lock(&stats);
                s.peak_batch = s.peak_batch.max(jobs.len());
                drop(s);
                tracing::debug!("step of {} after {:?} idle", jobs.len(), started.elapsed());
                started = Instant::now();
                running = Some(exec.submit_batch(jobs));
            }
        }
        {
            // After every event: an `End` frees KV as surely as a job fills it.
            let st = node.stats();
            let mut s = lock(&stats);
            s.tokens = st.tokens;
            s.kv_bytes = st.kv_bytes;
            s.kv_peak = st.kv_peak;
            s.sequences = st.sequences;
            s.peak_sequences = s.peak_sequences.max(st.sequences);
            s.queued = st.queued;
            s.held_bytes = st.held_bytes;
            s.oversized = out.oversized + replies.oversized;
            if st.garbage != s.garbage {
                s.garbage = st.garbage;
                s.last_garbage = node.garbage().1.map(str::to_string);
            }
        }
        // Backpressure on the previous node while the next one is slow to take our output.
        let reading = out.bytes <= OUT_HIGH_BYTES;
        let wake = futures::select_biased! {
            d = run_or_pending(&mut running).fuse() => Wake::Done(d),
            r = out.sent().fuse() => Wake::Sent(r),
            r = replies.sent().fuse() => Wake::Replied(r),
            m = recv_or_pending(back_open.then_some(&mut next_back)).fuse() => Wake::Back(m),
            m = recv_or_pending(reading.then_some(&mut prev)).fuse() => Wake::Msg(m),
            _ = linger_or_pending(&mut linger.timer).fuse() => Wake::Linger,
        };
        match wake {
            Wake::Linger => linger.expired(),
            Wake::Done(batch) => {
                step_done(&mut linger, &mut started, &stats, batch.len());
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
                    let dropped: usize = replies.queue.drain(..).map(|m| m.len()).sum();
                    replies.bytes -= dropped;
                }
            }
            Wake::Back(Some(m)) => {
                if let Some(ms) = pinger.pong(&m) {
                    lock(&stats).rtt(ms);
                }
            }
            Wake::Back(None) => back_open = false,
            Wake::Msg(Some(m)) => match pong_for(&m) {
                // A previous node that pings without reading the pongs gets no more of them.
                Some(p) if replies.queue.len() < MAX_REPLIES => replies.push([p]),
                Some(_) => {}
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
    batching: Batching<'_>,
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
    let mut linger = Linger::new();
    let mut started = Instant::now();
    loop {
        for e in evs.drain(..) {
            // A dropped receiver means nobody listens any more; keep serving the ring.
            let _ = events.unbounded_send(e);
        }
        {
            let mut s = lock(&stats);
            s.tokens = starter.tokens();
            s.kv_bytes = starter.kv_bytes().0;
            s.kv_peak = starter.kv_bytes().1;
            s.garbage = starter.garbage();
            s.sequences = starter.in_flight();
            s.peak_sequences = s.peak_sequences.max(starter.in_flight());
            s.queued = starter.queued();
        }
        if running.is_none()
            && linger.run_now(
                &batching,
                starter.ready_jobs(),
                starter.in_flight(),
                exec.max_batch(),
            )
        {
            let jobs = starter.next_jobs(
                batching.share(starter.in_flight(), exec.max_batch()),
                exec.max_batch(),
            );
            if !jobs.is_empty() {
                let mut s = lock(&stats);
                s.peak_batch = s.peak_batch.max(jobs.len());
                drop(s);
                tracing::debug!(
                    "step of {} ({} heads) after {:?} idle",
                    jobs.len(),
                    jobs.iter()
                        .filter(|j| matches!(j.task, mdi_core::engine::Task::Head { .. }))
                        .count(),
                    started.elapsed()
                );
                started = Instant::now();
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
            Linger,
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
            _ = linger_or_pending(&mut linger.timer).fuse() => Wake::Linger,
        };
        let msgs = match wake {
            Wake::Linger => {
                linger.expired();
                Vec::new()
            }
            Wake::Done(batch) => {
                step_done(&mut linger, &mut started, &stats, batch.len());
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
            Wake::Msg(Some(first)) => {
                // A batch comes back as one message per sequence. Those already here are
                // taken before the next step starts, or that step would run the first one's
                // head with other work (ready jobs then reach the share) and split the batch.
                let mut msgs = Vec::new();
                let mut m = first;
                for taken in 1.. {
                    match (pong_for(&m), replies.as_mut()) {
                        (Some(p), Some(r)) => {
                            if r.queue.len() < MAX_REPLIES {
                                r.push([p]);
                            }
                        }
                        _ => msgs.extend(starter.handle(&m, &mut evs)),
                    }
                    // Only what is already here; an end of the link is left for the next
                    // wait to see.
                    let here = prev.as_mut().and_then(|p| p.recv().now_or_never());
                    match here.flatten() {
                        Some(next) if taken < MAX_TAKEN => m = next,
                        _ => break,
                    }
                }
                msgs
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use mdi_core::node::NodeConfig;
    use mdi_core::wire::WireDtype;
    use mdi_transport::in_process::{pair, InProcessConfig};

    #[test]
    fn the_reported_round_trip_is_the_median_of_the_recent_ones() {
        let mut s = DriverStats::default();
        assert_eq!(s.recent_rtt_ms(), None);
        for ms in [40.0, 41.0, 39.0] {
            s.rtt(ms);
        }
        for i in 0..RTTS_REPORTED {
            s.rtt(if i % 4 == 3 {
                30.0
            } else {
                4.0 + i as f64 * 0.01
            });
        }
        // The old round trips fell out of the window; the slow quarter does not set it.
        let r = s.recent_rtt_ms().unwrap();
        assert!((4.0..4.2).contains(&r), "{r}");
        assert_eq!(s.rtt_ms, Some(30.0));
    }

    /// Runs no jobs: the frames of these tests never make one.
    struct NoJobs;

    #[test]
    fn a_stage_waits_for_its_share_of_the_sequences_then_runs_what_it_has() {
        let timers = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let t = timers.clone();
        let b = Batching::new(2, move |d| {
            t.borrow_mut().push(d);
            Box::pin(futures::future::pending())
        });
        let mut l = Linger::new();
        // Nothing measured yet: no idea how long a wait may be, so none.
        assert!(l.run_now(&b, 1, 4, 8));
        l.last_step = Some(Duration::from_millis(10));
        // 4 sequences over 2 stages: 2 make a batch; 1 waits half a step for the other.
        assert!(!l.run_now(&b, 1, 4, 8));
        assert_eq!(*timers.borrow(), [Duration::from_millis(5)]);
        assert!(l.timer.is_some());
        assert!(!l.run_now(&b, 1, 4, 8), "still waiting");
        assert!(l.run_now(&b, 2, 4, 8), "the batch is complete");
        assert!(l.timer.is_none());
        // The wait runs out: what is ready runs.
        assert!(!l.run_now(&b, 1, 4, 8));
        l.expired();
        assert!(l.run_now(&b, 1, 4, 8));
        // Nothing ready: nothing to run; as many sequences as stages: never a wait; the
        // engine's batch limit caps the share; a long step waits at most MAX_LINGER.
        assert!(!l.run_now(&b, 0, 4, 8));
        assert!(l.run_now(&b, 1, 2, 8));
        assert!(l.run_now(&b, 1, 4, 1));
        l.last_step = Some(Duration::from_secs(2));
        assert!(!l.run_now(&b, 1, 4, 8));
        assert_eq!(timers.borrow().last(), Some(&MAX_LINGER));
        assert_eq!(timers.borrow().len(), 3);
        // Greedy: never waits.
        let mut g = Linger::new();
        g.last_step = Some(Duration::from_millis(10));
        assert!(g.run_now(&Batching::greedy(), 1, 64, 8));
    }

    #[test]
    fn a_step_runs_at_most_its_share_of_the_sequences() {
        let b = Batching::new(4, |_| Box::pin(futures::future::pending()));
        // 8 sequences over 4 stages: 2 a step (8 arriving together become 4 batches).
        assert_eq!(b.share(8, 8), 2);
        assert_eq!(b.share(9, 8), 3);
        // Fewer sequences than stages: one at a time; many: the engine's limit.
        assert_eq!(b.share(3, 8), 1);
        assert_eq!(b.share(0, 8), 1);
        assert_eq!(b.share(64, 8), 8);
        assert_eq!(b.share(64, 0), 1);
        // One stage: everything in flight; greedy: all that is ready, up to the limit.
        assert_eq!(
            Batching::new(1, |_| Box::pin(futures::future::pending())).share(6, 8),
            6
        );
        assert_eq!(Batching::greedy().share(1, 8), 8);
    }

    /// A one-job batch's result, for test engines that implement only batches.
    fn one_of(
        mut batch: LocalBoxFuture<'static, Vec<RuntimeDone>>,
    ) -> LocalBoxFuture<'static, RuntimeDone> {
        Box::pin(async move { batch.as_mut().await.pop().expect("one job, one result") })
    }

    /// Records each step's batch size and holds the step until the test lets it finish;
    /// outputs are hidden rows of zeros (no cache comes back: the node ends those
    /// sequences, which these tests do not look at).
    struct Gate {
        sizes: std::rc::Rc<std::cell::RefCell<Vec<usize>>>,
        open: std::rc::Rc<std::cell::Cell<usize>>,
        hidden: usize,
    }

    impl Exec for Gate {
        fn submit(&self, job: crate::exec::RuntimeJob) -> LocalBoxFuture<'static, RuntimeDone> {
            one_of(self.submit_batch(vec![job]))
        }
        fn submit_batch(
            &self,
            jobs: Vec<crate::exec::RuntimeJob>,
        ) -> LocalBoxFuture<'static, Vec<RuntimeDone>> {
            let step = {
                let mut sizes = self.sizes.borrow_mut();
                sizes.push(jobs.len());
                sizes.len()
            };
            let (open, hidden) = (self.open.clone(), self.hidden);
            Box::pin(async move {
                // Until the test has opened this many steps.
                futures::future::poll_fn(|cx| {
                    if open.get() >= step {
                        std::task::Poll::Ready(())
                    } else {
                        cx.waker().wake_by_ref();
                        std::task::Poll::Pending
                    }
                })
                .await;
                jobs.into_iter()
                    .map(|j| mdi_core::engine::Done {
                        seq: j.seq,
                        cache: None,
                        output: Ok(mdi_core::StageOutput::Hidden(vec![0.0; hidden])),
                    })
                    .collect()
            })
        }
        fn max_batch(&self) -> usize {
            8
        }
        fn kv_bytes_per_position(&self) -> usize {
            64
        }
        fn weight_bytes(&self) -> u64 {
            0
        }
        fn describe(&self) -> String {
            "gate".into()
        }
    }

    /// Resolves once `done` holds (polled again at every turn of the executor).
    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let started = Instant::now();
        futures::future::poll_fn(|cx| {
            assert!(started.elapsed() < Duration::from_secs(10), "never {what}");
            if done() {
                std::task::Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// Records each step's (heads, feeds) and finishes it at once, as a starter's engine.
    struct Recorder {
        steps: std::rc::Rc<std::cell::RefCell<Vec<(usize, usize)>>>,
        hidden: usize,
    }

    impl Exec for Recorder {
        fn submit(&self, job: crate::exec::RuntimeJob) -> LocalBoxFuture<'static, RuntimeDone> {
            one_of(self.submit_batch(vec![job]))
        }
        fn submit_batch(
            &self,
            jobs: Vec<crate::exec::RuntimeJob>,
        ) -> LocalBoxFuture<'static, Vec<RuntimeDone>> {
            use mdi_core::engine::{CacheSlot, JobInput, Task};
            let heads = jobs
                .iter()
                .filter(|j| matches!(j.task, Task::Head { .. }))
                .count();
            self.steps.borrow_mut().push((heads, jobs.len() - heads));
            let hidden = self.hidden;
            let done: Vec<RuntimeDone> = jobs
                .into_iter()
                .map(|j| match j.task {
                    Task::Head { .. } => mdi_core::engine::Done {
                        seq: j.seq,
                        cache: None,
                        output: Ok(mdi_core::StageOutput::Token(7)),
                    },
                    Task::Forward { cache, input, .. } => {
                        let n = match input {
                            JobInput::Tokens(t) => t.len(),
                            JobInput::Hidden(h) => h.len() / hidden,
                        };
                        let cache = match cache {
                            CacheSlot::Lent(c) => c,
                            CacheSlot::New { .. } => crate::exec::CacheHandle::detached(j.seq),
                        };
                        mdi_core::engine::Done {
                            seq: j.seq,
                            cache: Some(cache),
                            output: Ok(mdi_core::StageOutput::Hidden(vec![0.5; n * hidden])),
                        }
                    }
                })
                .collect();
            Box::pin(async move { done })
        }
        fn max_batch(&self) -> usize {
            8
        }
        fn kv_bytes_per_position(&self) -> usize {
            64
        }
        fn weight_bytes(&self) -> u64 {
            0
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    /// A batch comes back to the starter as one message per sequence. Two that arrive
    /// together while a feed waits for its batch run in one step with it: taking the first
    /// alone brought the ready jobs up to the share, and the step split the batch.
    #[test]
    fn heads_that_come_back_together_run_in_one_step() {
        use mdi_core::sampling::SamplingParams;
        use mdi_core::starter::StarterConfig;
        let hidden = 8;
        let ((next, next_back), (_pong_tx, mut next_in)) = pair(&Default::default());
        let ((prev_tx, _replies_in), (replies_tx, prev_in)) = pair(&Default::default());
        let starter = Starter::new(StarterConfig {
            n_nodes: 2,
            hidden,
            wire: WireDtype::F32,
            max_message: 64 * 1024,
            context: 64,
            in_flight: 8,
            kv_bytes_per_position: 64,
            kv_cap_bytes: 1 << 20,
        });
        let steps = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let exec = Recorder {
            steps: steps.clone(),
            hidden,
        };
        let (commands, commands_rx) = mpsc::unbounded();
        let (events, _events_rx) = mpsc::unbounded();
        let stats: SharedStats = Arc::new(Mutex::new(DriverStats::default()));
        let hops = Hops {
            next: Some((next, next_back)),
            prev: Some((prev_in, replies_tx)),
        };
        // Two stages: three or four sequences in flight make a share of two.
        let batching = Batching::new(2, |_| Box::pin(futures::future::pending()));
        let run = run_starter(
            starter,
            &exec,
            hops,
            commands_rx,
            events,
            stats.clone(),
            batching,
        );
        let submit = |id: u64| {
            let req = SeqRequest {
                prompt_tokens: vec![1, 2],
                max_tokens: 4,
                params: SamplingParams::default(),
                eos_ids: Vec::new(),
            };
            commands
                .unbounded_send(Command::Submit { id, req })
                .unwrap();
        };
        let mut before = 0;
        let ring = async {
            for id in 0..3 {
                submit(id);
            }
            // The first two run as they come (a share of one); the third arrives with three in
            // flight, a share of two, and waits for a partner.
            let mut fed = Vec::new();
            while fed.len() < 2 {
                let m = next_in.recv().await.expect("the starter's output");
                if let Ok(Message::Activation(a)) = wire::decode(&m) {
                    fed.push(a.seq);
                }
            }
            wait_for("took the third", || lock(&stats).sequences == 3).await;
            before = steps.borrow().len();
            // The two come back at once, as the last node sends a batch.
            let row = vec![0.25f32; hidden];
            for &seq in &fed {
                for m in wire::encode_activation(seq, 1, hidden, &row, WireDtype::F32, usize::MAX) {
                    prev_tx.send(m).await.unwrap();
                }
            }
            wait_for("ran a step", || steps.borrow().len() > before).await;
        };
        futures::executor::block_on(futures::future::select(Box::pin(run), Box::pin(ring)));
        // Before, that step was (1, 1): the first head with the waiting feed, and the other
        // head ran alone after it.
        assert_eq!(steps.borrow()[before], (2, 1), "steps {:?}", steps.borrow());
    }

    /// Eight sequences in flight on a four-stage ring: seven that arrive while a step runs
    /// are not run as one batch of seven (they would travel on as one clump) but two at a
    /// time, their share.
    #[test]
    fn sequences_arriving_together_run_in_batches_of_their_share() {
        let hidden = 8;
        let ((next, next_back_tx), (next_back_rx_prev, _next_in)) = pair(&Default::default());
        let ((prev_tx, prev_back), (prev_back_tx, prev_in)) = pair(&Default::default());
        let node = Node::new(NodeConfig {
            index: 1,
            is_last: false,
            hidden,
            wire: WireDtype::F32,
            max_message: 64 * 1024,
            max_positions: 16,
            max_tokens: 16,
            max_sequences: 8,
            max_partials: 8,
            max_held_bytes: 1 << 20,
            kv_bytes_per_position: 64,
            kv_cap_bytes: 1 << 20,
        });
        let gate = Gate {
            sizes: Default::default(),
            open: Default::default(),
            hidden,
        };
        let (sizes, open) = (gate.sizes.clone(), gate.open.clone());
        let stats: SharedStats = Arc::new(Mutex::new(DriverStats::default()));
        let hops = Hops {
            next: Some((next, next_back_tx)),
            prev: Some((prev_in, prev_back_tx)),
        };
        let _keep = (next_back_rx_prev, prev_back);
        let batching = Batching::new(4, |_| Box::pin(futures::future::pending()));
        let run = run_node(node, &gate, hops, stats.clone(), batching);
        let row = vec![0.5f32; hidden];
        let activation =
            |seq: u64| wire::encode_activation(seq, 0, hidden, &row, WireDtype::F32, usize::MAX);
        let feed = async {
            for seq in 1..=8u64 {
                let start = wire::encode_control(&Control::Start { seq, positions: 16 });
                prev_tx.send(start).await.unwrap();
            }
            for f in activation(1) {
                prev_tx.send(f).await.unwrap();
            }
            wait_for("ran the first sequence", || sizes.borrow().len() == 1).await;
            // The other seven arrive while that step runs.
            for seq in 2..=8 {
                for f in activation(seq) {
                    prev_tx.send(f).await.unwrap();
                }
            }
            wait_for("read the seven", || lock(&stats).queued == 7).await;
            // Let every step finish as it comes, until all eight have run.
            wait_for("ran all eight", || {
                open.set(sizes.borrow().len());
                sizes.borrow().iter().sum::<usize>() == 8
            })
            .await;
        };
        futures::executor::block_on(futures::future::select(Box::pin(run), Box::pin(feed)));
        // Before, the step after the first ran all seven: [1, 7]. (The share shrinks as the
        // sequences end here, having no caches.)
        let sizes = sizes.borrow();
        assert_eq!(sizes[..2], [1, 2], "steps {sizes:?}");
        assert!(sizes.iter().all(|&n| n <= 2), "steps {sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 8);
    }

    impl Exec for NoJobs {
        fn submit(&self, _job: crate::exec::RuntimeJob) -> LocalBoxFuture<'static, RuntimeDone> {
            Box::pin(futures::future::pending())
        }
        fn kv_bytes_per_position(&self) -> usize {
            64
        }
        fn weight_bytes(&self) -> u64 {
            0
        }
        fn describe(&self) -> String {
            "no jobs".into()
        }
    }

    #[test]
    fn a_message_the_link_refuses_as_too_large_is_dropped_and_the_node_goes_on() {
        // The next link carries 64 bytes at most; the node's error reports are longer. Before,
        // the refused send ended the node's loop; now it is dropped and counted.
        let small = InProcessConfig {
            max_message_size: 64,
            ..Default::default()
        };
        let ((next, next_back_tx), (next_back_rx_prev, mut next_in)) = {
            let ((a_tx, a_rx), (b_tx, b_rx)) = pair(&small);
            ((a_tx, a_rx), (b_tx, b_rx))
        };
        let ((prev_tx, prev_back), (prev_back_tx, prev_in)) = {
            let ((a_tx, a_rx), (b_tx, b_rx)) = pair(&InProcessConfig::default());
            ((a_tx, a_rx), (b_tx, b_rx))
        };
        let node = Node::new(NodeConfig {
            index: 1,
            is_last: false,
            hidden: 8,
            wire: WireDtype::F16,
            max_message: 64 * 1024,
            max_positions: 16,
            max_tokens: 16,
            max_sequences: 2,
            max_partials: 1,
            max_held_bytes: 1 << 16,
            kv_bytes_per_position: 64,
            kv_cap_bytes: 1 << 16,
        });
        let stats: SharedStats = Arc::new(Mutex::new(DriverStats::default()));
        let hops = Hops {
            next: Some((next, next_back_tx)),
            prev: Some((prev_in, prev_back_tx)),
        };
        let _keep = (next_back_rx_prev, prev_back);
        let run = run_node(node, &NoJobs, hops, stats.clone(), Batching::greedy());
        let feed = async move {
            // Garbage: the node's error report about it is longer than the link allows.
            prev_tx.send(b"garbage frame".to_vec()).await.unwrap();
            // Then a small control message, which must still come through.
            let end = wire::encode_control(&Control::End { seq: 7 });
            prev_tx.send(end.clone()).await.unwrap();
            let got = next_in.recv().await;
            prev_tx.close().await;
            (got, end)
        };
        let (result, (got, end)) = futures::executor::block_on(futures::future::join(run, feed));
        assert!(result.is_ok(), "the loop ended cleanly: {result:?}");
        assert_eq!(
            got,
            Some(end),
            "the End came through after the refused message"
        );
        let s = lock(&stats).clone();
        assert_eq!((s.garbage, s.oversized), (1, 1));
        assert!(s.last_garbage.is_some_and(|e| e.contains("version")));
    }
}
