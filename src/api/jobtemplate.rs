//! The `JobTemplate` custom resource: how the jobs of one type run. Cluster-scoped, owned by the
//! cluster administrator: the operator turns each claimed `JobRun` of that type into a batch Job
//! from it.

use k8s_openapi::api::batch::v1::PodFailurePolicy;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Provider;

/// How the CRM jobs of one type run: named after the type (the CRM job's type field, lowercased).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "crmconnect.io",
    version = "v1alpha1",
    kind = "JobTemplate",
    plural = "jobtemplates",
    shortname = "jt",
    category = "crm",
    derive = "PartialEq",
    doc = "How the CRM jobs of one type run (named after the type, lowercased): a pod template and the batch Job's limits. Owned by the cluster administrator; the operator runs each claimed JobRun of the type as a batch Job from it.",
    printcolumn(
        name = "Providers",
        type_ = "string",
        json_path = ".spec.providers",
        description = "The providers whose jobs of this type may run (empty: all)"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct JobTemplateSpec {
    /// The providers whose jobs of this type may run (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<Provider>,

    /// Retries of a failed pod before the job fails (the batch Job's backoffLimit; default 0: a
    /// CRM job is reported failed rather than run twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit: Option<i32>,

    /// The longest a job may run, in seconds (the batch Job's activeDeadlineSeconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// How long a finished Job is kept once its outcome is reported to the CRM, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,

    /// Which pod failures end the job at once or are not counted (the batch Job's podFailurePolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_failure_policy: Option<PodFailurePolicy>,

    /// The pod that runs a job. The operator adds the restricted security settings, mounts the
    /// connection's session at /var/run/crmconnect/session and sets CRM_JOB_ID, CRM_JOB_TYPE,
    /// CRM_PROVIDER and CRM_INSTANCE_URL; the first container is the worker, whose termination
    /// message is reported to the CRM as the job's result.
    pub template: PodTemplateSpec,
}

impl JobTemplateSpec {
    /// Whether jobs of `provider` may run from this template (`providers` empty: every provider).
    pub fn allows(&self, provider: Provider) -> bool {
        self.providers.is_empty() || self.providers.contains(&provider)
    }
}

/// The name of the JobTemplate of CRM job type `job_type`.
pub fn template_name(job_type: &str) -> String {
    job_type.to_ascii_lowercase().replace(['_', '.'], "-")
}
