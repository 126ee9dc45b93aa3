//! Metrics of the JobRun controller, served with the operator's on `/metrics`:
//! - `connection_operator_jobruns{phase}`: JobRuns by phase (read from the controller's cache when
//!   scraped; a run without a phase yet counts as `Claimed`);
//! - `connection_operator_job_reports_pending`: runs whose phase is not yet written to the CRM
//!   (for example while their connection is inactive);
//! - `connection_operator_job_reports_total{phase,outcome}`: writes to the CRM job record, by the
//!   phase written and the outcome (`written`, `aborted`: the CRM job was aborted or deleted,
//!   `later`: no session, or the CRM unreachable or busy);
//! - `connection_operator_job_run_duration_seconds{type,outcome}`: start to finish of reported runs,
//!   by the name of the JobTemplate that ran them (`type`) and the outcome.

use std::sync::{Arc, Mutex};

use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{JobPhase, JobRun};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportLabels {
    phase: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    /// The JobTemplate's name that ran the job (a bounded set chosen by the cluster
    /// administrator), never the CRM's raw type text: CRM users may write any number of spellings
    /// (`Export`, `export`, `EXPORT`) that run from one template.
    r#type: String,
    outcome: &'static str,
}

type Durations = Family<DurationLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 s to about 4.5 h.
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

/// The JobRun controller's metrics; clones share them.
#[derive(Clone)]
pub struct JobMetrics {
    /// One cache per watched namespace (one for all namespaces in the cluster-wide mode).
    runs: Arc<Mutex<Vec<Store<JobRun>>>>,
    by_phase: Family<PhaseLabels, Gauge>,
    pending: Gauge,
    reports: Family<ReportLabels, Counter>,
    durations: Durations,
}

impl Default for JobMetrics {
    fn default() -> Self {
        Self {
            runs: Arc::default(),
            by_phase: Family::default(),
            pending: Gauge::default(),
            reports: Family::default(),
            durations: Durations::new_with_constructor(duration_histogram),
        }
    }
}

/// The outcome label of a CRM write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportOutcome {
    Written,
    Aborted,
    Later,
}

impl JobMetrics {
    /// Adds them to the operator's registry (prefix `connection_operator`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("jobruns", "JobRuns by phase", self.by_phase.clone());
        registry.register(
            "job_reports_pending",
            "JobRuns whose current phase is not yet written to the CRM job record",
            self.pending.clone(),
        );
        registry.register(
            "job_reports",
            "Writes to CRM job records, by phase written and outcome (written, aborted, later)",
            self.reports.clone(),
        );
        registry.register(
            "job_run_duration_seconds",
            "Start to finish of reported job runs, by job type and outcome",
            self.durations.clone(),
        );
        for phase in JobPhase::ALL {
            let _ = self.by_phase.get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            });
        }
    }

    /// A cache the per-phase gauges are read from.
    pub(crate) fn watch(&self, store: Store<JobRun>) {
        self.runs.lock().unwrap().push(store);
    }

    pub(crate) fn reported(&self, phase: JobPhase, outcome: ReportOutcome) {
        let outcome = match outcome {
            ReportOutcome::Written => "written",
            ReportOutcome::Aborted => "aborted",
            ReportOutcome::Later => "later",
        };
        self.reports
            .get_or_create(&ReportLabels {
                phase: phase.as_str(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn finished(&self, job_type: &str, phase: JobPhase, seconds: f64) {
        self.durations
            .get_or_create(&DurationLabels {
                r#type: crate::api::template_name(job_type),
                outcome: phase.as_str(),
            })
            .observe(seconds.max(0.0));
    }

    /// Sets the gauges from the cache (called when `/metrics` is scraped).
    pub fn refresh(&self) {
        let runs: Vec<_> = self.runs.lock().unwrap().iter().flat_map(|s| s.state()).collect();
        let (by_phase, pending) = tally(runs.iter().map(|r| r.status.as_ref()));
        for (phase, n) in JobPhase::ALL.into_iter().zip(by_phase) {
            self.by_phase
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .set(n);
        }
        self.pending.set(pending);
    }
}

/// Runs per phase (in [`JobPhase::ALL`] order; none yet counts as Claimed) and runs with a report
/// pending (a phase not yet written to the CRM).
fn tally<'a>(statuses: impl Iterator<Item = Option<&'a crate::api::JobRunStatus>>) -> ([i64; 6], i64) {
    let mut by_phase = [0i64; 6];
    let mut pending = 0;
    for status in statuses {
        let phase = status.and_then(|s| s.phase).unwrap_or(JobPhase::Claimed);
        let index = JobPhase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        by_phase[index] += 1;
        // Claimed is the retriever's write and Holding is written when it is set: neither waits.
        let due = status.is_some_and(|s| {
            s.phase
                .is_some_and(|p| !matches!(p, JobPhase::Claimed | JobPhase::Holding))
                && s.reported != s.phase
        });
        pending += i64::from(due);
    }
    (by_phase, pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::JobRunStatus;

    fn status(phase: Option<JobPhase>, reported: Option<JobPhase>) -> JobRunStatus {
        JobRunStatus {
            phase,
            reported,
            ..Default::default()
        }
    }

    #[test]
    fn tally_counts_phases_and_reports_not_yet_written() {
        let statuses = [
            None,
            Some(status(Some(JobPhase::Claimed), None)),
            Some(status(Some(JobPhase::Running), Some(JobPhase::Running))),
            // Finished while its connection was inactive: not written yet.
            Some(status(Some(JobPhase::Succeeded), Some(JobPhase::Running))),
            Some(status(Some(JobPhase::Failed), Some(JobPhase::Failed))),
            // Released while paused (the retriever claims it again).
            Some(status(Some(JobPhase::Holding), None)),
        ];
        let (by_phase, pending) = tally(statuses.iter().map(Option::as_ref));
        assert_eq!(by_phase, [2, 1, 1, 1, 0, 1]);
        assert_eq!(pending, 1, "the succeeded run");
    }

    #[test]
    fn every_series_exists_before_the_first_run() {
        let metrics = JobMetrics::default();
        let mut registry = Registry::with_prefix("connection_operator");
        metrics.register(&mut registry);
        metrics.reported(JobPhase::Running, ReportOutcome::Written);
        metrics.finished("record-count", JobPhase::Succeeded, 3.0);
        // Spellings of one type that run from one template are one series.
        metrics.finished("Record_Count", JobPhase::Succeeded, 3.0);
        metrics.finished("RECORD.COUNT", JobPhase::Succeeded, 3.0);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for series in [
            "connection_operator_jobruns{phase=\"Holding\"} 0",
            "connection_operator_job_reports_pending 0",
            "connection_operator_job_reports_total{phase=\"Running\",outcome=\"written\"} 1",
            "connection_operator_job_run_duration_seconds_count{type=\"record-count\",outcome=\"Succeeded\"} 3",
        ] {
            assert!(out.contains(series), "{series} in\n{out}");
        }
        assert_eq!(out.matches("job_run_duration_seconds_count{").count(), 1, "{out}");
    }
}
