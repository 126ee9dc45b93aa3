//! The JobRun controller's CRM budget: what one namespace, and one org, may ask of the CRMs.
//!
//! - **Per namespace** (the tenant): a token bucket of [`PER_NAMESPACE_RATE`] calls a second, bursts
//!   of [`PER_NAMESPACE_BURST`]. A namespace whose bucket is empty is told to come back later (its
//!   reconcile gives its concurrency slot back at once instead of waiting in it), so a flood of runs
//!   in one namespace waits its turn while the others' runs, and the connections' token refreshes
//!   (which go through the provider limiter, not this), keep their schedule.
//! - **Per org**: a `Retry-After` the CRM sent (429, Salesforce's 403 `REQUEST_LIMIT_EXCEEDED`)
//!   holds every call for that org until it has passed (a throttled answer without one holds it for
//!   [`THROTTLED_PAUSE`]); and once Salesforce's `Sforce-Limit-Info` says the org has used
//!   [`SPARE_RATIO`] of its daily API requests, the abort check (the one optional read) is made
//!   [`SPARE_STRETCH`] times less often. Reports (the outcome, the fence) are never skipped, only
//!   held while the org is throttled.
//!
//! [`Budget::admit`] and [`Budget::observe`] take the time as a value: unit-tested without a clock.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::crm::{ApiUsage, CrmError};

/// CRM calls a second one namespace's runs may make (reads and writes together).
pub const PER_NAMESPACE_RATE: u32 = 10;
/// The burst of [`PER_NAMESPACE_RATE`].
pub const PER_NAMESPACE_BURST: u32 = 20;
/// How long an org is left alone after a throttled answer that named no `Retry-After`.
pub const THROTTLED_PAUSE: Duration = Duration::from_secs(60);
/// The share of its daily API requests an org may use before the abort check slows down.
pub const SPARE_RATIO: f64 = 0.8;
/// How much less often the abort check reads a running job of an org past [`SPARE_RATIO`].
pub const SPARE_STRETCH: u32 = 10;

#[derive(Default, Clone, Copy)]
struct OrgState {
    /// No call before this (the CRM's `Retry-After`).
    held_until: Option<Instant>,
    /// The last `Sforce-Limit-Info` seen.
    usage: Option<ApiUsage>,
}

pub struct Budget {
    namespaces: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    orgs: Mutex<HashMap<String, OrgState>>,
}

impl Default for Budget {
    fn default() -> Self {
        let rate = NonZeroU32::new(PER_NAMESPACE_RATE).expect("non-zero");
        let burst = NonZeroU32::new(PER_NAMESPACE_BURST).expect("non-zero");
        Budget {
            namespaces: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            orgs: Mutex::new(HashMap::new()),
        }
    }
}

impl Budget {
    /// May a run of `namespace` call the CRM of `org` now? `Err` says why not and for how long.
    pub fn admit(&self, namespace: &str, org: &str, now: Instant) -> Result<(), CrmError> {
        if let Some(wait) = held(self.orgs.lock().unwrap().get(org), now) {
            return Err(CrmError::OverBudget {
                why: "the CRM asked for a pause (Retry-After)",
                retry_after: wait,
            });
        }
        self.namespaces
            .check_key(&namespace.to_string())
            .map_err(|not_until| CrmError::OverBudget {
                why: "this namespace's CRM calls are over their budget",
                retry_after: not_until
                    .wait_time_from(self.clock.now())
                    .max(Duration::from_millis(100)),
            })
    }

    /// Records what an answer said: its `Sforce-Limit-Info`, and a `Retry-After` (or a throttled
    /// answer without one).
    pub fn observe(&self, org: &str, usage: Option<ApiUsage>, error: Option<&CrmError>, now: Instant) {
        let mut orgs = self.orgs.lock().unwrap();
        let state = orgs.entry(org.to_string()).or_default();
        if usage.is_some() {
            state.usage = usage;
        }
        let pause = match error {
            Some(e @ CrmError::Throttled { .. }) => Some(e.retry_after().unwrap_or(THROTTLED_PAUSE)),
            Some(e @ CrmError::Unexpected { .. }) => e.retry_after(),
            _ => None,
        };
        if let Some(pause) = pause {
            let until = now + pause;
            state.held_until = Some(state.held_until.map_or(until, |held| held.max(until)));
        }
    }

