//! Job retrieval against the real control plane and the fake CRMs: the operator gives an Active
//! connection its retriever identity and the org's OrgSettings; the retriever (run here as a
//! process, with its own ServiceAccount's token and the session the operator wrote) claims queued
//! jobs with conditional writes in the CRM and records them as JobRuns.

mod common;

use std::time::{Duration, SystemTime};

use common::jobs::*;
use common::*;
use connection_operator::api::{Connection, JobPhase, JobRun, OrgSettings, State};
use fake_providers::{JobStatus, NewJob};
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

async fn claims_jobs_up_to_max_concurrent_across_pages(dynamics: bool) {
    let env = Env::new().await;
    let (remote, key) = if dynamics {
        (D365_ENV, D365_KEY)
    } else {
        (SF_ORG, SF_KEY)
    };
    let conn = env.connect("acme", dynamics).await;
    let status = conn.status.unwrap();
    assert_eq!(
        status.org_settings.as_deref(),
        Some(key),
        "the status names the OrgSettings in use"
    );
    let settings: OrgSettings = Api::namespaced(env.client.clone(), env.ns())
        .get(key)
        .await
        .unwrap();
    assert_eq!(settings.spec, Default::default(), "created with the defaults");
    assert!(
        settings.metadata.owner_references.is_none(),
        "never owned by a Connection"
    );
    let deployment: Deployment = Api::namespaced(env.client.clone(), env.ns())
        .get("acme-retriever")
        .await
        .unwrap();
    let args = deployment.spec.template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(
        args.contains(&format!("--org-key {key}")) && args.contains("--poll-interval 300s"),
        "{args}"
    );

    seed_aged(&env.fake, remote, 7);
    env.fake.set_job_page_size(2);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = env.retriever_kubeconfig(dir.path(), "acme-retriever");
    let session = env.session_dir("acme", dir.path()).await;
    let out = retrieve_once(
        &kubeconfig,
        &session,
        env.ns(),
        "acme",
        key,
        &["--max-concurrent-jobs", "3"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("claimed 3,"), "{}", text(&out));

    let jobs = env.fake.jobs(remote);
    let claimed: Vec<_> = jobs.iter().filter(|j| j.status == JobStatus::Claimed).collect();
    assert_eq!(claimed.len(), 3, "{jobs:#?}");
    assert_eq!(jobs.iter().filter(|j| j.status == JobStatus::Holding).count(), 4);
    for job in &claimed {
        assert_eq!(
            job.claimed_by.as_deref(),
            Some(format!("{}/acme/test-pod", env.ns()).as_str())
        );
        assert_eq!(job.attempt, 1);
        assert!(job.claim_expires.is_some());
    }
    let runs = env.jobruns().await;
    assert_eq!(runs.len(), 3);
    for run in &runs {
        assert_eq!(run.spec.connection, "acme");
        let status = run.status.as_ref().unwrap();
        assert_eq!(status.phase, Some(JobPhase::Claimed));
        assert_eq!(status.attempt, Some(1));
        assert!(claimed.iter().any(|j| j.id == run.spec.crm_job_id), "{run:?}");
        assert_eq!(
            run.metadata.name.as_deref().unwrap(),
            format!("{key}-{}-1", run.spec.crm_job_id.to_ascii_lowercase())
        );
        assert_eq!(
            run.labels().get("crmconnect.io/org").map(String::as_str),
            Some(key)
        );
        assert!(
            run.metadata.owner_references.is_none(),
            "job history is not owned by the Connection"
        );
    }
    // No JobTemplate for the type: the runs stay Claimed, and say why (a condition and an event).
    let first = runs[0].name_any();
    let jobruns: Api<JobRun> = Api::namespaced(env.client.clone(), env.ns());
    let condition = eventually("TemplateFound=False", Duration::from_secs(30), || async {
        let run = jobruns.get(&first).await.ok()?;
        run.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "TemplateFound" && c.status == "False")
    })
    .await;
    assert_eq!(condition.reason, "TemplateMissing");
    assert!(
        condition.message.contains("no JobTemplate export"),
        "{}",
        condition.message
    );
    let run = jobruns.get(&first).await.unwrap();
    assert_eq!(
        run.status.unwrap().phase,
        Some(JobPhase::Claimed),
        "it stays claimed"
    );
    eventually("a TemplateMissing event", Duration::from_secs(30), || async {
        kubectl_ok(&[
            "get",
            "events",
            "-n",
            env.ns(),
            "--field-selector",
            "reason=TemplateMissing",
            "-o",
            "name",
        ])
        .lines()
        .next()
        .map(str::to_string)
    })
    .await;

    // The runs wait for a template (holding no slot), and no more jobs of their type are claimed.
    let again = retrieve_once(
        &kubeconfig,
        &session,
        env.ns(),
        "acme",
        key,
        &["--max-concurrent-jobs", "3"],
    )
    .await;
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("claimed 0,"),
        "{}",
        text(&again)
    );

    // No token anywhere in what was recorded.
    let access = std::fs::read_to_string(session.join("access_token")).unwrap();
    let recorded = kubectl_ok(&["get", "jobruns,orgsettings", "-n", env.ns(), "-o", "yaml"]);
    let events = kubectl_ok(&["get", "events", "-n", env.ns(), "-o", "yaml"]);
    for haystack in [recorded.as_str(), events.as_str(), &text(&out), &text(&again)] {
        assert!(!haystack.contains(access.trim()), "the access token leaked");
    }
    env.op.stop().await;
}

