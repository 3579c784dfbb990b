//! Native WebRTC links (webrtc-rs 0.21), restricted to loopback.
//!
//! One [`WebRtcPeer`] is one end of one ring hop: a peer connection carrying a single ordered,
//! reliable data channel. Signaling is plain strings — the browser's `{type, sdp}` JSON — so a
//! signaling server can relay them untouched later. ICE candidates are gathered completely
//! before a description is handed out (no trickle), which on loopback costs nothing.
//!
//! ```text
//! offerer                                  answerer
//! WebRtcPeer::new(cfg)                     WebRtcPeer::new(cfg)
//! offer  = create_offer()     ───────▶     answer = accept_offer(offer)
//! accept_answer(answer)       ◀───────
//! open_channel() -> (Link, Inbox)          accept_channel() -> (Link, Inbox)
//! ```
//!
//! Flow control is credit-based on top of SCTP's, so SCTP's receive window never closes (a
//! closed window recovers only after seconds of zero-window probing). Wire format, which a
//! browser peer must speak too: one data channel labelled `mdi`, ordered and reliable;
//! application messages are binary messages, unchanged; a text message is a credit, the
//! decimal count of binary bytes the receiver's application has consumed so far, sent each
//! time another quarter of [`WebRtcConfig::receive_window`] has been consumed. A sender keeps
//! at most `receive_window` bytes beyond the last credit.
//!
//! By default local-only: sockets bind to 127.0.0.1, mDNS is off (it would also fail in a
//! network namespace with only `lo`), no STUN/TURN server is configured, and every
//! non-loopback candidate is stripped from both descriptions before use. On a LAN a node binds
//! its LAN address instead, keeps every candidate and resolves the mDNS names browsers send
//! (`loopback_only: false, resolve_mdns: true`).

mod channel;
mod sdp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rtc::ice::mdns::MulticastDnsMode;
use rtc::peer_connection::configuration::setting_engine::SctpMaxMessageSize;
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::{DataChannel, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionState, RTCSdpType, RTCSessionDescription, SettingEngineBuilder,
};

use crate::{Error, Inbox, Link, Result};
use channel::{Channel, Guard};

/// The label of the one data channel per connection. Fixed so a browser peer knows it.
const CHANNEL_LABEL: &str = "mdi";

/// How a peer is set up.
#[derive(Debug, Clone)]
pub struct WebRtcConfig {
    /// Names this peer in errors and link names, e.g. `node2->node3`.
    pub label: String,
    /// Local UDP socket. Keep it on loopback unless `loopback_only` is turned off.
    pub bind_addr: SocketAddr,
    /// Strip every non-loopback ICE candidate from both descriptions.
    pub loopback_only: bool,
    /// Largest message accepted from the peer, advertised in SDP; the link's actual limit is
    /// the smaller of this and the peer's advertisement. At most 256 KiB (webrtc-rs' ceiling);
    /// 64 KiB is what every browser accepts.
    pub max_message_size: usize,
    /// Bytes handed to SCTP but not yet acknowledged before `send` waits. Small on purpose:
    /// an unbounded buffer lets a burst overflow the peer's UDP receive buffer and SCTP then
    /// stalls for a whole 1 s retransmission timeout.
    pub send_buffer_limit: usize,
    /// Credit window in bytes: the most a sender may have sent beyond what the receiving
    /// application has taken out of its [`Inbox`], and so the receive-side memory bound. Must
    /// be the same on both peers and at least twice `max_message_size`. See the wire format in
    /// the `channel` module: a closed SCTP window recovers only after seconds, so the
    /// transport never lets it close.
    pub receive_window: usize,
    /// Limit for each setup stage: gathering candidates, connecting and opening the channel.
    pub connect_timeout: Duration,
    /// Accept the peer's mDNS (`<uuid>.local`) candidates and resolve them, as a browser on a
    /// LAN sends. Off on loopback, where it would also fail in a namespace with only `lo`.
    pub resolve_mdns: bool,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        Self {
            label: "peer".to_owned(),
            bind_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            loopback_only: true,
            max_message_size: 64 * 1024,
            send_buffer_limit: 64 * 1024,
            receive_window: crate::RECEIVE_WINDOW,
            connect_timeout: Duration::from_secs(10),
            resolve_mdns: false,
        }
    }
}

