//! The reconciler. Each reconcile is a pipeline whose steps show in [`reconcile`]:
//! dereference → validate → build → apply → update status.
//!
//! Only [`dereference`], [`apply`] and the validation call touch the network; the decisions
//! ([`state`], [`claims`], [`schedule`], [`children`]) are pure functions with their own tests.

pub mod apply;
pub mod cached;
pub mod children;
pub mod claims;
pub mod dereference;
pub mod index;
pub mod journal;
pub mod leader;
pub mod metrics;
pub mod org_claim;
pub mod schedule;
pub mod server;
pub mod state;
pub mod tokens;
pub mod trigger;

use crate::api::{Connection, State};
use crate::events::Recorder;
use crate::providers::{Validator, ValidatorConfig};
use cached::CachedConnection;
use children::RetrieverSettings;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, debug, info, info_span, warn};

/// Operator settings (from CLI flags / Helm values).
#[derive(Clone, Debug)]
pub struct Config {
    /// Watch only these namespaces (namespaced mode: a controller per namespace, claims per
    /// namespace, every API call namespaced); all namespaces when empty.
    pub namespaces: Vec<String>,
    /// Revalidation and retry policy.
    pub policy: schedule::Policy,
    /// Retriever workloads.
    pub retriever: RetrieverSettings,
    /// Provider HTTP client settings.
    pub validator: ValidatorConfig,
    /// Connections reconciled at the same time.
    pub concurrency: u16,
    /// Reporting instance for events (pod name).
    pub instance: Option<String>,
    /// Address of the `/healthz`, `/readyz` and `/metrics` endpoints; none when `None`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Reconcile only while holding this Lease (several replicas); always when `None`.
    pub leader_election: Option<leader::LeaderElection>,
    /// The write-ahead journal of rotated refresh tokens (directory, key file); none when `None`.
    pub journal: Option<JournalConfig>,
    /// How often a running job's CRM record is read for an abort.
    pub job_abort_check: std::time::Duration,
    /// How long finished runs without a template TTL, and runs that ended without a Job, are kept.
    pub job_ttl: std::time::Duration,
    /// The data processing agreement every connection must accept first; none when `None`.
    pub agreement: Option<crate::api::RequiredAgreement>,
}

/// Where the journal of rotated refresh tokens lives (see [`journal`]).
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// Directory of the entries (an `emptyDir` in the chart).
    pub dir: std::path::PathBuf,
    /// The encryption key, created when absent (a memory-backed `emptyDir` in the chart).
    pub key_file: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            policy: schedule::Policy::default(),
            retriever: RetrieverSettings::default(),
            validator: ValidatorConfig::default(),
            concurrency: 16,
            instance: None,
            leader_election: None,
            metrics_addr: None,
            job_abort_check: crate::jobruns::Settings::default().abort_check,
            job_ttl: crate::jobruns::DEFAULT_TTL,
            agreement: None,
            journal: None,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) recorder: Recorder,
    pub(crate) validator: Validator,
    pub(crate) config: Config,
    /// What is known and remembered of every connection, by UID, with the reverse lookups of
    /// the watches and claims.
    pub(crate) index: Arc<index::Index>,
    /// The write-ahead journal of rotated refresh tokens.
    pub(crate) journal: Option<journal::Journal>,
    /// This process as the holder of refresh intents (instance name and a per-process nonce).
    pub(crate) holder: String,
    /// The Connection caches: one per watched namespace, or one for all (for the metrics).
    pub(crate) stores: Vec<Store<DeserializeGuard<CachedConnection>>>,
    /// Prometheus metrics.
    pub(crate) metrics: metrics::Metrics,
    /// The JobTemplates (cluster-scoped, few): which job types a retriever may claim.
    pub(crate) templates: Store<crate::api::JobTemplate>,
}

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Validator(#[from] crate::providers::ValidatorError),
    #[error("cannot listen on {addr} for /healthz, /readyz and /metrics: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("leader election: {0}")]
    Lease(String),
    #[error("lost the leader lease; exiting so that this replica restarts as a standby")]
    LeadershipLost,
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

/// Reconcile errors. Provider failures are not errors: they are states. These are API problems,
/// retried with backoff; each names the step it happened in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("{step}: {source}")]
    Step {
        step: Step,
        #[source]
        source: kube::Error,
    },
    #[error("Connection has no namespace")]
    NoNamespace,
}