#[tokio::test]
async fn salesforce_jobs_are_claimed_up_to_max_concurrent_jobs_across_pages() {
    claims_jobs_up_to_max_concurrent_across_pages(false).await;
}

#[tokio::test]
async fn dataverse_jobs_are_claimed_up_to_max_concurrent_jobs_across_pages() {
    claims_jobs_up_to_max_concurrent_across_pages(true).await;
}

#[tokio::test]
async fn two_retrievers_racing_claim_each_job_once_and_the_loser_sees_412() {
    let env = Env::new().await;
    env.connect("acme", false).await;
    let ids = seed_aged(&env.fake, SF_ORG, 4);
    // Both read the queue before either writes.
    env.fake.set_query_delay(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = env.retriever_kubeconfig(dir.path(), "acme-retriever");
    let session = env.session_dir("acme", dir.path()).await;
    let args = ["--max-concurrent-jobs", "10", "--max-claims-per-poll", "10"];
    let (one, two) = tokio::join!(
        retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &args),
        retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &args),
    );
    assert!(one.status.success(), "{}", text(&one));
    assert!(two.status.success(), "{}", text(&two));
    let jobs = env.fake.jobs(SF_ORG);
    assert!(
        jobs.iter()
            .all(|j| j.status == JobStatus::Claimed && j.attempt == 1),
        "each claimed exactly once: {jobs:#?}"
    );
    assert_eq!(env.jobruns().await.len(), ids.len());
    assert!(
        env.fake.stats().job_patch_conflicts >= 1,
        "the slower writer got 412"
    );
    let summaries = format!(
        "{}{}",
        String::from_utf8_lossy(&one.stdout),
        String::from_utf8_lossy(&two.stdout)
    );
    assert!(
        summaries.contains("lost to another processor")
            && !summaries.contains("lost to another processor 0, gone 0, holding 4, capacity 10\nclaimed 4"),
        "{summaries}"
    );
    env.op.stop().await;
}

#[tokio::test]
async fn young_jobs_wait_and_auto_run_off_claims_nothing() {
    let env = Env::new().await;
    env.connect("acme", false).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = env.retriever_kubeconfig(dir.path(), "acme-retriever");
    let session = env.session_dir("acme", dir.path()).await;

    // Changed this second: not claimed until it is 2 s old.
    let young = env.fake.seed_jobs(SF_ORG, &[NewJob::new("export")]);
    let out = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("claimed 0,"),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("holding 1"),
        "{}",
        text(&out)
    );
    env.fake
        .set_job_modified(SF_ORG, &young[0], SystemTime::now() - Duration::from_secs(3));

    // Auto-run off: polled and counted, never claimed.
    let off = retrieve_once(
        &kubeconfig,
        &session,
        env.ns(),
        "acme",
        SF_KEY,
        &["--auto-run-jobs=false"],
    )
    .await;
    assert!(
        String::from_utf8_lossy(&off.stdout)
            .contains("claimed 0, lost to another processor 0, gone 0, holding 1, capacity 0"),
        "{}",
        text(&off)
    );
    assert_eq!(
        env.fake.job(SF_ORG, &young[0]).unwrap().status,
        JobStatus::Holding
    );

    let on = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(
        String::from_utf8_lossy(&on.stdout).contains("claimed 1,"),
        "{}",
        text(&on)
    );
    env.op.stop().await;
}