impl WebRtcConfig {
    /// The default configuration under another label.
    pub fn labelled(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            ..Self::default()
        }
    }
}

/// Forwards the connection's callbacks into watch/mpsc channels the peer can await.
struct Handler {
    gathered: watch::Sender<bool>,
    state: watch::Sender<RTCPeerConnectionState>,
    incoming: mpsc::Sender<Arc<dyn DataChannel>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }

    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        // Runs on the connection's driver, so it must not wait. Only the first channel is
        // used; a peer opening more gets them dropped (which the driver tolerates).
        let _ = self.incoming.try_send(dc);
    }
}

/// Which side of the offer/answer exchange this peer has taken.
enum Role {
    Fresh,
    /// Offer sent; the channel exists and its pump runs, waiting for the answer.
    Offered(Channel),
    /// Offer sent and answer applied.
    Connected(Channel),
    /// Answer sent; the channel will arrive from the offerer.
    Answered,
}

/// One end of a WebRTC ring hop. See the module docs for the call sequence.
pub struct WebRtcPeer {
    config: WebRtcConfig,
    guard: Arc<Guard>,
    gathered: watch::Receiver<bool>,
    state: watch::Receiver<RTCPeerConnectionState>,
    incoming: mpsc::Receiver<Arc<dyn DataChannel>>,
    role: Role,
    /// The peer's advertised `max-message-size`, once its description is known.
    remote_max_message_size: Option<usize>,
}

