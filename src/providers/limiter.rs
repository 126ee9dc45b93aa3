//! A token bucket per provider host (`login.salesforce.com`, `contoso.crm.dynamics.com:443`, …), so
//! that thousands of connections never stampede one provider; and, inside it, a bucket per tenant
//! (the connection's namespace) holding half of the host's rate and burst, so that one namespace (a
//! loop, a flood of connections) cannot starve the others of a shared host.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

tokio::task_local! {
    static TENANT: String;
}

/// Runs `f` with provider calls counted against `tenant`'s share of each host (the controller
/// passes the connection's namespace). Calls outside count against the host only.
pub async fn with_tenant<F: std::future::Future>(tenant: String, f: F) -> F::Output {
    TENANT.scope(tenant, f).await
}

pub(crate) struct HostLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
    tenants: DefaultKeyedRateLimiter<(String, String)>,
    clock: DefaultClock,
    max_wait: Duration,
}

/// Half, rounded up (at least 1).
fn half(n: NonZeroU32) -> NonZeroU32 {
    NonZeroU32::new(n.get().div_ceil(2)).expect("at least 1")
}

impl HostLimiter {
    pub(crate) fn new(per_second: u32, burst: u32, max_wait: Duration) -> Result<Self, String> {
        let per_second = NonZeroU32::new(per_second).ok_or("per_host_rate must be at least 1")?;
        let burst = NonZeroU32::new(burst).ok_or("per_host_burst must be at least 1")?;
        Ok(HostLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            tenants: RateLimiter::keyed(Quota::per_second(half(per_second)).allow_burst(half(burst))),
            clock: DefaultClock::default(),
            max_wait,
        })
    }

    /// Takes one cell for `host` (first from the current tenant's share, if any), waiting for them
    /// up to `max_wait` in total. `Err(wait)` when the next cell is further away than that: the
    /// caller gives up (transient) and retries after `wait`.
    pub(crate) async fn acquire(&self, host: &str) -> Result<(), Duration> {
        let host = host.to_ascii_lowercase();
        let mut waited = Duration::ZERO;
        if let Ok(tenant) = TENANT.try_with(String::clone) {
            self.take(&self.tenants, &(host.clone(), tenant), &mut waited)
                .await?;
        }
        self.take(&self.limiter, &host, &mut waited).await
    }

    async fn take<K: Hash + Eq + Clone>(
        &self,
        limiter: &DefaultKeyedRateLimiter<K>,
        key: &K,
        waited: &mut Duration,
    ) -> Result<(), Duration> {
        loop {
            match limiter.check_key(key) {
                Ok(()) => return Ok(()),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    if *waited + wait > self.max_wait {
                        return Err(wait.max(Duration::from_millis(1)));
                    }
                    tokio::time::sleep(wait).await;
                    *waited += wait;
                }
            }
            // Keys are few, but drop the state of idle ones now and then.
            if limiter.len() > 1024 {
                limiter.retain_recent();
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

    #[tokio::test]
    async fn one_tenant_takes_at_most_half_of_a_hosts_burst() {
        let limiter = HostLimiter::new(1, 4, Duration::ZERO).unwrap();
        let take = |tenant: &'static str| {
            let limiter = &limiter;
            with_tenant(tenant.to_string(), async move {
                limiter.acquire("login.salesforce.com").await
            })
        };
        assert!(take("noisy").await.is_ok());
        assert!(take("noisy").await.is_ok());
        assert!(take("noisy").await.is_err(), "the noisy namespace used its half");
        assert!(
            take("quiet").await.is_ok(),
            "the other half is left for the others"
        );
        assert!(take("quiet").await.is_ok());
        assert!(
            take("third").await.is_err(),
            "the host's own bucket still caps the total"
        );
    }

    #[test]
    fn zero_rate_is_rejected() {
        assert!(HostLimiter::new(0, 1, Duration::ZERO).is_err());
        assert!(HostLimiter::new(1, 0, Duration::ZERO).is_err());
    }
}
