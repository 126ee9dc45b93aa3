//! The JobRun controller: runs each claimed CRM job as a batch Job from the JobTemplate of its
//! type, and writes the outcome back to the CRM job record (the system of record).
//!
//! A `Claimed` JobRun of an Active connection becomes a Job (same name) once a conditional write
//! renewing its claim landed on the record just read (the fence); `Running`, then `Succeeded` or `Failed` from the Job's status, each written once to the
//! CRM with a conditional write (never over `Aborted`: a job aborted or deleted in the CRM
//! suspends the Job and the JobRun is `Aborted`). A paused connection's runs that have not started
//! go back to `Holding` in the CRM; an inactive connection's outcomes wait for its
//! re-authorization. A run whose connection was deleted is served by the Active connection that
//! now holds its org. A missing template is a condition and an event. A Job deleted before its
//! outcome was written is reported `Failed` and never created again (the JobRun is its Job's only
//! once the outcome is written). Finished runs go into the
//! org's history (`OrgSettings.status`). See `docs/jobs.md`.

pub mod budget;
pub mod build;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use crate::events::Recorder;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use crate::api::{Connection, JobPhase, JobRun, JobRunStatus, JobTemplate, State, template_name};
use crate::controller::children::{FIELD_MANAGER, MANAGED_BY, session_keys};
use crate::crm::{self, ClaimOutcome, JobQueue, JobStatus, Report, Target};

/// Condition type on a JobRun: its type's JobTemplate exists (and allows its provider).
pub const TEMPLATE_FOUND: &str = "TemplateFound";
/// Reason and event reason: no usable JobTemplate for the run's type.
pub const TEMPLATE_MISSING: &str = "TemplateMissing";

/// How often a run given back for want of a JobTemplate looks for it again (besides the template
/// watch).
const RECHECK_TEMPLATE: Duration = Duration::from_secs(600);

/// Whether the run's condition says it waits for its JobTemplate.
fn waits_for_template(status: &JobRunStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == TEMPLATE_FOUND && c.status == "False")
}

/// Settings of the JobRun controller.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often a running job's CRM record is read for an abort (`--job-abort-check`).
    pub abort_check: Duration,
    /// `/etc/hosts` entries of Job pods (the retrievers' own).
    pub host_aliases: Vec<k8s_openapi::api::core::v1::HostAlias>,
    /// How long a finished Job (and with it its JobRun) is kept when its JobTemplate sets no
    /// `ttlSecondsAfterFinished`, and how long a run that ended without a Job of its own (aborted
    /// before it started, given back to the CRM queue, its Job deleted) is kept (`--job-ttl`). The
    /// org's history keeps every outcome.
    pub ttl: Duration,
    /// JobRuns reconciled at once (`--concurrency`): one namespace's flood of runs waits its turn
    /// instead of taking every connection to the API server and the CRMs.
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            abort_check: Duration::from_secs(60),
            host_aliases: Vec::new(),
            ttl: DEFAULT_TTL,
            concurrency: 16,
        }
    }
}

/// The default of [`Settings::ttl`]: a day.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

struct Ctx {
    client: Client,
    recorder: Recorder,
    queue: JobQueue,
    hosts: crate::providers::rules::HostPolicy,
    settings: Settings,
    metrics: metrics::JobMetrics,
    budget: budget::Budget,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespaces: Vec<String>,
    validator: &crate::providers::ValidatorConfig,
    settings: Settings,
    metrics: metrics::JobMetrics,
    instance: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), reqwest::Error> {
    let scoped = |client: &Client,
                  namespace: Option<&str>|
     -> (Api<JobRun>, Api<Job>, Api<DeserializeGuard<Connection>>) {
        match namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        }
    };
    let templates: Api<JobTemplate> = Api::all(client.clone());
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let apis: Vec<_> = scopes
        .iter()
        .map(|scope| scoped(&client, scope.as_deref()))
        .collect();
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "connection-operator".into(),
                instance,
            },
        ),
        queue: JobQueue::new(validator.request_timeout, validator.extra_roots.as_ref())?,
        hosts: validator.hosts.clone(),
        settings,
        metrics,
        budget: budget::Budget::default(),
        client,
    });
    // One controller per watched namespace, or one for the whole cluster.
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    futures::future::join_all(apis.into_iter().map(|(runs, jobs, connections)| {
        // The cache drops what no decision reads (`managedFields`, kubectl's last-applied copy):
        // most of a JobRun's size.
        let (reader, writer) = kube::runtime::reflector::store();
        let stream = kube::runtime::watcher(runs, crate::controller::list_config())
            .default_backoff()
            .modify(trim)
            .reflect(writer)
            .touched_objects();
        let controller = Controller::for_stream(stream, reader)
            .with_config(kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency));
        let store = controller.store();
        ctx.metrics.watch(store.clone());
        let (by_connection, by_template) = (store.clone(), store);
        controller
            // A Job's progress wakes its JobRun (named in the Job's annotation: the JobRun is owned
            // by its Job, not the other way round, so `owns` would not map it).
            .watches(
                jobs,
                crate::controller::list_config().labels(&managed),
                |job: Job| {
                    let run = job.annotations().get(build::JOBRUN_ANNOTATION).cloned();
                    run.zip(job.namespace())
                        .map(|(run, ns)| ObjectRef::<JobRun>::new(&run).within(&ns))
                },
            )
            // A connection turning Active starts its runs, and those of its org left by a deleted
            // connection (which it adopts).
            // (A Connection that does not match the schema wakes nothing and stops nothing.)
            .watches(
                connections,
                crate::controller::list_config(),
                move |guard: DeserializeGuard<Connection>| {
                    let Ok(c) = guard.0 else { return vec![] };
                    let org = org_of(&c);
                    runs_where(&by_connection, |r| {
                        r.namespace() == c.namespace()
                            && (r.spec.connection == c.name_any()
                                || (org.is_some() && r.labels().get(crate::api::labels::ORG) == org.as_ref()))
                    })
                },
            )
            // A template appearing starts the runs waiting for it.
            .watches(
                templates.clone(),
                crate::controller::list_config(),
                move |t: JobTemplate| {
                    runs_where(&by_template, |r| template_name(&r.spec.job_type) == t.name_any())
                },
            )
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    match e {
                        kube::runtime::controller::Error::ObjectNotFound(_) => {}
                        other => warn!(error = %other, "jobrun controller error"),
                    }
                }
            })
    }))
    .await;
    Ok(())
}

