//! The retriever's only writes to Kubernetes: a JobRun per claimed CRM job, and its status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};

use crate::api::{JobClaim, JobPhase, JobRun, JobRunSpec, JobRunStatus, Provider, jobrun_name, labels};

/// Field manager of the retriever's writes.
pub const MANAGER: &str = "crmconnect-retriever";

/// The JobRun recording that `connection`'s retriever claimed CRM job `crm_job_id`.
pub fn jobrun(
    connection: &str,
    org_key: &str,
    provider: Provider,
    crm_job_id: &str,
    job_type: &str,
    attempt: i64,
) -> JobRun {
    JobRun {
        metadata: ObjectMeta {
            name: Some(jobrun_name(org_key, crm_job_id, attempt)),
            labels: Some(
                [
                    (labels::CONNECTION.to_string(), connection.to_string()),
                    (labels::ORG.to_string(), org_key.to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: JobRunSpec {
            connection: connection.into(),
            crm_job_id: crm_job_id.into(),
            job_type: job_type.into(),
            provider,
        },
        status: None,
    }
}

/// The status the retriever writes after a claim.
pub fn claimed_status(by: &str, at: Timestamp, expires: Timestamp, attempt: i64) -> JobRunStatus {
    JobRunStatus {
        phase: Some(JobPhase::Claimed),
        claim: Some(JobClaim {
            by: by.into(),
            at: Time(at),
            expires: Time(expires),
        }),
        attempt: Some(attempt),
        ..Default::default()
    }
}

/// How many of the org's JobRuns (in this namespace) hold a slot: claimed or running.
pub async fn held(api: &Api<JobRun>, org_key: &str) -> Result<usize, kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("{}={org_key}", labels::ORG)))
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|jr| JobPhase::holds_a_slot(jr.status.as_ref().and_then(|s| s.phase)))
        .count())
}

/// Records a claim: creates the JobRun (an existing one of the same name is the same claim of the
/// same CRM job, created before a crash, and is adopted) and writes its status.
pub async fn record(api: &Api<JobRun>, run: &JobRun, status: &JobRunStatus) -> Result<String, kube::Error> {
    let name = run.metadata.name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), run).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    let patch = serde_json::json!({
        "apiVersion": "crmconnect.io/v1alpha1",
        "kind": "JobRun",
        "status": status,
    });
    api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    Ok(name)
}
