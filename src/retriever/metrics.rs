//! The retriever's Prometheus metrics (`/metrics` on the probe port).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// Polls by outcome, claims by outcome, the queue's Holding count, the org's API usage, throttles.
pub struct Metrics {
    registry: Registry,
    polls: Family<Outcome, Counter>,
    claims: Family<Outcome, Counter>,
    holding: Gauge,
    api_usage: Gauge<f64, AtomicU64>,
    throttled: Counter,
    skipped_rows: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("crmconnect_retriever");
        let polls = Family::<Outcome, Counter>::default();
        registry.register(
            "polls",
            "Polls of the CRM job queue, by outcome (ok, or the error: throttled, session_rejected, unexpected, malformed, transport, refused, kubernetes, session)",
            polls.clone(),
        );
        let claims = Family::<Outcome, Counter>::default();
        registry.register(
            "claims",
            "Claims of CRM jobs, by outcome (claimed, lost: another processor was first, gone: the job was deleted, error)",
            claims.clone(),
        );
        let holding = Gauge::default();
        registry.register(
            "holding_jobs",
            "Jobs queued for the cloud (Holding or Waiting) seen in the last poll (at most 100)",
            holding.clone(),
        );
        let api_usage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "api_usage_ratio",
            "The org's API requests used / allowed, as the CRM last reported (Salesforce)",
            api_usage.clone(),
        );
        let throttled = Counter::default();
        registry.register(
            "throttled",
            "Answers that asked the retriever to slow down (429, REQUEST_LIMIT_EXCEEDED)",
            throttled.clone(),
        );
        let skipped_rows = Counter::default();
        registry.register(
            "skipped_rows",
            "Queue rows that could not be read and were skipped",
            skipped_rows.clone(),
        );
        // Zero samples from the start, so dashboards and alerts see the series before the first poll.
        let _ = polls.get_or_create(&Outcome { outcome: "ok" });
        for outcome in ["claimed", "lost", "gone", "error"] {
            let _ = claims.get_or_create(&Outcome { outcome });
        }
        Metrics {
            registry,
            polls,
            claims,
            holding,
            api_usage,
            throttled,
            skipped_rows,
        }
    }
}

impl Metrics {
    pub fn polled(&self, outcome: &'static str) {
        self.polls.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn claim(&self, outcome: &'static str) {
        self.claims.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn holding(&self, n: usize) {
        self.holding.set(n as i64);
    }

    pub fn api_usage(&self, ratio: f64) {
        self.api_usage.set(ratio);
    }

    pub fn throttled(&self) {
        self.throttled.inc();
    }

    pub fn skipped(&self, n: usize) {
        self.skipped_rows.inc_by(n as u64);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("metrics encode to a String");
        out
    }
}
