//! The ring put together without any transport: stage specs from a plan, and [`LocalRing`],
//! which passes messages between a starter and its nodes through in-memory queues and runs
//! their jobs on blocking engines. Tests use it to check the protocol deterministically, and a
//! one-node `LocalRing` is the single-node generation loop; real rings run the same starter
//! and nodes over WebRTC through the runtime crate.

use std::collections::VecDeque;
use std::ops::Range;

use crate::engine::StageEngine;
use crate::node::Node;
use crate::starter::{Event, Finish, SeqRequest, Starter};
use crate::weights::StageSpec;

/// Stage specs for layer ranges in ring order: the starter (first) also embeds and runs the
/// head; the others run their layers only.
pub fn stage_specs(ranges: &[Range<usize>]) -> Vec<StageSpec> {
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| StageSpec {
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

/// A secondary node and the engine that runs its jobs.
pub struct LocalNode<E: StageEngine> {
    pub node: Node<E::Cache>,
    pub engine: E,
}

impl<E: StageEngine> LocalNode<E> {
    /// Bytes held by the node's KV caches now, and at most so far.
    pub fn kv_bytes(&self) -> (u64, u64) {
        self.node.kv_bytes()
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Sequences configured on the node.
    pub fn live_sequences(&self) -> usize {
        self.node.live_sequences()
    }
}

/// A starter and its nodes linked by in-memory queues.
pub struct LocalRing<E: StageEngine> {
    pub starter: Starter<E::Cache>,
    pub starter_engine: E,
    pub nodes: Vec<LocalNode<E>>,
    /// Inbox of each ring position; 0 is the starter.
    pub inbox: Vec<VecDeque<Vec<u8>>>,
    /// Problems nodes reported that belong to no sequence.
    pub node_errors: Vec<String>,
}

impl<E: StageEngine> LocalRing<E> {
    pub fn new(
        starter: Starter<E::Cache>,
        starter_engine: E,
        nodes: Vec<(Node<E::Cache>, E)>,
    ) -> Self {
        let n = nodes.len() + 1;
        Self {
            starter,
            starter_engine,
            nodes: nodes
                .into_iter()
                .map(|(node, engine)| LocalNode { node, engine })
                .collect(),
            inbox: vec![VecDeque::new(); n],
            node_errors: Vec::new(),
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
        let ids: Vec<u64> = (0..requests.len() as u64).collect();
        for (id, r) in ids.iter().zip(requests) {
            self.starter.submit(*id, r);
        }
        let errors = &mut self.node_errors;
        let mut record = |e: Event| match e {
            Event::Token { id, token } => outcomes[id as usize].tokens.push(token),
            Event::Done { id, finish } => outcomes[id as usize].finish = Some(finish),
            Event::NodeError { node, message } => errors.push(format!("node {node}: {message}")),
        };
        run_until_idle(
            &mut self.starter,
            &mut self.starter_engine,
            &mut self.nodes,
            &mut self.inbox,
            &mut record,
        );
        outcomes
    }

    /// Run what was submitted to the starter until it is idle, reporting every event as it
    /// happens (tokens stream to the caller).
    pub fn run_streaming(&mut self, on_event: &mut dyn FnMut(Event)) {
        run_until_idle(
            &mut self.starter,
            &mut self.starter_engine,
            &mut self.nodes,
            &mut self.inbox,
            on_event,
        );
    }
}

fn run_until_idle<E: StageEngine>(
    starter: &mut Starter<E::Cache>,
    starter_engine: &mut E,
    nodes: &mut [LocalNode<E>],
    inbox: &mut [VecDeque<Vec<u8>>],
    on_event: &mut dyn FnMut(Event),
) {
    let n = inbox.len();
    let mut events = Vec::new();
    let out = starter.pump(&mut events);
    inbox[1 % n].extend(out);
    // One message (and the jobs it enables) per position per round, so sequences overlap as
    // in a real pipeline.
    loop {
        let mut progressed = false;
        for pos in 0..n {
            let out = if pos == 0 {
                let mut out = Vec::new();
                if let Some(msg) = inbox[0].pop_front() {
                    out.extend(starter.handle(&msg, &mut events));
                    progressed = true;
                }
                if let Some(job) = starter.next_job() {
                    let done = job.run(starter_engine);
                    out.extend(starter.complete(done, &mut events));
                    progressed = true;
                }
                events.drain(..).for_each(&mut *on_event);
                out
            } else {
                let Some(msg) = inbox[pos].pop_front() else {
                    continue;
                };
                progressed = true;
                let ln = &mut nodes[pos - 1];
                ln.node.handle_blocking(&msg, &mut ln.engine)
            };
            inbox[(pos + 1) % n].extend(out);
        }
        if !progressed {
            // Idle queues with sequences in flight would be a protocol bug: stop, the caller
            // sees the missing finishes.
            break;
        }
    }
}
