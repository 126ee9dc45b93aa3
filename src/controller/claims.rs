//! One org or environment belongs to one connection at a time: the pure rules of its `OrgClaim`.
//!
//! The claim is an object only the operator writes (`OrgClaim`, cluster-scoped, named by the org
//! key), so it cannot be forged through a Connection's status. The first connection whose tokens
//! prove valid for the org creates it; the API server lets exactly one create succeed. The holder
//! keeps it while it is Active or Paused, also against older connections. It passes on when the
//! holder is deleted, or when its tokens are refused (the holder then marks it released): the
//! oldest connection waiting for the org (in Conflict, with valid tokens) takes it, with a write
//! conditional on the version read, so two takers never both win. There is no grace period: a
//! connection whose tokens were refused has to be re-authorized anyway, and a waiting team should
//! not wait on it.
//!
//! The claim's scope is the operator's: across the cluster for an operator watching all namespaces
//! (one team per org in the cluster), one namespace for an operator installed for one namespace
//! (whose claims are named `<namespace>.<org key>`, so installs for different namespaces never
//! decide for each other).

use crate::api::{ClaimHolder, Connection, OrgClaimSpec, State};
use k8s_openapi::jiff::Timestamp;

/// The name of the OrgClaim of the org `key` for an operator watching `namespace` (all when
/// `None`).
pub fn claim_name(namespace: Option<&str>, key: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}.{key}"),
        None => key.to_string(),
    }
}

/// A connection competing for an org, as messages and the waiting order need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimant {
    pub namespace: String,
    pub name: String,
    pub team: String,
    pub created: Option<Timestamp>,
    pub remote_id: String,
}

impl Claimant {
    fn order_key(&self) -> (Option<Timestamp>, &str, &str) {
        // `None` sorts first; the API server always sets creationTimestamp, so that only happens in tests.
        (self.created, self.namespace.as_str(), self.name.as_str())
    }

    /// "namespace/name (team T)": how messages name a connection.
    pub fn describe(&self) -> String {
        format!("{}/{} (team {})", self.namespace, self.name, self.team)
    }

    /// The holder recorded in an OrgClaim, as a claimant of `remote_id`.
    pub fn of_holder(holder: &ClaimHolder, remote_id: &str) -> Self {
        Claimant {
            namespace: holder.namespace.clone(),
            name: holder.name.clone(),
            team: holder.team.clone(),
            created: None,
            remote_id: remote_id.to_string(),
        }
    }
}

/// The outcome for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This connection holds the org.
    Won,
    /// Another connection holds it.
    Lost { winner: Claimant },
}

/// True when `conn` has recorded its org (`status.remoteId`). Before that it holds no OrgClaim
/// and has won no org, so it creates its claim and the org's settings without reading first.
pub fn org_recorded(conn: &Connection) -> bool {
    conn.status.as_ref().is_some_and(|s| s.remote_id.is_some())
}

/// A connection waiting for an org: in Conflict with a known org.
pub fn waiting_claimant(conn: &Connection) -> Option<Claimant> {
    let status = conn.status.as_ref()?;
    if status.state != Some(State::Conflict) {
        return None;
    }
    Some(Claimant {
        namespace: conn.metadata.namespace.clone().unwrap_or_default(),
        name: conn.metadata.name.clone().unwrap_or_default(),
        team: conn.spec.team.clone(),
        created: conn.metadata.creation_timestamp.as_ref().map(|t| t.0),
        remote_id: status.remote_id.clone()?,
    })
}

/// True when a connection older than `me` waits for the same org (it goes first).
pub fn older_waiting<'a>(me: &Claimant, waiting: impl IntoIterator<Item = &'a Claimant>) -> bool {
    waiting.into_iter().any(|w| {
        w.remote_id == me.remote_id
            && !(w.namespace == me.namespace && w.name == me.name)
            && w.order_key() < me.order_key()
    })
}

/// What a connection with valid tokens for the org does about its OrgClaim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// None exists: create it (if another create wins meanwhile, read it and decide again).
    Create,
    /// Ours and held.
    Keep,
    /// Ours but released (our tokens were refused, and are valid again): hold it again.
    Reassert,
    /// Its holder is gone or released it, and no older connection waits: take it.
    Take,
    /// Another connection holds it (or goes first).
    Wait(ClaimHolder),
}

/// What is known when deciding: the OrgClaim read (if any), whether the connection it names
/// still exists (the same UID), and whether an older connection waits for the org.
#[derive(Clone, Copy, Debug)]
pub struct Seen<'a> {
    pub claim: Option<&'a OrgClaimSpec>,
    pub holder_exists: bool,
    pub older_waiting: bool,
}

pub fn next(me: &ClaimHolder, seen: Seen<'_>) -> Step {
    let Some(claim) = seen.claim else {
        return Step::Create;
    };
    if claim.holder.uid == me.uid {
        return if claim.held { Step::Keep } else { Step::Reassert };
    }
    if (claim.held && seen.holder_exists) || seen.older_waiting {
        return Step::Wait(claim.holder.clone());
    }
    Step::Take
}

