//! Where the live refresh token lives, and the decisions about it. Pure: no client here.
//!
//! - The user's credentials Secret is a **seed**: the operator reads it (and may add the watch
//!   label), and never writes its data. GitOps tools, External Secrets or Sealed Secrets may
//!   rewrite it at any time; only a change of its token keys (its [`seed_hash`]) counts as a
//!   re-authorization.
//! - The **live** refresh token is in `<name>-token`, a Secret the operator owns (ownerReference to
//!   the Connection). Besides the token it holds the hash of the seed it came from and, while a
//!   refresh is in flight, a refresh **intent** (holder, hash of the token being refreshed,
//!   deadline): a compare-and-swap fence, so a second refresher waits, and a refresh that never
//!   finished is reported instead of retried blindly.
//! - A seed's token replaces the live one only once the provider accepted it: a bad seed never
//!   destroys a good live token.

use crate::api::Connection;
use crate::providers::{Credentials, secret_text};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Label on `<name>-token` Secrets.
pub const TOKEN_LABEL: &str = "crmconnect.io/token";
/// Annotation on `<name>-token`: the [`seed_hash`] of the seed its token descends from.
pub const SEED_HASH_ANNOTATION: &str = "crmconnect.io/seed-hash";
/// Annotation on `<name>-token` while a refresh is in flight: an [`Intent`] as JSON.
pub const INTENT_ANNOTATION: &str = "crmconnect.io/refresh-intent";
/// The key of the live refresh token in `<name>-token`.
pub const REFRESH_TOKEN_KEY: &str = Credentials::REFRESH_TOKEN;

/// `<name>-token`.
pub fn token_secret_name(conn: &Connection) -> String {
    format!("{}-token", conn.metadata.name.as_deref().unwrap_or_default())
}

fn digest(domain: &str, parts: &[(&str, Option<&str>)]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(domain.as_bytes());
    for (key, value) in parts {
        // Length-prefixed, so no two inputs give the same byte stream.
        for field in [Some(*key), *value] {
            match field {
                Some(v) => {
                    ctx.update(&(v.len() as u64).to_be_bytes());
                    ctx.update(v.as_bytes());
                }
                None => ctx.update(&u64::MAX.to_be_bytes()),
            }
        }
    }
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The hash of a seed: its token keys as the operator reads them (trimmed). Labels, annotations,
/// other keys and a trailing newline do not count, so a GitOps re-apply or an External Secrets
/// refresh of the same values is not a re-authorization. A hash of high-entropy tokens reveals
/// nothing about them.
pub fn seed_hash(seed: &Credentials) -> String {
    digest(
        "crmconnect.io/seed/v1",
        &[
            (
                Credentials::REFRESH_TOKEN,
                Some(seed.refresh_token.expose_secret()),
            ),
            (Credentials::CLIENT_ID, Some(&seed.client_id)),
            (
                Credentials::CLIENT_SECRET,
                seed.client_secret.as_ref().map(|s| s.expose_secret()),
            ),
            (
                Credentials::ACCESS_TOKEN,
                seed.access_token.as_ref().map(|s| s.expose_secret()),
            ),
        ],
    )
}

/// The hash of one refresh token (for intents and the journal: never the token itself).
pub fn token_hash(token: &str) -> String {
    digest("crmconnect.io/token/v1", &[("refresh_token", Some(token))])
}

/// A refresh in flight, recorded on `<name>-token` before the token request is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// Who refreshes: the operator process (pod name and a per-process nonce).
    pub holder: String,
    /// [`token_hash`] of the refresh token being sent.
    pub token: String,
    /// After this, a holder that has not finished is presumed dead.
    pub deadline: Timestamp,
}

/// What `<name>-token` holds.
#[derive(Clone)]
pub struct Live {
    pub refresh_token: SecretString,
    /// The seed this token descends from (absent: written by hand, treated as from another seed).
    pub seed_hash: Option<String>,
    pub intent: Option<Intent>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("seed_hash", &self.seed_hash)
            .field("intent", &self.intent)
            .finish_non_exhaustive()
    }
}

/// Reads `<name>-token`. `None`: it holds no usable token (then the seed is used, as on first use).
/// An unreadable intent annotation counts as none.
pub fn read_live(secret: &Secret) -> Option<Live> {
    let token = secret
        .data
        .as_ref()?
        .get(REFRESH_TOKEN_KEY)
        .and_then(|b| secret_text(&b.0).ok().flatten())?;
    let annotations = secret.metadata.annotations.as_ref();
    Some(Live {
        refresh_token: SecretString::from(token),
        seed_hash: annotations.and_then(|a| a.get(SEED_HASH_ANNOTATION)).cloned(),
        intent: annotations
            .and_then(|a| a.get(INTENT_ANNOTATION))
            .and_then(|v| serde_json::from_str(v).ok()),
    })
}

