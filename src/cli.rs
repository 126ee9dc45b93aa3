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
    /// Print the CustomResourceDefinitions as YAML (generated from the Rust types): all of them, or
    /// the one named (connection, orgsettings, jobrun, jobtemplate, orgclaim).
    Crd {
        #[arg(value_parser = ["connection", "orgsettings", "jobrun", "jobtemplate", "orgclaim"])]
        name: Option<String>,
    },
    /// Run the operator against the cluster of the current kubeconfig or in-cluster config.
    Run(Box<RunArgs>),
    /// Retrieve one connection's jobs (the retriever pod's command): polls the CRM job queue, claims
    /// queued jobs atomically in the CRM and records each as a JobRun. Serves /healthz, /readyz
    /// and /metrics.
    Retrieve(RetrieveArgs),
    /// Built-in job workers (a JobTemplate's container command).
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Validate one connection's credentials from local files (no cluster) and print the identity or
    /// the classified failure. Exit code 0 valid, 1 permanent/configuration failure, 2 transient.
    /// A rotated refresh token is written back into the Secret file.
    CheckCredentials(crate::check_credentials::CheckArgs),
}

/// `connection-operator worker ...`.
#[derive(Subcommand, Debug)]
pub enum WorkerCommand {
    /// Count the records of one object in the connection's CRM (the example worker): prints the
    /// count and writes it as the termination message. Exit 0; 75 when the CRM refuses the session
    /// twice; 1 otherwise.
    RecordCount(crate::worker::RecordCountArgs),
}

