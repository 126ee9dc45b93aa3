//! Job execution with real pods: claimed CRM jobs run as batch Jobs on the test node from the
//! cluster administrator's JobTemplates, running the built-in worker (`connection-operator worker
//! record-count`, from the image `scripts/image.sh --load` put on the node) against the simulated
//! CRMs, served over https on the node's bridge address. The operator runs in this process; the
//! retriever runs once as a process (`tests/job_retrieval.rs` tests it), so each test decides
//! exactly when jobs are claimed.
//!
//! Needs the node (`make test` starts it; it needs root). With `CLUSTER_NODE=0` these tests say
//! they are skipped and pass.

mod common;

use std::time::{Duration, SystemTime};

use common::jobs::*;
use common::*;
use connection_operator::api::{JobPhase, JobRun, OrgSettings, State, jobrun_name};
use connection_operator::jobruns::build::job_name;
use fake_providers::{FakeJob, JobStatus, NewJob};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

fn image() -> String {
    let (repo, tag) = chart_image();
    format!("{repo}:{tag}")
}

/// The JobTemplate spec of the built-in worker counting Accounts (accounts on Dataverse).
fn record_count() -> serde_json::Value {
    JobTemplates::worker(&image(), &["worker", "record-count"])
}

/// The node's setup with the Active Salesforce connection `acme`; `None` (the test is skipped)
/// without a node.
async fn node_env() -> Option<Env> {
    let Some(ip) = node_ip() else {
        eprintln!("skipped: CLUSTER_NODE=0 (no node in the test cluster)");
        return None;
    };
    ensure_crds();
    let env = Env::on_node(ip).await;
    env.connect("acme", false).await;
    Some(env)
}

/// A job type of this test's own (JobTemplates are cluster-scoped).
fn job_type(env: &Env, what: &str) -> String {
    format!("{what}-{}", &env.ns()[2..])
}

/// Seeds one Holding job per type and ages it past the 2-second rule.
fn seed(env: &Env, remote: &str, types: &[&str]) -> Vec<String> {
    let jobs: Vec<NewJob> = types.iter().map(|t| NewJob::new(t)).collect();
    let ids = env.fake.seed_jobs(remote, &jobs);
    for id in &ids {
        env.fake
            .set_job_modified(remote, id, SystemTime::now() - Duration::from_secs(60));
    }
    ids
}

/// Runs the retriever once for `connection` (with the org's default settings).
async fn claim(env: &Env, connection: &str, key: &str) {
    claim_with(env, connection, key, &[]).await;
}

/// Runs the retriever once for `connection` with extra flags (the org's settings).
async fn claim_with(env: &Env, connection: &str, key: &str, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = env.retriever_kubeconfig(dir.path(), &format!("{connection}-retriever"));
    let session = env.session_dir(connection, dir.path()).await;
    let out = retrieve_once(&kubeconfig, &session, env.ns(), connection, key, flags).await;
    assert!(out.status.success(), "{}", text(&out));
}

async fn crm_job(env: &Env, remote: &str, id: &str, status: JobStatus) -> FakeJob {
    eventually(&format!("CRM job {id} {status:?}"), WAIT, || async {
        env.fake.job(remote, id).filter(|j| j.status == status)
    })
    .await
}

/// The JobRun of the first claim of CRM job `id`, once it is in `phase`.
async fn run_phase(env: &Env, key: &str, id: &str, phase: JobPhase) -> JobRun {
    run_phase_at(env, key, id, 1, phase).await
}

/// The JobRun of claim `attempt` of CRM job `id`, once it is in `phase`.
async fn run_phase_at(env: &Env, key: &str, id: &str, attempt: i64, phase: JobPhase) -> JobRun {
    let api: Api<JobRun> = Api::namespaced(env.client.clone(), env.ns());
    let name = jobrun_name(key, id, attempt);
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Some(run)) = api.get_opt(&name).await
                && run.status.as_ref().and_then(|s| s.phase) == Some(phase)
            {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    reached.unwrap_or_else(|_| {
        // Say why: the run, its Job and pods, and the CRM record.
        let dump = kubectl_ok(&["get", "jobruns,jobs,pods", "-n", env.ns(), "-o", "yaml"]);
        panic!(
            "JobRun {name} never {phase:?} in {WAIT:?}; CRM record: {:?}\n{dump}",
            env.fake
                .job(if key.starts_with("sf-") { SF_ORG } else { D365_ENV }, id)
        )
    })
}