#[tokio::test]
async fn throttling_and_bad_answers_are_clear_errors_and_never_change_the_connection() {
    let env = Env::new().await;
    env.connect("acme", false).await;
    seed_aged(&env.fake, SF_ORG, 1);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = env.retriever_kubeconfig(dir.path(), "acme-retriever");
    let session = env.session_dir("acme", dir.path()).await;

    env.fake
        .push_fault(fake_providers::Fault::request_limit_exceeded());
    let limited = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert_eq!(limited.status.code(), Some(1), "{}", text(&limited));
    assert!(
        text(&limited).contains("throttling this org's requests (HTTP 403 REQUEST_LIMIT_EXCEEDED)"),
        "{}",
        text(&limited)
    );

    env.fake.throttle_data(1, 7);
    let throttled = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(text(&throttled).contains("HTTP 429"), "{}", text(&throttled));

    for (fault, expect) in [
        (
            fake_providers::Fault::html(fake_providers::FaultTarget::SalesforceData, 200),
            "an HTML page",
        ),
        (
            fake_providers::Fault::malformed_json(fake_providers::FaultTarget::SalesforceData),
            "not JSON",
        ),
        (
            fake_providers::Fault::oversized(fake_providers::FaultTarget::SalesforceData, 5 << 20),
            "larger than",
        ),
    ] {
        env.fake.push_fault(fault);
        let out = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(expect), "{expect:?}: {}", text(&out));
    }
    env.fake
        .push_fault(fake_providers::Fault::malformed_salesforce_row());
    let row = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(
        row.status.success(),
        "a bad row is skipped, not fatal: {}",
        text(&row)
    );
    assert!(text(&row).contains("skipped a job queue row"), "{}", text(&row));

    // A CRM that answers `done: false` with empty pages for ever: the poll ends after MAX_PAGES
    // pages (one first page and nine next pages), claims nothing and is not an error.
    let endless = json!({"totalSize": 1, "done": false, "records": [],
                         "nextRecordsUrl": "/services/data/v62.0/query/01gEndless-1"});
    env.fake.push_fault(
        fake_providers::Fault::status(
            fake_providers::FaultTarget::SalesforceData,
            200,
            &endless.to_string(),
        )
        .always(),
    );
    let queries = env.fake.stats().job_queries;
    let out = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    env.fake.clear_faults();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("claimed 0,"),
        "{}",
        text(&out)
    );
    assert_eq!(
        env.fake.stats().job_queries - queries,
        connection_operator::retriever::plan::MAX_PAGES as u64,
        "{}",
        text(&out)
    );

    // An access token the CRM no longer accepts: a clear error (the operator renews the session).
    env.fake.expire_access_tokens();
    let stale = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(
        text(&stale).contains("rejected the session (HTTP 401"),
        "{}",
        text(&stale)
    );

    let c = env.wait_state("acme", State::Active).await;
    assert_eq!(
        c.status.unwrap().reason.as_deref(),
        Some("Connected"),
        "no retrieval failure changes the connection"
    );
    env.op.stop().await;
}

#[tokio::test]
async fn a_claim_without_a_jobrun_lapses_and_is_claimed_again_once() {
    let env = Env::new().await;
    env.connect("acme", false).await;
    let ids = seed_aged(&env.fake, SF_ORG, 1);
    let dir = tempfile::tempdir().unwrap();
    let session = env.session_dir("acme", dir.path()).await;
    // A retriever that claims but cannot record (here: acme's retriever posing as another
    // connection, whose JobRun the admission policy refuses; for a real retriever, a crash
    // between the two).
    let kubeconfig = env.retriever_kubeconfig(dir.path(), "acme-retriever");
    let out = retrieve_once(
        &kubeconfig,
        &session,
        env.ns(),
        "other",
        SF_KEY,
        &["--claim-lease", "1s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(env.fake.job(SF_ORG, &ids[0]).unwrap().status, JobStatus::Claimed);
    assert!(env.jobruns().await.is_empty());

    // After the lease (and the 2-second rule on the claim's own write), the job is claimed again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("claimed 1,"),
        "{}",
        text(&out)
    );
    assert_eq!(env.fake.job(SF_ORG, &ids[0]).unwrap().attempt, 2, "Attempt+1");
    let runs = env.jobruns().await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status.as_ref().unwrap().attempt, Some(2));
    // Its lease (15m by default) holds: not claimed a third time.
    let out = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("claimed 0,"),
        "{}",
        text(&out)
    );
    env.op.stop().await;
}

