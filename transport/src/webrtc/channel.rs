//! One open WebRTC data channel seen as a [`Link`] / [`Inbox`] pair, with credit-based flow
//! control on top of SCTP's.
//!
//! Why credits: the `webrtc` crate applies receive backpressure by no longer reading the
//! connection, which closes SCTP's receive window; when the reader catches up, the sender only
//! finds out through SCTP's zero-window probe, whose timer backs off (1 s, 2 s, 4 s...).
//! Measured here: after a 1.5 s stalled reader, gaps of over 4 s. So the window must never
//! close. The receiver grants credit — cumulative bytes its application has taken out of the
//! [`Inbox`] — and the sender keeps at most `receive_window` bytes beyond the last grant. The
//! receiving side can then buffer everything the sender may send without ever stopping the
//! driver, and its memory stays bounded by the window.
//!
//! The wire format is in the parent module's docs; the arithmetic on the peer's numbers is in
//! [`crate::credit`], where no grant, however large, can wrap the window.
//!
//! Below the credits, the crate's bounded send buffer (`with_data_channel_send_buffer_limit`)
//! keeps what is handed to SCTP small: `send` waits while unacknowledged bytes are at the
//! limit, and is woken by acknowledgements. An unbounded buffer lets a burst overflow the
//! peer's UDP receive buffer, and SCTP then stalls for a whole 1 s retransmission timeout.
//!
//! A pump task drains the crate's single event stream (messages, open/close, buffered-amount
//! notices) for as long as the channel lives, so undelivered events never pile up in the
//! driver; a second small task sends the credits, so the pump never waits for send space.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState};

use crate::{credit, BoxFuture, Error, Inbox, Link, LinkRx, LinkTx, Result};

/// How long `close()` waits for queued bytes to be acknowledged, and then for the channel's
/// closing handshake, before tearing the connection down anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Where a data channel is in its life, as the pump has seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChannelState {
    Connecting,
    Open,
    /// No new sends; messages already in flight are still delivered.
    Closing,
    Closed,
}

/// Owns the peer connection on behalf of every handle that needs it alive, and closes it when
/// the last one goes: a dropped `PeerConnection` otherwise leaves its driver task running.
pub(crate) struct Guard {
    pc: Arc<dyn PeerConnection>,
    closed: AtomicBool,
}

impl Guard {
    pub(crate) fn new(pc: Arc<dyn PeerConnection>) -> Self {
        Self {
            pc,
            closed: AtomicBool::new(false),
        }
    }

    pub(crate) fn pc(&self) -> &Arc<dyn PeerConnection> {
        &self.pc
    }

    pub(crate) async fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // Closing an already failed connection can error; there is nothing left to undo.
            let _ = self.pc.close().await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if *self.closed.get_mut() {
            return;
        }
        // Drop cannot await; hand the close to the runtime the driver lives on. Outside any
        // runtime the driver cannot be running either, so there is nothing to stop.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let pc = self.pc.clone();
            handle.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

/// A data channel whose tasks are running, not yet handed out as a link.
pub(crate) struct Channel {
    dc: Arc<dyn DataChannel>,
    state: watch::Receiver<ChannelState>,
    inbox: mpsc::UnboundedReceiver<Vec<u8>>,
    granted: watch::Receiver<u64>,
    consumed: Arc<watch::Sender<u64>>,
    window: u64,
}

impl Channel {
    /// Starts pumping `dc`'s events and granting credit. `conn` is the peer connection's
    /// state, watched so that a peer that vanishes without closing still ends the channel once
    /// ICE gives up on it. `window` is the credit window in bytes, the same on both sides.
    pub(crate) fn start(
        dc: Arc<dyn DataChannel>,
        conn: watch::Receiver<RTCPeerConnectionState>,
        window: u64,
    ) -> Self {
        let (state_tx, state) = watch::channel(ChannelState::Connecting);
        // Unbounded on purpose: the peer never has more than `window` bytes beyond our last
        // grant, and grants follow what the Inbox consumed, so this queue holds at most a
        // window. Bounding it in messages instead would stall the pump, which is what closes
        // SCTP's window.
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (granted_tx, granted) = watch::channel(0u64);
        let consumed = Arc::new(watch::channel(0u64).0);
        tokio::spawn(pump(
            dc.clone(),
            conn,
            state_tx,
            inbox_tx,
            granted_tx,
            consumed.clone(),
            window,
        ));
        tokio::spawn(grant_credit(
            dc.clone(),
            consumed.subscribe(),
            state.clone(),
            // A quarter window per grant: few credit messages, yet a sender that has used its
            // whole window still has three quarters back after one grant.
            (window / 4).max(1),
        ));
        Self {
            dc,
            state,
            inbox,
            granted,
            consumed,
            window,
        }
    }

