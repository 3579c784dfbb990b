//! The starter node, sans-IO: it tokenizes nothing itself (prompts arrive as ids) but owns
//! everything else about sequences. It admits up to S sequences at once, runs the embedding and
//! its own layers, sends activations around the ring, and when they come back applies the final
//! norm + head, samples, and sends the next token on its way — while other sequences occupy
//! the other nodes (recurrent pipeline parallelism). A waiting sequence is admitted as soon as
//! one finishes. Each sequence has its own sampling parameters and stop rule.

use std::collections::{HashMap, VecDeque};

use crate::engine::{StageEngine, StageOutput, Want};
use crate::oracle::StageInput;
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
    Eos,
    MaxTokens,
    /// The sequence failed; the others go on.
    Error(String),
}

/// What the starter reports as it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token was sampled for the request with this index.
    Token { index: usize, token: u32 },
    /// The request ended.
    Done { index: usize, finish: Finish },
    /// A node reported a problem not tied to a sequence (a garbage frame).
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
}

struct Seq<C> {
    index: usize,
    cache: C,
    sampler: Sampler,
    req: SeqRequest,
    generated: usize,
    /// Position of the next token to feed.
    pos: usize,
    positions: usize,
}

/// The starter's state.
pub struct Starter<E: StageEngine> {
    cfg: StarterConfig,
    engine: E,
    seqs: HashMap<u64, Seq<E::Cache>>,
    waiting: VecDeque<(usize, SeqRequest)>,
    /// Hidden rows that came back around a one-node ring, handled without a transport.
    looped: VecDeque<(u64, Vec<f32>)>,
    reassembler: Reassembler,
    next_seq: u64,
    kv_used: usize,
    kv_peak: usize,
}

impl<E: StageEngine> Starter<E> {
    pub fn new(cfg: StarterConfig, engine: E) -> Self {
        Self {
            reassembler: Reassembler::new(cfg.hidden, 1),
            cfg,
            engine,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            looped: VecDeque::new(),
            next_seq: 1,
            kv_used: 0,
            kv_peak: 0,
        }
    }

    /// Queue a request; `index` names it in events.
    pub fn submit(&mut self, index: usize, req: SeqRequest) {
        self.waiting.push_back((index, req));
    }

    /// Nothing in flight and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty() && self.waiting.is_empty() && self.looped.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.seqs.len()
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Bytes held by this node's KV caches now, and at most so far.
    pub fn kv_bytes(&self) -> (usize, usize) {
        (self.kv_used, self.kv_peak)
    }

