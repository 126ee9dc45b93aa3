//! Steps 2, 4 and 5: the provider call (with the rotated-token write-back it may require), and the
//! writes — children by server-side apply, status by server-side apply on `/status` — each made
//! only when something changed.

use super::children::{self, FIELD_MANAGER, SessionData};
use super::dereference::Observed;
use super::schedule::{self, Due, Memo};
use super::state::{Check, Identity, Known};
use super::{Context, Error, PendingToken, jitter, uid};
use crate::api::{Connection, ConnectionStatus};
use crate::providers::{Credentials, Failure, FailureKind, secret_text};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::{info, warn};

/// Reason when a rotated refresh token could not be written back to the credentials Secret.
pub const REFRESH_TOKEN_NOT_SAVED: &str = "RefreshTokenNotSaved";

/// What the validation step concluded.
pub struct Validated {
    pub check: Check,
    /// A fresh session to write to the session Secret.
    pub session: Option<SessionData>,
    /// When to look again (`None`: on change only).
    pub recheck_in: Option<Duration>,
}

/// Step 2: validate the credentials against the provider when due.
pub async fn validate(
    ctx: &Context,
    conn: &Connection,
    ns: &str,
    observed: &Observed,
    now: Timestamp,
) -> Result<Validated, Error> {
    let mut validated = validate_when_due(ctx, conn, ns, observed, now).await?;
    if observed.credentials.is_none() {
        // A Secret that does not exist yet carries no label, so the watch cannot see it appear:
        // look again (a GET, no provider call) every retry_max until it does.
        let poll = ctx.config.policy.retry_max;
        validated.recheck_in = Some(validated.recheck_in.map_or(poll, |d| d.min(poll)));
    }
    Ok(validated)
}