/// What the JobRun cache keeps of a run: all but `managedFields` and kubectl's
/// `last-applied-configuration` annotation (a copy of the whole object).
fn trim(run: &mut JobRun) {
    crate::controller::cached::trim_meta(&mut run.metadata);
}

/// The org key of a connection that has recorded its org.
fn org_of(c: &Connection) -> Option<String> {
    let id = c.status.as_ref()?.org_id.as_deref()?;
    crate::api::org_key(c.spec.provider, id)
}

/// The connection that serves a run: its own while it exists, else the Active connection of the
/// same namespace that now holds the run's org (a new Connection for the org adopts the runs its
/// predecessor left in flight).
async fn serving_connection(ctx: &Ctx, run: &JobRun, ns: &str) -> Result<Option<Connection>, Error> {
    let api = Api::<Connection>::namespaced(ctx.client.clone(), ns);
    if let Some(own) = api.get_opt(&run.spec.connection).await? {
        return Ok(Some(own));
    }
    let Some(org) = run.labels().get(crate::api::labels::ORG) else {
        return Ok(None);
    };
    // Listed through DeserializeGuard: one Connection that does not match the schema (applied
    // before a CRD upgrade, say) must not stop the others' runs from being adopted.
    let adopter = Api::<DeserializeGuard<Connection>>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|g| g.0.ok())
        .find(|c| {
            c.status.as_ref().and_then(|s| s.state) == Some(State::Active) && org_of(c).as_ref() == Some(org)
        });
    if let Some(c) = &adopter {
        info!(jobrun = %run.name_any(), connection = %c.name_any(), "served by the connection that now holds its org");
    }
    Ok(adopter)
}

/// Reason (condition `Started`, event): the run's org is not its connection's.
pub const ORG_MISMATCH: &str = "OrgMismatch";

/// Why `connection` must not serve `run`: the run names another org (its `crmconnect.io/org`
/// label) than the one the connection holds, or names none. `None`: it may (a connection that has
/// not recorded its org yet is not Active, and serves nothing anyway).
fn org_mismatch(run: &JobRun, connection: &Connection) -> Option<String> {
    let held = org_of(connection)?;
    match run.labels().get(crate::api::labels::ORG) {
        Some(org) if *org == held => None,
        Some(org) => Some(format!(
            "the run is for org {org}, but its connection {} holds org {held}: it is never run with that connection's session",
            connection.name_any()
        )),
        None => Some(format!(
            "the run names no org (label {}): it is never run with connection {}'s session",
            crate::api::labels::ORG,
            connection.name_any()
        )),
    }
}

/// True when a connection's session may be used to write to the CRM: Active or Paused (a paused
/// connection's token is valid). An inactive one's is dead: its runs' reports wait for it.
fn can_report(connection: Option<&Connection>) -> bool {
    matches!(
        connection.and_then(|c| c.status.as_ref()).and_then(|s| s.state),
        Some(State::Active | State::Paused)
    )
}

