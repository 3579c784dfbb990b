//! Measures the round trip of 2 KiB messages (about one decode-token frame) through an echoing
//! peer and prints p50/p99 for each transport. It asserts only that every echo comes back
//! intact: timings on a shared 2-core machine are too noisy for a tight bound.

mod common;

use std::time::{Duration, Instant};

use common::{check, message, pair, percentile, within, Kind, ALL};

const ROUNDS: u64 = 2_000;
const WARMUP: u64 = 100;
const SIZE: usize = 2048;

async fn round_trips(kind: Kind) {
    let ((a_tx, mut a_rx), (b_tx, mut b_rx)) = pair(kind).await;
    let echo = tokio::spawn(async move {
        while let Some(msg) = b_rx.recv().await {
            if b_tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut samples = Vec::with_capacity(ROUNDS as usize);
    for seq in 0..WARMUP + ROUNDS {
        let start = Instant::now();
        a_tx.send(message(seq, SIZE)).await.expect("send");
        let got = a_rx.recv().await.expect("echo");
        let rtt = start.elapsed();
        check(&got, seq, SIZE);
        if seq >= WARMUP {
            samples.push(rtt);
        }
    }
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{kind:?}: {ROUNDS} round trips of {SIZE} B: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        us(percentile(&samples, 50.0)),
        us(percentile(&samples, 99.0)),
        us(samples[samples.len() - 1]),
    );
    a_tx.close().await;
    within(Duration::from_secs(10), "echo task to end", echo)
        .await
        .expect("echo task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_latency_is_measured() {
    for kind in ALL {
        within(Duration::from_secs(60), "round trips", round_trips(kind)).await;
    }
}
