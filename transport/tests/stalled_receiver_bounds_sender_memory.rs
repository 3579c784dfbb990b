//! Backpressure: while the receiver stops reading, a sender pushing as fast as it can is made
//! to wait — the sender's buffered amount stays under the transport's watermark and the bytes
//! accepted but not yet read stay bounded — and once the receiver resumes every message
//! arrives in order, without a long stall. A transport that buffers without limit fails the
//! bounds; one that lets SCTP's receive window close fails the stall check.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check, message, pair, within, Kind, ALL};

/// Far more than any bound below, so an unbounded transport would be caught mid-flood.
const TOTAL: usize = 32 * 1024 * 1024;
const STALL: Duration = Duration::from_millis(1500);

/// (largest buffered amount the sender may report, most bytes that may be accepted while the
/// receiver reads nothing).
///
/// In-process: the 64-message queue plus the one send waiting for a slot (counted from the
/// moment it starts waiting).
///
/// WebRTC: the 64 KiB send buffer plus the one message admitted onto it (and a few bytes for
/// a credit message); the credit window
/// (2 MiB by default) bounds what is accepted while nothing is consumed.
fn bounds(kind: Kind, max: usize) -> (usize, usize) {
    match kind {
        Kind::InProcess => (65 * max, 65 * max),
        Kind::WebRtc => (64 * 1024 + max + 64, 2 * 1024 * 1024),
    }
}

async fn stalled(kind: Kind) {
    let ((a_tx, _a_rx), (_b_tx, mut b_rx)) = pair(kind).await;
    let size = a_tx.max_message_size();
    let count = (TOTAL / size) as u64;
    let (max_buffered, max_accepted) = bounds(kind, size);
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let a_tx = a_tx.clone();
        let sent = sent.clone();
        tokio::spawn(async move {
            for seq in 0..count {
                a_tx.send(message(seq, size)).await.expect("send");
                sent.store(seq + 1, Ordering::Release);
            }
        })
    };

    // Read nothing for a while; watch the sender's buffer.
    let mut peak_buffered = 0;
    let stall_end = Instant::now() + STALL;
    while Instant::now() < stall_end {
        peak_buffered = peak_buffered.max(a_tx.buffered_amount().await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let accepted = sent.load(Ordering::Acquire) as usize * size;
    println!(
        "{kind:?}: receiver stalled {STALL:?}: sender accepted {:.2} MiB of {} MiB, peak buffered {} KiB",
        accepted as f64 / (1 << 20) as f64,
        TOTAL >> 20,
        peak_buffered >> 10,
    );
    assert!(
        peak_buffered <= max_buffered,
        "{kind:?}: buffered amount {peak_buffered} exceeds {max_buffered}"
    );
    assert!(
        accepted <= max_accepted,
        "{kind:?}: {accepted} bytes accepted with nobody reading (bound {max_accepted})"
    );

    // Resume: everything arrives, in order, and the sender finishes.
    let resume = Instant::now();
    let mut last = resume;
    let mut worst_gap = Duration::ZERO;
    for seq in 0..count {
        let got = b_rx.recv().await.expect("stream ended early");
        let now = Instant::now();
        worst_gap = worst_gap.max(now - last);
        last = now;
        check(&got, seq, size);
    }
    sender.await.expect("sender task");
    println!(
        "{kind:?}: after resuming, the rest arrived in {:.1} ms, worst gap between arrivals {:.1} ms",
        resume.elapsed().as_secs_f64() * 1e3,
        worst_gap.as_secs_f64() * 1e3
    );
    // A transport that let SCTP's receive window close recovers through zero-window probes
    // backing off to seconds (4.2 s measured before credit flow control).
    assert!(
        worst_gap < Duration::from_millis(900),
        "{kind:?}: a {worst_gap:?} gap after the receiver resumed looks like a zero-window stall"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_receiver_makes_the_sender_wait() {
    for kind in ALL {
        within(Duration::from_secs(60), "backpressure test", stalled(kind)).await;
    }
}