/// Flags of `run` (each also readable from the environment, for the Helm chart).
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Watch only these namespaces (namespaced mode; repeat the flag or separate them with
    /// commas); default: all namespaces.
    #[arg(long, env = "WATCH_NAMESPACE", value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// How often valid tokens are re-checked with the provider: each connection at its own moment
    /// of the interval (from its UID), so the checks of many connections spread evenly over it.
    #[arg(long, env = "REVALIDATE_INTERVAL", default_value = "15m", value_parser = parse_duration)]
    pub revalidate_interval: std::time::Duration,
    /// How long an access token is used for the rechecks of valid tokens (an identity call, no token
    /// request: nothing rotates) before a recheck refreshes it; also refreshed 5 minutes before a
    /// known expiry, and whenever the Secret or spec changes. 0: every recheck refreshes.
    #[arg(long, env = "REFRESH_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub refresh_interval: std::time::Duration,
    /// First retry delay after a transient provider failure (doubles per attempt).
    #[arg(long, env = "RETRY_BASE", default_value = "5s", value_parser = parse_duration)]
    pub retry_base: std::time::Duration,
    /// Longest retry delay after transient provider failures.
    #[arg(long, env = "RETRY_MAX", default_value = "5m", value_parser = parse_duration)]
    pub retry_max: std::time::Duration,
    /// Token-grant requests per second allowed to one provider host.
    #[arg(long, env = "PROVIDER_RATE", default_value_t = 10)]
    pub provider_rate: u32,
    /// Burst of token-grant requests allowed to one provider host.
    #[arg(long, env = "PROVIDER_BURST", default_value_t = 20)]
    pub provider_burst: u32,
    /// Timeout of one provider request.
    #[arg(long, env = "PROVIDER_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub provider_timeout: std::time::Duration,
    /// Override the Entra ID authority (testing only, e.g. http://127.0.0.1:8089).
    #[arg(long, env = "ENTRA_AUTHORITY_OVERRIDE", hide = true)]
    pub entra_authority_override: Option<String>,
    /// PEM file of CA certificates trusted for provider calls in addition to the built-in web PKI
    /// roots (a corporate TLS proxy, or a test CA). https is still required.
    #[arg(long, env = "EXTRA_CA_BUNDLE")]
    pub extra_ca_bundle: Option<std::path::PathBuf>,
    /// A host or domain (with every host below it) the operator may send credentials to, besides
    /// the Salesforce, Entra ID and Dataverse hosts; repeatable, or comma-separated in the
    /// environment. E.g. a TLS-inspecting proxy's name, or a cloud not built in.
    #[arg(
        long = "allow-provider-domain",
        env = "ALLOW_PROVIDER_DOMAINS",
        value_delimiter = ','
    )]
    pub allow_provider_domains: Vec<String>,
    /// Send credentials to loopback hosts (127.0.0.1, [::1], localhost), over http too: tests and
    /// local demos only.
    #[arg(long, env = "ALLOW_LOOPBACK_PROVIDERS", hide = true)]
    pub allow_loopback_providers: bool,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    /// Connections reconciled concurrently.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// How often the CRM record of a running job is read, to stop the job when it was aborted or
    /// deleted in the CRM (one read per running job per interval).
    #[arg(long, env = "JOB_ABORT_CHECK", default_value = "60s", value_parser = parse_duration)]
    pub job_abort_check: std::time::Duration,
    /// How long a finished job's batch Job (and its JobRun) is kept when its JobTemplate sets no
    /// ttlSecondsAfterFinished, and how long a JobRun that ended without a Job (aborted before it
    /// started, given back to the CRM queue) is kept. The org's history keeps every outcome.
    #[arg(long, env = "JOB_TTL", default_value = "24h", value_parser = parse_duration)]
    pub job_ttl: std::time::Duration,
    /// Require every connection to accept this version of a data processing agreement
    /// (spec.agreement.version) before its tokens are used; until then it stays Pending
    /// (AgreementNotAccepted). Off when empty.
    #[arg(long, env = "AGREEMENT_VERSION", default_value = "")]
    pub agreement_version: String,
    /// The required agreement's name.
    #[arg(long, env = "AGREEMENT_NAME", default_value = "Data Processing Agreement")]
    pub agreement_name: String,
    /// Where users read the required agreement (required with --agreement-version).
    #[arg(long, env = "AGREEMENT_URL", default_value = "")]
    pub agreement_url: String,
    /// Reconcile only while holding a Lease, so that of several replicas exactly one reconciles
    /// (and refreshes tokens); the others wait as standbys.
    #[arg(long, env = "LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "connection-operator")]
    pub lease_name: String,
    /// Namespace of the leader Lease (the operator's own; the chart sets it from the pod).
    #[arg(long, env = "POD_NAMESPACE", required_if_eq("leader_elect", "true"))]
    pub lease_namespace: Option<String>,
    /// How long the Lease is valid without renewal: the longest failover after a crash.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: std::time::Duration,
    /// Directory of the write-ahead journal of rotated refresh tokens (an emptyDir in the chart):
    /// a token the provider issued is recorded there, encrypted, before it is saved to
    /// `<name>-token`, so a crash in between loses nothing. No journal when unset.
    #[arg(long, env = "JOURNAL_DIR")]
    pub journal_dir: Option<std::path::PathBuf>,
    /// The journal's encryption key (32 bytes, created when absent; a memory-backed emptyDir in
    /// the chart, so it never touches a disk). Default: `<journal dir>.key`.
    #[arg(long, env = "JOURNAL_KEY_FILE", requires = "journal_dir")]
    pub journal_key_file: Option<std::path::PathBuf>,
    /// Image of retriever pods.
    #[arg(
        long,
        env = "RETRIEVER_IMAGE",
        default_value = "ghcr.io/crmconnect/connection-operator:0.1.0"
    )]
    pub retriever_image: String,
    /// Pull policy of retriever pods.
    #[arg(long, env = "RETRIEVER_PULL_POLICY", default_value = "IfNotPresent")]
    pub retriever_pull_policy: String,
    /// The ClusterRole each retriever's ServiceAccount is bound to in its namespace (the chart's
    /// `<rbac name>:retriever`: JobRuns only).
    #[arg(
        long,
        env = "RETRIEVER_CLUSTER_ROLE",
        default_value = crate::controller::children::DEFAULT_RETRIEVER_CLUSTER_ROLE
    )]
    pub retriever_cluster_role: String,
    /// `/etc/hosts` entries of retriever pods, as JSON (`[{"ip": "10.0.0.1", "hostnames": ["a"]}]`;
    /// the chart passes its `hostAliases`).
    #[arg(long, env = "RETRIEVER_HOST_ALIASES", value_parser = parse_host_aliases, default_value = "[]")]
    pub retriever_host_aliases: HostAliases,
    /// CPU request / limit of retriever pods.
    #[arg(long, env = "RETRIEVER_CPU_REQUEST", default_value = "10m")]
    pub retriever_cpu_request: String,
    #[arg(long, env = "RETRIEVER_CPU_LIMIT", default_value = "200m")]
    pub retriever_cpu_limit: String,
    /// Memory request / limit of retriever pods.
    #[arg(long, env = "RETRIEVER_MEMORY_REQUEST", default_value = "32Mi")]
    pub retriever_memory_request: String,
    #[arg(long, env = "RETRIEVER_MEMORY_LIMIT", default_value = "128Mi")]
    pub retriever_memory_limit: String,
}

