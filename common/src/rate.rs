//! The token bucket both programs limit rates with: fetch's `--limit-rate` (bytes) and chat's
//! per-source datagram limit. Time is passed in, so callers and tests decide what "now" is.

use std::time::{Duration, Instant};

/// `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket with its whole burst available.
    pub fn full(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// A bucket that starts with nothing saved up.
    pub fn empty(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: 0.0,
            ..Self::full(rate, burst, now)
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes `n` tokens if they are there.
    pub fn try_take(&mut self, now: Instant, n: f64) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if need be, and says how long to wait until the
    /// debt is paid: the caller sleeps that long before using what it took.
    pub fn take(&mut self, now: Instant, n: f64) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_its_burst_then_the_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::full(10.0, 3.0, t);
        assert!((0..3).all(|_| b.try_take(t, 1.0)));
        assert!(!b.try_take(t, 1.0));
        assert!(b.try_take(t + Duration::from_millis(100), 1.0));
        assert!(!b.try_take(t + Duration::from_millis(150), 1.0));
        // Saving up stops at the burst.
        let later = t + Duration::from_secs(60);
        assert!((0..3).all(|_| b.try_take(later, 1.0)));
        assert!(!b.try_take(later, 1.0));
    }

    #[test]
    fn taking_on_credit_says_how_long_to_wait() {
        let t = Instant::now();
        let mut b = TokenBucket::empty(1000.0, 100.0, t);
        assert_eq!(b.take(t, 500.0), Duration::from_millis(500));
        assert_eq!(
            b.take(t + Duration::from_millis(500), 100.0),
            Duration::from_millis(100)
        );
        assert_eq!(b.take(t + Duration::from_secs(5), 50.0), Duration::ZERO);
    }
}
