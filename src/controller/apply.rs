//! Steps 2, 4 and 5: the provider call (a refresh fenced by an intent on `<name>-token`, a rotated
//! token journalled and saved there before the identity call), and the writes — children by
//! server-side apply, status by server-side apply on `/status` — each made only when something
//! changed.

use super::children::{self, FIELD_MANAGER, SessionData};
use super::dereference::Observed;
use super::schedule::{self, Due, Memo};
use super::state::{self, Check, Identity, Known};
use super::{Context, Error, jitter, tokens, uid};
use crate::api::{Connection, ConnectionStatus, OrgSettings, OrgSettingsSpec};
use crate::events::Recorder;
use crate::providers::{Credentials, Failure, FailureKind, with_tenant};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::{Instrument, info, warn};

/// The first look again for a credentials Secret the watch cannot see (then doubling).
const FIRST_SECRET_LOOK: Duration = Duration::from_secs(1);

/// Reason when a rotated refresh token could not be saved to `<name>-token`.
pub const REFRESH_TOKEN_NOT_SAVED: &str = "RefreshTokenNotSaved";

/// Event reason: this many validations in a row could not reach the provider (published once per
/// run of failures; the state does not change).
pub const PROVIDER_UNREACHABLE: &str = "ProviderUnreachable";
const UNREACHABLE_EVENT_AFTER: u32 = 3;

/// What the validation step concluded.
pub struct Validated {
    pub check: Check,
    /// A fresh session to write to the session Secret.
    pub session: Option<SessionData>,
    /// When to look again (`None`: on change only).
    pub recheck_in: Option<Duration>,
}

/// Step 2: validate the credentials against the provider when due. `early`: revalidate valid
/// tokens now even if the next check is later (the retriever has been down a minute).
pub async fn validate(
    ctx: &Context,
    conn: &Connection,
    ns: &str,
    observed: &Observed,
    now: Timestamp,
    early: bool,
) -> Result<Validated, Error> {
    let mut validated = validate_when_due(ctx, conn, ns, observed, now, early).await?;
    let unwatched = observed.credentials.as_ref().is_none_or(|s| {
        !s.data
            .as_ref()
            .is_some_and(|d| d.contains_key(Credentials::REFRESH_TOKEN))
    });
    let key = uid(conn);
    if unwatched {
        // A Secret that does not exist yet, or has no refresh_token (the operator labels only
        // credentials), carries no label, so the watch cannot see it change: look again (a GET,
        // no provider call) after 1 s, then twice as long each time, up to retry_max.
        let attempt = ctx.index.memory(&key, |m| {
            m.secret_polls = m.secret_polls.saturating_add(1);
            m.secret_polls - 1
        });
        let poll = FIRST_SECRET_LOOK
            .saturating_mul(2u32.saturating_pow(attempt.min(16)))
            .min(ctx.config.policy.retry_max);
        validated.recheck_in = Some(validated.recheck_in.map_or(poll, |d| d.min(poll)));
        if let state::Known::Invalid { reason, message } = &mut validated.check.known
            && reason == crate::providers::reason::SECRET_MISSING
            && !message.contains("looked for again")
        {
            message.push_str(&format!(
                "; looked for again after {}s, then less and less often (at least every {}s): label it {}=true when you create it to be noticed at once",
                FIRST_SECRET_LOOK.as_secs(),
                ctx.config.policy.retry_max.as_secs(),
                children::CREDENTIALS_LABEL
            ));
        }
    } else {
        ctx.index.memory(&key, |m| m.secret_polls = 0);
    }
    Ok(validated)
}

