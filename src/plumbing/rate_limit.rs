//! Token-bucket rate limiting per key: the one rate limiter of the service (token requests per
//! homeserver and per user).
//!
//! Each key has a bucket holding up to `burst` tokens, refilled at `rate` tokens per second; a
//! request takes one token or is refused with the time until one is back. Time is an input
//! (`now`), so tests need no sleeping. Buckets live in a [`TtlCache`]: a bucket expires when it
//! would be full again (a full bucket is the same as none), and when the cache is full the
//! buckets closest to full go first, so the memory is bounded and forgetting costs little.

use std::hash::Hash;
use std::time::{Duration, Instant};

use super::TtlCache;

/// One key's bucket: tokens left at `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per key; disabled (everything passes) when its rate or burst is 0.
#[derive(Debug, Clone)]
pub struct RateLimiter<K> {
    /// Tokens per second.
    rate: f64,
    /// Bucket size.
    burst: f64,
    buckets: TtlCache<K, Bucket>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// A limiter allowing `rate_per_sec` requests per second per key on average and `burst` at
    /// once, keeping at most `capacity` buckets. A `rate_per_sec` or `burst` of 0 disables it.
    pub fn new(rate_per_sec: u32, burst: u32, capacity: usize) -> Self {
        Self {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst),
            buckets: TtlCache::new(capacity),
        }
    }

    /// Whether it limits anything.
    pub fn is_enabled(&self) -> bool {
        self.rate > 0.0 && self.burst > 0.0
    }

    /// Takes one token from `key`'s bucket at `now`; when it is empty, the request is refused
    /// with how long until a token is back (at least 1 ms).
    pub fn check(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.is_enabled() {
            return Ok(());
        }
        let tokens = match self.buckets.get(key, now) {
            Some(b) => {
                let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                (b.tokens + elapsed * self.rate).min(self.burst)
            }
            None => self.burst,
        };
        if tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - tokens) / self.rate);
            return Err(wait.max(Duration::from_millis(1)));
        }
        let left = tokens - 1.0;
        let refill = Duration::from_secs_f64((self.burst - left) / self.rate);
        self.buckets.insert(
            key.clone(),
            Bucket {
                tokens: left,
                at: now,
            },
            refill,
            now,
        );
        Ok(())
    }

    /// Buckets held (keys seen recently and not yet full again, or not yet purged).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_passes_then_requests_wait_for_the_refill() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(2, 5, 100);
        for _ in 0..5 {
            assert_eq!(l.check(&"hs", t0), Ok(()));
        }
        let wait = l.check(&"hs", t0).unwrap_err();
        assert_eq!(wait, ms(500), "one token every 500 ms");
        // A refused request takes nothing.
        assert_eq!(l.check(&"hs", t0 + ms(250)), Err(ms(250)));
        assert_eq!(l.check(&"hs", t0 + ms(500)), Ok(()));
        assert!(l.check(&"hs", t0 + ms(500)).is_err());
        // After a long pause the bucket is full again, not fuller.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(l.check(&"hs", later), Ok(()));
        }
        assert!(l.check(&"hs", later).is_err());
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, 2, 100);
        assert!(l.check(&"a", t0).is_ok() && l.check(&"a", t0).is_ok());
        assert!(l.check(&"a", t0).is_err());
        assert!(l.check(&"b", t0).is_ok(), "another key is not limited");
    }

    #[test]
    fn the_average_rate_holds_over_time() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(10, 20, 100);
        // One request every 10 ms for 10 s: 20 (burst) + 10/s * 10 s pass.
        let passed = (0..1000u64)
            .filter(|i| l.check(&1u8, t0 + ms(i * 10)).is_ok())
            .count();
        assert!((119..=121).contains(&passed), "{passed}");
    }

    #[test]
    fn zero_disables() {
        let t0 = Instant::now();
        for mut l in [RateLimiter::new(0, 5, 10), RateLimiter::new(5, 0, 10)] {
            assert!(!l.is_enabled());
            for _ in 0..1000 {
                assert!(l.check(&"x", t0).is_ok());
            }
            assert!(l.is_empty());
        }
    }

    #[test]
    fn buckets_are_bounded_and_forgotten_once_full_again() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(1, 10, 50);
        for i in 0..10_000u32 {
            assert!(l.check(&i, t0).is_ok());
            assert!(l.len() <= 50);
        }
        // A bucket with one token taken is full again after 1 s and then expires.
        let mut l = RateLimiter::new(1, 10, 50);
        assert!(l.check(&"k", t0).is_ok());
        assert_eq!(l.len(), 1);
        assert!(l.buckets.get(&"k", t0 + ms(999)).is_some());
        assert!(l.buckets.get(&"k", t0 + ms(1000)).is_none());
    }
}