async fn history(env: &Env, key: &str) -> connection_operator::api::OrgSettingsStatus {
    Api::<OrgSettings>::namespaced(env.client.clone(), env.ns())
        .get(key)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

fn secret_value(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone())
        .unwrap()
        .trim()
        .to_string()
}

/// Every token the operator holds for `connection`: the access token of its session and the
/// refresh tokens of its credentials and token Secrets.
async fn tokens_of(env: &Env, connection: &str) -> Vec<String> {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), env.ns());
    let mut tokens = vec![];
    for (suffix, key) in [
        ("session", "access_token"),
        ("creds", "refresh_token"),
        ("token", "refresh_token"),
    ] {
        if let Some(s) = secrets.get_opt(&format!("{connection}-{suffix}")).await.unwrap() {
            tokens.push(secret_value(&s, key));
        }
    }
    tokens
}

/// Re-authorizes `connection`: a new refresh token in its credentials Secret.
async fn reauthorize(env: &Env, connection: &str, remote: &str) {
    let token = env.fake.issue_refresh_token(remote);
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{connection}-creds"), "namespace": env.ns()},
        "stringData": {"client_id": CLIENT, "refresh_token": token},
    });
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&secret.to_string()));
}

/// Revokes `connection`'s tokens in the CRM (refresh and access) and has the operator look.
async fn revoke(env: &Env, connection: &str) {
    for token in tokens_of(env, connection).await {
        env.fake.revoke(&token);
    }
    env.fake.expire_access_tokens();
    run_ok(
        kubectl().args([
            "annotate",
            "conn",
            connection,
            "-n",
            env.ns(),
            "crmconnect.io/revalidate=revoked",
            "--overwrite",
        ]),
        None,
    );
    env.wait_state(connection, State::Inactive).await;
}

