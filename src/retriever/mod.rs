//! The retriever: the process in each Active connection's `<name>-retriever` pod
//! (`connection-operator retrieve`).
//!
//! It polls the org's job queue every `pollInterval` (±10%), claims queued jobs atomically in the
//! CRM (a conditional write: other processors share the org), and records each claim as a
//! `JobRun`. It reads the session the operator mounts before every poll, serves `/healthz`,
//! `/readyz` and `/metrics`, and on SIGTERM finishes the request in flight and exits 0. What a poll
//! does is decided in [`plan`]; the CRM requests are in [`crate::crm`].

pub mod jobruns;
pub mod metrics;
pub mod plan;
pub mod probes;
pub mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use tracing::{info, warn};

use crate::api::JobRun;
use crate::crm::{self, Claim, ClaimOutcome, CrmError, Discover, JobQueue, Target};
use plan::JobSettings;
use session::Session;

/// What `retrieve` is told (CLI flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Name of the Connection.
    pub connection: String,
    /// Its namespace (the pod's own, from the downward API); default: the client's namespace.
    pub namespace: Option<String>,
    /// The org key (name of the org's OrgSettings, label of its JobRuns).
    pub org_key: String,
    /// This pod's name (part of the claim's `ClaimedBy`).
    pub pod: String,
    /// Where the session Secret is mounted.
    pub session_dir: PathBuf,
    /// The org's job settings.
    pub jobs: JobSettings,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub probe_addr: SocketAddr,
    /// How often the session files are re-read for readiness. The kubelet replaces a Secret
    /// volume's files by a symlink swap (within about a minute of the Secret's change).
    pub session_check_interval: Duration,
    /// Poll once, print what was claimed, exit.
    pub once: bool,
    /// The first poll waits a random delay up to this, so retrievers started together spread out.
    pub start_delay_max: Duration,
    /// Timeout of one CRM request.
    pub request_timeout: Duration,
    /// Extra CA certificates trusted for the CRM (a corporate TLS proxy, or a test CA).
    pub extra_roots: Option<crate::providers::ExtraRoots>,
}

/// Why the retriever stopped with an error (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Session(#[from] session::SessionError),
    #[error("cannot listen on {addr} for /healthz, /readyz and /metrics: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Kube(#[source] kube::Error),
    #[error("cannot set up the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
    #[error("the poll failed: {0}")]
    Poll(String),
}

/// Why one poll failed.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error(transparent)]
    Crm(#[from] CrmError),
    #[error("Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Session(#[from] session::SessionError),
}

impl PollError {
    fn label(&self) -> &'static str {
        match self {
            PollError::Crm(e) => e.label(),
            PollError::Kube(_) => "kubernetes",
            PollError::Session(_) => "session",
        }
    }
}

/// What one poll did.
#[derive(Debug, Default)]
struct Report {
    /// (CRM job ID, type, JobRun name).
    claimed: Vec<(String, String, String)>,
    lost: usize,
    gone: usize,
    holding: usize,
    capacity: usize,
    usage: Option<crm::ApiUsage>,
}

struct Retriever {
    settings: Settings,
    /// `<namespace>/<connection>/<pod>`.
    claimed_by: String,
    queue: JobQueue,
    jobruns: Api<JobRun>,
    metrics: Arc<metrics::Metrics>,
    readiness: Arc<probes::Readiness>,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// Runs until `shutdown` resolves (or after one poll with `once`). Fails at once if the session
/// cannot be read at start.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let mut current = session::load(&settings.session_dir).await?;
    let client = kube::Client::try_default().await.map_err(Error::Kube)?;
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let connection = format!("{namespace}/{}", settings.connection);
    info!(
        connection = %connection,
        org = %settings.org_key,
        auto_run_jobs = settings.jobs.auto_run_jobs,
        poll_interval = ?settings.jobs.poll_interval,
        max_concurrent_jobs = settings.jobs.max_concurrent_jobs,
        "retriever starting"
    );
    log_session(&connection, &settings, &current, "session loaded");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let readiness = Arc::new(probes::Readiness::default());
    readiness.set(probes::Check::Session, Ok(()));
    let metrics = Arc::new(metrics::Metrics::default());
    let mut server_stop = stop_rx.clone();
    let (bound, server) = probes::serve(
        settings.probe_addr,
        readiness.clone(),
        metrics.clone(),
        async move {
            let _ = server_stop.wait_for(|stop| *stop).await;
        },
    )
    .await
    .map_err(|source| Error::Listen {
        addr: settings.probe_addr,
        source,
    })?;
    info!(address = %bound, "serving /healthz, /readyz and /metrics");