#[tokio::test]
async fn a_retriever_may_write_only_its_own_connections_jobruns() {
    let env = Env::new().await;
    env.connect("acme", false).await;
    let sa = format!("system:serviceaccount:{}:acme-retriever", env.ns());
    let can = |verb: &str, resource: &str| {
        let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
        run(
            kubectl().args([
                "auth",
                "can-i",
                verb,
                resource,
                "-n",
                env.ns(),
                "--as",
                &sa,
                &format!("--subresource={sub}"),
            ]),
            None,
        )
        .stdout
        .trim()
        .to_string()
    };
    assert_eq!(can("create", "jobruns.crmconnect.io"), "yes");
    assert_eq!(can("patch", "jobruns.crmconnect.io/status"), "yes");
    for (verb, resource) in [
        ("delete", "jobruns.crmconnect.io"),
        ("update", "jobruns.crmconnect.io"),
        ("get", "secrets"),
        ("create", "pods"),
        ("patch", "connections.crmconnect.io"),
        ("create", "orgsettings.crmconnect.io"),
    ] {
        assert_eq!(can(verb, resource), "no", "{verb} {resource}");
    }
    let jobrun = |connection: &str, name: &str, org: &str| {
        json!({
            "apiVersion": "crmconnect.io/v1alpha1", "kind": "JobRun",
            "metadata": {"name": name, "namespace": env.ns(),
                         "labels": {"crmconnect.io/connection": connection, "crmconnect.io/org": org}},
            "spec": {"connection": connection, "crmJobId": "a0B000000000001AAA", "type": "export", "provider": "SalesforceProduction"},
        })
        .to_string()
    };
    let create_as = |who: Option<&str>, manifest: String| {
        let mut cmd = kubectl();
        cmd.args(["create", "-f", "-"]);
        if let Some(who) = who {
            cmd.args(["--as", who]);
        }
        run(&mut cmd, Some(&manifest))
    };
    let name = connection_operator::api::jobrun_name(SF_KEY, "a0B000000000001AAA", 1);
    let theirs = create_as(Some(&sa), jobrun("other", &name, SF_KEY));
    assert!(!theirs.success, "another connection's JobRun was accepted");
    assert!(
        theirs
            .stderr
            .contains("may only write JobRuns whose spec.connection"),
        "{}",
        theirs.stderr
    );
    // Its org label must start its name (a run forged for another org is refused)...
    let forged = create_as(Some(&sa), jobrun("acme", &name, "sf-00d000000000099aaa"));
    assert!(!forged.success, "a run named for another org was accepted");
    assert!(
        forged
            .stderr
            .contains("carries its org in the crmconnect.io/org label"),
        "{}",
        forged.stderr
    );
    // ... and its name is <org>-<CRM job ID>-<attempt>, for anyone (the CRD's rule).
    for bad in [
        format!("{SF_KEY}-a0b000000000002aaa-1"),
        format!("{SF_KEY}-a0b000000000001aaa"),
        format!("{SF_KEY}-a0b000000000001aaa-0"),
    ] {
        let refused = create_as(None, jobrun("acme", &bad, SF_KEY));
        assert!(!refused.success, "{bad} was accepted");
        assert!(
            refused
                .stderr
                .contains("a JobRun is named <org key>-<spec.crmJobId"),
            "{}",
            refused.stderr
        );
    }
    let own = create_as(Some(&sa), jobrun("acme", &name, SF_KEY));
    assert!(own.success, "{}", own.stderr);

    // A run whose org is not its connection's (made by someone who may write JobRuns) is never
    // served with the connection's session: no Job, no CRM call, a condition and an event.
    let other_org = "sf-00d000000000099aaa";
    let stray = connection_operator::api::jobrun_name(other_org, "a0B000000000001AAA", 1);
    assert!(create_as(None, jobrun("acme", &stray, other_org)).success);
    let reads = env.fake.stats().job_reads;
    // A status patch as the cluster administrator.
    let patch_status = |status: serde_json::Value| {
        let patch = json!({ "status": status }).to_string();
        run(
            kubectl().args([
                "patch",
                "jobrun",
                &stray,
                "-n",
                env.ns(),
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ]),
            None,
        )
    };
    let claimed = patch_status(json!({"phase": "Claimed", "attempt": 1, "claim": {
        "by": format!("{}/acme/x", env.ns()), "at": "2026-12-08T00:00:00Z", "expires": "2099-01-01T00:00:00Z"}}));
    assert!(claimed.success, "{}", claimed.stderr);
    let jobruns: Api<JobRun> = Api::namespaced(env.client.clone(), env.ns());
    let condition = eventually("Started=False OrgMismatch", Duration::from_secs(30), || async {
        let status = jobruns.get(&stray).await.ok()?.status?;
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Started" && c.reason == "OrgMismatch")
    })
    .await;
    assert!(condition.message.contains(other_org), "{}", condition.message);
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(env.client.clone(), env.ns());
    assert!(jobs.get_opt(&stray).await.unwrap().is_none(), "no Job");
    assert_eq!(env.fake.stats().job_reads, reads, "no CRM call");

    // The status is bounded: a result over 256 characters, a claimant over 255, or more than 8
    // conditions is refused by the API server (nothing unbounded reaches the caches).
    for (what, status) in [
        ("result", json!({"result": "r".repeat(257)})),
        (
            "claim.by",
            json!({"claim": {"by": "b".repeat(256), "at": "2026-12-08T00:00:00Z", "expires": "2099-01-01T00:00:00Z"}}),
        ),
        (
            "conditions",
            json!({"conditions": (0..9).map(|i| json!({"type": format!("T{i}"), "status": "True", "reason": "R", "message": "", "lastTransitionTime": "2026-12-08T00:00:00Z"})).collect::<Vec<_>>()}),
        ),
    ] {
        let out = patch_status(status);
        assert!(!out.success, "a {what} beyond its bound was accepted");
        assert!(
            out.stderr.contains("Too long") || out.stderr.contains("Too many"),
            "{what}: {}",
            out.stderr
        );
    }
    env.op.stop().await;
}