async fn validate_when_due(
    ctx: &Context,
    conn: &Connection,
    ns: &str,
    observed: &Observed,
    now: Timestamp,
) -> Result<Validated, Error> {
    let key = uid(conn);
    let policy = &ctx.config.policy;
    let mut credentials = observed.credentials.clone();

    // The user's Secret is labelled so the label-selected watch sees its next change.
    if let Some(secret) = &credentials {
        credentials = Some(ensure_credentials_label(ctx, ns, secret).await?);
    }
    // What the operator remembers (seeded from status and the session Secret after a restart).
    let memo = ctx
        .memos
        .lock()
        .unwrap()
        .entry(key.clone())
        .or_insert_with(|| {
            schedule::seed(
                conn.status.as_ref(),
                observed
                    .session
                    .as_ref()
                    .and_then(|s| s.metadata.annotations.as_ref()),
            )
        })
        .clone();
    let remember = |memo: Memo| {
        let recheck_in = schedule::wait(&schedule::due(Some(&memo), &memo.fingerprint, now), now);
        let check = memo.check.clone();
        ctx.memos.lock().unwrap().insert(key.clone(), memo);
        Validated {
            check,
            session: None,
            recheck_in,
        }
    };

    // The live refresh token exists only in memory: not Active, retry the save with backoff.
    let not_saved_yet = |message: String, secret: Option<&Secret>| {
        remember(not_saved(ctx, conn, &memo, secret, message, now))
    };

    // A rotated token that could not be saved before is saved before anything else.
    if let Some(secret) = &credentials {
        match save_pending_token(ctx, ns, &key, secret).await {
            Ok(Some(saved)) => credentials = Some(saved),
            Ok(None) => {}
            Err(message) => {
                return Ok(not_saved_yet(message, credentials.as_ref()));
            }
        }
    }

    let version = credentials
        .as_ref()
        .and_then(|s| s.metadata.resource_version.clone());
    let mut fingerprint = schedule::fingerprint(conn, version.as_deref());
    match schedule::due(Some(&memo), &fingerprint, now) {
        Due::Now => {}
        later => {
            let check = memo.check.clone();
            return Ok(Validated {
                check,
                session: None,
                recheck_in: schedule::wait(&later, now),
            });
        }
    }

    let secret_name = &conn.spec.credentials_secret_ref.name;
    let creds = match &credentials {
        None => Err(Failure::secret_missing(secret_name)),
        Some(secret) => {
            Credentials::from_secret_data(secret_name, secret.data.as_ref().unwrap_or(&BTreeMap::new()))
        }
    };
    let previous_remote = memo.check.last_identity.as_ref().map(|id| id.remote_id.as_str());
    let (creds, result) = match creds {
        Err(f) => (None, Err(f)),
        Ok(creds) => {
            let result = ctx.validator.validate(&conn.spec, &creds, previous_remote).await;
            let outcome = match &result {
                Ok(_) => "authorized",
                Err(f) if f.kind == FailureKind::Transient => "transient",
                Err(_) => "rejected",
            };
            ctx.metrics.validated(conn.spec.provider, outcome);
            (Some(creds), result)
        }
    };

    // The provider rotated the refresh token: the old one is dead. Persist the new one before the
    // session is used or reported — also when a later step of the validation failed.
    let rotated = match &result {
        Ok(session) => session.rotated_refresh_token.clone(),
        Err(failure) => failure.rotated_refresh_token.clone(),
    };
    if let (Some(rotated), Some(creds), Some(secret)) = (rotated, &creds, &credentials) {
        ctx.pending_tokens.lock().unwrap().insert(
            key.clone(),
            PendingToken {
                replaced: creds.refresh_token.clone(),
                token: rotated,
            },
        );
        match save_pending_token(ctx, ns, &key, secret).await {
            Ok(Some(saved)) => {
                fingerprint = schedule::fingerprint(conn, saved.metadata.resource_version.as_deref())
            }
            Ok(None) => {
                // The user replaced the token meanwhile: their change triggers a new reconcile.
                let check = memo.check.clone();
                return Ok(Validated {
                    check,
                    session: None,
                    recheck_in: Some(Duration::ZERO),
                });
            }
            Err(message) => {
                return Ok(not_saved_yet(message, credentials.as_ref()));
            }
        }
    }

    match result {
        Err(failure) => {
            info!(reason = %failure.reason, kind = ?failure.kind, "validation failed: {}", failure.message);
            Ok(remember(match failure.kind {
                FailureKind::Transient => policy.after_transient(
                    Some(&memo),
                    &memo.check,
                    fingerprint,
                    now,
                    failure.retry_after,
                    jitter(),
                    &failure.message,
                ),
                FailureKind::Permanent | FailureKind::Configuration => {
                    // Already rejected, and the inputs (the Secret, the settings) changed since that
                    // verdict: the user tried to re-authorize and it failed again. The status may
                    // not change (same reason): say so in an event.
                    if matches!(memo.check.known, Known::Invalid { .. })
                        && !memo.fingerprint.is_empty()
                        && memo.fingerprint != fingerprint
                    {
                        publish(
                            ctx,
                            conn,
                            EventType::Warning,
                            REAUTHORIZATION_FAILED,
                            &format!("the changed credentials were rejected too: {}", failure.message),
                        )
                        .await;
                    }
                    policy.after_rejection(&memo.check, fingerprint, failure.reason, &failure.message)
                }
            }))
        }
        Ok(session) => {
            let identity = Identity {
                remote_id: session.remote_id.clone(),
                instance_url: session.instance_url.clone(),
                user: session.user.clone(),
            };
            let memo = policy.after_success(fingerprint.clone(), now, session.expires_at, jitter(), identity);
            let next = memo.next_check_at.expect("success schedules a recheck");
            let mut validated = remember(memo);
            validated.session = Some(SessionData {
                access_token: session.access_token.expose_secret().to_string(),
                instance_url: session.instance_url.clone(),
                expires_at: session.expires_at.map(|t| t.to_string()),
                annotations: BTreeMap::from([
                    (schedule::FINGERPRINT_ANNOTATION.to_string(), fingerprint),
                    (schedule::NEXT_CHECK_ANNOTATION.to_string(), next.to_string()),
                ]),
            });
            Ok(validated)
        }
    }
}

/// The connection cannot be reported Active: the live refresh token exists only in memory. It is
/// Inactive with `RefreshTokenNotSaved`, and the save is retried with backoff.
fn not_saved(
    ctx: &Context,
    conn: &Connection,
    memo: &Memo,
    credentials: Option<&Secret>,
    message: String,
    now: Timestamp,
) -> Memo {
    warn!("rotated refresh token not saved: {message}");
    let fingerprint = schedule::fingerprint(
        conn,
        credentials.and_then(|s| s.metadata.resource_version.as_deref()),
    );
    let mut retry = ctx.config.policy.after_transient(
        Some(memo),
        &memo.check,
        fingerprint,
        now,
        None,
        jitter(),
        &message,
    );
    retry.check = Check {
        last_identity: memo.check.last_identity.clone(),
        ..Check::invalid(
            REFRESH_TOKEN_NOT_SAVED,
            format!(
                "the provider rotated the refresh token but the new one could not be saved to Secret {}: {message}; the operator keeps it in memory and retries",
                conn.spec.credentials_secret_ref.name
            ),
        )
    };
    retry
}

