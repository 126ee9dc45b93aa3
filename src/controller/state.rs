//! The state machine: from what the reconcile observed to the desired status. Pure.

use super::claims::Claim;
use crate::api::conditions::{self, Desired, Status};
use crate::api::{Connection, ConnectionStatus, Provider, State};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Who the tokens act as, from a successful validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Salesforce org ID or Dynamics organization (environment) ID.
    pub remote_id: String,
    pub instance_url: String,
    pub user: String,
}

/// The result of this reconcile's validation step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The provider accepted the tokens.
    Authorized(Identity),
    /// Permanent or configuration failure: the connection is inactive until the input changes.
    Rejected { reason: String, message: String },
    /// Transient failure: nothing is concluded, the previous state stands.
    Unavailable { reason: String, message: String },
    /// No provider call was due: the previous conclusion stands.
    Skipped,
}

/// What the state is based on: this reconcile's conclusion, or the one recorded in status.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Basis {
    Valid(Identity),
    Invalid { reason: String, message: String },
    Unknown,
}

fn prior_basis(prior: &ConnectionStatus) -> Basis {
    match prior.state {
        Some(State::Active | State::Paused | State::Conflict) => {
            match (&prior.remote_id, &prior.instance_url) {
                (Some(remote_id), Some(instance_url)) => Basis::Valid(Identity {
                    remote_id: remote_id.clone(),
                    instance_url: instance_url.clone(),
                    user: prior.username.clone().unwrap_or_default(),
                }),
                _ => Basis::Unknown,
            }
        }
        Some(State::Inactive) => Basis::Invalid {
            reason: prior.reason.clone().unwrap_or_else(|| "Unknown".into()),
            // Strip our own prefix so it is not repeated.
            message: prior
                .message
                .as_deref()
                .map(|m| m.strip_prefix(INACTIVE_PREFIX).unwrap_or(m).to_string())
                .unwrap_or_default(),
        },
        Some(State::Pending) | None => Basis::Unknown,
    }
}

const INACTIVE_PREFIX: &str = "Connection inactive: ";

/// Reasons the operator itself sets in `status.reason` (failure reasons come from the provider module).
pub mod reasons {
    pub const CONNECTED: &str = "Connected";
    pub const PAUSED: &str = "PausedBySpec";
    pub const AWAITING_VALIDATION: &str = "AwaitingValidation";
    pub const PROVIDER_UNAVAILABLE: &str = "ProviderUnavailable";
    pub const CLAIMED_BY_OTHER_TEAM: &str = "OrgClaimedByAnotherTeam";
    pub const CLAIMED_BY_OLDER_CONNECTION: &str = "OrgClaimedByOlderConnection";
    pub const TOKENS_VALID: &str = "TokensValid";
    pub const RETRIEVER_ENABLED: &str = "RetrieverEnabled";
    pub const HOLDING: &str = "Holding";
}

fn what(provider: Provider) -> &'static str {
    match provider {
        Provider::Dynamics365 => "environment",
        Provider::SalesforceProduction | Provider::SalesforceSandbox => "org",
    }
}

