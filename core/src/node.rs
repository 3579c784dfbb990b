//! A secondary ring node, sans-IO and split-phase: messages in → jobs for this node's layers
//! → messages out to the next node. Transports only move bytes; engines only run jobs.
//!
//! ```text
//! handle(msg) -> messages      a control message travels on; activation chunks are joined
//! next_job()  -> Job           the next sequence ready to run, with its cache lent out
//! complete(done) -> messages   the job's hidden states, encoded for the next hop
//! ```
//!
//! A sequence exists on a node only once the starter's `Start` has configured it, with a
//! position count within the model's context; activations for any other sequence are refused
//! without allocating anything. Each sequence gets one KV cache for this node's layers on its
//! first activation, freed at `End`. Total KV memory is capped: a sequence whose first
//! activation would pass the cap waits (backpressure) until another ends. Anything wrong with
//! one message or one sequence becomes an error message that travels on to the starter; the
//! node and the other sequences keep going.
//!
//! Everything a peer can make the node hold is bounded by [`NodeConfig`], never by what a
//! message claims (see [`NodeConfig::memory_bound`]): at most `max_sequences` sequences (past
//! it the least recently active one is dropped and reported, so a peer opening sequences it
//! never uses cannot lock out the busy ones), at most `max_partials` half-received activations
//! (the oldest dropped), at most `max_held_bytes` of activations received and not yet run, and
//! KV caches within `kv_cap_bytes`. Sizes are `u64` with checked arithmetic on every target.
//! Messages that cannot be read or tied to a live sequence are counted as garbage from the
//! previous node ([`Node::garbage`]); the runtime reports a peer that keeps sending them, and
//! error reports about them thin out exponentially so garbage cannot flood the ring.

use std::collections::{HashMap, VecDeque};

use crate::engine::{expect_hidden, CacheSlot, Done, Job, JobInput, Task, Want};
use crate::error::{Error, Result};
use crate::wire::{self, Activation, Control, Message, Reassembler, WireDtype};

/// How a node talks to the ring.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Position in the ring (the starter is 0).
    pub index: u32,
    /// The next hop is the starter: send back only the last token's hidden row.
    pub is_last: bool,
    pub hidden: usize,
    pub wire: WireDtype,
    /// Largest message the outgoing transport carries.
    pub max_message: usize,
    /// Most positions a sequence may ask for (the model's context).
    pub max_positions: usize,
    /// Most tokens one activation may carry (a prefill).
    pub max_tokens: usize,
    /// Most sequences configured at once.
    pub max_sequences: usize,
    /// Most activations half-received at once.
    pub max_partials: usize,
    /// Cap on the f32 bytes of activations received and not yet run (half-received ones
    /// counted whole from their first chunk); one activation is always let through.
    pub max_held_bytes: u64,
    /// KV bytes one position of one sequence takes on this node's layers.
    pub kv_bytes_per_position: u64,
    /// Cap on the bytes of all KV caches together.
    pub kv_cap_bytes: u64,
}

impl NodeConfig {
    /// A cap on held activations that lets a burst of prefills through: four of the largest,
    /// and at least 64 MiB.
    pub fn default_held_bytes(max_tokens: usize, hidden: usize) -> u64 {
        let largest = (max_tokens as u64)
            .saturating_mul(hidden as u64)
            .saturating_mul(4);
        largest.saturating_mul(4).max(64 << 20)
    }

    /// The most bytes the node's own state can hold whatever its peer sends: KV caches, the
    /// activations it holds (one more than the cap: the one that passes it) and its
    /// bookkeeping. Jobs lent to an engine and the transport's buffers come on top.
    pub fn memory_bound(&self) -> u64 {
        let largest = (self.max_tokens as u64)
            .saturating_mul(self.hidden as u64)
            .saturating_mul(4);
        let bookkeeping = (self.max_sequences as u64 + FORGOTTEN_KEPT as u64).saturating_mul(256);
        self.kv_cap_bytes
            .saturating_add(self.max_held_bytes)
            .saturating_add(largest)
            .saturating_add(bookkeeping)
    }
}

/// Where a sequence's cache is.
enum Slot<C> {
    /// Not made yet: the sequence's first activation has not run.
    Unmade,
    Here(C),
    /// Lent to a running job.
    Lent,
}