#[tokio::test]
async fn a_new_connection_for_the_same_org_uses_its_settings_and_paused_gets_no_retriever() {
    let env = Env::new().await;
    env.connect("first", false).await;
    let orgs: Api<OrgSettings> = Api::namespaced(env.client.clone(), env.ns());
    orgs.patch(
        SF_KEY,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"pollInterval": "7m", "maxConcurrentJobs": 4}})),
    )
    .await
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), env.ns());
    let args_of = |name: &'static str| {
        let deployments = deployments.clone();
        async move {
            deployments.get(name).await.ok()?.spec.template.spec?.containers[0]
                .args
                .clone()
                .map(|a| a.join(" "))
        }
    };
    // A change of the settings rolls the retriever.
    eventually("the first retriever rolled", Duration::from_secs(30), || async {
        args_of("first-retriever")
            .await
            .filter(|a| a.contains("--poll-interval 420s") && a.contains("--max-concurrent-jobs 4"))
    })
    .await;

    Api::<Connection>::namespaced(env.client.clone(), env.ns())
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    eventually("first gone", Duration::from_secs(30), || async {
        Api::<Connection>::namespaced(env.client.clone(), env.ns())
            .get_opt("first")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let second = env.connect("second", false).await;
    assert_eq!(second.status.unwrap().org_settings.as_deref(), Some(SF_KEY));
    let args = eventually("the second retriever", Duration::from_secs(30), || {
        args_of("second-retriever")
    })
    .await;
    assert!(
        args.contains("--poll-interval 420s") && args.contains("--max-concurrent-jobs 4"),
        "{args}"
    );
    assert_eq!(
        orgs.get(SF_KEY).await.unwrap().spec.poll_interval,
        "7m",
        "kept, not reset"
    );

    // Paused: no retriever replicas.
    Api::<Connection>::namespaced(env.client.clone(), env.ns())
        .patch(
            "second",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    env.wait_state("second", State::Paused).await;
    eventually("scaled to 0", Duration::from_secs(30), || async {
        (deployments.get("second-retriever").await.ok()?.spec.replicas == Some(0)).then_some(())
    })
    .await;
    env.op.stop().await;
}

#[tokio::test]
async fn pausing_gives_claimed_jobs_back_to_holding_and_activating_claims_them_again() {
    let env = Env::new().await;
    env.connect("acme", false).await;
    let ids = seed_aged(&env.fake, SF_ORG, 2);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = env.retriever_kubeconfig(dir.path(), "acme-retriever");
    let session = env.session_dir("acme", dir.path()).await;
    let out = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("claimed 2,"),
        "{}",
        text(&out)
    );

    let connections: Api<Connection> = Api::namespaced(env.client.clone(), env.ns());
    let pause = |paused: bool| {
        let connections = connections.clone();
        async move {
            connections
                .patch(
                    "acme",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"paused": paused}})),
                )
                .await
                .unwrap();
        }
    };
    pause(true).await;
    eventually(
        "both jobs back to Holding in the CRM",
        Duration::from_secs(60),
        || async {
            let jobs = env.fake.jobs(SF_ORG);
            jobs.iter()
                .all(|j| j.status == JobStatus::Holding && j.claimed_by.is_none())
                .then_some(())
        },
    )
    .await;
    eventually("both JobRuns Holding", Duration::from_secs(30), || async {
        let runs = env.jobruns().await;
        runs.iter()
            .all(|r| r.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Holding))
            .then_some(())
    })
    .await;

    // Activated: the retriever's next poll claims them again (attempt 2).
    pause(false).await;
    env.wait_state("acme", State::Active).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the 2-second rule on the release's write
    let out = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &[]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("claimed 2,"),
        "{}",
        text(&out)
    );
    for id in &ids {
        let job = env.fake.job(SF_ORG, id).unwrap();
        assert_eq!((job.status, job.attempt), (JobStatus::Claimed, 2), "{job:?}");
    }
    // Each claim is a JobRun of its own: the first attempts' stay Holding (their record), the
    // second attempts' are Claimed.
    let runs = env.jobruns().await;
    assert_eq!(runs.len(), 4, "a JobRun per claim");
    for run in &runs {
        let status = run.status.as_ref().unwrap();
        let want = match status.attempt {
            Some(1) => JobPhase::Holding,
            _ => JobPhase::Claimed,
        };
        assert_eq!(status.phase, Some(want), "{run:?}");
        assert!(run.name_any().ends_with(&format!("-{}", status.attempt.unwrap())));
    }
    assert_eq!(
        runs.iter()
            .filter(|r| r.status.as_ref().unwrap().attempt == Some(2))
            .count(),
        2
    );
    env.op.stop().await;
}