fn runs_where(store: &Store<JobRun>, wanted: impl Fn(&JobRun) -> bool) -> Vec<ObjectRef<JobRun>> {
    store
        .state()
        .iter()
        .filter(|r| wanted(r))
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

fn error_policy(run: Arc<JobRun>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    if let Error::Kube(kube::Error::Api(e)) = error
        && e.code == 409
    {
        // A status write on a version already changed: again at once, from the fresh object.
        return Action::requeue(Duration::from_millis(500));
    }
    warn!(jobrun = %run.name_any(), %error, "jobrun reconcile failed; retrying in 15s");
    Action::requeue(Duration::from_secs(15))
}

/// A run nothing more happens to: its outcome reported (Succeeded, Failed, Aborted), or given back
/// to the CRM queue (Holding; a new claim is a new run), or left without a claim by a retriever
/// that stopped between creating it and writing its status.
fn settled(status: &JobRunStatus) -> bool {
    let reported = status.reported.is_some() && status.reported == status.phase;
    let done = status
        .phase
        .is_some_and(|p| p.is_terminal() || p == JobPhase::Holding);
    ((done && reported) || (status.phase.is_none() && status.claim.is_none())) && !waits_for_template(status)
}

/// How long until a run is `ttl` old (by its creation, a deterministic moment); `None` once it is.
fn ttl_left(ctx: &Ctx, run: &JobRun) -> Option<Duration> {
    let created = run.metadata.creation_timestamp.as_ref().map(|t| t.0)?;
    let age = Duration::try_from(Timestamp::now().duration_since(created)).unwrap_or_default();
    ctx.settings.ttl.checked_sub(age).filter(|left| !left.is_zero())
}

/// Deletes a settled run that has no Job of its own once it is `ttl` old (by its creation: a
/// deterministic moment); before that, comes back then. A precondition on its UID and version:
/// a run changed meanwhile is looked at again instead.
async fn collect(ctx: &Ctx, run: &JobRun, ns: &str) -> Result<Action, Error> {
    if let Some(left) = ttl_left(ctx, run) {
        return Ok(Action::requeue(left + Duration::from_secs(1)));
    }
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: run.uid(),
            resource_version: run.resource_version(),
        }),
        ..Default::default()
    };
    match Api::<JobRun>::namespaced(ctx.client.clone(), ns)
        .delete(&run.name_any(), &params)
        .await
    {
        Ok(_) => {
            info!(jobrun = %run.name_any(), "collected: ended without a Job of its own, and older than the job TTL")
        }
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

async fn reconcile(run: Arc<JobRun>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let status = run.status.clone().unwrap_or_default();
    if settled(&status) && run.owner_references().is_empty() {
        // Done, and not (yet) its Job's. A run whose Job outlived the report without owning it
        // (the write after the report failed) is handed to the Job now; one without a Job (it
        // ended before one was made, or its Job was deleted) is collected once it is `ttl` old.
        if status.job.is_some() && finish(&ctx, &ns, &build::job_name(&name), &run).await? {
            return Ok(Action::await_change());
        }
        return collect(&ctx, &run, &ns).await;
    }
    if status.phase.is_some_and(JobPhase::is_terminal) && status.reported == status.phase {
        // Done, and its Job's: the Job's TTL collects both.
        return Ok(Action::await_change());
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let connection = serving_connection(&ctx, &run, &ns).await?;
    if let Some(why) = connection.as_ref().and_then(|c| org_mismatch(&run, c)) {
        // Never served with a session of another org than the run's (a forged or stale run): no
        // Job, no CRM write; the condition says why.
        let mut next = status.clone();
        if set_condition(&mut next.conditions, "Started", "False", ORG_MISMATCH, &why) {
            warn!(jobrun = %name, "{why}");
            publish(&ctx, &run, EventType::Warning, ORG_MISMATCH, &why).await;
        }
        write_status(&ctx, &run, &status, next).await?;
        return Ok(Action::await_change());
    }
    let serving = connection
        .as_ref()
        .map(|c| c.name_any())
        .unwrap_or_else(|| run.spec.connection.clone());
    let job_name = build::job_name(&name);
    let Some(job) = jobs.get_opt(&job_name).await? else {
        if status.job.is_some() {
            // Created once and gone before its outcome was reported (`kubectl delete job`): never
            // created again (that would run the job twice); the CRM is told.
            return job_deleted(&ctx, &run, &ns, &status, connection.as_ref()).await;
        }
        return start(&ctx, &run, &ns, &status, connection.as_ref()).await;
    };

    let progress = build::progress(&job);
    let mut next = status.clone();
    next.job = Some(job_name.clone());
    next.started = progress.started.map(Time);
    next.finished = progress.finished.map(Time);
    let mut action = Action::await_change();
    let due = build::report_due(&progress, status.reported);
    if let Some(phase) = due.filter(|_| !can_report(connection.as_ref())) {
        // The token is dead (inactive) or the connection is gone: the outcome stays in the Job
        // (no TTL before it is reported) and is written once a connection for the org is active
        // again, whose change wakes this up.
        info!(jobrun = %name, ?phase, connection = %serving, "report held until the connection is active again");
        next.phase = Some(phase);
    } else if let Some(phase) = due {
        match report(&ctx, &run, &ns, &serving, phase, &progress).await {
            Reported::Done(result) => {
                info!(jobrun = %name, ?phase, "reported to the CRM");
                next.phase = Some(phase);
                next.reported = Some(phase);
                if let Some(result) = result {
                    next.result = Some(build::summary(&result));
                }
                if phase.is_terminal()
                    && let (Some(started), Some(finished)) = (progress.started, progress.finished)
                {
                    let seconds = (finished.as_millisecond() - started.as_millisecond()) as f64 / 1000.0;
                    ctx.metrics.finished(&run.spec.job_type, phase, seconds);
                }
            }
            Reported::Aborted => {
                info!(jobrun = %name, "the job was aborted or deleted in the CRM: suspending its Job");
                abort(&jobs, &job_name, &mut next).await?;
            }
            Reported::Later(why) => {
                warn!(jobrun = %name, ?phase, "cannot report to the CRM yet: {why}");
                next.phase = Some(phase);
                action = Action::requeue(Duration::from_secs(30));
            }
        }
    } else if let Some(phase) = progress
        .phase
        .filter(|_| status.reported.is_none_or(|r| !r.is_terminal()))
    {
        next.phase = Some(phase);
    }
    // A job whose Job exists and whose outcome is not written yet (claimed and starting, or
    // running) is looked up in the CRM every minute: aborted or deleted there, its Job is
    // suspended (which deletes its pods); else its lease is renewed once half of it is gone, so
    // the claim never lapses under a job that runs (and a dead processor's lease does).
    let in_flight = matches!(
        (next.phase, next.reported),
        (Some(JobPhase::Running), Some(JobPhase::Running)) | (Some(JobPhase::Claimed), None)
    );
    if in_flight && can_report(connection.as_ref()) {
        if let Ok((base, token)) = crm_session(&ctx, &serving, &ns).await {
            let target = Target {
                api: crm::Api::of(run.spec.provider),
                base: &base,
                token: &token,
            };
            match check_in_flight(&ctx, &run, &target).await {
                InFlight::Aborted => {
                    info!(jobrun = %name, "the job was aborted or deleted in the CRM: suspending its Job");
                    abort(&jobs, &job_name, &mut next).await?;
                }
                InFlight::Held => {}
                InFlight::Unknown(why) => warn!(jobrun = %name, "cannot check the CRM job: {why}"),
            }
        }
        if matches!(next.phase, Some(JobPhase::Running | JobPhase::Claimed)) {
            action = Action::requeue(ctx.budget.abort_check(&org_key(&run), ctx.settings.abort_check));
        }
    }
    let finished = next.reported.is_some_and(JobPhase::is_terminal);
    write_status(&ctx, &run, &status, next).await?;
    if finished {
        finish(&ctx, &ns, &job_name, &run).await?;
    }
    Ok(action)
}

/// A run without its Job: create the Job when the connection is Active and a template exists.
async fn start(
    ctx: &Ctx,
    run: &JobRun,
    ns: &str,
    status: &JobRunStatus,
    connection: Option<&Connection>,
) -> Result<Action, Error> {
    let name = run.name_any();
    if status.phase.is_some_and(JobPhase::is_terminal) {
        return Ok(Action::await_change());
    }
    let serving = connection
        .map(|c| c.name_any())
        .unwrap_or_else(|| run.spec.connection.clone());
    if status.claim.is_none() {
        // The retriever creates the JobRun, then writes its claim: that write wakes this up.
        return Ok(Action::await_change());
    }
    let state = connection.and_then(|c| c.status.as_ref()).and_then(|s| s.state);
    if state == Some(State::Paused) && status.phase != Some(JobPhase::Holding) {
        // Paused with valid tokens: the claim is given back, the job waits in the CRM as Holding
        // (for any processor); the retriever claims it again once the connection is active.
        let mut next = status.clone();
        if let Err(why) = give_back(ctx, run, ns, &serving, &mut next).await {
            warn!(jobrun = %name, "cannot release the job yet: {why}");
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        info!(jobrun = %name, phase = ?next.phase, "connection paused: released the job back to Holding in the CRM");
        // No longer this run's job: whether its type has a template is asked again at the next
        // claim (a run given back for the pause blocks nothing).
        next.conditions
            .retain(|c| !(c.type_ == TEMPLATE_FOUND && c.status == "False"));
        write_status(ctx, run, status, next).await?;
        return Ok(Action::await_change());
    }
    if status.phase == Some(JobPhase::Holding) && waits_for_template(status) {
        // Given back for want of a template: rechecked on a timer (and when a template appears);
        // once it exists the condition says so, and the retriever claims the type again.
        let template_name = template_name(&run.spec.job_type);
        if usable_template(ctx, run).await?.is_none() {
            // Collected once `ttl` old like any settled run (its type is then claimed once more).
            return match ttl_left(ctx, run) {
                None => collect(ctx, run, ns).await,
                Some(left) => Ok(Action::requeue(
                    RECHECK_TEMPLATE.min(left + Duration::from_secs(1)),
                )),
            };
        }
        let mut next = status.clone();
        set_condition(
            &mut next.conditions,
            TEMPLATE_FOUND,
            "True",
            "TemplateFound",
            &format!(
                "JobTemplate {template_name} exists now: the job is claimed again at the retriever's next poll"
            ),
        );
        write_status(ctx, run, status, next).await?;
        return Ok(Action::await_change());
    }
    let active = connection
        .and_then(|c| c.status.as_ref())
        .filter(|s| s.state == Some(State::Active) && status.phase != Some(JobPhase::Holding));
    if active.is_none() {
        // Not started while the connection is not Active (inactive: its token is dead, so the CRM
        // cannot be told; deleted), nor while Holding (the retriever claims it again): the
        // connection's change, or the retriever's new claim, wakes this up.
        return Ok(Action::await_change());
    }
    let template_name = template_name(&run.spec.job_type);
    let Some(template) = usable_template(ctx, run).await? else {
        // Nothing can run it: it holds no slot, and the retriever claims no more jobs of its type
        // (the condition says so); once its claim's lease is over, the job is given back to the
        // CRM queue (Holding) for any processor.
        let expires = status.claim.as_ref().map(|c| c.expires.0);
        let lapsed = expires.is_none_or(|e| e <= Timestamp::now());
        let message = format!(
            "no JobTemplate {template_name} for job type {:?} and provider {}: the job {} (kubectl get jobtemplates); no more jobs of the type are claimed until a cluster administrator creates one",
            run.spec.job_type,
            run.spec.provider,
            if lapsed {
                "was given back to the CRM queue (Holding)"
            } else {
                "holds no slot and goes back to the CRM queue when its claim lapses"
            }
        );
        let mut next = status.clone();
        let mut action = match expires {
            Some(e) if !lapsed => Action::requeue(
                Duration::try_from(e.duration_since(Timestamp::now())).unwrap_or_default()
                    + Duration::from_secs(1),
            ),
            _ => Action::await_change(),
        };
        if lapsed {
            action = match give_back(ctx, run, ns, &serving, &mut next).await {
                Ok(()) => {
                    info!(jobrun = %name, phase = ?next.phase, "no JobTemplate: gave the job back to Holding in the CRM");
                    Action::requeue(RECHECK_TEMPLATE)
                }
                Err(why) => {
                    warn!(jobrun = %name, "cannot give the job back yet: {why}");
                    Action::requeue(Duration::from_secs(30))
                }
            };
        }
        let changed = set_condition(
            &mut next.conditions,
            TEMPLATE_FOUND,
            "False",
            TEMPLATE_MISSING,
            &message,
        );
        if changed {
            publish(ctx, run, EventType::Warning, TEMPLATE_MISSING, &message).await;
        }
        write_status(ctx, run, status, next).await?;
        return Ok(action);
    };
    // The fence: the job is still ours in the CRM, proven by a conditional write (the claim
    // renewed) on the version just read, before anything runs. (A claim held while the connection
    // was inactive may have lapsed, and another processor may have taken the job; one that takes it
    // after this read makes the write fail.)
    let verdict = match crm_session(ctx, &serving, ns).await {
        Ok((base, token)) => {
            let target = Target {
                api: crm::Api::of(run.spec.provider),
                base: &base,
                token: &token,
            };
            fence(ctx, run, &target).await.map(|o| (o, base))
        }
        Err(why) => Err(why),
    };
    // The worker's CRM_INSTANCE_URL is the session's (the URL the token is for, checked against
    // the provider-host policy), never the Connection's status, which its editors can write.
    let instance_url = match verdict {
        Ok((Ownership::Ours, base)) => base.as_str().trim_end_matches('/').to_string(),
        Ok((Ownership::Queued, _)) => {
            let mut next = status.clone();
            next.phase = Some(JobPhase::Holding);
            write_status(ctx, run, status, next).await?;
            return Ok(Action::await_change());
        }
        Ok((Ownership::Lost(why), _)) => {
            info!(jobrun = %name, "not started: {why}");
            let mut next = status.clone();
            next.phase = Some(JobPhase::Aborted);
            next.reported = Some(JobPhase::Aborted);
            set_condition(&mut next.conditions, "Started", "False", "NotOurs", &why);
            write_status(ctx, run, status, next).await?;
            return Ok(Action::await_change());
        }
        Err(why) => {
            warn!(jobrun = %name, "cannot check the CRM job before starting it: {why}");
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let desired = build::batch_job(
        run,
        &template.spec,
        &serving,
        &instance_url,
        &ctx.settings.host_aliases,
    );
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let job = match jobs.create(&params, &desired).await {
        Ok(job) => {
            info!(jobrun = %name, template = %template_name, "created its Job");
            job
        }
        Err(kube::Error::Api(e)) if e.code == 409 => jobs.get(&build::job_name(&name)).await?,
        Err(e) => return Err(e.into()),
    };
    // Not owned by its Job until the outcome is reported (`finish`): a Job deleted before that
    // leaves the run, which tells the CRM.
    let mut next = status.clone();
    next.job = Some(job.name_any());
    set_condition(
        &mut next.conditions,
        TEMPLATE_FOUND,
        "True",
        "TemplateFound",
        &format!("runs from JobTemplate {template_name}"),
    );
    write_status(ctx, run, status, next).await?;
    Ok(Action::await_change())
}

/// The CRM job was aborted or deleted: the Job is stopped (an active deadline of one second: the
/// Job controller deletes its pods and fails it with `DeadlineExceeded`, so the Job is finished and
/// its TTL collects it, as a suspended Job never would be) and the run is `Aborted`.
async fn abort(jobs: &Api<Job>, job_name: &str, next: &mut JobRunStatus) -> Result<(), Error> {
    jobs.patch(
        job_name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"activeDeadlineSeconds": 1}})),
    )
    .await?;
    next.phase = Some(JobPhase::Aborted);
    next.reported = Some(JobPhase::Aborted);
    Ok(())
}

/// After the final report: the JobRun becomes its Job's, and the Job gets its TTL (the TTL
/// controller then deletes it, and garbage collection the JobRun). No delete verb is needed.
/// `false` when the Job is gone (nothing to hand over).
async fn finish(ctx: &Ctx, ns: &str, name: &str, run: &JobRun) -> Result<bool, Error> {
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), ns);
    // Gone already (deleted before the outcome was written, or collected): nothing to hand over.
    let Some(job) = jobs.get_opt(name).await? else {
        return Ok(false);
    };
    let owner = OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: job.name_any(),
        uid: job.uid().unwrap_or_default(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    };
    Api::<JobRun>::namespaced(ctx.client.clone(), ns)
        .patch(
            &run.name_any(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"ownerReferences": [owner]}})),
        )
        .await?;
    let ttl = Api::<JobTemplate>::all(ctx.client.clone())
        .get_opt(&template_name(&run.spec.job_type))
        .await?
        .and_then(|t| t.spec.ttl_seconds_after_finished)
        .unwrap_or(i32::try_from(ctx.settings.ttl.as_secs()).unwrap_or(i32::MAX));
    if job.spec.as_ref().and_then(|s| s.ttl_seconds_after_finished) != Some(ttl) {
        jobs.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ttlSecondsAfterFinished": ttl}})),
        )
        .await?;
    }
    Ok(true)
}

