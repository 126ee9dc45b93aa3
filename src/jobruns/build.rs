//! A JobRun's batch Job, built from its JobTemplate, and what a Job's status says. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{EnvVar, PodSpec, SecretVolumeSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

use crate::api::{JobPhase, JobRun, JobTemplateSpec, labels};
use crate::controller::children::{
    MANAGED_BY, RUN_AS, SESSION_MOUNT, restricted_container_security, restricted_pod_security,
};

/// Annotation on a JobRun's batch Job: the JobRun's name (which may be longer than a label value).
pub const JOBRUN_ANNOTATION: &str = "crmconnect.io/jobrun";

/// The name of a JobRun's batch Job: the JobRun's own name when it fits the 63 characters a Job
/// name may have (its pods carry it in a label), else its first 46 characters and a hash of the
/// whole (Dataverse job IDs are GUIDs: those names are longer). Deterministic, so a second create
/// is harmless.
pub fn job_name(run_name: &str) -> String {
    if run_name.len() <= 63 {
        return run_name.to_string();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, run_name.as_bytes());
    let hash: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hash}", run_name[..46].trim_end_matches('-'))
}

/// The batch Job that runs `run`: the template's pod with the restricted security of the
/// retriever, no ServiceAccount token, the session of `connection` (the run's own, or the one
/// that adopted it) mounted read-only, and the CRM_* environment. `backoffLimit` defaults to 0 (a CRM job is reported failed rather than run twice);
/// `ttlSecondsAfterFinished` is set only once the outcome is reported.
pub fn batch_job(
    run: &JobRun,
    template: &JobTemplateSpec,
    connection: &str,
    instance_url: &str,
    host_aliases: &[k8s_openapi::api::core::v1::HostAlias],
) -> Job {
    let run_name = run.metadata.name.clone().unwrap_or_default();
    let name = job_name(&run_name);
    let mut labels = BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (labels::CONNECTION.to_string(), connection.to_string()),
    ]);
    if let Some(org) = run.metadata.labels.as_ref().and_then(|l| l.get(labels::ORG)) {
        labels.insert(labels::ORG.to_string(), org.clone());
    }
    let mut pod_template = template.template.clone();
    let mut pod_meta = pod_template.metadata.take().unwrap_or_default();
    pod_meta
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels.clone());
    pod_template.metadata = Some(pod_meta);
    let mut pod: PodSpec = pod_template.spec.take().unwrap_or_default();
    pod.restart_policy = Some("Never".into());
    // The CRM hosts resolve as for the operator and the retriever (the chart's hostAliases).
    if !host_aliases.is_empty() {
        pod.host_aliases
            .get_or_insert_with(Vec::new)
            .extend(host_aliases.iter().cloned());
    }
    // No Kubernetes identity at all: no token, and no ServiceAccount named (a workload-identity
    // webhook hands cloud credentials to a named one without any token); the admission policy
    // refuses a Job that has either.
    pod.automount_service_account_token = Some(false);
    pod.service_account_name = None;
    pod.service_account = None;
    pod.enable_service_links = Some(false);
    pod.security_context = Some(k8s_openapi::api::core::v1::PodSecurityContext {
        fs_group: Some(RUN_AS),
        ..restricted_pod_security()
    });
    let env = [
        ("CRM_JOB_ID", run.spec.crm_job_id.as_str()),
        ("CRM_JOB_TYPE", run.spec.job_type.as_str()),
        ("CRM_PROVIDER", run.spec.provider.as_str()),
        ("CRM_INSTANCE_URL", instance_url),
    ];
    // Init containers of the template run restricted too (the admission policy requires it).
    for container in pod.init_containers.iter_mut().flatten() {
        container.security_context = Some(restricted_container_security());
    }
    for container in &mut pod.containers {
        container.security_context = Some(restricted_container_security());
        container
            .termination_message_policy
            .get_or_insert_with(|| "FallbackToLogsOnError".into());
        let vars = container.env.get_or_insert_with(Vec::new);
        vars.retain(|v| !env.iter().any(|(n, _)| v.name == *n));
        vars.extend(env.iter().map(|(n, v)| EnvVar {
            name: n.to_string(),
            value: Some(v.to_string()),
            ..Default::default()
        }));
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        mounts.retain(|m| m.name != "crmconnect-session");
        mounts.push(VolumeMount {
            name: "crmconnect-session".into(),
            mount_path: SESSION_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let volumes = pod.volumes.get_or_insert_with(Vec::new);
    volumes.retain(|v| v.name != "crmconnect-session");
    volumes.push(Volume {
        name: "crmconnect-session".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(format!("{connection}-session")),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    });
    pod_template.spec = Some(pod);
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: run.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(JOBRUN_ANNOTATION.to_string(), run_name)])),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(template.backoff_limit.unwrap_or(0)),
            active_deadline_seconds: template.active_deadline_seconds,
            pod_failure_policy: template.pod_failure_policy.clone(),
            template: pod_template,
            ..Default::default()
        }),
        status: None,
    }
}

