//! Admission of new streams: a token bucket, so thousands of proxies
//! reconnecting at once are taken in at a steady rate instead of all
//! building their first responses together. A stream waits for its token
//! before it is classified and holds nothing meanwhile, so its proxy needs
//! no retry; but only so long: past `max_wait` the edge is overloaded, and
//! the stream is refused and its connection closed, so its proxy
//! reconnects with backoff, perhaps to another edge.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

/// How fast new streams are admitted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionRate {
    /// Streams admitted per second, once the burst is spent.
    pub per_second: f64,
    /// Streams admitted at once after a quiet spell.
    pub burst: f64,
    /// Longest a new stream waits for its turn; a stream that would wait
    /// longer is refused.
    pub max_wait: Duration,
}

impl Default for AdmissionRate {
    fn default() -> Self {
        AdmissionRate {
            per_second: 10_000.0,
            burst: 10_000.0,
            max_wait: Duration::from_secs(5),
        }
    }
}

/// A stream would wait longer than the longest wait.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Overloaded;

/// The bucket. Tokens are reserved, so the count goes below zero while
/// streams wait: how far below says how long the next one would wait.
#[derive(Debug)]
pub(crate) struct Admission {
    rate: AdmissionRate,
    /// Tokens left, and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

impl Admission {
    pub(crate) fn new(rate: AdmissionRate) -> Admission {
        let rate = AdmissionRate {
            per_second: rate.per_second.max(f64::MIN_POSITIVE),
            burst: rate.burst.max(1.0),
            max_wait: rate.max_wait,
        };
        Admission {
            rate,
            bucket: Mutex::new((rate.burst, Instant::now())),
        }
    }

    /// Waits for a token; returns how long it waited, or refuses at once
    /// when the wait would be longer than the longest.
    pub(crate) async fn admit(&self) -> Result<Duration, Overloaded> {
        let wait = self.reserve()?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(wait)
    }

    fn reserve(&self) -> Result<Duration, Overloaded> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refilled = bucket.0 + now.duration_since(bucket.1).as_secs_f64() * self.rate.per_second;
        let tokens = refilled.min(self.rate.burst);
        bucket.1 = now;
        let wait = Duration::try_from_secs_f64((1.0 - tokens).max(0.0) / self.rate.per_second)
            .unwrap_or(Duration::MAX);
        if wait > self.rate.max_wait {
            bucket.0 = tokens;
            return Err(Overloaded);
        }
        bucket.0 = tokens - 1.0;
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_admitted_at_once_and_the_rest_at_the_rate() {
        let admission = Admission::new(AdmissionRate {
            per_second: 10.0,
            burst: 5.0,
            max_wait: Duration::from_secs(60),
        });
        let started = Instant::now();
        for _ in 0..5 {
            assert_eq!(admission.admit().await, Ok(Duration::ZERO));
        }
        assert!(started.elapsed() < Duration::from_millis(1));
        for _ in 0..10 {
            assert!(admission.admit().await.is_ok());
        }
        // Ten more at ten a second.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took < Duration::from_millis(1_100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn streams_that_would_wait_past_the_longest_wait_are_refused_at_once() {
        let admission = std::sync::Arc::new(Admission::new(AdmissionRate {
            per_second: 10.0,
            burst: 1.0,
            max_wait: Duration::from_millis(250),
        }));
        // One from the burst, then waits of 100, 200 ms are reserved...
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let admission = admission.clone();
            waiting.push(tokio::spawn(async move { admission.admit().await }));
            tokio::task::yield_now().await;
        }
        // ...and a fourth would wait 300 ms: refused without waiting.
        let started = Instant::now();
        assert_eq!(admission.admit().await, Err(Overloaded));
        assert!(started.elapsed().is_zero());
        let mut waits = Vec::new();
        for task in waiting {
            waits.push(task.await.unwrap_or(Err(Overloaded)));
        }
        assert_eq!(
            waits,
            [
                Ok(Duration::ZERO),
                Ok(Duration::from_millis(100)),
                Ok(Duration::from_millis(200))
            ]
        );
        // The refusal took nothing: after the queue drains, room again.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(admission.admit().await.is_ok());
    }
}