impl WebRtcPeer {
    /// Creates the peer connection and binds its UDP socket.
    pub async fn new(config: WebRtcConfig) -> Result<Self> {
        let max = SctpMaxMessageSize::MAX_MESSAGE_SIZE as usize;
        if config.max_message_size == 0 || config.max_message_size > max {
            return Err(Error::Config {
                peer: config.label.clone(),
                what: format!(
                    "max_message_size {} is outside 1..={max} (webrtc-rs' SCTP limit)",
                    config.max_message_size
                ),
            });
        }
        if config.receive_window < 2 * config.max_message_size {
            // Smaller, and a sender could wait for credit that a quarter-window grant step
            // never releases.
            return Err(Error::Config {
                peer: config.label.clone(),
                what: format!(
                    "receive_window {} must be at least twice max_message_size {}",
                    config.receive_window, config.max_message_size
                ),
            });
        }
        let (gathered_tx, gathered) = watch::channel(false);
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        let (incoming_tx, incoming) = mpsc::channel(4);
        let handler = Arc::new(Handler {
            gathered: gathered_tx,
            state: state_tx,
            incoming: incoming_tx,
        });
        let build = |mdns: MulticastDnsMode, handler: Arc<Handler>| {
            let settings = SettingEngineBuilder::new()
                .with_multicast_dns_mode(mdns)
                .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(
                    // Checked above to be at most 256 KiB.
                    config.max_message_size as u32,
                ))
                .build();
            PeerConnectionBuilder::new()
                .with_setting_engine(settings)
                .with_handler(handler)
                .with_udp_addrs(vec![config.bind_addr])
                .with_data_channel_send_buffer_limit(config.send_buffer_limit.max(1))
                .build()
        };
        let pc = if config.resolve_mdns {
            match build(MulticastDnsMode::QueryOnly, handler.clone()).await {
                Ok(pc) => Ok(pc),
                Err(e) => {
                    // A host without a multicast route (a bare network namespace, some
                    // containers) cannot open the mDNS socket: go on without it; only a
                    // browser's `.local` candidates need it.
                    tracing::warn!(
                        "{}: no mDNS ({e}); `.local` candidates will not resolve",
                        config.label
                    );
                    build(MulticastDnsMode::Disabled, handler).await
                }
            }
        } else {
            build(MulticastDnsMode::Disabled, handler).await
        }
        .map_err(|source| Error::WebRtc {
            peer: config.label.clone(),
            what: "create the peer connection",
            source,
        })?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);
        Ok(Self {
            config,
            guard: Arc::new(Guard::new(pc)),
            gathered,
            state,
            incoming,
            role: Role::Fresh,
            remote_max_message_size: None,
        })
    }

    /// Starts a connection as the offerer: returns the offer as `{type, sdp}` JSON, with all
    /// (loopback) candidates included. Follow with [`accept_answer`](Self::accept_answer).
    pub async fn create_offer(&mut self) -> Result<String> {
        if !matches!(self.role, Role::Fresh) {
            return Err(self.usage("create_offer called twice or after accept_offer"));
        }
        // The channel must exist before the offer so the offer carries the SCTP section.
        let init = RTCDataChannelInit {
            ordered: true,
            ..Default::default()
        };
        let dc = self
            .pc()
            .create_data_channel(CHANNEL_LABEL, Some(init))
            .await
            .map_err(|e| self.webrtc("create the data channel", e))?;
        let channel = Channel::start(dc, self.state.clone(), self.config.receive_window as u64);
        let offer = self
            .pc()
            .create_offer(None)
            .await
            .map_err(|e| self.webrtc("create an offer", e))?;
        let json = self.publish_local(offer).await?;
        self.role = Role::Offered(channel);
        Ok(json)
    }

    /// Answers an offer (`{type, sdp}` JSON) and returns the answer in the same form. Follow
    /// with [`accept_channel`](Self::accept_channel).
    pub async fn accept_offer(&mut self, offer: &str) -> Result<String> {
        if !matches!(self.role, Role::Fresh) {
            return Err(self.usage("accept_offer called after create_offer or twice"));
        }
        let offer = self.remote_description(offer, RTCSdpType::Offer)?;
        self.pc()
            .set_remote_description(offer)
            .await
            .map_err(|e| self.webrtc("apply the remote offer", e))?;
        let answer = self
            .pc()
            .create_answer(None)
            .await
            .map_err(|e| self.webrtc("create an answer", e))?;
        let json = self.publish_local(answer).await?;
        self.role = Role::Answered;
        Ok(json)
    }

    /// Applies the answer (`{type, sdp}` JSON) to an offer made by
    /// [`create_offer`](Self::create_offer).
    pub async fn accept_answer(&mut self, answer: &str) -> Result<()> {
        let channel = match std::mem::replace(&mut self.role, Role::Fresh) {
            Role::Offered(channel) => channel,
            other => {
                self.role = other;
                return Err(self.usage("accept_answer needs a pending create_offer"));
            }
        };
        let answer = self.remote_description(answer, RTCSdpType::Answer)?;
        self.pc()
            .set_remote_description(answer)
            .await
            .map_err(|e| self.webrtc("apply the remote answer", e))?;
        self.role = Role::Connected(channel);
        Ok(())
    }

    /// Offerer side: waits for the data channel to open and returns its ends.
    pub async fn open_channel(mut self) -> Result<(Link, Inbox)> {
        let channel = match std::mem::replace(&mut self.role, Role::Fresh) {
            Role::Connected(channel) => channel,
            _ => return Err(self.usage("open_channel needs create_offer then accept_answer")),
        };
        self.finish(channel).await
    }

    /// Answerer side: waits for the offerer's data channel to arrive and open, and returns its
    /// ends.
    pub async fn accept_channel(mut self) -> Result<(Link, Inbox)> {
        if !matches!(self.role, Role::Answered) {
            return Err(self.usage("accept_channel needs accept_offer first"));
        }
        let timeout = self.config.connect_timeout;
        let dc = match tokio::time::timeout(timeout, self.incoming.recv()).await {
            Ok(Some(dc)) => dc,
            // The handler went away with the connection.
            Ok(None) => return Err(self.closed()),
            Err(_) => return Err(self.timeout("the offerer's data channel")),
        };
        let channel = Channel::start(dc, self.state.clone(), self.config.receive_window as u64);
        self.finish(channel).await
    }

    async fn finish(self, mut channel: Channel) -> Result<(Link, Inbox)> {
        match tokio::time::timeout(self.config.connect_timeout, channel.opened()).await {
            Ok(true) => {}
            Ok(false) => return Err(self.closed()),
            Err(_) => return Err(self.timeout("the data channel to open")),
        }
        // RFC 8841: a description without the attribute means 64 KiB.
        let remote = self.remote_max_message_size.unwrap_or(64 * 1024);
        let max = self.config.max_message_size.min(remote);
        let name = format!("webrtc:{}", self.config.label);
        Ok(channel.into_link(self.guard.clone(), name, max))
    }

    fn pc(&self) -> &Arc<dyn PeerConnection> {
        self.guard.pc()
    }

    /// Sets `desc` as the local description, waits for candidate gathering to finish and
    /// returns the complete description as JSON.
    async fn publish_local(&self, desc: RTCSessionDescription) -> Result<String> {
        self.pc()
            .set_local_description(desc)
            .await
            .map_err(|e| self.webrtc("apply the local description", e))?;
        let mut gathered = self.gathered.clone();
        match tokio::time::timeout(self.config.connect_timeout, gathered.wait_for(|done| *done))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(self.closed()),
            Err(_) => return Err(self.timeout("ICE candidate gathering")),
        }
        let mut desc = self
            .pc()
            .local_description()
            .await
            .ok_or_else(|| self.usage("no local description after gathering"))?;
        if self.config.loopback_only {
            desc.sdp = sdp::keep_loopback_candidates(&desc.sdp).0;
        }
        serde_json::to_string(&desc).map_err(|e| Error::Signaling {
            peer: self.config.label.clone(),
            what: "encoding the local description",
            detail: e.to_string(),
        })
    }

    /// Parses and checks a remote description, keeping only loopback candidates.
    fn remote_description(
        &mut self,
        json: &str,
        kind: RTCSdpType,
    ) -> Result<RTCSessionDescription> {
        let signaling = |what, detail: String| Error::Signaling {
            peer: self.config.label.clone(),
            what,
            detail,
        };
        let desc: RTCSessionDescription = serde_json::from_str(json)
            .map_err(|e| signaling("not {type, sdp} JSON", e.to_string()))?;
        if desc.sdp_type != kind {
            return Err(signaling(
                "wrong description type",
                format!("expected {kind}, got {}", desc.sdp_type),
            ));
        }
        let sdp = if self.config.loopback_only {
            let (sdp, count) = sdp::keep_loopback_candidates(&desc.sdp);
            if count.kept == 0 {
                return Err(signaling(
                    "no usable ICE candidate",
                    format!(
                        "the peer offered {} candidate(s), none on loopback; this build only \
                         links peers on 127.0.0.1 and needs fully gathered (non-trickle) SDP",
                        count.dropped
                    ),
                ));
            }
            sdp
        } else {
            desc.sdp
        };
        self.remote_max_message_size = sdp::max_message_size(&sdp);
        // Rebuilt rather than edited in place so the crate re-parses the filtered SDP.
        let rebuilt = match kind {
            RTCSdpType::Answer => RTCSessionDescription::answer(sdp),
            _ => RTCSessionDescription::offer(sdp),
        };
        rebuilt.map_err(|e| signaling("SDP does not parse", e.to_string()))
    }

    fn usage(&self, what: &'static str) -> Error {
        Error::Usage {
            peer: self.config.label.clone(),
            what,
        }
    }

    fn webrtc(&self, what: &'static str, source: webrtc::error::Error) -> Error {
        Error::WebRtc {
            peer: self.config.label.clone(),
            what,
            source,
        }
    }

    fn timeout(&self, what: &'static str) -> Error {
        Error::Timeout {
            peer: self.config.label.clone(),
            what,
            after: self.config.connect_timeout,
        }
    }

    fn closed(&self) -> Error {
        Error::Closed {
            link: format!("webrtc:{}", self.config.label),
        }
    }
}

/// Links two peers inside this process over loopback WebRTC, exchanging the descriptions in
/// memory. Returns `(a, b)` where `a.0` sends to `b.1` and `b.0` sends to `a.1`.
pub async fn connect_pair_in_process() -> Result<((Link, Inbox), (Link, Inbox))> {
    connect_pair_in_process_with(WebRtcConfig::labelled("a"), WebRtcConfig::labelled("b")).await
}

/// [`connect_pair_in_process`] with explicit configurations (`a` offers, `b` answers).
pub async fn connect_pair_in_process_with(
    a: WebRtcConfig,
    b: WebRtcConfig,
) -> Result<((Link, Inbox), (Link, Inbox))> {
    let mut offerer = WebRtcPeer::new(a).await?;
    let mut answerer = WebRtcPeer::new(b).await?;
    let offer = offerer.create_offer().await?;
    let answer = answerer.accept_offer(&offer).await?;
    offerer.accept_answer(&answer).await?;
    // The two waits overlap: each side's open is independent of the other being awaited.
    let (a, b) = tokio::join!(offerer.open_channel(), answerer.accept_channel());
    Ok((a?, b?))
}