enum Reported {
    /// Written; the worker's result, for a final report.
    Done(Option<String>),
    /// The CRM job is aborted or gone.
    Aborted,
    /// Not now (no session, the CRM unreachable or busy): why.
    Later(String),
}

/// The connection's CRM session: its API base URL and current access token (from its
/// `<name>-session` Secret), if the provider-host policy allows sending the token there.
async fn crm_session(ctx: &Ctx, connection: &str, ns: &str) -> Result<(url::Url, SecretString), String> {
    let session = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&format!("{connection}-session"))
        .await
        .map_err(|e| format!("cannot read the session: {e}"))?
        .ok_or("the connection has no session")?;
    let value = |key: &str| {
        session
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|v| v.trim().to_string())
    };
    let (Some(token), Some(base)) = (
        value(session_keys::ACCESS_TOKEN),
        value(session_keys::INSTANCE_URL),
    ) else {
        return Err("the session has no access token or instance URL".into());
    };
    let base = url::Url::parse(&base).map_err(|_| "the session's instance URL is not a URL".to_string())?;
    ctx.hosts
        .check(&base)
        .map_err(|why| format!("refusing to send the token: {why}"))?;
    Ok((base, SecretString::from(token)))
}

/// What the CRM says of a run's job before it starts.
enum Ownership {
    /// Still claimed by this run, and the claim renewed on the version read: it may start.
    Ours,
    /// Back in the queue (the claim lapsed): the retriever claims it again.
    Queued,
    /// Aborted, deleted, or taken by another processor: why.
    Lost(String),
}

