//! An 8 MiB burst in maximum-size (64 KiB) messages gets through quickly and without any gap
//! of a second or more between arrivals — the signature of SCTP's 1 s retransmission timeout,
//! which an unbounded WebRTC send buffer triggers by overflowing the peer's UDP receive
//! buffer. Prints the throughput of each transport.

mod common;

use std::time::{Duration, Instant};

use common::{check, message, pair, within, Kind, ALL};

const TOTAL: usize = 8 * 1024 * 1024;

async fn burst(kind: Kind) {
    let ((a_tx, _a_rx), (_b_tx, mut b_rx)) = pair(kind).await;
    let size = a_tx.max_message_size();
    let count = TOTAL.div_ceil(size) as u64;
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for seq in 0..count {
            a_tx.send(message(seq, size)).await.expect("send");
        }
        a_tx
    });
    let mut last = Instant::now();
    let mut worst_gap = Duration::ZERO;
    for seq in 0..count {
        let got = b_rx.recv().await.expect("burst ended early");
        let now = Instant::now();
        worst_gap = worst_gap.max(now - last);
        last = now;
        check(&got, seq, size);
    }
    let elapsed = start.elapsed();
    let _a_tx = sender.await.expect("sender task");
    println!(
        "{kind:?}: {} MiB in {count} x {} KiB messages: {:.1} ms, {:.0} MB/s, worst gap between arrivals {:.2} ms",
        TOTAL >> 20,
        size >> 10,
        elapsed.as_secs_f64() * 1e3,
        TOTAL as f64 / elapsed.as_secs_f64() / 1e6,
        worst_gap.as_secs_f64() * 1e3,
    );
    assert!(
        worst_gap < Duration::from_millis(900),
        "{kind:?}: a {worst_gap:?} gap between arrivals looks like an SCTP retransmission stall"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_mib_burst_arrives_without_stalling() {
    // Sequential, not one test per transport: parallel tests would share the two cores and
    // make the printed throughput meaningless.
    for kind in ALL {
        within(Duration::from_secs(60), "8 MiB burst", burst(kind)).await;
    }
}