#[tokio::test]
async fn outcomes_reach_the_crm_and_the_history_and_a_job_that_can_never_succeed_is_not_retried() {
    let Some(env) = node_env().await else {
        return;
    };
    env.connect("dyn", true).await;
    let (count, missing) = (job_type(&env, "count"), job_type(&env, "missing"));
    let mut count_spec = record_count();
    count_spec["ttlSecondsAfterFinished"] = 5.into();
    let mut missing_spec = JobTemplates::worker(
        &image(),
        &[
            "worker",
            "record-count",
            "--object",
            fake_providers::NO_SUCH_OBJECT,
        ],
    );
    // Two retries allowed, but exit code 42 fails the Job at once (as in the example template).
    missing_spec["backoffLimit"] = 2.into();
    missing_spec["podFailurePolicy"] =
        json!({"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]});
    let _templates = JobTemplates::apply(&[(&count, count_spec), (&missing, missing_spec)]);
    let sf = seed(&env, SF_ORG, &[&count, &missing]);
    let d365 = seed(&env, D365_ENV, &[&count]);
    claim(&env, "acme", SF_KEY).await;
    claim(&env, "dyn", D365_KEY).await;

    // Succeeded on both CRMs, with the worker's result; history and counts in each org.
    let done = crm_job(&env, SF_ORG, &sf[0], JobStatus::Completed).await;
    assert_eq!(done.result.as_deref(), Some("Account: 42 records"));
    assert!(done.started.is_some() && done.ended.is_some(), "{done:?}");
    let done = crm_job(&env, D365_ENV, &d365[0], JobStatus::Completed).await;
    assert_eq!(done.result.as_deref(), Some("accounts: 42 records"));

    // The object the org does not have: Failed in the CRM with the reason, one pod only.
    let failed = crm_job(&env, SF_ORG, &sf[1], JobStatus::Failed).await;
    assert!(
        failed
            .result
            .as_deref()
            .unwrap_or_default()
            .contains("no such object"),
        "{failed:?}"
    );
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), env.ns());
    let failed_job = jobs
        .get(&job_name(&jobrun_name(SF_KEY, &sf[1], 1)))
        .await
        .unwrap();
    let job_status = failed_job.status.clone().unwrap();
    assert_eq!(job_status.failed, Some(1), "no retry: {job_status:?}");
    assert!(
        job_status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Failed"
                && c.status == "True"
                && c.reason.as_deref() == Some("PodFailurePolicy")),
        "failed by the pod failure policy"
    );

    let run = run_phase(&env, SF_KEY, &sf[1], JobPhase::Failed).await;
    assert_eq!(run.status.unwrap().reported, Some(JobPhase::Failed));
    eventually("the org histories", WAIT, || async {
        let (sf, d365) = (history(&env, SF_KEY).await, history(&env, D365_KEY).await);
        ((sf.counts.succeeded, sf.counts.failed) == (1, 1) && d365.counts.succeeded == 1).then_some(())
    })
    .await;
    let sf_history = history(&env, SF_KEY).await;
    let record = sf_history
        .recent_runs
        .iter()
        .find(|r| r.crm_job_id == sf[0])
        .expect("the succeeded run in the history");
    assert_eq!(record.summary.as_deref(), Some("Account: 42 records"));
    assert_eq!(record.connection, "acme");

    // The succeeded runs' Jobs and JobRuns go after their TTL (5 s); the failed one has none.
    let runs: Api<JobRun> = Api::namespaced(env.client.clone(), env.ns());
    eventually("succeeded runs collected", WAIT, || async {
        let left: Vec<String> = runs
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter_map(|r| r.metadata.name)
            .collect();
        (left == [jobrun_name(SF_KEY, &sf[1], 1)]).then_some(())
    })
    .await;

    // No token anywhere the operator or the worker writes: Jobs, pods, JobRuns, OrgSettings,
    // events, the worker's log.
    let mut tokens = tokens_of(&env, "acme").await;
    tokens.extend(tokens_of(&env, "dyn").await);
    assert_eq!(tokens.len(), 6, "session, creds and token Secrets of both");
    let dump = kubectl_ok(&[
        "get",
        "jobs,pods,jobruns,orgsettings,events,connections",
        "-n",
        env.ns(),
        "-o",
        "yaml",
    ]);
    let pod = Api::<Pod>::namespaced(env.client.clone(), env.ns())
        .list(&ListParams::default().labels(&format!(
            "batch.kubernetes.io/job-name={}",
            job_name(&jobrun_name(SF_KEY, &sf[1], 1))
        )))
        .await
        .unwrap()
        .items
        .remove(0);
    let log = kubectl_ok(&["logs", "-n", env.ns(), pod.metadata.name.as_deref().unwrap()]);
    assert!(log.contains("no such object"), "{log}");
    for token in &tokens {
        assert!(!token.is_empty());
        assert!(!dump.contains(token.as_str()), "a token in the objects");
        assert!(!log.contains(token.as_str()), "a token in the worker's log");
    }
}

