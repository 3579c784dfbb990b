//! The in-process transport: a bounded tokio channel per direction.
//!
//! Used by tests and by rings whose nodes share a process without wanting WebRTC in between.
//! It keeps the contract of the real transports — a message size limit and a bounded buffer
//! that makes `send` wait — so code that is wrong about chunking or flow control fails here
//! too, not only over the network.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use crate::{BoxFuture, Error, Inbox, Link, LinkRx, LinkTx, Result};

/// Shape of an in-process link.
#[derive(Debug, Clone)]
pub struct InProcessConfig {
    /// Messages the channel holds before `send` waits (the high watermark, in messages).
    pub capacity: usize,
    /// Largest message accepted, in bytes. Defaults to WebRTC's 64 KiB so in-process tests
    /// exercise the same chunking as the network.
    pub max_message_size: usize,
}

impl Default for InProcessConfig {
    fn default() -> Self {
        Self {
            capacity: 64,
            max_message_size: 64 * 1024,
        }
    }
}

/// One direction: a [`Link`] whose messages come out of the returned [`Inbox`].
pub fn link(config: &InProcessConfig, name: &str) -> (Link, Inbox) {
    // tokio panics on a zero-capacity channel; one slot is the closest meaningful value.
    let (tx, rx) = mpsc::channel(config.capacity.max(1));
    let buffered = Arc::new(AtomicUsize::new(0));
    let link = Link::new(Tx {
        tx: Mutex::new(Some(tx)),
        buffered: buffered.clone(),
        max_message_size: config.max_message_size,
        name: format!("in-process:{name}"),
    });
    (link, Inbox::new(Rx { rx, buffered }))
}

/// Both directions between two endpoints `a` and `b`: `a.0` sends to `b.1`, `b.0` to `a.1`.
pub fn pair(config: &InProcessConfig) -> ((Link, Inbox), (Link, Inbox)) {
    let (a_tx, b_rx) = link(config, "a->b");
    let (b_tx, a_rx) = link(config, "b->a");
    ((a_tx, a_rx), (b_tx, b_rx))
}

struct Tx {
    // `None` after `close()`: dropping our sender lets the receiver drain what is queued and
    // then see the end, which is exactly the close contract.
    tx: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    buffered: Arc<AtomicUsize>,
    max_message_size: usize,
    name: String,
}

impl Tx {
    fn sender(&self) -> Option<mpsc::Sender<Vec<u8>>> {
        // A poisoned lock only means another sender panicked mid-clone; the Option is intact.
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn closed(&self) -> Error {
        Error::Closed {
            link: self.name.clone(),
        }
    }
}

impl LinkTx for Tx {
    fn send(&self, msg: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let tx = self.sender().ok_or_else(|| self.closed())?;
            let len = msg.len();
            // Count before the send so the receiver never subtracts bytes not yet added.
            self.buffered.fetch_add(len, Ordering::AcqRel);
            if tx.send(msg).await.is_err() {
                self.buffered.fetch_sub(len, Ordering::AcqRel);
                return Err(self.closed());
            }
            Ok(())
        })
    }

    fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    fn buffered_amount(&self) -> BoxFuture<'_, usize> {
        Box::pin(async move { self.buffered.load(Ordering::Acquire) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.tx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
        })
    }

    fn name(&self) -> &str {
        &self.name
    }
}

struct Rx {
    rx: mpsc::Receiver<Vec<u8>>,
    buffered: Arc<AtomicUsize>,
}

impl LinkRx for Rx {
    fn recv(&mut self) -> BoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let msg = self.rx.recv().await?;
            self.buffered.fetch_sub(msg.len(), Ordering::AcqRel);
            Some(msg)
        })
    }
}
