//! The control protocol between a node and the `signaling` server: JSON text messages over one
//! WebSocket per node. Native nodes and browser tabs speak it alike; the server is the only
//! party that plans, the nodes only report and obey.
//!
//! ```text
//! node                                   server
//! join {room, token, name, profile}  ─▶
//!                                    ◀─  welcome {id} | refused {reason}
//!                                    ◀─  assign {epoch, layers, prev, next, manifest, ...}
//! progress {done, total} ...         ─▶
//! signal {to, offer|answer}          ◀─▶ signal {from, ...}     (relayed between neighbours)
//! ready {epoch}                      ─▶
//!                                    ◀─  generate {request, prompt_tokens, ...}  (starter)
//! tokens {request, tokens}           ─▶
//! finished {request, finish}         ─▶
//! stats {...} every second           ─▶  (the heartbeat)
//! garbage {epoch, from, count, ...}   ─▶  (the previous node sends unusable frames)
//! ```
//!
//! Every message is checked against [`MAX_CONTROL_MESSAGE`] before it is parsed, on both sides.
//! A node reports a previous node whose frames it cannot use (`garbage`, at most once per
//! heartbeat while the count grows); the server drops a node reported for
//! `signaling::room::MAX_PEER_GARBAGE` such frames from the room, and the ring re-forms without
//! it.

use serde::{Deserialize, Serialize};

use mdi_core::plan::NodeProfile;
use mdi_core::wire::WireDtype;
use mdi_core::SamplingParams;

/// Largest control message either side accepts, in bytes.
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;

/// A node's id within the server (unique over the server's lifetime).
pub type NodeId = u64;

/// What kind of device a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Native,
    Browser,
}

/// What a node brings to the ring, measured by the node itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Bytes the node may spend on weights and KV caches.
    pub memory_budget: u64,
    /// The engine it runs: `cpu`, `oracle` or `gpu`.
    pub backend: String,
    /// The compute device, e.g. `llvmpipe (LLVM 15)` or the CPU's name.
    pub adapter: String,
    /// Measured speed: multiply-adds per second of a decode step on one layer of this model.
    pub speed: f64,
    /// Resident bytes per stored weight byte (see [`NodeProfile::weight_factor`]).
    pub weight_factor: f64,
}

impl Profile {
    pub fn planner_profile(&self) -> NodeProfile {
        NodeProfile {
            memory_budget: self.memory_budget,
            speed: self.speed,
            weight_factor: self.weight_factor,
        }
    }
}

/// What a node is told to be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Increases with every re-plan; messages of older epochs are ignored.
    pub epoch: u64,
    /// Position in the ring: 0 is the starter.
    pub index: u32,
    pub n_nodes: u32,
    /// Layers `[a, b)`.
    pub layers: [usize; 2],
    /// The node before this one in the ring (it offers the link to us), if any.
    pub prev: Option<NodeId>,
    /// The node after this one (we offer the link to it), if any.
    pub next: Option<NodeId>,
    /// Where the model manifest is.
    pub manifest_url: String,
    pub wire: WireDtype,
    /// Sequences in flight at once (the starter admits this many).
    pub in_flight: usize,
    /// Most positions one sequence may hold.
    pub max_positions: usize,
    /// Bytes of KV cache this node may hold in all.
    pub kv_cap_bytes: u64,
}

impl Assignment {
    pub fn is_starter(&self) -> bool {
        self.index == 0
    }
}

/// One half of the offer/answer exchange that links two neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    Offer,
    Answer,
}

/// A WebRTC session description relayed by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    pub epoch: u64,
    pub kind: SignalKind,
    /// The browser's `{type, sdp}` JSON, with every candidate gathered.
    pub sdp: String,
}

/// Why a request ended, as the starter reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    MaxTokens,
    Context,
    Cancelled,
    Error,
}