/// What a Job's status says about the run.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Progress {
    /// `None`: created, not started yet.
    pub phase: Option<JobPhase>,
    pub started: Option<Timestamp>,
    pub finished: Option<Timestamp>,
}

/// Reads a Job's status: Succeeded / Failed from its `Complete` / `Failed` condition, Running once
/// it has a start time.
pub fn progress(job: &Job) -> Progress {
    let Some(status) = &job.status else {
        return Progress::default();
    };
    let condition = |type_: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    let started = status.start_time.as_ref().map(|t| t.0);
    let ended = |c: &k8s_openapi::api::batch::v1::JobCondition| {
        status
            .completion_time
            .as_ref()
            .or(c.last_transition_time.as_ref())
            .map(|t| t.0)
    };
    if let Some(c) = condition("Complete") {
        return Progress {
            phase: Some(JobPhase::Succeeded),
            started,
            finished: ended(c),
        };
    }
    if let Some(c) = condition("Failed") {
        return Progress {
            phase: Some(JobPhase::Failed),
            started,
            finished: c.last_transition_time.as_ref().map(|t| t.0),
        };
    }
    Progress {
        phase: started.map(|_| JobPhase::Running),
        started,
        finished: None,
    }
}

/// What to write back to the CRM for a run whose Job shows `progress`, given what was reported
/// already. `None`: nothing (not started, or already reported).
pub fn report_due(progress: &Progress, reported: Option<JobPhase>) -> Option<JobPhase> {
    let phase = progress.phase?;
    match (phase, reported) {
        (_, Some(done)) if done.is_terminal() => None,
        (JobPhase::Running, Some(JobPhase::Running)) => None,
        (phase, _) => Some(phase),
    }
}

/// A worker's result made safe to write anywhere (the CRM record, the JobRun, the history): each
/// of `secrets` (the session's access token) replaced, whatever follows `Bearer ` up to the next
/// space replaced, and control characters but newline and tab dropped.
pub fn scrub(result: &str, secrets: &[&str]) -> String {
    let mut out = result.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        out = out.replace(secret, "[redacted]");
    }
    let mut scrubbed = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find("Bearer ") {
        let (before, after) = rest.split_at(at + "Bearer ".len());
        scrubbed.push_str(before);
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        if end > 0 {
            scrubbed.push_str("[redacted]");
        }
        rest = &after[end..];
    }
    scrubbed.push_str(rest);
    scrubbed
        .chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

/// The termination message of the pod's first container (the template's worker), whatever the
/// order of its container statuses.
pub fn worker_message(pod: &k8s_openapi::api::core::v1::Pod) -> Option<String> {
    let first = &pod.spec.as_ref()?.containers.first()?.name;
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| &s.name == first)?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .clone()
        .filter(|m| !m.trim().is_empty())
}

/// A short form of a worker's result for the JobRun's status (the CRM gets up to 4 KiB).
pub fn summary(result: &str) -> String {
    let line = result.trim();
    if line.chars().count() <= 256 {
        return line.to_string();
    }
    let mut out: String = line.chars().take(255).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests;