/// What to do about the refresh token before calling the provider.
#[derive(Debug)]
pub enum Plan {
    /// Refresh with `token`. `from_seed`: the seed's token (first use, a re-authorization, or a
    /// migration); it replaces the live one only once the provider accepted it.
    Refresh { token: SecretString, from_seed: bool },
    /// Another holder's refresh of this token is in flight: look again at its deadline.
    Wait { holder: String, until: Timestamp },
    /// A refresh of this token started and never finished (its holder stopped before its
    /// deadline). If the provider rotated the token, the new one is lost and this one is dead;
    /// retrying would tell nothing and, on Salesforce, revoke the chain. Reported, not retried.
    OutcomeUnknown(Intent),
}

/// Decides which token to refresh with, or why not to refresh now. `me`: this process's holder
/// name.
pub fn plan(seed: &Credentials, seed_hash: &str, live: Option<&Live>, me: &str, now: Timestamp) -> Plan {
    let (token, from_seed) = match live {
        Some(l) if l.seed_hash.as_deref() == Some(seed_hash) => (l.refresh_token.clone(), false),
        _ => (seed.refresh_token.clone(), true),
    };
    let intent = live
        .and_then(|l| l.intent.as_ref())
        // Only an intent on the token we would send matters, and ours is known to this process.
        .filter(|i| i.holder != me && i.token == token_hash(token.expose_secret()));
    match intent {
        Some(i) if i.deadline > now => Plan::Wait {
            holder: i.holder.clone(),
            until: i.deadline,
        },
        Some(i) => Plan::OutcomeUnknown(i.clone()),
        None => Plan::Refresh { token, from_seed },
    }
}

/// A rotated refresh token received and not yet confirmed saved. Kept in memory and in the
/// journal until `<name>-token` holds it.
#[derive(Clone, Serialize, Deserialize)]
pub struct Pending {
    /// `<name>-token`'s namespace and name.
    pub namespace: String,
    pub secret: String,
    /// [`token_hash`] of the token that was sent (and may now be dead).
    pub replaced: String,
    /// The new refresh token.
    pub token: String,
    /// The seed the new token descends from.
    pub seed_hash: String,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("namespace", &self.namespace)
            .field("secret", &self.secret)
            .field("replaced", &self.replaced)
            .finish_non_exhaustive()
    }
}

/// What to do with a pending token, given what `<name>-token` holds now.
#[derive(Debug, PartialEq, Eq)]
pub enum Save {
    /// Write it (the Secret still holds the replaced token, or our intent on it, or nothing).
    Write,
    /// Already there, settled (no intent left).
    Done,
    /// The Secret moved on (someone saved a newer token): writing would destroy it. Drop ours.
    Superseded,
}

/// Decides whether a pending token may be written over what `<name>-token` holds (`None`: absent).
pub fn save_decision(pending: &Pending, live: Option<&Live>) -> Save {
    let Some(live) = live else { return Save::Write };
    let live_hash = token_hash(live.refresh_token.expose_secret());
    if live.refresh_token.expose_secret() == pending.token
        && live.seed_hash.as_deref() == Some(pending.seed_hash.as_str())
        && live.intent.is_none()
    {
        Save::Done
    } else if live.refresh_token.expose_secret() == pending.token {
        // Saved, but the intent (or the seed hash) is still to be settled.
        Save::Write
    } else if live_hash == pending.replaced
        || live.intent.as_ref().is_some_and(|i| i.token == pending.replaced)
    {
        Save::Write
    } else {
        Save::Superseded
    }
}

/// The data and annotations of `<name>-token` after a settled refresh: the token, its seed, no
/// intent (a JSON merge patch removes an annotation given as `null`).
pub fn settled_patch(token: &str, seed_hash: &str, resource_version: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "resourceVersion": resource_version,
            "annotations": {SEED_HASH_ANNOTATION: seed_hash, INTENT_ANNOTATION: null},
        },
        "data": {REFRESH_TOKEN_KEY: ByteString(token.as_bytes().to_vec())},
    })
}

/// The patch that records an intent (compare-and-swap on `resource_version`).
pub fn intent_patch(intent: &Intent, resource_version: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "metadata": {
            "resourceVersion": resource_version,
            "annotations": {INTENT_ANNOTATION: serde_json::to_string(intent).expect("intent serializes")},
        },
    })
}