/// The steps of a reconcile, as errors and metrics name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reading the credentials Secret and the children.
    Dereference,
    /// Labelling the Secret, fencing and saving tokens.
    Validate,
    /// Reading or creating the org's OrgSettings.
    OrgSettings,
    /// Reading, creating or passing on the org's OrgClaim.
    OrgClaim,
    /// Applying the session Secret, the retriever and its identity.
    ApplyChildren,
    /// Writing the status.
    Status,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Dereference => "dereference",
            Step::Validate => "validate",
            Step::OrgSettings => "org_settings",
            Step::OrgClaim => "org_claim",
            Step::ApplyChildren => "apply_children",
            Step::Status => "status",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Dereference => "reading the credentials Secret and the connection's objects",
            Step::Validate => "labelling the credentials Secret or saving the token",
            Step::OrgSettings => "reading or creating the org's OrgSettings",
            Step::OrgClaim => "reading or writing the org's OrgClaim",
            Step::ApplyChildren => {
                "applying the session Secret, the retriever Deployment, ServiceAccount or RoleBinding"
            }
            Step::Status => "writing the status",
        })
    }
}

impl Error {
    /// Label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Step { step, .. } => step.label(),
            Error::NoNamespace => "invalid",
        }
    }
}

/// Names the step of a Kubernetes error.
trait AtStep<T> {
    fn at(self, step: Step) -> Result<T, Error>;
}

impl<T> AtStep<T> for Result<T, Error> {
    fn at(self, step: Step) -> Result<T, Error> {
        self.map_err(|e| match e {
            Error::Kube(source) => Error::Step { step, source },
            other => other,
        })
    }
}

/// Event reason: a reconcile failed on a Kubernetes API call (published once per run of failures).
pub const RECONCILE_FAILED: &str = "ReconcileFailed";

fn uid(conn: &Connection) -> String {
    conn.metadata
        .uid
        .clone()
        .unwrap_or_else(|| format!("{}/{}", conn.namespace().unwrap_or_default(), conn.name_any()))
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

/// How long each step of a reconcile took (for the metrics and a debug line).
struct Took {
    last: std::time::Instant,
    steps: Vec<(Step, Duration)>,
}

impl From<std::time::Instant> for Took {
    fn from(started: std::time::Instant) -> Self {
        Took {
            last: started,
            steps: Vec::with_capacity(5),
        }
    }
}

impl Took {
    /// `step` ended now (it began where the previous one ended).
    fn mark(&mut self, step: Step) {
        let now = std::time::Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Took {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, took)) in self.steps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{}={}ms", step.label(), took.as_millis())?;
        }
        Ok(())
    }
}

/// How often a connection whose child name is taken looks again (the foreign object is not watched).
const CHILD_CONFLICT_RECHECK: Duration = Duration::from_secs(30);

