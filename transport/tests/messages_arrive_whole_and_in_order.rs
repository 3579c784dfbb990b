//! Messages of every size up to the link's maximum — 1 B, 1 KiB, the 64 KiB maximum, and a
//! stream of 10 000 small ones — arrive whole, uncorrupted and in send order in both
//! directions, on every transport; a reordering, truncating or dropping transport fails here.

mod common;

use std::time::Duration;

use common::{check, message, pair, within, Kind, ALL};

const LIMIT: Duration = Duration::from_secs(60);

async fn sizes_round_trip(kind: Kind) {
    let ((a_tx, mut a_rx), (b_tx, mut b_rx)) = pair(kind).await;
    let max = a_tx.max_message_size();
    assert_eq!(max, 64 * 1024, "{kind:?}: default max message size");
    let sizes = [1, 2, 7, 8, 9, 1024, 2048, 16 * 1024, max - 1, max];
    for (seq, &len) in sizes.iter().enumerate() {
        let seq = seq as u64;
        a_tx.send(message(seq, len)).await.expect("a sends");
        b_tx.send(message(seq + 1000, len)).await.expect("b sends");
    }
    for (seq, &len) in sizes.iter().enumerate() {
        let seq = seq as u64;
        let got = b_rx.recv().await.expect("b receives");
        check(&got, seq, len);
        let got = a_rx.recv().await.expect("a receives");
        check(&got, seq + 1000, len);
    }
    println!("{kind:?}: sizes {sizes:?} arrived intact both ways");
}

async fn many_small_in_order(kind: Kind) {
    const COUNT: u64 = 10_000;
    let ((a_tx, _a_rx), (_b_tx, mut b_rx)) = pair(kind).await;
    // Lengths cycle through 1..=300 so message boundaries move around.
    let len = |seq: u64| 1 + (seq * 7 % 300) as usize;
    let sender = tokio::spawn(async move {
        for seq in 0..COUNT {
            a_tx.send(message(seq, len(seq))).await.expect("send");
        }
        a_tx
    });
    let start = std::time::Instant::now();
    for seq in 0..COUNT {
        let got = b_rx.recv().await.expect("stream ended early");
        check(&got, seq, len(seq));
    }
    let elapsed = start.elapsed();
    let _a_tx = sender.await.expect("sender task");
    println!(
        "{kind:?}: {COUNT} small messages in order in {:.1} ms ({:.0} msg/s)",
        elapsed.as_secs_f64() * 1e3,
        COUNT as f64 / elapsed.as_secs_f64()
    );
}

async fn oversized_is_refused(kind: Kind) {
    let ((a_tx, _a_rx), (_b_tx, mut b_rx)) = pair(kind).await;
    let max = a_tx.max_message_size();
    match a_tx.send(vec![0; max + 1]).await {
        Err(mdi_transport::Error::MessageTooLarge { len, max: m, .. }) => {
            assert_eq!((len, m), (max + 1, max));
        }
        other => panic!("{kind:?}: oversized send gave {other:?}"),
    }
    // The refusal does not poison the link.
    a_tx.send(message(1, 3)).await.expect("send after refusal");
    check(&b_rx.recv().await.expect("recv"), 1, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_up_to_the_maximum_arrive_intact() {
    for kind in ALL {
        within(LIMIT, "sizes test", sizes_round_trip(kind)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_messages_keep_their_order() {
    for kind in ALL {
        within(LIMIT, "small-message stream", many_small_in_order(kind)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_and_link_survives() {
    for kind in ALL {
        within(LIMIT, "oversize test", oversized_is_refused(kind)).await;
    }
}