    // The CAs to trust beyond the web PKI: the flag's, else the operator's (from the session).
    let extra_roots = match (&settings.extra_roots, &current.ca_bundle) {
        (Some(roots), _) => Some(roots.clone()),
        (None, Some(pem)) => Some(
            crate::providers::ExtraRoots::from_pem(
                settings
                    .session_dir
                    .join(crate::controller::children::session_keys::CA_BUNDLE)
                    .display()
                    .to_string(),
                pem,
            )
            .map_err(|e| Error::Poll(e.to_string()))?,
        ),
        (None, None) => None,
    };
    let retriever = Retriever {
        claimed_by: plan::claimant(&connection, &settings.pod),
        queue: JobQueue::new(settings.request_timeout, extra_roots.as_ref()).map_err(Error::Http)?,
        jobruns: Api::namespaced(client, &namespace),
        metrics,
        readiness: readiness.clone(),
        stop: stop_rx.clone(),
        settings,
    };

    if retriever.settings.once {
        let result = retriever.poll(&mut current).await;
        server.abort();
        return match result {
            Ok(report) => {
                print_report(&report);
                Ok(())
            }
            Err(e) => Err(Error::Poll(e.to_string())),
        };
    }

    let mut stop = stop_rx;
    let start_delay = retriever.settings.start_delay_max.mul_f64(rand::random::<f64>());
    let mut session_tick = tokio::time::interval(retriever.settings.session_check_interval);
    session_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    session_tick.tick().await; // immediate: the session was just read
    let mut next_poll = tokio::time::Instant::now() + start_delay;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = session_tick.tick() => retriever.check_session(&connection, &mut current).await,
            _ = tokio::time::sleep_until(next_poll) => {
                let delay = match retriever.poll(&mut current).await {
                    Ok(report) => {
                        failures = 0;
                        retriever.polled_ok(&connection, &report);
                        plan::stretched_interval(retriever.settings.jobs.poll_interval, report.usage)
                            .mul_f64(0.9 + 0.2 * rand::random::<f64>())
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        retriever.polled_badly(&connection, &e, failures)
                    }
                };
                next_poll = tokio::time::Instant::now() + delay;
            }
        }
    }
    info!(connection = %connection, "stopping");
    let _ = server.await;
    Ok(())
}

impl Retriever {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Re-reads the session for readiness between polls.
    async fn check_session(&self, connection: &str, current: &mut Session) {
        match session::load(&self.settings.session_dir).await {
            Ok(fresh) => {
                if fresh.fingerprint != current.fingerprint {
                    log_session(connection, &self.settings, &fresh, "session changed");
                    *current = fresh;
                    // A new token may be accepted where the old one was not.
                    self.readiness.set(probes::Check::Crm, Ok(()));
                }
                if !self.readiness.is_ready_for(probes::Check::Session) {
                    info!(connection = %connection, "the session is readable again");
                }
                self.readiness.set(probes::Check::Session, Ok(()));
            }
            Err(e) => {
                if self.readiness.is_ready_for(probes::Check::Session) {
                    warn!(connection = %connection, error = %e, "cannot re-read the session; not ready until it can be read");
                }
                self.readiness.set(probes::Check::Session, Err(e.to_string()));
            }
        }
    }