/// Computes the desired status. `claim` is asked only when the tokens are valid.
pub fn decide(
    conn: &Connection,
    check: &Check,
    claim: impl FnOnce(&Identity) -> Claim,
    now: &Time,
) -> ConnectionStatus {
    let prior = conn.status.clone().unwrap_or_default();
    let provider = conn.spec.provider;
    let basis = match check {
        Check::Authorized(id) => Basis::Valid(id.clone()),
        Check::Rejected { reason, message } => Basis::Invalid {
            reason: reason.clone(),
            message: message.clone(),
        },
        Check::Unavailable { .. } | Check::Skipped => prior_basis(&prior),
    };

    let authorized = match check {
        Check::Authorized(id) => Desired::new(
            conditions::AUTHORIZED,
            Status::True,
            reasons::TOKENS_VALID,
            format!(
                "the provider accepted the tokens for {} {}",
                what(provider),
                id.remote_id
            ),
        ),
        Check::Rejected { reason, message } => Desired::new(
            conditions::AUTHORIZED,
            Status::False,
            reason.clone(),
            message.clone(),
        ),
        Check::Unavailable { message, .. } => Desired::new(
            conditions::AUTHORIZED,
            Status::Unknown,
            reasons::PROVIDER_UNAVAILABLE,
            format!("could not reach the provider, will retry: {message}"),
        ),
        Check::Skipped => match conditions::find(&prior.conditions, conditions::AUTHORIZED) {
            Some(c) => Desired::new(
                conditions::AUTHORIZED,
                match c.status.as_str() {
                    "True" => Status::True,
                    "False" => Status::False,
                    _ => Status::Unknown,
                },
                c.reason.clone(),
                c.message.clone(),
            ),
            None => Desired::new(
                conditions::AUTHORIZED,
                Status::Unknown,
                reasons::AWAITING_VALIDATION,
                "the tokens have not been validated yet",
            ),
        },
    };

    let mut status = ConnectionStatus {
        observed_generation: conn.metadata.generation,
        ..Default::default()
    };
    let (state, reason, message) = match &basis {
        Basis::Invalid { reason, message } => (
            State::Inactive,
            reason.clone(),
            format!(
                "{INACTIVE_PREFIX}{}",
                message.strip_prefix(INACTIVE_PREFIX).unwrap_or(message)
            ),
        ),
        Basis::Unknown => match check {
            Check::Unavailable { message, .. } => (
                State::Pending,
                reasons::PROVIDER_UNAVAILABLE.to_string(),
                format!("waiting for the provider: {message}"),
            ),
            // Nothing new was learned: keep what the last reconcile said.
            Check::Skipped if prior.state == Some(State::Pending) && prior.reason.is_some() => (
                State::Pending,
                prior.reason.clone().unwrap_or_default(),
                prior.message.clone().unwrap_or_default(),
            ),
            _ => (
                State::Pending,
                reasons::AWAITING_VALIDATION.to_string(),
                "waiting for the first validation of the tokens".to_string(),
            ),
        },
        Basis::Valid(id) => {
            if conn.spec.paused {
                (
                    State::Paused,
                    reasons::PAUSED.to_string(),
                    "paused (spec.paused is true): no jobs are retrieved and queued jobs are holding"
                        .to_string(),
                )
            } else {
                match claim(id) {
                    Claim::Won => (
                        State::Active,
                        reasons::CONNECTED.to_string(),
                        format!("connected to {} {} as {}", what(provider), id.remote_id, id.user),
                    ),
                    Claim::Lost { winner } => (
                        State::Conflict,
                        if winner.team == conn.spec.team {
                            reasons::CLAIMED_BY_OLDER_CONNECTION
                        } else {
                            reasons::CLAIMED_BY_OTHER_TEAM
                        }
                        .to_string(),
                        format!(
                            "{} {} is already connected by {}; an {} can be connected to one team only",
                            what(provider),
                            id.remote_id,
                            winner.describe(),
                            what(provider)
                        ),
                    ),
                }
            }
        }
    };

    // Identity: fresh from the provider, or kept from before (an inactive connection still shows
    // which org it was connected to).
    let identity = match &basis {
        Basis::Valid(id) => Some(id.clone()),
        Basis::Invalid { .. } => prior.remote_id.clone().map(|remote_id| Identity {
            remote_id,
            instance_url: prior.instance_url.clone().unwrap_or_default(),
            user: prior.username.clone().unwrap_or_default(),
        }),
        Basis::Unknown => None,
    };
    if let Some(id) = identity {
        match provider {
            Provider::Dynamics365 => status.environment_id = Some(id.remote_id.clone()),
            _ => status.org_id = Some(id.remote_id.clone()),
        }
        status.remote_id = Some(id.remote_id);
        status.instance_url = Some(id.instance_url).filter(|s| !s.is_empty());
        status.username = Some(id.user).filter(|s| !s.is_empty());
    }

    let ready = match state {
        State::Active => Desired::new(conditions::READY, Status::True, reason.clone(), message.clone()),
        State::Pending => Desired::new(
            conditions::READY,
            Status::Unknown,
            reason.clone(),
            message.clone(),
        ),
        _ => Desired::new(conditions::READY, Status::False, reason.clone(), message.clone()),
    };
    let retrieving = if state == State::Active {
        Desired::new(
            conditions::RETRIEVING,
            Status::True,
            reasons::RETRIEVER_ENABLED,
            "the job retriever is scaled to one replica",
        )
    } else {
        Desired::new(
            conditions::RETRIEVING,
            Status::False,
            reasons::HOLDING,
            format!("no jobs are retrieved while the connection is {state}; queued jobs are holding"),
        )
    };
    status.conditions = conditions::merge(
        &prior.conditions,
        &[authorized, ready, retrieving],
        conn.metadata.generation,
        now,
    );
    status.state = Some(state);
    status.reason = Some(reason);
    status.message = Some(message);
    status
}