async fn validate_when_due(
    ctx: &Context,
    conn: &Connection,
    ns: &str,
    observed: &Observed,
    now: Timestamp,
    early: bool,
) -> Result<Validated, Error> {
    let key = uid(conn);
    let policy = &ctx.config.policy;
    let secret_name = &conn.spec.credentials_secret_ref.name;

    // The seed is labelled (metadata only: its data is never written) so the label-selected watch
    // sees its next change. Only a Secret that looks like credentials is labelled.
    let mut seed_secret = observed.credentials.clone();
    if let Some(secret) = &seed_secret
        && secret
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(Credentials::REFRESH_TOKEN))
    {
        seed_secret = Some(ensure_credentials_label(ctx, ns, secret).await?);
    }
    // What the operator remembers (seeded from status and the session Secret after a restart).
    let memo = ctx.index.memory(&key, |m| {
        m.memo
            .get_or_insert_with(|| {
                // When the current policy would check next: at the connection's place in the
                // interval, or sooner if the access token held expires before (its refresh must
                // not wait). Only computed when there is no memory yet.
                let slot = policy.next_slot(now, schedule::phase(&key));
                let margin = SignedDuration::try_from(policy.refresh_margin).unwrap_or(SignedDuration::ZERO);
                let latest = match session_expiry(observed.session.as_ref()) {
                    Some(expires) => slot.min(expires.saturating_sub(margin).unwrap_or(expires).max(now)),
                    None => slot,
                };
                schedule::seed(
                    conn.status.as_ref(),
                    observed
                        .session
                        .as_ref()
                        .and_then(|s| s.metadata.annotations.as_ref()),
                    now,
                    latest,
                    policy.longest_wait(),
                )
            })
            .clone()
    });
    let remember = |memo: Memo| remember(ctx, &key, memo, now);
    let unchanged = |recheck_in: Option<Duration>| Validated {
        check: memo.check.clone(),
        session: None,
        recheck_in,
    };

    // 1. A rotated token that could not be saved before is saved before anything else.
    let mut token_secret = observed.token.clone();
    match save_pending(ctx, conn, ns, &key, token_secret.as_ref()).await {
        Ok(Some(saved)) => token_secret = Some(saved),
        Ok(None) => {}
        Err(message) => return Ok(remember(not_saved(ctx, conn, &memo, message, now))),
    }

    // 2. The inputs: the seed and the live token. Due only when they (or the spec) changed, or on
    // schedule.
    let seed = match &seed_secret {
        None => Err(Failure::secret_missing(secret_name)),
        Some(secret) => {
            Credentials::from_secret_data(secret_name, secret.data.as_ref().unwrap_or(&BTreeMap::new()))
        }
    };
    let seed_hash = seed.as_ref().ok().map(tokens::seed_hash);
    // The inputs: the seed, the live token, and another holder's intent on it (removing a stale
    // one by hand is a change that retries the refresh).
    let fingerprint_with = |live: Option<&tokens::Live>| {
        let live_hash = live.map(|l| tokens::token_hash(l.refresh_token.expose_secret()));
        let intent = live
            .and_then(|l| l.intent.as_ref())
            .filter(|i| i.holder != ctx.holder)
            .map(|i| format!("{}@{}", i.holder, i.deadline));
        let inputs = seed_hash.as_ref().map(|s| {
            format!(
                "{s}/{}/{}",
                live_hash.as_deref().unwrap_or("-"),
                intent.as_deref().unwrap_or("-")
            )
        });
        schedule::fingerprint(conn, inputs.as_deref())
    };
    let live = token_secret.as_ref().and_then(tokens::read_live);
    let fingerprint = fingerprint_with(live.as_ref());
    match schedule::due(Some(&memo), &fingerprint, now) {
        Due::Now => {}
        // Only valid tokens are checked early; a rejection waits for new inputs, an outage for
        // its backoff.
        Due::At(_) if early && memo.outcome == schedule::Outcome::Authorized => {
            info!("the retriever has been down for a minute: revalidating now");
        }
        later => return Ok(unchanged(schedule::wait(&later, now))),
    }
    let seed = match seed {
        Ok(seed) => seed,
        Err(failure) => return Ok(remember(rejected(ctx, conn, &memo, fingerprint, &failure).await)),
    };
    let seed_hash = tokens::seed_hash(&seed);

    // 2b. A scheduled recheck of unchanged, valid tokens while the access token held is good and no
    // refresh is due: ask who that token belongs to. No token request, so nothing rotates (each
    // rotation is a moment when a crash could cost the token). A refused access token (expired, or
    // revoked with its refresh token, as Salesforce does) proves nothing about the refresh token:
    // the refresh below decides.
    if !early
        && memo.fingerprint == fingerprint
        && memo.outcome == schedule::Outcome::Authorized
        && let Some(held) = held_session(observed.session.as_ref(), &fingerprint)
        && !schedule::refresh_due(Some(held.granted_at), held.expires_at, now, policy)
    {
        let previous_remote = memo.check.last_identity().map(|id| id.remote_id.as_str());
        let checked = match ctx.validator.current(
            &conn.spec,
            held.access_token.into(),
            held.expires_at,
            &held.instance_url,
            held.identity_url.as_deref(),
        ) {
            Ok(grant) => {
                with_tenant(
                    ns.to_string(),
                    ctx.validator.identify(&conn.spec, &grant, previous_remote),
                )
                .await
            }
            Err(failure) => Err(failure),
        };
        match checked {
            Err(failure) if failure.kind != FailureKind::Transient || failure.access_token_refused => {
                info!(reason = %failure.reason, "the access token held was refused: refreshing");
            }
            result => {
                let granted_by = GrantedBy {
                    at: held.granted_at,
                    identity_url: held.identity_url,
                };
                return Ok(conclude(ctx, conn, &memo, fingerprint, result, now, granted_by).await);
            }
        }
    }

    // 3. Which token to send, or why not now.
    let (token, from_seed) = match tokens::plan(&seed, &seed_hash, live.as_ref(), &ctx.holder, now) {
        tokens::Plan::Refresh { token, from_seed } => (token, from_seed),
        tokens::Plan::Wait { holder, until } => {
            info!(%holder, %until, "another refresh of this token is in flight; waiting for it");
            let wait = until
                .duration_since(now)
                .unsigned_abs()
                .max(Duration::from_secs(1));
            return Ok(unchanged(Some(wait)));
        }
        tokens::Plan::OutcomeUnknown(intent) => {
            let token_name = tokens::token_secret_name(conn);
            let failure = Failure::permanent(
                REFRESH_OUTCOME_UNKNOWN,
                format!(
                    "a token refresh by {} did not finish before {}: if the provider rotated the refresh token then, the new one was lost and the stored one is dead. Not retried blindly (on Salesforce, reusing a rotated token revokes its successor). Re-authorize by putting a new token in Secret {secret_name}, or, if the refresh cannot have reached the provider, remove the annotation: kubectl annotate secret {token_name} {}-",
                    intent.holder,
                    intent.deadline,
                    tokens::INTENT_ANNOTATION
                ),
            );
            return Ok(remember(rejected(ctx, conn, &memo, fingerprint, &failure).await));
        }
    };

    // 4. Fence: record the intent on `<name>-token` (compare-and-swap) before the token leaves.
    let intent = tokens::Intent {
        holder: ctx.holder.clone(),
        token: tokens::token_hash(token.expose_secret()),
        deadline: plus(now, intent_ttl(ctx)),
    };
    let token_secret =
        match write_intent(ctx, conn, ns, token_secret.as_ref(), &intent, &token, &seed_hash).await {
            Ok(Some(secret)) => secret,
            // Someone changed `<name>-token` meanwhile: that change triggers a new reconcile.
            Ok(None) => return Ok(unchanged(Some(Duration::from_secs(1)))),
            Err(e) => return Err(e),
        };
    crash_point("after-intent");

    // 5. The token request, in its own task: never cancelled mid-flight (a dropped reconcile
    // future, a shutdown), since its answer may be the only copy of the new refresh token.
    let creds = Credentials {
        refresh_token: token.clone(),
        ..seed
    };
    let refresh = {
        let (validator, spec, creds) = (ctx.validator.clone(), conn.spec.clone(), creds.clone());
        // Counted against this namespace's share of the provider host (per-namespace fairness).
        tokio::spawn(with_tenant(ns.to_string(), async move {
            validator.refresh(&spec, &creds).await
        }))
    };
    let granted = refresh
        .await
        .unwrap_or_else(|e| Err(Failure::transient(format!("the token request task failed: {e}"))));

    // 6. Settle `<name>-token` before the new access token is used: save a rotated token (through
    // the journal), adopt a seed token the provider accepted, or withdraw the intent.
    let settled = match &granted {
        Ok(grant) => {
            let new_token = grant
                .rotated_refresh_token
                .clone()
                .unwrap_or_else(|| token.clone());
            if grant.rotated_refresh_token.is_some() || from_seed {
                let pending = tokens::Pending {
                    namespace: ns.to_string(),
                    secret: tokens::token_secret_name(conn),
                    replaced: intent.token.clone(),
                    token: new_token.expose_secret().to_string(),
                    seed_hash: seed_hash.clone(),
                };
                remember_pending(ctx, &key, pending);
                crash_point("after-journal");
                save_pending(ctx, conn, ns, &key, Some(&token_secret)).await
            } else {
                withdraw_intent(ctx, conn, ns, &token_secret).await;
                Ok(None)
            }
        }
        Err(_) => {
            withdraw_intent(ctx, conn, ns, &token_secret).await;
            Ok(None)
        }
    };
    let live_after = match settled {
        Ok(Some(saved)) => tokens::read_live(&saved),
        // Unchanged since the intent was written (which may have created `<name>-token`).
        Ok(None) => tokens::read_live(&token_secret),
        Err(message) => return Ok(remember(not_saved(ctx, conn, &memo, message, now))),
    };
    crash_point("after-save");
    let fingerprint = fingerprint_with(live_after.as_ref());

    // 7. Who the token belongs to.
    let previous_remote = memo.check.last_identity().map(|id| id.remote_id.as_str());
    let identity_url = granted
        .as_ref()
        .ok()
        .and_then(|g| g.identity_url().map(str::to_string));
    let result = match granted {
        Ok(grant) => {
            with_tenant(
                ns.to_string(),
                ctx.validator.identify(&conn.spec, &grant, previous_remote),
            )
            .await
        }
        Err(mut failure) => {
            if from_seed && live.is_some() && failure.kind != FailureKind::Transient {
                failure.message = format!(
                    "Secret {secret_name} changed (a re-authorization) and its refresh_token was refused: {}. The previous token is kept, unused, in Secret {}; put a valid token in {secret_name} (or restore its previous content)",
                    failure.message,
                    tokens::token_secret_name(conn)
                );
            }
            Err(failure)
        }
    };
    let granted_by = GrantedBy {
        at: now,
        identity_url,
    };
    Ok(conclude(ctx, conn, &memo, fingerprint, result, now, granted_by).await)
}

