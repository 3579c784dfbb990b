//! The activation wire protocol between ring nodes.
//!
//! Every message starts with a version byte and a kind byte.
//!
//! Activation chunk (kind 1), little-endian, 32-byte header then payload:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0 | version (1) |
//! | 1 | kind (1) |
//! | 2 | dtype: 0 = f32, 1 = f16 |
//! | 3 | reserved, 0 |
//! | 4..12 | sequence id |
//! | 12..16 | position of the first token |
//! | 16..20 | token count |
//! | 20..24 | hidden size |
//! | 24..28 | byte offset of this chunk in the whole payload |
//! | 28..32 | byte length of this chunk |
//!
//! A whole activation is `token count × hidden × dtype size` bytes, row-major (tokens, hidden).
//! Activations larger than a transport's message limit (a prefill) travel as several chunks in
//! order; [`Reassembler`] joins them. A decode hop of SmolLM2 is 576 × 2 + 32 bytes.
//!
//! Control message (kind 2): a JSON-encoded [`Control`] after the two bytes.
//!
//! Decoding checks every length against the header and the node's own limits, rejects unknown
//! versions and kinds, and never allocates more than the declared, bounded activation size.
//! Sizes are computed in checked `u64` on every target (a `u32 × u32 × 4` product overflows
//! even 64 bits, and `usize` is 32 bits on wasm32). Control messages are small on both ends:
//! [`decode`] refuses one over [`MAX_CONTROL_BYTES`] and [`encode_control`] shortens an error's
//! text so the message always fits, so a node can forward any control message it accepted.

use std::collections::HashMap;

use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const VERSION: u8 = 1;
const KIND_ACTIVATION: u8 = 1;
const KIND_CONTROL: u8 = 2;
pub const HEADER_BYTES: usize = 32;
/// Largest control message, both bytes of header included. Every control message is small;
/// anything larger is garbage. Far below any link's message limit, so a forwarded control
/// message always fits the next hop.
pub const MAX_CONTROL_BYTES: usize = 4 * 1024;
/// Longest error text [`encode_control`] sends, in bytes; longer texts are cut.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Element type of activations on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WireDtype {
    F32,
    /// Half the bytes; activations round to f16 at each hop.
    #[default]
    F16,
}

impl WireDtype {
    pub fn size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 => 2,
        }
    }

    fn code(self) -> u8 {
        match self {
            WireDtype::F32 => 0,
            WireDtype::F16 => 1,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(WireDtype::F32),
            1 => Some(WireDtype::F16),
            _ => None,
        }
    }
}

/// Control messages that travel around the ring with the activations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Tells a node which part of the model it runs.
    Configure {
        node: u32,
        nodes: u32,
        layers: (u32, u32),
        wire: WireDtype,
    },
    /// A sequence begins; its caches need `positions` positions.
    Start {
        seq: u64,
        positions: u32,
    },
    /// A sequence is over: free its caches.
    End {
        seq: u64,
    },
    /// Something went wrong at `node`, for one sequence or for a frame it could not read.
    Error {
        seq: Option<u64>,
        node: u32,
        message: String,
    },
    /// Sent to the next node, which answers with [`Control::Pong`] on the reverse direction
    /// of the same link: the hop's round trip.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
}

/// Whether `msg` is a control message (cheap: looks at the header only).
pub fn is_control(msg: &[u8]) -> bool {
    msg.len() >= 2 && msg[0] == VERSION && msg[1] == KIND_CONTROL
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    Activation(Chunk<'a>),
    Control(Control),
}

/// One piece of an activation, as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk<'a> {
    pub dtype: WireDtype,
    pub seq: u64,
    pub first_pos: u32,
    pub n_tokens: u32,
    pub hidden: u32,
    pub offset: u32,
    pub payload: &'a [u8],
}

impl Chunk<'_> {
    /// Bytes of the whole activation this chunk belongs to on the wire, if that fits a `u64`.
    pub fn total_bytes(&self) -> Option<u64> {
        (self.n_tokens as u64)
            .checked_mul(self.hidden as u64)?
            .checked_mul(self.dtype.size() as u64)
    }

    /// Bytes the whole activation takes once decoded to f32, if that fits a `u64`.
    pub fn f32_bytes(&self) -> Option<u64> {
        (self.n_tokens as u64)
            .checked_mul(self.hidden as u64)?
            .checked_mul(4)
    }
}

