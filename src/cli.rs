//! Command-line interface. `main.rs` only parses arguments and calls [`run`].

use clap::{Parser, Subcommand, ValueEnum};

/// Manages teams' connections to Salesforce and Dynamics 365.
#[derive(Parser, Debug)]
#[command(name = "connection-operator", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LOG_FORMAT", global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the Connection CustomResourceDefinition as YAML (generated from the Rust types).
    Crd,
    /// Run the operator against the cluster of the current kubeconfig or in-cluster config.
    Run,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Errors the CLI reports; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot connect to Kubernetes: {0}")]
    Connect(#[source] kube::Error),
    #[error(
        "the Connection CRD (connections.crmconnect.io) is not installed in this cluster; install it with:\n  connection-operator crd | kubectl apply -f -\nor: kubectl apply -f crds/connection.yaml"
    )]
    CrdMissing,
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
}

impl CliError {
    /// Process exit code: 1 for errors the user must fix, 2 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::CrdMissing => 1,
            CliError::Connect(_) | CliError::Kube(_) => 2,
        }
    }
}

/// Sets up logging. Logs go to stderr so stdout stays machine-readable.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Crd => {
            print!("{}", crate::api::crd_yaml());
            Ok(())
        }
        Command::Run => {
            init_logging(cli.log_format);
            run_operator().await
        }
    }
}

async fn run_operator() -> Result<(), CliError> {
    let client = kube::Client::try_default().await.map_err(CliError::Connect)?;
    ensure_crd_installed(&client).await?;
    tracing::info!("Connection CRD found; operator running (reconciler: planned), waiting for SIGTERM");
    shutdown_signal().await;
    tracing::info!("shutting down");
    Ok(())
}

/// Checks that the Connection CRD is served, using only `list connections` (no CRD read rights needed).
pub async fn ensure_crd_installed(client: &kube::Client) -> Result<(), CliError> {
    use kube::api::{Api, ListParams};
    let api: Api<crate::api::Connection> = Api::all(client.clone());
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(CliError::CrdMissing),
        Err(e) => Err(CliError::Kube(e)),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
