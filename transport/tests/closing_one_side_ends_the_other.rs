//! Closing a link — explicitly, or by dropping both ends of one side — ends the other side
//! cleanly: its inbox first delivers everything sent before the close, then yields `None`, and
//! sends into the closed link fail with `Error::Closed` instead of hanging or panicking.

mod common;

use std::time::Duration;

use common::{check, message, pair, within, Kind, ALL};
use mdi_transport::{Error, Link};

const LIMIT: Duration = Duration::from_secs(20);

/// Sends until the link reports closed; a close may take a moment to cross the network.
async fn send_until_closed(link: &Link) {
    for seq in 0.. {
        match link.send(message(seq, 16)).await {
            Err(Error::Closed { .. }) => return,
            Err(other) => panic!("expected Closed, got {other}"),
            Ok(()) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn explicit_close(kind: Kind) {
    let ((a_tx, _a_rx), (b_tx, mut b_rx)) = pair(kind).await;
    for seq in 0..3 {
        a_tx.send(message(seq, 1000)).await.expect("send");
    }
    a_tx.close().await;
    for seq in 0..3 {
        let got = b_rx
            .recv()
            .await
            .expect("messages sent before the close arrive");
        check(&got, seq, 1000);
    }
    assert!(
        b_rx.recv().await.is_none(),
        "{kind:?}: inbox ends after close"
    );
    assert!(
        matches!(a_tx.send(message(9, 1)).await, Err(Error::Closed { .. })),
        "{kind:?}: send after close fails with Closed"
    );
    if kind == Kind::WebRtc {
        // One data channel carries both directions, so the peer's sends end too.
        send_until_closed(&b_tx).await;
    }
    println!("{kind:?}: explicit close ended the peer's inbox");
}

async fn drop_one_side(kind: Kind) {
    let ((a_tx, a_rx), (b_tx, mut b_rx)) = pair(kind).await;
    a_tx.send(message(0, 100)).await.expect("send");
    check(&b_rx.recv().await.expect("recv"), 0, 100);
    drop((a_tx, a_rx));
    assert!(
        b_rx.recv().await.is_none(),
        "{kind:?}: inbox ends when the peer goes away"
    );
    send_until_closed(&b_tx).await;
    println!("{kind:?}: dropping one side ended the other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_close_ends_the_peer_inbox() {
    for kind in ALL {
        within(LIMIT, "explicit close", explicit_close(kind)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_one_side_ends_the_other() {
    for kind in ALL {
        within(LIMIT, "drop one side", drop_one_side(kind)).await;
    }
}
