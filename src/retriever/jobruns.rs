//! The retriever's only writes to Kubernetes: a JobRun per claimed CRM job, and its status.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};

use crate::api::{JobClaim, JobPhase, JobRun, JobRunSpec, JobRunStatus, Provider, jobrun_name, labels};
use crate::jobruns::TEMPLATE_FOUND;

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

/// What the org's JobRuns (in this namespace) say before a poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Runs that hold one of the org's concurrent-job slots.
    pub slots: usize,
    /// Job types not to claim: some run of the type is waiting for its JobTemplate (condition
    /// `TemplateFound=False`), so nothing could run another one. Cleared by the operator when the
    /// template appears.
    pub blocked: BTreeSet<String>,
}

/// The org's JobRuns now.
pub async fn held(api: &Api<JobRun>, org_key: &str, lease: Duration) -> Result<Held, kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("{}={org_key}", labels::ORG)))
        .await?;
    Ok(tally(&list.items, Timestamp::now(), lease))
}

/// Counts the slots `runs` hold at `now` and the types they block (pure). A run holds a slot while
/// it is claimed or running, unless it cannot start (it waits for a JobTemplate); one without a
/// status yet (the retriever creates it, then writes its status) only within a claim's `lease` of
/// its creation (after that its status write failed, and its claim lapsed).
pub fn tally(runs: &[JobRun], now: Timestamp, lease: Duration) -> Held {
    let mut held = Held::default();
    for run in runs {
        let status = run.status.as_ref();
        let waiting_for_template = status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == TEMPLATE_FOUND && c.status == "False")
        });
        let phase = status.and_then(|s| s.phase);
        if waiting_for_template && matches!(phase, Some(JobPhase::Claimed | JobPhase::Holding)) {
            held.blocked.insert(run.spec.job_type.clone());
            continue;
        }
        let counts = match phase {
            None => run
                .metadata
                .creation_timestamp
                .as_ref()
                .is_none_or(|created| now.duration_since(created.0).unsigned_abs() < lease),
            phase => JobPhase::holds_a_slot(phase),
        };
        held.slots += usize::from(counts);
    }
    held
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn run(job_type: &str, phase: Option<JobPhase>, template_found: Option<&str>, created: &str) -> JobRun {
        let mut r = jobrun(
            "acme",
            "sf-org",
            Provider::SalesforceProduction,
            "a0B000000000001AAA",
            job_type,
            1,
        );
        r.metadata.creation_timestamp = Some(Time(t(created)));
        r.status = phase.map(|phase| JobRunStatus {
            phase: Some(phase),
            conditions: template_found
                .map(|status| Condition {
                    type_: TEMPLATE_FOUND.into(),
                    status: status.into(),
                    reason: "r".into(),
                    message: "m".into(),
                    last_transition_time: Time(t(created)),
                    observed_generation: None,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        });
        r
    }

    #[test]
    fn runs_that_cannot_start_hold_no_slot_and_block_their_type() {
        let now = t("2026-12-07T10:00:00Z");
        let lease = Duration::from_secs(900);
        let runs = [
            run("export", Some(JobPhase::Claimed), None, "2026-12-07T09:00:00Z"),
            run(
                "export",
                Some(JobPhase::Running),
                Some("True"),
                "2026-12-07T09:00:00Z",
            ),
            // No template: no slot, and the type is not claimed again.
            run(
                "mystery",
                Some(JobPhase::Claimed),
                Some("False"),
                "2026-12-07T09:00:00Z",
            ),
            run(
                "riddle",
                Some(JobPhase::Holding),
                Some("False"),
                "2026-12-07T09:00:00Z",
            ),
            // No status: a slot only within a lease of its creation.
            run("export", None, None, "2026-12-07T09:59:00Z"),
            run("export", None, None, "2026-12-07T09:00:00Z"),
            // Finished, or given back for a pause: no slot, nothing blocked.
            run(
                "done",
                Some(JobPhase::Succeeded),
                Some("False"),
                "2026-12-07T09:00:00Z",
            ),
            run("paused", Some(JobPhase::Holding), None, "2026-12-07T09:00:00Z"),
        ];
        let held = tally(&runs, now, lease);
        assert_eq!(held.slots, 3, "{held:?}");
        assert_eq!(
            held.blocked.iter().map(String::as_str).collect::<Vec<_>>(),
            ["mystery", "riddle"]
        );
    }
}
