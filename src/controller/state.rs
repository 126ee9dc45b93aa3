//! The state machine: from what the operator knows about a connection's tokens to the desired
//! status. Pure.
//!
//! What is known comes from the operator's own memory of its last validation (see `schedule.rs`),
//! not from the status of the object being reconciled: the cached object can lag behind the
//! operator's own last write, and deciding from it would flap the state.

use super::children::RetrieverObserved;
use super::claims::Claim;
use crate::api::conditions::{self, Desired, Status};
use crate::api::{Connection, ConnectionStatus, Provider, RequiredAgreement, State};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Who the tokens act as, from a successful validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Salesforce org ID or Dynamics organization (environment) ID.
    pub remote_id: String,
    pub instance_url: String,
    pub user: String,
}

/// The last conclusion about a connection's tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known {
    /// The provider accepted them.
    Valid(Identity),
    /// A permanent or configuration failure: inactive until the inputs change.
    Invalid { reason: String, message: String },
    /// Never concluded (only transient failures so far, or not checked yet).
    Unknown,
    /// Not checked: the user must first do something else (accept the data processing
    /// agreement). Pending with this reason; nothing is validated, claimed or run.
    Waiting { reason: String, message: String },
}

/// What the validation step hands to [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The last conclusion (a transient failure does not change it).
    pub known: Known,
    /// Set while the provider cannot be reached: the message of the last transient failure.
    pub unavailable: Option<String>,
    /// The identity of the last success, kept through failures (an inactive connection still
    /// shows which org it was connected to), when `known` is not `Valid` (then it is that one:
    /// see [`Check::last_identity`]). Not kept twice: 10,000 memos' three strings.
    previous: Option<Identity>,
}

impl Check {
    pub fn valid(id: Identity) -> Self {
        Check::of(Known::Valid(id))
    }

    /// A check that concludes `known`, nothing else known.
    pub fn of(known: Known) -> Self {
        Check {
            known,
            unavailable: None,
            previous: None,
        }
    }

    /// The identity of the last success (the current one while the tokens are valid).
    pub fn last_identity(&self) -> Option<&Identity> {
        match &self.known {
            Known::Valid(id) => Some(id),
            _ => self.previous.as_ref(),
        }
    }

    /// This check, while the provider cannot be reached (`message`: the last failure's).
    pub fn unavailable(mut self, message: String) -> Self {
        self.unavailable = Some(message);
        self
    }

    /// This check, remembering `identity` as the last success's (unless it is valid itself).
    pub fn remembering(mut self, identity: Option<&Identity>) -> Self {
        self.previous = match self.known {
            Known::Valid(_) => None,
            _ => identity.cloned(),
        };
        self
    }

    pub fn invalid(reason: impl Into<String>, message: impl Into<String>) -> Self {
        Check::of(Known::Invalid {
            reason: reason.into(),
            message: message.into(),
        })
    }