struct Seq<C> {
    positions: usize,
    /// Position of the next activation's first token.
    next_pos: usize,
    cache: Slot<C>,
    /// KV bytes charged to this sequence (0 until its cache is made).
    bytes: u64,
    /// When it was last started, fed or run (a counter): the least recent goes first.
    active: u64,
    /// `End` arrived while a job held the cache: drop everything when it returns.
    ended: bool,
    /// An activation of it has arrived whole: it is in use, not only opened.
    fed: bool,
    /// First position and token count of the running job.
    running: Option<(u32, u32)>,
}

/// Sequences refused or failed recently, whose stragglers are dropped without more errors.
const FORGOTTEN_KEPT: usize = 256;

/// What the node reports about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub kv_bytes: u64,
    pub kv_peak: u64,
    pub sequences: usize,
    /// Activations ready or waiting for KV memory.
    pub queued: usize,
    /// Tokens run through this node's layers so far.
    pub tokens: u64,
    /// Messages from the previous node that could not be read or tied to a live sequence.
    pub garbage: u64,
    /// Bytes of activations held (received, not yet run).
    pub held_bytes: u64,
}

/// A queued activation and the bytes charged for it.
struct Queued {
    act: Activation,
    bytes: u64,
}

/// A ring node's state: the caches and queues of the sequences passing through.
pub struct Node<C> {
    cfg: NodeConfig,
    seqs: HashMap<u64, Seq<C>>,
    ready: VecDeque<Queued>,
    /// Waiting for KV memory, in arrival order.
    waiting: VecDeque<Queued>,
    /// f32 bytes of the activations in `ready` and `waiting`.
    queued_bytes: u64,
    forgotten: VecDeque<u64>,
    reassembler: Reassembler,
    kv_used: u64,
    kv_peak: u64,
    tokens: u64,
    garbage: u64,
    last_garbage: Option<String>,
    clock: u64,
}

