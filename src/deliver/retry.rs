//! The retry policy: after attempt n fails, wait `retry_schedule[n-1]`
//! (±20% jitter, so retries of one outage do not arrive in a wave), or what
//! `Retry-After` asked for when that is longer (capped, and up to 10% later:
//! never earlier than asked, and the deliveries one 429 answered do not all
//! come back at one instant); after the last entry the delivery is dead.

use std::time::Duration;

use rand::Rng;

/// The delay before the next attempt, or `None` when the delivery is dead.
/// `attempts` counts the attempts made so far, this one included.
pub fn next_delay(
    attempts: u32,
    schedule: &[Duration],
    retry_after: Option<Duration>,
    max_retry_after: Duration,
) -> Option<Duration> {
    let index = usize::try_from(attempts.checked_sub(1)?).ok()?;
    let base = *schedule.get(index)?;
    let jittered = base.mul_f64(rand::rng().random_range(0.8..=1.2));
    Some(match retry_after {
        Some(asked) => {
            // Capped before the jitter: a Retry-After of u64::MAX seconds
            // times 1.1 is no Duration.
            let later = asked
                .min(max_retry_after)
                .mul_f64(rand::rng().random_range(1.0..=1.1));
            jittered.max(later.min(max_retry_after))
        }
        None => jittered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn follows_the_schedule_with_jitter() {
        let schedule = [Duration::from_secs(10), Duration::from_secs(100)];
        for _ in 0..200 {
            let first = next_delay(1, &schedule, None, HOUR).expect("retry");
            assert!(first >= Duration::from_secs(8) && first <= Duration::from_secs(12));
            let second = next_delay(2, &schedule, None, HOUR).expect("retry");
            assert!(second >= Duration::from_secs(80) && second <= Duration::from_secs(120));
        }
        assert_eq!(next_delay(3, &schedule, None, HOUR), None);
        assert_eq!(next_delay(1, &[], None, HOUR), None);
    }

    #[test]
    fn retry_after_lengthens_within_bounds() {
        let schedule = [Duration::from_secs(1)];
        for _ in 0..200 {
            let d = next_delay(1, &schedule, Some(Duration::from_secs(60)), HOUR).expect("retry");
            assert!(d >= Duration::from_secs(60) && d <= Duration::from_secs(66));
        }
        let capped =
            next_delay(1, &schedule, Some(Duration::from_secs(86400)), HOUR).expect("retry");
        assert_eq!(capped, HOUR);
        for asked in [Duration::from_secs(u64::MAX), Duration::MAX] {
            assert_eq!(next_delay(1, &schedule, Some(asked), HOUR), Some(HOUR));
        }
        let shorter = next_delay(
            1,
            &[Duration::from_secs(100)],
            Some(Duration::from_secs(1)),
            HOUR,
        )
        .expect("retry");
        assert!(shorter >= Duration::from_secs(80));
    }
}