async fn ensure_credentials_label(ctx: &Context, ns: &str, secret: &Secret) -> Result<Secret, Error> {
    if secret
        .labels()
        .get(children::CREDENTIALS_LABEL)
        .map(String::as_str)
        == Some("true")
    {
        return Ok(secret.clone());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({"metadata": {"labels": {children::CREDENTIALS_LABEL: "true"}}});
    Ok(api
        .patch(&secret.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}

/// Writes the pending rotated token (if any) into the credentials Secret, with optimistic
/// concurrency on resourceVersion, retrying on conflict. `Ok(Some(secret))`: saved;
/// `Ok(None)`: nothing to save, or the user replaced the token meanwhile (theirs wins);
/// `Err`: it could not be saved (the token stays pending).
async fn save_pending_token(
    ctx: &Context,
    ns: &str,
    key: &str,
    secret: &Secret,
) -> Result<Option<Secret>, String> {
    let Some((replaced, token)) = ctx.pending_tokens.lock().unwrap().get(key).map(|p| {
        (
            p.replaced.expose_secret().to_string(),
            p.token.expose_secret().to_string(),
        )
    }) else {
        return Ok(None);
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = secret.name_any();
    let mut current = secret.clone();
    for _ in 0..5 {
        // Read as the provider layer reads it (trimmed): a stored "token\n" is the token that was
        // sent and rotated, not a re-authorization (which would drop the live token).
        let stored = current
            .data
            .as_ref()
            .and_then(|d| d.get(Credentials::REFRESH_TOKEN))
            .and_then(|b| secret_text(&b.0).ok().flatten());
        if stored == Some(token.as_str()) {
            ctx.pending_tokens.lock().unwrap().remove(key);
            return Ok(Some(current));
        }
        if stored != Some(replaced.as_str()) {
            // Re-authorized by the user while we held the rotated token: keep theirs.
            ctx.pending_tokens.lock().unwrap().remove(key);
            return Ok(None);
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "data": {"refresh_token": ByteString(token.as_bytes().to_vec())},
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(saved) => {
                ctx.pending_tokens.lock().unwrap().remove(key);
                info!(secret = %name, "saved the rotated refresh token");
                return Ok(Some(saved));
            }
            Err(kube::Error::Api(s)) if s.code == 409 => match api.get_opt(&name).await {
                Ok(Some(fresh)) => current = fresh,
                Ok(None) => return Err(format!("Secret {name} was deleted")),
                Err(e) => return Err(e.to_string()),
            },
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("Secret {name} kept changing (5 conflicting writes)"))
}

/// Step 4: apply the children that changed.
pub async fn children(
    ctx: &Context,
    conn: &Connection,
    ns: &str,
    observed: &Observed,
    session: Option<Secret>,
    deployment: Deployment,
) -> Result<(), Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // Never apply over an object we did not create (the force would take it over).
    let foreign = |existing: Option<&ObjectMeta>| existing.is_some_and(|m| !children::is_ours(conn, m));
    let session = session.filter(|desired| {
        !foreign(observed.session.as_ref().map(|s| &s.metadata))
            && !observed
                .session
                .as_ref()
                .is_some_and(|existing| children::session_up_to_date(existing, desired))
    });
    if let Some(session) = session {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        api.patch(&session.name_any(), &params, &Patch::Apply(typed(session)))
            .await?;
    }
    let up_to_date = foreign(observed.deployment.as_ref().map(|d| &d.metadata))
        || observed
            .deployment
            .as_ref()
            .is_some_and(|d| children::deployment_up_to_date(d, &deployment));
    if !up_to_date {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let replicas = deployment.spec.replicas;
        api.patch(
            &deployment.name_any(),
            &params,
            &Patch::Apply(typed(deployment.clone())),
        )
        .await?;
        info!(deployment = %deployment.name_any(), ?replicas, "applied retriever");
    }
    Ok(())
}

/// Serializes an object with its apiVersion and kind, as server-side apply requires.
fn typed<K: Resource<DynamicType = ()> + serde::Serialize>(obj: K) -> serde_json::Value {
    let mut value = serde_json::to_value(&obj).expect("object serializes");
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    value
}

/// Step 5: write the status if it changed, and publish an event on state transitions.
pub async fn status(
    ctx: &Context,
    conn: &Connection,
    ns: &str,
    desired: ConnectionStatus,
) -> Result<(), Error> {
    if conn.status.as_ref() == Some(&desired) {
        return Ok(());
    }
    let api: Api<Connection> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": Connection::api_version(&()),
        "kind": Connection::kind(&()),
        "status": desired,
    });
    api.patch_status(
        &conn.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    if let Some(t) = super::state::transition(conn.status.as_ref(), &desired) {
        info!(event = t.reason, state = ?desired.state, "{}", t.note);
        let type_ = if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, conn, type_, t.reason, &t.note).await;
    }
    Ok(())
}

/// Event reason: new credentials for an already rejected connection were rejected too.
pub const REAUTHORIZATION_FAILED: &str = "ReauthorizationFailed";

/// Publishes an event on the connection (a failure to publish is logged, never an error).
async fn publish(ctx: &Context, conn: &Connection, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &conn.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}