/// A whole activation: hidden states of `n_tokens` tokens of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub seq: u64,
    pub first_pos: u32,
    pub n_tokens: u32,
    /// (n_tokens, hidden)
    pub data: Vec<f32>,
}

fn wire_err(what: impl Into<String>) -> Error {
    Error::Wire(what.into())
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Decode one message. Never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<Message<'_>> {
    if bytes.len() < 2 {
        return Err(wire_err(format!(
            "{}-byte message is too short",
            bytes.len()
        )));
    }
    if bytes[0] != VERSION {
        return Err(wire_err(format!(
            "protocol version {} is not supported (this node speaks {VERSION})",
            bytes[0]
        )));
    }
    match bytes[1] {
        KIND_ACTIVATION => {
            if bytes.len() < HEADER_BYTES {
                return Err(wire_err(format!(
                    "activation header needs {HEADER_BYTES} bytes, got {}",
                    bytes.len()
                )));
            }
            let dtype = WireDtype::from_code(bytes[2])
                .ok_or_else(|| wire_err(format!("unknown activation dtype {}", bytes[2])))?;
            let chunk = Chunk {
                dtype,
                seq: u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes")),
                first_pos: u32_at(bytes, 12),
                n_tokens: u32_at(bytes, 16),
                hidden: u32_at(bytes, 20),
                offset: u32_at(bytes, 24),
                payload: &bytes[HEADER_BYTES..],
            };
            let len = u32_at(bytes, 28) as u64;
            if len != chunk.payload.len() as u64 {
                return Err(wire_err(format!(
                    "activation chunk declares {len} payload bytes but carries {}",
                    chunk.payload.len()
                )));
            }
            let end = chunk.offset as u64 + len;
            let fits = chunk.total_bytes().is_some_and(|total| end <= total);
            if !fits || !len.is_multiple_of(dtype.size() as u64) || chunk.n_tokens == 0 {
                return Err(wire_err(format!(
                    "activation chunk at bytes {}..{end} does not fit {} tokens × {} ({:?})",
                    chunk.offset, chunk.n_tokens, chunk.hidden, dtype
                )));
            }
            Ok(Message::Activation(chunk))
        }
        KIND_CONTROL => {
            if bytes.len() > MAX_CONTROL_BYTES {
                return Err(wire_err(format!(
                    "{}-byte control message exceeds the limit of {MAX_CONTROL_BYTES} bytes",
                    bytes.len()
                )));
            }
            let body = &bytes[2..];
            serde_json::from_slice(body)
                .map(Message::Control)
                .map_err(|e| wire_err(format!("bad control message: {e}")))
        }
        k => Err(wire_err(format!("unknown message kind {k}"))),
    }
}

/// Encode a control message. The result never exceeds [`MAX_CONTROL_BYTES`]: an error's text
/// is cut to [`MAX_ERROR_TEXT`] bytes, and further if escaping makes it longer than that.
pub fn encode_control(c: &Control) -> Vec<u8> {
    let encode = |c: &Control| {
        let mut out = vec![VERSION, KIND_CONTROL];
        // Serialising our own enum cannot fail.
        out.extend(serde_json::to_vec(c).unwrap_or_default());
        out
    };
    let Control::Error { seq, node, message } = c else {
        // Every other variant is a few numbers: far below the limit.
        return encode(c);
    };
    let mut limit = MAX_ERROR_TEXT;
    loop {
        let out = encode(&Control::Error {
            seq: *seq,
            node: *node,
            message: truncate(message, limit),
        });
        if out.len() <= MAX_CONTROL_BYTES || limit == 0 {
            return out;
        }
        // JSON escapes a control character as six bytes: halve until it fits.
        limit /= 2;
    }
}

