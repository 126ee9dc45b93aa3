//! The operator's HTTP endpoints: `/healthz` (alive), `/readyz` (the API server answers a list of
//! Connections with the operator's own rights), `/metrics` (Prometheus).

use super::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    use kube::api::{Api, ListParams};
    // The first watched namespace stands for them (each has its own Role; any one answering
    // shows the API server and the CRD are there).
    let api: Api<crate::api::Connection> = match ctx.config.namespaces.first() {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let params = ListParams::default().limit(1);
    let check = api.list_metadata(&params);
    match tokio::time::timeout(std::time::Duration::from_secs(5), check).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok".to_string()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot list Connections: {e}"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the API server did not answer within 5 s".to_string(),
        ),
    }
}

async fn metrics(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.render(&ctx.stores),
    )
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx);
    serve_router(addr, app, shutdown).await
}

/// Binds `addr` and serves `app` in a task until `shutdown` resolves (the operator's endpoints and
/// the retriever's probes). Returns the bound address (port 0 picks one).
pub(crate) async fn serve_router(
    addr: SocketAddr,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, address = %bound, "HTTP server stopped");
        }
    });
    Ok((bound, task))
}
