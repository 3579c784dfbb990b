//! Browser links: the page's own `RTCPeerConnection` and `RTCDataChannel` behind the same
//! [`LinkTx`] / [`LinkRx`] as the native WebRTC transport, speaking the same wire format, so a
//! tab links to a tab or to a native node alike.
//!
//! Wire format (as in [`crate`]'s native `webrtc` module): one data channel labelled `mdi`,
//! ordered and reliable; application messages are binary; a text message is a credit, the
//! decimal count of binary bytes the receiving application has consumed, sent each time
//! another quarter of [`RECEIVE_WINDOW`] has been consumed; a sender keeps at most
//! [`RECEIVE_WINDOW`] bytes beyond the last credit. Below the credits, `send` also waits while
//! the channel's `bufferedAmount` is above [`HIGH_WATERMARK`] (woken by
//! `bufferedamountlow`), so a fast sender never grows the browser's queue without bound.
//!
//! Descriptions are exchanged whole (every candidate gathered first) as `{type, sdp}` JSON.
//! Everything runs on the page's one thread: state sits in `Rc<RefCell<..>>`, the browser's
//! callbacks wake the futures waiting on it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    MessageEvent, RtcConfiguration, RtcDataChannel, RtcDataChannelEvent, RtcDataChannelInit,
    RtcDataChannelState, RtcDataChannelType, RtcIceGatheringState, RtcPeerConnection,
    RtcPeerConnectionState, RtcSdpType, RtcSessionDescriptionInit,
};

use crate::{credit, BoxFuture, Error, Inbox, Link, LinkRx, LinkTx, Result, RECEIVE_WINDOW};

/// The data channel's label, as the native transport names it.
const CHANNEL_LABEL: &str = "mdi";
/// `send` waits while more than this is queued in the browser.
pub const HIGH_WATERMARK: u32 = 256 * 1024;
/// `bufferedamountlow` fires below this.
const LOW_WATERMARK: u32 = 64 * 1024;
/// The largest message: what every browser and the native transport accept.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// How long gathering, connecting and opening may each take.
const SETUP_TIMEOUT_MS: i32 = 15_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Open,
    Closed,
}

/// What the browser's callbacks and the link's futures share.
struct Shared {
    state: State,
    gathered: bool,
    /// The answerer's data channel, once the offerer's arrives.
    incoming: Option<RtcDataChannel>,
    queue: VecDeque<Vec<u8>>,
    received: u64,
    consumed: u64,
    last_grant: u64,
    granted: u64,
    sent: u64,
    /// The wait whose timer fired last; each wait has its own generation.
    timed_out: u64,
    waits: u64,
    wakers: Vec<Waker>,
}

impl Shared {
    fn wake(&mut self) {
        for w in self.wakers.drain(..) {
            w.wake();
        }
    }
}

type SharedRef = Rc<RefCell<Shared>>;

/// Callbacks kept alive for as long as the link; dropped (and unset) with it.
#[derive(Default)]
struct Handlers {
    pc: Vec<Closure<dyn FnMut(JsValue)>>,
    dc: Vec<Closure<dyn FnMut(JsValue)>>,
}

/// Owns the connection for every handle that needs it, and closes it with the last one.
struct Guard {
    pc: RtcPeerConnection,
    dc: RefCell<Option<RtcDataChannel>>,
    handlers: RefCell<Handlers>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(dc) = self.dc.borrow().as_ref() {
            dc.set_onopen(None);
            dc.set_onclose(None);
            dc.set_onmessage(None);
            dc.set_onbufferedamountlow(None);
            dc.close();
        }
        self.pc.set_onicegatheringstatechange(None);
        self.pc.set_onconnectionstatechange(None);
        self.pc.set_ondatachannel(None);
        self.pc.close();
    }
}

