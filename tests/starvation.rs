//! The starvation figure of issue 30 (not part of `make test`: `scripts/bench-starvation.sh` runs it).
//!
//! One in-process operator watches two namespaces against the fake CRMs. Namespace B holds
//! `QUIET` Dynamics connections whose tokens are refreshed every `INTERVAL` (every recheck is a
//! token request). Namespace A holds one Salesforce connection and `HOSTILE` claimed JobRuns of a
//! type with a JobTemplate, whose CRM never answers (every record read hangs until the request
//! timeout): the worst a tenant can do to the JobRun controller. The same script first runs a
//! baseline round without the hostile runs. Each round counts B's token refreshes over `WINDOW`
//! (the schedule asks for QUIET × WINDOW / INTERVAL) and reads the test process's resident memory
//! (the operator, the fake CRMs and the harness together: an upper bound of the operator's).

mod common;

use std::time::{Duration, Instant};

use common::*;
use connection_operator::api::{JobRun, State, jobrun_name};
use connection_operator::controller::Config;
use fake_providers::{DynamicsEnvironment, FakeProviders, Fault, FaultTarget, SalesforceOrg};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const QUIET: usize = 20;
const HOSTILE: usize = 200;
const INTERVAL: Duration = Duration::from_secs(10);
const WINDOW: Duration = Duration::from_secs(60);
const HOSTILE_ORG: &str = "00D000000000077AAA";
const HOSTILE_KEY: &str = "sf-00d000000000077aaa";

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn apply(manifest: &serde_json::Value) {
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest.to_string()));
}

fn connection(ns: &str, name: &str, token: &str, provider: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({"team": "t", "credentialsSecretRef": {"name": format!("{name}-creds")}});
    spec.as_object_mut()
        .unwrap()
        .extend(provider.as_object().unwrap().clone());
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{name}-creds"), "namespace": ns},
         "stringData": {"client_id": "cid", "refresh_token": token}},
        {"apiVersion": "crmconnect.io/v1alpha1", "kind": "Connection",
         "metadata": {"name": name, "namespace": ns}, "spec": spec},
    ]})
}

struct Figures {
    refreshes: u64,
    rss_kib: u64,
    hostile_reads: u64,
}

async fn round(hostile: bool) -> Figures {
    ensure_operator_rbac();
    let client = client().await;
    let (a, b) = (
        TempNamespace::new(&client).await,
        TempNamespace::new(&client).await,
    );
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(
        HOSTILE_ORG,
        "005000000000077AAA",
        "a@x",
        "cid",
    ));
    let mut config = Config {
        namespaces: vec![a.name().to_string(), b.name().to_string()],
        ..Default::default()
    };
    config.validator.entra_authority_override = Some(fake.entra_authority());
    config.policy.revalidate_every = INTERVAL;
    config.policy.refresh_every = Duration::ZERO;
    let op = InProcessOperator::start(config).await;

    for i in 0..QUIET {
        let env = format!("5151{i:04}-5151-5151-5151-515151515151");
        let url = fake.environment_url();
        fake.add_dynamics_environment(DynamicsEnvironment::new(
            &env,
            &format!("6161{i:04}-6161-6161-6161-616161616161"),
            "cid",
        ));
        let token = fake.issue_refresh_token(&env);
        apply(&connection(
            b.name(),
            &format!("quiet-{i}"),
            &token,
            json!({"provider": "Dynamics365", "dynamics": {"environmentUrl": url}}),
        ));
    }
    let token = fake.issue_refresh_token(HOSTILE_ORG);
    apply(&connection(
        a.name(),
        "hostile",
        &token,
        json!({"provider": "SalesforceProduction", "salesforce": {"loginUrl": fake.salesforce_login_url()}}),
    ));
    let connections: Api<connection_operator::api::Connection> = Api::all(client.clone());
    eventually("all Active", Duration::from_secs(120), || async {
        let list = connections.list(&Default::default()).await.ok()?;
        let active = list
            .items
            .iter()
            .filter(|c| {
                [a.name(), b.name()].contains(&c.metadata.namespace.as_deref().unwrap_or_default())
                    && c.status.as_ref().and_then(|s| s.state) == Some(State::Active)
            })
            .count();
        (active == QUIET + 1).then_some(())
    })
    .await;

    let job_type = format!("hostile-{}", &a.name()[2..]);
    let _templates = JobTemplates::apply(&[(
        &job_type,
        JobTemplates::worker("absent.invalid/none:0", &["never"]),
    )]);
    if hostile {
        // The hostile org's CRM never answers a data request.
        fake.push_fault(Fault::hang(FaultTarget::SalesforceData).always());
        let runs: Api<JobRun> = Api::namespaced(client.clone(), a.name());
        for i in 0..HOSTILE {
            let id = format!("a0B0000000{i:05}AAA");
            let name = jobrun_name(HOSTILE_KEY, &id, 1);
            let run: JobRun = serde_json::from_value(json!({
                "apiVersion": "crmconnect.io/v1alpha1", "kind": "JobRun",
                "metadata": {"name": name, "labels": {"crmconnect.io/connection": "hostile", "crmconnect.io/org": HOSTILE_KEY}},
                "spec": {"connection": "hostile", "crmJobId": id, "type": job_type, "provider": "SalesforceProduction"}
            }))
            .unwrap();
            runs.create(&PostParams::default(), &run).await.unwrap();
            let status = json!({"status": {"phase": "Claimed", "attempt": 1, "claim": {
                "by": format!("{}/hostile/x", a.name()), "at": "2026-12-08T00:00:00Z", "expires": "2099-01-01T00:00:00Z"}}});
            runs.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await
                .unwrap();
        }
    }

    // Let the first wave of rechecks pass, then count one window.
    tokio::time::sleep(INTERVAL * 2).await;
    let before = fake.stats();
    let started = Instant::now();
    let mut peak = rss_kib();
    while started.elapsed() < WINDOW {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(rss_kib());
    }
    let after = fake.stats();
    fake.clear_faults();
    op.stop().await;
    Figures {
        refreshes: after.entra_token_requests - before.entra_token_requests,
        rss_kib: peak,
        hostile_reads: after.job_reads - before.job_reads,
    }
}

#[tokio::test]
#[ignore = "a benchmark: scripts/bench-starvation.sh"]
async fn starvation_figure() {
    let expected = QUIET as u64 * WINDOW.as_secs() / INTERVAL.as_secs();
    let baseline = round(false).await;
    let hostile = round(true).await;
    println!(
        "schedule: {expected} refreshes of namespace B in {WINDOW:?} ({QUIET} connections every {INTERVAL:?})"
    );
    for (name, f) in [("baseline", &baseline), ("hostile", &hostile)] {
        println!(
            "{name}: B's refreshes {} ({:.2} of the schedule), peak RSS of the test process {} MiB, record reads of A's CRM {}",
            f.refreshes,
            f.refreshes as f64 / expected as f64,
            f.rss_kib / 1024,
            f.hostile_reads
        );
    }
    println!(
        "ratio hostile / baseline: refreshes {:.2}, peak RSS {:.2}",
        hostile.refreshes as f64 / baseline.refreshes.max(1) as f64,
        hostile.rss_kib as f64 / baseline.rss_kib.max(1) as f64
    );
}
