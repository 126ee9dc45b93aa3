//! Condition helpers that keep status deterministic: `lastTransitionTime` moves only when a
//! condition's status changes, so a reconcile of an unchanged object produces an identical status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition type: the connection is doing what it is asked to do (Active, or Paused on request).
pub const READY: &str = "Ready";
/// Condition type: the tokens were accepted by the provider.
pub const AUTHORIZED: &str = "Authorized";
/// Condition type: the connection's retriever pod is ready (observed on its Deployment): it can read
/// the session and the CRM accepts it, so it polls the org's job queue and claims queued jobs.
pub const RETRIEVER_READY: &str = "RetrieverReady";

/// Condition status values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// A desired condition, without the bookkeeping fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: Status,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Returns `conditions` with `desired` merged in.
///
/// An existing condition of the same type keeps its `lastTransitionTime` when its status is
/// unchanged (reason and message may still be updated); otherwise the time becomes `now`.
/// Conditions of other types are kept, and the list stays sorted by type.
pub fn merge(
    existing: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing
        .iter()
        .filter(|c| !desired.iter().any(|d| d.type_ == c.type_))
        .cloned()
        .collect();
    for d in desired {
        let previous = existing.iter().find(|c| c.type_ == d.type_);
        let last_transition_time = match previous {
            Some(p) if p.status == d.status.as_str() => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        out.push(Condition {
            type_: d.type_.to_string(),
            status: d.status.as_str().to_string(),
            reason: d.reason.clone(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn authorized(status: Status, reason: &str) -> Desired {
        Desired::new(AUTHORIZED, status, reason, format!("{reason} message"))
    }

    #[test]
    fn new_condition_gets_now_as_transition_time() {
        let out = merge(&[], &[authorized(Status::True, "TokensValid")], Some(1), &t(100));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].last_transition_time, t(100));
        assert_eq!(out[0].status, "True");
        assert_eq!(out[0].observed_generation, Some(1));
    }

    #[test]
    fn unchanged_status_keeps_transition_time() {
        let first = merge(&[], &[authorized(Status::True, "TokensValid")], Some(1), &t(100));
        let second = merge(
            &first,
            &[authorized(Status::True, "TokensValid")],
            Some(1),
            &t(200),
        );
        assert_eq!(
            first, second,
            "an identical reconcile must produce an identical status"
        );
    }

    #[test]
    fn changed_reason_with_same_status_keeps_transition_time_but_updates_reason() {
        let first = merge(
            &[],
            &[authorized(Status::False, "TokenRevoked")],
            Some(1),
            &t(100),
        );
        let second = merge(
            &first,
            &[authorized(Status::False, "TokenExpired")],
            Some(2),
            &t(200),
        );
        assert_eq!(second[0].last_transition_time, t(100));
        assert_eq!(second[0].reason, "TokenExpired");
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn changed_status_moves_transition_time() {
        let first = merge(&[], &[authorized(Status::True, "TokensValid")], Some(1), &t(100));
        let second = merge(
            &first,
            &[authorized(Status::False, "TokenRevoked")],
            Some(1),
            &t(200),
        );
        assert_eq!(second[0].last_transition_time, t(200));
        assert_eq!(second[0].status, "False");
    }

    #[test]
    fn other_condition_types_are_kept_and_list_is_sorted_by_type() {
        let first = merge(
            &[],
            &[
                Desired::new(RETRIEVER_READY, Status::True, "RetrieverAvailable", "m"),
                Desired::new(READY, Status::True, "Active", "m"),
            ],
            Some(1),
            &t(100),
        );
        let second = merge(
            &first,
            &[authorized(Status::Unknown, "ProviderUnavailable")],
            Some(1),
            &t(200),
        );
        let types: Vec<_> = second.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, vec![AUTHORIZED, READY, RETRIEVER_READY]);
        assert_eq!(find(&second, READY).unwrap().last_transition_time, t(100));
    }
}
