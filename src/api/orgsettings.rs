//! The `OrgSettings` custom resource: job settings that belong to a CRM org or environment, not to
//! a Connection. A new Connection for the same org in the same namespace reuses them.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Provider;

/// CEL rule of a duration field: a Go-style duration of at least one minute.
const AT_LEAST_A_MINUTE: &str = "duration(self) >= duration('1m')";

/// Job settings of one CRM org (Salesforce) or environment (Dynamics 365), in one namespace.
///
/// Named after the org: `sf-<18-character org ID, lowercased>` or `d365-<environment ID>`. The
/// operator creates it with defaults the first time a connection for that org turns Active, and
/// never deletes it: a new Connection for the same org uses the same settings.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "crmconnect.io",
    version = "v1alpha1",
    kind = "OrgSettings",
    plural = "orgsettings",
    singular = "orgsettings",
    namespaced,
    shortname = "orgs",
    category = "crm",
    status = "OrgSettingsStatus",
    derive = "PartialEq",
    doc = "Job settings of one CRM org or environment (named sf-<org ID> or d365-<environment ID>). Created with defaults by the operator when a connection for the org first turns Active; never deleted by it, so a new connection for the same org reuses them.",
    printcolumn(
        name = "Auto Run",
        type_ = "boolean",
        json_path = ".spec.autoRunJobs",
        description = "Whether queued jobs are claimed and run"
    ),
    printcolumn(
        name = "Poll",
        type_ = "string",
        json_path = ".spec.pollInterval",
        description = "How often the CRM is polled for queued jobs"
    ),
    printcolumn(
        name = "Max Jobs",
        type_ = "integer",
        json_path = ".spec.maxConcurrentJobs",
        description = "How many of the org's jobs may be claimed or running at once"
    ),
    printcolumn(
        name = "Succeeded",
        type_ = "integer",
        json_path = ".status.counts.succeeded",
        description = "Jobs of this org that ran and succeeded"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.counts.failed",
        description = "Jobs of this org that ran and failed"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct OrgSettingsSpec {
    /// Claim and run the jobs queued for the cloud in this org ("Auto Run Jobs"). When false the
    /// retriever still polls and counts the queued jobs, but claims none.
    #[serde(default = "yes")]
    pub auto_run_jobs: bool,

    /// How often the retriever polls the CRM for queued jobs (jittered ±10%), e.g. 5m. At least 1m.
    #[serde(default = "default_poll_interval")]
    #[schemars(length(min = 2, max = 32))]
    #[x_kube(validation = Rule::new(AT_LEAST_A_MINUTE).message("pollInterval must be a duration of at least 1m, e.g. 5m"))]
    pub poll_interval: String,

    /// How many of the org's jobs may be claimed or running at once (1-100).
    #[serde(default = "default_max_concurrent_jobs")]
    #[schemars(range(min = 1, max = 100))]
    pub max_concurrent_jobs: i32,

    /// How many jobs one poll may claim (1-100).
    #[serde(default = "default_max_claims_per_poll")]
    #[schemars(range(min = 1, max = 100))]
    pub max_claims_per_poll: i32,

    /// The job types (the CRM job's type field; letters, digits, `_`, `-`, `.`) that may be
    /// claimed. Empty: every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 80), pattern(r"^[A-Za-z0-9_.-]+$"))
    )]
    pub allowed_job_types: Vec<String>,

    /// How long a claim holds in the CRM before another processor may take the job (e.g. 15m). A
    /// job claimed by a retriever that died before recording it is claimed again after this.
    /// At least 1m.
    #[serde(default = "default_claim_lease")]
    #[schemars(length(min = 2, max = 32))]
    #[x_kube(validation = Rule::new(AT_LEAST_A_MINUTE).message("claimLease must be a duration of at least 1m, e.g. 15m"))]
    pub claim_lease: String,

    /// How many finished JobRuns of this org are kept (1-100).
    #[serde(default = "default_history_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub history_limit: i32,
}

/// The org's job history, kept by the operator. It outlives the connections: pausing, expiry and
/// deletion keep it. The CRM job records are the system of record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrgSettingsStatus {
    /// The newest finished runs first, at most `spec.historyLimit`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub recent_runs: Vec<RunRecord>,
    /// Finished runs of this org, by outcome, since the OrgSettings was created.
    #[serde(default)]
    pub counts: RunCounts,
}

