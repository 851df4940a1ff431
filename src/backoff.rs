//! How long to wait before the next attempt of something that failed: one small, pure
//! type for every retry delay the service computes (Stripe calls, failed inbox rows,
//! failed syncs, a ledger command that lost an optimistic-concurrency race).
//!
//! A [`Backoff`] starts at a first delay and grows with each retry (doubling, or by a fixed
//! step), never beyond its cap. Jitter is optional and takes its random number as an
//! argument, so every delay is a function of its inputs and the sequences are unit-tested
//! here. This module must never sleep, read a clock or draw a random number itself: callers
//! do, with the delay it gives them.

use std::time::Duration;

/// How each delay follows from the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// Twice the one before.
    Doubling,
    /// This much longer than the one before.
    Linear(Duration),
}

/// A sequence of retry delays: the first, growing by [`Growth`], at most `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    growth: Growth,
    cap: Duration,
}

impl Backoff {
    /// The longest [`Backoff::schedule`].
    pub const SCHEDULE_MAX: usize = 64;

    /// `first`, `2 × first`, `4 × first` … (uncapped until [`Backoff::capped`]).
    pub const fn doubling(first: Duration) -> Self {
        Self {
            first,
            growth: Growth::Doubling,
            cap: Duration::MAX,
        }
    }

    /// `first`, `first + step`, `first + 2 × step` … (uncapped until [`Backoff::capped`]).
    pub const fn linear(first: Duration, step: Duration) -> Self {
        Self {
            first,
            growth: Growth::Linear(step),
            cap: Duration::MAX,
        }
    }

    /// The same sequence, never longer than `cap`.
    pub const fn capped(self, cap: Duration) -> Self {
        Self { cap, ..self }
    }

    /// The delay before retry `n` (0 is the first retry). Arithmetic saturates, so a very
    /// long run of failures stays at the cap instead of overflowing.
    pub fn delay(&self, n: u32) -> Duration {
        let grown = match self.growth {
            // 2^n saturates at u32::MAX from n = 32 on; the product saturates too.
            Growth::Doubling => self
                .first
                .saturating_mul(2u32.checked_pow(n).unwrap_or(u32::MAX)),
            Growth::Linear(step) => self.first.saturating_add(step.saturating_mul(n)),
        };
        grown.min(self.cap)
    }

    /// A delay drawn uniformly, in whole milliseconds, from `[0, delay(n))` by `random`
    /// (any uniformly random number): "full jitter", so that many callers that failed
    /// together do not retry together. Zero when `delay(n)` is under a millisecond.
    pub fn jittered(&self, n: u32, random: u64) -> Duration {
        let spread = self.delay(n).as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        Duration::from_millis(random % spread)
    }

    /// The delays before retries 0, 1, 2 … up to the first that the next one equals (the
    /// cap, or zero when `first` is zero): the delay before retry `n` is the `n`th, or the
    /// last once `n` is past the end. For a statement that must pick the delay from a
    /// count only the database holds, in the same statement that changes it. A doubling
    /// sequence always settles (2^n saturates at n = 32); a linear one that has not settled
    /// after [`Backoff::SCHEDULE_MAX`] delays is cut there.
    pub fn schedule(&self) -> Vec<Duration> {
        let mut delays = vec![self.delay(0)];
        for n in 1..Self::SCHEDULE_MAX as u32 {
            let next = self.delay(n);
            if next == *delays.last().expect("never empty") {
                break;
            }
            delays.push(next);
        }
        delays
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(delays: impl IntoIterator<Item = Duration>) -> Vec<f64> {
        delays.into_iter().map(|d| d.as_secs_f64()).collect()
    }

    #[test]
    fn doubling_doubles_until_the_cap() {
        let backoff = Backoff::doubling(Duration::from_secs(2)).capped(Duration::from_secs(3600));
        assert_eq!(
            secs((0..14).map(|n| backoff.delay(n))),
            [
                2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 3600.0,
                3600.0, 3600.0
            ]
        );
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn uncapped_doubling_saturates_instead_of_overflowing() {
        let backoff = Backoff::doubling(Duration::from_millis(250));
        assert_eq!(backoff.delay(0), Duration::from_millis(250));
        assert_eq!(backoff.delay(3), Duration::from_millis(2000));
        assert!(backoff.delay(40) > Duration::from_secs(1_000_000_000));
        assert_eq!(backoff.delay(u32::MAX), backoff.delay(200));
    }

    #[test]
    fn linear_grows_by_its_step() {
        let backoff = Backoff::linear(Duration::from_millis(1), Duration::from_millis(2));
        assert_eq!(
            (0..5)
                .map(|n| backoff.delay(n).as_millis())
                .collect::<Vec<_>>(),
            [1, 3, 5, 7, 9]
        );
    }

    #[test]
    fn jitter_stays_below_the_delay_in_whole_milliseconds() {
        let backoff = Backoff::linear(Duration::from_millis(1), Duration::from_millis(2));
        // Retry 0 can only pause 0 ms; retry 3 pauses 0..7 ms, chosen by the number.
        assert_eq!(backoff.jittered(0, u64::MAX), Duration::ZERO);
        assert_eq!(backoff.jittered(3, 6), Duration::from_millis(6));
        assert_eq!(backoff.jittered(3, 7), Duration::ZERO);
        assert_eq!(backoff.jittered(3, 12), Duration::from_millis(5));
        let sub_millisecond = Backoff::doubling(Duration::from_micros(10));
        assert_eq!(sub_millisecond.jittered(0, 12345), Duration::ZERO);
    }

    #[test]
    fn a_schedule_lists_each_delay_once_up_to_the_cap() {
        let backoff = Backoff::doubling(Duration::from_secs(5)).capped(Duration::from_secs(3600));
        assert_eq!(
            secs(backoff.schedule()),
            [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0, 3600.0]
        );
        assert_eq!(
            Backoff::doubling(Duration::ZERO).schedule(),
            [Duration::ZERO]
        );
        assert_eq!(
            Backoff::linear(Duration::ZERO, Duration::from_millis(1))
                .schedule()
                .len(),
            Backoff::SCHEDULE_MAX
        );
        // A first delay above the cap is the cap at once.
        assert_eq!(
            Backoff::doubling(Duration::from_secs(7200))
                .capped(Duration::from_secs(3600))
                .schedule(),
            [Duration::from_secs(3600)]
        );
    }
}