/// `text` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Encode an activation (n_tokens, hidden) as chunks of at most `max_message` bytes each.
pub fn encode_activation(
    seq: u64,
    first_pos: u32,
    hidden: usize,
    data: &[f32],
    dtype: WireDtype,
    max_message: usize,
) -> Vec<Vec<u8>> {
    let n_tokens = (data.len() / hidden.max(1)) as u32;
    let mut payload = Vec::with_capacity(data.len() * dtype.size());
    match dtype {
        WireDtype::F32 => data.iter().for_each(|v| payload.extend(v.to_le_bytes())),
        WireDtype::F16 => data
            .iter()
            .for_each(|v| payload.extend(f16::from_f32(*v).to_le_bytes())),
    }
    // Chunks hold whole elements so every chunk decodes on its own.
    let per_chunk =
        ((max_message.saturating_sub(HEADER_BYTES)) / dtype.size()).max(1) * dtype.size();
    let mut out = Vec::with_capacity(payload.len() / per_chunk + 1);
    for (i, piece) in payload.chunks(per_chunk).enumerate() {
        let mut m = Vec::with_capacity(HEADER_BYTES + piece.len());
        m.extend([VERSION, KIND_ACTIVATION, dtype.code(), 0]);
        m.extend(seq.to_le_bytes());
        m.extend(first_pos.to_le_bytes());
        m.extend(n_tokens.to_le_bytes());
        m.extend((hidden as u32).to_le_bytes());
        m.extend(((i * per_chunk) as u32).to_le_bytes());
        m.extend((piece.len() as u32).to_le_bytes());
        m.extend(piece);
        out.push(m);
    }
    out
}

fn to_f32(dtype: WireDtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        WireDtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        WireDtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
    }
}

struct Partial {
    first_pos: u32,
    n_tokens: u32,
    dtype: WireDtype,
    /// Wire bytes received, and in all.
    received: u64,
    total: u64,
    /// f32 bytes of the whole activation, charged against [`Reassembler::held_bytes`] from the
    /// first chunk on.
    charge: u64,
    /// When its first chunk came (a counter): the oldest is dropped first.
    since: u64,
    data: Vec<f32>,
}

/// What one chunk did.
#[derive(Debug, Default)]
pub struct Pushed {
    /// The whole activation, when this chunk was its last.
    pub done: Option<Activation>,
    /// The sequence whose half-received activation was dropped to make room (the oldest).
    pub dropped: Option<u64>,
}

/// Joins activation chunks into whole activations, checking them against this node's hidden
/// size and token limit so a garbage header cannot make it allocate without bound. At most
/// `max_partials` activations are half-received at once (one peer sends frames of one
/// activation in order, so more is a peer gone wrong): past it the oldest is dropped and
/// reported. Memory follows the bytes received, never more than a whole activation each.
pub struct Reassembler {
    hidden: usize,
    max_tokens: usize,
    max_partials: usize,
    partial: HashMap<u64, Partial>,
    clock: u64,
    held: u64,
}

impl Reassembler {
    pub fn new(hidden: usize, max_tokens: usize, max_partials: usize) -> Self {
        Self {
            hidden,
            max_tokens,
            max_partials: max_partials.max(1),
            partial: HashMap::new(),
            clock: 0,
            held: 0,
        }
    }

    /// Checks a chunk's shape against this node's hidden size and token limit.
    pub fn check(&self, chunk: &Chunk<'_>) -> Result<()> {
        if chunk.hidden as usize != self.hidden {
            return Err(wire_err(format!(
                "sequence {}: activation of hidden size {} on a ring of hidden size {}",
                chunk.seq, chunk.hidden, self.hidden
            )));
        }
        if chunk.n_tokens as usize > self.max_tokens {
            return Err(wire_err(format!(
                "sequence {}: activation of {} tokens exceeds the limit of {}",
                chunk.seq, chunk.n_tokens, self.max_tokens
            )));
        }
        Ok(())
    }

    /// Whether an activation of `seq` is half-received.
    pub fn has_partial(&self, seq: u64) -> bool {
        self.partial.contains_key(&seq)
    }

    /// f32 bytes of the whole activations being received, counted from their first chunk.
    pub fn held_bytes(&self) -> u64 {
        self.held
    }

    /// Half-received activations.
    pub fn partials(&self) -> usize {
        self.partial.len()
    }

    fn remove(&mut self, seq: u64) -> Option<Partial> {
        let p = self.partial.remove(&seq)?;
        self.held -= p.charge;
        Some(p)
    }

