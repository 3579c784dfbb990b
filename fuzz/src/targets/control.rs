//! Credit and control messages: the WebRTC links' credit texts (native and browser read them
//! through one [`mdi_transport::credit`]) driven as a sender and a receiver would, and the
//! ring's JSON control messages through [`wire::decode`] and back through
//! [`wire::encode_control`].
//!
//! Invariants: a grant never moves the sender's window back and never makes a send wait
//! forever (a grant of any size allows every send up to the window past it); the receiver
//! flags a peer that passes its window; a control message that decodes re-encodes within the
//! size limit and decodes to the same message (an error's text possibly shortened).

use arbitrary::{Arbitrary, Unstructured};
use mdi_core::wire::{self, Control, Message};
use mdi_transport::credit::{self, Granted};

use crate::engine::{label, Run, Target};
use crate::meter;

const WINDOW: u64 = 2 << 20;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A text message from the peer: a credit if it is a decimal count.
    Text(Vec<u8>),
    Grant(u64),
    Send(u32),
    Receive(u32),
    Consume(u32),
    /// A control message's bytes.
    Control(Vec<u8>),
}

fn control(bytes: &[u8], what: &mut Vec<String>) {
    match wire::decode(bytes) {
        Err(e) => what.push(format!("decode: {e}")),
        Ok(Message::Activation(_)) => what.push("activation".into()),
        Ok(Message::Control(c)) => {
            let again = wire::encode_control(&c);
            assert!(
                again.len() <= wire::MAX_CONTROL_BYTES,
                "a control message re-encodes to {} bytes",
                again.len()
            );
            let back = match wire::decode(&again) {
                Ok(Message::Control(back)) => back,
                other => panic!("{c:?} re-encodes to something else: {other:?}"),
            };
            match (&c, &back) {
                (Control::Error { message: a, .. }, Control::Error { message: b, .. }) => {
                    assert!(
                        a == b || (b.ends_with('…') && a.starts_with(b.trim_end_matches('…'))),
                        "an error's text changed beyond shortening"
                    );
                }
                _ => assert_eq!(c, back, "a control message does not round-trip"),
            }
            what.push(format!("{:?}", std::mem::discriminant(&c)));
        }
    }
}

pub struct ControlTarget;

impl Target for ControlTarget {
    fn name(&self) -> &'static str {
        "control"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        // Raw bytes for `arbitrary`, prefixed by real control messages and credits so the
        // byte mutator has valid texts to start from.
        let mut seeds = Vec::new();
        for c in [
            Control::Start {
                seq: 1,
                positions: 40,
            },
            Control::End { seq: 1 },
            Control::Ping { nonce: 3 },
            Control::Pong { nonce: 3 },
            Control::Error {
                seq: None,
                node: 1,
                message: "bad frame".into(),
            },
            Control::Configure {
                node: 1,
                nodes: 3,
                layers: (2, 5),
                wire: wire::WireDtype::F16,
            },
        ] {
            let mut s = vec![0u8];
            s.extend(wire::encode_control(&c));
            seeds.push(s);
        }
        for text in ["524288", "18446744073709551615", "0"] {
            let mut s = vec![1u8];
            s.extend(text.as_bytes());
            seeds.push(s);
        }
        seeds.push(vec![2; 48]);
        seeds
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"\x01\x02",
            b"{\"type\":\"error\",\"seq\":null,\"node\":0,\"message\":\"",
            b"\\u0000",
            b"\\ud800",
            b"18446744073709551615",
            b"18446744073709551616",
            b"{\"type\":\"start\",\"seq\":",
            b"\"positions\":4294967295}",
        ]
    }

    fn run(&mut self, data: &[u8]) -> Run {
        let limit = (1 << 20) + 16 * data.len() as u64;
        let (mode, rest) = data.split_first().map_or((0, &[][..]), |(m, r)| (*m, r));
        meter::reset();
        let mut what = Vec::new();
        match mode % 3 {
            0 => control(rest, &mut what),
            1 => {
                let mut g = Granted::default();
                if let Some(c) = credit::parse(rest) {
                    g.grant(c);
                    assert!(g.allows(WINDOW, c.saturating_add(WINDOW)));
                    what.push("credit".into());
                }
            }
            _ => {
                let mut u = Unstructured::new(rest);
                let mut g = Granted::default();
                let (mut sent, mut received, mut consumed) = (0u64, 0u64, 0u64);
                // `arbitrary` keeps producing values from an exhausted input: stop at its end.
                while !u.is_empty() {
                    let Ok(op) = Op::arbitrary(&mut u) else { break };
                    match op {
                        Op::Text(t) => {
                            if let Some(c) = credit::parse(&t) {
                                let before = g;
                                g.grant(c);
                                assert!(g.0 >= before.0, "a grant moved the window back");
                            }
                        }
                        Op::Grant(c) => {
                            g.grant(c);
                            // Whatever was granted, the window past it is open.
                            assert!(g.allows(WINDOW, g.0.saturating_add(WINDOW)));
                        }
                        Op::Send(n) => {
                            let end = sent.saturating_add(n as u64);
                            if g.allows(WINDOW, end) {
                                sent = end;
                                what.push("sent".into());
                            } else {
                                what.push("waits".into());
                            }
                        }
                        Op::Receive(n) => {
                            received = received.saturating_add(n as u64);
                            if credit::overrun(received, consumed, WINDOW) {
                                what.push("overrun".into());
                            }
                        }
                        Op::Consume(n) => {
                            consumed = consumed.saturating_add(n as u64).min(received)
                        }
                        Op::Control(bytes) => control(&bytes, &mut what),
                    }
                }
            }
        }
        let depth = what
            .iter()
            .filter(|w| !w.starts_with("decode"))
            .count()
            .min(3);
        what.sort();
        what.dedup();
        Run {
            behaviour: label(&what.join("|")) ^ (mode as u64 % 3),
            limit,
            depth,
        }
    }
}
