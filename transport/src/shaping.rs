//! A link that arrives late: every message is held for a fixed delay after it is received,
//! in order, without limiting how many are in flight — what a network path with that one-way
//! latency does. Benchmarks use it to emulate the links between edge devices where the kernel
//! has no `netem` to delay packets (rate limits still come from `tc`'s token bucket).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as async_mpsc;

use crate::{BoxFuture, Inbox, LinkRx};

/// Messages go to a thread of their own that holds each until it is due: a thread sleeps to
/// within tens of microseconds, where the async runtime's timer has millisecond ticks and
/// would make every hop up to a millisecond later than the delay it emulates.
struct Delayed {
    inner: Inbox,
    /// Each message with the moment it arrived; `None` once `inner` has ended.
    to_line: Option<mpsc::Sender<(Instant, Vec<u8>)>>,
    from_line: async_mpsc::UnboundedReceiver<Vec<u8>>,
}

impl LinkRx for Delayed {
    fn recv(&mut self) -> BoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            loop {
                let open = self.to_line.is_some();
                tokio::select! {
                    biased;
                    m = self.from_line.recv() => return m,
                    m = self.inner.recv(), if open => match (m, &self.to_line) {
                        (Some(m), Some(line)) => {
                            if line.send((Instant::now(), m)).is_err() {
                                return None;
                            }
                        }
                        // The line delivers what it holds, then ends.
                        _ => self.to_line = None,
                    },
                }
            }
        })
    }
}

/// `inbox` with every message delivered `delay` after it arrived (order kept). Fails only
/// when no thread can be started for the line: a link that silently arrived on time would
/// make a benchmark report a network it did not emulate.
pub fn delayed(inbox: Inbox, delay: Duration) -> std::io::Result<Inbox> {
    if delay.is_zero() {
        return Ok(inbox);
    }
    let (to_line, line) = mpsc::channel::<(Instant, Vec<u8>)>();
    let (out, from_line) = async_mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("delay-line".into())
        .spawn(move || {
            // A message due now waits for nothing but this thread's wake-up.
            crate::wakeups::wake_promptly();
            for (arrived, m) in line {
                let (due, now) = (arrived + delay, Instant::now());
                if due > now {
                    std::thread::sleep(due - now);
                }
                if out.send(m).is_err() {
                    return;
                }
            }
        })?;
    Ok(Inbox::new(Delayed {
        inner: inbox,
        to_line: Some(to_line),
        from_line,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_arrive_late_in_order_and_pipelined() {
        let (link, inbox) = crate::in_process::link(&Default::default(), "t");
        let mut late = delayed(inbox, Duration::from_millis(50)).unwrap();
        let start = Instant::now();
        for i in 0..20u8 {
            link.send(vec![i]).await.unwrap();
        }
        link.close().await;
        for i in 0..20u8 {
            assert_eq!(late.recv().await, Some(vec![i]));
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        // Pipelined: twenty messages take one delay, not twenty.
        assert!(took < Duration::from_millis(500), "{took:?}");
        assert_eq!(late.recv().await, None);
    }
}
