//! The partition planner: cut the model's layers into contiguous ranges, one per node in ring
//! order (starter first), so that the slowest stage — the pipeline's bottleneck — is as fast
//! as possible while every node stays within its memory budget.
//!
//! Costs come from the model itself (weight bytes read from the tensor table, KV bytes per
//! token, multiply-adds per token); nodes bring a memory budget and a measured speed. A
//! dynamic program over (nodes, layers) finds the optimal bottleneck exactly.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::weights::{Role, TensorStore};

/// What the model costs, layer by layer, plus the starter's extra work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCost {
    /// Weight bytes of each layer as stored.
    pub layer_weight_bytes: Vec<u64>,
    /// KV cache bytes one layer holds per token of context (f32 keys and values).
    pub kv_bytes_per_token: u64,
    /// Multiply-adds per token of each layer.
    pub layer_work: Vec<f64>,
    /// Weight bytes only the starter holds: embedding, final norm, LM head.
    pub starter_weight_bytes: u64,
    /// Multiply-adds per token only the starter does: the LM head (and sampling).
    pub starter_work: f64,
}

impl ModelCost {
    /// Costs read from a tensor store: real stored sizes of every tensor.
    pub fn from_store(store: &dyn TensorStore, config: &Config) -> Result<Self> {
        let bytes = |role: Role, layer: usize| -> Result<u64> {
            let name = store.tensor_name(role, layer);
            let (dtype, shape) = store.info(&name).ok_or_else(|| Error::MissingTensor {
                file: store.file().to_string(),
                tensor: name.clone(),
            })?;
            let n: usize = shape.iter().product();
            Ok(dtype.bytes_for(n).unwrap_or(n * 4) as u64)
        };
        let mut layer_weight_bytes = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let mut total = 0;
            for role in [
                Role::AttnNorm,
                Role::Wq,
                Role::Wk,
                Role::Wv,
                Role::Wo,
                Role::FfnNorm,
                Role::Gate,
                Role::Up,
                Role::Down,
            ] {
                total += bytes(role, i)?;
            }
            if config.qkv_bias {
                total += bytes(Role::Bq, i)? + bytes(Role::Bk, i)? + bytes(Role::Bv, i)?;
            }
            layer_weight_bytes.push(total);
        }
        let mut starter = bytes(Role::Embed, 0)? + bytes(Role::OutputNorm, 0)?;
        if !config.tied_embeddings {
            starter += bytes(Role::Head, 0)?;
        }
        Ok(Self::with_weights(config, layer_weight_bytes, starter))
    }

    /// Costs for a model whose weights all take `bytes_per_value` (for planning before the
    /// file is opened, and in tests).
    pub fn estimate(config: &Config, bytes_per_value: f64) -> Self {
        let c = config;
        let per_layer = (2 * c.hidden
            + 2 * c.hidden * c.q_dim()
            + 2 * c.hidden * c.kv_dim()
            + 3 * c.hidden * c.ffn) as f64;
        let head = if c.tied_embeddings { 1.0 } else { 2.0 };
        Self::with_weights(
            c,
            vec![(per_layer * bytes_per_value) as u64; c.n_layers],
            ((head * (c.vocab * c.hidden) as f64 + c.hidden as f64) * bytes_per_value) as u64,
        )
    }

    /// Multiply-adds per token of one layer's matrices (Q, K, V, output, gate, up, down): the
    /// unit of every speed the planner compares, here and in a node's self-benchmark.
    pub fn layer_macs(c: &Config) -> f64 {
        (c.hidden * (c.q_dim() + 2 * c.kv_dim()) + c.q_dim() * c.hidden + 3 * c.hidden * c.ffn)
            as f64
    }

    fn with_weights(c: &Config, layer_weight_bytes: Vec<u64>, starter_weight_bytes: u64) -> Self {
        let per_layer = Self::layer_macs(c);
        Self {
            layer_work: vec![per_layer; c.n_layers],
            layer_weight_bytes,
            kv_bytes_per_token: (2 * c.kv_dim() * 4) as u64,
            starter_weight_bytes,
            starter_work: (c.vocab * c.hidden) as f64,
        }
    }

    pub fn n_layers(&self) -> usize {
        self.layer_weight_bytes.len()
    }

    pub fn total_weight_bytes(&self) -> u64 {
        self.layer_weight_bytes.iter().sum::<u64>() + self.starter_weight_bytes
    }
}

/// One node's resources.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NodeProfile {
    /// Bytes this node may spend on weights and KV caches.
    pub memory_budget: u64,
    /// Measured speed in multiply-adds per second (only ratios between nodes matter).
    pub speed: f64,
    /// Bytes the node's engine holds per stored weight byte: 1 for engines that keep weights
    /// in their stored blocks, about 6 for the f32 oracle on a 4-bit file.
    #[serde(default = "one")]
    pub weight_factor: f64,
}

fn one() -> f64 {
    1.0
}

impl NodeProfile {
    /// A node that keeps weights as stored.
    pub fn new(memory_budget: u64, speed: f64) -> Self {
        Self {
            memory_budget,
            speed,
            weight_factor: 1.0,
        }
    }
}

/// A node's share of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub layers: Range<usize>,
    /// Weight bytes the node holds (the starter's include embedding and head).
    pub weight_bytes: u64,
    /// KV bytes reserved for the planned context.
    pub kv_bytes: u64,
    /// Seconds per token of this stage at the node's speed.
    pub seconds_per_token: f64,
}

/// The partition: one assignment per node in ring order, starter first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub nodes: Vec<Assignment>,
    /// The slowest stage's seconds per token: the pipeline's bottleneck.
    pub bottleneck: f64,
}