#[tokio::test]
async fn a_job_aborted_in_the_crm_is_stopped_and_stays_aborted() {
    let Some(env) = node_env().await else {
        return;
    };
    // The worker's count takes 10 minutes: it is still running when the CRM user aborts the job.
    env.fake.set_count_delay(Duration::from_secs(600));
    let slow = job_type(&env, "slow");
    let _templates = JobTemplates::apply(&[(
        &slow,
        JobTemplates::worker(&image(), &["worker", "record-count", "--timeout", "15m"]),
    )]);
    let ids = seed(&env, SF_ORG, &[&slow]);
    claim(&env, "acme", SF_KEY).await;
    let queries = env.fake.stats().job_queries;
    crm_job(&env, SF_ORG, &ids[0], JobStatus::Running).await;
    let job = job_name(&jobrun_name(SF_KEY, &ids[0], 1));
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), env.ns());
    let selector = format!("batch.kubernetes.io/job-name={job}");
    let worker_counting = || async {
        let list = pods.list(&ListParams::default().labels(&selector)).await.ok()?;
        let running = list
            .items
            .iter()
            .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
        (running && env.fake.stats().job_queries > queries).then_some(())
    };
    eventually("the worker pod running", WAIT, worker_counting).await;

    assert!(env.fake.abort_job(SF_ORG, &ids[0]));
    let run = run_phase(&env, SF_KEY, &ids[0], JobPhase::Aborted).await;
    assert_eq!(run.status.unwrap().reported, Some(JobPhase::Aborted));
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), env.ns());
    assert_eq!(
        jobs.get(&job)
            .await
            .unwrap()
            .spec
            .unwrap()
            .active_deadline_seconds,
        Some(1),
        "the Job is stopped by its deadline"
    );
    // Stopped, the Job is finished (a suspended one never would be), so the job TTL collects it.
    eventually(
        "the Job failed by its deadline, with the job TTL",
        WAIT,
        || async {
            let job = jobs.get(&job).await.ok()?;
            let failed = job.status?.conditions?.iter().any(|c| {
                c.type_ == "Failed" && c.status == "True" && c.reason.as_deref() == Some("DeadlineExceeded")
            });
            let ttl = job.spec?.ttl_seconds_after_finished;
            (failed && ttl == Some(24 * 3600)).then_some(())
        },
    )
    .await;
    eventually("the worker pod deleted", WAIT, || async {
        pods.list(&ListParams::default().labels(&selector))
            .await
            .ok()?
            .items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;
    // Never overwritten: the record stays Aborted, and the org's history counts it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.fake.job(SF_ORG, &ids[0]).unwrap().status, JobStatus::Aborted);
    eventually("the abort in the history", WAIT, || async {
        (history(&env, SF_KEY).await.counts.aborted == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_inactive_connection_starts_nothing_keeps_outcomes_and_re_authorizing_resumes() {
    let Some(env) = node_env().await else {
        return;
    };
    // The worker's count takes 20 s (within its 30 s timeout): it is running when the tokens go.
    env.fake.set_count_delay(Duration::from_secs(20));
    let (later, running) = (job_type(&env, "later"), job_type(&env, "running"));
    let templates = JobTemplates::apply(&[(&running, record_count())]);
    let ids = seed(&env, SF_ORG, &[&later, &running]);
    claim(&env, "acme", SF_KEY).await;

    // No template for the first: it stays Claimed, with a condition and an event naming it.
    let api: Api<JobRun> = Api::namespaced(env.client.clone(), env.ns());
    let waiting = jobrun_name(SF_KEY, &ids[0], 1);
    let condition = eventually("the TemplateFound condition", WAIT, || async {
        let run = api.get(&waiting).await.ok()?;
        let status = run.status?;
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == "TemplateFound")?
            .clone();
        (status.phase == Some(JobPhase::Claimed)).then_some(c)
    })
    .await;
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "TemplateMissing")
    );
    assert!(condition.message.contains(&later), "{}", condition.message);
    let events = kubectl_ok(&["get", "events", "-n", env.ns(), "-o", "json"]);
    assert!(
        events.contains("TemplateMissing") && events.contains(&format!("no JobTemplate {later}")),
        "an event names the missing template"
    );

    // The second runs; while its worker counts, the tokens are revoked.
    let queries = env.fake.stats().job_queries;
    crm_job(&env, SF_ORG, &ids[1], JobStatus::Running).await;
    eventually("the worker's count request", WAIT, || async {
        (env.fake.stats().job_queries > queries).then_some(())
    })
    .await;
    // The Running report is recorded on the run too (the CRM write comes first, then the status
    // write: on a busy machine the revocation must not land between the two).
    let running = jobrun_name(SF_KEY, &ids[1], 1);
    eventually("the run's Running report recorded", WAIT, || async {
        let status = api.get(&running).await.ok()?.status?;
        (status.reported == Some(JobPhase::Running)).then_some(())
    })
    .await;
    revoke(&env, "acme").await;

    // Inactive: its outcome is kept (the CRM still says Running) ...
    let finished = run_phase(&env, SF_KEY, &ids[1], JobPhase::Succeeded).await;
    assert_eq!(finished.status.unwrap().reported, Some(JobPhase::Running));
    // ... and the template appearing starts nothing.
    let templates = templates.and(&[(&later, record_count())]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), env.ns());
    assert!(
        jobs.get_opt(&job_name(&waiting)).await.unwrap().is_none(),
        "no Job while the connection is inactive"
    );
    assert_eq!(env.fake.job(SF_ORG, &ids[1]).unwrap().status, JobStatus::Running);

    // Re-authorized: the held outcome is reported and the waiting run starts.
    env.fake.set_count_delay(Duration::ZERO);
    reauthorize(&env, "acme", SF_ORG).await;
    env.wait_state("acme", State::Active).await;
    let reported = crm_job(&env, SF_ORG, &ids[1], JobStatus::Completed).await;
    assert_eq!(reported.result.as_deref(), Some("Account: 42 records"));
    let resumed = crm_job(&env, SF_ORG, &ids[0], JobStatus::Completed).await;
    assert_eq!(resumed.result.as_deref(), Some("Account: 42 records"));
    drop(templates);
}

#[tokio::test]
async fn history_outlives_the_connection_and_a_new_connection_for_the_org_adopts_runs_in_flight() {
    let Some(env) = node_env().await else {
        return;
    };
    let (now, later) = (job_type(&env, "now"), job_type(&env, "later"));
    let templates = JobTemplates::apply(&[(&now, record_count())]);
    let ids = seed(&env, SF_ORG, &[&now, &later]);
    claim(&env, "acme", SF_KEY).await;
    crm_job(&env, SF_ORG, &ids[0], JobStatus::Completed).await;
    eventually("the run in the history", WAIT, || async {
        (history(&env, SF_KEY).await.counts.succeeded == 1).then_some(())
    })
    .await;

    // The connection is deleted: its history stays, so does its run still waiting for a template.
    let connections: Api<connection_operator::api::Connection> =
        Api::namespaced(env.client.clone(), env.ns());
    connections
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    eventually("acme gone", WAIT, || async {
        connections.get_opt("acme").await.ok()?.is_none().then_some(())
    })
    .await;
    let kept = history(&env, SF_KEY).await;
    assert_eq!(kept.counts.succeeded, 1);
    assert!(
        kept.recent_runs.iter().any(|r| r.crm_job_id == ids[0]),
        "{kept:?}"
    );
    run_phase(&env, SF_KEY, &ids[1], JobPhase::Claimed).await;

    // A new Connection for the org adopts it: it runs with the new connection's session.
    env.connect("acme-v2", false).await;
    let templates = templates.and(&[(&later, record_count())]);
    let adopted = crm_job(&env, SF_ORG, &ids[1], JobStatus::Completed).await;
    assert_eq!(adopted.result.as_deref(), Some("Account: 42 records"));
    eventually("both runs in the history", WAIT, || async {
        (history(&env, SF_KEY).await.counts.succeeded == 2).then_some(())
    })
    .await;
    drop(templates);
}

#[tokio::test]
async fn pausing_releases_runs_not_started_reports_the_running_one_and_activating_runs_them() {
    let Some(env) = node_env().await else {
        return;
    };
    env.fake.set_count_delay(Duration::from_secs(20));
    let (running, waiting) = (job_type(&env, "running"), job_type(&env, "waiting"));
    let templates = JobTemplates::apply(&[(&running, record_count())]);
    // One runs; two are claimed but cannot start yet (no template for their type).
    let ids = seed(&env, SF_ORG, &[&running, &waiting, &waiting]);
    // Room for three (the org's maxConcurrentJobs, which the retriever gets as a flag).
    let three = ["--max-concurrent-jobs", "3"];
    claim_with(&env, "acme", SF_KEY, &three).await;
    let queries = env.fake.stats().job_queries;
    crm_job(&env, SF_ORG, &ids[0], JobStatus::Running).await;
    eventually("the worker's count request", WAIT, || async {
        (env.fake.stats().job_queries > queries).then_some(())
    })
    .await;
    for id in &ids[1..] {
        run_phase(&env, SF_KEY, id, JobPhase::Claimed).await;
    }

    // Paused: the two go back to Holding in the CRM; the running one finishes and is reported.
    let patch_paused = |paused: bool| {
        run_ok(
            kubectl().args([
                "patch",
                "conn",
                "acme",
                "-n",
                env.ns(),
                "--type",
                "merge",
                "-p",
                &json!({"spec": {"paused": paused}}).to_string(),
            ]),
            None,
        )
    };
    patch_paused(true);
    env.wait_state("acme", State::Paused).await;
    for id in &ids[1..] {
        let held = crm_job(&env, SF_ORG, id, JobStatus::Holding).await;
        assert_eq!(held.claimed_by, None, "the claim is cleared: {held:?}");
        run_phase(&env, SF_KEY, id, JobPhase::Holding).await;
    }
    let done = crm_job(&env, SF_ORG, &ids[0], JobStatus::Completed).await;
    assert_eq!(done.result.as_deref(), Some("Account: 42 records"));

    // Activated: the retriever's next poll claims the two again (attempt 2) and they run.
    env.fake.set_count_delay(Duration::ZERO);
    patch_paused(false);
    env.wait_state("acme", State::Active).await;
    let templates = templates.and(&[(&waiting, record_count())]);
    claim(&env, "acme", SF_KEY).await;
    for id in &ids[1..] {
        let done = crm_job(&env, SF_ORG, id, JobStatus::Completed).await;
        assert_eq!(done.attempt, 2, "{done:?}");
    }
    drop(templates);
}

/// The fence (issue 30): the Job is created only after a conditional write on the record just
/// read. A rival processor that claims the job right after that read makes the write fail, and
/// nothing runs.
#[tokio::test]
async fn a_rival_claim_after_the_check_wins_and_no_job_is_created() {
    let Some(env) = node_env().await else {
        return;
    };
    let raced = job_type(&env, "raced");
    let _templates = JobTemplates::apply(&[(&raced, record_count())]);
    let ids = seed(&env, SF_ORG, &[&raced]);
    // The first read of the record (the operator's, before it starts the run) is answered, then a
    // desktop processor claims the job.
    env.fake
        .rival_claims_after_next_read(&ids[0], "desktop/ops-laptop");
    claim(&env, "acme", SF_KEY).await;
    let run = run_phase(&env, SF_KEY, &ids[0], JobPhase::Aborted).await;
    let status = run.status.unwrap();
    assert_eq!(status.job, None, "no Job was recorded: {status:?}");
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), env.ns());
    assert!(
        jobs.get_opt(&job_name(&jobrun_name(SF_KEY, &ids[0], 1)))
            .await
            .unwrap()
            .is_none(),
        "the run's Job was created although the rival holds the job"
    );
    let record = env.fake.job(SF_ORG, &ids[0]).unwrap();
    assert_eq!(
        (record.status, record.claimed_by.as_deref()),
        (JobStatus::Claimed, Some("desktop/ops-laptop")),
        "the rival's claim stands: {record:?}"
    );
}