    fn polled_ok(&self, connection: &str, report: &Report) {
        self.metrics.polled("ok");
        self.readiness.set(probes::Check::Crm, Ok(()));
        if !report.claimed.is_empty() || report.lost > 0 || report.gone > 0 {
            info!(
                connection = %connection,
                claimed = report.claimed.len(),
                lost_to_another_processor = report.lost,
                gone = report.gone,
                holding = report.holding,
                "polled the job queue"
            );
        }
    }

    /// Records a failed poll and returns the delay before the next one.
    fn polled_badly(&self, connection: &str, e: &PollError, failures: u32) -> Duration {
        self.metrics.polled(e.label());
        let poll_interval = self.settings.jobs.poll_interval;
        match e {
            PollError::Crm(CrmError::SessionRejected { .. }) => {
                warn!(connection = %connection, error = %e, "the CRM rejects the session; claiming nothing and not ready until the operator renews it (retrying every 30s)");
                self.readiness.set(
                    probes::Check::Crm,
                    Err(format!("{e}; waiting for the operator to renew the session")),
                );
                Duration::from_secs(30)
            }
            PollError::Session(_) => Duration::from_secs(30),
            _ => {
                if let PollError::Crm(CrmError::Throttled { .. }) = e {
                    self.metrics.throttled();
                }
                let retry_after = match e {
                    PollError::Crm(crm) => crm.retry_after(),
                    _ => None,
                };
                let delay = crate::providers::backoff::retry_delay(
                    failures - 1,
                    retry_after,
                    Duration::from_secs(10),
                    poll_interval.max(Duration::from_secs(60)),
                    rand::random::<f64>(),
                );
                warn!(connection = %connection, error = %e, retry_in = ?delay, "poll failed; backing off");
                delay
            }
        }
    }

    /// One poll. A 401 re-reads the session: with a new token the poll is tried once more.
    async fn poll(&self, session: &mut Session) -> Result<Report, PollError> {
        let fresh = session::load(&self.settings.session_dir).await?;
        *session = fresh;
        match self.poll_with(session).await {
            Err(PollError::Crm(CrmError::SessionRejected { .. })) => {
                let fresh = session::load(&self.settings.session_dir).await?;
                if fresh.fingerprint == session.fingerprint {
                    return Err(CrmError::SessionRejected { code: None }.into());
                }
                info!("the session changed after a 401; trying once more with the new token");
                *session = fresh;
                self.poll_with(session).await
            }
            other => other,
        }
    }