/// The claimant the run's claim names in the CRM (`ClaimedBy`), once the retriever wrote it.
fn claimed_by(run: &JobRun) -> Option<&str> {
    run.status
        .as_ref()
        .and_then(|s| s.claim.as_ref())
        .map(|c| c.by.as_str())
}

/// Whether `record` is held by this run's claim: its claimant, and (when the CRM keeps one) its
/// attempt. The same retriever pod claims a job again after a lapsed claim, so the claimant alone
/// cannot tell this run from the next attempt's.
fn holds(run: &JobRun, record: &crm::Record) -> bool {
    let ours = claimed_by(run);
    let attempt = run.status.as_ref().and_then(|s| s.attempt);
    ours.is_some()
        && record.claimed_by.as_deref() == ours
        && (record.attempt.is_none() || attempt.is_none() || record.attempt == attempt)
}

/// How long a lease (the claim, or a running job's) lasts: as long as the retriever's claim did.
fn lease_of(run: &JobRun) -> SignedDuration {
    let claimed = run.status.as_ref().and_then(|s| s.claim.as_ref());
    claimed
        .map(|c| c.expires.0.duration_since(c.at.0))
        .filter(|d| d.is_positive())
        .unwrap_or(SignedDuration::from_mins(15))
}

/// The CRM's clock at a read: its `Date` less the request's duration, else ours.
fn crm_now<T>(read: &crm::Answer<T>) -> Timestamp {
    read.read_by().unwrap_or_else(Timestamp::now)
}

