//! The signaling protocol's JSON, as the server and a node read it: [`protocol::decode`] of
//! both directions (a decoded message must encode and decode back to itself), and every
//! `ToServer` message a node can send handed to the server's room logic, in a room whose ring
//! is formed, ready and serving a request, from members at every position of the ring.
//! One input is several messages, one per line.

use std::time::Duration;

use mdi_core::plan::ModelCost;
use mdi_core::SamplingParams;
use mdi_runtime::protocol::{
    self, FinishReason, NodeKind, NodeReport, Profile, Signal, SignalKind, ToNode, ToServer,
};
use signaling::room::{GenerateRequest, Hub, ModelFacts, RoomConfig};
use tokio::sync::mpsc;

use crate::engine::{label, Run, Target};
use crate::meter;

pub struct ProtocolTarget {
    model: ModelFacts,
}

impl ProtocolTarget {
    pub fn new() -> Self {
        Self {
            model: ModelFacts {
                id: "fuzz".into(),
                cost: ModelCost {
                    layer_weight_bytes: vec![1000; 6],
                    kv_bytes_per_token: 16,
                    layer_work: vec![1.0; 6],
                    starter_weight_bytes: 500,
                    starter_work: 1.0,
                },
                context: 64,
            },
        }
    }
}

impl Default for ProtocolTarget {
    fn default() -> Self {
        Self::new()
    }
}

fn profile() -> Profile {
    Profile {
        memory_budget: 1 << 30,
        backend: "cpu".into(),
        adapter: "fuzz".into(),
        speed: 1e9,
        weight_factor: 1.0,
    }
}

fn seed_messages() -> Vec<String> {
    let signal = Signal {
        epoch: 1,
        kind: SignalKind::Offer,
        sdp: "{\"type\":\"offer\",\"sdp\":\"v=0\"}".into(),
    };
    let to_server = [
        ToServer::Join {
            room: "default".into(),
            token: Some("t".into()),
            name: "n".into(),
            kind: NodeKind::Browser,
            profile: profile(),
        },
        ToServer::Signal {
            to: 2,
            signal: signal.clone(),
        },
        ToServer::Progress {
            epoch: 1,
            done: 10,
            total: 20,
            cached: 5,
        },
        ToServer::Ready { epoch: 1 },
        ToServer::Failed {
            epoch: 1,
            message: "out of memory".into(),
        },
        ToServer::Stats(NodeReport {
            epoch: 1,
            tok_s: 12.5,
            rtt_ms: Some(0.25),
            weight_bytes: 1000,
            kv_bytes: 64,
            rss_bytes: None,
            wasm_memory_bytes: Some(16 << 20),
            sequences: 1,
            queued: 0,
            peak_sequences: 2,
            busy_s: 3.5,
            steps: 40,
            jobs: 70,
            job_busy_s: 6.0,
        }),
        ToServer::Tokens {
            request: 1,
            tokens: vec![1, 2, 3],
        },
        ToServer::Garbage {
            epoch: 1,
            from: 3,
            count: 100,
            example: "unknown message kind 7".into(),
        },
        ToServer::Finished {
            request: 1,
            finish: FinishReason::Eos,
            message: None,
        },
        ToServer::Leave,
    ];
    let to_node = [
        ToNode::Welcome {
            id: 1,
            room: "default".into(),
            heartbeat_ms: 1000,
        },
        ToNode::Signal { from: 1, signal },
        ToNode::Generate {
            request: 1,
            prompt_tokens: vec![1, 2],
            max_tokens: 5,
            sampling: SamplingParams::default(),
            eos_ids: vec![2],
        },
        ToNode::Cancel { request: 1 },
        ToNode::Error {
            message: "no".into(),
        },
    ];
    to_server
        .iter()
        .map(protocol::encode)
        .chain(to_node.iter().map(protocol::encode))
        .collect()
}

impl Target for ProtocolTarget {
    fn name(&self) -> &'static str {
        "protocol"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let msgs = seed_messages();
        let mut seeds: Vec<Vec<u8>> = msgs.iter().map(|m| m.clone().into_bytes()).collect();
        seeds.push(msgs.join("\n").into_bytes());
        seeds
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"{\"type\":\"",
            b"\"epoch\":1",
            b"\"epoch\":2",
            b"\"from\":1",
            b"\"from\":2",
            b"\"from\":3",
            b"\"to\":1",
            b"\"request\":1",
            b"\"count\":100",
            b"\"count\":18446744073709551615",
            b"ready",
            b"garbage",
            b"stats",
            b"finished",
            b"failed",
            b"tokens",
            b"1e308",
            b"-1",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"\"\\ud800\"",
            b"null",
            b"\n",
        ]
    }

    fn run(&mut self, data: &[u8]) -> Run {
        let limit = (1 << 20) + 64 * data.len() as u64;
        let text = String::from_utf8_lossy(data).into_owned();
        meter::reset();
        let mut hub = Hub::new(RoomConfig {
            min_nodes: 3,
            in_flight: 2,
            reserve_positions: 16,
            max_queued: 4,
            queue_timeout: Duration::from_secs(60),
            wire: mdi_core::wire::WireDtype::F16,
            rebalance: true,
        });
        let mut members = Vec::new();
        for name in ["a", "b", "c"] {
            let (tx, rx) = mpsc::unbounded_channel();
            members.push((
                hub.join("default", name.into(), NodeKind::Native, profile(), tx),
                rx,
            ));
        }
        hub.plan_now(&self.model);
        for (id, _) in &members {
            hub.handle("default", *id, ToServer::Ready { epoch: 1 }, &self.model);
        }
        let request = GenerateRequest {
            prompt_tokens: vec![1, 2, 3],
            max_tokens: 4,
            sampling: SamplingParams::default(),
            eos_ids: vec![],
        };
        let _stream = hub.submit("default", request);
        let mut what = Vec::new();
        let mut handled = 0usize;
        for (i, line) in text.lines().take(64).enumerate() {
            let id = members[i % members.len()].0;
            match protocol::decode::<ToServer>(line) {
                Ok(m) => {
                    let back = protocol::decode::<ToServer>(&protocol::encode(&m));
                    assert_eq!(back.as_ref(), Ok(&m), "a node message does not round-trip");
                    what.push(format!("{:?}", std::mem::discriminant(&m)));
                    handled += 1;
                    hub.handle("default", id, m, &self.model);
                }
                Err(e) => {
                    what.push(e);
                    hub.bad_message("default", id, "fuzz");
                }
            }
            if let Ok(m) = protocol::decode::<ToNode>(line) {
                let back = protocol::decode::<ToNode>(&protocol::encode(&m));
                assert_eq!(
                    back.as_ref(),
                    Ok(&m),
                    "a server message does not round-trip"
                );
                what.push(format!("node {:?}", std::mem::discriminant(&m)));
            }
        }
        hub.tick(&self.model);
        let view = hub.view("default", &self.model, &|_| 0);
        what.push(format!(
            "{} {} {}",
            view.ready,
            view.nodes.len(),
            view.status
        ));
        for (_, rx) in &mut members {
            while let Ok(m) = rx.try_recv() {
                what.push(format!("{:?}", std::mem::discriminant(&m)));
            }
        }
        what.sort();
        what.dedup();
        Run {
            behaviour: label(&what.join("|")),
            limit,
            depth: (1 + handled).min(3),
        }
    }
}