/// One finished run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// The job's record ID in the CRM.
    pub crm_job_id: String,
    /// The CRM job's type.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Succeeded, Failed or Aborted.
    pub phase: super::JobPhase,
    /// The connection whose retriever claimed it.
    pub connection: String,
    /// Which claim of the CRM job it was (1 for the first); a job queued again runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i64>,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// The worker's result, shortened to 256 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub summary: Option<String>,
}

/// Finished runs by outcome.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCounts {
    #[serde(default)]
    pub succeeded: i64,
    #[serde(default)]
    pub failed: i64,
    #[serde(default)]
    pub aborted: i64,
}

/// The history with `run` recorded: first in `recent_runs` (replacing an earlier record of the same
/// CRM job, which is then not counted twice), at most `limit` kept.
pub fn record_run(status: &OrgSettingsStatus, run: RunRecord, limit: i32) -> OrgSettingsStatus {
    let mut next = status.clone();
    let again = next
        .recent_runs
        .iter()
        .any(|r| r.crm_job_id == run.crm_job_id && r.attempt == run.attempt && r.phase == run.phase);
    next.recent_runs.retain(|r| r.crm_job_id != run.crm_job_id);
    if !again {
        match run.phase {
            super::JobPhase::Succeeded => next.counts.succeeded += 1,
            super::JobPhase::Failed => next.counts.failed += 1,
            super::JobPhase::Aborted => next.counts.aborted += 1,
            _ => {}
        }
    }
    next.recent_runs.insert(0, run);
    next.recent_runs.truncate(limit.clamp(1, 100) as usize);
    next
}

fn yes() -> bool {
    true
}
fn default_poll_interval() -> String {
    "5m".into()
}
fn default_max_concurrent_jobs() -> i32 {
    2
}
fn default_max_claims_per_poll() -> i32 {
    5
}
fn default_claim_lease() -> String {
    "15m".into()
}
fn default_history_limit() -> i32 {
    20
}

impl Default for OrgSettingsSpec {
    fn default() -> Self {
        OrgSettingsSpec {
            auto_run_jobs: yes(),
            poll_interval: default_poll_interval(),
            max_concurrent_jobs: default_max_concurrent_jobs(),
            max_claims_per_poll: default_max_claims_per_poll(),
            allowed_job_types: Vec::new(),
            claim_lease: default_claim_lease(),
            history_limit: default_history_limit(),
        }
    }
}

/// The name of the OrgSettings (and the `crmconnect.io/org` label value) of an org or environment:
/// `sf-<18-character org ID, lowercased>` or `d365-<environment ID, lowercased>`. A 15-character
/// Salesforce ID is first extended to its 18-character, case-insensitive form; an ID of another
/// length (not a real one, but a provider could answer it) is lowercased as it is. `None` for an ID
/// that is not alphanumeric (Salesforce, up to 59 characters) or not a GUID (Dynamics).
pub fn org_key(provider: Provider, remote_id: &str) -> Option<String> {
    match provider {
        Provider::SalesforceProduction | Provider::SalesforceSandbox => {
            let id = salesforce_id_18(remote_id).or_else(|| {
                let plain = !remote_id.is_empty()
                    && remote_id.len() <= 59
                    && remote_id.bytes().all(|b| b.is_ascii_alphanumeric());
                plain.then(|| remote_id.to_string())
            })?;
            Some(format!("sf-{}", id.to_ascii_lowercase()))
        }
        Provider::Dynamics365 => {
            let id = remote_id.to_ascii_lowercase();
            let is_guid = id.len() == 36
                && id.char_indices().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => c == '-',
                    _ => c.is_ascii_hexdigit(),
                });
            is_guid.then(|| format!("d365-{id}"))
        }
    }
}

