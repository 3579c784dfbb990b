//! The transport-neutral interface of a ring hop: the [`LinkTx`] / [`LinkRx`] traits that each
//! transport implements, and the [`Link`] / [`Inbox`] handles the node runtime holds.
//!
//! The traits return boxed futures rather than using `async fn` so they stay object-safe:
//! the runtime stores `Link`/`Inbox` without being generic over the transport, and one ring may
//! mix transports. Natively the futures are `Send` (tokio's multi-threaded scheduler needs
//! that); on wasm32 they are not, because browser handles (`JsValue`) never are.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::{Error, Result};

/// `Send` natively, nothing on wasm32 (where everything runs on one thread and JS handles are
/// not `Send`).
#[cfg(not(target_family = "wasm"))]
pub trait MaybeSend: Send {}
#[cfg(not(target_family = "wasm"))]
impl<T: Send + ?Sized> MaybeSend for T {}
/// `Send` natively, nothing on wasm32.
#[cfg(target_family = "wasm")]
pub trait MaybeSend {}
#[cfg(target_family = "wasm")]
impl<T: ?Sized> MaybeSend for T {}

/// `Sync` natively, nothing on wasm32.
#[cfg(not(target_family = "wasm"))]
pub trait MaybeSync: Sync {}
#[cfg(not(target_family = "wasm"))]
impl<T: Sync + ?Sized> MaybeSync for T {}
/// `Sync` natively, nothing on wasm32.
#[cfg(target_family = "wasm")]
pub trait MaybeSync {}
#[cfg(target_family = "wasm")]
impl<T: ?Sized> MaybeSync for T {}

/// A boxed future, `Send` natively and not on wasm32.
#[cfg(not(target_family = "wasm"))]
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A boxed future, `Send` natively and not on wasm32.
#[cfg(target_family = "wasm")]
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The sending half of a transport. Implementations must deliver messages whole, in order,
/// reliably, and must make [`send`](Self::send) wait while the amount buffered towards the
/// peer is above the transport's high watermark, so a fast sender cannot grow memory without
/// bound.
pub trait LinkTx: MaybeSend + MaybeSync + 'static {
    /// Queues one message. Resolves once the transport has accepted it (not once the peer has
    /// read it). Fails with [`Error::Closed`] once the link is closed. The caller ([`Link`])
    /// has already checked the size against [`max_message_size`](Self::max_message_size).
    fn send(&self, msg: Vec<u8>) -> BoxFuture<'_, Result<()>>;

    /// The largest message this link carries, in bytes.
    fn max_message_size(&self) -> usize;

    /// Bytes accepted by [`send`](Self::send) but not yet taken by the peer (the WebRTC
    /// `bufferedAmount` idea). Used by tests and diagnostics; `send` applies the bound itself.
    fn buffered_amount(&self) -> BoxFuture<'_, usize>;

    /// Closes the link after trying briefly to flush what was already sent: the peer's
    /// [`Inbox`] then ends with `None` and later sends here fail with [`Error::Closed`].
    /// Whether the reverse direction ends too is the transport's business (one WebRTC data
    /// channel carries both, so it does; in-process directions are independent). Idempotent.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// A short name for errors and logs, e.g. `webrtc:node1`.
    fn name(&self) -> &str;
}

/// The receiving half of a transport.
pub trait LinkRx: MaybeSend + 'static {
    /// The next message, or `None` once the link is closed and everything sent before the close
    /// has been delivered.
    fn recv(&mut self) -> BoxFuture<'_, Option<Vec<u8>>>;
}

/// The sending end of a ring hop. Cheap to clone; all clones feed the same ordered stream.
#[derive(Clone)]
pub struct Link {
    inner: Arc<dyn LinkTx>,
}

impl Link {
    /// Wraps a transport's sending half.
    pub fn new(tx: impl LinkTx) -> Self {
        Self {
            inner: Arc::new(tx),
        }
    }

    /// Sends one message, waiting while the transport's buffer is above its high watermark.
    ///
    /// Errors: [`Error::MessageTooLarge`] if `msg` exceeds [`max_message_size`](Self::max_message_size)
    /// (nothing is sent), [`Error::Closed`] once the link is closed.
    pub async fn send(&self, msg: Vec<u8>) -> Result<()> {
        let max = self.inner.max_message_size();
        if msg.len() > max {
            return Err(Error::MessageTooLarge {
                link: self.inner.name().to_owned(),
                len: msg.len(),
                max,
            });
        }
        self.inner.send(msg).await
    }

    /// The largest message this link carries, in bytes.
    pub fn max_message_size(&self) -> usize {
        self.inner.max_message_size()
    }

    /// Bytes sent but not yet taken by the peer; see [`LinkTx::buffered_amount`].
    pub async fn buffered_amount(&self) -> usize {
        self.inner.buffered_amount().await
    }

    /// Closes the link for every clone; see [`LinkTx::close`].
    pub async fn close(&self) {
        self.inner.close().await
    }

    /// The link's name, as used in its errors.
    pub fn name(&self) -> &str {
        self.inner.name()
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.inner.name())
            .field("max_message_size", &self.inner.max_message_size())
            .finish()
    }
}

/// The receiving end of a ring hop.
pub struct Inbox {
    inner: Box<dyn LinkRx>,
}

impl Inbox {
    /// Wraps a transport's receiving half.
    pub fn new(rx: impl LinkRx) -> Self {
        Self {
            inner: Box::new(rx),
        }
    }

    /// The next message, or `None` once the link is closed and drained.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.inner.recv().await
    }
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}
