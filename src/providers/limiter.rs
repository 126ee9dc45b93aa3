//! A token bucket per provider host (`login.salesforce.com`, `contoso.crm.dynamics.com:443`, …), so
//! that thousands of connections never stampede one provider.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub(crate) struct HostLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    max_wait: Duration,
}

impl HostLimiter {
    pub(crate) fn new(per_second: u32, burst: u32, max_wait: Duration) -> Result<Self, String> {
        let per_second = NonZeroU32::new(per_second).ok_or("per_host_rate must be at least 1")?;
        let burst = NonZeroU32::new(burst).ok_or("per_host_burst must be at least 1")?;
        Ok(HostLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            clock: DefaultClock::default(),
            max_wait,
        })
    }

    /// Takes one cell for `host`, waiting for it up to `max_wait` in total. `Err(wait)` when the next
    /// cell is further away than that: the caller gives up (transient) and retries after `wait`.
    pub(crate) async fn acquire(&self, host: &str) -> Result<(), Duration> {
        let key = host.to_ascii_lowercase();
        let mut waited = Duration::ZERO;
        loop {
            match self.limiter.check_key(&key) {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    if waited + wait > self.max_wait {
                        return Err(wait.max(Duration::from_millis(1)));
                    }
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
            }
            // Hosts are few, but drop the state of idle ones now and then.
            if self.limiter.len() > 1024 {
                self.limiter.retain_recent();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn burst_then_refusal_without_waiting_and_hosts_are_independent() {
        let limiter = HostLimiter::new(1, 2, Duration::ZERO).unwrap();
        assert!(limiter.acquire("login.salesforce.com").await.is_ok());
        assert!(limiter.acquire("LOGIN.salesforce.com").await.is_ok());
        let wait = limiter.acquire("login.salesforce.com").await.unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limiter.acquire("test.salesforce.com").await.is_ok(),
            "another host has its own bucket"
        );
    }

    #[test]
    fn zero_rate_is_rejected() {
        assert!(HostLimiter::new(0, 1, Duration::ZERO).is_err());
        assert!(HostLimiter::new(1, 0, Duration::ZERO).is_err());
    }
}
