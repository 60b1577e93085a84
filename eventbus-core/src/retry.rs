//! Exponential backoff with jitter, shared by the keyed pool's in-place retry and the
//! publisher retry layer.

use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Bounded attempts with exponential backoff and jitter.
///
/// The delay before attempt `n + 1` is `initial * 2^(n-1)`, capped at `max`, then reduced by
/// a random fraction of up to `jitter` (so that many failing consumers do not retry in step).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// Total attempts including the first; at least 1. Default 5.
    pub attempts: u32,
    /// Delay after the first failure. Default 100 ms.
    #[serde(with = "crate::config::duration")]
    pub initial_backoff: Duration,
    /// Longest delay. Default 10 s.
    #[serde(with = "crate::config::duration")]
    pub max_backoff: Duration,
    /// Fraction of each delay that is random, in `[0, 1]`. Default 0.2.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// `attempts` tries, starting at `initial`, doubling up to `max`.
    pub fn new(attempts: u32, initial: Duration, max: Duration) -> Self {
        Self {
            attempts,
            initial_backoff: initial,
            max_backoff: max,
            ..Self::default()
        }
    }

    /// Same backoff without jitter (deterministic delays, for tests and examples).
    #[must_use]
    pub fn without_jitter(mut self) -> Self {
        self.jitter = 0.0;
        self
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.attempts == 0 {
            return Err(Error::config("retry.attempts", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::config("retry.jitter", "must be between 0 and 1"));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(Error::config(
                "retry.max_backoff",
                "must not be shorter than initial_backoff",
            ));
        }
        Ok(())
    }

    /// The delay after failed attempt `attempt` (from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        if self.jitter <= 0.0 {
            return base;
        }
        let cut = self.jitter * fastrand::f64();
        base.mul_f64(1.0 - cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_and_capped() {
        let b = Backoff::new(5, Duration::from_millis(100), Duration::from_millis(350))
            .without_jitter();
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(350));
        assert_eq!(b.delay(40), Duration::from_millis(350));
        let j = Backoff::default();
        for n in 1..6 {
            let d = j.delay(n);
            let full = j.clone().without_jitter().delay(n);
            assert!(d <= full && d >= full.mul_f64(0.8), "{d:?} vs {full:?}");
        }
        assert!(
            Backoff {
                attempts: 0,
                ..Backoff::default()
            }
            .validate()
            .is_err()
        );
    }
}