/// One reconcile of one Connection.
async fn reconcile(
    guard: Arc<DeserializeGuard<CachedConnection>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let conn = &match &guard.0 {
        Ok(cached) => cached.to_connection(),
        Err(invalid) => {
            // A malformed object must not stop the others: report it and wait for a fix.
            warn!(
                name = invalid.metadata.name.as_deref().unwrap_or_default(),
                namespace = invalid.metadata.namespace.as_deref().unwrap_or_default(),
                error = %invalid.error,
                "ignoring Connection that does not match the schema"
            );
            return Ok(Action::await_change());
        }
    };
    let ns = conn.namespace().ok_or(Error::NoNamespace)?;
    let span = info_span!("reconcile", connection = %format!("{ns}/{}", conn.name_any()));
    let started = std::time::Instant::now();
    async move {
        // Whole seconds: the API server stores condition times at second precision.
        let now = Timestamp::from_second(Timestamp::now().as_second()).expect("now is a valid time");
        // 1. dereference: the credentials Secret, the current children, the competing connections.
        let observed = dereference::observe(&ctx, conn, &ns).await.at(Step::Dereference)?;
        let mut took = Took::from(started);
        took.mark(Step::Dereference);
        // 2. validate against the provider, when due — unless a child's name is taken by an object
        // that is not ours: then nothing is validated, written or taken over.
        let foreign = children::foreign_children(conn, &observed.children());
        // An Active connection whose retriever went down (e.g. the CRM refused its session) is
        // revalidated after a minute, at most once a minute: a new session may be all it needs.
        let retriever_down = match conn.status.as_ref().and_then(|s| s.state) {
            Some(State::Active) => schedule::retriever_down(
                children::retriever_down_since(observed.deployment.as_ref()),
                ctx.index.memory(&uid(conn), |m| m.retriever_revalidated),
                now,
            ),
            _ => schedule::Due::OnChange,
        };
        let early = retriever_down == schedule::Due::Now;
        if early {
            ctx.index.memory(&uid(conn), |m| m.retriever_revalidated = Some(now));
        }
        // A connection that has not accepted the required agreement waits: its tokens are not used.
        let waiting = state::agreement_check(conn, ctx.config.agreement.as_ref());
        let mut validated = if let Some(check) = waiting.clone() {
            apply::Validated {
                check,
                session: None,
                recheck_in: None,
            }
        } else if foreign.is_empty() {
            apply::validate(&ctx, conn, &ns, &observed, now, early)
                .await
                .at(Step::Validate)?
        } else {
            apply::Validated {
                check: state::Check::invalid(
                    state::reasons::CHILD_CONFLICT,
                    format!(
                        "{} already exists in namespace {ns} and was not created for this Connection; the operator never takes over or changes an object it did not create. Rename or delete it (or use another Connection name); checked again every {}s",
                        foreign.join(" and "),
                        CHILD_CONFLICT_RECHECK.as_secs()
                    ),
                ),
                session: None,
                recheck_in: Some(CHILD_CONFLICT_RECHECK),
            }
        };
        took.mark(Step::Validate);
        if let Some(wait) = schedule::wait(&retriever_down, now).filter(|_| !early) {
            validated.recheck_in = Some(validated.recheck_in.map_or(wait, |d| d.min(wait)));
        }
        // The org's job settings, once the org is known (read here, created below when Active).
        let remote_id = match &validated.check.known {
            state::Known::Valid(id) => Some(id.remote_id.clone()),
            _ => conn.status.as_ref().and_then(|s| s.remote_id.clone()),
        };
        let org_key = remote_id.and_then(|id| crate::api::org_key(conn.spec.provider, &id));
        // The org's claim is held (or its holder known) before the status can say Active and
        // before the retriever gets a replica: asked exactly when `decide` asks. The org's
        // settings are read alongside (the claim does not depend on them), except by a connection
        // that has never recorded its org: it creates them when it wins, without reading first (a
        // refused create reads them: see `create_org_settings`). Settings still missing are
        // created below once Active.
        let read_settings = async {
            match &org_key {
                Some(key) => dereference::org_settings(&ctx, &ns, key).await.at(Step::OrgSettings),
                None => Ok(None),
            }
        };
        let hold = async |remote_id: &str| {
            org_claim::hold(&ctx, conn, &ns, remote_id)
                .await
                .map_err(Error::from)
                .at(Step::OrgClaim)
        };
        let (claim, mut org) = match &validated.check.known {
            state::Known::Valid(id) if !conn.spec.paused && !claims::org_recorded(conn) => {
                let claim = hold(&id.remote_id).await?;
                let org = match &org_key {
                    Some(key) if matches!(claim, claims::Claim::Won) => {
                        Some(apply::create_org_settings(&ctx, &ns, key).await.at(Step::OrgSettings)?)
                    }
                    _ => read_settings.await?,
                };
                (Some(claim), org)
            }
            state::Known::Valid(id) if !conn.spec.paused => {
                let (claim, org) = futures::try_join!(hold(&id.remote_id), read_settings)?;
                (Some(claim), org)
            }
            _ => (None, read_settings.await?),
        };
        let defaults = crate::api::OrgSettingsSpec::default();
        let runnable = children::runnable_templates(
            ctx.templates.state().iter().map(|t| t.as_ref()),
            conn.spec.provider,
        );
        // 3. build the desired status and children (pure).
        let retriever = {
            let jobs = org_key.as_deref().map(|key| children::OrgJobs {
                key,
                settings: org.as_ref().map(|o| &o.spec).unwrap_or(&defaults),
                templates: &runnable,
            });
            children::observe_retriever(
                observed.deployment.as_ref(),
                &children::retriever_deployment(conn, &ctx.config.retriever, jobs.as_ref(), 1),
            )
        };
        let mut status = state::decide(
            conn,
            &validated.check,
            |_| claim.expect("the claim is held for valid tokens of a connection not paused"),
            &retriever,
            &Time(now),
        );
        // Refused tokens release the org (if held) to the next connection with valid ones.
        if status.state == Some(State::Inactive)
            && let Some(remote_id) = conn.status.as_ref().and_then(|s| s.remote_id.as_deref())
        {
            org_claim::release(&ctx, conn, remote_id).await.map_err(Error::from).at(Step::OrgClaim)?;
        }
        if let (Some(key), None, Some(State::Active)) = (&org_key, &org, status.state) {
            org = Some(apply::create_org_settings(&ctx, &ns, key).await.at(Step::OrgSettings)?);
        }
        took.mark(Step::OrgClaim);
        if status.state != Some(State::Conflict) {
            status.org_settings = org.as_ref().map(|o| o.name_any());
        }
        if waiting.is_some() {
            status.required_agreement = ctx.config.agreement.clone();
        }
        // The validation above was made for this value (it is an input of the fingerprint).
        status.last_handled_revalidate = conn
            .annotations()
            .get(schedule::REVALIDATE_ANNOTATION)
            .cloned();
        let replicas = i32::from(status.state == Some(State::Active));
        let jobs = org_key.as_deref().map(|key| children::OrgJobs {
            key,
            settings: org.as_ref().map(|o| &o.spec).unwrap_or(&defaults),
            templates: &runnable,
        });
        let deployment = children::retriever_deployment(conn, &ctx.config.retriever, jobs.as_ref(), replicas);
        let session = validated
            .session
            .as_ref()
            .map(|s| children::session_secret(conn, s));
        // 4. apply the children (only what changed).
        apply::children(&ctx, conn, &ns, &observed, session, deployment)
            .await
            .at(Step::ApplyChildren)?;
        took.mark(Step::ApplyChildren);
        // 5. update status (skipped when nothing changed) and tell the user about transitions.
        apply::status(&ctx, conn, &ns, status).await.at(Step::Status)?;
        took.mark(Step::Status);
        ctx.index.memory(&uid(conn), |m| m.failures = 0);
        ctx.metrics.reconciled(started.elapsed().as_secs_f64());
        ctx.metrics.steps(&took.steps);
        debug!(took = %took, "reconciled");
        // The next recheck waits in the index, not in kube's scheduler (see `Index::recheck_in`).
        ctx.index.recheck_in(
            &uid(conn),
            validated.recheck_in.map(|d| d.max(Duration::from_millis(100))),
        );
        Ok(Action::await_change())
    }
    .instrument(span)
    .await
}

