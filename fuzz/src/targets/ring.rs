//! Ring frames: the wire decoder, the reassembler and the state machines behind them —
//! [`Node::handle`] on a node that already runs sequences, and the starter's side for what
//! comes back around the ring — with jobs run by a stand-in engine that allocates each KV cache
//! as a real one would, so the allocation meter sees KV memory too.
//!
//! Two input forms, chosen by the first byte: real encoded frames, length-prefixed (u16 LE), as
//! a corpus of valid traffic to mutate; or a sequence of operations decoded with `arbitrary`
//! (Starts with any position count, activations whole or cut short, chunks out of order, Ends,
//! errors, pings, corrupted and raw frames, jobs that fail), encoded with the real encoders.
//! After every message the node's invariants are checked: KV within its cap, sequences within
//! their limit, every outgoing message decodable and within the link's size.
//! The memory limit is [`NodeConfig::memory_bound`] plus what the input itself holds.

use arbitrary::{Arbitrary, Unstructured};
use mdi_core::engine::{StageEngine, StageInput, StageOutput, Want};
use mdi_core::node::{Node, NodeConfig};
use mdi_core::starter::{Event, SeqRequest, Starter, StarterConfig};
use mdi_core::weights::StageSpec;
use mdi_core::wire::{self, Control, Message, WireDtype};
use mdi_core::{Error, Result, SamplingParams};

use crate::engine::{label, Run, Target};
use crate::meter;

const HIDDEN: usize = 16;
const KV_PER_POSITION: u64 = 256;
const MAX_MESSAGE: usize = 300;

fn node_config() -> NodeConfig {
    NodeConfig {
        index: 1,
        is_last: false,
        hidden: HIDDEN,
        wire: WireDtype::F16,
        max_message: MAX_MESSAGE,
        max_positions: 64,
        max_tokens: 32,
        max_sequences: 6,
        max_partials: 2,
        max_held_bytes: 16 << 10,
        kv_bytes_per_position: KV_PER_POSITION,
        kv_cap_bytes: 48 << 10,
    }
}

/// A stage that computes nothing but holds a KV cache of the real size and checks its inputs
/// as an engine does. `fault` makes some jobs fail or return the wrong number of values.
struct StandIn {
    spec: StageSpec,
    fault: u8,
    jobs: u64,
}

impl StandIn {
    fn new() -> Self {
        Self {
            spec: StageSpec {
                layers: 0..1,
                embed: false,
                head: false,
            },
            fault: 0,
            jobs: 0,
        }
    }
}

/// A stand-in cache: its bytes, and the positions filled.
pub struct Cache {
    _bytes: Vec<u8>,
    positions: usize,
    len: usize,
}

impl StageEngine for StandIn {
    type Cache = Cache;

    fn spec(&self) -> &StageSpec {
        &self.spec
    }

    fn new_cache(&mut self, max_positions: usize) -> Result<Cache> {
        let bytes = (max_positions as u64).saturating_mul(KV_PER_POSITION);
        let n = usize::try_from(bytes).map_err(|_| Error::Input("cache too large".into()))?;
        Ok(Cache {
            _bytes: vec![0; n],
            positions: max_positions,
            len: 0,
        })
    }

    fn cache_len(&self, cache: &Cache) -> usize {
        cache.len
    }

    fn cache_bytes(&self, max_positions: usize) -> usize {
        max_positions.saturating_mul(KV_PER_POSITION as usize)
    }

    fn forward(
        &mut self,
        cache: &mut Cache,
        input: StageInput<'_>,
        want: Want,
    ) -> Result<StageOutput> {
        self.jobs += 1;
        let n = match input {
            StageInput::Hidden(h) => h.len() / HIDDEN,
            StageInput::Tokens(t) => t.len(),
        };
        if cache.len + n > cache.positions {
            return Err(Error::ContextFull {
                position: cache.len + n,
                context: cache.positions,
            });
        }
        cache.len += n;
        match (self.fault, self.jobs % 4) {
            (1, 0) => Err(Error::Engine("the stand-in failed a job".into())),
            (2, 0) => Ok(StageOutput::Hidden(vec![0.0; n * HIDDEN + 1])),
            _ => Ok(match want {
                Want::Hidden => StageOutput::Hidden(vec![0.25; n * HIDDEN]),
                _ => StageOutput::Token(3),
            }),
        }
    }