/// The patch that withdraws an intent, leaving the token as it is.
pub fn withdraw_patch(resource_version: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"resourceVersion": resource_version, "annotations": {INTENT_ANNOTATION: null}},
    })
}

/// A new `<name>-token`, owned by the connection, holding `token` (from the seed `seed_hash`) and,
/// when given, an intent.
pub fn new_token_secret(conn: &Connection, token: &str, seed_hash: &str, intent: Option<&Intent>) -> Secret {
    let mut annotations = BTreeMap::from([(SEED_HASH_ANNOTATION.to_string(), seed_hash.to_string())]);
    if let Some(i) = intent {
        annotations.insert(
            INTENT_ANNOTATION.to_string(),
            serde_json::to_string(i).expect("intent serializes"),
        );
    }
    let mut meta = super::children::owned_meta(conn, token_secret_name(conn), {
        let mut l = super::children::labels(conn, "token");
        l.insert(TOKEN_LABEL.to_string(), "true".to_string());
        l
    });
    meta.annotations = Some(annotations);
    Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            REFRESH_TOKEN_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(rt: &str) -> Credentials {
        Credentials {
            refresh_token: rt.into(),
            client_id: "cid".into(),
            client_secret: Some("cs".into()),
            access_token: None,
        }
    }

    fn live(rt: &str, seed: &str, intent: Option<Intent>) -> Live {
        Live {
            refresh_token: rt.into(),
            seed_hash: Some(seed.into()),
            intent,
        }
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn intent(holder: &str, token: &str, deadline: i64) -> Intent {
        Intent {
            holder: holder.into(),
            token: token_hash(token),
            deadline: t(deadline),
        }
    }

    fn refresh_token(plan: &Plan) -> (&str, bool) {
        match plan {
            Plan::Refresh { token, from_seed } => (token.expose_secret(), *from_seed),
            other => panic!("expected Refresh, got {other:?}"),
        }
    }

    #[test]
    fn seed_hash_ignores_surroundings_but_not_values() {
        let a = seed_hash(&creds("rt-1"));
        assert_eq!(a, seed_hash(&creds("rt-1")), "same values, same hash");
        assert_ne!(a, seed_hash(&creds("rt-2")), "a new token is a re-authorization");
        let mut other_client = creds("rt-1");
        other_client.client_secret = None;
        assert_ne!(a, seed_hash(&other_client), "a changed client secret counts");
        // Length-prefixed: moving characters between fields changes the hash.
        let mut shifted = creds("rt-1c");
        shifted.client_id = "id".into();
        assert_ne!(a, seed_hash(&shifted));
        assert_eq!(a.len(), 32);
        assert_ne!(token_hash("rt-1"), seed_hash(&creds("rt-1")), "domains differ");
    }

    #[test]
    fn first_use_refreshes_with_the_seed() {
        let seed = creds("seed-rt");
        let plan = plan(&seed, &seed_hash(&seed), None, "me", t(0));
        assert_eq!(refresh_token(&plan), ("seed-rt", true));
    }

    #[test]
    fn same_seed_uses_the_live_token_so_a_gitops_revert_changes_nothing() {
        let seed = creds("seed-rt");
        let hash = seed_hash(&seed);
        let live = live("live-rt", &hash, None);
        assert_eq!(
            refresh_token(&plan(&seed, &hash, Some(&live), "me", t(0))),
            ("live-rt", false)
        );
    }

    #[test]
    fn changed_seed_is_a_reauthorization_with_the_seed_token() {
        let old = creds("old-seed");
        let live = live("live-rt", &seed_hash(&old), None);
        let new = creds("new-seed");
        let p = plan(&new, &seed_hash(&new), Some(&live), "me", t(0));
        assert_eq!(refresh_token(&p), ("new-seed", true));
    }

    #[test]
    fn live_token_without_seed_hash_is_replaced_by_the_seed() {
        let seed = creds("seed-rt");
        let mut l = live("live-rt", "x", None);
        l.seed_hash = None;
        let p = plan(&seed, &seed_hash(&seed), Some(&l), "me", t(0));
        assert_eq!(refresh_token(&p), ("seed-rt", true));
    }

    #[test]
    fn another_holders_intent_on_our_token_waits_until_its_deadline_then_is_unknown() {
        let seed = creds("seed-rt");
        let hash = seed_hash(&seed);
        let l = live("live-rt", &hash, Some(intent("other", "live-rt", 60)));
        match plan(&seed, &hash, Some(&l), "me", t(0)) {
            Plan::Wait { holder, until } => assert_eq!((holder.as_str(), until), ("other", t(60))),
            p => panic!("{p:?}"),
        }
        match plan(&seed, &hash, Some(&l), "me", t(60)) {
            Plan::OutcomeUnknown(i) => assert_eq!(i.holder, "other"),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn our_own_intent_or_one_on_another_token_does_not_block() {
        let seed = creds("seed-rt");
        let hash = seed_hash(&seed);
        let mine = live("live-rt", &hash, Some(intent("me", "live-rt", 60)));
        assert_eq!(
            refresh_token(&plan(&seed, &hash, Some(&mine), "me", t(0))).0,
            "live-rt"
        );
        // A stale intent on a token we no longer send (e.g. the old seed's): irrelevant.
        let other = live("live-rt", &hash, Some(intent("other", "old-seed", 0)));
        assert_eq!(
            refresh_token(&plan(&seed, &hash, Some(&other), "me", t(9))).0,
            "live-rt"
        );
    }

    #[test]
    fn stale_intent_on_a_seed_token_is_unknown_and_a_new_seed_clears_it() {
        let old = creds("old-seed");
        let l = live("live-rt", &seed_hash(&old), Some(intent("gone", "new-seed", 0)));
        let new = creds("new-seed");
        assert!(matches!(
            plan(&new, &seed_hash(&new), Some(&l), "me", t(5)),
            Plan::OutcomeUnknown(_)
        ));
        let newer = creds("newer-seed");
        assert_eq!(
            refresh_token(&plan(&newer, &seed_hash(&newer), Some(&l), "me", t(5))),
            ("newer-seed", true)
        );
    }

    fn pending(replaced: &str, token: &str) -> Pending {
        Pending {
            namespace: "ns".into(),
            secret: "c-token".into(),
            replaced: token_hash(replaced),
            token: token.into(),
            seed_hash: "s".into(),
        }
    }

    #[test]
    fn pending_token_is_written_only_over_the_token_it_replaced() {
        let p = pending("old-rt", "new-rt");
        assert_eq!(save_decision(&p, None), Save::Write, "deleted: recreate");
        assert_eq!(save_decision(&p, Some(&live("old-rt", "s", None))), Save::Write);
        assert_eq!(save_decision(&p, Some(&live("new-rt", "s", None))), Save::Done);
        let unsettled = live("new-rt", "s", Some(intent("me", "old-rt", 9)));
        assert_eq!(
            save_decision(&p, Some(&unsettled)),
            Save::Write,
            "clear the intent"
        );
        // A seed token was refreshed: the Secret still holds the previous live token, with our
        // intent naming the seed token.
        let seeded = live("previous", "s0", Some(intent("me", "old-rt", 9)));
        assert_eq!(save_decision(&p, Some(&seeded)), Save::Write);
        assert_eq!(
            save_decision(&p, Some(&live("newer-rt", "s", None))),
            Save::Superseded,
            "never overwrite a newer token"
        );
    }

    #[test]
    fn read_live_trims_and_ignores_an_unreadable_intent() {
        let mut s = Secret {
            data: Some(BTreeMap::from([(
                REFRESH_TOKEN_KEY.to_string(),
                ByteString(b"rt\n".to_vec()),
            )])),
            ..Default::default()
        };
        s.metadata.annotations = Some(BTreeMap::from([
            (SEED_HASH_ANNOTATION.to_string(), "h".to_string()),
            (INTENT_ANNOTATION.to_string(), "{not json".to_string()),
        ]));
        let l = read_live(&s).unwrap();
        assert_eq!(l.refresh_token.expose_secret(), "rt");
        assert_eq!(l.seed_hash.as_deref(), Some("h"));
        assert!(l.intent.is_none());
        s.data = Some(BTreeMap::new());
        assert!(read_live(&s).is_none());
    }

    #[test]
    fn patches_remove_the_intent_and_carry_the_resource_version() {
        let p = settled_patch("rt", "h", Some("42"));
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert!(p["metadata"]["annotations"][INTENT_ANNOTATION].is_null());
        assert_eq!(p["metadata"]["annotations"][SEED_HASH_ANNOTATION], "h");
        assert_eq!(p["data"][REFRESH_TOKEN_KEY], "cnQ=");
        let w = withdraw_patch(Some("7"));
        assert!(w.get("data").is_none());
        assert!(w["metadata"]["annotations"][INTENT_ANNOTATION].is_null());
        let i = intent("me", "rt", 5);
        let ip = intent_patch(&i, Some("8"));
        let back: Intent =
            serde_json::from_str(ip["metadata"]["annotations"][INTENT_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(back, i);
        assert!(
            !ip["metadata"]["annotations"][INTENT_ANNOTATION]
                .as_str()
                .unwrap()
                .contains("rt\"")
        );
    }
}
