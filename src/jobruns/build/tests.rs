use super::*;
use crate::api::{JobRunSpec, Provider};
use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn run() -> JobRun {
    let mut run = JobRun::new(
        "sf-00d000000000001eaa-a0b000000000001aaa",
        JobRunSpec {
            connection: "acme".into(),
            crm_job_id: "a0B000000000001AAA".into(),
            job_type: "export".into(),
            provider: Provider::SalesforceProduction,
        },
    );
    run.metadata.namespace = Some("sales".into());
    run.metadata.labels = Some([(labels::ORG.to_string(), "sf-00d000000000001eaa".to_string())].into());
    run
}

fn template() -> JobTemplateSpec {
    JobTemplateSpec {
        providers: vec![],
        backoff_limit: None,
        active_deadline_seconds: Some(600),
        ttl_seconds_after_finished: Some(60),
        pod_failure_policy: None,
        template: PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "worker".into(),
                    image: Some("registry.local/worker:1".into()),
                    env: Some(vec![EnvVar {
                        name: "CRM_JOB_ID".into(),
                        value: Some("spoofed".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                automount_service_account_token: Some(true),
                service_account_name: Some("kustomize-controller".into()),
                service_account: Some("kustomize-controller".into()),
                ..Default::default()
            }),
        },
    }
}

#[test]
fn the_job_is_the_templates_pod_made_safe_with_the_session_and_the_crm_environment() {
    let alias = k8s_openapi::api::core::v1::HostAlias {
        ip: "10.88.0.1".into(),
        hostnames: Some(vec!["acme.my.salesforce.com".into()]),
    };
    let job = batch_job(
        &run(),
        &template(),
        "acme",
        "https://acme.my.salesforce.com",
        std::slice::from_ref(&alias),
    );
    assert_eq!(job.metadata.name, run().metadata.name);
    assert_eq!(job.metadata.namespace.as_deref(), Some("sales"));
    let labels = job.metadata.labels.clone().unwrap();
    assert_eq!(
        job.metadata.annotations.as_ref().unwrap()[JOBRUN_ANNOTATION],
        "sf-00d000000000001eaa-a0b000000000001aaa"
    );
    assert_eq!(labels[labels::CONNECTION], "acme");
    let spec = job.spec.unwrap();
    assert_eq!(
        spec.backoff_limit,
        Some(0),
        "a CRM job is reported failed rather than run twice"
    );
    assert_eq!(spec.active_deadline_seconds, Some(600));
    assert_eq!(
        spec.ttl_seconds_after_finished, None,
        "set only once the outcome is reported"
    );
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "the template cannot turn it on"
    );
    assert_eq!(
        (
            pod.service_account_name.as_deref(),
            pod.service_account.as_deref()
        ),
        (None, None),
        "the template cannot name a ServiceAccount (a workload-identity webhook needs no token)"
    );
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    assert_eq!(
        pod.host_aliases,
        Some(vec![alias]),
        "the CRM hosts resolve as for the operator"
    );
    assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
    let c = &pod.containers[0];
    assert_eq!(
        c.security_context.as_ref().unwrap().allow_privilege_escalation,
        Some(false)
    );
    let env: BTreeMap<_, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        env["CRM_JOB_ID"], "a0B000000000001AAA",
        "the template cannot spoof it"
    );
    assert_eq!(env["CRM_JOB_TYPE"], "export");
    assert_eq!(env["CRM_PROVIDER"], "SalesforceProduction");
    assert_eq!(env["CRM_INSTANCE_URL"], "https://acme.my.salesforce.com");
    assert_eq!(c.volume_mounts.as_ref().unwrap()[0].mount_path, SESSION_MOUNT);
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    let volume = pod.volumes.unwrap().pop().unwrap();
    assert_eq!(
        volume.secret.unwrap().secret_name.as_deref(),
        Some("acme-session")
    );
}

#[test]
fn an_adopted_run_mounts_the_session_of_the_connection_serving_it() {
    let job = batch_job(
        &run(),
        &template(),
        "acme-v2",
        "https://acme.my.salesforce.com",
        &[],
    );
    assert_eq!(job.metadata.labels.unwrap()[labels::CONNECTION], "acme-v2");
    let volume = job
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .volumes
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(
        volume.secret.unwrap().secret_name.as_deref(),
        Some("acme-v2-session")
    );
}