/// The 18-character form of a Salesforce ID: the 15-character (case-sensitive) ID plus three
/// characters that encode the case of its letters. An 18-character ID is returned as it is.
pub fn salesforce_id_18(id: &str) -> Option<String> {
    if !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    match id.len() {
        18 => Some(id.to_string()),
        15 => {
            const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
            let bytes = id.as_bytes();
            let mut out = id.to_string();
            for chunk in bytes.chunks(5) {
                let bits = chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.is_ascii_uppercase())
                    .fold(0usize, |acc, (i, _)| acc | (1 << i));
                out.push(ALPHABET[bits] as char);
            }
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_15_character_salesforce_id_gets_its_case_suffix() {
        // Known pair: 001A0000006Vm9r → 001A0000006Vm9rIAC.
        assert_eq!(
            salesforce_id_18("001A0000006Vm9r").as_deref(),
            Some("001A0000006Vm9rIAC")
        );
        assert_eq!(
            salesforce_id_18("00D000000000001").as_deref(),
            Some("00D000000000001EAA")
        );
        assert_eq!(
            salesforce_id_18("00D000000000001AAA").as_deref(),
            Some("00D000000000001AAA")
        );
        assert_eq!(salesforce_id_18("00D-bad"), None);
        assert_eq!(salesforce_id_18("00D00000000000"), None);
    }

    #[test]
    fn org_keys_are_lowercased_dns_labels() {
        assert_eq!(
            org_key(Provider::SalesforceProduction, "00D5g000004XyZaEAK").as_deref(),
            Some("sf-00d5g000004xyzaeak")
        );
        assert_eq!(
            org_key(Provider::SalesforceSandbox, "001A0000006Vm9r").as_deref(),
            Some("sf-001a0000006vm9riac")
        );
        assert_eq!(
            org_key(Provider::Dynamics365, "11111111-AAAA-1111-1111-111111111111").as_deref(),
            Some("d365-11111111-aaaa-1111-1111-111111111111")
        );
        assert_eq!(org_key(Provider::Dynamics365, "not-a-guid"), None);
        // Not a real ID length, still a key (a retriever must not silently go missing).
        assert_eq!(
            org_key(Provider::SalesforceProduction, "00D5g000004E2EAA1").as_deref(),
            Some("sf-00d5g000004e2eaa1")
        );
        assert_eq!(org_key(Provider::SalesforceProduction, "00D/../x"), None);
    }

    fn record(id: &str, phase: super::super::JobPhase) -> RunRecord {
        RunRecord {
            crm_job_id: id.into(),
            job_type: "export".into(),
            phase,
            connection: "acme".into(),
            attempt: Some(1),
            started: None,
            finished: None,
            summary: None,
        }
    }

    #[test]
    fn history_is_newest_first_bounded_and_counts_each_job_once() {
        use super::super::JobPhase::*;
        let mut status = OrgSettingsStatus::default();
        for (i, phase) in [Succeeded, Failed, Succeeded, Aborted].into_iter().enumerate() {
            status = record_run(&status, record(&format!("j{i}"), phase), 3);
        }
        let ids: Vec<&str> = status.recent_runs.iter().map(|r| r.crm_job_id.as_str()).collect();
        assert_eq!(ids, ["j3", "j2", "j1"], "newest first, at most historyLimit");
        assert_eq!(
            status.counts,
            RunCounts {
                succeeded: 2,
                failed: 1,
                aborted: 1
            }
        );
        // The same outcome recorded again (a retried write) is not counted twice.
        let again = record_run(&status, record("j3", Aborted), 3);
        assert_eq!(again.counts, status.counts);
        assert_eq!(again.recent_runs.len(), 3);
        // The job queued again and run again (attempt 2) is counted, and replaces its record.
        let rerun = RunRecord {
            attempt: Some(2),
            ..record("j3", Aborted)
        };
        let rerun = record_run(&again, rerun, 3);
        assert_eq!(rerun.counts.aborted, 2);
        assert_eq!(rerun.recent_runs.len(), 3);
        assert_eq!(rerun.recent_runs[0].attempt, Some(2));
    }

    #[test]
    fn defaults_are_the_products() {
        let spec: OrgSettingsSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec, OrgSettingsSpec::default());
        assert!(spec.auto_run_jobs);
        assert_eq!(spec.poll_interval, "5m");
        assert_eq!(spec.claim_lease, "15m");
        assert_eq!(
            (
                spec.max_concurrent_jobs,
                spec.max_claims_per_poll,
                spec.history_limit
            ),
            (2, 5, 20)
        );
    }
}