    async fn poll_with(&self, session: &Session) -> Result<Report, PollError> {
        let jobs_settings = &self.settings.jobs;
        if jobs_settings.no_job_templates {
            info!(org = %self.settings.org_key, "no JobTemplate can run this org's jobs (kubectl get jobtemplates): asking the CRM nothing, claiming nothing");
            return Ok(Report::default());
        }
        let held = jobruns::held(&self.jobruns, &self.settings.org_key, jobs_settings.claim_lease).await?;
        let capacity = plan::capacity(jobs_settings, held.slots);
        let blocked = &held.blocked;
        let target = Target {
            api: crm::Api::of(session.provider),
            base: &session.instance_url,
            token: &session.access_token,
        };
        let now = Timestamp::now();
        let query = Discover {
            now,
            job_types: jobs_settings.allowed_job_types.clone(),
            limit: plan::QUERY_LIMIT,
            page_size: plan::QUERY_LIMIT,
        };
        let first = self.queue.first_page(&target, &query).await?;
        let mut report = Report {
            capacity,
            usage: first.usage,
            ..Default::default()
        };
        // The CRM's clock at the query, for the 2-second rule (none without a `Date`: then no
        // Salesforce job is claimed, a local clock proves nothing about the CRM's).
        let server_time = first.read_by();
        if server_time.is_none() && target.api == crm::Api::Salesforce {
            warn!(org = %self.settings.org_key, "the CRM's answer has no Date header: claiming nothing this poll");
        }
        let mut next = first.value.next;
        let mut jobs = first.value.jobs;
        let mut skipped = first.value.skipped;
        // More pages only while they could add a job to claim, and never more than MAX_PAGES (a
        // CRM answering `done: false` with empty pages for ever ends the loop).
        let mut pages = 1;
        while let Some(url) = next.take() {
            if capacity == 0
                || plan::choose(&jobs, server_time, blocked, capacity).len() >= capacity
                || jobs.len() >= plan::QUERY_LIMIT as usize
                || pages >= plan::MAX_PAGES
                || self.stopping()
            {
                break;
            }
            pages += 1;
            let page = self.queue.next_page(&target, &url, plan::QUERY_LIMIT).await?;
            report.usage = page.usage.or(report.usage);
            jobs.extend(page.value.jobs);
            skipped.extend(page.value.skipped);
            next = page.value.next;
        }
        for why in &skipped {
            warn!(org = %self.settings.org_key, "skipped a job queue row: {why}");
        }
        self.metrics.skipped(skipped.len());
        report.holding = plan::holding(&jobs);
        self.metrics.holding(report.holding);
        if let Some(usage) = report.usage {
            self.metrics.api_usage(usage.ratio());
        }

        for job in plan::choose(&jobs, server_time, blocked, capacity) {
            if self.stopping() {
                break;
            }
            let at = Timestamp::now();
            let lease =
                SignedDuration::try_from(jobs_settings.claim_lease).unwrap_or(SignedDuration::from_mins(15));
            let expires = at.saturating_add(lease).unwrap_or(at);
            let claim = Claim {
                by: self.claimed_by.clone(),
                expires,
                attempt: job.attempt + 1,
            };
            let outcome = match self.queue.claim(&target, job, &claim).await {
                Ok(answer) => answer.value,
                Err(e) => {
                    self.metrics.claim("error");
                    return Err(e.into());
                }
            };
            match outcome {
                ClaimOutcome::Claimed => {
                    self.metrics.claim("claimed");
                    let run = jobruns::jobrun(
                        &self.settings.connection,
                        &self.settings.org_key,
                        session.provider,
                        &job.id,
                        &job.job_type,
                        claim.attempt,
                    );
                    let status = jobruns::claimed_status(&claim.by, at, expires, claim.attempt);
                    // If this fails the claim lapses with its lease and the job is claimed again.
                    let name = jobruns::record(&self.jobruns, &run, &status).await?;
                    info!(crm_job = %job.id, job_type = %job.job_type, jobrun = %name, attempt = claim.attempt, "claimed");
                    report.claimed.push((job.id.clone(), job.job_type.clone(), name));
                }
                ClaimOutcome::Lost => {
                    self.metrics.claim("lost");
                    info!(crm_job = %job.id, "another processor claimed the job first");
                    report.lost += 1;
                }
                ClaimOutcome::Gone => {
                    self.metrics.claim("gone");
                    info!(crm_job = %job.id, "the job was deleted before it could be claimed");
                    report.gone += 1;
                }
            }
        }
        Ok(report)
    }
}

/// `--once`: what was claimed, one line each, then a summary line (stdout).
fn print_report(report: &Report) {
    for (id, job_type, jobrun) in &report.claimed {
        println!("claimed {id} ({job_type}) as jobrun/{jobrun}");
    }
    println!(
        "claimed {}, lost to another processor {}, gone {}, holding {}, capacity {}",
        report.claimed.len(),
        report.lost,
        report.gone,
        report.holding,
        report.capacity
    );
}

/// Logs what was read, never the token.
fn log_session(connection: &str, settings: &Settings, session: &Session, what: &str) {
    info!(
        connection = %connection,
        provider = %session.provider,
        instance_url = %session.instance_url,
        expires_at = session.expires_at.map(|t| t.to_string()).unwrap_or_else(|| "unknown".into()),
        session_dir = %settings.session_dir.display(),
        "{what}"
    );
}
