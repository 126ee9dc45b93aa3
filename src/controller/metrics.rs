//! Prometheus metrics of the operator (served on `/metrics` by [`super::server`]).

use super::cached::CachedConnection;
use crate::api::State;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ValidationLabels {
    provider: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    reconcile_seconds: Histogram,
    step_seconds: Family<StepLabels, Histogram>,
    validations: Family<ValidationLabels, Counter>,
    connections: Family<StateLabels, Gauge>,
    /// The JobRun controller's (registered here, served together).
    pub(crate) jobs: crate::jobruns::metrics::JobMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("connection_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by result (ok, error)",
            reconciles.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of successful reconciles",
            reconcile_seconds.clone(),
        );
        let step_seconds = Family::<StepLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        registry.register(
            "reconcile_step_duration_seconds",
            "Duration of each step of successful reconciles (dereference, validate, org_claim, apply_children, status)",
            step_seconds.clone(),
        );
        let validations = Family::<ValidationLabels, Counter>::default();
        registry.register(
            "provider_validations",
            "Token validations against a provider, by outcome (authorized, rejected, transient)",
            validations.clone(),
        );
        let connections = Family::<StateLabels, Gauge>::default();
        registry.register("connections", "Connections by state", connections.clone());
        let jobs = crate::jobruns::metrics::JobMetrics::default();
        jobs.register(&mut registry);
        Self {
            jobs,
            registry,
            reconciles,
            reconcile_seconds,
            step_seconds,
            validations,
            connections,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, seconds: f64) {
        self.reconciles
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
        self.reconcile_seconds.observe(seconds);
    }

    /// How long each step of a successful reconcile took.
    pub fn steps(&self, steps: &[(super::Step, std::time::Duration)]) {
        for (step, took) in steps {
            self.step_seconds
                .get_or_create(&StepLabels { step: step.label() })
                .observe(took.as_secs_f64());
        }
    }

    pub fn reconcile_failed(&self) {
        self.reconciles
            .get_or_create(&ResultLabels { result: "error" })
            .inc();
    }

    pub fn validated(&self, provider: crate::api::Provider, outcome: &'static str) {
        self.validations
            .get_or_create(&ValidationLabels {
                provider: provider.as_str(),
                outcome,
            })
            .inc();
    }

    /// The metrics in the Prometheus text format, with the per-state gauge taken from `stores` now.
    pub fn render(&self, stores: &[Store<DeserializeGuard<CachedConnection>>]) -> String {
        let mut counts = [0i64; 6];
        for guard in stores.iter().flat_map(|s| s.state()) {
            let index = match guard.0.as_ref().ok().and_then(CachedConnection::state) {
                Some(State::Pending) | None => 0,
                Some(State::Active) => 1,
                Some(State::Inactive) => 2,
                Some(State::Paused) => 3,
                Some(State::Conflict) => 4,
            };
            counts[if guard.0.is_err() { 5 } else { index }] += 1;
        }
        for (state, n) in ["Pending", "Active", "Inactive", "Paused", "Conflict", "Invalid"]
            .into_iter()
            .zip(counts)
        {
            self.connections.get_or_create(&StateLabels { state }).set(n);
        }
        self.jobs.refresh();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("metrics encode to a String");
        out
    }
}