/// The fence before a run's Job is created: reads the job record and, if this run's claim still
/// holds it, renews the claim with a conditional write on the version read. Only when that write
/// lands is the job ours to run; a rival that claimed it after the read makes it fail (412), and the
/// record is read again.
async fn fence(ctx: &Ctx, run: &JobRun, target: &Target<'_>) -> Result<Ownership, String> {
    for _ in 0..3 {
        let read = read_record(ctx, run, target).await.map_err(|e| e.to_string())?;
        let record = match &read.value {
            None => return Ok(Ownership::Lost("the job was deleted in the CRM".into())),
            Some(r) => r,
        };
        match record.status {
            JobStatus::Aborted => return Ok(Ownership::Lost("the job was aborted in the CRM".into())),
            JobStatus::Holding | JobStatus::Waiting => return Ok(Ownership::Queued),
            JobStatus::Claimed if holds(run, record) => {}
            other => {
                return Ok(Ownership::Lost(format!(
                    "the job is {other:?} in the CRM under another processor's claim (this claim lapsed)"
                )));
            }
        }
        if !crate::retriever::plan::settled(&record.version, read.read_by()) {
            // Changed within the last 2 s (Salesforce's whole-second versions), or no Date:
            // a conditional write could not tell a rival's change from it yet.
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let until = crm_now(&read)
            .saturating_add(lease_of(run))
            .unwrap_or(Timestamp::now());
        let renew = Report::Renew {
            status: JobStatus::Claimed,
            until,
        };
        match write_record(ctx, run, target, record, &renew).await {
            Ok(ClaimOutcome::Claimed) => return Ok(Ownership::Ours),
            Ok(ClaimOutcome::Gone) => return Ok(Ownership::Lost("the job was deleted in the CRM".into())),
            Ok(ClaimOutcome::Lost) => continue, // changed since the read: read again
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("the CRM job record kept changing".into())
}

/// The org a run's CRM calls count against (its org label; its connection's name without one).
fn org_key(run: &JobRun) -> String {
    run.labels()
        .get(crate::api::labels::ORG)
        .cloned()
        .unwrap_or_else(|| run.spec.connection.clone())
}

/// Runs `call` (one CRM request for `run`) within the namespace's and the org's budget (see
/// [`budget`]), and records what its answer said of the org's limits.
async fn within_budget<T>(
    ctx: &Ctx,
    run: &JobRun,
    call: impl std::future::Future<Output = Result<T, crm::CrmError>>,
    usage: impl FnOnce(&T) -> Option<crm::ApiUsage>,
) -> Result<T, crm::CrmError> {
    let org = org_key(run);
    ctx.budget.admit(
        &run.namespace().unwrap_or_default(),
        &org,
        std::time::Instant::now(),
    )?;
    let answer = call.await;
    let (seen, error) = match &answer {
        Ok(value) => (usage(value), None),
        Err(e) => (None, Some(e)),
    };
    ctx.budget.observe(&org, seen, error, std::time::Instant::now());
    answer
}

/// Reads the run's CRM job record, within the budget.
async fn read_record(
    ctx: &Ctx,
    run: &JobRun,
    target: &Target<'_>,
) -> Result<crm::Answer<Option<crm::Record>>, crm::CrmError> {
    let read = ctx.queue.read(target, &run.spec.crm_job_id);
    within_budget(ctx, run, read, |answer| answer.usage).await
}

/// Writes `report` into the run's CRM job record read as `record`, within the budget.
async fn write_record(
    ctx: &Ctx,
    run: &JobRun,
    target: &Target<'_>,
    record: &crm::Record,
    report: &Report,
) -> Result<ClaimOutcome, crm::CrmError> {
    let write = ctx.queue.report(target, &run.spec.crm_job_id, record, report);
    within_budget(ctx, run, write, |_| None).await
}

/// The JobTemplate of the run's type, if it exists and allows the run's provider.
async fn usable_template(ctx: &Ctx, run: &JobRun) -> Result<Option<JobTemplate>, Error> {
    Ok(Api::<JobTemplate>::all(ctx.client.clone())
        .get_opt(&template_name(&run.spec.job_type))
        .await?
        .filter(|t| t.spec.allows(run.spec.provider)))
}

/// Gives a claimed job that has not started back to the CRM queue (Holding, claim cleared): `next`
/// is then `Holding`, or `Aborted` when the job was aborted, deleted or taken meanwhile. `Err`: the
/// CRM cannot be told now (why).
async fn give_back(
    ctx: &Ctx,
    run: &JobRun,
    ns: &str,
    connection: &str,
    next: &mut JobRunStatus,
) -> Result<(), String> {
    let phase = match report(
        ctx,
        run,
        ns,
        connection,
        JobPhase::Holding,
        &build::Progress::default(),
    )
    .await
    {
        Reported::Done(_) => JobPhase::Holding,
        Reported::Aborted => JobPhase::Aborted,
        Reported::Later(why) => return Err(why),
    };
    next.phase = Some(phase);
    next.reported = Some(phase);
    Ok(())
}

/// What a look at a job in flight found.
enum InFlight {
    /// Still held (its lease renewed when half of it was gone).
    Held,
    /// Aborted or deleted in the CRM.
    Aborted,
    /// Cannot tell now: why.
    Unknown(String),
}

/// Reads the record of a job in flight: aborted or gone, or still held; a lease with less than half
/// of its length left is renewed (a conditional write; if it loses, the next look tries again).
async fn check_in_flight(ctx: &Ctx, run: &JobRun, target: &Target<'_>) -> InFlight {
    let read = match read_record(ctx, run, target).await {
        Ok(read) => read,
        Err(e) => return InFlight::Unknown(e.to_string()),
    };
    let Some(record) = &read.value else {
        return InFlight::Aborted;
    };
    if record.status == JobStatus::Aborted {
        return InFlight::Aborted;
    }
    let held = matches!(record.status, JobStatus::Claimed | JobStatus::Running) && holds(run, record);
    let now = crm_now(&read);
    let lease = lease_of(run);
    let due = record
        .claim_expires
        .is_none_or(|expires| expires.duration_since(now) < lease / 2);
    if held && due && crate::retriever::plan::settled(&record.version, read.read_by()) {
        let renew = Report::Renew {
            status: record.status,
            until: now.saturating_add(lease).unwrap_or(now),
        };
        match write_record(ctx, run, target, record, &renew).await {
            Ok(ClaimOutcome::Claimed | ClaimOutcome::Lost) => {}
            Ok(ClaimOutcome::Gone) => return InFlight::Aborted,
            Err(e) => return InFlight::Unknown(format!("cannot renew the lease: {e}")),
        }
    }
    InFlight::Held
}

/// A run whose Job was created and then deleted before its outcome was reported: the CRM is told
/// (Failed if it had started, else the job goes back to the queue), and it is never run again by
/// this run. Held while the connection cannot write to the CRM.
async fn job_deleted(
    ctx: &Ctx,
    run: &JobRun,
    ns: &str,
    status: &JobRunStatus,
    connection: Option<&Connection>,
) -> Result<Action, Error> {
    let name = run.name_any();
    let settled = status.phase.is_some_and(JobPhase::is_terminal) || status.phase == Some(JobPhase::Holding);
    if settled && status.reported == status.phase {
        return Ok(Action::await_change());
    }
    if !can_report(connection) {
        return Ok(Action::await_change());
    }
    let serving = connection
        .map(|c| c.name_any())
        .unwrap_or_else(|| run.spec.connection.clone());
    let started = status.started.is_some() || status.reported == Some(JobPhase::Running);
    let mut next = status.clone();
    let phase = match (status.phase, started) {
        // Its outcome was known (held for an inactive connection) and is still reported.
        (Some(done), _) if done.is_terminal() => done,
        (_, true) => JobPhase::Failed,
        (_, false) => JobPhase::Holding,
    };
    let progress = build::Progress {
        phase: Some(phase),
        started: status.started.as_ref().map(|t| t.0),
        finished: status.finished.as_ref().map(|t| t.0).or(Some(Timestamp::now())),
    };
    let fallback = (phase == JobPhase::Failed).then(|| JOB_DELETED.to_string());
    match report_or(ctx, run, ns, &serving, phase, &progress, fallback).await {
        Reported::Done(result) => {
            info!(jobrun = %name, ?phase, "its Job was deleted before the outcome was reported: reported to the CRM");
            next.phase = Some(phase);
            next.reported = Some(phase);
            if let Some(result) = result {
                next.result = Some(build::summary(&result));
            }
            set_condition(
                &mut next.conditions,
                "JobDeleted",
                "True",
                "JobDeleted",
                &format!("its Job was deleted before the outcome was reported; the CRM was told {phase:?}"),
            );
        }
        Reported::Aborted => {
            next.phase = Some(JobPhase::Aborted);
            next.reported = Some(JobPhase::Aborted);
        }
        Reported::Later(why) => {
            warn!(jobrun = %name, "its Job was deleted; cannot tell the CRM yet: {why}");
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    }
    write_status(ctx, run, status, next).await?;
    Ok(Action::await_change())
}

/// The result reported for a job whose Job was deleted while it ran.
pub const JOB_DELETED: &str = "its Kubernetes Job was deleted before it finished";

/// Writes `phase` into the CRM job record: read it, then a conditional write on that version.
async fn report(
    ctx: &Ctx,
    run: &JobRun,
    ns: &str,
    connection: &str,
    phase: JobPhase,
    progress: &build::Progress,
) -> Reported {
    report_or(ctx, run, ns, connection, phase, progress, None).await
}

/// [`report`], with the result to write when the worker left none.
async fn report_or(
    ctx: &Ctx,
    run: &JobRun,
    ns: &str,
    connection: &str,
    phase: JobPhase,
    progress: &build::Progress,
    fallback: Option<String>,
) -> Reported {
    let reported = write_report(ctx, run, ns, connection, phase, progress, fallback).await;
    let outcome = match reported {
        Reported::Done(_) => metrics::ReportOutcome::Written,
        Reported::Aborted => metrics::ReportOutcome::Aborted,
        Reported::Later(_) => metrics::ReportOutcome::Later,
    };
    ctx.metrics.reported(phase, outcome);
    reported
}

async fn write_report(
    ctx: &Ctx,
    run: &JobRun,
    ns: &str,
    connection: &str,
    phase: JobPhase,
    progress: &build::Progress,
    fallback: Option<String>,
) -> Reported {
    let (base, token) = match crm_session(ctx, connection, ns).await {
        Ok(session) => session,
        Err(why) => return Reported::Later(why),
    };
    let target = Target {
        api: crm::Api::of(run.spec.provider),
        base: &base,
        token: &token,
    };
    let result = if phase.is_terminal() {
        termination_message(ctx, ns, &build::job_name(&run.name_any()))
            .await
            .map(|m| build::scrub(&m, &[token.expose_secret()]))
            .or(fallback)
    } else {
        None
    };
    for _ in 0..3 {
        let read = match read_record(ctx, run, &target).await {
            Ok(read) => read,
            Err(e) => return Reported::Later(e.to_string()),
        };
        let report = match phase {
            // A running job carries a lease from the CRM's clock, renewed while it runs.
            JobPhase::Running => Report::Started {
                at: progress.started.unwrap_or_else(Timestamp::now),
                lease: crm_now(&read)
                    .saturating_add(lease_of(run))
                    .unwrap_or(Timestamp::now()),
            },
            JobPhase::Holding => Report::Release,
            _ => Report::Ended {
                succeeded: phase == JobPhase::Succeeded,
                at: progress.finished.unwrap_or_else(Timestamp::now),
                result: result.clone(),
            },
        };
        let record = match &read.value {
            None => return Reported::Aborted,
            Some(r) if r.status == JobStatus::Aborted => return Reported::Aborted,
            Some(r) => r,
        };
        // Only a record this run still holds is written.
        let held = matches!(record.status, JobStatus::Claimed | JobStatus::Running) && holds(run, record);
        if !held {
            let ours_already = holds(run, record);
            return match (phase, record.status) {
                // Nothing to give back: it is in the queue already.
                (JobPhase::Holding, JobStatus::Holding | JobStatus::Waiting) => Reported::Done(None),
                // Written before (the JobRun's status write after it did not land): done.
                (JobPhase::Succeeded, JobStatus::Completed) | (JobPhase::Failed, JobStatus::Failed)
                    if ours_already =>
                {
                    Reported::Done(result)
                }
                _ => Reported::Aborted,
            };
        }
        // One-second resolution of If-Unmodified-Since: a change in the same second as ours
        // would not be seen, so a record changed under 2 s before the CRM read it is read again
        // after a moment.
        if !crate::retriever::plan::settled(&record.version, read.read_by()) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        match write_record(ctx, run, &target, record, &report).await {
            Ok(ClaimOutcome::Claimed) => return Reported::Done(result),
            Ok(ClaimOutcome::Gone) => return Reported::Aborted,
            Ok(ClaimOutcome::Lost) => continue, // changed meanwhile: read again
            Err(e) => return Reported::Later(e.to_string()),
        }
    }
    Reported::Later("the CRM job record kept changing".into())
}

/// The worker's termination message (its first container's), from the Job's newest pod.
async fn termination_message(ctx: &Ctx, ns: &str, job: &str) -> Option<String> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await
        .ok()?;
    let newest = pods
        .items
        .iter()
        .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    build::worker_message(newest)
}

/// Sets a condition; true when it changed (status or reason).
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
) -> bool {
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status == status && c.reason == reason && c.message == message {
            return false;
        }
        let changed = c.status != status || c.reason != reason;
        if c.status != status {
            c.last_transition_time =
                Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::now()));
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message.into();
        return changed;
    }
    conditions.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(
            Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::now()),
        ),
        observed_generation: None,
    });
    true
}

