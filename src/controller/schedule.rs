//! When to ask the provider again. Pure.
//!
//! A validation is remembered as a [`Memo`] keyed by a fingerprint of its inputs (the credentials
//! Secret's name and resourceVersion, and the provider settings). While the fingerprint is unchanged:
//! a success is re-checked after the revalidation interval (earlier if the access token expires
//! sooner), a transient failure after a backoff, and a rejection never — only a change of the
//! Secret or the spec (re-authorization) triggers the next call.

use super::state::{Check, Identity, Known};
use crate::api::Connection;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use std::time::Duration;

/// Annotation on the session Secret: the fingerprint its session was validated for.
pub const FINGERPRINT_ANNOTATION: &str = "crmconnect.io/validated-fingerprint";
/// Annotation on the session Secret: when the next validation is due (RFC 3339).
pub const NEXT_CHECK_ANNOTATION: &str = "crmconnect.io/next-check-at";
/// Annotation on the session Secret: when its access token was granted (RFC 3339). It changes only
/// with a new token grant, so a recheck that needs none writes the same value.
pub const GRANTED_AT_ANNOTATION: &str = "crmconnect.io/granted-at";
/// Annotation on the session Secret (Salesforce): the identity URL of the grant that issued its
/// access token (`https://<login host>/id/<org ID>/<user ID>`, not a secret), for the rechecks that
/// ask who that token belongs to without a token request.
pub const IDENTITY_URL_ANNOTATION: &str = "crmconnect.io/identity-url";

/// The conclusion of the last validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Authorized,
    Rejected,
    Unavailable { attempt: u32 },
}

/// What the operator remembers of the last validation of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memo {
    pub fingerprint: String,
    pub outcome: Outcome,
    /// `None`: only a change of the inputs triggers the next call.
    pub next_check_at: Option<Timestamp>,
    /// What is known about the tokens: the state is decided from this, not from the (possibly
    /// stale) cached status.
    pub check: Check,
}

/// Whether the provider must be called now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    Now,
    /// Not before this time (requeue then).
    At(Timestamp),
    /// Not until the inputs change.
    OnChange,
}

/// Annotation on a Connection: any new value forces one validation now (like `flux reconcile`),
/// e.g. `kubectl annotate conn NAME crmconnect.io/revalidate="$(date +%s)" --overwrite`.
pub const REVALIDATE_ANNOTATION: &str = "crmconnect.io/revalidate";

/// Fingerprint of everything a validation depends on. `tokens` identifies the token inputs (the
/// seed's hash and the live token's hash), `None` when the seed is missing or unreadable. Labels
/// and annotations of the seed are not inputs: rewriting them changes nothing.
pub fn fingerprint(conn: &Connection, tokens: Option<&str>) -> String {
    let mut settings = serde_json::json!({
        "secret": conn.spec.credentials_secret_ref.name,
        "tokens": tokens,
        "provider": conn.spec.provider,
        "salesforce": conn.spec.salesforce,
        "dynamics": conn.spec.dynamics,
    });
    // Only when set: connections without it keep the fingerprints they had.
    if let Some(value) = conn
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVALIDATE_ANNOTATION))
    {
        settings["revalidate"] = value.as_str().into();
    }
    let d = ring::digest::digest(&ring::digest::SHA256, settings.to_string().as_bytes());
    d.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Decides whether to call the provider for inputs with `fingerprint`.
pub fn due(memo: Option<&Memo>, fingerprint: &str, now: Timestamp) -> Due {
    let Some(memo) = memo.filter(|m| m.fingerprint == fingerprint) else {
        return Due::Now;
    };
    match memo.next_check_at {
        None => Due::OnChange,
        Some(at) if at <= now => Due::Now,
        Some(at) => Due::At(at),
    }
}

