//! The ring put together without any transport: stage specs from a plan, and [`LocalRing`],
//! which passes messages between a starter and its nodes through in-memory queues. Tests use
//! it to check the protocol deterministically; real rings run the same starter and nodes over
//! WebRTC.

use std::collections::VecDeque;
use std::ops::Range;

use crate::engine::StageEngine;
use crate::node::Node;
use crate::starter::{Event, Finish, SeqRequest, Starter};

/// Stage specs for layer ranges in ring order: the starter (first) also embeds and runs the
/// head; the others run their layers only.
pub fn stage_specs(ranges: &[Range<usize>]) -> Vec<crate::weights::StageSpec> {
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| crate::weights::StageSpec {
            layers: r.clone(),
            embed: i == 0,
            head: i == 0,
        })
        .collect()
}

/// Even contiguous ranges of `n_layers` over `n` nodes (for tests and quick runs).
pub fn even_ranges(n_layers: usize, n: usize) -> Vec<Range<usize>> {
    (0..n)
        .map(|i| (i * n_layers / n)..((i + 1) * n_layers / n))
        .collect()
}

/// What one request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub finish: Option<Finish>,
}

/// A starter and its nodes linked by in-memory queues.
pub struct LocalRing<E: StageEngine> {
    pub starter: Starter<E>,
    pub nodes: Vec<Node<E>>,
    /// Inbox of each ring position; 0 is the starter.
    pub inbox: Vec<VecDeque<Vec<u8>>>,
    /// Problems nodes reported that belong to no sequence.
    pub node_errors: Vec<String>,
}

impl<E: StageEngine> LocalRing<E> {
    pub fn new(starter: Starter<E>, nodes: Vec<Node<E>>) -> Self {
        let n = nodes.len() + 1;
        Self {
            starter,
            nodes,
            inbox: vec![VecDeque::new(); n],
            node_errors: Vec::new(),
        }
    }

    fn record(&mut self, events: Vec<Event>, outcomes: &mut [Outcome]) {
        for e in events {
            match e {
                Event::Token { index, token } => outcomes[index].tokens.push(token),
                Event::Done { index, finish } => outcomes[index].finish = Some(finish),
                Event::NodeError { node, message } => {
                    self.node_errors.push(format!("node {node}: {message}"))
                }
            }
        }
    }

    /// Run `requests` to completion; outcomes in request order.
    pub fn run(&mut self, requests: Vec<SeqRequest>) -> Vec<Outcome> {
        let mut outcomes = vec![
            Outcome {
                tokens: Vec::new(),
                finish: None,
            };
            requests.len()
        ];
        for (i, r) in requests.into_iter().enumerate() {
            self.starter.submit(i, r);
        }
        let n = self.inbox.len();
        let mut events = Vec::new();
        let out = self.starter.pump(&mut events);
        self.record(std::mem::take(&mut events), &mut outcomes);
        self.inbox[1 % n].extend(out);
        // One message per position per round, so sequences overlap as in a real pipeline.
        while !self.starter.is_idle() || self.inbox.iter().any(|q| !q.is_empty()) {
            let mut progressed = false;
            for pos in 0..n {
                let Some(msg) = self.inbox[pos].pop_front() else {
                    continue;
                };
                progressed = true;
                let out = if pos == 0 {
                    let out = self.starter.handle(&msg, &mut events);
                    self.record(std::mem::take(&mut events), &mut outcomes);
                    out
                } else {
                    self.nodes[pos - 1].handle(&msg)
                };
                self.inbox[(pos + 1) % n].extend(out);
            }
            if !progressed {
                // Idle queues with sequences in flight would be a protocol bug: stop, the
                // caller sees the missing finishes.
                break;
            }
        }
        outcomes
    }
}