/// The memo and session after the provider answered (a refresh then an identity call, or an
/// identity call with the access token held), remembered for the connection.
async fn conclude(
    ctx: &Context,
    conn: &Connection,
    memo: &Memo,
    fingerprint: String,
    result: Result<crate::providers::Session, Failure>,
    now: Timestamp,
    granted_by: GrantedBy,
) -> Validated {
    let policy = &ctx.config.policy;
    let key = uid(conn);
    let remember = |memo: Memo| remember(ctx, &key, memo, now);
    let outcome = match &result {
        Ok(_) => "authorized",
        Err(f) if f.kind == FailureKind::Transient => "transient",
        Err(_) => "rejected",
    };
    ctx.metrics.validated(conn.spec.provider, outcome);

    match result {
        Err(failure) if failure.kind == FailureKind::Transient => {
            info!(reason = %failure.reason, "validation failed (transient): {}", failure.message);
            let mut next = policy.after_transient(
                Some(memo),
                &memo.check,
                fingerprint,
                now,
                failure.retry_after,
                jitter(),
                &failure.message,
            );
            // An outage and a typo'd host look the same at first, not after a few attempts.
            let attempt = match next.outcome {
                schedule::Outcome::Unavailable { attempt } => attempt,
                _ => 0,
            };
            if attempt + 1 >= UNREACHABLE_EVENT_AFTER
                && let Some((field, host)) = crate::providers::rules::own_host(&conn.spec)
                && let Some(message) = next.check.unavailable.as_mut()
            {
                message.push_str(&format!(
                    "; {field} names {host}: if this persists, check it for a typo (a provider outage rarely lasts this long)"
                ));
            }
            // Once per run of failures.
            if attempt + 1 == UNREACHABLE_EVENT_AFTER {
                let note = next.check.unavailable.clone().unwrap_or_default();
                publish(ctx, conn, EventType::Warning, PROVIDER_UNREACHABLE, &note).await;
            }
            remember(next)
        }
        Err(failure) => remember(rejected(ctx, conn, memo, fingerprint, &failure).await),
        Ok(session) => {
            let identity = Identity {
                remote_id: session.remote_id.clone(),
                instance_url: session.instance_url.clone(),
                user: session.user.clone(),
            };
            let memo = policy.after_success(
                fingerprint.clone(),
                now,
                session.expires_at,
                schedule::phase(&uid(conn)),
                identity,
            );
            let next = memo.next_check_at.expect("success schedules a recheck");
            let mut validated = remember(memo);
            validated.session = Some(SessionData {
                access_token: session.access_token.expose_secret().to_string(),
                instance_url: session.instance_url.clone(),
                expires_at: session.expires_at.map(|t| t.to_string()),
                ca_bundle: ctx
                    .config
                    .validator
                    .extra_roots
                    .as_ref()
                    .map(|r| r.pem().to_vec()),
                annotations: BTreeMap::from_iter(
                    [
                        (schedule::FINGERPRINT_ANNOTATION, Some(fingerprint)),
                        (schedule::NEXT_CHECK_ANNOTATION, Some(next.to_string())),
                        (schedule::GRANTED_AT_ANNOTATION, Some(granted_by.at.to_string())),
                        (schedule::IDENTITY_URL_ANNOTATION, granted_by.identity_url),
                    ]
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v?))),
                ),
            });
            validated
        }
    }
}