    /// What is known about a connection the operator has no memory of (after a restart): its
    /// status, which is then fresh.
    pub fn from_status(status: Option<&ConnectionStatus>) -> Self {
        let Some(prior) = status else {
            return Check::of(Known::Unknown);
        };
        let last_identity = match (&prior.remote_id, &prior.instance_url) {
            (Some(remote_id), Some(instance_url)) => Some(Identity {
                remote_id: remote_id.clone(),
                instance_url: instance_url.clone(),
                user: prior.username.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        let known = match prior.state {
            Some(State::Active | State::Paused | State::Conflict) => match &last_identity {
                Some(id) => Known::Valid(id.clone()),
                None => Known::Unknown,
            },
            // Not a verdict on the tokens: validate again once the foreign child is gone.
            Some(State::Inactive) if prior.reason.as_deref() == Some(reasons::CHILD_CONFLICT) => {
                Known::Unknown
            }
            Some(State::Inactive) => Known::Invalid {
                reason: prior.reason.clone().unwrap_or_else(|| "Unknown".into()),
                message: prior
                    .message
                    .as_deref()
                    .map(|m| m.strip_prefix(INACTIVE_PREFIX).unwrap_or(m).to_string())
                    .unwrap_or_default(),
            },
            Some(State::Pending) | None => Known::Unknown,
        };
        Check::of(known).remembering(last_identity.as_ref())
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
    pub const RETRIEVER_AVAILABLE: &str = "RetrieverAvailable";
    pub const RETRIEVER_STARTING: &str = "RetrieverStarting";
    pub const HOLDING: &str = "Holding";
    /// A child object (`<name>-session`, `<name>-retriever`) exists and is not this connection's.
    pub const CHILD_CONFLICT: &str = "ChildConflict";
    /// The administrator requires a data processing agreement this connection has not accepted.
    pub const AGREEMENT_NOT_ACCEPTED: &str = "AgreementNotAccepted";
}

/// The check of a connection that has not accepted the required agreement, or `None` when none
/// is required or its version is accepted (pure).
pub fn agreement_check(conn: &Connection, required: Option<&RequiredAgreement>) -> Option<Check> {
    let required = required?;
    let accepted = conn.spec.agreement.as_ref().map(|a| a.version.as_str());
    if accepted == Some(required.version.as_str()) {
        return None;
    }
    let before = match accepted {
        Some(old) => format!(
            " (version {old} was accepted; the administrator now requires {})",
            required.version
        ),
        None => String::new(),
    };
    Some(Check::of(Known::Waiting {
        reason: reasons::AGREEMENT_NOT_ACCEPTED.to_string(),
        message: format!(
            "accept the {} version {} ({}) to connect{before}: `kubectl crm connect` asks, or set spec.agreement.version: \"{}\"",
            required.name, required.version, required.url, required.version
        ),
    }))
}

fn what(provider: Provider) -> &'static str {
    match provider {
        Provider::Dynamics365 => "environment",
        Provider::SalesforceProduction | Provider::SalesforceSandbox => "org",
    }
}

/// Condition types older versions wrote and this one no longer does (dropped from the status).
const OBSOLETE_CONDITIONS: [&str; 1] = [
    // Claimed a running retriever from the desired replica count alone; now `RetrieverReady`, from
    // the observed Deployment.
    "Retrieving",
];

/// Computes the desired status. `claim` is asked only when the tokens are valid; `retriever` is what
/// the cluster shows of the retriever Deployment (see [`super::children::observe_retriever`]). The
/// existing status is read only for the conditions' `lastTransitionTime`.
pub fn decide(
    conn: &Connection,
    check: &Check,
    claim: impl FnOnce(&Identity) -> Claim,
    retriever: &RetrieverObserved,
    now: &Time,
) -> ConnectionStatus {
    let prior_conditions: Vec<_> = conn
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|c| !OBSOLETE_CONDITIONS.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    let provider = conn.spec.provider;

    let authorized = match (&check.unavailable, &check.known) {
        (Some(message), _) => Desired::new(
            conditions::AUTHORIZED,
            Status::Unknown,
            reasons::PROVIDER_UNAVAILABLE,
            format!("could not reach the provider, will retry: {message}"),
        ),
        (None, Known::Valid(id)) => Desired::new(
            conditions::AUTHORIZED,
            Status::True,
            reasons::TOKENS_VALID,
            format!(
                "the provider accepted the tokens for {} {}",
                what(provider),
                id.remote_id
            ),
        ),
        // The full text is the status message; the condition says it in one line.
        (None, Known::Invalid { reason, message }) => Desired::new(
            conditions::AUTHORIZED,
            Status::False,
            reason.clone(),
            one_line(message),
        ),
        (None, Known::Unknown) => Desired::new(
            conditions::AUTHORIZED,
            Status::Unknown,
            reasons::AWAITING_VALIDATION,
            "the tokens have not been validated yet",
        ),
        (None, Known::Waiting { reason, message }) => Desired::new(
            conditions::AUTHORIZED,
            Status::Unknown,
            reason.clone(),
            format!("the tokens are not used yet: {}", one_line(message)),
        ),
    };

    let mut status = ConnectionStatus {
        observed_generation: conn.metadata.generation,
        ..Default::default()
    };
    let (state, reason, message) = match &check.known {
        Known::Invalid { reason, message } => (
            State::Inactive,
            reason.clone(),
            format!(
                "{INACTIVE_PREFIX}{}",
                message.strip_prefix(INACTIVE_PREFIX).unwrap_or(message)
            ),
        ),
        Known::Waiting { reason, message } => (State::Pending, reason.clone(), message.clone()),
        Known::Unknown => match &check.unavailable {
            Some(message) => (
                State::Pending,
                reasons::PROVIDER_UNAVAILABLE.to_string(),
                format!("waiting for the provider: {message}"),
            ),
            None => (
                State::Pending,
                reasons::AWAITING_VALIDATION.to_string(),
                "waiting for the first validation of the tokens".to_string(),
            ),
        },
        Known::Valid(id) => {
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
                            // Another tenant's names are theirs: only a holder in this namespace
                            // is named.
                            if conn.metadata.namespace.as_deref() == Some(winner.namespace.as_str()) {
                                winner.describe()
                            } else {
                                "a connection in another namespace (a cluster administrator can tell which)"
                                    .to_string()
                            },
                            what(provider)
                        ),
                    ),
                }
            }
        }
    };

    // Identity: from the last success; an inactive connection still shows which org it was
    // connected to (kept from its status).
    let identity = match &check.known {
        Known::Valid(id) => Some(id.clone()),
        Known::Invalid { .. } => check.last_identity().cloned(),
        Known::Unknown | Known::Waiting { .. } => None,
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

    // Ready repeats the state: one line of the status message (which `kubectl get -o wide` shows).
    let ready = match state {
        State::Active => Desired::new(
            conditions::READY,
            Status::True,
            reason.clone(),
            one_line(&message),
        ),
        State::Pending => Desired::new(
            conditions::READY,
            Status::Unknown,
            reason.clone(),
            one_line(&message),
        ),
        _ => Desired::new(
            conditions::READY,
            Status::False,
            reason.clone(),
            one_line(&message),
        ),
    };
    let retriever_ready = match (state, retriever) {
        (State::Active, RetrieverObserved::Available) => Desired::new(
            conditions::RETRIEVER_READY,
            Status::True,
            reasons::RETRIEVER_AVAILABLE,
            "the retriever pod is ready: it polls the org's job queue and claims queued jobs (see kubectl get jobruns)",
        ),
        (State::Active, RetrieverObserved::NotAvailable(why)) => Desired::new(
            conditions::RETRIEVER_READY,
            Status::False,
            reasons::RETRIEVER_STARTING,
            why.clone(),
        ),
        _ => Desired::new(
            conditions::RETRIEVER_READY,
            Status::False,
            reasons::HOLDING,
            format!("no retriever runs while the connection is {state}; queued jobs are holding"),
        ),
    };
    status.conditions = conditions::merge(
        &prior_conditions,
        &[authorized, ready, retriever_ready],
        conn.metadata.generation,
        now,
    );
    status.state = Some(state);
    status.reason = Some(reason);
    status.message = Some(message);
    status
}