fn job_with(start: bool, condition: Option<&str>) -> Job {
    let at: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
    Job {
        status: Some(JobStatus {
            start_time: start.then_some(Time(at)),
            completion_time: (condition == Some("Complete")).then_some(Time(at)),
            conditions: condition.map(|c| {
                vec![JobCondition {
                    type_: c.into(),
                    status: "True".into(),
                    last_transition_time: Some(Time(at)),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn progress_follows_the_jobs_status() {
    assert_eq!(progress(&Job::default()).phase, None);
    assert_eq!(progress(&job_with(false, None)).phase, None);
    assert_eq!(progress(&job_with(true, None)).phase, Some(JobPhase::Running));
    let done = progress(&job_with(true, Some("Complete")));
    assert_eq!(done.phase, Some(JobPhase::Succeeded));
    assert!(done.finished.is_some());
    assert_eq!(
        progress(&job_with(true, Some("Failed"))).phase,
        Some(JobPhase::Failed)
    );
}

#[test]
fn each_phase_is_reported_once_and_a_final_one_never_again() {
    let p = |phase| Progress {
        phase: Some(phase),
        ..Default::default()
    };
    assert_eq!(report_due(&Progress::default(), None), None);
    assert_eq!(report_due(&p(JobPhase::Running), None), Some(JobPhase::Running));
    assert_eq!(report_due(&p(JobPhase::Running), Some(JobPhase::Running)), None);
    assert_eq!(
        report_due(&p(JobPhase::Succeeded), Some(JobPhase::Running)),
        Some(JobPhase::Succeeded)
    );
    assert_eq!(report_due(&p(JobPhase::Failed), None), Some(JobPhase::Failed));
    assert_eq!(report_due(&p(JobPhase::Failed), Some(JobPhase::Failed)), None);
    assert_eq!(report_due(&p(JobPhase::Running), Some(JobPhase::Aborted)), None);
    assert_eq!(summary(&"x".repeat(300)).chars().count(), 256);
}

#[test]
fn job_names_fit_63_characters_and_are_deterministic() {
    let short = "sf-00d000000000001eaa-a0b000000000001aaa";
    assert_eq!(job_name(short), short);
    let long = "d365-6f1c2a9e-0000-4000-8000-00000000c0de-1b545a36-4cde-4c51-ab7e-73ce98c6d52b";
    let name = job_name(long);
    assert!(name.len() <= 63, "{name}");
    assert_eq!(name, job_name(long));
    assert_ne!(
        name,
        job_name(&long.replace("d52b", "d52c")),
        "the hash tells them apart"
    );
    assert!(
        name.starts_with("d365-6f1c2a9e-0000-4000-8000-00000000c0de-1b54-"),
        "{name}"
    );
}

#[test]
fn results_are_scrubbed_of_the_token_bearer_values_and_control_characters() {
    let token = "00Dxx0000001gPL!AR8AQJXg5oH";
    let raw = format!(
        "exported 3\u{1b}[31m rows\r\nAuthorization: Bearer abc.def-123 then {token} again\n\ttab\u{0}"
    );
    assert_eq!(
        scrub(&raw, &[token]),
        "exported 3[31m rows\nAuthorization: Bearer [redacted] then [redacted] again\n\ttab"
    );
    assert_eq!(scrub("Bearer", &[]), "Bearer");
    assert_eq!(scrub("no secrets here", &[token]), "no secrets here");
}

#[test]
fn the_result_is_the_templates_first_container_s_message() {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "spec": {"containers": [{"name": "worker"}, {"name": "a-sidecar"}]},
        "status": {"containerStatuses": [
            {"name": "a-sidecar", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 0, "message": "sidecar says hi"}}},
            {"name": "worker", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 0, "message": "Account: 42 records"}}},
        ]},
    }))
    .unwrap();
    assert_eq!(worker_message(&pod).as_deref(), Some("Account: 42 records"));
}