/// Issue 30: runs that cannot start (no JobTemplate for their type) hold no slot, block their type
/// rather than the org, and give their job back once their claim's lease is over; the template
/// appearing lets the type be claimed again.
#[tokio::test]
async fn runs_without_a_template_hold_no_slot_and_give_their_job_back() {
    let env = Env::new().await;
    env.connect("acme", false).await;
    let (mystery, known) = (
        format!("mystery-{}", &env.ns()[2..]),
        format!("known-{}", &env.ns()[2..]),
    );
    let ids = env.fake.seed_jobs(
        SF_ORG,
        &[
            NewJob::new(&mystery),
            NewJob::new(&mystery),
            NewJob::new(&mystery),
            NewJob::new(&known),
        ],
    );
    let past = SystemTime::now() - Duration::from_secs(60);
    for id in &ids {
        assert!(env.fake.set_job_modified(SF_ORG, id, past));
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = env.retriever_kubeconfig(dir.path(), "acme-retriever");
    let session = env.session_dir("acme", dir.path()).await;
    // The defaults (maxConcurrentJobs 2) and a claim lease of 6 s.
    let lease = ["--claim-lease", "6s"];
    let first = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &lease).await;
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("claimed 2,"),
        "{}",
        text(&first)
    );
    let jobruns: Api<JobRun> = Api::namespaced(env.client.clone(), env.ns());
    for id in &ids[..2] {
        let name = connection_operator::api::jobrun_name(SF_KEY, id, 1);
        eventually("TemplateFound=False", Duration::from_secs(30), || async {
            let status = jobruns.get(&name).await.ok()?.status?;
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "TemplateFound" && c.status == "False")
                .then_some(())
        })
        .await;
    }

    // Both slots are free again: the next poll skips the third job of that type and claims the
    // other type's.
    let second = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &lease).await;
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("claimed 1,"),
        "{}",
        text(&second)
    );
    assert_eq!(env.fake.job(SF_ORG, &ids[3]).unwrap().status, JobStatus::Claimed);
    assert_eq!(env.fake.job(SF_ORG, &ids[2]).unwrap().status, JobStatus::Holding);

    // Once the lease is over the job goes back to the CRM queue, for any processor.
    for id in &ids[..2] {
        eventually("given back to Holding", Duration::from_secs(60), || async {
            let job = env.fake.job(SF_ORG, id)?;
            (job.status == JobStatus::Holding && job.claimed_by.is_none()).then_some(())
        })
        .await;
        let name = connection_operator::api::jobrun_name(SF_KEY, id, 1);
        let run = eventually("the run Holding", Duration::from_secs(30), || async {
            let run = jobruns.get(&name).await.ok()?;
            (run.status.as_ref()?.phase == Some(JobPhase::Holding)).then_some(run)
        })
        .await;
        let status = run.status.unwrap();
        let condition = status
            .conditions
            .iter()
            .find(|c| c.type_ == "TemplateFound")
            .unwrap();
        assert!(condition.message.contains("given back"), "{}", condition.message);
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // the 2-second rule on the release's write
    let third = retrieve_once(&kubeconfig, &session, env.ns(), "acme", SF_KEY, &lease).await;
    assert!(
        String::from_utf8_lossy(&third.stdout).contains("claimed 0,"),
        "the type is still blocked: {}",
        text(&third)
    );

    // The template appears (its pods never start here): the type is claimed again.
    let _templates = JobTemplates::apply(&[(
        &mystery,
        JobTemplates::worker("absent.invalid/none:0", &["never"]),
    )]);
    for id in &ids[..2] {
        let name = connection_operator::api::jobrun_name(SF_KEY, id, 1);
        eventually("TemplateFound=True", Duration::from_secs(30), || async {
            let status = jobruns.get(&name).await.ok()?.status?;
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "TemplateFound" && c.status == "True")
                .then_some(())
        })
        .await;
    }
    // The Jobs of the runs claimed next get the session's instance URL, not the Connection status's (which anyone who may
    // write the status can forge; the operator only wrote it, so nothing rewrites it here).
    let forged = "https://forged.example.com";
    Api::<Connection>::namespaced(env.client.clone(), env.ns())
        .patch_status(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"instanceUrl": forged}})),
        )
        .await
        .unwrap();
    let fourth = retrieve_once(
        &kubeconfig,
        &session,
        env.ns(),
        "acme",
        SF_KEY,
        &["--max-concurrent-jobs", "10"],
    )
    .await;
    assert!(
        String::from_utf8_lossy(&fourth.stdout).contains("claimed 3,"),
        "{}",
        text(&fourth)
    );
    for id in &ids[..2] {
        assert_eq!(env.fake.job(SF_ORG, id).unwrap().attempt, 2);
    }

    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(env.client.clone(), env.ns());
    let name = connection_operator::jobruns::build::job_name(&connection_operator::api::jobrun_name(
        SF_KEY, &ids[2], 1,
    ));
    let job = eventually("the Job of the third run", Duration::from_secs(60), || async {
        jobs.get_opt(&name).await.ok()?
    })
    .await;
    let env_var = |key: &str| {
        job.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == key)
            .and_then(|e| e.value.clone())
    };
    let session: k8s_openapi::api::core::v1::Secret = Api::namespaced(env.client.clone(), env.ns())
        .get("acme-session")
        .await
        .unwrap();
    let session_url = String::from_utf8(session.data.unwrap()["instance_url"].0.clone()).unwrap();
    assert_ne!(session_url.trim(), forged);
    assert_eq!(
        env_var("CRM_INSTANCE_URL").as_deref(),
        Some(session_url.trim().trim_end_matches('/'))
    );
    env.op.stop().await;
}

