//! A secondary ring node, sans-IO: messages in → this node's layers for that sequence →
//! messages out to the next node. Transports (in-process channels, WebRTC) only move bytes.
//!
//! The node keeps one KV cache per sequence for its own layers, created on the sequence's
//! first activation and freed when the sequence ends. Total KV memory is capped: a new sequence
//! that would pass the cap waits (backpressure) until another ends, instead of running out.
//! Anything wrong with one message or one sequence becomes an error message that travels on to
//! the starter; the node and the other sequences keep going.

use std::collections::{HashMap, VecDeque};

use crate::engine::{StageEngine, StageOutput, Want};
use crate::error::{Error, Result};
use crate::oracle::StageInput;
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
    /// Positions for a sequence whose start message did not say.
    pub default_positions: usize,
    /// Most tokens one activation may carry (a prefill).
    pub max_tokens: usize,
    /// Cap on the bytes of all KV caches together.
    pub kv_cap_bytes: usize,
}

struct Seq<C> {
    cache: C,
    bytes: usize,
}

/// A ring node's state: its engine and the caches of the sequences passing through.
pub struct Node<E: StageEngine> {
    cfg: NodeConfig,
    engine: E,
    seqs: HashMap<u64, Seq<E::Cache>>,
    positions: HashMap<u64, usize>,
    waiting: VecDeque<Activation>,
    reassembler: Reassembler,
    kv_used: usize,
    kv_peak: usize,
}

impl<E: StageEngine> Node<E> {
    pub fn new(cfg: NodeConfig, engine: E) -> Self {
        Self {
            reassembler: Reassembler::new(cfg.hidden, cfg.max_tokens),
            cfg,
            engine,
            seqs: HashMap::new(),
            positions: HashMap::new(),
            waiting: VecDeque::new(),
            kv_used: 0,
            kv_peak: 0,
        }
    }

    /// Bytes held by KV caches now, and at most so far.
    pub fn kv_bytes(&self) -> (usize, usize) {
        (self.kv_used, self.kv_peak)
    }

    /// Sequences with a cache on this node.
    pub fn live_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Activations waiting for KV memory.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    fn error(&self, seq: Option<u64>, e: impl std::fmt::Display) -> Vec<u8> {
        wire::encode_control(&Control::Error {
            seq,
            node: self.cfg.index,
            message: e.to_string(),
        })
    }

    /// Handle one incoming message; returns the messages for the next hop.
    pub fn handle(&mut self, msg: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        match wire::decode(msg) {
            Err(e) => out.push(self.error(None, e)),
            Ok(Message::Control(c)) => {
                if let Control::Start { seq, positions } = c {
                    self.positions.insert(seq, positions as usize);
                }
                if let Control::End { seq } = c {
                    self.end(seq);
                }
                // Every control message travels on around the ring.
                out.push(msg.to_vec());
                if matches!(c, Control::End { .. }) {
                    self.run_waiting(&mut out);
                }
            }
            Ok(Message::Activation(chunk)) => {
                let seq = chunk.seq;
                match self.reassembler.push(chunk) {
                    Err(e) => out.push(self.error(Some(seq), e)),
                    Ok(None) => {}
                    Ok(Some(act)) => self.activation(act, &mut out),
                }
            }
        }
        out
    }

    fn end(&mut self, seq: u64) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.kv_used -= s.bytes;
        }
        self.positions.remove(&seq);
        self.reassembler.drop_sequence(seq);
        self.waiting.retain(|a| a.seq != seq);
    }

    fn run_waiting(&mut self, out: &mut Vec<Vec<u8>>) {
        while let Some(act) = self.waiting.pop_front() {
            let before = self.waiting.len();
            self.activation(act, out);
            if self.waiting.len() > before {
                // Still no room: it went back to the queue.
                break;
            }
        }
    }

    fn activation(&mut self, act: Activation, out: &mut Vec<Vec<u8>>) {
        let seq = act.seq;
        if let Err(e) = self.try_activation(act, out) {
            // The sequence cannot go on here: free what it holds and tell the starter.
            self.end(seq);
            out.push(self.error(Some(seq), e));
        }
    }

    fn try_activation(&mut self, act: Activation, out: &mut Vec<Vec<u8>>) -> Result<()> {
        let seq = act.seq;
        if !self.seqs.contains_key(&seq) {
            if act.first_pos != 0 {
                return Err(Error::Input(format!(
                    "activation at position {} for unknown sequence {seq}",
                    act.first_pos
                )));
            }
            let positions = *self
                .positions
                .get(&seq)
                .unwrap_or(&self.cfg.default_positions);
            let bytes = self.engine.cache_bytes(positions);
            if bytes > self.cfg.kv_cap_bytes {
                return Err(Error::Input(format!(
                    "sequence {seq} needs {bytes} bytes of KV cache, more than this node's \
                     cap of {} bytes",
                    self.cfg.kv_cap_bytes
                )));
            }
            if self.kv_used + bytes > self.cfg.kv_cap_bytes {
                // Backpressure: wait until a sequence ends and frees its cache.
                self.waiting.push_back(act);
                return Ok(());
            }
            let cache = self.engine.new_cache(positions)?;
            self.kv_used += bytes;
            self.kv_peak = self.kv_peak.max(self.kv_used);
            self.seqs.insert(seq, Seq { cache, bytes });
        }
        let s = self.seqs.get_mut(&seq).expect("inserted above");
        let at = self.engine.cache_len(&s.cache);
        if act.first_pos as usize != at {
            return Err(Error::Input(format!(
                "sequence {seq}: activation at position {} but the cache is at {at}",
                act.first_pos
            )));
        }
        let hidden =
            match self
                .engine
                .forward(&mut s.cache, StageInput::Hidden(&act.data), Want::Hidden)?
            {
                StageOutput::Hidden(h) => h,
                other => return Err(Error::Input(format!("stage returned {other:?}"))),
            };
        let h = self.cfg.hidden;
        let (first_pos, rows) = if self.cfg.is_last {
            // The starter's head needs only the last token.
            (
                act.first_pos + act.n_tokens - 1,
                &hidden[hidden.len() - h..],
            )
        } else {
            (act.first_pos, &hidden[..])
        };
        out.extend(wire::encode_activation(
            seq,
            first_pos,
            h,
            rows,
            self.cfg.wire,
            self.cfg.max_message,
        ));
        Ok(())
    }
}