/// The longest condition message [`one_line`] keeps.
const ONE_LINE_MAX: usize = 160;

/// A text in one line for a condition whose full text is the status message: its first sentence
/// (up to the first ". " or "; "), at most 160 characters, pointing at `status.message` when
/// something was left out. `kubectl describe` then shows the long text once.
pub fn one_line(text: &str) -> String {
    let text = text.trim();
    let end = [". ", "; "]
        .iter()
        .filter_map(|sep| text.find(sep))
        .min()
        .unwrap_or(text.len());
    let mut line: String = text[..end].trim_end_matches('.').to_string();
    if line.chars().count() > ONE_LINE_MAX {
        line = line.chars().take(ONE_LINE_MAX - 1).collect::<String>() + "…";
    }
    if line.len() < text.trim_end_matches('.').len() {
        line.push_str(" (status.message has the rest)");
    }
    line
}

/// What the Connection cache keeps of a status: the fields decisions read, nothing else.
/// [`Check::from_status`] reads the state, reason, identity and (of an inactive connection) the
/// message; [`decide`] the type, status and `lastTransitionTime` of its own conditions; the claims
/// and the index the state and remote ID; [`transition`] the state. Everything else (messages,
/// condition reasons and messages, the duplicated org or environment ID, the OrgSettings name,
/// the handled revalidation) is dropped: about 1 KiB of an Active connection's 1.3. Whether the
/// written status is already the desired one is told by [`digest`] instead of by comparing.
/// Conditions of other types (not written by the operator) are kept whole: [`decide`] carries
/// them over.
pub fn slim_status(status: ConnectionStatus) -> ConnectionStatus {
    let inactive = status.state == Some(State::Inactive);
    let ours = [
        conditions::AUTHORIZED,
        conditions::READY,
        conditions::RETRIEVER_READY,
    ];
    let conditions = status
        .conditions
        .into_iter()
        .map(|c| {
            if ours.contains(&c.type_.as_str()) {
                Condition {
                    reason: String::new(),
                    message: String::new(),
                    ..c
                }
            } else {
                c
            }
        })
        .collect();
    ConnectionStatus {
        state: status.state,
        reason: status.reason,
        message: status.message.filter(|_| inactive),
        remote_id: status.remote_id,
        instance_url: status.instance_url,
        username: status.username,
        conditions,
        ..Default::default()
    }
}