/// An event to publish for a state transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// The event for going from `before` to `after`, if the state changed.
pub fn transition(before: Option<&ConnectionStatus>, after: &ConnectionStatus) -> Option<Transition> {
    let old = before.and_then(|s| s.state);
    let new = after.state?;
    if old == Some(new) {
        return None;
    }
    let note = after.message.clone().unwrap_or_default();
    let (warning, reason) = match (old, new) {
        (_, State::Pending) => return None,
        (Some(State::Inactive), State::Active) => (false, "Reauthorized"),
        (Some(State::Paused), State::Active) => (false, "Resumed"),
        (_, State::Active) => (false, "Activated"),
        (_, State::Inactive) => (true, "Deactivated"),
        (_, State::Paused) => (false, "Paused"),
        (_, State::Conflict) => (true, "Conflict"),
    };
    Some(Transition {
        warning,
        reason,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectionSpec, SecretRef};
    use crate::controller::claims::Claimant;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn conn(provider: Provider) -> Connection {
        let mut c = Connection::new(
            "c",
            ConnectionSpec {
                team: "sales".into(),
                provider,
                salesforce: None,
                dynamics: None,
                credentials_secret_ref: SecretRef { name: "creds".into() },
                display_name: None,
                description: None,
                paused: false,
            },
        );
        c.metadata.namespace = Some("ns".into());
        c.metadata.generation = Some(1);
        c
    }

    fn id() -> Identity {
        Identity {
            remote_id: "00DORG".into(),
            instance_url: "https://acme.my.salesforce.com".into(),
            user: "u@acme".into(),
        }
    }

    fn won(_: &Identity) -> Claim {
        Claim::Won
    }

    fn no_claim_asked(_: &Identity) -> Claim {
        panic!("claim must not be resolved without valid tokens")
    }

    fn revoked() -> Check {
        Check::Rejected {
            reason: "TokenRevoked".into(),
            message: "the refresh token was revoked".into(),
        }
    }

    fn outage() -> Check {
        Check::Unavailable {
            reason: "ProviderUnavailable".into(),
            message: "HTTP 503".into(),
        }
    }

    /// Applies a check to a connection and stores the resulting status on it.
    fn step(
        c: &mut Connection,
        check: Check,
        claim: impl FnOnce(&Identity) -> Claim,
        now: i64,
    ) -> ConnectionStatus {
        let s = decide(c, &check, claim, &t(now));
        c.status = Some(s.clone());
        s
    }

    fn cond<'a>(s: &'a ConnectionStatus, type_: &str) -> &'a str {
        conditions::find(&s.conditions, type_)
            .map(|c| c.status.as_str())
            .unwrap_or("missing")
    }

    #[test]
    fn new_connection_without_a_check_is_pending() {
        let c = conn(Provider::SalesforceProduction);
        let s = decide(&c, &Check::Skipped, no_claim_asked, &t(1));
        assert_eq!(s.state, Some(State::Pending));
        assert_eq!(s.reason.as_deref(), Some(reasons::AWAITING_VALIDATION));
        assert_eq!(cond(&s, conditions::READY), "Unknown");
    }

    #[test]
    fn valid_tokens_make_it_active_with_org_id() {
        let c = conn(Provider::SalesforceProduction);
        let s = decide(&c, &Check::Authorized(id()), won, &t(1));
        assert_eq!(s.state, Some(State::Active));
        assert_eq!(s.org_id.as_deref(), Some("00DORG"));
        assert_eq!(s.remote_id.as_deref(), Some("00DORG"));
        assert_eq!(s.environment_id, None);
        assert_eq!(s.username.as_deref(), Some("u@acme"));
        assert_eq!(s.observed_generation, Some(1));
        for c in [conditions::READY, conditions::AUTHORIZED, conditions::RETRIEVING] {
            assert_eq!(cond(&s, c), "True", "{c}");
        }
    }

    #[test]
    fn dynamics_identity_goes_to_environment_id() {
        let c = conn(Provider::Dynamics365);
        let s = decide(&c, &Check::Authorized(id()), won, &t(1));
        assert_eq!(s.environment_id.as_deref(), Some("00DORG"));
        assert_eq!(s.org_id, None);
        assert!(s.message.unwrap().contains("environment"));
    }

    #[test]
    fn revoked_tokens_make_it_inactive_with_reason_and_keep_the_org() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, Check::Authorized(id()), won, 1);
        let s = step(&mut c, revoked(), no_claim_asked, 2);
        assert_eq!(s.state, Some(State::Inactive));
        assert_eq!(s.reason.as_deref(), Some("TokenRevoked"));
        assert_eq!(
            s.message.as_deref(),
            Some("Connection inactive: the refresh token was revoked")
        );
        assert_eq!(s.remote_id.as_deref(), Some("00DORG"));
        assert_eq!(cond(&s, conditions::AUTHORIZED), "False");
        assert_eq!(cond(&s, conditions::RETRIEVING), "False");
    }

    #[test]
    fn skipped_check_on_inactive_keeps_message_without_repeating_prefix() {
        let mut c = conn(Provider::SalesforceProduction);
        let first = step(&mut c, revoked(), no_claim_asked, 1);
        let second = step(&mut c, Check::Skipped, no_claim_asked, 2);
        assert_eq!(first, second);
    }

    #[test]
    fn transient_failure_never_deactivates_an_active_connection() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, Check::Authorized(id()), won, 1);
        // An hour of failures, one every minute.
        for minute in 1..=60 {
            let s = step(&mut c, outage(), won, 1 + minute * 60);
            assert_eq!(s.state, Some(State::Active), "minute {minute}");
            assert_eq!(cond(&s, conditions::AUTHORIZED), "Unknown");
            assert_eq!(
                conditions::find(&s.conditions, conditions::AUTHORIZED)
                    .unwrap()
                    .reason,
                "ProviderUnavailable"
            );
            assert_eq!(cond(&s, conditions::RETRIEVING), "True");
        }
    }

    #[test]
    fn transient_failure_keeps_inactive_and_pending_as_they_were() {
        let mut c = conn(Provider::SalesforceProduction);
        let s = step(&mut c, outage(), no_claim_asked, 1);
        assert_eq!(s.state, Some(State::Pending));
        assert_eq!(s.reason.as_deref(), Some(reasons::PROVIDER_UNAVAILABLE));
        step(&mut c, revoked(), no_claim_asked, 2);
        let s = step(&mut c, outage(), no_claim_asked, 3);
        assert_eq!(s.state, Some(State::Inactive));
        assert_eq!(s.reason.as_deref(), Some("TokenRevoked"));
    }

    #[test]
    fn skipped_check_while_pending_on_an_outage_keeps_saying_so() {
        let mut c = conn(Provider::SalesforceProduction);
        let during = step(&mut c, outage(), no_claim_asked, 1);
        let later = step(&mut c, Check::Skipped, no_claim_asked, 2);
        assert_eq!(during, later);
        assert_eq!(later.reason.as_deref(), Some(reasons::PROVIDER_UNAVAILABLE));
    }

    #[test]
    fn skipped_check_after_outage_keeps_authorized_unknown() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, Check::Authorized(id()), won, 1);
        let during = step(&mut c, outage(), won, 2);
        let later = step(&mut c, Check::Skipped, won, 3);
        assert_eq!(during, later);
    }

    #[test]
    fn reauthorization_after_inactive_makes_it_active_again() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, revoked(), no_claim_asked, 1);
        let before = c.status.clone();
        let s = step(&mut c, Check::Authorized(id()), won, 2);
        assert_eq!(s.state, Some(State::Active));
        assert_eq!(transition(before.as_ref(), &s).unwrap().reason, "Reauthorized");
    }

    #[test]
    fn paused_connection_is_paused_without_a_provider_call_and_resumes() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, Check::Authorized(id()), won, 1);
        c.spec.paused = true;
        let before = c.status.clone();
        let s = step(&mut c, Check::Skipped, no_claim_asked, 2);
        assert_eq!(s.state, Some(State::Paused));
        assert_eq!(cond(&s, conditions::RETRIEVING), "False");
        assert_eq!(cond(&s, conditions::AUTHORIZED), "True");
        assert_eq!(transition(before.as_ref(), &s).unwrap().reason, "Paused");
        c.spec.paused = false;
        let before = c.status.clone();
        let s = step(&mut c, Check::Skipped, won, 3);
        assert_eq!(s.state, Some(State::Active));
        assert_eq!(transition(before.as_ref(), &s).unwrap().reason, "Resumed");
    }

    #[test]
    fn paused_connection_whose_tokens_expire_shows_it() {
        let mut c = conn(Provider::SalesforceProduction);
        c.spec.paused = true;
        step(&mut c, Check::Authorized(id()), won, 1);
        let s = step(&mut c, revoked(), no_claim_asked, 2);
        assert_eq!(s.state, Some(State::Inactive));
        assert_eq!(cond(&s, conditions::AUTHORIZED), "False");
    }

    #[test]
    fn losing_the_claim_is_conflict_naming_the_winner() {
        let c = conn(Provider::SalesforceProduction);
        let winner = Claimant {
            namespace: "other".into(),
            name: "first".into(),
            team: "marketing".into(),
            created: None,
            remote_id: "00DORG".into(),
        };
        let s = decide(
            &c,
            &Check::Authorized(id()),
            |_| Claim::Lost {
                winner: winner.clone(),
            },
            &t(1),
        );
        assert_eq!(s.state, Some(State::Conflict));
        assert_eq!(s.reason.as_deref(), Some(reasons::CLAIMED_BY_OTHER_TEAM));
        let msg = s.message.clone().unwrap();
        assert!(msg.contains("other/first (team marketing)"), "{msg}");
        assert_eq!(cond(&s, conditions::RETRIEVING), "False");
    }

    #[test]
    fn losing_to_the_same_team_says_older_connection() {
        let c = conn(Provider::SalesforceProduction);
        let winner = Claimant {
            namespace: "ns".into(),
            name: "first".into(),
            team: "sales".into(),
            created: None,
            remote_id: "00DORG".into(),
        };
        let s = decide(
            &c,
            &Check::Authorized(id()),
            |_| Claim::Lost {
                winner: winner.clone(),
            },
            &t(1),
        );
        assert_eq!(s.reason.as_deref(), Some(reasons::CLAIMED_BY_OLDER_CONNECTION));
    }

    #[test]
    fn identical_inputs_give_identical_status_at_a_later_time() {
        let mut c = conn(Provider::SalesforceProduction);
        let first = step(&mut c, Check::Authorized(id()), won, 1);
        let again = step(&mut c, Check::Authorized(id()), won, 1000);
        assert_eq!(first, again, "no timestamps may move when nothing changed");
        let skipped = step(&mut c, Check::Skipped, won, 2000);
        assert_eq!(first, skipped);
    }

    #[test]
    fn transitions_produce_events_only_on_state_changes() {
        let active = ConnectionStatus {
            state: Some(State::Active),
            ..Default::default()
        };
        let inactive = ConnectionStatus {
            state: Some(State::Inactive),
            ..Default::default()
        };
        let conflict = ConnectionStatus {
            state: Some(State::Conflict),
            ..Default::default()
        };
        let pending = ConnectionStatus {
            state: Some(State::Pending),
            ..Default::default()
        };
        assert_eq!(transition(Some(&active), &active), None);
        assert_eq!(transition(None, &pending), None);
        assert_eq!(transition(None, &active).unwrap().reason, "Activated");
        assert_eq!(transition(Some(&conflict), &active).unwrap().reason, "Activated");
        let d = transition(Some(&active), &inactive).unwrap();
        assert!(d.warning);
        assert_eq!(d.reason, "Deactivated");
        assert_eq!(transition(Some(&active), &conflict).unwrap().reason, "Conflict");
    }
}
