//! Retry delays from `spec.retry`: exponential backoff with optional jitter (backon).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::config::RetryPolicy;

/// Delays for successive retries; `max_times` None never runs out.
pub fn backoff(
    policy: &RetryPolicy,
    max_times: Option<u32>,
) -> impl Iterator<Item = Duration> + Send + use<> {
    let mut b = ExponentialBuilder::default()
        .with_min_delay(policy.initial_interval)
        .with_max_delay(policy.max_interval)
        .with_factor(policy.multiplier.max(1.0));
    b = match max_times {
        Some(n) => b.with_max_times(n as usize),
        None => b.without_max_times(),
    };
    if policy.jitter {
        b = b.with_jitter();
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_millis(500),
            multiplier: 2.0,
            jitter,
        }
    }

    #[test]
    fn exponential_capped_and_bounded() {
        let d: Vec<Duration> = backoff(&policy(false), Some(5)).collect();
        let ms: Vec<u128> = d.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 500, 500]);
        assert_eq!(backoff(&policy(false), None).take(50).count(), 50);
    }

    #[test]
    fn jitter_stays_within_one_more_delay() {
        for d in backoff(&policy(true), Some(20)) {
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
    }
}