    /// Add a chunk; returns the activation when its last chunk arrives.
    pub fn push(&mut self, chunk: Chunk<'_>) -> Result<Pushed> {
        self.check(&chunk)?;
        let (Some(total), Some(charge)) = (chunk.total_bytes(), chunk.f32_bytes()) else {
            return Err(wire_err(format!(
                "sequence {}: activation size overflows",
                chunk.seq
            )));
        };
        let mut pushed = Pushed::default();
        if !self.partial.contains_key(&chunk.seq) {
            if chunk.offset != 0 {
                return Err(wire_err(format!(
                    "sequence {}: chunk at offset {} of an activation whose start never came",
                    chunk.seq, chunk.offset
                )));
            }
            if self.partial.len() >= self.max_partials {
                let oldest = self
                    .partial
                    .iter()
                    .min_by_key(|(_, p)| p.since)
                    .map(|(&s, _)| s);
                if let Some(s) = oldest {
                    self.remove(s);
                    pushed.dropped = Some(s);
                }
            }
            self.clock += 1;
            self.held += charge;
            self.partial.insert(
                chunk.seq,
                Partial {
                    first_pos: chunk.first_pos,
                    n_tokens: chunk.n_tokens,
                    dtype: chunk.dtype,
                    received: 0,
                    total,
                    charge,
                    since: self.clock,
                    // Grown as chunks arrive: memory follows the bytes actually received, not
                    // the size a header claims.
                    data: Vec::new(),
                },
            );
        }
        let Some(p) = self.partial.get_mut(&chunk.seq) else {
            return Err(wire_err(format!(
                "sequence {}: lost its activation",
                chunk.seq
            )));
        };
        let same = p.first_pos == chunk.first_pos
            && p.n_tokens == chunk.n_tokens
            && p.dtype == chunk.dtype
            && p.received == chunk.offset as u64;
        if !same {
            self.remove(chunk.seq);
            return Err(wire_err(format!(
                "sequence {}: chunk at offset {} does not continue the activation in progress",
                chunk.seq, chunk.offset
            )));
        }
        // Grow by doubling, but never past the whole activation.
        let elems = chunk.payload.len() / chunk.dtype.size();
        let whole = usize::try_from(charge / 4).unwrap_or(usize::MAX);
        let need = p.data.len().saturating_add(elems);
        if need > p.data.capacity() {
            let target = need
                .max(p.data.capacity().saturating_mul(2))
                .min(whole.max(need));
            p.data.reserve_exact(target - p.data.len());
        }
        to_f32(chunk.dtype, chunk.payload, &mut p.data);
        p.received += chunk.payload.len() as u64;
        if p.received < p.total {
            return Ok(pushed);
        }
        if let Some(p) = self.remove(chunk.seq) {
            pushed.done = Some(Activation {
                seq: chunk.seq,
                first_pos: p.first_pos,
                n_tokens: p.n_tokens,
                data: p.data,
            });
        }
        Ok(pushed)
    }

    /// Forget a half-received activation (its sequence ended or failed).
    pub fn drop_sequence(&mut self, seq: u64) {
        self.remove(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.next_f32() * 8.0 - 4.0).collect()
    }

    #[test]
    fn activations_round_trip_in_chunks() {
        for (dtype, max) in [
            (WireDtype::F32, 1000),
            (WireDtype::F16, 256),
            (WireDtype::F16, 1 << 20),
        ] {
            let data = values(7 * 96, 3);
            let frames = encode_activation(42, 5, 96, &data, dtype, max);
            assert!(frames.iter().all(|f| f.len() <= max));
            let mut r = Reassembler::new(96, 64, 2);
            let mut done = None;
            for f in &frames {
                let Message::Activation(c) = decode(f).unwrap() else {
                    panic!()
                };
                assert!(done.is_none());
                assert!(r.held_bytes() == 0 || r.held_bytes() == 7 * 96 * 4);
                done = r.push(c).unwrap().done;
            }
            assert_eq!(r.held_bytes(), 0);
            let a = done.expect("complete");
            assert_eq!((a.seq, a.first_pos, a.n_tokens), (42, 5, 7));
            let tol = if dtype == WireDtype::F32 {
                0.0
            } else {
                4.0 / 1024.0
            };
            for (x, y) in a.data.iter().zip(&data) {
                assert!((x - y).abs() <= tol);
            }
        }
    }