impl RunArgs {
    /// The controller configuration these flags describe (reads the extra CA bundle, if any).
    pub fn config(&self) -> Result<crate::controller::Config, CliError> {
        use crate::controller::{Config, children::RetrieverSettings, schedule::Policy};
        let validator = crate::providers::ValidatorConfig {
            request_timeout: self.provider_timeout,
            per_host_rate: self.provider_rate,
            per_host_burst: self.provider_burst,
            entra_authority_override: self.entra_authority_override.clone(),
            extra_roots: read_extra_roots(self.extra_ca_bundle.as_deref())?,
            hosts: crate::providers::rules::HostPolicy {
                extra_domains: self.allow_provider_domains.clone(),
                allow_loopback: self.allow_loopback_providers,
            },
            ..Default::default()
        };
        Ok(Config {
            namespaces: self.namespace.clone(),
            policy: Policy {
                revalidate_every: self.revalidate_interval,
                refresh_every: self.refresh_interval,
                retry_base: self.retry_base,
                retry_max: self.retry_max,
                ..Default::default()
            },
            retriever: RetrieverSettings {
                image: self.retriever_image.clone(),
                pull_policy: self.retriever_pull_policy.clone(),
                cpu_request: self.retriever_cpu_request.clone(),
                cpu_limit: self.retriever_cpu_limit.clone(),
                memory_request: self.retriever_memory_request.clone(),
                memory_limit: self.retriever_memory_limit.clone(),
                cluster_role: self.retriever_cluster_role.clone(),
                host_aliases: self.retriever_host_aliases.0.clone(),
            },
            validator,
            concurrency: self.concurrency,
            instance: std::env::var("POD_NAME").ok(),
            metrics_addr: Some(self.metrics_addr),
            leader_election: self
                .leader_elect
                .then(|| crate::controller::leader::LeaderElection {
                    lease_name: self.lease_name.clone(),
                    namespace: self.lease_namespace.clone().unwrap_or_default(),
                    // The pod name; outside a pod, unique per process.
                    identity: std::env::var("POD_NAME")
                        .unwrap_or_else(|_| format!("connection-operator-{}", std::process::id())),
                    duration: self.lease_duration,
                }),
            journal: self
                .journal_dir
                .as_ref()
                .map(|dir| crate::controller::JournalConfig {
                    dir: dir.clone(),
                    key_file: self
                        .journal_key_file
                        .clone()
                        .unwrap_or_else(|| dir.with_extension("key")),
                }),
            job_abort_check: self.job_abort_check,
            job_ttl: self.job_ttl,
            agreement: self.agreement()?,
        })
    }

    /// The required agreement of `--agreement-version`, `--agreement-name`, `--agreement-url`.
    fn agreement(&self) -> Result<Option<crate::api::RequiredAgreement>, CliError> {
        let version = self.agreement_version.trim();
        if version.is_empty() {
            return Ok(None);
        }
        let url = self.agreement_url.trim();
        if url.is_empty() || url::Url::parse(url).is_err() {
            return Err(CliError::Config(format!(
                "--agreement-url (AGREEMENT_URL) must be the URL where users read the agreement; got {url:?}"
            )));
        }
        Ok(Some(crate::api::RequiredAgreement {
            name: self.agreement_name.trim().to_string(),
            version: version.to_string(),
            url: url.to_string(),
        }))
    }
}

/// Reads `--extra-ca-bundle` (a startup error, exit 1, when it is missing or holds no usable
/// certificate) and logs what is trusted.
pub fn read_extra_roots(
    path: Option<&std::path::Path>,
) -> Result<Option<crate::providers::ExtraRoots>, CliError> {
    let Some(path) = path else { return Ok(None) };
    let roots = crate::providers::ExtraRoots::read(path).map_err(|e| CliError::Config(e.to_string()))?;
    tracing::info!(
        bundle = roots.source(),
        certificates = roots.len(),
        "trusting extra CA certificates for provider calls, besides the built-in roots"
    );
    Ok(Some(roots))
}