/// The access token the session Secret holds, with what was kept of its grant; only when the
/// session was validated for the current inputs (`fingerprint`) and has everything a recheck needs.
struct HeldSession {
    access_token: String,
    instance_url: String,
    expires_at: Option<Timestamp>,
    granted_at: Timestamp,
    identity_url: Option<String>,
}

/// A text value of the session Secret (trimmed; `None` when absent, empty or not UTF-8).
fn session_text<'a>(session: &'a Secret, key: &str) -> Option<&'a str> {
    let value = session.data.as_ref()?.get(key)?;
    crate::providers::secret_text(&value.0).ok().flatten()
}

/// When the access token the session Secret holds expires, if it says.
fn session_expiry(session: Option<&Secret>) -> Option<Timestamp> {
    session_text(session?, children::session_keys::EXPIRES_AT)?
        .parse()
        .ok()
}

fn held_session(session: Option<&Secret>, fingerprint: &str) -> Option<HeldSession> {
    let session = session?;
    let annotations = session.metadata.annotations.as_ref()?;
    if annotations
        .get(schedule::FINGERPRINT_ANNOTATION)
        .map(String::as_str)
        != Some(fingerprint)
    {
        return None;
    }
    let text = |key: &str| session_text(session, key).map(str::to_string);
    Some(HeldSession {
        access_token: text(children::session_keys::ACCESS_TOKEN)?,
        instance_url: text(children::session_keys::INSTANCE_URL)?,
        expires_at: match text(children::session_keys::EXPIRES_AT) {
            None => None,
            Some(t) => Some(t.parse().ok()?),
        },
        granted_at: annotations.get(schedule::GRANTED_AT_ANNOTATION)?.parse().ok()?,
        identity_url: annotations.get(schedule::IDENTITY_URL_ANNOTATION).cloned(),
    })
}

