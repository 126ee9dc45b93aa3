//! The I/O of org claims (the rules are in [`super::claims`]): reading, creating and passing on the
//! `OrgClaim` of an org, each write conditional (a create, or a replace carrying the
//! resourceVersion read), so two connections never both hold it.

use super::claims::{self, Claim, Claimant, Seen, Step};
use super::{Context, uid};
use crate::api::{ClaimHolder, Connection, OrgClaim, OrgClaimSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

/// Event reason on a connection that took over an org another connection held.
pub const ORG_CLAIMED: &str = "OrgClaimTakenOver";
/// Event reason on a connection that released its org (its tokens were refused).
pub const ORG_RELEASED: &str = "OrgClaimReleased";

/// The OrgClaim name of `remote_id` in this operator's scope.
fn claim_key(ctx: &Context, conn: &Connection, remote_id: &str) -> Option<String> {
    let key = crate::api::org_key(conn.spec.provider, remote_id)?;
    // Namespaced mode: one claim per org and namespace (the operator may not see the others).
    let scope = (!ctx.config.namespaces.is_empty())
        .then(|| conn.namespace())
        .flatten();
    Some(claims::claim_name(scope.as_deref(), &key))
}

fn me(conn: &Connection, ns: &str) -> ClaimHolder {
    ClaimHolder {
        namespace: ns.to_string(),
        name: conn.name_any(),
        uid: uid(conn),
        team: conn.spec.team.clone(),
    }
}

/// True when the connection `holder` names still exists (the same UID). A holder this operator
/// may not read (another namespace, in a namespaced install) counts as existing.
async fn holder_exists(ctx: &Context, holder: &ClaimHolder) -> Result<bool, kube::Error> {
    let api: Api<Connection> = Api::namespaced(ctx.client.clone(), &holder.namespace);
    match api.get_metadata_opt(&holder.name).await {
        Ok(meta) => Ok(meta.is_some_and(|m| m.metadata.uid.as_deref() == Some(holder.uid.as_str()))),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(true),
        Err(e) => Err(e),
    }
}

/// Holds the org `remote_id` for `conn`, whose tokens were just found valid for it, or says who
/// holds it. Called before the status says Active and before the retriever gets a replica.
///
/// A connection that has never recorded an org (`status.remoteId` unset) holds no claim: it
/// creates one without reading first (most often none exists; when one does, the create is
/// refused and it reads and decides as any other). At a cold start that is a read fewer each.
pub async fn hold(ctx: &Context, conn: &Connection, ns: &str, remote_id: &str) -> Result<Claim, kube::Error> {
    let Some(key) = claim_key(ctx, conn, remote_id) else {
        // Not a usable org ID (the providers' checks make this unreachable): nothing to hold.
        warn!(remote_id, "no org key for this org ID: not claimed");
        return Ok(Claim::Won);
    };
    let api: Api<OrgClaim> = Api::all(ctx.client.clone());
    let me = me(conn, ns);
    let me_claimant = Claimant {
        namespace: ns.to_string(),
        name: me.name.clone(),
        team: me.team.clone(),
        created: conn.metadata.creation_timestamp.as_ref().map(|t| t.0),
        remote_id: remote_id.to_string(),
    };
    let mut read = claims::org_recorded(conn);
    // Released by this connection (its tokens were refused, and now are valid again): the claim as
    // that release left it, instead of reading it. Only a write is decided on it, conditional on
    // its version (below); a claim that changed since is read.
    let mut remembered = ctx
        .index
        .memory(&me.uid, |m| m.released_claim.take())
        .filter(|c| read && c.metadata.name.as_deref() == Some(key.as_str()));
    for _ in 0..5 {
        let (existing, recalled) = match remembered.take() {
            Some(claim) => (Some(*claim), true),
            None if read => (api.get_opt(&key).await?, false),
            None => (None, false),
        };
        read = true;
        let holder_exists = match &existing {
            Some(c) if c.spec.holder.uid != me.uid => holder_exists(ctx, &c.spec.holder).await?,
            _ => true,
        };
        // Namespaced mode: the claimants of this namespace only (its claims are its own).
        let scope = (!ctx.config.namespaces.is_empty()).then_some(ns);
        let older_waiting = ctx.index.older_waiting(&me_claimant, scope);
        let seen = Seen {
            claim: existing.as_ref().map(|c| &c.spec),
            holder_exists,
            older_waiting,
        };
        let held = OrgClaimSpec {
            holder: me.clone(),
            held: true,
        };
        let step = claims::next(&me, seen);
        if recalled && !matches!(step, Step::Reassert) {
            // Not the write expected: decide on the claim as it is now.
            continue;
        }
        let written = match step {
            Step::Keep => return Ok(Claim::Won),
            Step::Wait(holder) => {
                return Ok(Claim::Lost {
                    winner: Claimant::of_holder(&holder, remote_id),
                });
            }
            Step::Create => {
                let claim = OrgClaim {
                    metadata: ObjectMeta {
                        name: Some(key.clone()),
                        ..Default::default()
                    },
                    spec: held,
                };
                api.create(&PostParams::default(), &claim).await.map(|_| None)
            }
            Step::Reassert | Step::Take => {
                let mut claim = existing
                    .clone()
                    .expect("an existing claim is reasserted or taken");
                let previous = claim.spec.clone();
                claim.spec = held;
                api.replace(&key, &PostParams::default(), &claim)
                    .await
                    .map(|_| Some(previous).filter(|p| p.holder.uid != me.uid))
            }
        };
        match written {
            Ok(None) => return Ok(Claim::Won),
            Ok(Some(previous)) => {
                taken_over(ctx, conn, &key, &previous, holder_exists).await;
                return Ok(Claim::Won);
            }
            // Another connection wrote first, or the claim was deleted meanwhile: read again and
            // decide again.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => continue,
            Err(e) => return Err(e),
        }
    }
    // Contended five times in a row: the next reconcile decides again; meanwhile not ours.
    let holder = api.get_opt(&key).await?.map(|c| c.spec.holder);
    Ok(match holder {
        Some(h) if h.uid != me.uid => Claim::Lost {
            winner: Claimant::of_holder(&h, remote_id),
        },
        _ => Claim::Won,
    })
}

/// Events on both sides of a takeover. Another tenant's names are never put in an event.
async fn taken_over(
    ctx: &Context,
    conn: &Connection,
    key: &str,
    previous: &OrgClaimSpec,
    holder_exists: bool,
) {
    let why = if holder_exists {
        "its tokens were refused"
    } else {
        "it was deleted"
    };
    let ns = conn.namespace().unwrap_or_default();
    let who = if previous.holder.namespace == ns {
        format!("connection {}", previous.holder.name)
    } else {
        "a connection in another namespace".to_string()
    };
    info!(org = key, "took over the org: {who} held it, {why}");
    super::apply::publish(
        ctx,
        conn,
        EventType::Normal,
        ORG_CLAIMED,
        &format!("now holds org {key}: {who} held it and {why}"),
    )
    .await;
    if holder_exists {
        let reference = ObjectReference {
            api_version: Some(Connection::api_version(&()).into_owned()),
            kind: Some(Connection::kind(&()).into_owned()),
            namespace: Some(previous.holder.namespace.clone()),
            name: Some(previous.holder.name.clone()),
            uid: Some(previous.holder.uid.clone()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: ORG_CLAIMED.into(),
            note: Some(format!(
                "org {key} is now held by another connection with valid tokens; re-authorizing this one makes it wait for the org (Conflict)"
            )),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

/// Releases the org `remote_id` if `conn` (whose tokens were refused) holds it, so that the next
/// connection with valid tokens for the org takes it. Asked at every reconcile of an Inactive
/// connection: a release that failed is tried again.
pub async fn release(ctx: &Context, conn: &Connection, remote_id: &str) -> Result<(), kube::Error> {
    let Some(key) = claim_key(ctx, conn, remote_id) else {
        return Ok(());
    };
    let api: Api<OrgClaim> = Api::all(ctx.client.clone());
    for _ in 0..5 {
        let Some(mut claim) = api.get_opt(&key).await? else {
            return Ok(());
        };
        if !claims::releases(&uid(conn), Some(&claim.spec)) {
            return Ok(());
        }
        claim.spec.held = false;
        match api.replace(&key, &PostParams::default(), &claim).await {
            Ok(mut released) => {
                info!(org = %key, "released the org: the tokens were refused");
                released.metadata.managed_fields = None;
                ctx.index
                    .memory(&uid(conn), |m| m.released_claim = Some(Box::new(released)));
                super::apply::publish(
                    ctx,
                    conn,
                    EventType::Normal,
                    ORG_RELEASED,
                    &format!(
                        "released org {key} (the tokens were refused): another connection with valid tokens for it may take it; re-authorize to hold it again"
                    ),
                )
                .await;
                return Ok(());
            }
            // Changed meanwhile: read again.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
