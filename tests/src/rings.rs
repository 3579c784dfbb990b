//! Rings of CPU oracles linked by in-memory queues, and the single-node reference they are
//! compared with.

use mdi::generate::{generate, Request};
use mdi_core::node::{Node, NodeConfig};
use mdi_core::ring::{even_ranges, stage_specs, LocalRing};
use mdi_core::starter::{SeqRequest, Starter, StarterConfig};
use mdi_core::weights::TensorStore;
use mdi_core::wire::WireDtype;
use mdi_core::{Config, Oracle, SamplingParams, StageSpec, StageWeights};

pub fn oracle(store: &dyn TensorStore, config: &Config, spec: &StageSpec) -> Oracle {
    Oracle::new(
        config.clone(),
        StageWeights::load(store, config, spec).unwrap(),
    )
    .unwrap()
}

/// A ring of `n` nodes over even layer ranges, `in_flight` sequences at once.
pub fn build_ring(
    store: &dyn TensorStore,
    config: &Config,
    n: usize,
    in_flight: usize,
    wire: WireDtype,
    max_message: usize,
) -> LocalRing<Oracle> {
    build_ring_with_kv_cap(store, config, n, in_flight, wire, max_message, u64::MAX)
}

/// [`build_ring`] with a cap on each secondary node's KV memory.
pub fn build_ring_with_kv_cap(
    store: &dyn TensorStore,
    config: &Config,
    n: usize,
    in_flight: usize,
    wire: WireDtype,
    max_message: usize,
    kv_cap_bytes: u64,
) -> LocalRing<Oracle> {
    let specs = stage_specs(&even_ranges(config.n_layers, n));
    let starter_engine = oracle(store, config, &specs[0]);
    let starter = Starter::new(StarterConfig {
        n_nodes: n,
        hidden: config.hidden,
        wire,
        max_message,
        context: config.context,
        in_flight,
        kv_bytes_per_position: starter_engine.cache_bytes(1) as u64,
        kv_cap_bytes: u64::MAX,
    });
    let nodes = specs[1..]
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let engine = oracle(store, config, spec);
            let node = Node::new(NodeConfig {
                index: i as u32 + 1,
                is_last: i + 2 == n,
                hidden: config.hidden,
                wire,
                max_message,
                max_positions: config.context,
                max_tokens: config.context,
                max_sequences: 64,
                max_partials: 2,
                max_held_bytes: NodeConfig::default_held_bytes(config.context, config.hidden),
                kv_bytes_per_position: engine.cache_bytes(1) as u64,
                kv_cap_bytes,
            });
            (node, engine)
        })
        .collect();
    LocalRing::new(starter, starter_engine, nodes)
}

pub fn single_node(store: &dyn TensorStore, config: &Config, req: &SeqRequest) -> Vec<u32> {
    let mut engine = oracle(store, config, &StageSpec::whole(config));
    let r = Request {
        prompt_tokens: req.prompt_tokens.clone(),
        max_tokens: req.max_tokens,
        params: req.params,
        eos_ids: req.eos_ids.clone(),
        context: config.context,
    };
    generate(&mut engine, &r, |_| Ok(())).unwrap().tokens
}

/// Greedy chat requests for the default model: question `i` wrapped in the chat template,
/// with a budget of `max_tokens(i)`.
pub fn chat_requests(
    model: &mdi::Model,
    questions: &[&str],
    max_tokens: impl Fn(usize) -> usize,
) -> anyhow::Result<Vec<SeqRequest>> {
    let tok = &model.tokenizer;
    questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            Ok(SeqRequest {
                prompt_tokens: tok.encode(&tok.chat_prompt(q)?, false)?,
                max_tokens: max_tokens(i),
                params: SamplingParams::default(),
                eos_ids: model.config.eos_ids.clone(),
            })
        })
        .collect()
}

/// [`single_node`] for each request: the tokens a ring must reproduce.
pub fn single_node_all(
    store: &dyn TensorStore,
    config: &Config,
    reqs: &[SeqRequest],
) -> Vec<Vec<u32>> {
    reqs.iter().map(|r| single_node(store, config, r)).collect()
}
