//! The crate's single error type: every variant names the link or peer it concerns and, where
//! the caller can do something about it, says what.

use std::time::Duration;

/// Everything that can go wrong on a ring hop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The link was closed, locally or by the peer (or the peer vanished). Nothing more will be
    /// delivered in this direction; the ring must rebuild this hop.
    #[error("link {link}: closed (locally or by the peer); rebuild this ring hop to continue")]
    Closed { link: String },

    /// A message over the transport's limit. Frames must be chunked by the protocol layer to
    /// at most [`crate::Link::max_message_size`] bytes before they reach a link.
    #[error(
        "link {link}: message of {len} bytes exceeds the transport's limit of {max} bytes; \
         chunk frames to Link::max_message_size() before sending"
    )]
    MessageTooLarge {
        link: String,
        len: usize,
        max: usize,
    },

    /// A configuration value the transport cannot honour.
    #[error("peer {peer}: invalid configuration: {what}")]
    Config { peer: String, what: String },

    /// A signaling message (SDP offer/answer JSON) that could not be used.
    #[error("peer {peer}: bad signaling message ({what}): {detail}")]
    Signaling {
        peer: String,
        what: &'static str,
        detail: String,
    },

    /// The peers did not reach the named stage in time.
    #[error(
        "peer {peer}: timed out after {after:?} waiting for {what}; is the other peer running \
         and reachable on loopback?"
    )]
    Timeout {
        peer: String,
        what: &'static str,
        after: Duration,
    },

    /// A call made out of order (e.g. `accept_answer` before `create_offer`).
    #[error("peer {peer}: {what}")]
    Usage { peer: String, what: &'static str },

    /// The browser's WebRTC API failed at the named step.
    #[error("peer {peer}: the browser failed to {what}: {detail}")]
    Browser {
        peer: String,
        what: &'static str,
        detail: String,
    },

    /// The WebRTC stack itself failed at the named step.
    #[cfg(not(target_family = "wasm"))]
    #[error("peer {peer}: WebRTC failed to {what}: {source}")]
    WebRtc {
        peer: String,
        what: &'static str,
        #[source]
        source: ::webrtc::error::Error,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