fn js_err(peer: &str, what: &'static str, e: JsValue) -> Error {
    Error::Browser {
        peer: peer.to_string(),
        what,
        detail: e
            .as_string()
            .or_else(|| {
                e.dyn_ref::<js_sys::Error>()
                    .map(|e| String::from(e.message()))
            })
            .unwrap_or_else(|| format!("{e:?}")),
    }
}

/// Resolves after `ms` milliseconds (a `setTimeout`).
async fn sleep_ms(ms: i32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        let set_timeout = js_sys::Reflect::get(&global, &JsValue::from_str("setTimeout"))
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok());
        if let Some(f) = set_timeout {
            let _ = f.call2(&global, &resolve, &JsValue::from(ms));
        }
    });
    let _ = JsFuture::from(promise).await;
}

/// Waits until `ready` holds for the shared state, or fails after the setup timeout.
async fn wait_for(shared: &SharedRef, mut ready: impl FnMut(&Shared) -> bool) -> bool {
    let wait = {
        let mut s = shared.borrow_mut();
        s.waits += 1;
        s.waits
    };
    let timer = shared.clone();
    wasm_bindgen_futures::spawn_local(async move {
        sleep_ms(SETUP_TIMEOUT_MS).await;
        let mut s = timer.borrow_mut();
        s.timed_out = wait;
        s.wake();
    });
    poll_fn(|cx| {
        let mut s = shared.borrow_mut();
        if ready(&s) {
            Poll::Ready(true)
        } else if s.timed_out == wait || s.state == State::Closed {
            Poll::Ready(false)
        } else {
            s.wakers.push(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

fn new_shared() -> SharedRef {
    Rc::new(RefCell::new(Shared {
        state: State::Connecting,
        gathered: false,
        incoming: None,
        queue: VecDeque::new(),
        received: 0,
        consumed: 0,
        last_grant: 0,
        granted: 0,
        sent: 0,
        timed_out: 0,
        waits: 0,
        wakers: Vec::new(),
    }))
}

/// A peer connection with its callbacks wired to `shared`.
fn new_peer(shared: &SharedRef, label: &str) -> Result<Rc<Guard>> {
    let config = RtcConfiguration::new();
    config.set_ice_servers(&js_sys::Array::new());
    let pc = RtcPeerConnection::new_with_configuration(&config)
        .map_err(|e| js_err(label, "create an RTCPeerConnection", e))?;
    let guard = Rc::new(Guard {
        pc,
        dc: RefCell::new(None),
        handlers: RefCell::new(Handlers::default()),
    });
    let weak_pc = guard.pc.clone();
    let s = shared.clone();
    let on_gathering = Closure::<dyn FnMut(JsValue)>::new(move |_| {
        if weak_pc.ice_gathering_state() == RtcIceGatheringState::Complete {
            let mut s = s.borrow_mut();
            s.gathered = true;
            s.wake();
        }
    });
    guard
        .pc
        .set_onicegatheringstatechange(Some(on_gathering.as_ref().unchecked_ref()));
    let weak_pc = guard.pc.clone();
    let s = shared.clone();
    let on_state = Closure::<dyn FnMut(JsValue)>::new(move |_| {
        if matches!(
            weak_pc.connection_state(),
            RtcPeerConnectionState::Failed | RtcPeerConnectionState::Closed
        ) {
            let mut s = s.borrow_mut();
            s.state = State::Closed;
            s.wake();
        }
    });
    guard
        .pc
        .set_onconnectionstatechange(Some(on_state.as_ref().unchecked_ref()));
    let s = shared.clone();
    let on_channel = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        if let Ok(ev) = e.dyn_into::<RtcDataChannelEvent>() {
            let mut s = s.borrow_mut();
            // Only the first channel is used, as natively.
            if s.incoming.is_none() {
                s.incoming = Some(ev.channel());
                s.wake();
            }
        }
    });
    guard
        .pc
        .set_ondatachannel(Some(on_channel.as_ref().unchecked_ref()));
    guard
        .handlers
        .borrow_mut()
        .pc
        .extend([on_gathering, on_state, on_channel]);
    Ok(guard)
}

/// Wires a data channel's events to `shared` (messages, credits, open, close, low buffer).
fn watch_channel(guard: &Guard, shared: &SharedRef, dc: &RtcDataChannel) {
    dc.set_binary_type(RtcDataChannelType::Arraybuffer);
    dc.set_buffered_amount_low_threshold(LOW_WATERMARK);
    let s = shared.clone();
    let on_open = Closure::<dyn FnMut(JsValue)>::new(move |_| {
        let mut s = s.borrow_mut();
        if s.state == State::Connecting {
            s.state = State::Open;
        }
        s.wake();
    });
    let s = shared.clone();
    let on_close = Closure::<dyn FnMut(JsValue)>::new(move |_| {
        let mut s = s.borrow_mut();
        s.state = State::Closed;
        s.wake();
    });
    let s = shared.clone();
    let closer = dc.clone();
    let on_message = Closure::<dyn FnMut(JsValue)>::new(move |e: JsValue| {
        let Ok(ev) = e.dyn_into::<MessageEvent>() else {
            return;
        };
        let data = ev.data();
        let mut s = s.borrow_mut();
        if let Some(text) = data.as_string() {
            // A credit; any other text is not ours to interpret and is ignored.
            if let Some(c) = credit::parse(text.as_bytes()) {
                let mut g = credit::Granted(s.granted);
                g.grant(c);
                s.granted = g.0;
                s.wake();
            }
            return;
        }
        let bytes = js_sys::Uint8Array::new(&data).to_vec();
        s.received = s.received.saturating_add(bytes.len() as u64);
        if credit::overrun(s.received, s.consumed, RECEIVE_WINDOW as u64) {
            // The peer ignores credit: a broken link rather than unbounded memory.
            s.state = State::Closed;
            closer.close();
        } else {
            s.queue.push_back(bytes);
        }
        s.wake();
    });
    let s = shared.clone();
    let on_low = Closure::<dyn FnMut(JsValue)>::new(move |_| {
        s.borrow_mut().wake();
    });
    dc.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    dc.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    dc.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    dc.set_onbufferedamountlow(Some(on_low.as_ref().unchecked_ref()));
    guard
        .handlers
        .borrow_mut()
        .dc
        .extend([on_open, on_close, on_message, on_low]);
    if dc.ready_state() == RtcDataChannelState::Open {
        shared.borrow_mut().state = State::Open;
    }
    *guard.dc.borrow_mut() = Some(dc.clone());
}

/// Sets the local description and returns it, with every candidate, as `{type, sdp}` JSON.
async fn publish_local(
    guard: &Guard,
    shared: &SharedRef,
    label: &str,
    kind: RtcSdpType,
    desc: JsValue,
) -> Result<String> {
    let sdp = js_sys::Reflect::get(&desc, &JsValue::from_str("sdp"))
        .ok()
        .and_then(|v| v.as_string())
        .ok_or_else(|| Error::Browser {
            peer: label.to_string(),
            what: "read the local description",
            detail: "no sdp".into(),
        })?;
    let init = RtcSessionDescriptionInit::new(kind);
    init.set_sdp(&sdp);
    JsFuture::from(guard.pc.set_local_description(&init))
        .await
        .map_err(|e| js_err(label, "apply the local description", e))?;
    if guard.pc.ice_gathering_state() == RtcIceGatheringState::Complete {
        shared.borrow_mut().gathered = true;
    }
    if !wait_for(shared, |s| s.gathered).await {
        return Err(Error::Browser {
            peer: label.to_string(),
            what: "gather ICE candidates",
            detail: format!("not done within {} s", SETUP_TIMEOUT_MS / 1000),
        });
    }
    let local = guard.pc.local_description().ok_or_else(|| Error::Browser {
        peer: label.to_string(),
        what: "read the local description",
        detail: "none after gathering".into(),
    })?;
    let kind = if kind == RtcSdpType::Offer {
        "offer"
    } else {
        "answer"
    };
    Ok(serde_json::json!({"type": kind, "sdp": local.sdp()}).to_string())
}

fn parse_description(label: &str, json: &str, want: &str) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| Error::Signaling {
        peer: label.to_string(),
        what: "not {type, sdp} JSON",
        detail: e.to_string(),
    })?;
    if v["type"] != want {
        return Err(Error::Signaling {
            peer: label.to_string(),
            what: "wrong description type",
            detail: format!("expected {want}, got {}", v["type"]),
        });
    }
    v["sdp"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Signaling {
            peer: label.to_string(),
            what: "no sdp in the description",
            detail: json.chars().take(120).collect(),
        })
}

/// An offer made; [`finish`](Self::finish) with the answer.
pub struct BrowserOffering {
    label: String,
    guard: Rc<Guard>,
    shared: SharedRef,
}

/// Starts a link as the offerer: creates the data channel and returns the offer.
pub async fn offer(label: &str) -> Result<(String, BrowserOffering)> {
    let shared = new_shared();
    let guard = new_peer(&shared, label)?;
    let init = RtcDataChannelInit::new();
    init.set_ordered(true);
    let dc = guard
        .pc
        .create_data_channel_with_data_channel_dict(CHANNEL_LABEL, &init);
    watch_channel(&guard, &shared, &dc);
    let desc = JsFuture::from(guard.pc.create_offer())
        .await
        .map_err(|e| js_err(label, "create an offer", e))?;
    let json = publish_local(&guard, &shared, label, RtcSdpType::Offer, desc).await?;
    Ok((
        json,
        BrowserOffering {
            label: label.to_string(),
            guard,
            shared,
        },
    ))
}

impl BrowserOffering {
    /// Applies the answer and waits for the channel to open.
    pub async fn finish(self, answer: &str) -> Result<(Link, Inbox)> {
        let sdp = parse_description(&self.label, answer, "answer")?;
        let init = RtcSessionDescriptionInit::new(RtcSdpType::Answer);
        init.set_sdp(&sdp);
        JsFuture::from(self.guard.pc.set_remote_description(&init))
            .await
            .map_err(|e| js_err(&self.label, "apply the remote answer", e))?;
        open(self.label, self.guard, self.shared).await
    }
}

/// An answer sent; [`finish`](Self::finish) waits for the offerer's channel.
pub struct BrowserAnswering {
    label: String,
    guard: Rc<Guard>,
    shared: SharedRef,
}

/// Answers an offer (`{type, sdp}` JSON).
pub async fn answer(label: &str, offer: &str) -> Result<(String, BrowserAnswering)> {
    let sdp = parse_description(label, offer, "offer")?;
    let shared = new_shared();
    let guard = new_peer(&shared, label)?;
    let init = RtcSessionDescriptionInit::new(RtcSdpType::Offer);
    init.set_sdp(&sdp);
    JsFuture::from(guard.pc.set_remote_description(&init))
        .await
        .map_err(|e| js_err(label, "apply the remote offer", e))?;
    let desc = JsFuture::from(guard.pc.create_answer())
        .await
        .map_err(|e| js_err(label, "create an answer", e))?;
    let json = publish_local(&guard, &shared, label, RtcSdpType::Answer, desc).await?;
    Ok((
        json,
        BrowserAnswering {
            label: label.to_string(),
            guard,
            shared,
        },
    ))
}

impl BrowserAnswering {
    pub async fn finish(self) -> Result<(Link, Inbox)> {
        if !wait_for(&self.shared, |s| s.incoming.is_some()).await {
            return Err(Error::Timeout {
                peer: self.label,
                what: "the offerer's data channel",
                after: std::time::Duration::from_millis(SETUP_TIMEOUT_MS as u64),
            });
        }
        let dc = self.shared.borrow_mut().incoming.take();
        if let Some(dc) = dc {
            watch_channel(&self.guard, &self.shared, &dc);
        }
        open(self.label, self.guard, self.shared).await
    }
}

async fn open(label: String, guard: Rc<Guard>, shared: SharedRef) -> Result<(Link, Inbox)> {
    if !wait_for(&shared, |s| s.state == State::Open).await {
        return Err(Error::Timeout {
            peer: label,
            what: "the data channel to open",
            after: std::time::Duration::from_millis(SETUP_TIMEOUT_MS as u64),
        });
    }
    let name = format!("browser:{label}");
    let tx = Tx {
        guard: guard.clone(),
        shared: shared.clone(),
        name,
    };
    let rx = Rx { guard, shared };
    Ok((Link::new(tx), Inbox::new(rx)))
}

struct Tx {
    guard: Rc<Guard>,
    shared: SharedRef,
    name: String,
}

impl Tx {
    fn dc(&self) -> Option<RtcDataChannel> {
        self.guard.dc.borrow().clone()
    }
}

impl LinkTx for Tx {
    fn send(&self, msg: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let closed = || Error::Closed {
                link: self.name.clone(),
            };
            let dc = self.dc().ok_or_else(closed)?;
            let len = msg.len() as u64;
            // Credit from the peer's application, then room in the browser's own queue.
            let ok = poll_fn(|cx| {
                let mut s = self.shared.borrow_mut();
                if s.state == State::Closed {
                    return Poll::Ready(false);
                }
                if credit::Granted(s.granted)
                    .allows(RECEIVE_WINDOW as u64, s.sent.saturating_add(len))
                    && dc.buffered_amount() <= HIGH_WATERMARK
                {
                    return Poll::Ready(true);
                }
                s.wakers.push(cx.waker().clone());
                Poll::Pending
            })
            .await;
            if !ok {
                return Err(closed());
            }
            dc.send_with_u8_array(&msg).map_err(|_| closed())?;
            let mut s = self.shared.borrow_mut();
            s.sent = s.sent.saturating_add(len);
            Ok(())
        })
    }

    fn max_message_size(&self) -> usize {
        MAX_MESSAGE
    }

    fn buffered_amount(&self) -> BoxFuture<'_, usize> {
        let n = self.dc().map_or(0, |dc| dc.buffered_amount() as usize);
        Box::pin(async move { n })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Let queued bytes leave first, briefly.
            for _ in 0..50 {
                match self.dc() {
                    Some(dc) if dc.buffered_amount() > 0 => sleep_ms(20).await,
                    _ => break,
                }
            }
            if let Some(dc) = self.dc() {
                dc.close();
            }
            let mut s = self.shared.borrow_mut();
            s.state = State::Closed;
            s.wake();
        })
    }

    fn name(&self) -> &str {
        &self.name
    }
}

struct Rx {
    guard: Rc<Guard>,
    shared: SharedRef,
}

impl LinkRx for Rx {
    fn recv(&mut self) -> BoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let msg = poll_fn(|cx| {
                let mut s = self.shared.borrow_mut();
                if let Some(m) = s.queue.pop_front() {
                    return Poll::Ready(Some(m));
                }
                if s.state == State::Closed {
                    return Poll::Ready(None);
                }
                s.wakers.push(cx.waker().clone());
                Poll::Pending
            })
            .await?;
            let mut s = self.shared.borrow_mut();
            s.consumed = s.consumed.saturating_add(msg.len() as u64);
            // A credit each quarter window, as the native side grants.
            if s.consumed.saturating_sub(s.last_grant) >= (RECEIVE_WINDOW / 4) as u64 {
                if let Some(dc) = self.guard.dc.borrow().as_ref() {
                    if dc.send_with_str(&s.consumed.to_string()).is_ok() {
                        s.last_grant = s.consumed;
                    }
                }
            }
            Some(msg)
        })
    }
}