/// Keeps `memo` as what the operator knows of the connection `key`; the validation's conclusion
/// with no new session, looked at again when the memo says.
fn remember(ctx: &Context, key: &str, memo: Memo, now: Timestamp) -> Validated {
    let recheck_in = schedule::wait(&schedule::due(Some(&memo), &memo.fingerprint, now), now);
    let check = memo.check.clone();
    ctx.index.memory(key, |m| m.memo = Some(memo));
    Validated {
        check,
        session: None,
        recheck_in,
    }
}

/// When and by which grant the access token of a session was issued (kept as annotations on the
/// session Secret, for [`schedule::refresh_due`] and [`crate::providers::Validator::current`]).
struct GrantedBy {
    at: Timestamp,
    identity_url: Option<String>,
}

/// Reason when a refresh started by a process that stopped may have rotated the token.
pub const REFRESH_OUTCOME_UNKNOWN: &str = "RefreshOutcomeUnknown";

/// How long an intent fences a token: the limiter wait, the token request and the save.
fn intent_ttl(ctx: &Context) -> Duration {
    let v = &ctx.config.validator;
    v.limiter_max_wait + v.request_timeout + Duration::from_secs(30)
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    k8s_openapi::jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(t)
}

/// Test hook: `CRMCONNECT_TEST_ABORT_AT=<point>` aborts the process there (no cleanup, like a
/// SIGKILL), so the tests can show that a crash at each point of the rotation path loses no token.
fn crash_point(point: &str) {
    if std::env::var("CRMCONNECT_TEST_ABORT_AT").is_ok_and(|p| p == point) {
        eprintln!("CRMCONNECT_TEST_ABORT_AT={point}: aborting");
        std::process::abort();
    }
}