    /// How often a running job of `org` is read for an abort: `base`, or [`SPARE_STRETCH`] times
    /// that once the org has used [`SPARE_RATIO`] of its API requests.
    pub fn abort_check(&self, org: &str, base: Duration) -> Duration {
        let usage = self.orgs.lock().unwrap().get(org).and_then(|s| s.usage);
        stretched(usage, base)
    }
}

fn held(state: Option<&OrgState>, now: Instant) -> Option<Duration> {
    let until = state?.held_until?;
    (until > now).then(|| until - now)
}

fn stretched(usage: Option<ApiUsage>, base: Duration) -> Duration {
    match usage {
        Some(u) if u.ratio() >= SPARE_RATIO => base * SPARE_STRETCH,
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttled(retry_after: Option<u64>) -> CrmError {
        CrmError::Throttled {
            status: 429,
            code: None,
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn a_retry_after_holds_only_its_org_until_it_passed() {
        let budget = Budget::default();
        let now = Instant::now();
        budget.observe("sf-a", None, Some(&throttled(Some(30))), now);
        match budget.admit("team-a", "sf-a", now + Duration::from_secs(10)) {
            Err(CrmError::OverBudget { retry_after, .. }) => assert_eq!(retry_after, Duration::from_secs(20)),
            other => panic!("{other:?}"),
        }
        assert!(
            budget.admit("team-a", "sf-b", now).is_ok(),
            "another org is not held"
        );
        assert!(
            budget
                .admit("team-a", "sf-a", now + Duration::from_secs(31))
                .is_ok()
        );
        // Without a Retry-After: the default pause. A shorter later one never shortens it.
        budget.observe("sf-c", None, Some(&throttled(None)), now);
        budget.observe("sf-c", None, Some(&throttled(Some(1))), now);
        assert!(
            budget
                .admit("team-a", "sf-c", now + THROTTLED_PAUSE - Duration::from_secs(1))
                .is_err()
        );
        // Other failures hold nothing unless they name a Retry-After.
        budget.observe("sf-d", None, Some(&CrmError::Transport("x".into())), now);
        assert!(budget.admit("team-a", "sf-d", now).is_ok());
    }

    #[test]
    fn one_namespace_spends_its_own_bucket_only() {
        let budget = Budget::default();
        let now = Instant::now();
        let admitted = (0..100)
            .filter(|_| budget.admit("noisy", "sf-a", now).is_ok())
            .count();
        assert!(
            (PER_NAMESPACE_BURST as usize..PER_NAMESPACE_BURST as usize + 5).contains(&admitted),
            "{admitted}"
        );
        assert!(matches!(
            budget.admit("noisy", "sf-a", now),
            Err(CrmError::OverBudget { .. })
        ));
        assert!(
            budget.admit("quiet", "sf-b", now).is_ok(),
            "another namespace still calls"
        );
    }

    #[test]
    fn the_abort_check_slows_down_once_the_org_used_most_of_its_api_requests() {
        let base = Duration::from_secs(60);
        assert_eq!(stretched(None, base), base);
        assert_eq!(
            stretched(
                Some(ApiUsage {
                    used: 100,
                    max: 15000
                }),
                base
            ),
            base
        );
        assert_eq!(
            stretched(
                Some(ApiUsage {
                    used: 12000,
                    max: 15000
                }),
                base
            ),
            base * SPARE_STRETCH
        );
        let budget = Budget::default();
        budget.observe(
            "sf-a",
            Some(ApiUsage {
                used: 14000,
                max: 15000,
            }),
            None,
            Instant::now(),
        );
        assert_eq!(budget.abort_check("sf-a", base), base * SPARE_STRETCH);
        assert_eq!(budget.abort_check("sf-b", base), base);
    }
}