    fn head(&mut self, hidden: &[f32], _want: Want) -> Result<StageOutput> {
        if hidden.len() != HIDDEN {
            return Err(Error::Input("head of the wrong size".into()));
        }
        Ok(StageOutput::Token(3))
    }
}

/// Sequence ids: mostly a few small ones (so operations meet), sometimes any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum SeqId {
    Small(u8),
    Any(u64),
}

impl SeqId {
    fn id(self) -> u64 {
        match self {
            SeqId::Small(s) => (s % 10) as u64,
            SeqId::Any(s) => s,
        }
    }
}

/// Counts and positions: mostly small (often 0 or 1, where sequences start), sometimes any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Count {
    Zero,
    One,
    Small(u8),
    Any(u32),
}

impl Count {
    fn get(self) -> u32 {
        match self {
            Count::Zero => 0,
            Count::One => 1,
            Count::Small(n) => (n % 72) as u32,
            Count::Any(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Start {
        seq: SeqId,
        positions: Count,
    },
    /// A whole activation, chunked to `chunk` bytes.
    Activation {
        seq: SeqId,
        first_pos: Count,
        n_tokens: Count,
        f32: bool,
        chunk: u16,
    },
    /// Only some chunks of an activation, from `skip` on.
    Chunks {
        seq: SeqId,
        first_pos: Count,
        n_tokens: Count,
        skip: u8,
        take: u8,
    },
    End {
        seq: SeqId,
    },
    Error {
        seq: Option<SeqId>,
        text: String,
    },
    Ping(u64),
    Configure {
        node: u32,
        nodes: u32,
        layers: (u32, u32),
    },
    /// A real frame with one byte changed.
    Corrupt {
        seq: SeqId,
        n_tokens: Count,
        at: u16,
        byte: u8,
    },
    Raw(Vec<u8>),
    Jobs {
        fault: u8,
    },
}

fn activation(
    seq: u64,
    first_pos: u32,
    n_tokens: u32,
    dtype: WireDtype,
    chunk: usize,
) -> Vec<Vec<u8>> {
    // Never more tokens than a prefill may hold: the frames a peer can send are bounded by
    // the link, not by this harness's memory.
    let n = (n_tokens as usize).min(40);
    let data = vec![0.5f32; n * HIDDEN];
    let mut frames = wire::encode_activation(seq, first_pos, HIDDEN, &data, dtype, chunk);
    if n as u32 != n_tokens {
        // Claim more tokens than are sent: the header says one thing, the payload another.
        for f in &mut frames {
            f[16..20].copy_from_slice(&n_tokens.to_le_bytes());
        }
    }
    frames
}

/// Frames and job runs, in order.
enum Step {
    Frame(Vec<u8>),
    Jobs(u8),
}

fn steps_from_ops(u: &mut Unstructured<'_>) -> Vec<Step> {
    let mut steps = Vec::new();
    // `arbitrary` keeps producing values from an exhausted input: stop at its end.
    while !u.is_empty() && steps.len() <= 400 {
        let Ok(op) = Op::arbitrary(u) else { break };
        match op {
            Op::Start { seq, positions } => {
                steps.push(Step::Frame(wire::encode_control(&Control::Start {
                    seq: seq.id(),
                    positions: positions.get(),
                })))
            }
            Op::Activation {
                seq,
                first_pos,
                n_tokens,
                f32,
                chunk,
            } => {
                let dtype = if f32 { WireDtype::F32 } else { WireDtype::F16 };
                let chunk = (chunk as usize).clamp(wire::HEADER_BYTES + 4, MAX_MESSAGE);
                for f in activation(seq.id(), first_pos.get(), n_tokens.get(), dtype, chunk) {
                    steps.push(Step::Frame(f));
                }
                steps.push(Step::Jobs(0));
            }
            Op::Chunks {
                seq,
                first_pos,
                n_tokens,
                skip,
                take,
            } => {
                let frames = activation(
                    seq.id(),
                    first_pos.get(),
                    n_tokens.get(),
                    WireDtype::F16,
                    64,
                );
                for f in frames
                    .into_iter()
                    .skip(skip as usize % 4)
                    .take(take as usize % 6)
                {
                    steps.push(Step::Frame(f));
                }
            }
            Op::End { seq } => steps.push(Step::Frame(wire::encode_control(&Control::End {
                seq: seq.id(),
            }))),
            Op::Error { seq, text } => {
                steps.push(Step::Frame(wire::encode_control(&Control::Error {
                    seq: seq.map(SeqId::id),
                    node: 0,
                    message: text,
                })))
            }
            Op::Ping(nonce) => {
                steps.push(Step::Frame(wire::encode_control(&Control::Ping { nonce })))
            }
            Op::Configure {
                node,
                nodes,
                layers,
            } => steps.push(Step::Frame(wire::encode_control(&Control::Configure {
                node,
                nodes,
                layers,
                wire: WireDtype::F16,
            }))),
            Op::Corrupt {
                seq,
                n_tokens,
                at,
                byte,
            } => {
                let mut f = activation(seq.id(), 0, n_tokens.get(), WireDtype::F16, 128)
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                if !f.is_empty() {
                    let i = at as usize % f.len();
                    f[i] = byte;
                }
                steps.push(Step::Frame(f));
            }
            Op::Raw(bytes) => steps.push(Step::Frame(bytes)),
            Op::Jobs { fault } => steps.push(Step::Jobs(fault)),
        }
    }
    steps
}

fn steps_from_frames(mut data: &[u8]) -> Vec<Step> {
    let mut steps = Vec::new();
    while data.len() >= 2 {
        let n = u16::from_le_bytes([data[0], data[1]]) as usize;
        let end = (2 + n).min(data.len());
        steps.push(Step::Frame(data[2..end].to_vec()));
        steps.push(Step::Jobs(0));
        data = &data[end..];
    }
    steps
}

/// Checks what the node sends on and holds after every step.
fn check(node: &Node<Cache>, out: &[Vec<u8>], cfg: &NodeConfig, what: &mut Vec<String>) {
    let st = node.stats();
    assert!(
        st.kv_bytes <= cfg.kv_cap_bytes,
        "KV {} over the cap",
        st.kv_bytes
    );
    assert!(
        st.sequences <= cfg.max_sequences,
        "{} sequences open",
        st.sequences
    );
    let largest = cfg.max_tokens as u64 * cfg.hidden as u64 * 4;
    assert!(
        st.held_bytes <= cfg.max_held_bytes + largest,
        "{} bytes of activations held",
        st.held_bytes
    );
    for m in out {
        assert!(
            m.len() <= cfg.max_message,
            "a {}-byte message for the link",
            m.len()
        );
        match wire::decode(m) {
            Ok(Message::Control(Control::Error { message, .. })) => what.push(message),
            Ok(_) => {}
            Err(e) => panic!("the node sent a message it cannot read itself: {e}"),
        }
    }
}

fn run_node(steps: Vec<Step>) -> Vec<String> {
    let cfg = node_config();
    let mut node: Node<Cache> = Node::new(cfg.clone());
    let mut engine = StandIn::new();
    let mut what = Vec::new();
    // A realistic state: one sequence started and fed before the input's frames arrive.
    let start = wire::encode_control(&Control::Start {
        seq: 1,
        positions: 48,
    });
    node.handle_blocking(&start, &mut engine);
    for f in activation(1, 0, 5, WireDtype::F16, 128) {
        node.handle_blocking(&f, &mut engine);
    }
    for step in steps {
        let out = match step {
            Step::Frame(f) => node.handle(&f),
            Step::Jobs(fault) => {
                engine.fault = fault % 3;
                let mut out = Vec::new();
                for job in node.next_jobs(1 + fault as usize % 3) {
                    let done = job.run(&mut engine);
                    out.extend(node.complete(done));
                }
                out
            }
        };
        check(&node, &out, &cfg, &mut what);
    }
    let (garbage, _) = node.garbage();
    what.push(format!("garbage {}", garbage.min(3)));
    what.push(format!(
        "depth {}",
        engine.jobs.saturating_sub(1).min(2) + 1
    ));
    what
}

fn run_starter(steps: Vec<Step>) -> Vec<String> {
    let mut starter: Starter<Cache> = Starter::new(StarterConfig {
        n_nodes: 2,
        hidden: HIDDEN,
        wire: WireDtype::F16,
        max_message: MAX_MESSAGE,
        context: 64,
        in_flight: 2,
        kv_bytes_per_position: KV_PER_POSITION,
        kv_cap_bytes: 1 << 20,
    });
    let mut engine = StandIn::new();
    let mut events = Vec::new();
    for id in 0..3 {
        starter.submit(
            id,
            SeqRequest {
                prompt_tokens: vec![1, 2, 3],
                max_tokens: 4,
                params: SamplingParams::default(),
                eos_ids: vec![],
            },
        );
    }
    starter.pump(&mut events);
    starter.run_jobs_blocking(&mut engine, &mut events);
    for step in steps {
        match step {
            Step::Frame(f) => {
                starter.handle(&f, &mut events);
            }
            Step::Jobs(_) => {
                starter.run_jobs_blocking(&mut engine, &mut events);
            }
        }
        assert!(starter.in_flight() <= 2);
    }
    events
        .iter()
        .map(|e| match e {
            Event::Token { .. } => "token".to_string(),
            Event::Done { finish, .. } => format!("done {finish:?}"),
            Event::NodeError { message, .. } => message.clone(),
        })
        .collect()
}

pub struct RingTarget;

impl Target for RingTarget {
    fn name(&self) -> &'static str {
        "ring"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut frames: Vec<Vec<u8>> = vec![
            wire::encode_control(&Control::Start {
                seq: 2,
                positions: 40,
            }),
            wire::encode_control(&Control::Ping { nonce: 9 }),
        ];
        frames.extend(activation(2, 0, 7, WireDtype::F16, 100));
        frames.extend(activation(1, 5, 1, WireDtype::F16, 300));
        frames.extend(activation(2, 7, 1, WireDtype::F32, 300));
        frames.push(wire::encode_control(&Control::Error {
            seq: Some(2),
            node: 2,
            message: "a failure".into(),
        }));
        frames.push(wire::encode_control(&Control::End { seq: 1 }));
        let framed = |frames: &[Vec<u8>], mode: u8| {
            let mut out = vec![mode];
            for f in frames {
                out.extend((f.len() as u16).to_le_bytes());
                out.extend(f);
            }
            out
        };
        // Back to the starter: single-token activations of its sequences.
        let mut back = Vec::new();
        back.extend(activation(1, 2, 1, WireDtype::F16, 300));
        back.extend(activation(2, 2, 1, WireDtype::F16, 20));
        back.push(wire::encode_control(&Control::End { seq: 1 }));
        vec![
            framed(&frames, 0),
            framed(&back, 2),
            vec![1; 64],
            vec![3; 64],
        ]
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"\x01\x01\x01\x00",
            b"\x01\x02{\"type\":\"start\",\"seq\":1,\"positions\":",
            b"{\"type\":\"end\",\"seq\":1}",
            b"{\"type\":\"error\",\"seq\":1,\"node\":1,\"message\":\"x\"}",
            b"4294967295",
            b"18446744073709551615",
        ]
    }

    fn run(&mut self, data: &[u8]) -> Run {
        let (mode, rest) = data.split_first().map_or((0, &[][..]), |(m, r)| (*m, r));
        let steps = if mode & 1 == 0 {
            steps_from_frames(rest)
        } else {
            steps_from_ops(&mut Unstructured::new(rest))
        };
        let held: u64 = steps
            .iter()
            .map(|s| match s {
                Step::Frame(f) => f.len() as u64,
                Step::Jobs(_) => 0,
            })
            .sum();
        // The node's own bound, the input's frames (decoded to f32: twice an f16 payload), the
        // outgoing messages of one step and the stand-in's bookkeeping.
        let limit = node_config().memory_bound() + 2 * held + (256 << 10);
        meter::reset();
        let what = if mode & 2 == 0 {
            run_node(steps)
        } else {
            run_starter(steps)
        };
        let depth = what
            .iter()
            .find_map(|w| w.strip_prefix("depth ").and_then(|d| d.parse().ok()))
            .unwrap_or(usize::from(what.iter().any(|w| w.starts_with("token"))) * 3);
        let mut kinds: Vec<u64> = what.iter().map(|w| label(w)).collect();
        kinds.sort_unstable();
        kinds.dedup();
        Run {
            behaviour: kinds
                .iter()
                .fold(mode as u64 & 3, |a, k| a.rotate_left(5) ^ k),
            limit,
            depth,
        }
    }
}
