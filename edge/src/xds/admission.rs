//! Admission of new streams: a token bucket, so thousands of proxies
//! reconnecting at once are taken in at a steady rate instead of all
//! building their first responses together. A stream waits for its token
//! before it is classified and holds nothing meanwhile; it is not refused,
//! so its proxy needs no retry.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

/// How fast new streams are admitted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionRate {
    /// Streams admitted per second, once the burst is spent.
    pub per_second: f64,
    /// Streams admitted at once after a quiet spell.
    pub burst: f64,
}

impl Default for AdmissionRate {
    fn default() -> Self {
        AdmissionRate {
            per_second: 10_000.0,
            burst: 10_000.0,
        }
    }
}

/// The bucket.
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
        };
        Admission {
            rate,
            bucket: Mutex::new((rate.burst, Instant::now())),
        }
    }

    /// Waits for a token; returns how long it waited.
    pub(crate) async fn admit(&self) -> Duration {
        let started = Instant::now();
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let refilled =
                    bucket.0 + now.duration_since(bucket.1).as_secs_f64() * self.rate.per_second;
                bucket.0 = refilled.min(self.rate.burst);
                bucket.1 = now;
                if bucket.0 >= 1.0 {
                    bucket.0 -= 1.0;
                    return started.elapsed();
                }
                Duration::from_secs_f64((1.0 - bucket.0) / self.rate.per_second)
            };
            tokio::time::sleep(wait).await;
        }
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
        });
        let started = Instant::now();
        for _ in 0..5 {
            admission.admit().await;
        }
        assert!(started.elapsed() < Duration::from_millis(1));
        for _ in 0..10 {
            admission.admit().await;
        }
        // Ten more at ten a second.
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took < Duration::from_millis(1_100),
            "{took:?}"
        );
    }
}
