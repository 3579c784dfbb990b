//! One hop of the ring: an ordered, reliable, message-oriented link with backpressure.
//!
//! A node sends activation frames to its successor through a [`Link`] and reads its
//! predecessor's frames from an [`Inbox`]. Both are thin handles over the [`LinkTx`] /
//! [`LinkRx`] traits, so the node runtime is written once and runs over any transport:
//! [`in_process`] bounded channels (tests, single-process rings), native WebRTC data channels
//! (`webrtc`) and the browser's `RTCDataChannel` (`browser`, on wasm32), which speak one wire
//! format so tabs and native nodes link to each other.
//!
//! Every transport promises the same things: messages arrive whole and in order or the link
//! reports itself closed; `send` waits (instead of buffering without bound) while too much is
//! in flight; a message larger than [`Link::max_message_size`] is refused, because chunking
//! frames belongs to the protocol layer, which knows where frame boundaries are.

#[cfg(target_family = "wasm")]
pub mod browser;
pub mod credit;
mod error;
pub mod in_process;
mod link;
#[cfg(not(target_family = "wasm"))]
pub mod shaping;
#[cfg(not(target_family = "wasm"))]
pub mod wakeups;
#[cfg(not(target_family = "wasm"))]
pub mod webrtc;

pub use error::{Error, Result};

/// The credit window of WebRTC links in bytes: the most a sender may have sent beyond what the
/// receiving application has consumed. Native and browser peers must agree on it.
pub const RECEIVE_WINDOW: usize = 2 * 1024 * 1024;
pub use link::{BoxFuture, Inbox, Link, LinkRx, LinkTx, MaybeSend, MaybeSync};
