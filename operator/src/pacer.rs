//! Pacing a pool's cloud calls to the rate its cloud allows, learnt from the cloud's throttles.
//!
//! A cloud's API limits the calls per second (a token bucket); a call over the limit is throttled and costs a
//! round trip. Retrying each throttled reconcile on its own makes a storm: at 20 calls/s and 1,000 SharedLBs
//! placed at once, 6,790 throttled calls for 1,020 useful ones, and half the rate the cloud allows. So the calls
//! of one pool are spaced instead: nothing is paced until the first throttle; then the rate is what the cloud
//! accepted over the last two seconds, raised by a tenth every second without a throttle (to find a limit that
//! was raised or was never reached) and measured again at the next throttle. At 20 calls/s and 1,000 SharedLBs:
//! 94 throttled calls, and 90 % of the rate the cloud allows (`scripts/bench burst` with `RATE=20`).
//!
//! Pure: the caller passes the time and does the waiting.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Accepted calls are counted over this window to measure the rate the cloud allows.
const WINDOW: Duration = Duration::from_secs(2);
/// Growth of the rate per second without a throttle.
const PROBE_PER_SECOND: f64 = 0.1;
/// No pool is paced slower than this.
const MIN_RATE: f64 = 0.5;

#[derive(Debug, Default)]
pub struct Pacer {
    /// Calls per second; `None` until the cloud first throttles.
    rate: Option<f64>,
    /// When the rate was last raised.
    raised_at: Option<Instant>,
    /// The earliest start of the next call.
    next_free: Option<Instant>,
    /// Starts of the accepted calls within `WINDOW`.
    accepted: VecDeque<Instant>,
}

impl Pacer {
    /// How long the next call waits before it starts; the slot is taken.
    pub fn slot(&mut self, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let since = self
            .raised_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let rate = rate * (1.0 + PROBE_PER_SECOND).powf(since.as_secs_f64());
        self.rate = Some(rate);
        self.raised_at = Some(now);
        let start = self.next_free.map_or(now, |t| t.max(now));
        self.next_free = Some(start + Duration::from_secs_f64(1.0 / rate));
        start - now
    }

    /// The cloud accepted a call that started at `started`.
    pub fn accepted(&mut self, started: Instant) {
        self.accepted.push_back(started);
        while self
            .accepted
            .front()
            .is_some_and(|t| started.saturating_duration_since(*t) > WINDOW)
        {
            self.accepted.pop_front();
        }
    }

    /// The cloud throttled a call at `now`, asking to wait `retry_after`: the rate becomes what it accepted over
    /// the window (less, if that is already the rate), and nothing starts before the wait is over.
    pub fn throttled(&mut self, now: Instant, retry_after: Duration) {
        let recent = self
            .accepted
            .iter()
            .filter(|t| now.saturating_duration_since(**t) <= WINDOW)
            .count();
        let measured = recent as f64 / WINDOW.as_secs_f64();
        let rate = match self.rate {
            Some(r) if measured >= r => r * 0.9,
            _ => measured,
        };
        self.rate = Some(rate.max(MIN_RATE));
        self.raised_at = Some(now);
        let resume = now + retry_after;
        self.next_free = Some(self.next_free.map_or(resume, |t| t.max(resume)));
    }

    /// The rate in force, if any.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nothing_waits_until_the_cloud_throttles() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        assert!((0..1000).all(|_| p.slot(t0).is_zero()));
        assert_eq!(p.rate(), None);
    }

    #[test]
    fn after_a_throttle_calls_are_spaced_at_the_rate_the_cloud_accepted() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        // 40 calls accepted over the last two seconds: 20 a second
        for i in 0..40 {
            p.accepted(t0 + 50 * MS * i);
        }
        let now = t0 + 2000 * MS;
        p.throttled(now, 100 * MS);
        assert_eq!(p.rate(), Some(20.0));
        let waits: Vec<Duration> = (0..3).map(|_| p.slot(now)).collect();
        assert_eq!(
            waits,
            [100 * MS, 150 * MS, 200 * MS],
            "the cloud's wait, then 1/20 s apart"
        );
    }

    #[test]
    fn the_rate_grows_without_throttles_and_falls_at_the_next() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        for i in 0..20 {
            p.accepted(t0 + 100 * MS * i);
        }
        p.throttled(t0 + 2000 * MS, Duration::ZERO);
        assert_eq!(p.rate(), Some(10.0));
        let later = t0 + Duration::from_secs(12);
        p.slot(later);
        let grown = p.rate().expect("rate");
        assert!(
            (25.8..26.0).contains(&grown),
            "a tenth a second for 10 s: {grown}"
        );
        // throttled again: the rate falls to what the cloud accepted over the window (11 a second)...
        for i in 0..22 {
            p.accepted(later - 2000 * MS + 90 * MS * i);
        }
        p.throttled(later, Duration::ZERO);
        assert_eq!(p.rate(), Some(11.0));
        // ...or, when the calls went through faster than the pace, by a tenth
        for i in 0..40 {
            p.accepted(later + 50 * MS * i);
        }
        p.throttled(later + 2000 * MS, Duration::ZERO);
        assert!((p.rate().expect("rate") - 9.9).abs() < 1e-9);
    }

    #[test]
    fn a_cloud_that_accepted_nothing_is_still_tried_now_and_then() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        p.throttled(t0, Duration::from_secs(1));
        assert_eq!(p.rate(), Some(MIN_RATE));
        assert_eq!(p.slot(t0), Duration::from_secs(1));
        assert_eq!(p.slot(t0), Duration::from_secs(3), "two seconds apart");
    }
}
