//! The retriever pod's endpoints: `/healthz` (the process is alive), `/readyz` (200 while the session
//! can be read and the CRM accepts it) and `/metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// What readiness is made of: the session can be read, and the CRM accepts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Session,
    Crm,
}

/// Whether the pod is ready, and why not: ready when every check passes.
#[derive(Debug)]
pub struct Readiness(Mutex<[Result<(), String>; 2]>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Mutex::new([
            Err("the session has not been read yet".into()),
            Ok(()),
        ]))
    }
}

impl Readiness {
    pub fn set(&self, check: Check, result: Result<(), String>) {
        self.0.lock().unwrap()[check as usize] = result;
    }

    pub fn is_ready_for(&self, check: Check) -> bool {
        self.0.lock().unwrap()[check as usize].is_ok()
    }

    pub fn is_ready(&self) -> bool {
        self.0.lock().unwrap().iter().all(Result::is_ok)
    }

    fn answer(&self) -> (StatusCode, String) {
        let checks = self.0.lock().unwrap();
        match checks.iter().find_map(|c| c.as_ref().err()) {
            None => (StatusCode::OK, "ok".into()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why.clone()),
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State((readiness, _)): State<Shared>) -> (StatusCode, String) {
    readiness.answer()
}

async fn render_metrics(State((_, metrics)): State<Shared>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

type Shared = (Arc<Readiness>, Arc<super::metrics::Metrics>);

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    metrics: Arc<super::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state((readiness, metrics));
    crate::controller::server::serve_router(addr, app, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_until_told_and_says_why() {
        let r = Readiness::default();
        assert_eq!(r.answer().0, StatusCode::SERVICE_UNAVAILABLE);
        r.set(Check::Session, Ok(()));
        assert_eq!(r.answer(), (StatusCode::OK, "ok".to_string()));
        r.set(
            Check::Session,
            Err("cannot read the session file /x: Permission denied".into()),
        );
        let (code, body) = r.answer();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("Permission denied"));
        // Both must pass: a readable session the CRM rejects is not ready either.
        r.set(Check::Session, Ok(()));
        r.set(Check::Crm, Err("the CRM rejected the session (HTTP 401)".into()));
        assert!(!r.is_ready() && r.is_ready_for(Check::Session));
        assert_eq!(r.answer().0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
