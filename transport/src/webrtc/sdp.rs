//! Plain-text checks on SDP: keep only loopback ICE candidates, and read the peer's
//! `max-message-size`.
//!
//! This build links nodes on one machine only. Filtering candidates out of every description
//! we send or accept (rather than trusting what was gathered) means a remote peer — say a
//! browser that also offers its LAN address — can never steer traffic off loopback.

use std::net::IpAddr;

/// What [`keep_loopback_candidates`] did to a description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CandidateCount {
    pub kept: usize,
    pub dropped: usize,
}

/// Returns `sdp` without the `a=candidate` lines whose address is not a loopback IP
/// (including mDNS `.local` names, which are never loopback).
pub(crate) fn keep_loopback_candidates(sdp: &str) -> (String, CandidateCount) {
    let mut out = String::with_capacity(sdp.len());
    let mut count = CandidateCount {
        kept: 0,
        dropped: 0,
    };
    // split_inclusive keeps each line's own terminator, so "\r\n" SDP round-trips unchanged.
    for line in sdp.split_inclusive('\n') {
        match candidate_address(line) {
            Some(addr) if addr.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) => {
                count.kept += 1;
                out.push_str(line);
            }
            Some(_) => count.dropped += 1,
            None => out.push_str(line),
        }
    }
    (out, count)
}

/// The connection address of an `a=candidate:` line:
/// `a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...`.
fn candidate_address(line: &str) -> Option<&str> {
    let rest = line.trim_end().strip_prefix("a=candidate:")?;
    // A malformed candidate line has no usable address; returning "" drops it.
    Some(rest.split_ascii_whitespace().nth(4).unwrap_or(""))
}

/// The peer's `a=max-message-size`, if it sent one. RFC 8841: absent means 64 KiB, and `0`
/// means "no limit" (returned as `usize::MAX`).
pub(crate) fn max_message_size(sdp: &str) -> Option<usize> {
    sdp.lines().find_map(|line| {
        let value = line.trim_end().strip_prefix("a=max-message-size:")?;
        match value.trim().parse::<u64>().ok()? {
            0 => Some(usize::MAX),
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDP: &str = "v=0\r\n\
        m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
        a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host\r\n\
        a=candidate:2 1 udp 2130706431 192.168.1.7 50001 typ host\r\n\
        a=candidate:3 1 udp 2130706431 abcd-1234.local 50002 typ host\r\n\
        a=candidate:4 1 udp 2130706431 ::1 50003 typ host\r\n\
        a=candidate:broken\r\n\
        a=max-message-size:262144\r\n";

    #[test]
    fn only_loopback_candidates_survive_and_other_lines_are_untouched() {
        let (out, count) = keep_loopback_candidates(SDP);
        assert_eq!(
            count,
            CandidateCount {
                kept: 2,
                dropped: 3
            }
        );
        assert!(out.contains("127.0.0.1 50000"));
        assert!(out.contains("::1 50003"));
        assert!(!out.contains("192.168.1.7"));
        assert!(!out.contains(".local"));
        assert!(!out.contains("broken"));
        assert!(out.starts_with("v=0\r\nm=application"));
        assert!(out.ends_with("a=max-message-size:262144\r\n"));
    }

    #[test]
    fn max_message_size_follows_rfc_8841() {
        assert_eq!(max_message_size(SDP), Some(262_144));
        assert_eq!(
            max_message_size("a=max-message-size:0\r\n"),
            Some(usize::MAX)
        );
        assert_eq!(max_message_size("v=0\r\n"), None);
    }
}