    /// Waits for the channel to open. `false` if it closed first.
    pub(crate) async fn opened(&mut self) -> bool {
        matches!(
            self.state
                .wait_for(|s| *s != ChannelState::Connecting)
                .await
                .map(|s| *s),
            Ok(ChannelState::Open)
        )
    }

    pub(crate) fn into_link(
        self,
        guard: Arc<Guard>,
        name: String,
        max_message_size: usize,
    ) -> (Link, Inbox) {
        let tx = Tx {
            dc: self.dc,
            state: self.state,
            granted: self.granted,
            sent: tokio::sync::Mutex::new(0),
            window: self.window,
            guard: guard.clone(),
            max_message_size,
            name,
        };
        let rx = Rx {
            inbox: self.inbox,
            consumed: self.consumed,
            _guard: guard,
        };
        (Link::new(tx), Inbox::new(rx))
    }
}

fn is_terminal(state: RTCPeerConnectionState) -> bool {
    matches!(
        state,
        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
    )
}

fn is_closing(state: &ChannelState) -> bool {
    matches!(state, ChannelState::Closing | ChannelState::Closed)
}

async fn pump(
    dc: Arc<dyn DataChannel>,
    mut conn: watch::Receiver<RTCPeerConnectionState>,
    state: watch::Sender<ChannelState>,
    inbox: mpsc::UnboundedSender<Vec<u8>>,
    granted: watch::Sender<u64>,
    consumed: Arc<watch::Sender<u64>>,
    window: u64,
) {
    // Cumulative binary bytes received; a peer honouring our credit never gets more than a
    // window ahead of what was consumed.
    let mut received = 0u64;
    loop {
        if is_terminal(*conn.borrow_and_update()) {
            break;
        }
        let event = tokio::select! {
            event = dc.poll() => event,
            changed = conn.changed() => {
                if changed.is_err() {
                    // The handler (and so the connection) is gone.
                    break;
                }
                continue;
            }
        };
        match event {
            Some(DataChannelEvent::OnOpen) => {
                state.send_replace(ChannelState::Open);
            }
            Some(DataChannelEvent::OnMessage(msg)) if msg.is_string => {
                // A credit. Anything else in text is not ours to interpret; ignore it rather
                // than let a peer's stray string break the link.
                if let Some(credit) = credit::parse(&msg.data) {
                    granted.send_modify(|g| {
                        let mut at = credit::Granted(*g);
                        at.grant(credit);
                        *g = at.0;
                    });
                }
            }
            Some(DataChannelEvent::OnMessage(msg)) => {
                let len = msg.data.len() as u64;
                received = received.saturating_add(len);
                if credit::overrun(received, *consumed.borrow(), window) {
                    // The peer ignores credit; queueing on would let it grow our memory
                    // without bound. Treat it as a broken link.
                    let _ = dc.close().await;
                    break;
                }
                if inbox.send(Vec::from(msg.data)).is_err() {
                    // Nobody will read it: count it consumed so the peer is not left waiting
                    // for credit that would never come.
                    consumed.send_modify(|c| *c = c.saturating_add(len));
                }
            }
            // Closing: refuse new sends now, but keep delivering what is still arriving until
            // the channel is fully closed.
            Some(DataChannelEvent::OnClosing) => {
                state.send_replace(ChannelState::Closing);
            }
            Some(DataChannelEvent::OnClose) | None => break,
            Some(_) => {}
        }
    }
    state.send_replace(ChannelState::Closed);
    // Dropping `inbox` ends the Inbox after it drains; dropping `granted` releases senders
    // waiting for credit (they then report Closed).
}

/// Sends a credit each time another `step` bytes have been consumed from the Inbox.
async fn grant_credit(
    dc: Arc<dyn DataChannel>,
    mut consumed: watch::Receiver<u64>,
    mut state: watch::Receiver<ChannelState>,
    step: u64,
) {
    let mut granted = 0u64;
    loop {
        let next = tokio::select! {
            next = consumed.wait_for(|c| c.saturating_sub(granted) >= step) => match next {
                Ok(c) => *c,
                Err(_) => return,
            },
            _ = state.wait_for(is_closing) => return,
        };
        if dc.send_text(&next.to_string()).await.is_err() {
            return;
        }
        granted = next;
    }
}

struct Tx {
    dc: Arc<dyn DataChannel>,
    state: watch::Receiver<ChannelState>,
    /// Cumulative bytes the peer's Inbox has consumed, as last granted.
    granted: watch::Receiver<u64>,
    /// Cumulative bytes sent. Held across a whole send so concurrent clones of the Link
    /// neither overdraw the credit nor interleave out of order.
    sent: tokio::sync::Mutex<u64>,
    window: u64,
    guard: Arc<Guard>,
    max_message_size: usize,
    name: String,
}

impl Tx {
    fn closed(&self) -> Error {
        Error::Closed {
            link: self.name.clone(),
        }
    }

