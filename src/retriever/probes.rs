//! The retriever pod's probe endpoints: `/healthz` (the process is alive) and `/readyz` (200 once the
//! session was read, and as long as the last re-read succeeded).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Whether the pod is ready, and why not.
#[derive(Debug)]
pub struct Readiness(Mutex<Result<(), String>>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Mutex::new(Err("the session has not been read yet".into())))
    }
}

impl Readiness {
    pub fn ready(&self) {
        *self.0.lock().unwrap() = Ok(());
    }

    pub fn not_ready(&self, why: String) {
        *self.0.lock().unwrap() = Err(why);
    }

    pub fn is_ready(&self) -> bool {
        self.0.lock().unwrap().is_ok()
    }

    fn answer(&self) -> (StatusCode, String) {
        match &*self.0.lock().unwrap() {
            Ok(()) => (StatusCode::OK, "ok".into()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why.clone()),
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> (StatusCode, String) {
    readiness.answer()
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(readiness);
    crate::controller::server::serve_router(addr, app, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_until_told_and_says_why() {
        let r = Readiness::default();
        assert_eq!(r.answer().0, StatusCode::SERVICE_UNAVAILABLE);
        r.ready();
        assert_eq!(r.answer(), (StatusCode::OK, "ok".to_string()));
        r.not_ready("cannot read the session file /x: Permission denied".into());
        let (code, body) = r.answer();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("Permission denied"));
    }
}
