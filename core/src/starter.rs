//! The starter node, sans-IO and split-phase. Prompts arrive as token ids; the starter owns
//! everything else about sequences. It admits up to S sequences at once, hands out jobs for
//! the embedding and its own layers, sends the hidden states around the ring, and when they
//! come back hands out a head job, samples, and feeds the next token — while other sequences
//! occupy the other nodes (recurrent pipeline parallelism). A waiting sequence is admitted as
//! soon as one finishes. Each sequence has its own sampling parameters and stop rule.
//!
//! With one node (`n_nodes == 1`) nothing leaves the starter: each job runs the whole model
//! and returns the next token directly. That is how `mdi generate` runs, so single-node and
//! ring generation share this one loop of prefill, sampling and stopping.
//!
//! ```text
//! submit(id, request)           queue a request
//! pump() -> messages            admit what fits (Start messages for the ring)
//! next_job() -> Job             a feed (embedding + layers) or a head job, cache lent out
//! complete(done) -> messages    activations for node 1, or a token, events
//! handle(msg) -> messages       an activation back from the last node: a head job follows
//! cancel(id) -> messages        stop a request (End travels around and frees every cache)
//! ```

use std::collections::{HashMap, VecDeque};

use crate::engine::{expect_hidden, CacheSlot, Done, Job, JobInput, StageOutput, Task, Want};
use crate::error::Error;
use crate::sampling::{Sampler, SamplingParams};
use crate::wire::{self, Activation, Control, Message, Reassembler, WireDtype};

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct SeqRequest {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub eos_ids: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// The model produced an end-of-sequence token (it is the last token reported).
    Eos,
    /// The request's token budget was used up.
    MaxTokens,
    /// The model's context is full.
    Context,
    /// The request was cancelled.
    Cancelled,
    /// The sequence failed; the others go on.
    Error(String),
}

/// What the starter reports as it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token was sampled for request `id`.
    Token { id: u64, token: u32 },
    /// The request ended.
    Done { id: u64, finish: Finish },
    /// A node reported a problem not tied to a live sequence (a garbage frame).
    NodeError { node: u32, message: String },
}

/// How the starter talks to the ring.
#[derive(Debug, Clone)]
pub struct StarterConfig {
    /// Nodes in the ring, the starter included.
    pub n_nodes: usize,
    pub hidden: usize,
    pub wire: WireDtype,
    pub max_message: usize,
    /// The model's context: prompt plus generated tokens must fit.
    pub context: usize,
    /// Sequences in flight at once.
    pub in_flight: usize,
    /// KV bytes one position of one sequence takes on the starter's layers.
    pub kv_bytes_per_position: u64,
    /// Cap on the starter's KV bytes: admission waits while the next sequence would pass it.
    pub kv_cap_bytes: u64,
}

enum Slot<C> {
    Unmade,
    Here(C),
    Lent,
}

struct Seq<C> {
    id: u64,
    cache: Slot<C>,
    sampler: Sampler,
    req: SeqRequest,
    generated: usize,
    /// Position of the next token to feed.
    pos: usize,
    positions: usize,
    bytes: u64,
    /// Tokens of the running feed job.
    feeding: Option<usize>,
}

/// Work the starter has decided on but not handed out yet.
enum Pending {
    Feed(Vec<u32>),
    Head(Vec<f32>),
}

/// The starter's state.
pub struct Starter<C> {
    cfg: StarterConfig,
    seqs: HashMap<u64, Seq<C>>,
    by_id: HashMap<u64, u64>,
    waiting: VecDeque<(u64, SeqRequest)>,
    ready: VecDeque<(u64, Pending)>,
    reassembler: Reassembler,
    next_seq: u64,
    kv_used: u64,
    kv_peak: u64,
    tokens: u64,
    /// Messages from the last node that could not be read.
    garbage: u64,
}

impl<C> Starter<C> {
    pub fn new(cfg: StarterConfig) -> Self {
        Self {
            // Only single-token activations come back, one per sequence at a time.
            reassembler: Reassembler::new(cfg.hidden, 1, 2),
            cfg,
            seqs: HashMap::new(),
            by_id: HashMap::new(),
            waiting: VecDeque::new(),
            ready: VecDeque::new(),
            next_seq: 1,
            kv_used: 0,
            kv_peak: 0,
            tokens: 0,
            garbage: 0,
        }
    }