/// Flags of `retrieve`.
#[derive(clap::Args, Debug)]
pub struct RetrieveArgs {
    /// Name of the Connection.
    #[arg(long)]
    pub connection: String,
    /// The connection's namespace (the pod's own; set from the downward API). Default: the
    /// namespace of the in-cluster config or KUBECONFIG.
    #[arg(long, env = "CONNECTION_NAMESPACE")]
    pub namespace: Option<String>,
    /// The org key: the name of the org's OrgSettings (sf-<org ID> or d365-<environment ID>),
    /// the label of its JobRuns.
    #[arg(long, value_parser = parse_org_key)]
    pub org_key: String,
    /// This pod's name (recorded in each claim). Default: the host name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Directory where the session Secret is mounted.
    #[arg(long, default_value = "/var/run/crmconnect/session")]
    pub session_dir: std::path::PathBuf,
    /// Claim queued jobs (false: poll and count them only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_run_jobs: bool,
    /// How often to poll the CRM for queued jobs (jittered ±10%).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub poll_interval: std::time::Duration,
    /// How many of the org's jobs may be claimed or running at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_concurrent_jobs: u32,
    /// How many jobs one poll may claim.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_claims_per_poll: u32,
    /// Claim only these job types (comma-separated; default: every type). The operator passes the
    /// types a JobTemplate can run (of the org's allowedJobTypes, if set).
    #[arg(long, value_delimiter = ',')]
    pub allowed_job_types: Vec<String>,
    /// No JobTemplate can run any of the org's job types: ask the CRM nothing, claim nothing (the
    /// operator passes it; a template appearing rolls the retriever with the types it can run).
    #[arg(long, conflicts_with = "allowed_job_types")]
    pub no_job_templates: bool,
    /// How long a claim holds in the CRM.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub claim_lease: std::time::Duration,
    /// Poll once, print what was claimed, and exit (0, or 1 when the poll failed).
    #[arg(long)]
    pub once: bool,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, alias = "probe-addr", default_value = "0.0.0.0:8081")]
    pub metrics_addr: std::net::SocketAddr,
    /// Timeout of one CRM request.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: std::time::Duration,
    /// PEM file of CA certificates trusted for the CRM besides the web PKI roots.
    #[arg(long, env = "EXTRA_CA_BUNDLE")]
    pub extra_ca_bundle: Option<std::path::PathBuf>,
    /// The longest random delay before the first poll.
    #[arg(long, default_value = "30s", value_parser = parse_duration, hide = true)]
    pub start_delay_max: std::time::Duration,
    /// How often the mounted session is re-read (the kubelet swaps the files when the Secret changes).
    #[arg(long, default_value = "10s", value_parser = parse_duration, hide = true)]
    pub session_check_interval: std::time::Duration,
}

impl RetrieveArgs {
    /// The retriever settings these flags describe (reads the extra CA bundle, if any).
    pub fn settings(&self) -> Result<crate::retriever::Settings, CliError> {
        Ok(crate::retriever::Settings {
            connection: self.connection.clone(),
            namespace: self.namespace.clone(),
            org_key: self.org_key.clone(),
            pod: self.pod_name.clone().unwrap_or_else(|| {
                std::env::var("HOSTNAME").unwrap_or_else(|_| format!("pid-{}", std::process::id()))
            }),
            session_dir: self.session_dir.clone(),
            jobs: crate::retriever::plan::JobSettings {
                auto_run_jobs: self.auto_run_jobs,
                poll_interval: self.poll_interval.max(std::time::Duration::from_secs(1)),
                max_concurrent_jobs: self.max_concurrent_jobs,
                max_claims_per_poll: self.max_claims_per_poll,
                allowed_job_types: self.allowed_job_types.clone(),
                no_job_templates: self.no_job_templates,
                claim_lease: self.claim_lease.max(std::time::Duration::from_secs(1)),
            },
            probe_addr: self.metrics_addr,
            session_check_interval: self
                .session_check_interval
                .max(std::time::Duration::from_millis(100)),
            once: self.once,
            start_delay_max: self.start_delay_max,
            request_timeout: self.request_timeout.max(std::time::Duration::from_secs(1)),
            extra_roots: read_extra_roots(self.extra_ca_bundle.as_deref())?,
        })
    }
}

/// `--retriever-host-aliases`.
#[derive(Clone, Debug, Default)]
pub struct HostAliases(pub Vec<k8s_openapi::api::core::v1::HostAlias>);

fn parse_host_aliases(s: &str) -> Result<HostAliases, String> {
    serde_json::from_str(s)
        .map(HostAliases)
        .map_err(|e| format!("not a JSON list of {{\"ip\": ..., \"hostnames\": [...]}}: {e}"))
}

/// An org key as the operator names them: `sf-<18 lowercase alphanumerics>` or `d365-<GUID>`.
fn parse_org_key(s: &str) -> Result<String, String> {
    let ok = match (s.strip_prefix("sf-"), s.strip_prefix("d365-")) {
        (Some(id), _) => {
            (1..=59).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        }
        (_, Some(id)) => Some(s.to_string()) == crate::api::org_key(crate::api::Provider::Dynamics365, id),
        _ => false,
    };
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not an org key (sf-<18-character org ID, lowercase> or d365-<environment GUID, lowercase>)"
        ))
    }
}

