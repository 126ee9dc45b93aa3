//! Leader election: with several replicas exactly one reconciles (and so exactly one refreshes each
//! token); the others wait as standbys, serving `/healthz`. A `coordination.k8s.io` Lease held through
//! `kube-lease-manager` (server-side apply, renewed before it expires, released on shutdown so a
//! standby takes over at once). Losing the lease stops the controller: the process exits 1 and
//! restarts as a standby, never reconciling without it.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// Where the lease lives and who we are.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Name of the Lease.
    pub lease_name: String,
    /// Its namespace (the operator's own).
    pub namespace: String,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    /// How long a lease is valid without renewal: the longest failover after a crash.
    pub duration: Duration,
}

/// The lease while we hold it. Dropping it releases the lease.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl Leadership {
    /// Resolves when the lease is lost (not renewed in time, taken over). Owns what it needs, so it
    /// can run in its own task while `self` stays here to be released.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            let _ = state.wait_for(|leader| !*leader).await;
        }
    }

    /// Releases the lease (so a standby takes over without waiting for it to expire).
    pub async fn release(self) {
        drop(self.state);
        match self.task.await {
            Ok(Ok(_)) => info!("released the leader lease"),
            Ok(Err(e)) => warn!(error = %e, "could not release the leader lease; it expires by itself"),
            Err(e) => warn!(error = %e, "the lease task failed"),
        }
    }
}

/// Waits until this replica holds the lease; `None` if `stopped` resolves first.
pub async fn acquire(
    client: Client,
    election: &LeaderElection,
    stopped: impl std::future::Future<Output = ()>,
) -> Result<Option<Leadership>, LeaseManagerError> {
    let seconds = election.duration.as_secs().max(2);
    // Renew a third of the duration before expiry (the crate's grace must be shorter than the lease).
    let grace = (seconds / 3).max(1);
    let manager = LeaseManagerBuilder::new(client, &election.lease_name)
        .with_namespace(&election.namespace)
        .with_identity(&election.identity)
        .with_duration(seconds)
        .with_grace(grace)
        .build()
        .await?;
    let (mut state, task) = manager.watch().await;
    info!(
        lease = %format!("{}/{}", election.namespace, election.lease_name),
        identity = %election.identity,
        "waiting for the leader lease (standby until then)"
    );
    let held = tokio::select! {
        held = async { state.wait_for(|leader| *leader).await.is_ok() } => held,
        _ = stopped => {
            drop(state);
            let _ = task.await;
            return Ok(None);
        }
    };
    if !held {
        // The manager's task ended (it only does on errors): say why.
        let reason = match task.await {
            Ok(Err(e)) => e.to_string(),
            _ => "the lease task ended".to_string(),
        };
        return Err(LeaseManagerError::InconsistentState(reason));
    }
    info!(identity = %election.identity, "acquired the leader lease: reconciling");
    Ok(Some(Leadership { state, task }))
}
