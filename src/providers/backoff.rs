//! Pure retry and revalidation periods. The random input is a parameter so the functions are testable.

use std::time::Duration;

/// Delay before retrying a transient failure.
///
/// Exponential from `base`, doubling per `attempt` (0 = first retry → around `base`), capped at `max`,
/// with "equal jitter": half the delay is fixed, the other half scaled by `jitter` (a random number in
/// `0..=1`, clamped). Never less than `retry_after` when the provider sent one (which may exceed `max`).
pub fn retry_delay(
    attempt: u32,
    retry_after: Option<Duration>,
    base: Duration,
    max: Duration,
    jitter: f64,
) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let exponential = base.saturating_mul(factor).min(max);
    let half = exponential / 2;
    let delay = half + half.mul_f64(jitter);
    match retry_after {
        Some(after) => delay.max(after),
        None => delay,
    }
}

/// A revalidation period with ±10% jitter (`jitter` in `0..=1`: 0 → 90%, 0.5 → 100%, 1 → 110%), so
/// that connections created together do not revalidate together.
pub fn jittered(period: Duration, jitter: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.5
    };
    period.mul_f64(0.9 + 0.2 * jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn doubles_per_attempt_within_the_jitter_band() {
        for (attempt, full) in [(0, 5), (1, 10), (2, 20), (3, 40), (5, 160)] {
            let full = Duration::from_secs(full);
            assert_eq!(
                retry_delay(attempt, None, BASE, MAX, 1.0),
                full,
                "attempt {attempt}"
            );
            assert_eq!(
                retry_delay(attempt, None, BASE, MAX, 0.0),
                full / 2,
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn is_capped_at_max_even_for_huge_attempts() {
        for attempt in [6, 10, 31, 32, 1000, u32::MAX] {
            let delay = retry_delay(attempt, None, BASE, MAX, 1.0);
            assert_eq!(delay, MAX, "attempt {attempt}");
        }
    }

    #[test]
    fn never_less_than_retry_after() {
        let after = Duration::from_secs(120);
        assert_eq!(retry_delay(0, Some(after), BASE, MAX, 0.0), after);
        // Retry-After above the cap still wins: the provider asked for it.
        let long = Duration::from_secs(900);
        assert_eq!(retry_delay(0, Some(long), BASE, MAX, 1.0), long);
        // A short Retry-After does not shorten the backoff.
        assert_eq!(
            retry_delay(3, Some(Duration::from_secs(1)), BASE, MAX, 1.0),
            Duration::from_secs(40)
        );
    }

    #[test]
    fn jitter_input_out_of_range_is_clamped() {
        assert_eq!(retry_delay(1, None, BASE, MAX, 7.0), Duration::from_secs(10));
        assert_eq!(retry_delay(1, None, BASE, MAX, -3.0), Duration::from_secs(5));
        assert_eq!(
            retry_delay(1, None, BASE, MAX, f64::NAN),
            Duration::from_millis(7500)
        );
    }

    #[test]
    fn an_hour_of_retries_is_a_bounded_number_of_calls() {
        // With a 5-minute cap, an hour of transient failures costs at most a couple dozen provider
        // calls per connection, not a tight loop.
        let mut elapsed = Duration::ZERO;
        let mut calls = 0;
        while elapsed < Duration::from_secs(3600) {
            elapsed += retry_delay(calls, None, BASE, MAX, 0.0);
            calls += 1;
        }
        assert!(calls <= 30, "{calls} calls in an hour");
        assert!(calls >= 12, "{calls} calls in an hour: retries too slow");
    }

    #[test]
    fn jittered_stays_within_ten_percent() {
        let period = Duration::from_secs(900);
        assert_eq!(jittered(period, 0.0), Duration::from_secs(810));
        assert_eq!(jittered(period, 0.5), Duration::from_secs(900));
        assert_eq!(jittered(period, 1.0), Duration::from_secs(990));
        assert_eq!(jittered(period, 2.0), Duration::from_secs(990));
    }
}