/// Issue 30: runs that ended without a Job of their own (given back to Holding, never given a
/// status by a retriever that stopped) are collected once they are the job TTL old; the CRM job
/// and the org's history are untouched.
#[tokio::test]
async fn runs_that_ended_without_a_job_are_collected_after_the_job_ttl() {
    let ttl = Duration::from_secs(8);
    let env = Env::configured(|config| config.job_ttl = ttl).await;
    env.connect("acme", true).await;
    let ids = seed_aged(&env.fake, D365_ENV, 1);
    env.retriever("acme").await.claims(D365_KEY, &[], 1).await;
    // A run a retriever created and never wrote a status for (it stopped in between).
    let before = std::time::Instant::now();
    let orphan = connection_operator::api::jobrun_name(D365_KEY, "orphan", 1);
    let manifest = json!({
        "apiVersion": "crmconnect.io/v1alpha1", "kind": "JobRun",
        "metadata": {"name": orphan, "namespace": env.ns(),
                     "labels": {"crmconnect.io/connection": "acme", "crmconnect.io/org": D365_KEY}},
        "spec": {"connection": "acme", "crmJobId": "orphan", "type": "export", "provider": "Dynamics365"}
    });
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest.to_string()));

    let connections: Api<Connection> = Api::namespaced(env.client.clone(), env.ns());
    connections
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    let claimed = connection_operator::api::jobrun_name(D365_KEY, &ids[0], 1);
    let jobruns: Api<JobRun> = Api::namespaced(env.client.clone(), env.ns());
    eventually(
        "the run given back (Holding)",
        Duration::from_secs(60),
        || async {
            let status = jobruns.get(&claimed).await.ok()?.status?;
            (status.reported == Some(JobPhase::Holding)).then_some(())
        },
    )
    .await;
    eventually("both runs collected", Duration::from_secs(60), || async {
        (jobruns.get_opt(&claimed).await.ok()?.is_none() && jobruns.get_opt(&orphan).await.ok()?.is_none())
            .then_some(())
    })
    .await;
    // Not before its TTL (from its creation, which came after `before`; whole seconds).
    assert!(
        before.elapsed() + Duration::from_secs(1) >= ttl,
        "collected after {:?}",
        before.elapsed()
    );
    let job = env.fake.job(D365_ENV, &ids[0]).unwrap();
    assert_eq!((job.status, job.claimed_by), (JobStatus::Holding, None));
    env.op.stop().await;
}

