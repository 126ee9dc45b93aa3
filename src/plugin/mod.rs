//! `kubectl crm`: the kubectl plugin of connection-operator (the `kubectl-crm` binary). It signs
//! users in to Salesforce or Dynamics 365 with a real OAuth login and writes the credentials Secret
//! and the Connection; it re-authorizes, pauses, activates, edits and shows connections.
//!
//! Follows kubectl's conventions: `-n/--namespace`, `--context`, `--kubeconfig`, `-o`, exit code 0
//! on success and 1 on any failure, results on stdout and prompts on stderr.

mod connect;
pub mod login;
mod manage;
mod status;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::api::{Cloud, Provider};

/// Connect teams to Salesforce and Dynamics 365: sign in, re-authorize, pause, activate and
/// inspect connection-operator's Connections.
#[derive(Parser, Debug)]
#[command(name = "kubectl-crm", bin_name = "kubectl crm", version, about)]
pub struct Cli {
    /// The namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, global = true)]
    pub output: Option<Output>,
    #[command(flatten)]
    pub providers: ProviderFlags,
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

/// Where logins and identity checks may go (the operator's own rules).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProviderFlags {
    /// PEM file of CA certificates trusted in addition to the web PKI roots (a TLS-inspecting proxy).
    #[arg(long, global = true, env = "KUBECTL_CRM_EXTRA_CA_BUNDLE")]
    pub extra_ca_bundle: Option<PathBuf>,
    /// A host or domain (with every host below it) credentials may be sent to besides the
    /// Salesforce, Entra ID and Dataverse hosts (repeatable, or comma-separated), as the operator's
    /// --allow-provider-domain: a TLS-inspecting proxy, a cloud not built in.
    #[arg(
        long = "allow-provider-domain",
        global = true,
        env = "KUBECTL_CRM_ALLOW_PROVIDER_DOMAINS",
        value_delimiter = ','
    )]
    pub allow_provider_domains: Vec<String>,
    /// Allow provider hosts on loopback, over http too (tests and local demos only).
    #[arg(
        long,
        global = true,
        hide = true,
        env = "KUBECTL_CRM_ALLOW_LOOPBACK_PROVIDERS"
    )]
    pub allow_loopback_providers: bool,
    /// Replace the Entra ID authority of every cloud (tests and local demos only).
    #[arg(long, global = true, hide = true, env = "ENTRA_AUTHORITY_OVERRIDE")]
    pub entra_authority_override: Option<String>,
    /// Replace the Global Discovery Service of every cloud (tests and local demos only).
    #[arg(long, global = true, hide = true, env = "KUBECTL_CRM_DISCOVERY_URL")]
    pub discovery_url: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Sign in to a CRM and create a connection: the credentials Secret and the Connection. Waits
    /// until the connection is Active, or says why not.
    Connect(Box<connect::ConnectArgs>),
    /// Sign in again for an existing connection (same provider, settings and client) and replace
    /// the tokens in its Secret; refused when the login is for another org or environment. Waits
    /// until the connection is Active again.
    Reauthorize(connect::ReauthorizeArgs),
    /// Pause a connection: no jobs are retrieved; its queued jobs wait ("Holding").
    Pause(manage::WaitArgs),
    /// Activate a paused connection. Waits until it is Active, or says why not.
    Activate(manage::WaitArgs),
    /// Change a connection's display name or description.
    Edit(manage::EditArgs),
    /// Check a connection's tokens with the provider now, through the operator (which refreshes
    /// them on its fenced path: a rotated refresh token is never lost). Exit code 0 when the
    /// provider accepts them, 1 otherwise.
    Check(manage::CheckArgs),
    /// The connections of the namespace, or one connection's details: type, org, state and why,
    /// the retriever, the org's settings, recent jobs and events.
    Status(status::StatusArgs),
}

/// A failure of the command: printed as `error: ...`, exit code 1. (Not `Display`, so that any
/// displayable error converts into it with `?`.)
#[derive(Debug)]
pub struct Failed(pub String);

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Self {
        Failed(e.to_string())
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failed> {
    let (client, namespace) = kube_client(&cli).await?;
    let extra_roots = match &cli.providers.extra_ca_bundle {
        Some(path) => Some(crate::providers::ExtraRoots::read(path)?),
        None => None,
    };
    let ctx = Ctx {
        client,
        namespace,
        output: cli.output,
        providers: cli.providers,
        extra_roots,
    };
    match cli.command {
        Command::Connect(args) => connect::connect(&ctx, *args).await,
        Command::Reauthorize(args) => connect::reauthorize(&ctx, args).await,
        Command::Pause(args) => manage::set_paused(&ctx, args, true).await,
        Command::Activate(args) => manage::set_paused(&ctx, args, false).await,
        Command::Edit(args) => manage::edit(&ctx, args).await,
        Command::Check(args) => manage::check(&ctx, args).await,
        Command::Status(args) => status::status(&ctx, args).await,
    }
}

/// What every command needs.
pub(crate) struct Ctx {
    pub client: kube::Client,
    pub namespace: String,
    pub output: Option<Output>,
    pub providers: ProviderFlags,
    /// `--extra-ca-bundle`, read once.
    pub extra_roots: Option<crate::providers::ExtraRoots>,
}

/// `value` as YAML, or as pretty JSON (with a final newline) for `-o json`.
pub(crate) fn render(value: &impl serde::Serialize, output: Output) -> Result<String, Failed> {
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        _ => serde_saphyr::to_string(value)?,
    })
}

async fn kube_client(cli: &Cli) -> Result<(kube::Client, String), Failed> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| Failed(format!("cannot read kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await
        }
        None => kube::Config::from_kubeconfig(&options).await,
    }
    .map_err(|e| Failed(format!("no usable kubeconfig: {e}")))?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)
        .map_err(|e| Failed(format!("cannot build the Kubernetes client: {e}")))?;
    Ok((client, namespace))
}

/// `Provider` from the command line (the names as in manifests).
pub(crate) fn parse_provider(s: &str) -> Result<Provider, String> {
    s.parse().map_err(|_| {
        format!("unknown provider {s:?}: use SalesforceProduction, SalesforceSandbox or Dynamics365")
    })
}

/// `Cloud` from the command line (the names as in manifests).
pub(crate) fn parse_cloud(s: &str) -> Result<Cloud, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown cloud {s:?}: use Public, GCC, GCCHigh, DoD or China"))
}

/// Parses durations such as `90s`, `2m` (kubectl's `--timeout` style).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::cli::parse_duration(s)
}