async fn write_status(ctx: &Ctx, run: &JobRun, old: &JobRunStatus, new: JobRunStatus) -> Result<(), Error> {
    if *old == new {
        return Ok(());
    }
    let (ns, name) = (run.namespace().unwrap_or_default(), run.name_any());
    let finished_now = new.reported.is_some_and(JobPhase::is_terminal) && old.reported != new.reported;
    // Conditional on the version this reconcile read: a reconcile that started from a cache not yet
    // showing this controller's previous write must not apply an older status over it (seen under
    // load: `reported` went back to none). It gets 409 and runs again on the fresh object.
    let patch = serde_json::json!({
        "apiVersion": JobRun::api_version(&()),
        "kind": JobRun::kind(&()),
        "metadata": {"resourceVersion": run.resource_version()},
        "status": new,
    });
    Api::<JobRun>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    if finished_now {
        record_history(ctx, run, &ns, &new).await;
    }
    Ok(())
}

/// Adds a finished run to its org's history (`OrgSettings.status`), which outlives the connections.
/// A conditional write (a replace with the resourceVersion read), retried on a conflict; a failure is logged (the CRM
/// record stays the system of record).
async fn record_history(ctx: &Ctx, run: &JobRun, ns: &str, status: &JobRunStatus) {
    let Some(org) = run.labels().get(crate::api::labels::ORG).cloned() else {
        return;
    };
    let Some(phase) = status.reported else { return };
    let record = crate::api::RunRecord {
        crm_job_id: run.spec.crm_job_id.clone(),
        job_type: run.spec.job_type.clone(),
        phase,
        connection: run.spec.connection.clone(),
        attempt: status.attempt,
        started: status.started.clone(),
        finished: status.finished.clone(),
        summary: status.result.clone(),
    };
    let api: Api<crate::api::OrgSettings> = Api::namespaced(ctx.client.clone(), ns);
    for _ in 0..10 {
        let settings = match api.get_opt(&org).await {
            Ok(Some(settings)) => settings,
            Ok(None) => return,
            Err(e) => {
                warn!(org = %org, error = %e, "cannot read the org's settings to record the run");
                return;
            }
        };
        let history = crate::api::record_run(
            &settings.status.clone().unwrap_or_default(),
            record.clone(),
            settings.spec.history_limit,
        );
        // A replace carrying the resourceVersion just read: two runs finishing together never
        // overwrite each other's record (the loser gets 409 and reads again).
        let mut updated = settings.clone();
        updated.status = Some(history);
        match api.replace_status(&org, &PostParams::default(), &updated).await {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => {
                warn!(org = %org, error = %e, "cannot record the run in the org's history");
                return;
            }
        }
    }
}

