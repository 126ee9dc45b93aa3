//! One org or environment belongs to one connection at a time: pure claim resolution.
//!
//! Every connection whose tokens are valid for an org (state Active, Paused or Conflict with that
//! `remoteId`) is a claimant. The oldest claimant wins — by creationTimestamp, then namespace, then
//! name, so the answer is the same whichever connection asks. Inactive and Pending connections do not
//! claim, so when the winner is deleted or goes inactive the next-oldest takes over.

use crate::api::{Connection, State};
use k8s_openapi::jiff::Timestamp;

/// What claim resolution needs to know about one connection.
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
}

/// The outcome of claim resolution for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This connection holds the org.
    Won,
    /// Another, older claimant holds it.
    Lost { winner: Claimant },
}

/// The claimant a peer connection represents, if any: it must have validated tokens for an org
/// (a `remoteId` in status) and be in a state that holds a claim.
pub fn claimant_of(conn: &Connection) -> Option<Claimant> {
    let status = conn.status.as_ref()?;
    let holds = matches!(
        status.state,
        Some(State::Active | State::Paused | State::Conflict)
    );
    if !holds {
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

/// Resolves `me`'s claim on `me.remote_id` against `peers` (other connections' claimants, in any
/// order; entries for `me` itself or for other orgs are ignored).
pub fn resolve<'a>(me: &Claimant, peers: impl IntoIterator<Item = &'a Claimant>) -> Claim {
    let winner = peers
        .into_iter()
        .filter(|p| p.remote_id == me.remote_id)
        .filter(|p| !(p.namespace == me.namespace && p.name == me.name))
        .min_by(|a, b| a.order_key().cmp(&b.order_key()));
    match winner {
        Some(w) if w.order_key() < me.order_key() => Claim::Lost { winner: w.clone() },
        _ => Claim::Won,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectionSpec, ConnectionStatus, Provider};

    fn at(secs: i64) -> Option<Timestamp> {
        Some(Timestamp::from_second(secs).unwrap())
    }

    fn claimant(ns: &str, name: &str, team: &str, created: i64, org: &str) -> Claimant {
        Claimant {
            namespace: ns.into(),
            name: name.into(),
            team: team.into(),
            created: at(created),
            remote_id: org.into(),
        }
    }

    #[test]
    fn alone_wins() {
        let me = claimant("a", "c1", "t1", 10, "ORG");
        assert_eq!(resolve(&me, []), Claim::Won);
    }

    #[test]
    fn older_connection_of_another_team_wins() {
        let me = claimant("b", "c2", "t2", 20, "ORG");
        let older = claimant("a", "c1", "t1", 10, "ORG");
        assert_eq!(
            resolve(&me, [&older]),
            Claim::Lost {
                winner: older.clone()
            }
        );
    }

    #[test]
    fn younger_peer_does_not_take_the_claim() {
        let me = claimant("a", "c1", "t1", 10, "ORG");
        let younger = claimant("b", "c2", "t2", 20, "ORG");
        assert_eq!(resolve(&me, [&younger]), Claim::Won);
    }

    #[test]
    fn older_connection_of_the_same_team_also_wins() {
        let me = claimant("a", "c2", "t1", 20, "ORG");
        let older = claimant("a", "c1", "t1", 10, "ORG");
        assert!(matches!(resolve(&me, [&older]), Claim::Lost { .. }));
    }

    #[test]
    fn other_orgs_are_ignored() {
        let me = claimant("b", "c2", "t2", 20, "ORG");
        let other = claimant("a", "c1", "t1", 10, "OTHER");
        assert_eq!(resolve(&me, [&other]), Claim::Won);
    }

    #[test]
    fn own_stale_entry_is_ignored() {
        let me = claimant("a", "c1", "t1", 20, "ORG");
        let stale_self = claimant("a", "c1", "t1", 10, "ORG");
        assert_eq!(resolve(&me, [&stale_self]), Claim::Won);
    }

    #[test]
    fn ties_on_creation_time_break_by_namespace_then_name() {
        let a = claimant("a", "z", "t1", 10, "ORG");
        let b = claimant("b", "a", "t2", 10, "ORG");
        assert_eq!(resolve(&b, [&a]), Claim::Lost { winner: a.clone() });
        assert_eq!(resolve(&a, [&b]), Claim::Won);
        let a2 = claimant("a", "y", "t3", 10, "ORG");
        assert_eq!(resolve(&a, [&a2]), Claim::Lost { winner: a2.clone() });
    }

    #[test]
    fn every_claimant_agrees_on_one_winner() {
        let all = [
            claimant("n1", "c", "t1", 30, "ORG"),
            claimant("n2", "c", "t2", 10, "ORG"),
            claimant("n3", "c", "t3", 20, "ORG"),
            claimant("n0", "c", "t0", 10, "ORG"),
        ];
        let winners: Vec<_> = all.iter().filter(|me| resolve(me, &all) == Claim::Won).collect();
        assert_eq!(winners.len(), 1);
        assert_eq!(winners[0].namespace, "n0");
    }

    fn conn(state: Option<State>, remote: Option<&str>) -> Connection {
        let mut c = Connection::new("c", ConnectionSpec::new("t", Provider::SalesforceProduction, "s"));
        c.metadata.namespace = Some("ns".into());
        c.status = Some(ConnectionStatus {
            state,
            remote_id: remote.map(String::from),
            ..Default::default()
        });
        c
    }

    #[test]
    fn only_connections_with_valid_tokens_claim() {
        for (state, claims) in [
            (Some(State::Active), true),
            (Some(State::Paused), true),
            (Some(State::Conflict), true),
            (Some(State::Inactive), false),
            (Some(State::Pending), false),
            (None, false),
        ] {
            assert_eq!(
                claimant_of(&conn(state, Some("ORG"))).is_some(),
                claims,
                "{state:?}"
            );
        }
        assert!(claimant_of(&conn(Some(State::Active), None)).is_none());
    }
}
