//! `/api/join`: the URL a phone opens to join a room, and that URL as a QR code (SVG), for the
//! page to show. The base of the URL is `--public-url` when given; otherwise the address the
//! browser used — except that a page opened on loopback on a server listening on every
//! interface gets this machine's LAN address, since a phone cannot reach 127.0.0.1.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use qrcode::render::svg;
use qrcode::QrCode;

use crate::api::ApiError;
use crate::AppState;

/// Where the server is reachable, as the server knows it.
#[derive(Debug, Clone)]
pub struct Reach {
    /// `--public-url`, if given.
    pub public_url: Option<String>,
    /// The address the server listens on.
    pub bound: Option<SocketAddr>,
    /// `https` with `--tls`.
    pub scheme: &'static str,
}

/// This machine's address on its LAN (the one the OS would use to reach outside; nothing is
/// sent), if it has one.
fn lan_ip() -> Option<IpAddr> {
    let s = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).ok()?;
    // A documentation-range address: any routable one gives the outgoing interface.
    s.connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 9))
        .ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

fn base_url(reach: &Reach, headers: &HeaderMap) -> String {
    if let Some(u) = &reach.public_url {
        return u.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| reach.bound.map(|a| a.to_string()))
        .unwrap_or_else(|| "127.0.0.1".into());
    let host_is_loopback = host
        .rsplit_once(':')
        .map_or(host.as_str(), |(h, _)| h)
        .trim_matches(['[', ']'])
        .parse::<IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(host.starts_with("localhost"));
    if let (true, Some(bound)) = (host_is_loopback, reach.bound) {
        if bound.ip().is_unspecified() {
            if let Some(ip) = lan_ip() {
                return format!("{}://{}", reach.scheme, SocketAddr::new(ip, bound.port()));
            }
        }
    }
    format!("{}://{host}", reach.scheme)
}

fn encode_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET /api/join?room=NAME[&token=TOKEN]` → `{"url", "svg", "fingerprint"}` (the TLS
/// certificate's fingerprint, or null over plain HTTP).
pub async fn join(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let room = q.get("room").map_or(crate::DEFAULT_ROOM, String::as_str);
    if room.is_empty() || room.len() > 64 {
        return ApiError::bad_request("room must be 1-64 characters").into_response();
    }
    let mut url = format!(
        "{}/?room={}",
        base_url(&app.reach, &headers),
        encode_component(room)
    );
    if let Some(t) = q.get("token").filter(|t| !t.is_empty()) {
        if t.len() > 256 {
            return ApiError::bad_request("token is too long").into_response();
        }
        url.push_str(&format!("&token={}", encode_component(t)));
    }
    let svg = match QrCode::new(url.as_bytes()) {
        Ok(code) => code
            .render::<svg::Color>()
            .min_dimensions(200, 200)
            .quiet_zone(true)
            .build(),
        Err(e) => return ApiError::internal(format!("QR code: {e}")).into_response(),
    };
    Json(serde_json::json!({ "url": url, "svg": svg, "fingerprint": app.fingerprint }))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_urls_use_the_public_url_or_the_host_the_browser_used() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "192.168.1.5:8080".parse().unwrap());
        let reach = Reach {
            public_url: None,
            bound: None,
            scheme: "https",
        };
        assert_eq!(base_url(&reach, &h), "https://192.168.1.5:8080");
        let public = Reach {
            public_url: Some("https://ring.example/".into()),
            ..reach.clone()
        };
        assert_eq!(base_url(&public, &h), "https://ring.example");
        assert_eq!(encode_component("a b&c"), "a%20b%26c");
    }
}
