//! The retriever: the process in each Active connection's `<name>-retriever` pod
//! (`connection-operator retrieve`).
//!
//! Today it holds the connection's session and nothing more: it reads the session Secret the
//! operator mounts, serves `/healthz` and `/readyz`, re-reads the session when the kubelet updates
//! the volume, and exits 0 on SIGTERM. **Job retrieval itself (polling the CRM for queued jobs) is
//! not implemented yet**; it is planned in the job-retrieval issue, and the process says so at start.

pub mod probes;
pub mod session;

use session::Session;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// What `retrieve` is told (CLI flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Name of the Connection.
    pub connection: String,
    /// Its namespace, when known (the pod's own, from the downward API).
    pub namespace: Option<String>,
    /// Where the session Secret is mounted.
    pub session_dir: PathBuf,
    /// How often jobs will be polled (not used until job retrieval exists).
    pub poll_interval: Duration,
    /// Address of `/healthz` and `/readyz`.
    pub probe_addr: SocketAddr,
    /// How often the session files are re-read. The kubelet replaces a Secret volume's files by a
    /// symlink swap (within about a minute of the Secret's change), and no event tells the pod.
    pub session_check_interval: Duration,
}

/// Why the retriever stopped with an error (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Session(#[from] session::SessionError),
    #[error("cannot listen on {addr} for /healthz and /readyz: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs until `shutdown` resolves. Fails at once if the session cannot be read at start.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let connection = match &settings.namespace {
        Some(ns) => format!("{ns}/{}", settings.connection),
        None => settings.connection.clone(),
    };
    info!(
        connection = %connection,
        poll_interval = ?settings.poll_interval,
        "job retrieval is not implemented yet (planned: the job-retrieval issue); this pod holds the connection's session only"
    );
    let mut current = session::load(&settings.session_dir).await?;
    log_session(&connection, &settings, &current, "session loaded");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let readiness = Arc::new(probes::Readiness::default());
    readiness.ready();
    let mut stopped = stop_rx.clone();
    let (bound, server) = probes::serve(settings.probe_addr, readiness.clone(), async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    })
    .await
    .map_err(|source| Error::Listen {
        addr: settings.probe_addr,
        source,
    })?;
    info!(address = %bound, "serving /healthz and /readyz");

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(settings.session_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: the session was just read
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => match session::load(&settings.session_dir).await {
                Ok(fresh) => {
                    if fresh.fingerprint != current.fingerprint {
                        log_session(&connection, &settings, &fresh, "session changed");
                        current = fresh;
                    }
                    if !readiness.is_ready() {
                        info!(connection = %connection, "the session is readable again");
                    }
                    readiness.ready();
                }
                Err(e) => {
                    if readiness.is_ready() {
                        warn!(connection = %connection, error = %e, "cannot re-read the session; not ready until it can be read");
                    }
                    readiness.not_ready(e.to_string());
                }
            },
        }
    }
    info!(connection = %connection, "stopping");
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

/// Logs what was read, never the token.
fn log_session(connection: &str, settings: &Settings, session: &Session, what: &str) {
    info!(
        connection = %connection,
        provider = %session.provider,
        instance_url = %session.instance_url,
        expires_at = session.expires_at.map(|t| t.to_string()).unwrap_or_else(|| "unknown".into()),
        session_dir = %settings.session_dir.display(),
        "{what}"
    );
}