/// A 64-bit digest of a whole status (of its JSON: equal statuses serialize the same), so that
/// "the status written is already the desired one" needs no copy of the written status.
pub fn digest(status: &ConnectionStatus) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(&serde_json::to_vec(status).expect("a status serializes"));
    hasher.finish()
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
    use crate::api::ConnectionSpec;
    use crate::controller::claims::Claimant;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn conn(provider: Provider) -> Connection {
        let mut c = Connection::new("c", ConnectionSpec::new("sales", provider, "creds"));
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

    const AVAILABLE: &RetrieverObserved = &RetrieverObserved::Available;

    fn won(_: &Identity) -> Claim {
        Claim::Won
    }

    fn no_claim_asked(_: &Identity) -> Claim {
        panic!("claim must not be resolved without valid tokens")
    }

    fn revoked() -> Check {
        Check::invalid("TokenRevoked", "the refresh token was revoked").remembering(Some(&id()))
    }

    /// The provider is down; what was known before still stands.
    fn outage(before: Check) -> Check {
        before.unavailable("HTTP 503".into())
    }

    fn unknown() -> Check {
        Check::of(Known::Unknown)
    }

    /// Applies a check to a connection and stores the resulting status on it.
    fn step(
        c: &mut Connection,
        check: Check,
        claim: impl FnOnce(&Identity) -> Claim,
        now: i64,
    ) -> ConnectionStatus {
        let s = decide(c, &check, claim, AVAILABLE, &t(now));
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
        let s = decide(&c, &unknown(), no_claim_asked, AVAILABLE, &t(1));
        assert_eq!(s.state, Some(State::Pending));
        assert_eq!(s.reason.as_deref(), Some(reasons::AWAITING_VALIDATION));
        assert_eq!(cond(&s, conditions::READY), "Unknown");
    }

    #[test]
    fn valid_tokens_make_it_active_with_org_id() {
        let c = conn(Provider::SalesforceProduction);
        let s = decide(&c, &Check::valid(id()), won, AVAILABLE, &t(1));
        assert_eq!(s.state, Some(State::Active));
        assert_eq!(s.org_id.as_deref(), Some("00DORG"));
        assert_eq!(s.remote_id.as_deref(), Some("00DORG"));
        assert_eq!(s.environment_id, None);
        assert_eq!(s.username.as_deref(), Some("u@acme"));
        assert_eq!(s.observed_generation, Some(1));
        for c in [
            conditions::READY,
            conditions::AUTHORIZED,
            conditions::RETRIEVER_READY,
        ] {
            assert_eq!(cond(&s, c), "True", "{c}");
        }
    }

    #[test]
    fn dynamics_identity_goes_to_environment_id() {
        let c = conn(Provider::Dynamics365);
        let s = decide(&c, &Check::valid(id()), won, AVAILABLE, &t(1));
        assert_eq!(s.environment_id.as_deref(), Some("00DORG"));
        assert_eq!(s.org_id, None);
        assert!(s.message.unwrap().contains("environment"));
    }

    #[test]
    fn revoked_tokens_make_it_inactive_with_reason_and_keep_the_org() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, Check::valid(id()), won, 1);
        let s = step(&mut c, revoked(), no_claim_asked, 2);
        assert_eq!(s.state, Some(State::Inactive));
        assert_eq!(s.reason.as_deref(), Some("TokenRevoked"));
        assert_eq!(
            s.message.as_deref(),
            Some("Connection inactive: the refresh token was revoked")
        );
        assert_eq!(s.remote_id.as_deref(), Some("00DORG"));
        assert_eq!(cond(&s, conditions::AUTHORIZED), "False");
        assert_eq!(cond(&s, conditions::RETRIEVER_READY), "False");
    }

    #[test]
    fn repeated_rejection_is_identical_and_never_repeats_the_prefix() {
        let mut c = conn(Provider::SalesforceProduction);
        let first = step(&mut c, revoked(), no_claim_asked, 1);
        let second = step(&mut c, revoked(), no_claim_asked, 2);
        assert_eq!(first, second);
        let prefixed = Check::invalid("OrgIdChanged", "Connection inactive: the org changed");
        let s = decide(&c, &prefixed, no_claim_asked, AVAILABLE, &t(3));
        assert_eq!(s.message.as_deref(), Some("Connection inactive: the org changed"));
    }

    #[test]
    fn a_stale_status_does_not_change_the_decision() {
        // The cached object may still show an old status (or none) after the operator's own write:
        // the decision comes from the check alone.
        let mut fresh = conn(Provider::SalesforceProduction);
        let active = step(&mut fresh, Check::valid(id()), won, 1);
        let stale = conn(Provider::SalesforceProduction);
        let from_stale = decide(&stale, &Check::valid(id()), won, AVAILABLE, &t(1));
        assert_eq!(from_stale.state, active.state);
        assert_eq!(from_stale.remote_id, active.remote_id);
    }

    #[test]
    fn status_is_a_faithful_memory_after_a_restart() {
        for check in [Check::valid(id()), revoked(), unknown()] {
            let mut c = conn(Provider::SalesforceProduction);
            let s = step(&mut c, check.clone(), won, 1);
            let remembered = Check::from_status(Some(&s));
            assert_eq!(remembered.known, check.known, "{s:#?}");
            assert_eq!(decide(&c, &remembered, won, AVAILABLE, &t(2)), s);
        }
    }

    #[test]
    fn transient_failure_never_deactivates_an_active_connection() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, Check::valid(id()), won, 1);
        // An hour of failures, one every minute.
        for minute in 1..=60 {
            let s = step(&mut c, outage(Check::valid(id())), won, 1 + minute * 60);
            assert_eq!(s.state, Some(State::Active), "minute {minute}");
            assert_eq!(cond(&s, conditions::AUTHORIZED), "Unknown");
            assert_eq!(
                conditions::find(&s.conditions, conditions::AUTHORIZED)
                    .unwrap()
                    .reason,
                "ProviderUnavailable"
            );
            assert_eq!(cond(&s, conditions::RETRIEVER_READY), "True");
        }
    }

    #[test]
    fn transient_failure_keeps_inactive_and_pending_as_they_were() {
        let mut c = conn(Provider::SalesforceProduction);
        let s = step(&mut c, outage(unknown()), no_claim_asked, 1);
        assert_eq!(s.state, Some(State::Pending));
        assert_eq!(s.reason.as_deref(), Some(reasons::PROVIDER_UNAVAILABLE));
        step(&mut c, revoked(), no_claim_asked, 2);
        let s = step(&mut c, outage(revoked()), no_claim_asked, 3);
        assert_eq!(s.state, Some(State::Inactive));
        assert_eq!(s.reason.as_deref(), Some("TokenRevoked"));
    }

    #[test]
    fn reauthorization_after_inactive_makes_it_active_again() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, revoked(), no_claim_asked, 1);
        let before = c.status.clone();
        let s = step(&mut c, Check::valid(id()), won, 2);
        assert_eq!(s.state, Some(State::Active));
        assert_eq!(transition(before.as_ref(), &s).unwrap().reason, "Reauthorized");
    }

    #[test]
    fn paused_connection_is_paused_without_a_provider_call_and_resumes() {
        let mut c = conn(Provider::SalesforceProduction);
        step(&mut c, Check::valid(id()), won, 1);
        c.spec.paused = true;
        let before = c.status.clone();
        let s = step(&mut c, Check::valid(id()), no_claim_asked, 2);
        assert_eq!(s.state, Some(State::Paused));
        assert_eq!(cond(&s, conditions::RETRIEVER_READY), "False");
        assert_eq!(cond(&s, conditions::AUTHORIZED), "True");
        assert_eq!(transition(before.as_ref(), &s).unwrap().reason, "Paused");
        c.spec.paused = false;
        let before = c.status.clone();
        let s = step(&mut c, Check::valid(id()), won, 3);
        assert_eq!(s.state, Some(State::Active));
        assert_eq!(transition(before.as_ref(), &s).unwrap().reason, "Resumed");
    }

    #[test]
    fn paused_connection_whose_tokens_expire_shows_it() {
        let mut c = conn(Provider::SalesforceProduction);
        c.spec.paused = true;
        step(&mut c, Check::valid(id()), won, 1);
        let s = step(&mut c, revoked(), no_claim_asked, 2);
        assert_eq!(s.state, Some(State::Inactive));
        assert_eq!(cond(&s, conditions::AUTHORIZED), "False");
    }

    #[test]
    fn conditions_repeat_the_status_message_in_one_line_only() {
        assert_eq!(
            one_line("connected to org 00D as u@x"),
            "connected to org 00D as u@x"
        );
        assert_eq!(
            one_line(
                "Connection inactive: the refresh token was revoked. Re-authorize: update the Secret; or pause."
            ),
            "Connection inactive: the refresh token was revoked (status.message has the rest)"
        );
        let long = "x".repeat(300);
        let line = one_line(&long);
        assert_eq!(line.chars().count(), 160 + " (status.message has the rest)".len());
        let c = conn(Provider::SalesforceProduction);
        let check = Check::invalid(
            "TokenRevoked",
            "the refresh token was revoked. Re-authorize: put a new refresh token in the Secret.",
        )
        .remembering(Some(&id()));
        let s = decide(&c, &check, no_claim_asked, AVAILABLE, &t(1));
        let message = s.message.clone().unwrap();
        assert!(
            message.contains("Re-authorize"),
            "the status message keeps it all: {message}"
        );
        for type_ in [conditions::READY, conditions::AUTHORIZED] {
            let found = conditions::find(&s.conditions, type_).unwrap();
            assert!(!found.message.contains(". "), "{type_}: {}", found.message);
            assert!(
                found.message.len() < message.len(),
                "{type_}: {} vs {message}",
                found.message
            );
        }
    }

    #[test]
    fn losing_the_claim_is_conflict_naming_the_winner_in_the_same_namespace_only() {
        let c = conn(Provider::SalesforceProduction);
        let ns = c.metadata.namespace.clone().unwrap();
        let winner = Claimant {
            namespace: "other".into(),
            name: "first".into(),
            team: "marketing".into(),
            created: None,
            remote_id: "00DORG".into(),
        };
        let s = decide(
            &c,
            &Check::valid(id()),
            |_| Claim::Lost {
                winner: winner.clone(),
            },
            AVAILABLE,
            &t(1),
        );
        assert_eq!(s.state, Some(State::Conflict));
        assert_eq!(s.reason.as_deref(), Some(reasons::CLAIMED_BY_OTHER_TEAM));
        let msg = s.message.clone().unwrap();
        assert!(
            msg.contains("a connection in another namespace")
                && !msg.contains("first")
                && !msg.contains("marketing"),
            "another tenant's names stay theirs: {msg}"
        );
        assert_eq!(cond(&s, conditions::RETRIEVER_READY), "False");
        let neighbour = Claimant {
            namespace: ns.clone(),
            ..winner
        };
        let s = decide(
            &c,
            &Check::valid(id()),
            |_| Claim::Lost {
                winner: neighbour.clone(),
            },
            AVAILABLE,
            &t(1),
        );
        let msg = s.message.unwrap();
        assert!(msg.contains(&format!("{ns}/first (team marketing)")), "{msg}");
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
            &Check::valid(id()),
            |_| Claim::Lost {
                winner: winner.clone(),
            },
            AVAILABLE,
            &t(1),
        );
        assert_eq!(s.reason.as_deref(), Some(reasons::CLAIMED_BY_OLDER_CONNECTION));
    }

    fn retriever_condition(s: &ConnectionStatus) -> (&str, &str) {
        let c = conditions::find(&s.conditions, conditions::RETRIEVER_READY).expect("RetrieverReady");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn retriever_ready_follows_the_observed_deployment_while_active() {
        let starting =
            RetrieverObserved::NotAvailable("no retriever pod is ready yet (0 of 1 pods ready)".into());
        let mut c = conn(Provider::SalesforceProduction);
        let s = decide(&c, &Check::valid(id()), won, &starting, &t(1));
        assert_eq!(s.state, Some(State::Active));
        assert_eq!(retriever_condition(&s), ("False", reasons::RETRIEVER_STARTING));
        let message = &conditions::find(&s.conditions, conditions::RETRIEVER_READY)
            .unwrap()
            .message;
        assert!(message.contains("0 of 1 pods ready"), "{message}");
        c.status = Some(s);
        let s = decide(&c, &Check::valid(id()), won, AVAILABLE, &t(2));
        assert_eq!(retriever_condition(&s), ("True", reasons::RETRIEVER_AVAILABLE));
        let message = &conditions::find(&s.conditions, conditions::RETRIEVER_READY)
            .unwrap()
            .message;
        assert!(message.contains("polls the org's job queue"), "{message}");
    }

    #[test]
    fn retriever_ready_is_holding_whenever_the_connection_is_not_active() {
        // Even a Deployment still showing an available pod (about to be scaled down) is not claimed.
        let mut paused = conn(Provider::SalesforceProduction);
        paused.spec.paused = true;
        let cases = [
            decide(&paused, &Check::valid(id()), no_claim_asked, AVAILABLE, &t(1)),
            decide(
                &conn(Provider::SalesforceProduction),
                &revoked(),
                no_claim_asked,
                AVAILABLE,
                &t(1),
            ),
            decide(
                &conn(Provider::SalesforceProduction),
                &unknown(),
                no_claim_asked,
                AVAILABLE,
                &t(1),
            ),
        ];
        for s in &cases {
            assert_eq!(
                retriever_condition(s),
                ("False", reasons::HOLDING),
                "{:?}",
                s.state
            );
        }
    }

    #[test]
    fn the_obsolete_retrieving_condition_is_dropped() {
        let mut c = conn(Provider::SalesforceProduction);
        let mut s = decide(&c, &Check::valid(id()), won, AVAILABLE, &t(1));
        s.conditions
            .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Retrieving".into(),
                status: "True".into(),
                reason: "RetrieverEnabled".into(),
                message: "the job retriever is scaled to one replica".into(),
                observed_generation: Some(1),
                last_transition_time: t(1),
            });
        c.status = Some(s);
        let s = decide(&c, &Check::valid(id()), won, AVAILABLE, &t(2));
        assert!(conditions::find(&s.conditions, "Retrieving").is_none());
        assert_eq!(s.conditions.len(), 3);
    }

    #[test]
    fn identical_inputs_give_identical_status_at_a_later_time() {
        let mut c = conn(Provider::SalesforceProduction);
        let first = step(&mut c, Check::valid(id()), won, 1);
        let again = step(&mut c, Check::valid(id()), won, 1000);
        assert_eq!(first, again, "no timestamps may move when nothing changed");
    }

    #[test]
    fn a_slimmed_status_decides_as_the_whole_one_and_its_digest_tells_it_unchanged() {
        use crate::controller::claims::waiting_claimant;
        let winner = Claimant {
            namespace: "ns".into(),
            name: "first".into(),
            team: "marketing".into(),
            created: None,
            remote_id: "00DORG".into(),
        };
        let lost = |_: &Identity| Claim::Lost {
            winner: winner.clone(),
        };
        let starting = RetrieverObserved::NotAvailable("0 of 1 pods ready".into());
        let mut paused = conn(Provider::Dynamics365);
        paused.spec.paused = true;
        let agreement = RequiredAgreement {
            name: "DPA".into(),
            version: "2".into(),
            url: "https://example.com/dpa".into(),
        };
        let waiting = agreement_check(&paused, Some(&agreement)).unwrap();
        let child_conflict = Check::invalid(reasons::CHILD_CONFLICT, "Deployment c-retriever exists");
        // Statuses of every state, each as the operator writes it.
        let mut written: Vec<(Connection, ConnectionStatus)> = vec![];
        let mut c = conn(Provider::SalesforceProduction);
        written.push((c.clone(), step(&mut c, Check::valid(id()), won, 1)));
        let s = decide(&c, &Check::valid(id()), won, &starting, &t(2));
        written.push((c.clone(), s));
        written.push((c.clone(), step(&mut c, outage(Check::valid(id())), won, 3)));
        written.push((c.clone(), step(&mut c, revoked(), no_claim_asked, 4)));
        written.push((c.clone(), step(&mut c, child_conflict.clone(), no_claim_asked, 5)));
        written.push((c.clone(), step(&mut c, Check::valid(id()), lost, 6)));
        written.push((c.clone(), step(&mut c, unknown(), no_claim_asked, 7)));
        let mut p = paused.clone();
        written.push((p.clone(), step(&mut p, Check::valid(id()), no_claim_asked, 8)));
        written.push((p.clone(), step(&mut p, waiting.clone(), no_claim_asked, 9)));
        // A condition the operator does not write is carried over whole.
        let mut foreign = written[0].1.clone();
        foreign.conditions.push(Condition {
            type_: "Audited".into(),
            status: "True".into(),
            reason: "Checked".into(),
            message: "checked by the audit job".into(),
            observed_generation: None,
            last_transition_time: t(0),
        });
        written.push((written[0].0.clone(), foreign));
        let next_checks = [
            Check::valid(id()),
            outage(Check::valid(id())),
            revoked(),
            child_conflict,
            unknown(),
            waiting,
        ];
        for (conn, status) in written {
            let mut whole = conn.clone();
            whole.status = Some(status.clone());
            let mut slim = conn;
            slim.status = Some(slim_status(status.clone()));
            // The cache keeps it compacted, and gives the slim status back.
            let cached = super::super::cached::CachedConnection::from(whole.clone());
            assert_eq!(cached.to_connection(), slim, "{status:?}");
            assert_eq!(cached.status_digest(), Some(digest(&status)));
            let (full, small) = (whole.status.as_ref(), slim.status.as_ref());
            assert!(
                serde_json::to_vec(&small).unwrap().len() < serde_json::to_vec(&full).unwrap().len(),
                "{status:?}"
            );
            assert_eq!(Check::from_status(full), Check::from_status(small), "{status:?}");
            assert_eq!(waiting_claimant(&whole), waiting_claimant(&slim));
            for next in &next_checks {
                for retriever in [AVAILABLE, &starting] {
                    let (a, b) = (
                        decide(&whole, next, won, retriever, &t(100)),
                        decide(&slim, next, won, retriever, &t(100)),
                    );
                    assert_eq!(a, b, "after {status:?}, {next:?}");
                    assert_eq!(transition(full, &a), transition(small, &b));
                    assert_eq!(
                        digest(&a) == digest(&status),
                        a == status,
                        "the digest tells an unchanged status from a changed one"
                    );
                }
            }
        }
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

    fn dpa() -> RequiredAgreement {
        RequiredAgreement {
            name: "Data Processing Agreement".into(),
            version: "2026-01".into(),
            url: "https://example.com/dpa".into(),
        }
    }

    #[test]
    fn without_the_required_agreement_a_connection_is_pending_and_its_tokens_unused() {
        let c = conn(Provider::SalesforceProduction);
        assert!(
            agreement_check(&c, None).is_none(),
            "no agreement required: nothing to wait for"
        );
        let check = agreement_check(&c, Some(&dpa())).expect("not accepted");
        let status = decide(&c, &check, no_claim_asked, AVAILABLE, &t(10));
        assert_eq!(status.state, Some(State::Pending));
        assert_eq!(status.reason.as_deref(), Some(reasons::AGREEMENT_NOT_ACCEPTED));
        let message = status.message.unwrap();
        assert!(
            message.contains("version 2026-01") && message.contains("https://example.com/dpa"),
            "{message}"
        );
        assert!(status.remote_id.is_none());
        let retriever = status
            .conditions
            .iter()
            .find(|k| k.type_ == conditions::RETRIEVER_READY)
            .unwrap();
        assert_eq!(retriever.status, "False");

        let mut accepted = c.clone();
        accepted.spec.agreement = Some(crate::api::AgreementAcceptance {
            version: "2026-01".into(),
            accepted_by: Some("alice".into()),
            accepted_at: None,
        });
        assert!(agreement_check(&accepted, Some(&dpa())).is_none());
        // A new version must be accepted again, and the message says which was.
        let newer = RequiredAgreement {
            version: "2027-01".into(),
            ..dpa()
        };
        let Known::Waiting { message, .. } = agreement_check(&accepted, Some(&newer)).unwrap().known else {
            panic!("waiting")
        };
        assert!(message.contains("version 2026-01 was accepted"), "{message}");
    }
}
