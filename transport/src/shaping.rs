//! A link that arrives late: every message is held for a fixed delay after it is received,
//! in order, without limiting how many are in flight — what a network path with that one-way
//! latency does. Benchmarks use it to emulate the links between edge devices where the kernel
//! has no `netem` to delay packets (rate limits still come from `tc`'s token bucket).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::{BoxFuture, Inbox, LinkRx};

struct Delayed {
    inner: Inbox,
    delay: Duration,
    held: VecDeque<(Instant, Vec<u8>)>,
    closed: bool,
}

impl LinkRx for Delayed {
    fn recv(&mut self) -> BoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            loop {
                if let Some((due, _)) = self.held.front() {
                    if *due <= Instant::now() {
                        return self.held.pop_front().map(|(_, m)| m);
                    }
                }
                if self.closed {
                    let (due, msg) = self.held.pop_front()?;
                    tokio::time::sleep_until(due).await;
                    return Some(msg);
                }
                let wait = self.held.front().map(|(due, _)| *due);
                tokio::select! {
                    m = self.inner.recv() => match m {
                        Some(m) => self.held.push_back((Instant::now() + self.delay, m)),
                        None => self.closed = true,
                    },
                    _ = async {
                        match wait {
                            Some(due) => tokio::time::sleep_until(due).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }
        })
    }
}

/// `inbox` with every message delivered `delay` after it arrived (order kept).
pub fn delayed(inbox: Inbox, delay: Duration) -> Inbox {
    if delay.is_zero() {
        return inbox;
    }
    Inbox::new(Delayed {
        inner: inbox,
        delay,
        held: VecDeque::new(),
        closed: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_arrive_late_in_order_and_pipelined() {
        let (link, inbox) = crate::in_process::link(&Default::default(), "t");
        let mut late = delayed(inbox, Duration::from_millis(50));
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
