//! The operator's client for the Kubernetes API: kube's own layers (base URI, authentication,
//! extra headers, retries on 429/503/504, timeouts) over a connection that offers HTTP/2.
//!
//! kube's default client speaks HTTP/1.1 only, so each request in flight holds a pooled TLS
//! connection of its own: a reconcile that sends its independent reads and writes at once would
//! hold several, 32 reconciles at a time (4 MiB more at 3000 connections, BENCHMARKS.md). Over
//! HTTP/2 every request and watch shares one connection, as client-go's do; parallel requests
//! then cost a stream each, not a connection. The API server chooses: without h2 in its ALPN
//! answer (e.g. a plain-HTTP proxy in front of it) the same client speaks HTTP/1.1.
//!
//! A dead HTTP/2 connection would stall every watch at once, so it is pinged after 30 s without a
//! frame and dropped when a ping goes unanswered for 15 s (client-go's `ReadIdleTimeout` and
//! `PingTimeout`); the watches then reconnect.
//!
//! A kubeconfig with a proxy gets kube's default client: this one has no proxy support.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::{Client, Config};

/// Pings an HTTP/2 connection after this long without a frame from the API server.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ... and drops it when the ping has had no answer after this long.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// A client for the cluster the environment names (in-cluster ServiceAccount, else `$KUBECONFIG`
/// or `~/.kube/config`), as `kube::Client::try_default` finds it.
pub async fn infer() -> kube::Result<Client> {
    let config = Config::infer().await.map_err(kube::Error::InferConfig)?;
    from_config(config)
}

/// A client for `config`: HTTP/2 when the API server offers it, HTTP/1.1 otherwise.
pub fn from_config(config: Config) -> kube::Result<Client> {
    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let tls = config.rustls_client_config()?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = match &config.tls_server_name {
        Some(name) => {
            let name = rustls_pki_types::ServerName::try_from(name.clone()).map_err(|e| {
                kube::Error::Service(
                    format!("tls-server-name {name:?} is not a valid server name: {e}").into(),
                )
            })?;
            https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => https,
    };
    let https = https.enable_all_versions().wrap_connector(http);
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let hyper: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .http2_keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .build(connector);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(Client::new(service, config.default_namespace))
}