async fn publish(ctx: &Ctx, run: &JobRun, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Run".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &run.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(labels: serde_json::Value, status: serde_json::Value) -> JobRun {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "crmconnect.io/v1alpha1", "kind": "JobRun",
            "metadata": {
                "name": "sf-00d000000000001aaa-a0b000000000001aaa-1", "namespace": "team",
                "labels": labels,
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{…the whole run…}", "keep": "me"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {"connection": "acme", "crmJobId": "a0B000000000001AAA", "type": "export", "provider": "SalesforceProduction"},
            "status": status
        }))
        .unwrap()
    }

    fn connection(org_id: Option<&str>) -> Connection {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "crmconnect.io/v1alpha1", "kind": "Connection",
            "metadata": {"name": "acme", "namespace": "team"},
            "spec": {"team": "t", "provider": "SalesforceProduction", "credentialsSecretRef": {"name": "s"}},
            "status": {"orgId": org_id}
        }))
        .unwrap()
    }

    #[test]
    fn the_cache_keeps_no_managed_fields_nor_the_last_applied_copy() {
        let mut r = run(serde_json::json!({}), serde_json::json!({}));
        trim(&mut r);
        assert!(r.metadata.managed_fields.is_none());
        let annotations = r.metadata.annotations.unwrap();
        assert_eq!(annotations.len(), 1);
        assert_eq!(annotations["keep"], "me");
    }

    #[test]
    fn a_run_is_served_only_with_a_session_of_its_own_org() {
        let ours = serde_json::json!({"crmconnect.io/org": "sf-00d000000000001aaa"});
        let theirs = serde_json::json!({"crmconnect.io/org": "sf-00d000000000099aaa"});
        let c = connection(Some("00D000000000001AAA"));
        assert_eq!(org_mismatch(&run(ours.clone(), serde_json::json!({})), &c), None);
        let why = org_mismatch(&run(theirs, serde_json::json!({})), &c).unwrap();
        assert!(
            why.contains("sf-00d000000000099aaa") && why.contains("sf-00d000000000001aaa"),
            "{why}"
        );
        assert!(org_mismatch(&run(serde_json::json!({}), serde_json::json!({})), &c).is_some());
        // A connection that has not recorded its org serves nothing anyway (not Active).
        assert_eq!(
            org_mismatch(&run(ours, serde_json::json!({})), &connection(None)),
            None
        );
    }

    #[test]
    fn settled_runs_are_those_nothing_more_happens_to() {
        let status = |v: serde_json::Value| -> JobRunStatus { serde_json::from_value(v).unwrap() };
        assert!(settled(&status(
            serde_json::json!({"phase": "Succeeded", "reported": "Succeeded"})
        )));
        assert!(settled(&status(
            serde_json::json!({"phase": "Aborted", "reported": "Aborted"})
        )));
        assert!(settled(&status(
            serde_json::json!({"phase": "Holding", "reported": "Holding"})
        )));
        assert!(settled(&status(serde_json::json!({}))), "never given a status");
        // An outcome not reported yet (an inactive connection's), a claim, a run: not settled.
        assert!(!settled(&status(
            serde_json::json!({"phase": "Succeeded", "reported": "Running"})
        )));
        assert!(!settled(&status(
            serde_json::json!({"phase": "Running", "reported": "Running"})
        )));
        assert!(!settled(&status(serde_json::json!({"phase": "Holding"}))));
        let claimed = serde_json::json!({"phase": "Claimed", "claim": {"by": "a", "at": "2026-12-08T00:00:00Z", "expires": "2026-12-08T00:15:00Z"}});
        assert!(!settled(&status(claimed)));
        // Given back for want of a template: rechecked, not settled (collected by its own timer).
        let waiting = serde_json::json!({"phase": "Holding", "reported": "Holding", "conditions": [{
            "type": "TemplateFound", "status": "False", "reason": "TemplateMissing", "message": "", "lastTransitionTime": "2026-12-08T00:00:00Z"}]});
        assert!(!settled(&status(waiting)));
    }
}