/// A Job deleted in Kubernetes while it runs is reported Failed to the CRM (the record does not
/// stay Running for ever), and is never created again.
#[tokio::test]
async fn a_job_deleted_while_it_runs_is_reported_failed_and_never_run_again() {
    let Some(env) = node_env().await else {
        return;
    };
    env.fake.set_count_delay(Duration::from_secs(600));
    let slow = job_type(&env, "deleted");
    // With a TTL: after the report there is no Job to give it to (and none to hand the run over).
    let mut spec = JobTemplates::worker(&image(), &["worker", "record-count", "--timeout", "15m"]);
    spec["ttlSecondsAfterFinished"] = 5.into();
    let _templates = JobTemplates::apply(&[(&slow, spec)]);
    let ids = seed(&env, SF_ORG, &[&slow]);
    claim(&env, "acme", SF_KEY).await;
    crm_job(&env, SF_ORG, &ids[0], JobStatus::Running).await;
    run_phase(&env, SF_KEY, &ids[0], JobPhase::Running).await;
    let job = job_name(&jobrun_name(SF_KEY, &ids[0], 1));
    kubectl_ok(&["delete", "job", &job, "-n", env.ns(), "--wait=false"]);

    let failed = crm_job(&env, SF_ORG, &ids[0], JobStatus::Failed).await;
    assert_eq!(
        failed.result.as_deref(),
        Some(connection_operator::jobruns::JOB_DELETED),
        "{failed:?}"
    );
    let run = run_phase(&env, SF_KEY, &ids[0], JobPhase::Failed).await;
    let status = run.status.unwrap();
    assert_eq!(status.reported, Some(JobPhase::Failed));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "JobDeleted" && c.status == "True"),
        "{status:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), env.ns());
    assert!(
        jobs.get_opt(&job).await.unwrap().is_none(),
        "the deleted Job was created again"
    );
    assert_eq!(env.fake.job(SF_ORG, &ids[0]).unwrap().status, JobStatus::Failed);
    let kept = Api::<JobRun>::namespaced(env.client.clone(), env.ns())
        .get(&jobrun_name(SF_KEY, &ids[0], 1))
        .await
        .unwrap();
    assert!(
        kept.metadata.owner_references.is_none(),
        "owned by no Job: {kept:?}"
    );
}