impl<C> Node<C> {
    pub fn new(cfg: NodeConfig) -> Self {
        Self {
            reassembler: Reassembler::new(cfg.hidden, cfg.max_tokens, cfg.max_partials),
            cfg,
            seqs: HashMap::new(),
            ready: VecDeque::new(),
            waiting: VecDeque::new(),
            queued_bytes: 0,
            forgotten: VecDeque::new(),
            kv_used: 0,
            kv_peak: 0,
            tokens: 0,
            garbage: 0,
            last_garbage: None,
            clock: 0,
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Bytes held by KV caches now, and at most so far.
    pub fn kv_bytes(&self) -> (u64, u64) {
        (self.kv_used, self.kv_peak)
    }

    pub fn stats(&self) -> NodeStats {
        NodeStats {
            kv_bytes: self.kv_used,
            kv_peak: self.kv_peak,
            sequences: self.seqs.len(),
            queued: self.ready.len() + self.waiting.len(),
            tokens: self.tokens,
            garbage: self.garbage,
            held_bytes: self.held_bytes(),
        }
    }

    /// Messages from the previous node that could not be read or tied to a live sequence,
    /// and the last one's error.
    pub fn garbage(&self) -> (u64, Option<&str>) {
        (self.garbage, self.last_garbage.as_deref())
    }

    /// f32 bytes of activations received and not yet handed to a job.
    pub fn held_bytes(&self) -> u64 {
        self.queued_bytes + self.reassembler.held_bytes()
    }

    /// Sequences configured on this node.
    pub fn live_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Activations waiting for KV memory.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether a job is ready to run.
    pub fn has_job(&self) -> bool {
        !self.ready.is_empty()
    }

    fn error(&self, seq: Option<u64>, e: impl std::fmt::Display) -> Vec<u8> {
        wire::encode_control(&Control::Error {
            seq,
            node: self.cfg.index,
            message: e.to_string(),
        })
    }

    /// Counts a message from the previous node that is garbage; reports the 1st, 2nd, 4th,
    /// 8th... so a stream of garbage costs the ring a few messages, not one per message.
    fn count_garbage(&mut self, e: impl std::fmt::Display, out: &mut Vec<Vec<u8>>) {
        self.garbage += 1;
        let text = wire::truncate(&e.to_string(), wire::MAX_ERROR_TEXT);
        if self.garbage.is_power_of_two() {
            let n = self.garbage;
            let m = if n == 1 {
                text.clone()
            } else {
                format!("{text} ({n} unusable messages from the previous node so far)")
            };
            out.push(self.error(None, m));
        }
        self.last_garbage = Some(text);
    }

    fn touch(&mut self, seq: u64) {
        self.clock += 1;
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.active = self.clock;
        }
    }

    fn forget(&mut self, seq: u64) {
        if self.forgotten.len() == FORGOTTEN_KEPT {
            self.forgotten.pop_front();
        }
        self.forgotten.push_back(seq);
    }

    /// Handle one incoming message; returns the messages for the next hop.
    pub fn handle(&mut self, msg: &[u8]) -> Vec<Vec<u8>> {
        let out = self.handle_inner(msg);
        self.fit(out)
    }

    /// Checks sizes on the way out too: a message the next hop cannot carry would end the
    /// link, so it is replaced by a short error (every control message is far smaller than any
    /// link's limit and activations are chunked to it, so this only guards configurations).
    fn fit(&self, out: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let max = self.cfg.max_message;
        out.into_iter()
            .filter_map(|m| {
                if m.len() <= max {
                    return Some(m);
                }
                let e = format!(
                    "a {}-byte message does not fit the link (max {max})",
                    m.len()
                );
                Some(self.error(None, e)).filter(|e| e.len() <= max)
            })
            .collect()
    }

    fn handle_inner(&mut self, msg: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        match wire::decode(msg) {
            Err(e) => self.count_garbage(e, &mut out),
            Ok(Message::Control(c)) => match c {
                Control::Start { seq, positions } => {
                    match self.start(seq, positions as usize, &mut out) {
                        Ok(()) => out.push(msg.to_vec()),
                        Err(e) => {
                            self.forget(seq);
                            out.push(self.error(Some(seq), e));
                        }
                    }
                }
                Control::End { seq } => {
                    self.end(seq);
                    out.push(msg.to_vec());
                    self.admit_waiting();
                }
                Control::Error { seq: Some(seq), .. } => {
                    // The sequence failed upstream: whatever it holds here is dead weight.
                    if self.seqs.contains_key(&seq) {
                        self.end(seq);
                        self.forget(seq);
                        self.admit_waiting();
                    }
                    out.push(msg.to_vec());
                }
                // Everything else travels on to the starter. It was accepted by `decode`, so it
                // is within the control size limit and fits the next hop.
                _ => out.push(msg.to_vec()),
            },
            Ok(Message::Activation(chunk)) => {
                let seq = chunk.seq;
                let live = self.seqs.contains_key(&seq);
                if let Err(e) = self.reassembler.check(&chunk) {
                    if live {
                        self.fail(seq, e, &mut out);
                    } else {
                        self.count_garbage(e, &mut out);
                    }
                    return out;
                }
                if !live {
                    if !self.forgotten.contains(&seq) {
                        // Not tied to a live sequence: garbage from the previous node.
                        self.count_garbage(
                            format!("activation for sequence {seq}, which was never started here"),
                            &mut out,
                        );
                    }
                    return out;
                }
                self.touch(seq);
                if !self.reassembler.has_partial(seq) && chunk.offset == 0 {
                    // A new activation: charge it whole against the cap on held activations.
                    let charge = chunk.f32_bytes().unwrap_or(u64::MAX);
                    let held = self.held_bytes();
                    if held > 0 && held.saturating_add(charge) > self.cfg.max_held_bytes {
                        let e = format!(
                            "sequence {seq}: an activation of {charge} bytes does not fit: \
                             {held} bytes of activations are already held on this node (cap {})",
                            self.cfg.max_held_bytes
                        );
                        self.fail(seq, e, &mut out);
                        return out;
                    }
                }
                match self.reassembler.push(chunk) {
                    Err(e) => self.fail(seq, e, &mut out),
                    Ok(pushed) => {
                        if let Some(old) = pushed.dropped {
                            let e = format!(
                                "sequence {old} dropped: more than {} activations were half \
                                 received at once on this node; the oldest goes",
                                self.cfg.max_partials
                            );
                            self.fail(old, e, &mut out);
                        }
                        if let Some(act) = pushed.done {
                            if let Err(e) = self.accept(&act) {
                                self.fail(seq, e, &mut out);
                            } else {
                                let bytes = act.data.len() as u64 * 4;
                                self.queued_bytes += bytes;
                                self.ready.push_back(Queued { act, bytes });
                                if let Some(s) = self.seqs.get_mut(&seq) {
                                    s.fed = true;
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn start(&mut self, seq: u64, positions: usize, out: &mut Vec<Vec<u8>>) -> Result<()> {
        if self.seqs.contains_key(&seq) {
            return Err(Error::Input(format!("sequence {seq} was started twice")));
        }
        if positions == 0 || positions > self.cfg.max_positions {
            return Err(Error::Input(format!(
                "sequence {seq} asks for {positions} positions; this node allows 1..={}",
                self.cfg.max_positions
            )));
        }
        let bytes = self.cache_bytes(positions)?;
        if bytes > self.cfg.kv_cap_bytes {
            return Err(Error::Input(format!(
                "sequence {seq} needs {bytes} bytes of KV cache, more than this node's cap of \
                 {} bytes",
                self.cfg.kv_cap_bytes
            )));
        }
        if self.seqs.len() >= self.cfg.max_sequences.max(1) {
            // Full: the least recently active sequence that no job holds makes room, those
            // never fed first. A peer that opens sequences and never feeds them so only ever
            // displaces its own.
            let victim = self
                .seqs
                .iter()
                .filter(|(_, s)| !matches!(s.cache, Slot::Lent))
                .min_by_key(|(_, s)| (s.fed || matches!(s.cache, Slot::Here(_)), s.active))
                .map(|(&q, _)| q);
            let Some(victim) = victim else {
                return Err(Error::Input(format!(
                    "sequence {seq} refused: {} sequences are open on this node (the limit) \
                     and all are running",
                    self.seqs.len()
                )));
            };
            let e = format!(
                "sequence {victim} dropped for sequence {seq}: {} sequences are open on this \
                 node (the limit); the least recently active goes",
                self.seqs.len()
            );
            self.fail(victim, e, out);
        }
        self.clock += 1;
        self.seqs.insert(
            seq,
            Seq {
                positions,
                next_pos: 0,
                cache: Slot::Unmade,
                bytes: 0,
                active: self.clock,
                ended: false,
                fed: false,
                running: None,
            },
        );
        Ok(())
    }

    fn cache_bytes(&self, positions: usize) -> Result<u64> {
        (positions as u64)
            .checked_mul(self.cfg.kv_bytes_per_position)
            .ok_or_else(|| Error::Input(format!("a KV cache of {positions} positions overflows")))
    }

    /// Checks a whole activation against its sequence's state.
    fn accept(&self, act: &Activation) -> Result<()> {
        let s = &self.seqs[&act.seq];
        let queued = self
            .ready
            .iter()
            .chain(&self.waiting)
            .any(|q| q.act.seq == act.seq);
        if s.running.is_some() || queued {
            return Err(Error::Input(format!(
                "sequence {}: a second activation arrived before the first was processed",
                act.seq
            )));
        }
        if act.first_pos as usize != s.next_pos {
            return Err(Error::Input(format!(
                "sequence {}: activation at position {} but the cache is at {}",
                act.seq, act.first_pos, s.next_pos
            )));
        }
        let end = act.first_pos as u64 + act.n_tokens as u64;
        if end > s.positions as u64 {
            return Err(Error::ContextFull {
                position: usize::try_from(end - 1).unwrap_or(usize::MAX),
                context: s.positions,
            });
        }
        Ok(())
    }

    /// The sequence cannot go on here: free what it holds and tell the starter.
    fn fail(&mut self, seq: u64, e: impl std::fmt::Display, out: &mut Vec<Vec<u8>>) {
        self.end(seq);
        self.forget(seq);
        out.push(self.error(Some(seq), e));
        self.admit_waiting();
    }

    fn end(&mut self, seq: u64) {
        self.reassembler.drop_sequence(seq);
        let mut freed = 0;
        for q in self.ready.iter().chain(&self.waiting) {
            if q.act.seq == seq {
                freed += q.bytes;
            }
        }
        self.queued_bytes -= freed;
        self.ready.retain(|q| q.act.seq != seq);
        self.waiting.retain(|q| q.act.seq != seq);
        let lent = matches!(self.seqs.get(&seq), Some(s) if matches!(s.cache, Slot::Lent));
        if lent {
            // The running job returns the cache later; free it then.
            if let Some(s) = self.seqs.get_mut(&seq) {
                s.ended = true;
            }
        } else if let Some(s) = self.seqs.remove(&seq) {
            self.kv_used -= s.bytes;
        }
    }

    /// Moves waiting activations to the ready queue now that memory may have been freed.
    fn admit_waiting(&mut self) {
        // Their order is kept: `next_job` puts them back if memory is still short.
        while let Some(a) = self.waiting.pop_back() {
            self.ready.push_front(a);
        }
    }

    /// The next job to run, if any: its sequence's cache is lent to it until
    /// [`complete`](Self::complete).
    pub fn next_job(&mut self) -> Option<Job<C>> {
        let mut skipped = VecDeque::new();
        let job = loop {
            let Some(q) = self.ready.pop_front() else {
                break None;
            };
            let Some(s) = self.seqs.get_mut(&q.act.seq) else {
                self.queued_bytes -= q.bytes;
                continue;
            };
            let cache = match std::mem::replace(&mut s.cache, Slot::Lent) {
                Slot::Here(c) => CacheSlot::Lent(c),
                Slot::Unmade => {
                    // Checked against the cap at `Start`, so no overflow.
                    let bytes = (s.positions as u64).saturating_mul(self.cfg.kv_bytes_per_position);
                    if self.kv_used.saturating_add(bytes) > self.cfg.kv_cap_bytes {
                        // Backpressure: wait until a sequence ends and frees its cache.
                        s.cache = Slot::Unmade;
                        skipped.push_back(q);
                        continue;
                    }
                    s.bytes = bytes;
                    self.kv_used += bytes;
                    self.kv_peak = self.kv_peak.max(self.kv_used);
                    CacheSlot::New {
                        positions: s.positions,
                    }
                }
                Slot::Lent => {
                    // `accept` lets one activation per sequence through at a time.
                    skipped.push_back(q);
                    continue;
                }
            };
            self.clock += 1;
            s.active = self.clock;
            self.queued_bytes -= q.bytes;
            let act = q.act;
            s.running = Some((act.first_pos, act.n_tokens));
            break Some(Job {
                seq: act.seq,
                task: Task::Forward {
                    cache,
                    input: JobInput::Hidden(act.data),
                    want: Want::Hidden,
                },
            });
        };
        self.waiting.extend(skipped);
        job
    }

    /// Takes a finished job back; returns the messages for the next hop.
    pub fn complete(&mut self, done: Done<C>) -> Vec<Vec<u8>> {
        let out = self.complete_inner(done);
        self.fit(out)
    }

    fn complete_inner(&mut self, done: Done<C>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let seq = done.seq;
        let Some(s) = self.seqs.get_mut(&seq) else {
            return out;
        };
        let Some((first_pos, n_tokens)) = s.running.take() else {
            return out;
        };
        if s.ended {
            let bytes = s.bytes;
            self.seqs.remove(&seq);
            self.kv_used -= bytes;
            self.admit_waiting();
            return out;
        }
        let result = match (done.cache, done.output) {
            (Some(cache), Ok(output)) => {
                s.cache = Slot::Here(cache);
                s.next_pos += n_tokens as usize;
                expect_hidden(output)
            }
            (_, Err(e)) => Err(e),
            (None, Ok(_)) => Err(Error::Engine("the job lost the sequence's cache".into())),
        };
        let hidden = match result {
            Ok(h) if h.len() as u64 == n_tokens as u64 * self.cfg.hidden as u64 => h,
            Ok(h) => {
                let e = format!(
                    "the stage returned {} values for {n_tokens} tokens of {}",
                    h.len(),
                    self.cfg.hidden
                );
                self.fail(seq, e, &mut out);
                return out;
            }
            Err(e) => {
                if let Some(s) = self.seqs.get_mut(&seq) {
                    // A failed job may have kept the cache; it is dropped with the sequence.
                    s.cache = Slot::Unmade;
                }
                self.fail(seq, e, &mut out);
                return out;
            }
        };
        self.tokens += n_tokens as u64;
        let h = self.cfg.hidden;
        let (first_pos, rows) = if self.cfg.is_last {
            // The starter's head needs only the last token (`accept` refused empty ones).
            (
                first_pos.saturating_add(n_tokens.saturating_sub(1)),
                &hidden[hidden.len().saturating_sub(h)..],
            )
        } else {
            (first_pos, &hidden[..])
        };
        out.extend(wire::encode_activation(
            seq,
            first_pos,
            h,
            rows,
            self.cfg.wire,
            self.cfg.max_message,
        ));
        out
    }

    /// Up to `max` jobs of different sequences, to run as one batch (each weight read once for
    /// all of them); see [`next_job`](Self::next_job).
    pub fn next_jobs(&mut self, max: usize) -> Vec<Job<C>> {
        let mut jobs = Vec::new();
        while jobs.len() < max.max(1) {
            match self.next_job() {
                Some(j) => jobs.push(j),
                None => break,
            }
        }
        jobs
    }

    /// Handles a message and runs every job it makes possible on a blocking engine.
    pub fn handle_blocking<E>(&mut self, msg: &[u8], engine: &mut E) -> Vec<Vec<u8>>
    where
        E: crate::engine::StageEngine<Cache = C> + ?Sized,
    {
        let mut out = self.handle(msg);
        while let Some(job) = self.next_job() {
            let done = job.run(engine);
            out.extend(self.complete(done));
        }
        out
    }
}