fn error_policy(guard: Arc<DeserializeGuard<CachedConnection>>, error: &Error, ctx: Arc<Context>) -> Action {
    let Ok(cached) = &guard.0 else {
        return Action::await_change();
    };
    let conn = &cached.to_connection();
    ctx.metrics.reconcile_failed();
    let attempt = ctx.index.memory(&uid(conn), |m| {
        m.failures = m.failures.saturating_add(1);
        m.failures - 1
    });
    let delay = crate::providers::retry_delay(
        attempt,
        None,
        Duration::from_secs(1),
        Duration::from_secs(120),
        jitter(),
    );
    warn!(connection = %conn.name_any(), error = %error, kind = error.label(), retry_in = ?delay, "reconcile failed");
    // Tell the user too, once per run of failures (the log has every one).
    if attempt == 0 {
        let (ctx, conn, note) = (
            ctx.clone(),
            conn.clone(),
            format!("{error}; retrying with backoff"),
        );
        tokio::spawn(async move {
            apply::publish(
                &ctx,
                &conn,
                kube::runtime::events::EventType::Warning,
                RECONCILE_FAILED,
                &note,
            )
            .await;
        });
    }
    Action::requeue(delay)
}

/// Runs the controller until `shutdown` resolves, then finishes in-flight reconciles and returns.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    // One shutdown signal for the controller and the HTTP endpoints (also sent when the leader
    // lease is lost).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_signal.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let validator = Validator::new(config.validator.clone())?;
    let journal = match &config.journal {
        Some(j) => Some(journal::Journal::open(&j.dir, &j.key_file)?),
        None => None,
    };
    // Tokens a previous run of this pod received and did not confirm saved: saved first, by every
    // replica (leader or not), each only over the token it replaced.
    let replayed = match &journal {
        Some(journal) => journal::replay(&client, journal).await,
        None => vec![],
    };
    // One controller per watched namespace (each with its own namespaced watches), or one for
    // the whole cluster; they share the Context (validator, limiter, memories, metrics).
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    // The index is fed by the same watch events, before the cache and the controller see them.
    let index = index::Index::new(scopes.len());
    for (uid, pending) in replayed {
        index.memory(&uid, |m| m.pending = Some(Box::new(pending)));
    }
    let controllers: Vec<_> = scopes
        .iter()
        .map(|scope| {
            let connections: Api<DeserializeGuard<CachedConnection>> = scoped_api(&client, scope.as_deref());
            // The cache keeps what decisions read (see `cached`).
            let (reader, writer) = reflector::store();
            let mut indexer = index.writer(scope.clone());
            // A connection's claim changing (new org ID, gone inactive, deleted) re-decides its
            // rivals: found from this same watch (every event, status changes included), so the
            // Connections are not listed and watched twice; woken through the index, like the
            // rest (below).
            let (peers, namespaced) = (index.clone(), scope.is_some());
            let stream = watcher(
                connections,
                watcher::Config::default().any_semantic().page_size(PAGE_SIZE),
            )
            .default_backoff()
            .inspect(move |event| {
                if let Ok(event) = event {
                    if let watcher::Event::Apply(c)
                    | watcher::Event::InitApply(c)
                    | watcher::Event::Delete(c) = event
                    {
                        for rival in dereference::rivals_of(&peers, c, namespaced) {
                            peers.wake(rival);
                        }
                    }
                    indexer.apply(event);
                }
            })
            .reflect(writer)
            .touched_objects()
            // Its own status writes do not wake a connection again (the reconcile that wrote
            // them knew everything they say): only a new spec (generation), annotations (e.g.
            // crmconnect.io/revalidate) or labels do. A deletion needs no reconcile of its
            // own (the children go with their owner; its rivals were sent above).
            .predicate_filter(
                predicates::generation
                    .combine(predicates::annotations)
                    .combine(predicates::labels),
                PredicateConfig::default(),
            );
            // And a connection woken through the index: a rival's claim changed (above), a child
            // changed while it was writing one (see `index::Writing`), its recheck is due (see
            // `Index::recheck_in`).
            let controller = Controller::for_stream(stream, reader).reconcile_on(index.wakes(scope.clone()));
            (scope.clone(), controller)
        })
        .collect();
    let stores: Vec<_> = controllers.iter().map(|(_, c)| c.store()).collect();
    let reporter = Reporter {
        controller: "connection-operator".into(),
        instance: config.instance.clone(),
    };
    let (templates, templates_writer) = reflector::store::<crate::api::JobTemplate>();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        validator,
        index: index.clone(),
        journal,
        holder: format!(
            "{}/{:08x}",
            config.instance.as_deref().unwrap_or("connection-operator"),
            rand::random::<u32>()
        ),
        stores,
        config: config.clone(),
        metrics: metrics::Metrics::default(),
        templates: templates.clone(),
    });
    let server = match config.metrics_addr {
        Some(addr) => {
            let (bound, task) = server::serve(addr, ctx.clone(), stopped())
                .await
                .map_err(|source| StartError::Listen { addr, source })?;
            info!(address = %bound, "serving /healthz, /readyz and /metrics");
            Some(task)
        }
        None => None,
    };
    // With leader election, a standby waits here (serving /healthz) and reconciles nothing.
    let leadership = match &config.leader_election {
        Some(election) => match leader::acquire(ctx.client.clone(), election, stopped()).await {
            Ok(Some(leadership)) => Some(leadership),
            Ok(None) => {
                if let Some(server) = server {
                    let _ = server.await;
                }
                return Ok(());
            }
            Err(e) => return Err(StartError::Lease(e.to_string())),
        },
        None => None,
    };
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(leadership) = &leadership {
        let (lease_lost, lost, stop_tx) = (leadership.lost(), lost.clone(), stop_tx.clone());
        let mut stopping = stop_tx.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = lease_lost => {
                    warn!("lost the leader lease: stopping (a standby takes over; this process exits)");
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = stop_tx.send(true);
                }
                _ = stopping.wait_for(|stop| *stop) => {}
            }
        });
    }
    // The JobTemplates decide which job types each retriever claims (its flags): read in full
    // before the first reconcile (a reconcile before that would roll every retriever for nothing),
    // and any change of one re-decides every connection (an unchanged one writes nothing).
    let (template_changed, _) = tokio::sync::broadcast::channel::<()>(4);
    let template_watch = {
        let changed = template_changed.clone();
        let stream = watcher(
            Api::<crate::api::JobTemplate>::all(ctx.client.clone()),
            list_config(),
        )
        .default_backoff()
        .reflect(templates_writer)
        .touched_objects();
        let stop = stopped();
        tokio::spawn(async move {
            tokio::select! {
                _ = stream.for_each(|_| {
                    let _ = changed.send(());
                    std::future::ready(())
                }) => {}
                _ = stop => {}
            }
        })
    };
    // At most a while: JobTemplates that cannot be listed (their CRD missing, RBAC) must not stop
    // the connections from being served; until they can, retrievers claim no type (and the watch's
    // first list re-decides every connection).
    tokio::select! {
        ready = tokio::time::timeout(TEMPLATES_WAIT, templates.wait_until_ready()) => {
            if ready.is_err() {
                warn!(waited = ?TEMPLATES_WAIT, "cannot list JobTemplates yet: retrievers claim no job type until they can be read");
            }
        }
        _ = stopped() => {}
    }
    let managed = format!("{}={}", children::MANAGED_BY.0, children::MANAGED_BY.1);
    info!(
        namespaces = %if config.namespaces.is_empty() { "<all>".to_string() } else { config.namespaces.join(",") },
        "starting controller"
    );
    // The JobRun controller runs beside it, under the same leadership and shutdown.
    let job_runs = crate::jobruns::run(
        ctx.client.clone(),
        config.namespaces.clone(),
        &config.validator,
        crate::jobruns::Settings {
            abort_check: config.job_abort_check,
            host_aliases: config.retriever.host_aliases.clone(),
            ttl: config.job_ttl,
            concurrency: config.concurrency,
        },
        ctx.metrics.jobs.clone(),
        config.instance.clone(),
        stopped(),
    );
    // The connections' rechecks, sent to their controllers when due (see `Index::rechecks`).
    let rechecks = {
        let (index, stop) = (index.clone(), stopped());
        tokio::spawn(async move {
            tokio::select! {
                _ = index.rechecks() => {}
                _ = stop => {}
            }
        })
    };
    let connections_done = futures::future::join_all(controllers.into_iter().map(|(scope, controller)| {
        let (credentials_index, settings_index) = (index.clone(), index.clone());
        let (own_secrets, own_deployments) = (index.clone(), index.clone());
        // Metadata-only requests, decoded without their managedFields (see `trigger`).
        let secrets: Api<trigger::Meta<Secret>> = scoped_api(&ctx.client, scope.as_deref());
        let deployments: Api<trigger::Meta<Deployment>> = scoped_api(&ctx.client, scope.as_deref());
        let org_settings: Api<trigger::Meta<crate::api::OrgSettings>> =
            scoped_api(&ctx.client, scope.as_deref());
        let templates_changed = futures::stream::unfold(template_changed.subscribe(), |mut rx| async move {
            match rx.recv().await {
                Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some(((), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
            }
        });
        controller
            .with_config(kube::runtime::controller::Config::default().concurrency(config.concurrency))
            // A JobTemplate created, changed or deleted: every connection's claimable types.
            .reconcile_all_on(templates_changed)
            // Only labelled Secrets are watched (credentials the operator has seen, and its own
            // session Secrets): memory stays proportional to the connections, not to every
            // Secret in the cluster.
            // Metadata only: which Secret changed is all a trigger needs (its data is read when
            // reconciling), so no token is held in a cache.
            .watches_stream(
                watcher(
                    secrets.clone(),
                    list_config().labels(&format!("{}=true", children::CREDENTIALS_LABEL)),
                )
                .default_backoff()
                .touched_objects(),
                move |secret: trigger::Meta<Secret>| {
                    dereference::connections_using_secret(&credentials_index, &secret)
                },
            )
            // Its own Secrets (`<name>-session`, `<name>-token`): a hand edit, e.g. removing a
            // stale refresh intent, is seen at once. Metadata only (owner references), as for the
            // Deployments (no pod templates).
            // The event of a write this process made itself wakes no one (the reconcile that
            // made it knew); a Deployment's status changing (the retriever up or down) does.
            .owns_stream(
                watcher(secrets, list_config().labels(&managed))
                    .default_backoff()
                    .touched_objects()
                    .try_filter(move |s| std::future::ready(!own_secrets.own_write(kube::Resource::meta(s)))),
            )
            .owns_stream(
                watcher(deployments, list_config().labels(&managed))
                    .default_backoff()
                    .touched_objects()
                    .try_filter(move |d| {
                        std::future::ready(!own_deployments.own_write(kube::Resource::meta(d)))
                    }),
            )
            // An org's settings changing rolls the retrievers that use them.
            .watches(
                org_settings,
                list_config(),
                move |settings: trigger::Meta<crate::api::OrgSettings>| {
                    dereference::connections_using_org_settings(&settings_index, &settings)
                },
            )
            .graceful_shutdown_on(stopped())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    match e {
                        kube::runtime::controller::Error::ObjectNotFound(_) => {}
                        other => warn!(error = %other, "controller error"),
                    }
                }
            })
    }));
    let (_, job_runs) = futures::join!(connections_done, job_runs);
    rechecks.abort();
    template_watch.abort();
    if let Err(e) = job_runs {
        warn!(error = %e, "the JobRun controller could not start");
    }
    if let Some(server) = server {
        let _ = server.await;
    }
    info!("controller stopped");
    if lost.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(StartError::LeadershipLost);
    }
    if let Some(leadership) = leadership {
        leadership.release().await;
    }
    Ok(())
}

/// How long the start waits for the first list of JobTemplates.
const TEMPLATES_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `Api::namespaced` in `scope`, or `Api::all`.
/// How the watches of children and related objects start: a paginated LIST (500 objects a page).
/// (Streaming lists were tried for issue 13; see BENCHMARKS.md for why they are not used yet.)
pub(crate) fn list_config() -> watcher::Config {
    watcher::Config::default().page_size(PAGE_SIZE)
}

/// Objects per LIST page. A page is decoded whole before its objects are handed on one by one;
/// at kube's default (500) the first LISTs after a start made most of the operator's peak memory.
const PAGE_SIZE: u32 = 100;

fn scoped_api<K>(client: &Client, scope: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The ObjectRef the controller uses for a connection.
pub(crate) fn object_ref(ns: &str, name: &str) -> ObjectRef<DeserializeGuard<CachedConnection>> {
    ObjectRef::new(name).within(ns)
}
