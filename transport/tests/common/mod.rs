//! Helpers shared by the behaviour tests: build a linked pair on either transport, and make
//! and check messages whose content is derived from their sequence number, so a reordered,
//! truncated or corrupted message is caught, not just a missing one.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use mdi_transport::in_process::{self, InProcessConfig};
use mdi_transport::{webrtc, Inbox, Link};

/// The transports every behaviour is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InProcess,
    WebRtc,
}

pub const ALL: [Kind; 2] = [Kind::InProcess, Kind::WebRtc];

/// Two linked endpoints: `a.0` sends to `b.1`, `b.0` sends to `a.1`.
pub async fn pair(kind: Kind) -> ((Link, Inbox), (Link, Inbox)) {
    match kind {
        Kind::InProcess => in_process::pair(&InProcessConfig::default()),
        Kind::WebRtc => webrtc::connect_pair_in_process()
            .await
            .expect("two loopback WebRTC peers connect"),
    }
}

/// Fails the test instead of hanging it when a transport wedges.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// `len` bytes determined by `seq`: an 8-byte sequence number (when it fits) followed by
/// xorshift noise seeded from it.
pub fn message(seq: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&seq.to_le_bytes()[..len.min(8)]);
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&bytes[..take]);
    }
    out
}

/// Asserts `got` is exactly message `seq` of length `len`.
pub fn check(got: &[u8], seq: u64, len: usize) {
    assert_eq!(got.len(), len, "message {seq}: wrong length");
    assert!(got == message(seq, len), "message {seq}: content differs");
}

/// Percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