/// Plan a ring over `nodes` (ring order, starter first), reserving KV memory for
/// `kv_tokens` tokens of context on every node (sequences in flight × positions each).
/// Every node gets at least one layer.
pub fn plan(cost: &ModelCost, nodes: &[NodeProfile], kv_tokens: u64) -> Result<Plan> {
    let n = nodes.len();
    let l = cost.n_layers();
    if n == 0 {
        return Err(Error::Input("a ring needs at least one node".into()));
    }
    if n > l {
        return Err(Error::Input(format!(
            "{n} nodes cannot share {l} layers: every node needs at least one layer"
        )));
    }
    if let Some(bad) = nodes
        .iter()
        .position(|p| !(p.speed.is_finite() && p.speed > 0.0))
    {
        return Err(Error::Input(format!("node {bad} has no positive speed")));
    }
    if let Some(bad) = nodes
        .iter()
        .position(|p| !(p.weight_factor.is_finite() && p.weight_factor >= 1.0))
    {
        return Err(Error::Input(format!(
            "node {bad} has a weight factor below 1"
        )));
    }
    // Prefix sums so any range's cost is O(1).
    let mut pw = vec![0u64; l + 1];
    let mut pt = vec![0f64; l + 1];
    for i in 0..l {
        pw[i + 1] = pw[i] + cost.layer_weight_bytes[i];
        pt[i + 1] = pt[i] + cost.layer_work[i];
    }
    let kv_per_layer = cost.kv_bytes_per_token.saturating_mul(kv_tokens);
    let stage = |node: usize, a: usize, b: usize| -> Option<(u64, u64, f64)> {
        let extra_w = if node == 0 {
            cost.starter_weight_bytes
        } else {
            0
        };
        let extra_t = if node == 0 { cost.starter_work } else { 0.0 };
        let weights = pw[b] - pw[a] + extra_w;
        let kv = kv_per_layer.saturating_mul((b - a) as u64);
        let resident = (weights as f64 * nodes[node].weight_factor) as u64;
        if resident.saturating_add(kv) > nodes[node].memory_budget {
            return None;
        }
        Some((weights, kv, (pt[b] - pt[a] + extra_t) / nodes[node].speed))
    };
    // best[i][j]: the smallest bottleneck placing layers [0, j) on nodes [0, i].
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; l + 1]; n];
    let mut cut = vec![vec![0usize; l + 1]; n];
    for (j, b) in best[0].iter_mut().enumerate().skip(1) {
        if let Some((_, _, t)) = stage(0, 0, j) {
            *b = t;
        }
    }
    for i in 1..n {
        for j in i + 1..=l {
            for k in i..j {
                if best[i - 1][k] == inf {
                    continue;
                }
                if let Some((_, _, t)) = stage(i, k, j) {
                    let b = best[i - 1][k].max(t);
                    if b < best[i][j] {
                        best[i][j] = b;
                        cut[i][j] = k;
                    }
                }
            }
        }
    }
    if best[n - 1][l] == inf {
        // Engines hold weights in their own form (the oracle's f32 is several times the
        // file): say what these nodes would need, not only the stored size.
        let stored = cost.total_weight_bytes();
        let factor = nodes
            .iter()
            .map(|p| p.weight_factor)
            .fold(f64::INFINITY, f64::min);
        let total = (stored as f64 * factor) as u64 + kv_per_layer * l as u64;
        let budget: u64 = nodes.iter().map(|p| p.memory_budget).sum();
        return Err(Error::Input(format!(
            "the model does not fit: it needs at least {total} bytes of weights and KV cache \
             on these nodes' engines ({stored} bytes of weights as stored, held at {factor:.1}× \
             that), in one contiguous piece of layers per node; the {n} nodes offer {budget} \
             bytes in all; add nodes, give them more memory, or plan fewer tokens of context"
        )));
    }
    let mut bounds = vec![l; n + 1];
    bounds[0] = 0;
    for i in (1..n).rev() {
        bounds[i] = cut[i][bounds[i + 1]];
    }
    let assignments = (0..n)
        .map(|i| {
            let (a, b) = (bounds[i], bounds[i + 1]);
            let (weight_bytes, kv_bytes, seconds_per_token) =
                stage(i, a, b).expect("the plan only uses feasible stages");
            Assignment {
                layers: a..b,
                weight_bytes,
                kv_bytes,
                seconds_per_token,
            }
        })
        .collect();
    Ok(Plan {
        nodes: assignments,
        bottleneck: best[n - 1][l],
    })
}

/// Plan a ring over `nodes`, trying each as the starter (which holds the embedding and head)
/// and keeping the others in their given order after it. Returns the ring order (indices
/// into `nodes`, starter first) and its plan: the fastest bottleneck found.
pub fn plan_ring(
    cost: &ModelCost,
    nodes: &[NodeProfile],
    kv_tokens: u64,
) -> Result<(Vec<usize>, Plan)> {
    let mut best: Option<(Vec<usize>, Plan)> = None;
    let mut last_err = None;
    for first in 0..nodes.len() {
        let order: Vec<usize> = (0..nodes.len())
            .map(|i| (first + i) % nodes.len())
            .collect();
        let profiles: Vec<NodeProfile> = order.iter().map(|&i| nodes[i]).collect();
        match plan(cost, &profiles, kv_tokens) {
            Ok(p) => {
                if best
                    .as_ref()
                    .is_none_or(|(_, b)| p.bottleneck < b.bottleneck)
                {
                    best = Some((order, p));
                }
            }
            Err(e) => last_err = Some(e),
        }
    }
    best.ok_or_else(|| {
        last_err.unwrap_or_else(|| Error::Input("a ring needs at least one node".into()))
    })
}
