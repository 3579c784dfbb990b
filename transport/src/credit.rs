//! The arithmetic of the WebRTC links' credit protocol, shared by the native and the browser
//! transport so both read a peer's numbers the same way.
//!
//! A receiver grants credit as the decimal count of bytes its application has consumed so far;
//! a sender keeps at most `window` bytes beyond the last grant. Every number here comes from
//! the peer or counts the peer's bytes, so nothing may wrap: a grant near `u64::MAX` once
//! wrapped `granted + window` to a small number and every later send waited forever. Sums
//! saturate instead — a peer granting absurd credit only lets us send freely to it, which
//! costs it, not us (our own send buffer stays bounded below the credits).

/// A credit from the peer's text message, if the text is one (anything else is ignored, not
/// an error: the text channel is ours only by convention).
pub fn parse(text: &[u8]) -> Option<u64> {
    std::str::from_utf8(text).ok()?.parse::<u64>().ok()
}

/// The sender's view: cumulative bytes the peer has granted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Granted(pub u64);

impl Granted {
    /// Takes a grant. Grants are cumulative; `max` keeps a repeated or reordered one harmless.
    pub fn grant(&mut self, credit: u64) {
        self.0 = self.0.max(credit);
    }

    /// Whether a message ending at cumulative byte `end` may be sent within `window`.
    pub fn allows(self, window: u64, end: u64) -> bool {
        self.0.saturating_add(window) >= end
    }
}

/// Whether a peer that has sent `received` bytes while our application consumed `consumed`
/// is beyond the `window` it was granted (and so ignores credit: a broken link, not more
/// memory).
pub fn overrun(received: u64, consumed: u64, window: u64) -> bool {
    received.saturating_sub(consumed) > window
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_near_u64_max_cannot_wrap_the_window() {
        let window = 2 << 20;
        let mut g = Granted::default();
        assert!(g.allows(window, window) && !g.allows(window, window + 1));
        g.grant(u64::MAX - 3);
        // Before the fix `granted + window` wrapped to a small number: every send waited.
        assert!(g.allows(window, 1) && g.allows(window, u64::MAX));
        g.grant(5);
        assert_eq!(g, Granted(u64::MAX - 3), "grants never go back");
    }

    #[test]
    fn only_decimal_text_is_a_credit() {
        assert_eq!(parse(b"1024"), Some(1024));
        assert_eq!(parse(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b"18446744073709551616"[..],
            b"-1",
            b"",
            b"12 ",
            b"\xff\xfe",
            b"0x10",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert!(
            !overrun(10, 20, 0),
            "consumed past received never underflows"
        );
        assert!(overrun(u64::MAX, 0, 1 << 21));
    }
}