/// A running job carries a lease in the CRM (`ClaimExpires__c`), renewed while it runs: it never
/// lapses under a live job, and another processor can tell a dead one.
#[tokio::test]
async fn a_running_job_s_lease_is_renewed_while_it_runs() {
    let Some(env) = node_env().await else {
        return;
    };
    // The count takes 25 s (a worker request that outlives 30 s is cut here); the claim's lease
    // is 12 s (renewed once less than half is left, looked at every 2 s here).
    env.fake.set_count_delay(Duration::from_secs(25));
    let long = job_type(&env, "leased");
    let _templates = JobTemplates::apply(&[(
        &long,
        JobTemplates::worker(&image(), &["worker", "record-count", "--timeout", "15m"]),
    )]);
    let ids = seed(&env, SF_ORG, &[&long]);
    claim_with(&env, "acme", SF_KEY, &["--claim-lease", "12s"]).await;
    let claimed = env.fake.job(SF_ORG, &ids[0]).unwrap();
    let first_expiry = claimed.claim_expires.expect("the claim has an expiry");
    crm_job(&env, SF_ORG, &ids[0], JobStatus::Running).await;
    // Past the claim's own expiry, while the worker still counts: the lease was renewed.
    let past = first_expiry + Duration::from_secs(4);
    if let Ok(wait) = past.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let running = env.fake.job(SF_ORG, &ids[0]).unwrap();
    assert_eq!(running.status, JobStatus::Running, "{running:?}");
    assert_eq!(running.claimed_by, claimed.claimed_by, "still our claim");
    let expires = running.claim_expires.expect("a running job has a lease");
    assert!(
        expires > SystemTime::now(),
        "the lease lapsed under a running job: {running:?}"
    );
    // (The run first: on a timeout it shows the run, its Job and pods, and the record.)
    run_phase(&env, SF_KEY, &ids[0], JobPhase::Succeeded).await;
    let done = crm_job(&env, SF_ORG, &ids[0], JobStatus::Completed).await;
    assert_eq!(done.result.as_deref(), Some("Account: 42 records"));
}