/// Issue 30: by default a retriever claims only the job types a JobTemplate can run. The operator
/// passes them as its flags (every spelling of each template's type allowing the connection's
/// provider; of the org's `allowedJobTypes`, those with a template); a template created or deleted
/// re-decides them; with none, the retriever asks the CRM nothing and claims nothing.
#[tokio::test]
async fn only_types_with_a_job_template_are_claimed() {
    let env = Env::new().await;
    env.connect("acme", false).await;
    let suffix = &env.ns()[2..];
    let (mine, theirs) = (format!("mine-{suffix}"), format!("dv-only-{suffix}"));
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), env.ns());
    let args = || async {
        let d = deployments.get("acme-retriever").await.ok()?;
        d.spec
            .template
            .spec
            .as_ref()?
            .containers
            .first()?
            .args
            .as_ref()
            .map(|a| a.join(" "))
    };
    let before = eventually("the retriever", Duration::from_secs(30), &args).await;
    assert!(!before.contains(&mine), "{before}");

    let mut dv_only = JobTemplates::worker("absent.invalid/none:0", &["never"]);
    dv_only["providers"] = json!(["Dynamics365"]);
    let templates = JobTemplates::apply(&[
        (&mine, JobTemplates::worker("absent.invalid/none:0", &["never"])),
        (&theirs, dv_only),
    ]);
    let spellings = format!("{mine},{},{}", mine.replace('-', "_"), mine.replace('-', "."));
    let with = eventually(
        "the template's type in the retriever's flags",
        Duration::from_secs(60),
        || async {
            let a = args().await?;
            a.contains(&spellings).then_some(a)
        },
    )
    .await;
    assert!(
        !with.contains(&theirs),
        "a Dynamics-only template for a Salesforce org: {with}"
    );
    assert!(!with.contains("--no-job-templates"), "{with}");

    // The org's allowedJobTypes: only those with a template.
    let key = SF_KEY;
    Api::<OrgSettings>::namespaced(env.client.clone(), env.ns())
        .patch(
            key,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"allowedJobTypes": [mine.to_uppercase(), "untemplated"]}})),
        )
        .await
        .unwrap();
    eventually(
        "only the allowed type with a template",
        Duration::from_secs(60),
        || async {
            let a = args().await?;
            a.contains(&format!("--allowed-job-types {}", mine.to_uppercase()))
                .then_some(())
        },
    )
    .await;

    // The template deleted: no longer claimed.
    drop(templates);
    eventually(
        "the deleted template's type gone",
        Duration::from_secs(60),
        || async {
            let a = args().await?;
            (!a.contains(&mine.to_uppercase())).then_some(())
        },
    )
    .await;

    // A retriever told that no template can run the org's jobs asks the CRM nothing.
    seed_aged(&env.fake, SF_ORG, 1);
    let retriever = env.retriever("acme").await;
    let queries = env.fake.stats().job_queries;
    retriever.claims(SF_KEY, &["--no-job-templates"], 0).await;
    assert_eq!(env.fake.stats().job_queries, queries, "no query");
    env.op.stop().await;
}