    #[test]
    fn a_decode_hop_costs_hidden_times_two_plus_the_header() {
        let frames = encode_activation(1, 9, 576, &values(576, 1), WireDtype::F16, 64 * 1024);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), 576 * 2 + HEADER_BYTES);
    }

    #[test]
    fn controls_round_trip() {
        for c in [
            Control::Start {
                seq: 3,
                positions: 100,
            },
            Control::End { seq: 3 },
            Control::Error {
                seq: None,
                node: 2,
                message: "bad".into(),
            },
            Control::Configure {
                node: 1,
                nodes: 3,
                layers: (4, 9),
                wire: WireDtype::F16,
            },
        ] {
            assert_eq!(decode(&encode_control(&c)).unwrap(), Message::Control(c));
        }
    }

    #[test]
    fn garbage_is_rejected_without_panics() {
        let good = encode_activation(1, 0, 64, &values(3 * 64, 2), WireDtype::F16, 1 << 16);
        let mut rng = Rng::new(5);
        for _ in 0..20_000 {
            let mut m = good[0].clone();
            let len = (rng.next_u64() as usize) % (m.len() + 8);
            m.resize(len, 0);
            for _ in 0..rng.next_u64() % 4 {
                if !m.is_empty() {
                    let i = (rng.next_u64() as usize) % m.len();
                    m[i] = rng.next_u64() as u8;
                }
            }
            if let Ok(Message::Activation(c)) = decode(&m) {
                let _ = Reassembler::new(64, 16, 2).push(c);
            }
        }
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 1])
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        assert!(decode(&[VERSION, 7])
            .unwrap_err()
            .to_string()
            .contains("kind 7"));
        let mut huge = good[0].clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes()); // 4 billion tokens
        let Message::Activation(c) = decode(&huge).unwrap() else {
            panic!()
        };
        assert!(Reassembler::new(64, 16, 2).push(c).is_err());
    }

    #[test]
    fn past_the_partial_limit_the_oldest_half_activation_is_dropped() {
        // Three sequences each send the first of several chunks: the third push drops the
        // first sequence's half activation, and memory held stays within two activations.
        let mut r = Reassembler::new(64, 16, 2);
        let one = 16 * 64 * 4;
        for seq in 1..=3u64 {
            let frames = encode_activation(seq, 0, 64, &values(16 * 64, seq), WireDtype::F16, 256);
            let Message::Activation(c) = decode(&frames[0]).unwrap() else {
                panic!()
            };
            let pushed = r.push(c).unwrap();
            assert!(pushed.done.is_none());
            assert_eq!(pushed.dropped, (seq == 3).then_some(1));
            assert!(r.held_bytes() <= 2 * one, "{} held", r.held_bytes());
        }
        assert_eq!(r.partials(), 2);
        assert!(!r.has_partial(1) && r.has_partial(2) && r.has_partial(3));
        // A chunk that does not start an activation never evicts anything.
        let frames = encode_activation(4, 0, 64, &values(16 * 64, 4), WireDtype::F16, 256);
        let Message::Activation(c) = decode(&frames[1]).unwrap() else {
            panic!()
        };
        let e = r.push(c).unwrap_err().to_string();
        assert!(e.contains("start never came"), "{e}");
        assert_eq!(r.partials(), 2);
    }

    #[test]
    fn sizes_that_overflow_64_bits_are_refused() {
        let good = encode_activation(1, 0, 64, &values(64, 2), WireDtype::F32, 1 << 16);
        let mut m = good[0].clone();
        m[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        m[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        // 4 billion tokens of 4 billion values of 4 bytes pass 2^64: refused, not wrapped.
        let e = decode(&m).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        let c = Chunk {
            dtype: WireDtype::F32,
            seq: 1,
            first_pos: 0,
            n_tokens: u32::MAX,
            hidden: u32::MAX,
            offset: 0,
            payload: &[],
        };
        assert_eq!((c.total_bytes(), c.f32_bytes()), (None, None));
        let mut r = Reassembler::new(u32::MAX as usize, usize::MAX, 2);
        let e = r.push(c).unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn control_messages_are_size_limited_on_both_ends() {
        // An error text of any length and content still encodes within the limit.
        for text in ["x".repeat(100_000), "\u{1}".repeat(5000), "é".repeat(3000)] {
            let m = encode_control(&Control::Error {
                seq: Some(u64::MAX),
                node: u32::MAX,
                message: text.clone(),
            });
            assert!(m.len() <= MAX_CONTROL_BYTES, "{} bytes", m.len());
            let Ok(Message::Control(Control::Error { message, .. })) = decode(&m) else {
                panic!("decodes")
            };
            assert!(message.len() <= MAX_ERROR_TEXT && message.ends_with('…'));
            assert!(text.starts_with(message.trim_end_matches('…')));
        }
        let mut big = vec![VERSION, KIND_CONTROL];
        big.extend(
            format!(
                "{{\"type\":\"end\",\"seq\":1,\"pad\":\"{}\"}}",
                "x".repeat(5000)
            )
            .bytes(),
        );
        let e = decode(&big).unwrap_err().to_string();
        assert!(e.contains("exceeds the limit of 4096 bytes"), "{e}");
        assert_eq!(truncate("short", 10), "short");
    }
}