/// A job queued again in the CRM after it succeeded runs again, as a new JobRun (one per claim),
/// and its outcome reaches the CRM again.
#[tokio::test]
async fn a_job_queued_again_after_it_succeeded_runs_again() {
    let Some(env) = node_env().await else {
        return;
    };
    let again = job_type(&env, "again");
    let _templates = JobTemplates::apply(&[(&again, record_count())]);
    let ids = seed(&env, SF_ORG, &[&again]);
    claim(&env, "acme", SF_KEY).await;
    let first = crm_job(&env, SF_ORG, &ids[0], JobStatus::Completed).await;
    assert_eq!(first.attempt, 1);
    run_phase(&env, SF_KEY, &ids[0], JobPhase::Succeeded).await;

    // A CRM user queues it again.
    assert!(
        env.fake
            .requeue_job(SF_ORG, &ids[0], SystemTime::now() - Duration::from_secs(60))
    );
    claim(&env, "acme", SF_KEY).await;
    let second = run_phase_at(&env, SF_KEY, &ids[0], 2, JobPhase::Succeeded).await;
    assert_eq!(second.status.unwrap().reported, Some(JobPhase::Succeeded));
    let done = crm_job(&env, SF_ORG, &ids[0], JobStatus::Completed).await;
    assert_eq!(
        (done.attempt, done.result.as_deref()),
        (2, Some("Account: 42 records"))
    );
    eventually("both runs in the history", WAIT, || async {
        (history(&env, SF_KEY).await.counts.succeeded == 2).then_some(())
    })
    .await;
}