/// Parses durations like `90s`, `15m`, `1h`, `500ms`, and Go-style sequences such as `1h30m` (what
/// an OrgSettings' `pollInterval` may hold). A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let invalid = || format!("invalid duration {s:?}: expected e.g. 30s, 15m, 1h or 1h30m");
    if let Ok(n) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(n));
    }
    let mut rest = s;
    let mut total = std::time::Duration::ZERO;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
        let n: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => std::time::Duration::from_millis(n),
            "s" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
            "h" => std::time::Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    Ok(total)
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
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Retriever(#[from] crate::retriever::Error),
    /// `check-credentials` did not succeed; `exit_code` is 1 (permanent/configuration) or 2 (transient).
    #[error("{message}")]
    CheckFailed { message: String, exit_code: i32 },
    /// A worker failed; `exit_code` is 75 (the CRM refused the session) or 1.
    #[error("{message}")]
    Worker { message: String, exit_code: i32 },
}

impl CliError {
    /// Process exit code: 1 for errors the user must fix, 2 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::CrdMissing | CliError::Config(_) | CliError::Retriever(_) => 1,
            CliError::Connect(_) | CliError::Kube(_) => 2,
            CliError::CheckFailed { exit_code, .. } | CliError::Worker { exit_code, .. } => *exit_code,
        }
    }
}

/// Sets up logging. Logs go to stderr so stdout stays machine-readable.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: not in container logs, files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Crd { name } => {
            match name {
                Some(name) => print!(
                    "{}",
                    crate::api::crd_yaml_of(&name).expect("clap checked the name")
                ),
                None => print!("{}", crate::api::all_crds_yaml()),
            }
            Ok(())
        }
        Command::Run(args) => {
            init_logging(cli.log_format);
            run_operator(*args).await
        }
        Command::CheckCredentials(args) => crate::check_credentials::run(args, cli.log_format).await,
        Command::Worker(WorkerCommand::RecordCount(args)) => match crate::worker::record_count(&args).await {
            Ok(result) => {
                println!("{result}");
                Ok(())
            }
            Err((message, exit_code)) => Err(CliError::Worker { message, exit_code }),
        },
        Command::Retrieve(args) => {
            init_logging(cli.log_format);
            Ok(crate::retriever::run(args.settings()?, shutdown_signal()).await?)
        }
    }
}

async fn run_operator(args: RunArgs) -> Result<(), CliError> {
    let config = args.config()?;
    let client = crate::kube_client::infer().await.map_err(CliError::Connect)?;
    if config.namespaces.is_empty() {
        ensure_crd_installed(&client, None).await?;
    }
    for ns in &config.namespaces {
        ensure_crd_installed(&client, Some(ns)).await?;
    }
    crate::controller::run(client, config, shutdown_signal())
        .await
        .map_err(|e| CliError::Config(e.to_string()))
}

/// Checks that the Connection CRD is served, using only `list connections` (no CRD read rights
/// needed) in the watched namespace, or cluster-wide: what the operator's RBAC grants in each mode.
pub async fn ensure_crd_installed(client: &kube::Client, namespace: Option<&str>) -> Result<(), CliError> {
    use kube::api::{Api, ListParams};
    let api: Api<crate::api::Connection> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["connection-operator", "run"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Run(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn watched_namespaces_are_a_comma_list_or_repeated_flags() {
        let config = run_args(&["--namespace", "a,b", "--namespace", "c"])
            .config()
            .unwrap();
        assert_eq!(config.namespaces, ["a", "b", "c"]);
        assert!(
            run_args(&[]).config().unwrap().namespaces.is_empty(),
            "all namespaces"
        );
    }

    #[test]
    fn refresh_interval_defaults_to_an_hour_and_zero_means_every_recheck() {
        let config = run_args(&[]).config().unwrap();
        assert_eq!(config.policy.refresh_every, std::time::Duration::from_secs(3600));
        let config = run_args(&["--refresh-interval", "0"]).config().unwrap();
        assert_eq!(config.policy.refresh_every, std::time::Duration::ZERO);
    }

    #[test]
    fn an_agreement_is_required_only_with_a_version_and_needs_its_url() {
        assert!(run_args(&[]).config().unwrap().agreement.is_none());
        let config = run_args(&[
            "--agreement-version",
            "2026-01",
            "--agreement-url",
            "https://example.com/dpa",
        ])
        .config()
        .unwrap();
        let agreement = config.agreement.unwrap();
        assert_eq!(agreement.version, "2026-01");
        assert_eq!(agreement.name, "Data Processing Agreement");
        let err = run_args(&["--agreement-version", "2026-01"])
            .config()
            .unwrap_err();
        assert!(err.to_string().contains("--agreement-url"), "{err}");
    }
}