/// Revalidation policy (operator flags).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// How often valid tokens are re-checked (default 15 minutes), each connection at its own moment
    /// of the interval ([`Policy::next_slot`]).
    pub revalidate_every: Duration,
    /// Refresh this long before a known access-token expiry.
    pub refresh_margin: Duration,
    /// A recheck of unchanged, valid tokens asks who the current access token belongs to (no token
    /// request, nothing rotates) until this long after its grant, or until `refresh_margin` before
    /// its known expiry; then it refreshes. Zero: every check refreshes. See [`refresh_due`].
    pub refresh_every: Duration,
    /// First retry delay after a transient failure; doubles per attempt.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            revalidate_every: Duration::from_secs(15 * 60),
            refresh_margin: Duration::from_secs(5 * 60),
            refresh_every: Duration::from_secs(60 * 60),
            retry_base: Duration::from_secs(5),
            retry_max: Duration::from_secs(5 * 60),
        }
    }
}

fn plus(now: Timestamp, d: Duration) -> Timestamp {
    now.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

impl Policy {
    /// Memo after a success. `expires_at` is the access token's expiry, when known; `phase` is the
    /// connection's place in the interval ([`phase`]).
    pub fn after_success(
        &self,
        fingerprint: String,
        now: Timestamp,
        expires_at: Option<Timestamp>,
        phase: f64,
        identity: Identity,
    ) -> Memo {
        let mut next = self.next_check(now, phase);
        if let Some(exp) = expires_at {
            let margin = SignedDuration::try_from(self.refresh_margin).unwrap_or(SignedDuration::ZERO);
            let early = exp.saturating_sub(margin).unwrap_or(exp);
            // Never sooner than the retry base, so a token with a tiny lifetime cannot spin the loop.
            next = next.min(early.max(plus(now, self.retry_base)));
        }
        Memo {
            fingerprint,
            outcome: Outcome::Authorized,
            next_check_at: Some(next),
            check: Check::valid(identity),
        }
    }

    /// The recheck after a successful check at `now` of a connection whose place in the interval
    /// is `phase` ([`phase`]): one interval later, moved by at most a tenth of it towards that
    /// place. So a connection is never rechecked sooner than 0.9 intervals after a validation (a
    /// cold start of 10,000 makes no calls for a while), and a bunch validated together (a cold
    /// start, a mass re-authorization) spreads out over a few intervals until each is rechecked at
    /// its own place, exactly once per interval: evenly over the interval, deterministically.
    pub fn next_check(&self, now: Timestamp, phase: f64) -> Timestamp {
        let period = self.period();
        let target = now.as_second().saturating_add(period);
        let nearest = Self::slot_on_or_after(target - period / 2, period, phase);
        let step = period / 10;
        let next = target.saturating_add((nearest - target).clamp(-step, step));
        Timestamp::from_second(next).unwrap_or(Timestamp::MAX)
    }

    /// The first time after `now` (at least a second) at the place `phase` of the interval: when
    /// the connection is rechecked once in step. After a restart, the memo's recorded next check
    /// is capped by this (a shortened interval takes effect at once, spread evenly).
    pub fn next_slot(&self, now: Timestamp, phase: f64) -> Timestamp {
        let period = self.period();
        let slot = Self::slot_on_or_after(now.as_second().saturating_add(1), period, phase);
        Timestamp::from_second(slot).unwrap_or(Timestamp::MAX)
    }

    /// The longest wait [`Policy::next_check`] makes: 1.1 intervals.
    pub fn longest_wait(&self) -> Duration {
        let period = self.period();
        Duration::from_secs((period + period / 10).unsigned_abs())
    }

    fn period(&self) -> i64 {
        i64::try_from(self.revalidate_every.as_secs())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// The first second at or after `t` at the place `phase` of intervals of `period` seconds
    /// counted from the Unix epoch.
    fn slot_on_or_after(t: i64, period: i64, phase: f64) -> i64 {
        let phase = if phase.is_finite() {
            phase.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let offset = ((phase * period as f64) as i64).clamp(0, period - 1);
        let slot = (t - offset)
            .div_euclid(period)
            .saturating_mul(period)
            .saturating_add(offset);
        if slot < t {
            slot.saturating_add(period)
        } else {
            slot
        }
    }

    /// Memo after a permanent or configuration failure: wait for a change.
    pub fn after_rejection(
        &self,
        previous: &Check,
        fingerprint: String,
        reason: &str,
        message: &str,
    ) -> Memo {
        Memo {
            fingerprint,
            outcome: Outcome::Rejected,
            next_check_at: None,
            check: Check::invalid(reason, message).remembering(previous.last_identity()),
        }
    }

    /// Memo after a transient failure: exponential backoff with jitter, honouring Retry-After.
    /// What was known before (`previous`'s check, else `known`) still stands.
    #[allow(clippy::too_many_arguments)]
    pub fn after_transient(
        &self,
        previous: Option<&Memo>,
        known: &Check,
        fingerprint: String,
        now: Timestamp,
        retry_after: Option<Duration>,
        jitter: f64,
        message: &str,
    ) -> Memo {
        let attempt = match previous {
            Some(Memo {
                fingerprint: f,
                outcome: Outcome::Unavailable { attempt },
                ..
            }) if *f == fingerprint => attempt.saturating_add(1),
            _ => 0,
        };
        let delay =
            crate::providers::retry_delay(attempt, retry_after, self.retry_base, self.retry_max, jitter);
        let before = previous.map(|m| &m.check).unwrap_or(known);
        // How long this has lasted and when the next try is: an outage and a typo'd host look the
        // same at first, but not after several attempts.
        let tries = attempt.saturating_add(1);
        Memo {
            fingerprint,
            outcome: Outcome::Unavailable { attempt },
            next_check_at: Some(plus(now, delay)),
            check: before.clone().unavailable(format!(
                "{message} ({tries} failed attempt{} in a row; next try in {}s)",
                if tries == 1 { "" } else { "s" },
                delay.as_secs().max(1)
            )),
        }
    }
}

/// A connection's place in every revalidation interval, in [0, 1), from its UID: evenly spread
/// over many connections, and the same in every process and after restarts.
pub fn phase(uid: &str) -> f64 {
    let d = ring::digest::digest(&ring::digest::SHA256, uid.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The memo of a connection the operator has no memory of (after a restart), from its status and
/// the session Secret's annotations: with a still-valid session nothing is called until it is due.
/// The recorded next check stands unless it is past at `now` (it is written at validations, not at
/// each recheck) or further than `longest` (the policy's longest wait: the interval was shortened);
/// then `latest` replaces it: when the current policy would check next ([`Policy::next_slot`], or
/// sooner for an access token about to expire), so checks spread over the interval instead of all
/// coming at the restart.
pub fn seed(
    status: Option<&crate::api::ConnectionStatus>,
    session_annotations: Option<&std::collections::BTreeMap<String, String>>,
    now: Timestamp,
    latest: Timestamp,
    longest: Duration,
) -> Memo {
    let check = Check::from_status(status);
    let authorized = matches!(check.known, Known::Valid(_))
        && status.is_some_and(|s| {
            crate::api::conditions::find(&s.conditions, crate::api::conditions::AUTHORIZED)
                .is_some_and(|c| c.status == "True")
        });
    let scheduled = session_annotations.filter(|_| authorized).and_then(|a| {
        Some((
            a.get(FINGERPRINT_ANNOTATION)?.clone(),
            a.get(NEXT_CHECK_ANNOTATION)?.parse::<Timestamp>().ok()?,
        ))
    });
    match scheduled {
        Some((fingerprint, next)) => Memo {
            fingerprint,
            outcome: Outcome::Authorized,
            // Kept while ahead and within the longest wait the policy makes (1.1 intervals), so a
            // restart calls no one early.
            next_check_at: Some(if next > now && next <= plus(now, longest) {
                next
            } else {
                latest
            }),
            check,
        },
        // Unknown inputs: validate now, keeping what the status says meanwhile.
        None => Memo {
            fingerprint: String::new(),
            outcome: Outcome::Rejected,
            next_check_at: None,
            check,
        },
    }
}

/// Whether a due recheck of unchanged, valid tokens must use the refresh token (a token request,
/// which may rotate it), or may ask who the access token held since `granted_at` belongs to. Due
/// when the grant time is unknown, `refresh_every` has passed since it (so an idle refresh token
/// does not expire under a "not used for N" policy), or its known expiry is within `refresh_margin`.
pub fn refresh_due(
    granted_at: Option<Timestamp>,
    expires_at: Option<Timestamp>,
    now: Timestamp,
    policy: &Policy,
) -> bool {
    let Some(granted) = granted_at else {
        return true;
    };
    if granted > now || plus(granted, policy.refresh_every) <= now {
        return true;
    }
    expires_at.is_some_and(|exp| {
        let margin = SignedDuration::try_from(policy.refresh_margin).unwrap_or(SignedDuration::ZERO);
        exp.saturating_sub(margin).unwrap_or(exp) <= now
    })
}

/// How long to wait before `due` from `now` (for the requeue).
pub fn wait(due: &Due, now: Timestamp) -> Option<Duration> {
    match due {
        Due::Now => Some(Duration::ZERO),
        Due::At(at) => Some(Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)),
        Due::OnChange => None,
    }
}

/// How long an Active connection's retriever may be down (it was ready, then turned unready: e.g.
/// the CRM refused its session) before the tokens are revalidated, and the least time between two
/// such revalidations of one connection.
pub const RETRIEVER_DOWN_GRACE: Duration = Duration::from_secs(60);

/// Whether a retriever that is down since `down_since` calls for a revalidation now (`Due::Now`),
/// later (`Due::At`), or not at all (`Due::OnChange`: it is not down). `last` is the previous
/// revalidation made for this reason.
pub fn retriever_down(down_since: Option<Timestamp>, last: Option<Timestamp>, now: Timestamp) -> Due {
    let Some(since) = down_since else {
        return Due::OnChange;
    };
    let mut at = plus(since, RETRIEVER_DOWN_GRACE);
    if let Some(last) = last {
        at = at.max(plus(last, RETRIEVER_DOWN_GRACE));
    }
    if at <= now { Due::Now } else { Due::At(at) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectionSpec, Provider, SalesforceSpec};

    #[test]
    fn a_new_revalidate_annotation_value_is_a_new_input() {
        let mut c =
            crate::api::Connection::new("c", ConnectionSpec::new("t", Provider::SalesforceProduction, "s"));
        let plain = fingerprint(&c, Some("x"));
        c.metadata.annotations = Some([("other".to_string(), "1".to_string())].into());
        assert_eq!(
            fingerprint(&c, Some("x")),
            plain,
            "other annotations are not inputs"
        );
        c.metadata.annotations = Some([(REVALIDATE_ANNOTATION.to_string(), "1".to_string())].into());
        let first = fingerprint(&c, Some("x"));
        assert_ne!(first, plain);
        c.metadata.annotations = Some([(REVALIDATE_ANNOTATION.to_string(), "2".to_string())].into());
        assert_ne!(fingerprint(&c, Some("x")), first);
    }

    #[test]
    fn a_refresh_is_due_after_refresh_every_near_expiry_or_when_the_grant_time_is_unknown() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let policy = Policy::default(); // refresh every 1 h, 5 min before a known expiry
        let granted = t("2026-11-28T10:00:00Z");
        let due =
            |now: &str, expires: Option<&str>| refresh_due(Some(granted), expires.map(t), t(now), &policy);
        assert!(
            !due("2026-11-28T10:15:00Z", None),
            "Salesforce: no expiry known, 15 min old"
        );
        assert!(due("2026-11-28T11:00:00Z", None), "an hour after the grant");
        assert!(!due("2026-11-28T10:15:00Z", Some("2026-11-28T11:05:00Z")));
        assert!(
            due("2026-11-28T10:15:00Z", Some("2026-11-28T10:19:00Z")),
            "expires within the margin"
        );
        assert!(
            refresh_due(None, None, t("2026-11-28T10:15:00Z"), &policy),
            "grant time unknown"
        );
        assert!(
            due("2026-11-28T09:00:00Z", None),
            "a grant time in the future is not trusted"
        );
        let always = Policy {
            refresh_every: Duration::ZERO,
            ..Policy::default()
        };
        assert!(
            refresh_due(Some(granted), None, granted, &always),
            "zero: every check refreshes"
        );
    }

    #[test]
    fn a_retriever_down_a_minute_revalidates_at_most_once_a_minute() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        let now = t("2026-11-28T10:00:00Z");
        assert_eq!(retriever_down(None, None, now), Due::OnChange);
        assert_eq!(
            retriever_down(Some(t("2026-11-28T09:59:30Z")), None, now),
            Due::At(t("2026-11-28T10:00:30Z"))
        );
        assert_eq!(
            retriever_down(Some(t("2026-11-28T09:59:00Z")), None, now),
            Due::Now
        );
        // Still down after a revalidation 20 s ago: the next one waits for the minute.
        assert_eq!(
            retriever_down(
                Some(t("2026-11-28T09:50:00Z")),
                Some(t("2026-11-28T09:59:40Z")),
                now
            ),
            Due::At(t("2026-11-28T10:00:40Z"))
        );
        assert_eq!(
            retriever_down(
                Some(t("2026-11-28T09:50:00Z")),
                Some(t("2026-11-28T09:58:00Z")),
                now
            ),
            Due::Now
        );
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn ident() -> Identity {
        Identity {
            remote_id: "00D".into(),
            instance_url: "https://x".into(),
            user: "u".into(),
        }
    }

    fn unknown() -> Check {
        Check::from_status(None)
    }

    fn conn() -> Connection {
        Connection::new(
            "c",
            ConnectionSpec::new("t", Provider::SalesforceProduction, "creds"),
        )
    }

    #[test]
    fn fingerprint_changes_with_secret_version_and_provider_settings_only() {
        let c = conn();
        let base = fingerprint(&c, Some("1"));
        assert_eq!(base, fingerprint(&c, Some("1")));
        assert_ne!(base, fingerprint(&c, Some("2")));
        assert_ne!(base, fingerprint(&c, None));
        let mut paused = c.clone();
        paused.spec.paused = true;
        paused.spec.display_name = Some("x".into());
        assert_eq!(
            base,
            fingerprint(&paused, Some("1")),
            "pausing or renaming needs no provider call"
        );
        let mut other_login = c.clone();
        other_login.spec.salesforce = Some(SalesforceSpec {
            login_url: Some("https://a.my.salesforce.com".into()),
        });
        assert_ne!(base, fingerprint(&other_login, Some("1")));
        let mut other_secret = c.clone();
        other_secret.spec.credentials_secret_ref.name = "other".into();
        assert_ne!(base, fingerprint(&other_secret, Some("1")));
    }

    #[test]
    fn no_memo_or_changed_inputs_call_now() {
        let p = Policy::default();
        assert_eq!(due(None, "f", at(0)), Due::Now);
        let m = p.after_success("f".into(), at(0), None, 0.5, ident());
        assert_eq!(due(Some(&m), "g", at(1)), Due::Now);
    }

    #[test]
    fn success_is_rechecked_after_0_9_to_1_1_intervals_moving_to_its_place() {
        let p = Policy::default();
        for phase in [0.0, 0.5, 0.999] {
            for validated in [0, 7, 450, 850, 901] {
                let m = p.after_success("f".into(), at(validated), None, phase, ident());
                let next = m.next_check_at.unwrap();
                assert!(
                    next >= at(validated + 810) && next <= at(validated + 990),
                    "{next}"
                );
                assert!(next <= plus(at(validated), p.longest_wait()));
                assert_eq!(due(Some(&m), "f", at(validated + 60)), Due::At(next));
                assert_eq!(due(Some(&m), "f", next), Due::Now);
                // Within five rechecks it is at its place, then exactly one interval apart.
                let mut t = next;
                for _ in 0..5 {
                    t = p.next_check(t, phase);
                }
                assert_eq!(
                    t.as_second().rem_euclid(900),
                    (phase * 900.0) as i64,
                    "{phase} {validated}"
                );
                assert_eq!(p.next_check(t, phase), at(t.as_second() + 900));
            }
        }
    }

    #[test]
    fn a_one_second_interval_rechecks_every_second() {
        let p = Policy {
            revalidate_every: Duration::from_secs(1),
            ..Policy::default()
        };
        for phase in [0.0, 0.7] {
            assert_eq!(p.next_check(at(10), phase), at(11));
            assert_eq!(p.next_slot(at(10), phase), at(11));
        }
    }

    #[test]
    fn connections_validated_together_spread_evenly_over_the_interval() {
        let p = Policy::default();
        // 900 connections validated in the same second: after six rechecks their checks fall in
        // the 15 one-minute buckets of the interval, none holding more than twice its share.
        let mut buckets = [0u32; 15];
        for i in 0..900 {
            let phase = phase(&format!("uid-{i}"));
            let mut t = at(0);
            for _ in 0..6 {
                t = p.next_check(t, phase);
            }
            buckets[(t.as_second().rem_euclid(900) / 60) as usize] += 1;
        }
        assert!(buckets.iter().all(|&b| (20..=120).contains(&b)), "{buckets:?}");
        // After a restart, the first checks are at each one's place: spread at once.
        let mut first = [0u32; 15];
        for i in 0..900 {
            let slot = p.next_slot(at(0), phase(&format!("uid-{i}")));
            assert!(slot > at(0) && slot <= at(900));
            first[(slot.as_second() / 60).min(14) as usize] += 1;
        }
        assert!(first.iter().all(|&b| (20..=120).contains(&b)), "{first:?}");
        assert_eq!(phase("uid-1"), phase("uid-1"), "the same place in every process");
    }

    #[test]
    fn success_refreshes_ahead_of_a_known_expiry() {
        let p = Policy::default();
        let m = p.after_success("f".into(), at(0), Some(at(600)), 0.5, ident());
        assert_eq!(m.next_check_at, Some(at(300)));
        let tiny = p.after_success("f".into(), at(0), Some(at(1)), 0.5, ident());
        assert_eq!(
            tiny.next_check_at,
            Some(at(5)),
            "never sooner than the retry base"
        );
    }

    #[test]
    fn rejection_waits_for_a_change() {
        let p = Policy::default();
        let m = p.after_rejection(&Check::valid(ident()), "f".into(), "TokenRevoked", "revoked");
        assert_eq!(due(Some(&m), "f", at(1_000_000)), Due::OnChange);
        assert_eq!(due(Some(&m), "changed", at(1)), Due::Now);
    }

    #[test]
    fn transient_failures_back_off_and_honour_retry_after() {
        let p = Policy::default();
        let m0 = p.after_transient(None, &unknown(), "f".into(), at(0), None, 0.5, "503");
        let m1 = p.after_transient(Some(&m0), &unknown(), "f".into(), at(0), None, 0.5, "503");
        let m2 = p.after_transient(Some(&m1), &unknown(), "f".into(), at(0), None, 0.5, "503");
        assert_eq!(m2.outcome, Outcome::Unavailable { attempt: 2 });
        assert!(m0.next_check_at < m2.next_check_at, "{m0:?} {m2:?}");
        let ra = p.after_transient(
            None,
            &unknown(),
            "f".into(),
            at(0),
            Some(Duration::from_secs(120)),
            0.0,
            "503",
        );
        assert!(ra.next_check_at.unwrap() >= at(120));
        let reset = p.after_transient(Some(&m2), &unknown(), "other".into(), at(0), None, 0.5, "503");
        assert_eq!(reset.outcome, Outcome::Unavailable { attempt: 0 });
    }

    #[test]
    fn an_hour_of_backoff_keeps_retrying_within_the_cap() {
        let p = Policy::default();
        let mut memo: Option<Memo> = None;
        let mut now = at(0);
        let mut calls = 0;
        while now < at(3600) {
            let m = p.after_transient(memo.as_ref(), &unknown(), "f".into(), now, None, 0.5, "503");
            let next = m.next_check_at.unwrap();
            assert!(
                next.duration_since(now) <= SignedDuration::from_secs(330),
                "capped near retry_max"
            );
            now = next;
            memo = Some(m);
            calls += 1;
        }
        assert!(calls > 5 && calls < 100, "{calls} retries in an hour");
    }

    #[test]
    fn wait_is_zero_now_and_none_on_change() {
        assert_eq!(wait(&Due::Now, at(0)), Some(Duration::ZERO));
        assert_eq!(wait(&Due::At(at(30)), at(0)), Some(Duration::from_secs(30)));
        assert_eq!(wait(&Due::OnChange, at(0)), None);
    }

    #[test]
    fn transient_failures_keep_what_was_known_and_flag_the_outage() {
        let p = Policy::default();
        let ok = p.after_success("f".into(), at(0), None, 0.5, ident());
        let down = p.after_transient(Some(&ok), &unknown(), "f".into(), at(900), None, 0.5, "HTTP 503");
        assert_eq!(down.check.known, Known::Valid(ident()));
        let wait_s = |m: &Memo, now: Timestamp| m.next_check_at.unwrap().as_second() - now.as_second();
        assert_eq!(
            down.check.unavailable.clone().unwrap(),
            format!(
                "HTTP 503 (1 failed attempt in a row; next try in {}s)",
                wait_s(&down, at(900))
            )
        );
        let again = p.after_transient(
            Some(&down),
            &unknown(),
            "f".into(),
            at(905),
            None,
            0.5,
            "HTTP 503",
        );
        assert_eq!(
            again.check.unavailable.clone().unwrap(),
            format!(
                "HTTP 503 (2 failed attempts in a row; next try in {}s)",
                wait_s(&again, at(905))
            )
        );
        assert!(wait_s(&again, at(905)) > wait_s(&down, at(900)), "backoff grows");
        let rejected = p.after_rejection(&down.check, "g".into(), "TokenRevoked", "revoked");
        assert_eq!(rejected.check.unavailable, None);
        assert_eq!(
            rejected.check.last_identity(),
            Some(&ident()),
            "the org stays known"
        );
    }

    const LONGEST: Duration = Duration::from_secs(990);

    #[test]
    fn seed_after_restart_uses_the_session_annotations_only_for_authorized_connections() {
        use crate::api::conditions::{AUTHORIZED, Desired, Status, merge};
        use crate::api::{ConnectionStatus, State};
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(0));
        let status = |state: State, auth: Status| ConnectionStatus {
            state: Some(state),
            remote_id: Some("00D".into()),
            instance_url: Some("https://x".into()),
            username: Some("u".into()),
            conditions: merge(&[], &[Desired::new(AUTHORIZED, auth, "r", "m")], None, &now),
            ..Default::default()
        };
        let annotations = std::collections::BTreeMap::from([
            (FINGERPRINT_ANNOTATION.to_string(), "f".to_string()),
            (NEXT_CHECK_ANNOTATION.to_string(), at(600).to_string()),
        ]);
        let active = seed(
            Some(&status(State::Active, Status::True)),
            Some(&annotations),
            at(0),
            at(900),
            LONGEST,
        );
        assert_eq!(
            due(Some(&active), "f", at(10)),
            Due::At(at(600)),
            "no provider call before it is due"
        );
        // Restarted with a shorter interval: its next slot comes first.
        let shortened = seed(
            Some(&status(State::Active, Status::True)),
            Some(&annotations),
            at(0),
            at(70),
            Duration::from_secs(66),
        );
        assert_eq!(due(Some(&shortened), "f", at(10)), Due::At(at(70)));
        // Recorded at the validation, passed since (rechecks do not rewrite it): at its next place,
        // not all at once.
        let passed = seed(
            Some(&status(State::Active, Status::True)),
            Some(&annotations),
            at(700),
            at(1000),
            LONGEST,
        );
        assert_eq!(due(Some(&passed), "f", at(700)), Due::At(at(1000)));
        assert_eq!(active.check.known, Known::Valid(ident()));
        let outage = seed(
            Some(&status(State::Active, Status::Unknown)),
            Some(&annotations),
            at(0),
            at(900),
            LONGEST,
        );
        assert_eq!(due(Some(&outage), "f", at(10)), Due::Now);
        let inactive = seed(
            Some(&status(State::Inactive, Status::False)),
            Some(&annotations),
            at(0),
            at(900),
            LONGEST,
        );
        assert_eq!(due(Some(&inactive), "f", at(10)), Due::Now);
        assert!(matches!(inactive.check.known, Known::Invalid { .. }));
        assert_eq!(
            due(Some(&seed(None, None, at(0), at(900), LONGEST)), "f", at(10)),
            Due::Now
        );
    }
}
