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
    /// KV bytes one position of one sequence takes on this node's layers.
    pub kv_bytes_per_position: usize,
    /// Cap on the bytes of all KV caches together.
    pub kv_cap_bytes: usize,
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
    bytes: usize,
    /// `End` arrived while a job held the cache: drop everything when it returns.
    ended: bool,
    /// First position and token count of the running job.
    running: Option<(u32, u32)>,
}

/// Sequences refused or failed recently, whose stragglers are dropped without more errors.
const FORGOTTEN_KEPT: usize = 256;

/// What the node reports about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub kv_bytes: usize,
    pub kv_peak: usize,
    pub sequences: usize,
    /// Activations ready or waiting for KV memory.
    pub queued: usize,
    /// Tokens run through this node's layers so far.
    pub tokens: u64,
}

/// A ring node's state: the caches and queues of the sequences passing through.
pub struct Node<C> {
    cfg: NodeConfig,
    seqs: HashMap<u64, Seq<C>>,
    ready: VecDeque<Activation>,
    /// Waiting for KV memory, in arrival order.
    waiting: VecDeque<Activation>,
    forgotten: VecDeque<u64>,
    reassembler: Reassembler,
    kv_used: usize,
    kv_peak: usize,
    tokens: u64,
}

impl<C> Node<C> {
    pub fn new(cfg: NodeConfig) -> Self {
        Self {
            reassembler: Reassembler::new(cfg.hidden, cfg.max_tokens),
            cfg,
            seqs: HashMap::new(),
            ready: VecDeque::new(),
            waiting: VecDeque::new(),
            forgotten: VecDeque::new(),
            kv_used: 0,
            kv_peak: 0,
            tokens: 0,
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Bytes held by KV caches now, and at most so far.
    pub fn kv_bytes(&self) -> (usize, usize) {
        (self.kv_used, self.kv_peak)
    }

    pub fn stats(&self) -> NodeStats {
        NodeStats {
            kv_bytes: self.kv_used,
            kv_peak: self.kv_peak,
            sequences: self.seqs.len(),
            queued: self.ready.len() + self.waiting.len(),
            tokens: self.tokens,
        }
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

    fn forget(&mut self, seq: u64) {
        if self.forgotten.len() == FORGOTTEN_KEPT {
            self.forgotten.pop_front();
        }
        self.forgotten.push_back(seq);
    }

    /// Handle one incoming message; returns the messages for the next hop.
    pub fn handle(&mut self, msg: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        match wire::decode(msg) {
            Err(e) => out.push(self.error(None, e)),
            Ok(Message::Control(c)) => match c {
                Control::Start { seq, positions } => match self.start(seq, positions as usize) {
                    Ok(()) => out.push(msg.to_vec()),
                    Err(e) => {
                        self.forget(seq);
                        out.push(self.error(Some(seq), e));
                    }
                },
                Control::End { seq } => {
                    self.end(seq);
                    out.push(msg.to_vec());
                    self.admit_waiting();
                }
                // Errors and anything else travel on to the starter.
                _ => out.push(msg.to_vec()),
            },
            Ok(Message::Activation(chunk)) => {
                let seq = chunk.seq;
                if let Err(e) = self.reassembler.check(&chunk) {
                    if self.seqs.contains_key(&seq) {
                        self.fail(seq, e, &mut out);
                    } else {
                        out.push(self.error(None, e));
                    }
                    return out;
                }
                if !self.seqs.contains_key(&seq) {
                    if !self.forgotten.contains(&seq) {
                        // Not tied to a live sequence: the starter reports it as garbage.
                        out.push(self.error(
                            None,
                            format!("activation for sequence {seq}, which was never started here"),
                        ));
                    }
                    return out;
                }
                match self.reassembler.push(chunk) {
                    Err(e) => self.fail(seq, e, &mut out),
                    Ok(None) => {}
                    Ok(Some(act)) => {
                        if let Err(e) = self.accept(&act) {
                            self.fail(seq, e, &mut out);
                        } else {
                            self.ready.push_back(act);
                        }
                    }
                }
            }
        }
        out
    }

    fn start(&mut self, seq: u64, positions: usize) -> Result<()> {
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
        if self.seqs.len() >= self.cfg.max_sequences {
            return Err(Error::Input(format!(
                "sequence {seq} refused: {} sequences are already open on this node",
                self.seqs.len()
            )));
        }
        self.seqs.insert(
            seq,
            Seq {
                positions,
                next_pos: 0,
                cache: Slot::Unmade,
                bytes: 0,
                ended: false,
                running: None,
            },
        );
        Ok(())
    }

    fn cache_bytes(&self, positions: usize) -> Result<usize> {
        positions
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
            .any(|a| a.seq == act.seq);
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
        let end = act.first_pos as usize + act.n_tokens as usize;
        if end > s.positions {
            return Err(Error::ContextFull {
                position: end - 1,
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
        self.ready.retain(|a| a.seq != seq);
        self.waiting.retain(|a| a.seq != seq);
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
            let Some(act) = self.ready.pop_front() else {
                break None;
            };
            let Some(s) = self.seqs.get_mut(&act.seq) else {
                continue;
            };
            let cache = match std::mem::replace(&mut s.cache, Slot::Lent) {
                Slot::Here(c) => CacheSlot::Lent(c),
                Slot::Unmade => {
                    let bytes = s.positions * self.cfg.kv_bytes_per_position;
                    if self.kv_used + bytes > self.cfg.kv_cap_bytes {
                        // Backpressure: wait until a sequence ends and frees its cache.
                        s.cache = Slot::Unmade;
                        skipped.push_back(act);
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
                    skipped.push_back(act);
                    continue;
                }
            };
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
            Ok(h) if h.len() == n_tokens as usize * self.cfg.hidden => h,
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
            // The starter's head needs only the last token.
            (first_pos + n_tokens - 1, &hidden[hidden.len() - h..])
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