/// A permanent or configuration failure: Inactive with its reason. When the inputs changed since
/// an earlier rejection (the user tried to re-authorize and it failed again), an event says so:
/// the status may not change.
async fn rejected(
    ctx: &Context,
    conn: &Connection,
    memo: &Memo,
    fingerprint: String,
    failure: &Failure,
) -> Memo {
    info!(reason = %failure.reason, kind = ?failure.kind, "validation failed: {}", failure.message);
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
    ctx.config
        .policy
        .after_rejection(&memo.check, fingerprint, failure.reason, &failure.message)
}

/// The connection cannot be reported Active: the live refresh token exists only in memory (and
/// the journal). It is Inactive with `RefreshTokenNotSaved`, and the save is retried with backoff.
fn not_saved(ctx: &Context, conn: &Connection, memo: &Memo, message: String, now: Timestamp) -> Memo {
    warn!("rotated refresh token not saved: {message}");
    let mut retry = ctx.config.policy.after_transient(
        Some(memo),
        &memo.check,
        // Never equal to a real fingerprint: the next reconcile tries the save again.
        String::from("unsaved"),
        now,
        None,
        jitter(),
        &message,
    );
    retry.check = Check::invalid(
        REFRESH_TOKEN_NOT_SAVED,
        format!(
            "the provider issued a new refresh token that could not be saved to Secret {}: {message}; the operator keeps it (in memory and its journal) and retries",
            tokens::token_secret_name(conn)
        ),
    )
    .remembering(memo.check.last_identity());
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

/// Keeps a rotated token in memory and, when configured, in the journal (a failure to journal is
/// logged: the Secret save comes next and is what counts).
fn remember_pending(ctx: &Context, key: &str, pending: tokens::Pending) {
    if let Some(journal) = &ctx.journal
        && let Err(e) = journal.put(key, &pending)
    {
        warn!(error = %e, "could not journal the rotated refresh token; saving it to the Secret");
    }
    ctx.index.memory(key, |m| m.pending = Some(Box::new(pending)));
}

fn forget_pending(ctx: &Context, key: &str) {
    ctx.index.memory(key, |m| m.pending = None);
    if let Some(journal) = &ctx.journal
        && let Err(e) = journal.remove(key)
    {
        warn!(error = %e, "could not remove a saved token from the journal");
    }
}

/// Records `intent` on `<name>-token` with compare-and-swap, creating the Secret (holding `token`
/// from the seed `seed_hash`) when it does not exist. `Ok(None)`: it changed meanwhile.
async fn write_intent(
    ctx: &Context,
    conn: &Connection,
    ns: &str,
    existing: Option<&Secret>,
    intent: &tokens::Intent,
    token: &secrecy::SecretString,
    seed_hash: &str,
) -> Result<Option<Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let writing = ctx.index.writing(&uid(conn));
    let result = match existing {
        None => {
            let secret = tokens::new_token_secret(conn, token.expose_secret(), seed_hash, Some(intent));
            api.create(&kube::api::PostParams::default(), &secret).await
        }
        Some(secret) => {
            let patch = tokens::intent_patch(intent, secret.metadata.resource_version.as_deref());
            api.patch(&secret.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    match result {
        Ok(secret) => {
            writing.wrote(secret.metadata.resource_version.as_deref());
            Ok(Some(secret))
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes our intent from `<name>-token` (the token did not change). Best effort: a stale intent
/// of ours blocks no one but a future holder, which then reports it.
async fn withdraw_intent(ctx: &Context, conn: &Connection, ns: &str, secret: &Secret) {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let patch = tokens::withdraw_patch(secret.metadata.resource_version.as_deref());
    let writing = ctx.index.writing(&uid(conn));
    match api
        .patch(&secret.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(written) => writing.wrote(written.metadata.resource_version.as_deref()),
        Err(e) => {
            warn!(error = %e, secret = %secret.name_any(), "could not withdraw the refresh intent")
        }
    }
}

/// Writes the pending token of `key` (if any) to `<name>-token`, with compare-and-swap on its
/// resourceVersion, retrying on conflict; never over a newer token. `Ok(Some(secret))`: saved;
/// `Ok(None)`: nothing to save, or superseded; `Err`: not saved (it stays pending).
async fn save_pending(
    ctx: &Context,
    conn: &Connection,
    ns: &str,
    key: &str,
    secret: Option<&Secret>,
) -> Result<Option<Secret>, String> {
    let Some(pending) = ctx.index.memory(key, |m| m.pending.as_deref().cloned()) else {
        return Ok(None);
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = tokens::token_secret_name(conn);
    let mut current = secret.cloned();
    for _ in 0..5 {
        let live = current.as_ref().and_then(tokens::read_live);
        match tokens::save_decision(&pending, live.as_ref()) {
            tokens::Save::Done => {
                forget_pending(ctx, key);
                return Ok(current);
            }
            tokens::Save::Superseded => {
                warn!(secret = %name, "a newer refresh token was saved meanwhile; dropping ours");
                forget_pending(ctx, key);
                return Ok(None);
            }
            tokens::Save::Write => {}
        }
        let writing = ctx.index.writing(key);
        let result = match &current {
            None => {
                let secret = tokens::new_token_secret(conn, &pending.token, &pending.seed_hash, None);
                api.create(&kube::api::PostParams::default(), &secret).await
            }
            Some(s) => {
                let patch = tokens::settled_patch(
                    &pending.token,
                    &pending.seed_hash,
                    s.metadata.resource_version.as_deref(),
                );
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
            }
        };
        match result {
            Ok(saved) => {
                writing.wrote(saved.metadata.resource_version.as_deref());
                forget_pending(ctx, key);
                info!(secret = %name, "saved the refresh token");
                return Ok(Some(saved));
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                drop(writing);
                match api.get_opt(&name).await {
                    Ok(fresh) => current = fresh,
                    Err(e) => return Err(e.to_string()),
                }
            }
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
    // What the retriever's pod needs, at once (three streams of the one HTTP/2 connection): its
    // identity, created once (a RoleBinding's roleRef cannot change) and never over an object we
    // did not create (the caller checked), and its session.
    let account = async {
        if observed.service_account.is_none() {
            let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
            let account = children::retriever_service_account(conn);
            api.patch(&account.name_any(), &params, &Patch::Apply(typed(account)))
                .await?;
        }
        Ok::<_, kube::Error>(())
    };
    let binding = async {
        if observed.role_binding.is_none() {
            let api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), ns);
            let binding = children::retriever_role_binding(conn, &ctx.config.retriever);
            api.patch(&binding.name_any(), &params, &Patch::Apply(typed(binding)))
                .await?;
        }
        Ok(())
    };
    let session = async {
        if let Some(session) = session {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
            let writing = ctx.index.writing(&uid(conn));
            let written = api
                .patch(&session.name_any(), &params, &Patch::Apply(typed(session)))
                .await?;
            writing.wrote(written.metadata.resource_version.as_deref());
        }
        Ok(())
    };
    futures::try_join!(account, binding, session)?;
    // Then the Deployment, so its pod finds them.
    let up_to_date = foreign(observed.deployment.as_ref().map(|d| &d.metadata))
        || observed
            .deployment
            .as_ref()
            .is_some_and(|d| children::deployment_up_to_date(d, &deployment));
    if !up_to_date {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let replicas = deployment.spec.replicas;
        let writing = ctx.index.writing(&uid(conn));
        let written = api
            .patch(
                &deployment.name_any(),
                &params,
                &Patch::Apply(typed(deployment.clone())),
            )
            .await?;
        writing.wrote(written.metadata.resource_version.as_deref());
        info!(deployment = %deployment.name_any(), ?replicas, "applied retriever");
    }
    Ok(())
}

/// The org's OrgSettings, created with the defaults when absent (only the first Active connection
/// of an org gets here). Never owned by a Connection: it outlives them all.
pub async fn create_org_settings(ctx: &Context, ns: &str, key: &str) -> Result<OrgSettings, Error> {
    let api: Api<OrgSettings> = Api::namespaced(ctx.client.clone(), ns);
    let mut settings = OrgSettings::new(key, OrgSettingsSpec::default());
    settings.metadata.labels = Some(
        [(
            children::MANAGED_BY.0.to_string(),
            children::MANAGED_BY.1.to_string(),
        )]
        .into(),
    );
    match api
        .create(
            &kube::api::PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &settings,
        )
        .await
    {
        Ok(created) => {
            info!(org_settings = key, "created the org's settings with the defaults");
            Ok(created)
        }
        // Another connection of the org (or a user) was first: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get(key).await?),
        Err(e) => Err(e.into()),
    }
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
    // The cached status is slim (see `state::slim_status`): the index has the whole one's digest.
    let (uid, digest) = (super::uid(conn), super::state::digest(&desired));
    if ctx.index.status_is(&uid, digest) {
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
    ctx.index.status_written(&uid, digest);
    if let Some(t) = super::state::transition(conn.status.as_ref(), &desired) {
        info!(event = t.reason, state = ?desired.state, "{}", t.note);
        let type_ = if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        // Published in a task of its own: the worker is free for the next connection one round
        // trip sooner (an event is not an input of any decision).
        let (recorder, event, regarding) = (
            ctx.recorder.clone(),
            event(type_, t.reason, &t.note),
            conn.object_ref(&()),
        );
        tokio::spawn(async move { send(&recorder, &event, &regarding).await }.in_current_span());
    }
    Ok(())
}

/// Event reason: new credentials for an already rejected connection were rejected too.
pub const REAUTHORIZATION_FAILED: &str = "ReauthorizationFailed";

/// Publishes an event on the connection (a failure to publish is logged, never an error).
pub(crate) async fn publish(ctx: &Context, conn: &Connection, type_: EventType, reason: &str, note: &str) {
    send(&ctx.recorder, &event(type_, reason, note), &conn.object_ref(&())).await;
}

/// Publishes `event` about `regarding`; a failure is logged, never an error.
async fn send(recorder: &Recorder, event: &Event, regarding: &ObjectReference) {
    if let Err(e) = recorder.publish(event, regarding).await {
        warn!(error = %e, "could not publish event");
    }
}

/// An event of a reconcile (notes cut at 1000 characters).
fn event(type_: EventType, reason: &str, note: &str) -> Event {
    Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    }
}
