//! What one poll does, decided purely: how many jobs to claim, which ones, and when to poll next.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::crm::{ApiUsage, JobStatus, QueuedJob, Version};

/// The job settings the retriever runs with (from the org's OrgSettings, passed as flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSettings {
    pub auto_run_jobs: bool,
    pub poll_interval: Duration,
    pub max_concurrent_jobs: u32,
    pub max_claims_per_poll: u32,
    pub allowed_job_types: Vec<String>,
    /// No JobTemplate can run any of the org's jobs (`--no-job-templates`): the retriever asks the
    /// CRM nothing and claims nothing.
    pub no_job_templates: bool,
    pub claim_lease: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            auto_run_jobs: true,
            poll_interval: Duration::from_secs(300),
            max_concurrent_jobs: 2,
            max_claims_per_poll: 5,
            allowed_job_types: Vec::new(),
            no_job_templates: false,
            claim_lease: Duration::from_secs(900),
        }
    }
}

/// Salesforce's `If-Unmodified-Since` has one-second resolution: a job is claimed only when its
/// last change is at least this much older than the CRM's clock, so a rival's claim always lands in
/// a later second and the slower writer gets 412.
pub const MIN_AGE: Duration = Duration::from_secs(2);

/// The most jobs one poll reads from the queue.
pub const QUERY_LIMIT: u32 = 100;

/// How many jobs this poll may claim: none when auto-run is off, else up to the per-poll maximum
/// and the org's free slots (`held`: its JobRuns that are claimed or running).
pub fn capacity(settings: &JobSettings, held: usize) -> usize {
    if !settings.auto_run_jobs || settings.no_job_templates {
        return 0;
    }
    let free = (settings.max_concurrent_jobs as usize).saturating_sub(held);
    free.min(settings.max_claims_per_poll as usize)
}

/// The longest `ClaimedBy` (a Salesforce Text(255) field).
pub const MAX_CLAIMANT: usize = 255;

/// The claimant written to `ClaimedBy`: `<namespace>/<connection>/<pod>`, or, when longer than
/// [`MAX_CLAIMANT`], its start and a hash of the whole (still unique and stable per pod).
pub fn claimant(connection: &str, pod: &str) -> String {
    let full = format!("{connection}/{pod}");
    if full.len() <= MAX_CLAIMANT {
        return full;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, full.as_bytes());
    let hash: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    let mut cut = MAX_CLAIMANT - hash.len() - 1;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hash}", &full[..cut])
}

/// The most pages one poll reads.
pub const MAX_PAGES: usize = 10;

/// Whether `job` may be claimed now. `read_by` is the latest the CRM can have read the queue by its
/// own clock ([`crate::crm::Answer::read_by`]: its `Date` less the query's duration); without it no
/// Salesforce job is claimable (Dataverse's ETags involve no clock).
pub fn claimable(job: &QueuedJob, read_by: Option<Timestamp>) -> bool {
    let queued = matches!(
        job.status,
        JobStatus::Holding | JobStatus::Waiting | JobStatus::Claimed
    );
    queued && settled(&job.version, read_by)
}

/// Whether a conditional write on `version` can tell a rival's later change from it: always for
/// an ETag (it names the exact version); for Salesforce's whole-second `LastModifiedDate`, only
/// when the record is at least [`MIN_AGE`] older than the CRM's clock at the read, so any change
/// after the read lands in a later second. `read_by`: as for [`claimable`].
pub fn settled(version: &Version, read_by: Option<Timestamp>) -> bool {
    match version {
        Version::LastModified(modified) => {
            read_by.is_some_and(|at| at.as_second() - modified.as_second() >= MIN_AGE.as_secs() as i64)
        }
        Version::ETag(_) => true,
    }
}

/// The jobs to claim this poll, oldest first (the queue's order), at most `capacity`, none of a
/// `blocked` type (one waiting for its JobTemplate).
pub fn choose<'a>(
    jobs: &'a [QueuedJob],
    read_by: Option<Timestamp>,
    blocked: &BTreeSet<String>,
    capacity: usize,
) -> Vec<&'a QueuedJob> {
    jobs.iter()
        .filter(|j| claimable(j, read_by) && !blocked.contains(&j.job_type))
        .take(capacity)
        .collect()
}

