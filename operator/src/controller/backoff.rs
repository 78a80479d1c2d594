//! Retries that back off. Each object's consecutive failures double its delay from the error's own base, up to
//! a cap, and jitter spreads objects that failed together, so a cloud that throttles or an apiserver that refuses
//! is not met by a synchronised retry storm. A success forgets the object's failures.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// No retry waits longer than this: a fixed fault is found again within five minutes.
pub const MAX_DELAY: Duration = Duration::from_secs(300);

/// The delay before the retry after `failures` consecutive failures (1 for the first): `base` doubled per
/// earlier failure, capped at [`MAX_DELAY`], then scaled by `0.8 + 0.4 * jitter` (`jitter` in 0..1). A delay
/// the cloud asked for (`at_least`, e.g. Retry-After) is honoured whatever the backoff says.
pub fn delay(base: Duration, failures: u32, jitter: f64, at_least: Option<Duration>) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let grown = base.saturating_mul(1u32 << doublings).min(MAX_DELAY);
    let spread = grown.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0));
    spread.max(at_least.unwrap_or_default())
}

/// Consecutive failures per object.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Counts a failure of `key` and returns how long to wait before retrying it.
    pub fn failed(&self, key: &str, base: Duration, at_least: Option<Duration>) -> Duration {
        let mut all = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = all.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
        delay(base, *n, fastrand::f64(), at_least)
    }

    /// `key` reconciled: its next failure starts from the base again.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn each_failure_doubles_the_delay_up_to_the_cap() {
        let mid = |n| delay(5 * S, n, 0.5, None);
        assert_eq!(
            [mid(1), mid(2), mid(3), mid(4)],
            [5 * S, 10 * S, 20 * S, 40 * S]
        );
        assert_eq!(mid(7), MAX_DELAY, "5 s x 64 is capped");
        assert_eq!(
            mid(u32::MAX),
            MAX_DELAY,
            "no overflow however long it fails"
        );
    }

    #[test]
    fn jitter_spreads_within_a_fifth_either_way() {
        assert_eq!(delay(10 * S, 1, 0.0, None), 8 * S);
        assert_eq!(delay(10 * S, 1, 1.0, None), 12 * S);
        assert_eq!(delay(MAX_DELAY, 3, 1.0, None), MAX_DELAY.mul_f64(1.2));
    }

    #[test]
    fn a_delay_the_cloud_asked_for_is_honoured() {
        assert_eq!(delay(S, 1, 0.5, Some(30 * S)), 30 * S);
        assert_eq!(delay(S, 9, 0.5, Some(30 * S)), 256 * S);
    }

    #[test]
    fn success_starts_over_and_objects_count_apart() {
        let b = Backoff::default();
        let base = 4 * S;
        let first = b.failed("a", base, None);
        let second = b.failed("a", base, None);
        assert!(first <= base.mul_f64(1.2) && second >= (2 * base).mul_f64(0.8));
        assert!(
            b.failed("b", base, None) <= base.mul_f64(1.2),
            "b has its own count"
        );
        b.succeeded("a");
        assert!(b.failed("a", base, None) <= base.mul_f64(1.2));
    }
}