    /// Admit waiting sequences while there is room; returns messages for node 1.
    pub fn pump(&mut self, events: &mut Vec<Event>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            while self.seqs.len() < self.cfg.in_flight.max(1) {
                let Some((index, req)) = self.waiting.pop_front() else {
                    break;
                };
                self.admit(index, req, &mut out, events);
            }
            if self.looped.is_empty() {
                break;
            }
            // A one-node ring: what the starter sent comes straight back.
            self.drain_loop(&mut out, events);
        }
        out
    }

    /// Handle a message that came back around the ring; returns messages for node 1.
    pub fn handle(&mut self, msg: &[u8], events: &mut Vec<Event>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        match wire::decode(msg) {
            Err(e) => events.push(Event::NodeError {
                node: 0,
                message: e.to_string(),
            }),
            Ok(Message::Control(Control::Error { seq, node, message })) => match seq {
                Some(seq) if self.seqs.contains_key(&seq) => {
                    let msg = format!("node {node}: {message}");
                    self.finish(seq, Finish::Error(msg), &mut out, events);
                }
                _ => events.push(Event::NodeError { node, message }),
            },
            // Start and End come back after visiting every node: nothing more to do.
            Ok(Message::Control(_)) => {}
            Ok(Message::Activation(chunk)) => {
                let seq = chunk.seq;
                match self.reassembler.push(chunk) {
                    Err(e) => {
                        if self.seqs.contains_key(&seq) {
                            self.finish(seq, Finish::Error(e.to_string()), &mut out, events);
                        } else {
                            events.push(Event::NodeError {
                                node: 0,
                                message: e.to_string(),
                            });
                        }
                    }
                    Ok(None) => {}
                    Ok(Some(act)) => self.returned(act, &mut out, events),
                }
            }
        }
        self.pump_into(&mut out, events);
        out
    }

    fn pump_into(&mut self, out: &mut Vec<Vec<u8>>, events: &mut Vec<Event>) {
        let more = self.pump(events);
        out.extend(more);
    }

    fn drain_loop(&mut self, out: &mut Vec<Vec<u8>>, events: &mut Vec<Event>) {
        while let Some((seq, hidden)) = self.looped.pop_front() {
            self.next_token(seq, &hidden, out, events);
        }
    }

    fn admit(
        &mut self,
        index: usize,
        req: SeqRequest,
        out: &mut Vec<Vec<u8>>,
        events: &mut Vec<Event>,
    ) {
        let n = req.prompt_tokens.len();
        let fail = |events: &mut Vec<Event>, m: String| {
            events.push(Event::Done {
                index,
                finish: Finish::Error(m),
            })
        };
        if n == 0 {
            return fail(events, "the prompt is empty".into());
        }
        if n >= self.cfg.context {
            return fail(
                events,
                format!(
                    "the prompt has {n} tokens but the model's context holds {} positions",
                    self.cfg.context
                ),
            );
        }
        if req.max_tokens == 0 {
            events.push(Event::Done {
                index,
                finish: Finish::MaxTokens,
            });
            return;
        }
        // The last generated token is never fed back, so it needs no position.
        let positions = (n + req.max_tokens - 1).min(self.cfg.context);
        let cache = match self.engine.new_cache(positions) {
            Ok(c) => c,
            Err(e) => return fail(events, e.to_string()),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.kv_used += self.engine.cache_bytes(positions);
        self.kv_peak = self.kv_peak.max(self.kv_used);
        out.push(wire::encode_control(&Control::Start {
            seq,
            positions: positions as u32,
        }));
        self.seqs.insert(
            seq,
            Seq {
                index,
                cache,
                sampler: Sampler::new(req.params),
                req,
                generated: 0,
                pos: 0,
                positions,
            },
        );
        let prompt = self.seqs[&seq].req.prompt_tokens.clone();
        self.feed(seq, &prompt, out, events);
    }

    /// Run the embedding and the starter's layers on `tokens` and send them around the ring.
    fn feed(&mut self, seq: u64, tokens: &[u32], out: &mut Vec<Vec<u8>>, events: &mut Vec<Event>) {
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        if s.pos + tokens.len() > s.positions {
            let m = format!(
                "the sequence outgrew its context of {} positions",
                s.positions
            );
            return self.finish(seq, Finish::Error(m), out, events);
        }
        let first_pos = s.pos;
        let result = self
            .engine
            .forward(&mut s.cache, StageInput::Tokens(tokens), Want::Hidden);
        let hidden = match result {
            Ok(StageOutput::Hidden(h)) => h,
            Ok(other) => {
                let m = format!("starter stage returned {other:?}");
                return self.finish(seq, Finish::Error(m), out, events);
            }
            Err(e) => return self.finish(seq, Finish::Error(e.to_string()), out, events),
        };
        s.pos += tokens.len();
        if self.cfg.n_nodes == 1 {
            let last = hidden[hidden.len() - self.cfg.hidden..].to_vec();
            self.looped.push_back((seq, last));
        } else {
            out.extend(wire::encode_activation(
                seq,
                first_pos as u32,
                self.cfg.hidden,
                &hidden,
                self.cfg.wire,
                self.cfg.max_message,
            ));
        }
    }

    fn returned(&mut self, act: Activation, out: &mut Vec<Vec<u8>>, events: &mut Vec<Event>) {
        let Some(s) = self.seqs.get(&act.seq) else {
            // A sequence that already ended (an error overtook its activation).
            return;
        };
        if act.n_tokens != 1 || act.first_pos as usize + 1 != s.pos {
            let m = format!(
                "activation for position {} came back, expected {}",
                act.first_pos,
                s.pos.saturating_sub(1)
            );
            return self.finish(act.seq, Finish::Error(m), out, events);
        }
        self.next_token(act.seq, &act.data, out, events);
    }

    /// Head + sampling on the returned row, then stop or feed the new token.
    fn next_token(
        &mut self,
        seq: u64,
        hidden: &[f32],
        out: &mut Vec<Vec<u8>>,
        events: &mut Vec<Event>,
    ) {
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        let want = if s.req.params.is_greedy() {
            Want::Argmax
        } else {
            Want::Logits
        };
        let token = match self.engine.head(hidden, want) {
            Ok(StageOutput::Token(t)) => t,
            Ok(StageOutput::Logits(l)) => s.sampler.sample(&l),
            Ok(other) => {
                let m = format!("head returned {other:?}");
                return self.finish(seq, Finish::Error(m), out, events);
            }
            Err(e) => return self.finish(seq, Finish::Error(e.to_string()), out, events),
        };
        s.generated += 1;
        events.push(Event::Token {
            index: s.index,
            token,
        });
        if s.req.eos_ids.contains(&token) {
            return self.finish(seq, Finish::Eos, out, events);
        }
        if s.generated >= s.req.max_tokens {
            return self.finish(seq, Finish::MaxTokens, out, events);
        }
        self.feed(seq, &[token], out, events);
    }

    fn finish(
        &mut self,
        seq: u64,
        finish: Finish,
        out: &mut Vec<Vec<u8>>,
        events: &mut Vec<Event>,
    ) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.kv_used -= self.engine.cache_bytes(s.positions);
            self.reassembler.drop_sequence(seq);
            self.looped.retain(|(q, _)| *q != seq);
            if self.cfg.n_nodes > 1 {
                out.push(wire::encode_control(&Control::End { seq }));
            }
            events.push(Event::Done {
                index: s.index,
                finish,
            });
        }
    }
}
