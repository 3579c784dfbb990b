//! A remote description whose ICE candidates are all off loopback (a LAN address, an mDNS
//! name) is refused with a signaling error that says why, instead of letting test or ring
//! traffic leave 127.0.0.1; a malformed or wrong-type description is refused the same way; and
//! the descriptions we hand out carry only 127.0.0.1 host candidates.

use mdi_transport::webrtc::{WebRtcConfig, WebRtcPeer};
use mdi_transport::Error;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_offers_are_refused() {
    let mut offerer = WebRtcPeer::new(WebRtcConfig::labelled("offerer"))
        .await
        .expect("peer");
    let offer = offerer.create_offer().await.expect("offer");
    // What we hand out is loopback-only too: host candidates on 127.0.0.1, no mDNS names, no
    // server-reflexive addresses (no STUN server is ever contacted).
    let json: serde_json::Value = serde_json::from_str(&offer).expect("offer is JSON");
    assert_eq!(json["type"], "offer");
    let sdp = json["sdp"].as_str().expect("offer has an sdp string");
    let candidates: Vec<&str> = sdp
        .lines()
        .filter(|line| line.starts_with("a=candidate:"))
        .collect();
    assert!(!candidates.is_empty(), "offer carries candidates: {sdp}");
    for line in &candidates {
        assert!(
            line.contains(" 127.0.0.1 ") && line.contains(" typ host"),
            "non-loopback candidate handed out: {line}"
        );
    }

    for moved in ["192.168.1.7", "abcd-1234.local"] {
        let mut answerer = WebRtcPeer::new(WebRtcConfig::labelled("answerer"))
            .await
            .expect("peer");
        match answerer
            .accept_offer(&offer.replace("127.0.0.1", moved))
            .await
        {
            Err(e @ Error::Signaling { .. }) => {
                let text = e.to_string();
                assert!(text.contains("loopback"), "error explains itself: {text}");
            }
            other => panic!("offer on {moved} gave {other:?}"),
        }
    }

    let mut answerer = WebRtcPeer::new(WebRtcConfig::labelled("answerer"))
        .await
        .expect("peer");
    assert!(matches!(
        answerer.accept_offer("not json").await,
        Err(Error::Signaling { .. })
    ));
    // An answer where an offer belongs.
    let as_answer = offer.replace("\"offer\"", "\"answer\"");
    assert!(matches!(
        answerer.accept_offer(&as_answer).await,
        Err(Error::Signaling { .. })
    ));
}
