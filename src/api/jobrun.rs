//! The `JobRun` custom resource: one CRM job that a connection's retriever claimed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Provider;

/// One job queued in a CRM org that a connection's retriever claimed, and what became of it.
///
/// Named `<org key>-<CRM job ID, lowercased>-<attempt>` (the org key is the name of the org's
/// OrgSettings): one JobRun per claim of a CRM job. Not owned by the Connection: deleting or
/// pausing the connection keeps the job history.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "crmconnect.io",
    version = "v1alpha1",
    kind = "JobRun",
    plural = "jobruns",
    namespaced,
    shortname = "jr",
    category = "crm",
    status = "JobRunStatus",
    derive = "PartialEq",
    doc = "One CRM job claimed by a connection's retriever, and its outcome. Kept when the connection is paused, inactive or deleted (job history).",
    printcolumn(
        name = "Connection",
        type_ = "string",
        json_path = ".spec.connection",
        description = "The connection whose retriever claimed the job"
    ),
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".spec.type",
        description = "The CRM job's type"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Claimed, Running, Succeeded, Failed, Aborted or Holding"
    ),
    printcolumn(
        name = "CRM Job",
        type_ = "string",
        json_path = ".spec.crmJobId",
        description = "The job's record ID in the CRM"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?-[1-9][0-9]*$') && self.metadata.name.substring(0, self.metadata.name.lastIndexOf('-')).endsWith('-' + self.spec.crmJobId.lowerAscii())"
    ).message("a JobRun is named <org key>-<spec.crmJobId, lowercased>-<attempt>")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a JobRun's spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct JobRunSpec {
    /// The Connection (in this namespace) whose retriever claimed the job.
    #[schemars(length(min = 1, max = 253))]
    pub connection: String,

    /// The job's record ID in the CRM (Salesforce CrmJob__c Id, Dataverse crmc_crmjobid).
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9-]+$"))]
    pub crm_job_id: String,

    /// The CRM job's type (its Type__c / crmc_type).
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 80))]
    pub job_type: String,

    /// The CRM provider of the org the job is queued in.
    pub provider: Provider,
}

/// What became of the job. Written by the retriever (the claim) and the operator (the rest).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRunStatus {
    /// Claimed (the retriever holds the job in the CRM), Running, Succeeded, Failed, Aborted, or
    /// Holding (its connection is paused or inactive; the job waits in the CRM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,

    /// The claim written to the CRM job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<JobClaim>,

    /// Which attempt this is (the CRM job's attempt counter after the claim; 1 for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub attempt: Option<i64>,

    /// The batch Job that runs it (same name), once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub job: Option<String>,

    /// When the Job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Time>,

    /// When the Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<Time>,

    /// The last phase written back to the CRM job record (Running, Succeeded, Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<JobPhase>,

    /// The worker's result (its termination message), at most 256 characters here; the CRM
    /// record holds up to 4 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub result: Option<String>,

    /// Conditions about the run (TemplateFound, Started, JobDeleted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,
}

/// A claim on a CRM job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobClaim {
    /// Who claimed it: `<namespace>/<connection>/<pod>` (the CRM job's claimed-by field, a
    /// Text(255); longer ones are cut and end in a hash).
    #[schemars(length(min = 1, max = 255))]
    pub by: String,
    /// When it was claimed.
    pub at: Time,
    /// When the claim lapses in the CRM unless the job has started.
    pub expires: Time,
}

/// The phase of a JobRun.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum JobPhase {
    /// Claimed in the CRM, not started yet.
    Claimed,
    /// Started.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished unsuccessfully.
    Failed,
    /// Aborted in the CRM.
    Aborted,
    /// Released back to the CRM queue because its connection is paused or inactive.
    Holding,
}

impl JobPhase {
    /// Every phase, in lifecycle order.
    pub const ALL: [JobPhase; 6] = [
        JobPhase::Claimed,
        JobPhase::Running,
        JobPhase::Succeeded,
        JobPhase::Failed,
        JobPhase::Aborted,
        JobPhase::Holding,
    ];

    /// Its name, as in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Claimed => "Claimed",
            JobPhase::Running => "Running",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Aborted => "Aborted",
            JobPhase::Holding => "Holding",
        }
    }

    /// A phase that never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed | JobPhase::Aborted)
    }

    /// A phase that takes one of the org's concurrent-job slots (no phase yet counts as Claimed:
    /// the retriever creates the JobRun, then writes its status).
    pub fn holds_a_slot(phase: Option<JobPhase>) -> bool {
        matches!(phase, None | Some(JobPhase::Claimed) | Some(JobPhase::Running))
    }
}

/// The name of the JobRun of attempt `attempt` (the CRM job's attempt counter after the claim) at
/// CRM job `crm_job_id` in the org `org_key`: each claim is a run of its own, so a job queued again
/// (after it finished, was aborted before it started, or its claim lapsed) runs again and reports
/// again, while a retriever that created the run and crashed before its status write adopts it.
pub fn jobrun_name(org_key: &str, crm_job_id: &str, attempt: i64) -> String {
    format!("{org_key}-{}-{attempt}", crm_job_id.to_ascii_lowercase())
}