    /// True once no new message can go out (closing or closed).
    fn is_closed(&self) -> bool {
        is_closing(&self.state.borrow())
    }
}

impl LinkTx for Tx {
    fn send(&self, msg: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(self.closed());
            }
            let mut sent = self.sent.lock().await;
            let end = sent.saturating_add(msg.len() as u64);
            let mut state = self.state.clone();
            let mut granted = self.granted.clone();
            // Wait for credit. The crate's own send would wait for buffer space only until
            // *it* sees a local close; a vanished peer is noticed by our pump, so race both.
            tokio::select! {
                credit = granted.wait_for(|&g| credit::Granted(g).allows(self.window, end)) => {
                    if credit.is_err() {
                        return Err(self.closed());
                    }
                }
                _ = state.wait_for(is_closing) => return Err(self.closed()),
            }
            let result = tokio::select! {
                result = self.dc.send(BytesMut::from(&msg[..])) => result,
                _ = state.wait_for(is_closing) => return Err(self.closed()),
            };
            match result {
                Ok(()) => {
                    *sent = end;
                    Ok(())
                }
                Err(_) if self.is_closed() => Err(self.closed()),
                Err(webrtc::error::Error::ErrDataChannelClosed) => Err(self.closed()),
                Err(source) => Err(Error::WebRtc {
                    peer: self.name.clone(),
                    what: "send a message",
                    source,
                }),
            }
        })
    }

    fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    fn buffered_amount(&self) -> BoxFuture<'_, usize> {
        // A closed channel has nothing buffered that will ever be sent.
        Box::pin(async move { self.dc.outstanding_bytes().await.unwrap_or(0) })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Closing resets the SCTP stream; give bytes already queued a chance to be
            // acknowledged first so a close right after a send does not lose it.
            let flushed = async {
                while !self.is_closed() && self.dc.outstanding_bytes().await.unwrap_or(0) > 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, flushed).await;
            let _ = self.dc.close().await;
            // Let the closing handshake reach the peer before the connection goes, so its
            // inbox ends promptly instead of when ICE notices the silence.
            let mut state = self.state.clone();
            let _ =
                tokio::time::timeout(CLOSE_GRACE, state.wait_for(|s| *s == ChannelState::Closed))
                    .await;
            self.guard.close().await;
        })
    }

    fn name(&self) -> &str {
        &self.name
    }
}

struct Rx {
    inbox: mpsc::UnboundedReceiver<Vec<u8>>,
    consumed: Arc<watch::Sender<u64>>,
    // Keeps the connection up while only the receiving half is in use.
    _guard: Arc<Guard>,
}

impl LinkRx for Rx {
    fn recv(&mut self) -> BoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let msg = self.inbox.recv().await?;
            let len = msg.len() as u64;
            self.consumed.send_modify(|c| *c = c.saturating_add(len));
            Some(msg)
        })
    }
}