    /// Messages from the last node that could not be read.
    pub fn garbage(&self) -> u64 {
        self.garbage
    }

    pub fn config(&self) -> &StarterConfig {
        &self.cfg
    }

    /// Queue a request; `id` names it in events and must be unique among live requests.
    pub fn submit(&mut self, id: u64, req: SeqRequest) {
        self.waiting.push_back((id, req));
    }

    /// Nothing in flight and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty() && self.waiting.is_empty()
    }

    /// Sequences admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.seqs.len()
    }

    /// Requests submitted but not admitted yet.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Jobs ready to run (at most; a cancelled sequence's job is dropped when reached).
    pub fn ready_jobs(&self) -> usize {
        self.ready.len()
    }

    /// Whether a job is ready to run.
    pub fn has_job(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Bytes held by this node's KV caches now, and at most so far.
    pub fn kv_bytes(&self) -> (u64, u64) {
        (self.kv_used, self.kv_peak)
    }

    /// Tokens sampled so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Admit waiting sequences while there is room; returns messages for node 1.
    pub fn pump(&mut self, events: &mut Vec<Event>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.admit(&mut out, events);
        out
    }

    /// Stop request `id`, queued or running. Its caches are freed on every node.
    pub fn cancel(&mut self, id: u64, events: &mut Vec<Event>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if let Some(i) = self.waiting.iter().position(|(w, _)| *w == id) {
            self.waiting.remove(i);
            events.push(Event::Done {
                id,
                finish: Finish::Cancelled,
            });
        } else if let Some(&seq) = self.by_id.get(&id) {
            self.finish(seq, Finish::Cancelled, &mut out, events);
        }
        self.admit(&mut out, events);
        out
    }

    /// Handle a message that came back around the ring; returns messages for node 1.
    pub fn handle(&mut self, msg: &[u8], events: &mut Vec<Event>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        match wire::decode(msg) {
            Err(e) => {
                self.garbage += 1;
                // Reported thinned out (1st, 2nd, 4th...) so garbage cannot flood the events.
                if self.garbage.is_power_of_two() {
                    events.push(Event::NodeError {
                        node: 0,
                        message: format!("{e} ({} unreadable messages so far)", self.garbage),
                    })
                }
            }
            Ok(Message::Control(Control::Error { seq, node, message })) => match seq {
                Some(seq) if self.seqs.contains_key(&seq) => {
                    let msg = format!("node {node}: {message}");
                    self.finish(seq, Finish::Error(msg), &mut out, events);
                }
                // About a sequence that already ended: its other errors were reported.
                Some(_) => {}
                None => events.push(Event::NodeError { node, message }),
            },
            // Start and End come back after visiting every node: nothing more to do.
            Ok(Message::Control(_)) => {}
            Ok(Message::Activation(chunk)) => {
                let seq = chunk.seq;
                if self.seqs.contains_key(&seq) {
                    match self.reassembler.push(chunk) {
                        Err(e) => self.finish(seq, Finish::Error(e.to_string()), &mut out, events),
                        Ok(pushed) => {
                            if let Some(old) = pushed.dropped {
                                let e = "its returning activation was dropped: too many were \
                                         half received at once";
                                self.finish(old, Finish::Error(e.into()), &mut out, events);
                            }
                            if let Some(act) = pushed.done {
                                self.returned(act, &mut out, events);
                            }
                        }
                    }
                }
                // Otherwise the sequence already ended (cancelled, or an error overtook it).
            }
        }
        self.admit(&mut out, events);
        out
    }

    fn admit(&mut self, out: &mut Vec<Vec<u8>>, events: &mut Vec<Event>) {
        while self.seqs.len() < self.cfg.in_flight.max(1) {
            let Some((id, req)) = self.waiting.pop_front() else {
                break;
            };
            let n = req.prompt_tokens.len();
            let fail = |events: &mut Vec<Event>, m: String| {
                events.push(Event::Done {
                    id,
                    finish: Finish::Error(m),
                })
            };
            if n == 0 {
                fail(events, "the prompt is empty".into());
                continue;
            }
            if n >= self.cfg.context {
                fail(
                    events,
                    format!(
                        "the prompt has {n} tokens but the model's context holds {} positions \
                         (including at least one generated token); shorten the prompt",
                        self.cfg.context
                    ),
                );
                continue;
            }
            if req.max_tokens == 0 {
                events.push(Event::Done {
                    id,
                    finish: Finish::MaxTokens,
                });
                continue;
            }
            // The last generated token is never fed back, so it needs no position. A `Start`
            // carries positions as u32.
            let positions = n
                .saturating_add(req.max_tokens - 1)
                .min(self.cfg.context)
                .min(u32::MAX as usize);
            let bytes = (positions as u64).saturating_mul(self.cfg.kv_bytes_per_position);
            if bytes > self.cfg.kv_cap_bytes {
                fail(
                    events,
                    format!(
                        "{positions} positions need {bytes} bytes of KV cache on the starter, \
                         more than its cap of {} bytes; ask for fewer tokens",
                        self.cfg.kv_cap_bytes
                    ),
                );
                continue;
            }
            if self.kv_used.saturating_add(bytes) > self.cfg.kv_cap_bytes {
                // Wait for a running sequence to free its cache.
                self.waiting.push_front((id, req));
                break;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.kv_used += bytes;
            self.kv_peak = self.kv_peak.max(self.kv_used);
            if self.cfg.n_nodes > 1 {
                out.push(wire::encode_control(&Control::Start {
                    seq,
                    positions: positions as u32,
                }));
            }
            self.ready
                .push_back((seq, Pending::Feed(req.prompt_tokens.clone())));
            self.by_id.insert(id, seq);
            self.seqs.insert(
                seq,
                Seq {
                    id,
                    cache: Slot::Unmade,
                    sampler: Sampler::new(req.params),
                    req,
                    generated: 0,
                    pos: 0,
                    positions,
                    bytes,
                    feeding: None,
                },
            );
        }
    }

    /// The next job to run, if any.
    pub fn next_job(&mut self) -> Option<Job<C>> {
        while let Some((seq, pending)) = self.ready.pop_front() {
            let Some(s) = self.seqs.get_mut(&seq) else {
                continue;
            };
            let greedy = s.req.params.is_greedy();
            let sample_want = if greedy { Want::Argmax } else { Want::Logits };
            let task = match pending {
                Pending::Head(hidden) => Task::Head {
                    hidden,
                    want: sample_want,
                },
                Pending::Feed(tokens) => {
                    let cache = match std::mem::replace(&mut s.cache, Slot::Lent) {
                        Slot::Here(c) => CacheSlot::Lent(c),
                        Slot::Unmade => CacheSlot::New {
                            positions: s.positions,
                        },
                        // One job per sequence at a time: the feed follows its token.
                        Slot::Lent => continue,
                    };
                    s.feeding = Some(tokens.len());
                    Task::Forward {
                        cache,
                        input: JobInput::Tokens(tokens),
                        // A one-node ring runs the head in the same pass.
                        want: if self.cfg.n_nodes == 1 {
                            sample_want
                        } else {
                            Want::Hidden
                        },
                    }
                }
            };
            return Some(Job { seq, task });
        }
        None
    }

    /// Jobs of different sequences to run as one batch: up to `share` heads (activations
    /// back from the ring) and up to `share` feeds (new tokens into the starter's layers),
    /// at most `max` in all; see [`next_job`](Self::next_job).
    ///
    /// The two kinds are counted apart because every sequence passes the starter twice per
    /// token. With one count, a step took whichever came first, say one head of a batch
    /// that came back and one feed of another, and split both batches: their sequences then
    /// ran one at a time through every later stage. Jobs left for later keep their order.
    pub fn next_jobs(&mut self, share: usize, max: usize) -> Vec<Job<C>> {
        let (share, max) = (share.max(1), max.max(1));
        let mut jobs = Vec::new();
        let (mut heads, mut feeds) = (0, 0);
        let mut later = Vec::new();
        while jobs.len() < max && (heads < share || feeds < share) {
            let Some(head) = self.front_is_head() else {
                break;
            };
            if (head && heads >= share) || (!head && feeds >= share) {
                later.extend(self.ready.pop_front());
                continue;
            }
            // `next_job` takes exactly the front entry: `front_is_head` dropped any it skips.
            let Some(job) = self.next_job() else { break };
            if head {
                heads += 1;
            } else {
                feeds += 1;
            }
            jobs.push(job);
        }
        for entry in later.into_iter().rev() {
            self.ready.push_front(entry);
        }
        jobs
    }

    /// Whether the first runnable ready entry is a head, after dropping the entries before
    /// it that [`next_job`](Self::next_job) would skip (sequences that ended, feeds whose
    /// sequence has a job running); `None` when nothing is ready.
    fn front_is_head(&mut self) -> Option<bool> {
        loop {
            let (seq, pending) = self.ready.front()?;
            let runnable = match self.seqs.get(seq) {
                None => false,
                Some(s) => matches!(pending, Pending::Head(_)) || !matches!(s.cache, Slot::Lent),
            };
            if runnable {
                return Some(matches!(pending, Pending::Head(_)));
            }
            self.ready.pop_front();
        }
    }

    /// Takes a finished job back; returns messages for node 1.
    pub fn complete(&mut self, done: Done<C>, events: &mut Vec<Event>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let seq = done.seq;
        let Some(s) = self.seqs.get_mut(&seq) else {
            // Cancelled while the job ran; its cache is dropped here.
            return out;
        };
        match s.feeding.take() {
            Some(n) => {
                let output = match (done.cache, done.output) {
                    (Some(cache), Ok(o)) => {
                        s.cache = Slot::Here(cache);
                        s.pos += n;
                        o
                    }
                    (_, Err(e)) => {
                        s.cache = Slot::Unmade;
                        self.finish(seq, Finish::Error(e.to_string()), &mut out, events);
                        self.admit(&mut out, events);
                        return out;
                    }
                    (None, Ok(_)) => {
                        s.cache = Slot::Unmade;
                        let e = "the job lost the sequence's cache".to_string();
                        self.finish(seq, Finish::Error(e), &mut out, events);
                        self.admit(&mut out, events);
                        return out;
                    }
                };
                if self.cfg.n_nodes == 1 {
                    self.sampled(seq, Ok(output), &mut out, events);
                } else {
                    match expect_hidden(output) {
                        Ok(hidden) => out.extend(wire::encode_activation(
                            seq,
                            (s.pos - n) as u32,
                            self.cfg.hidden,
                            &hidden,
                            self.cfg.wire,
                            self.cfg.max_message,
                        )),
                        Err(e) => self.finish(seq, Finish::Error(e.to_string()), &mut out, events),
                    }
                }
            }
            None => self.sampled(seq, done.output, &mut out, events),
        }
        self.admit(&mut out, events);
        out
    }

    fn returned(&mut self, act: Activation, out: &mut Vec<Vec<u8>>, events: &mut Vec<Event>) {
        let Some(s) = self.seqs.get(&act.seq) else {
            return;
        };
        if act.n_tokens != 1 || act.first_pos as usize + 1 != s.pos || s.feeding.is_some() {
            let m = format!(
                "activation for position {} came back, expected {}",
                act.first_pos,
                s.pos.saturating_sub(1)
            );
            return self.finish(act.seq, Finish::Error(m), out, events);
        }
        self.ready.push_back((act.seq, Pending::Head(act.data)));
    }

    /// Sampling on a head output, then stop or queue the new token's feed.
    fn sampled(
        &mut self,
        seq: u64,
        output: crate::Result<StageOutput>,
        out: &mut Vec<Vec<u8>>,
        events: &mut Vec<Event>,
    ) {
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        let token = match output {
            Ok(StageOutput::Token(t)) => t,
            Ok(StageOutput::Logits(l)) => s.sampler.sample(&l),
            Ok(StageOutput::Hidden(_)) => {
                let e = Error::Engine("the head returned hidden states".into());
                return self.finish(seq, Finish::Error(e.to_string()), out, events);
            }
            Err(e) => return self.finish(seq, Finish::Error(e.to_string()), out, events),
        };
        s.generated += 1;
        self.tokens += 1;
        events.push(Event::Token { id: s.id, token });
        if s.req.eos_ids.contains(&token) {
            return self.finish(seq, Finish::Eos, out, events);
        }
        if s.generated >= s.req.max_tokens {
            return self.finish(seq, Finish::MaxTokens, out, events);
        }
        if s.pos + 1 > s.positions {
            return self.finish(seq, Finish::Context, out, events);
        }
        self.ready.push_back((seq, Pending::Feed(vec![token])));
    }

    fn finish(
        &mut self,
        seq: u64,
        finish: Finish,
        out: &mut Vec<Vec<u8>>,
        events: &mut Vec<Event>,
    ) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.kv_used -= s.bytes;
            self.by_id.remove(&s.id);
            self.reassembler.drop_sequence(seq);
            self.ready.retain(|(q, _)| *q != seq);
            if self.cfg.n_nodes > 1 {
                out.push(wire::encode_control(&Control::End { seq }));
            }
            events.push(Event::Done { id: s.id, finish });
        }
    }

    /// Runs every job that is ready on a blocking engine; returns messages for node 1.
    pub fn run_jobs_blocking<E>(&mut self, engine: &mut E, events: &mut Vec<Event>) -> Vec<Vec<u8>>
    where
        E: crate::engine::StageEngine<Cache = C> + ?Sized,
    {
        let mut out = Vec::new();
        while let Some(job) = self.next_job() {
            let done = job.run(engine);
            out.extend(self.complete(done, events));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIDDEN: usize = 4;

    fn starter(requests: u64) -> Starter<()> {
        let mut s = Starter::new(StarterConfig {
            n_nodes: 2,
            hidden: HIDDEN,
            wire: WireDtype::F32,
            max_message: 1 << 20,
            context: 64,
            in_flight: 8,
            kv_bytes_per_position: 1,
            kv_cap_bytes: 1 << 20,
        });
        for id in 0..requests {
            s.submit(
                id,
                SeqRequest {
                    prompt_tokens: vec![1, 2],
                    max_tokens: 10,
                    params: SamplingParams::default(),
                    eos_ids: Vec::new(),
                },
            );
        }
        s.pump(&mut Vec::new());
        s
    }

    /// Runs a feed job as the starter's layers would, and brings its last position back
    /// from the ring as the next node would: the sequence's head is then ready.
    fn feed_and_return(s: &mut Starter<()>, job: Job<()>) {
        let Task::Forward {
            input: JobInput::Tokens(tokens),
            ..
        } = job.task
        else {
            panic!("expected a feed job, got {:?}", job.task);
        };
        let n = tokens.len();
        let done = Done {
            seq: job.seq,
            cache: Some(()),
            output: Ok(StageOutput::Hidden(vec![0.5; n * HIDDEN])),
        };
        let sent = s.complete(done, &mut Vec::new());
        assert!(!sent.is_empty(), "the feed's activations go to node 1");
        let back = wire::encode_activation(
            job.seq,
            n as u32 - 1,
            HIDDEN,
            &[0.25; HIDDEN],
            WireDtype::F32,
            1 << 20,
        );
        for m in back {
            s.handle(&m, &mut Vec::new());
        }
    }

    fn kinds(jobs: &[Job<()>]) -> Vec<(u64, &'static str)> {
        jobs.iter()
            .map(|j| match j.task {
                Task::Head { .. } => (j.seq, "head"),
                Task::Forward { .. } => (j.seq, "feed"),
            })
            .collect()
    }

    #[test]
    fn a_step_takes_its_share_of_heads_and_of_feeds_without_splitting_either() {
        let mut s = starter(4);
        // Two sequences' feeds run and come back: their heads queue behind the other two feeds.
        let first = s.next_jobs(2, 8);
        assert_eq!(kinds(&first), [(1, "feed"), (2, "feed")]);
        for job in first {
            feed_and_return(&mut s, job);
        }
        assert_eq!(s.ready_jobs(), 4);
        // One step runs both feeds and both heads (one count would have taken the feeds only).
        let step = s.next_jobs(2, 8);
        assert_eq!(
            kinds(&step),
            [(3, "feed"), (4, "feed"), (1, "head"), (2, "head")]
        );
        assert_eq!(s.ready_jobs(), 0);
    }

    #[test]
    fn jobs_over_a_share_or_the_batch_limit_wait_in_order() {
        let mut s = starter(4);
        for job in s.next_jobs(2, 8) {
            feed_and_return(&mut s, job);
        }
        // Ready: feeds 3, 4, heads 1, 2 (sequences are numbered from 1). A share of one: one of each, the rest keep order.
        assert_eq!(kinds(&s.next_jobs(1, 8)), [(3, "feed"), (1, "head")]);
        assert_eq!(kinds(&s.next_jobs(1, 8)), [(4, "feed"), (2, "head")]);
        assert!(s.next_jobs(1, 8).is_empty());

        let mut s = starter(4);
        for job in s.next_jobs(2, 8) {
            feed_and_return(&mut s, job);
        }
        // The batch limit holds over both kinds.
        assert_eq!(
            kinds(&s.next_jobs(2, 3)),
            [(3, "feed"), (4, "feed"), (1, "head")]
        );
        assert_eq!(kinds(&s.next_jobs(2, 3)), [(2, "head")]);
    }
}