/// Jobs waiting in the queue (Holding or Waiting), for the metric.
pub fn holding(jobs: &[QueuedJob]) -> usize {
    jobs.iter()
        .filter(|j| matches!(j.status, JobStatus::Holding | JobStatus::Waiting))
        .count()
}

/// The longest the poll interval is stretched to when the org's API budget runs low.
pub const MAX_STRETCHED: Duration = Duration::from_secs(30 * 60);

/// The poll interval given the org's API usage: unchanged below 90%, then stretched linearly up to
/// 30 minutes at 100% (never shortened).
pub fn stretched_interval(interval: Duration, usage: Option<ApiUsage>) -> Duration {
    let Some(usage) = usage else { return interval };
    let ratio = usage.ratio();
    if ratio < 0.9 || interval >= MAX_STRETCHED {
        return interval;
    }
    let over = ((ratio - 0.9) / 0.1).clamp(0.0, 1.0);
    interval + (MAX_STRETCHED - interval).mul_f64(over)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn sf_job(id: &str, status: JobStatus, modified: &str) -> QueuedJob {
        QueuedJob {
            id: id.into(),
            job_type: "export".into(),
            status,
            attempt: 0,
            version: Version::LastModified(t(modified)),
        }
    }

    #[test]
    fn capacity_is_bounded_by_free_slots_and_the_per_poll_maximum() {
        let s = JobSettings {
            max_concurrent_jobs: 3,
            max_claims_per_poll: 5,
            ..Default::default()
        };
        assert_eq!(capacity(&s, 0), 3);
        assert_eq!(capacity(&s, 2), 1);
        assert_eq!(
            capacity(&s, 7),
            0,
            "more held than allowed (settings lowered) claims nothing"
        );
        let few = JobSettings {
            max_claims_per_poll: 1,
            ..s.clone()
        };
        assert_eq!(capacity(&few, 0), 1);
        let off = JobSettings {
            auto_run_jobs: false,
            ..s.clone()
        };
        assert_eq!(capacity(&off, 0), 0);
        let untemplated = JobSettings {
            no_job_templates: true,
            ..s
        };
        assert_eq!(capacity(&untemplated, 0), 0, "no template can run any job");
    }

    #[test]
    fn a_salesforce_job_changed_within_two_seconds_waits() {
        let now = Some(t("2026-11-28T09:55:05.900Z"));
        // Same whole second as 09:55:04 → 1 s old: too young, whatever the milliseconds.
        assert!(!claimable(
            &sf_job("a", JobStatus::Holding, "2026-11-28T09:55:04Z"),
            now
        ));
        assert!(claimable(
            &sf_job("b", JobStatus::Holding, "2026-11-28T09:55:03Z"),
            now
        ));
        // A clock behind the record (skew): too young.
        assert!(!claimable(
            &sf_job("c", JobStatus::Holding, "2026-11-28T09:56:00Z"),
            now
        ));
    }

    #[test]
    fn the_two_second_rule_counts_the_query_s_duration_and_needs_the_crm_s_clock() {
        use crate::crm::Answer;
        let answer = |date: Option<&str>, took_ms: u64| Answer {
            value: (),
            server_time: date.map(t),
            usage: None,
            took: Duration::from_millis(took_ms),
        };
        let job = sf_job("a", JobStatus::Holding, "2026-11-28T09:55:03Z");
        // Date 2 s after the change: claimable after a quick query ...
        let quick = answer(Some("2026-11-28T09:55:05Z"), 0);
        assert!(claimable(&job, quick.read_by()));
        // ... not after one that took 1.2 s: the CRM may have read the queue at 09:55:03.8, and a
        // rival's claim at 09:55:03.9 would share the record's second.
        let slow = answer(Some("2026-11-28T09:55:05Z"), 1200);
        assert_eq!(slow.read_by(), Some(t("2026-11-28T09:55:03Z")));
        assert!(!claimable(&job, slow.read_by()));
        assert!(claimable(
            &job,
            answer(Some("2026-11-28T09:55:07Z"), 1200).read_by()
        ));
        // No Date: no Salesforce job is claimed (the local clock is not the CRM's) ...
        assert!(!claimable(&job, answer(None, 0).read_by()));
        // ... while an ETag needs no clock.
        let dv = QueuedJob {
            version: Version::ETag("W/\"1\"".into()),
            ..job.clone()
        };
        assert!(claimable(&dv, None));
    }

    #[test]
    fn a_claimant_fits_the_crm_field_and_stays_unique() {
        assert_eq!(
            claimant("ns/acme", "acme-retriever-5d9f-x2"),
            "ns/acme/acme-retriever-5d9f-x2"
        );
        let connection = format!("team-a/{}", "c".repeat(253));
        let (one, two) = (claimant(&connection, "pod-1"), claimant(&connection, "pod-2"));
        assert_eq!(one.len(), MAX_CLAIMANT);
        assert_eq!(two.len(), MAX_CLAIMANT);
        assert_ne!(one, two);
        assert_eq!(one, claimant(&connection, "pod-1"), "stable");
    }

    #[test]
    fn only_queued_statuses_are_claimable() {
        let now = Some(t("2026-11-28T10:00:00Z"));
        for (status, want) in [
            (JobStatus::Holding, true),
            (JobStatus::Waiting, true),
            (JobStatus::Claimed, true), // the query returns only expired claims
            (JobStatus::Running, false),
            (JobStatus::Completed, false),
            (JobStatus::Aborted, false),
        ] {
            assert_eq!(
                claimable(&sf_job("a", status, "2026-11-28T09:00:00Z"), now),
                want,
                "{status:?}"
            );
        }
    }

    #[test]
    fn choose_keeps_queue_order_and_capacity() {
        let now = Some(t("2026-11-28T10:00:00Z"));
        let jobs = vec![
            sf_job("young", JobStatus::Holding, "2026-11-28T09:59:59Z"),
            sf_job("a", JobStatus::Holding, "2026-11-28T09:00:00Z"),
            sf_job("b", JobStatus::Waiting, "2026-11-28T09:00:00Z"),
            sf_job("c", JobStatus::Holding, "2026-11-28T09:00:00Z"),
        ];
        let none = BTreeSet::new();
        let ids: Vec<&str> = choose(&jobs, now, &none, 2)
            .iter()
            .map(|j| j.id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(choose(&jobs, now, &none, 0).is_empty());
        let mut other = sf_job("d", JobStatus::Holding, "2026-11-28T09:00:00Z");
        other.job_type = "import".into();
        let jobs = [jobs, vec![other]].concat();
        let blocked = BTreeSet::from(["export".to_string()]);
        let ids: Vec<&str> = choose(&jobs, now, &blocked, 2)
            .iter()
            .map(|j| j.id.as_str())
            .collect();
        assert_eq!(ids, ["d"], "a blocked type is skipped, not the queue behind it");
        assert_eq!(holding(&jobs), 5);
    }

    #[test]
    fn the_interval_stretches_only_above_ninety_percent_usage() {
        let five = Duration::from_secs(300);
        let usage = |used| Some(ApiUsage { used, max: 1000 });
        assert_eq!(stretched_interval(five, None), five);
        assert_eq!(stretched_interval(five, usage(899)), five);
        assert_eq!(stretched_interval(five, usage(900)), five);
        assert_eq!(
            stretched_interval(five, usage(950)),
            Duration::from_secs(300 + 750)
        );
        assert_eq!(stretched_interval(five, usage(1000)), MAX_STRETCHED);
        assert_eq!(stretched_interval(five, usage(5000)), MAX_STRETCHED);
        assert_eq!(
            stretched_interval(Duration::from_secs(3600), usage(1000)),
            Duration::from_secs(3600)
        );
    }
}