/// True when a connection now Inactive releases the org: it holds the OrgClaim and still marks it
/// held.
pub fn releases(me_uid: &str, claim: Option<&OrgClaimSpec>) -> bool {
    claim.is_some_and(|c| c.held && c.holder.uid == me_uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(name: &str, uid: &str) -> ClaimHolder {
        ClaimHolder {
            namespace: "ns".into(),
            name: name.into(),
            uid: uid.into(),
            team: "t".into(),
        }
    }

    fn claim(name: &str, uid: &str, held: bool) -> OrgClaimSpec {
        OrgClaimSpec {
            holder: holder(name, uid),
            held,
        }
    }

    fn seen(claim: Option<&OrgClaimSpec>, holder_exists: bool, older_waiting: bool) -> Seen<'_> {
        Seen {
            claim,
            holder_exists,
            older_waiting,
        }
    }

    #[test]
    fn an_org_is_recorded_once_the_status_names_it() {
        let mut conn: Connection = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"team": "t", "provider": "SalesforceProduction", "credentialsSecretRef": {"name": "s"}}
        }))
        .unwrap();
        assert!(!org_recorded(&conn), "no status");
        conn.status = Some(Default::default());
        assert!(!org_recorded(&conn), "a status without an org");
        conn.status.as_mut().unwrap().remote_id = Some("00D000000000001AAA".into());
        assert!(org_recorded(&conn));
    }

    #[test]
    fn the_first_valid_connection_creates_the_claim_and_keeps_it() {
        let me = holder("a", "u1");
        assert_eq!(next(&me, seen(None, false, false)), Step::Create);
        let mine = claim("a", "u1", true);
        assert_eq!(next(&me, seen(Some(&mine), true, false)), Step::Keep);
        // Even an older connection waiting does not take a held claim.
        assert_eq!(next(&me, seen(Some(&mine), true, true)), Step::Keep);
        let released = claim("a", "u1", false);
        assert_eq!(next(&me, seen(Some(&released), true, false)), Step::Reassert);
    }

    #[test]
    fn a_held_claim_of_an_existing_holder_is_never_taken() {
        let me = holder("b", "u2");
        let theirs = claim("a", "u1", true);
        assert_eq!(
            next(&me, seen(Some(&theirs), true, false)),
            Step::Wait(theirs.holder.clone())
        );
    }

    #[test]
    fn a_deleted_or_released_holder_passes_the_claim_to_the_oldest_waiting() {
        let me = holder("b", "u2");
        let deleted = claim("a", "u1", true);
        assert_eq!(next(&me, seen(Some(&deleted), false, false)), Step::Take);
        let released = claim("a", "u1", false);
        assert_eq!(next(&me, seen(Some(&released), true, false)), Step::Take);
        assert_eq!(
            next(&me, seen(Some(&released), true, true)),
            Step::Wait(released.holder.clone()),
            "an older waiting connection goes first"
        );
        // A holder deleted and created again under the same name is another connection.
        let recreated = holder("a", "u3");
        assert_eq!(next(&recreated, seen(Some(&deleted), false, false)), Step::Take);
    }

    #[test]
    fn a_namespaced_operators_claims_are_its_namespaces() {
        assert_eq!(claim_name(None, "sf-00d000000000001aaa"), "sf-00d000000000001aaa");
        assert_eq!(
            claim_name(Some("sales"), "sf-00d000000000001aaa"),
            "sales.sf-00d000000000001aaa"
        );
    }

    #[test]
    fn only_the_holder_releases_and_only_once() {
        assert!(releases("u1", Some(&claim("a", "u1", true))));
        assert!(!releases("u1", Some(&claim("a", "u1", false))));
        assert!(!releases("u2", Some(&claim("a", "u1", true))));
        assert!(!releases("u1", None));
    }

    fn claimant(ns: &str, name: &str, created: i64, org: &str) -> Claimant {
        Claimant {
            namespace: ns.into(),
            name: name.into(),
            team: "t".into(),
            created: Some(Timestamp::from_second(created).unwrap()),
            remote_id: org.into(),
        }
    }

    #[test]
    fn the_oldest_waiting_connection_of_the_same_org_goes_first() {
        let me = claimant("b", "c2", 20, "ORG");
        assert!(older_waiting(&me, [&claimant("a", "c1", 10, "ORG")]));
        assert!(!older_waiting(&me, [&claimant("a", "c1", 30, "ORG")]));
        assert!(!older_waiting(&me, [&claimant("a", "c1", 10, "OTHER")]));
        assert!(!older_waiting(&me, [&me.clone()]), "not itself");
        // Same second: namespace, then name.
        assert!(older_waiting(&me, [&claimant("a", "c9", 20, "ORG")]));
        assert!(!older_waiting(&me, [&claimant("c", "c0", 20, "ORG")]));
    }
}
