//! How the Node watches of the agent and the controller retry.
//!
//! kube-runtime's `default_backoff()` is client-go's reflector policy: 0.8 s
//! doubling to 30 s, jittered, reset by any event. Its jitter adds up to the
//! whole delay after the cap, so its waits at the cap run from 30 to 60 s:
//! after an outage, an agent saw a new Node up to a minute after the server
//! was back (the lab's e2e `test_firewall`, run right after the API server
//! restart, timed out so). Here no wait exceeds `MAX_WAIT`.
//!
//! After an API server outage the backoff sits at its cap, and the first
//! answer from the returning server is often a 410 (the watch's resource
//! version left the history while it was away). That error cost another
//! full backoff before the re-list it asks for, so a Node added right after
//! the outage waited most of a minute to be seen (the lab's e2e
//! `test_apiserver_down_60s...`). Here a 410 resets the backoff: the server
//! has answered, and the re-list follows at once. Every other error still
//! backs off, so a struggling server is not hammered, and a fleet of agents
//! reaches its re-lists spread by the same jitter that spread its
//! reconnects.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, DefaultBackoff};

/// The longest wait between two attempts to watch.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// The server's answer that the watch's resource version has expired.
pub fn is_expired(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(status) if status.code == 410)
}

/// Wraps a `watcher()` stream with the policy above. Errors are passed on
/// (to be logged and counted) before the wait, not after it.
pub fn with_backoff<T: Send>(
    stream: impl Stream<Item = Result<T, watcher::Error>> + Send,
) -> impl Stream<Item = Result<T, watcher::Error>> + Send {
    let start = (Box::pin(stream), DefaultBackoff::default(), None::<Duration>);
    futures::stream::unfold(start, |(mut stream, mut backoff, wait)| async move {
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
        let item = stream.next().await?;
        let wait = match &item {
            Err(e) if !is_expired(e) => backoff.next().map(|w| w.min(MAX_WAIT)),
            _ => {
                backoff.reset();
                None
            }
        };
        Some((item, (stream, backoff, wait)))
    })
}

#[cfg(test)]
mod tests {
    use kube::core::Status;
    use tokio::time::Instant;

    use super::*;

    fn failed(code: u16) -> Result<u32, watcher::Error> {
        Err(watcher::Error::WatchError(Status::failure("test", "test").with_code(code).boxed()))
    }

    /// Six failures (reaching the 30 s cap), then `last`, then an event:
    /// virtual seconds until `last` arrives, and from `last` to the event.
    async fn outage_then(last: u16) -> (f64, f64) {
        let mut items: Vec<_> = (0..6).map(|_| failed(503)).collect();
        items.extend([failed(last), Ok(1)]);
        let start = Instant::now();
        let arrivals: Vec<_> = with_backoff(futures::stream::iter(items)).map(|_| start.elapsed()).collect().await;
        (arrivals[6].as_secs_f64(), (arrivals[7] - arrivals[6]).as_secs_f64())
    }

    #[tokio::test(start_paused = true)]
    async fn errors_back_off_but_an_expired_version_is_relisted_at_once() {
        let (outage, after_expired) = outage_then(410).await;
        assert!(outage >= 10.0, "the outage's errors were not backed off: {outage} s");
        assert_eq!(after_expired, 0.0, "waited after a 410");
        let (_, after_other) = outage_then(500).await;
        assert!(after_other >= 10.0, "waited only {after_other} s after a 500 at the end of an outage");
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_in_a_long_outage_exceeds_the_cap() {
        let mut items: Vec<_> = (0..20).map(|_| failed(503)).collect();
        items.push(Ok(1));
        let start = Instant::now();
        let arrivals: Vec<_> = with_backoff(futures::stream::iter(items)).map(|_| start.elapsed()).collect().await;
        let waits: Vec<f64> = arrivals.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        assert!(waits.iter().all(|w| *w <= MAX_WAIT.as_secs_f64()), "{waits:?}");
        assert!(waits[10..].iter().all(|w| *w >= 15.0), "not backed off to near the cap: {waits:?}");
    }
}