/// What a node reports every second: the heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub epoch: u64,
    /// Tokens per second through this node's layers over the last interval.
    pub tok_s: f64,
    /// Round trip to the next node over the data channel, if measured: the median of the
    /// last few pings.
    pub rtt_ms: Option<f64>,
    /// Bytes of weights the engine holds (as it allocated them).
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    /// Resident memory of the whole process, where the platform can tell.
    pub rss_bytes: Option<u64>,
    /// A browser node's WebAssembly memory (its linear memory as the tab has it now), which
    /// holds the wasm CPU engine's weights and caches: measured where a tab has no RSS.
    #[serde(default)]
    pub wasm_memory_bytes: Option<u64>,
    /// Sequences configured on this node (starter: in flight).
    pub sequences: usize,
    /// Requests waiting at the starter to be admitted.
    pub queued: usize,
    /// Most sequences in flight at once so far (starter).
    pub peak_sequences: usize,
    /// Seconds this node's engine has spent on this epoch's steps: every node runs the same
    /// tokens, so the ratios between nodes are the ratios of their stages' real costs.
    #[serde(default)]
    pub busy_s: f64,
    /// Steps this node's engine has run this epoch, and the jobs (one sequence's input each)
    /// they carried: jobs ÷ steps is how many sequences its batches held.
    #[serde(default)]
    pub steps: u64,
    #[serde(default)]
    pub jobs: u64,
    /// Each step's seconds times its jobs, summed: the time sequences spent in this node's
    /// steps (over the tokens that went through, a token's time in them).
    #[serde(default)]
    pub job_busy_s: f64,
}

/// Messages a node sends to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToServer {
    Join {
        room: String,
        token: Option<String>,
        name: String,
        kind: NodeKind,
        profile: Profile,
    },
    Signal {
        to: NodeId,
        signal: Signal,
    },
    /// Download progress of the current assignment.
    Progress {
        epoch: u64,
        done: u64,
        total: u64,
        /// Bytes found in the node's own cache instead of downloaded.
        cached: u64,
    },
    Ready {
        epoch: u64,
    },
    /// The node could not take its assignment (out of memory, a bad download).
    Failed {
        epoch: u64,
        message: String,
    },
    Stats(NodeReport),
    /// Tokens sampled for a request (starter only).
    Tokens {
        request: u64,
        tokens: Vec<u32>,
    },
    /// This node's previous node in the ring keeps sending frames that cannot be read or tied
    /// to a live sequence.
    Garbage {
        epoch: u64,
        /// The previous node.
        from: NodeId,
        /// Such frames received from it in this epoch so far.
        count: u64,
        /// The last one's error.
        example: String,
    },
    /// A request ended (starter only).
    Finished {
        request: u64,
        finish: FinishReason,
        message: Option<String>,
    },
    /// Leaving the room on purpose.
    Leave,
}

/// Messages the server sends to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToNode {
    Welcome {
        id: NodeId,
        room: String,
        /// How often the server expects a `stats` message.
        heartbeat_ms: u64,
    },
    Refused {
        reason: String,
    },
    Assign(Assignment),
    /// Not part of the ring for now (say why).
    Unassigned {
        epoch: u64,
        reason: String,
    },
    Signal {
        from: NodeId,
        signal: Signal,
    },
    /// Generate for a request (starter only).
    Generate {
        request: u64,
        prompt_tokens: Vec<u32>,
        max_tokens: usize,
        sampling: SamplingParams,
        eos_ids: Vec<u32>,
    },
    Cancel {
        request: u64,
    },
    /// Something the node sent was refused; the connection stays up.
    Error {
        message: String,
    },
}

/// Parse a control message, checking its size first.
pub fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    if text.len() > MAX_CONTROL_MESSAGE {
        return Err(format!(
            "a {}-byte control message exceeds the limit of {MAX_CONTROL_MESSAGE} bytes",
            text.len()
        ));
    }
    serde_json::from_str(text).map_err(|e| format!("malformed control message: {e}"))
}

/// Serialise a control message.
pub fn encode<T: Serialize>(msg: &T) -> String {
    // Our own types always serialise.
    serde_json::to_string(msg).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let m = ToServer::Tokens {
            request: 3,
            tokens: vec![1, 2],
        };
        assert_eq!(decode::<ToServer>(&encode(&m)).unwrap(), m);
        assert!(encode(&m).contains("\"type\":\"tokens\""));
        let big = "x".repeat(MAX_CONTROL_MESSAGE + 1);
        assert!(decode::<ToServer>(&big).unwrap_err().contains("exceeds"));
        assert!(decode::<ToNode>("{\"type\":\"nope\"}")
            .unwrap_err()
            .contains("malformed"));
    }
}
