//! `kubectl crm connect` and `kubectl crm reauthorize`: an OAuth login, the identity check, then
//! the credentials Secret and the Connection.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use secrecy::{ExposeSecret, SecretString};

use super::login::{self, Method, Target, Tokens, discovery};
use super::manage::{Want, finish, whoami};
use super::{Ctx, Failed, Output, parse_cloud, parse_duration, parse_provider, render};
use crate::api::{Cloud, Connection, ConnectionSpec, DynamicsSpec, Provider, SalesforceSpec};
use crate::controller::children::CREDENTIALS_LABEL;
use crate::providers::{Credentials, Session, Validator, ValidatorConfig, rules};

/// Field manager of the plugin's writes.
pub const FIELD_MANAGER: &str = "kubectl-crm";

/// How the login runs, shared by `connect` and `reauthorize`.
#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    /// Sign in with the browser on this machine (authorization code with PKCE on a loopback
    /// redirect) instead of a device code.
    #[arg(long)]
    pub browser: bool,
    /// How long to wait for the connection's new state after writing (0: do not wait).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Accept this version of the data processing agreement the cluster requires (for scripts;
    /// otherwise you are shown it and asked).
    #[arg(long, value_name = "VERSION")]
    pub accept_agreement: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct ConnectArgs {
    /// Name of the Connection.
    pub name: String,
    /// The team that owns it.
    #[arg(long)]
    pub team: String,
    /// SalesforceProduction, SalesforceSandbox or Dynamics365.
    #[arg(long, value_parser = parse_provider)]
    pub provider: Provider,
    /// Dynamics 365: the Microsoft cloud (Public, GCC, GCCHigh, DoD, China).
    #[arg(long, value_parser = parse_cloud)]
    pub cloud: Option<Cloud>,
    /// Dynamics 365: the Entra ID tenant (ID or domain; default `organizations`).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Dynamics 365: the environment URL; without it, you pick one of those your account can reach.
    #[arg(long)]
    pub environment: Option<String>,
    /// Salesforce: the login URL (a My Domain URL; default login.salesforce.com or test.salesforce.com).
    #[arg(long)]
    pub login_url: Option<String>,
    /// The OAuth client ID (Salesforce connected app consumer key, or Entra app registration).
    #[arg(long, env = "KUBECTL_CRM_CLIENT_ID")]
    pub client_id: String,
    /// A display name for the connection.
    #[arg(long)]
    pub display_name: Option<String>,
    /// What the connection is for.
    #[arg(long)]
    pub description: Option<String>,
    /// Name of the credentials Secret (default `<name>-credentials`).
    #[arg(long)]
    pub secret: Option<String>,
    /// Write nothing to the cluster: print the Connection (`-o yaml|json`) and write the Secret to
    /// --secret-file, to seal it for a GitOps repository.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: where the Secret manifest goes (default `<secret name>.secret.yaml`; mode 0600).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub login: LoginArgs,
}

#[derive(clap::Args, Debug)]
pub struct ReauthorizeArgs {
    /// Name of the Connection.
    pub name: String,
    #[command(flatten)]
    pub login: LoginArgs,
}

/// The spec `connect` creates (pure).
pub fn connection_spec(
    args: &ConnectArgs,
    secret: &str,
    environment_url: Option<&str>,
) -> Result<ConnectionSpec, String> {
    let mut spec = ConnectionSpec::new(&args.team, args.provider, secret);
    spec.display_name = args.display_name.clone();
    spec.description = args.description.clone();
    match args.provider {
        Provider::Dynamics365 => {
            if args.login_url.is_some() {
                return Err("--login-url is for Salesforce; Dynamics 365 uses --cloud and --tenant".into());
            }
            spec.dynamics = Some(DynamicsSpec {
                environment_url: environment_url.unwrap_or_default().to_string(),
                cloud: args.cloud.unwrap_or_default(),
                tenant_id: args.tenant.clone().unwrap_or_else(|| "organizations".into()),
            });
        }
        _ => {
            if args.cloud.is_some() || args.tenant.is_some() || args.environment.is_some() {
                return Err("--cloud, --tenant and --environment are for Dynamics 365".into());
            }
            if let Some(login_url) = &args.login_url {
                spec.salesforce = Some(SalesforceSpec {
                    login_url: Some(login_url.trim_end_matches('/').to_string()),
                });
            }
        }
    }
    Ok(spec)
}

/// The credentials Secret (pure): labelled so the operator watches it.
pub fn credentials_secret(
    namespace: &str,
    name: &str,
    client_id: &str,
    refresh_token: &SecretString,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (CREDENTIALS_LABEL.to_string(), "true".to_string()),
                (
                    "app.kubernetes.io/created-by".to_string(),
                    FIELD_MANAGER.to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                Credentials::CLIENT_ID.to_string(),
                ByteString(client_id.as_bytes().to_vec()),
            ),
            (
                Credentials::REFRESH_TOKEN.to_string(),
                ByteString(refresh_token.expose_secret().as_bytes().to_vec()),
            ),
        ])),
        ..Secret::default()
    }
}

fn validator(ctx: &Ctx) -> Result<Validator, Failed> {
    let flags = &ctx.providers;
    let mut config = ValidatorConfig {
        entra_authority_override: flags.entra_authority_override.clone(),
        ..ValidatorConfig::default()
    };
    config.hosts = host_policy(ctx);
    config.extra_roots = ctx.extra_roots.clone();
    Ok(Validator::new(config)?)
}

fn http(ctx: &Ctx) -> Result<reqwest::Client, Failed> {
    Ok(login::http_client(
        ctx.extra_roots.as_ref(),
        Duration::from_secs(30),
    )?)
}

fn host_policy(ctx: &Ctx) -> rules::HostPolicy {
    rules::HostPolicy {
        allow_loopback: ctx.providers.allow_loopback_providers,
        extra_domains: ctx.providers.allow_provider_domains.clone(),
    }
}

/// The Entra authority of the spec's cloud (or the override).
fn entra_base(ctx: &Ctx, cloud: Cloud) -> Result<url::Url, Failed> {
    let raw = ctx
        .providers
        .entra_authority_override
        .clone()
        .unwrap_or_else(|| rules::entra_authority(cloud).to_string());
    rules::parse_base_url(&raw, "the Entra authority").map_err(|f| Failed(f.message))
}

/// The login target for a spec whose provider settings are complete (Dynamics: environment set).
fn target_for(
    ctx: &Ctx,
    spec: &ConnectionSpec,
    client_id: &str,
    client_secret: Option<SecretString>,
) -> Result<Target, Failed> {
    match &spec.dynamics {
        Some(dynamics) => {
            let environment = rules::dynamics_environment_base(dynamics, &host_policy(ctx))
                .map_err(|f| Failed(f.message))?;
            Ok(Target {
                provider: spec.provider,
                base: entra_base(ctx, dynamics.cloud)?,
                tenant: dynamics.tenant_id.clone(),
                client_id: client_id.to_string(),
                client_secret,
                scopes: Target::entra_scopes(&environment),
            })
        }
        None => Ok(Target {
            provider: spec.provider,
            base: rules::salesforce_login_base(spec, &host_policy(ctx)).map_err(|f| Failed(f.message))?,
            tenant: String::new(),
            client_id: client_id.to_string(),
            client_secret,
            scopes: Target::salesforce_scopes(),
        }),
    }
}

fn method(args: &LoginArgs) -> Method {
    if args.browser {
        Method::Browser
    } else {
        Method::Device
    }
}

/// Who the tokens belong to: the identity call the operator makes (Salesforce identity URL,
/// Dataverse WhoAmI), with the access token of the login. `previous`: the org the connection must
/// stay with.
async fn identify(
    ctx: &Ctx,
    spec: &ConnectionSpec,
    tokens: &Tokens,
    previous: Option<&str>,
) -> Result<Session, Failed> {
    let validator = validator(ctx)?;
    let instance_url = tokens
        .instance_url
        .clone()
        .or_else(|| spec.dynamics.as_ref().map(|d| d.environment_url.clone()))
        .unwrap_or_default();
    let grant = validator
        .current(
            spec,
            tokens.access_token.clone(),
            tokens.expires_at,
            &instance_url,
            tokens.identity_url.as_deref(),
        )
        .map_err(|f| Failed(f.message))?;
    validator.identify(spec, &grant, previous).await.map_err(|f| {
        if f.reason == crate::providers::reason::ORG_ID_CHANGED {
            Failed(format!(
                "you signed in to another org or environment than this connection's ({}); nothing was changed. Sign in as a user of {}, or create a new connection for the other org",
                rules::display_text(&f.message),
                previous.unwrap_or("its org")
            ))
        } else {
            Failed(format!("the new tokens do not work: {}", f.message))
        }
    })
}

/// Dynamics without `--environment`: sign in for the Global Discovery Service, let the user pick
/// an environment, then get that environment's tokens with the same sign-in.
async fn discover_and_pick(
    ctx: &Ctx,
    http: &reqwest::Client,
    args: &ConnectArgs,
    base: &url::Url,
) -> Result<(String, Tokens), Failed> {
    let cloud = args.cloud.unwrap_or_default();
    let service = ctx
        .providers
        .discovery_url
        .clone()
        .unwrap_or_else(|| discovery::service_url(cloud).to_string());
    let service =
        rules::parse_base_url(&service, "the Global Discovery Service URL").map_err(|f| Failed(f.message))?;
    let mut target = Target {
        provider: Provider::Dynamics365,
        base: base.clone(),
        tenant: args.tenant.clone().unwrap_or_else(|| "organizations".into()),
        client_id: args.client_id.clone(),
        client_secret: None,
        scopes: Target::entra_scopes(&service),
    };
    let mut stderr = std::io::stderr();
    let tokens = login::login(http, &target, method(&args.login), &mut stderr).await?;
    let environments = discovery::list(http, &service, &tokens.access_token).await?;
    let chosen = pick(&environments)?;
    eprintln!("Using environment {} ({})", chosen.friendly_name, chosen.url);
    let url = chosen.url.trim_end_matches('/').to_string();
    let environment = rules::parse_base_url(&url, "the environment URL").map_err(|f| Failed(f.message))?;
    target.scopes = Target::entra_scopes(&environment);
    let tokens = login::entra_for_resource(http, &target, &tokens.refresh_token).await?;
    Ok((url, tokens))
}

/// Asks which environment (on stderr; the answer from stdin). One environment is taken as is.
fn pick(environments: &[discovery::Environment]) -> Result<&discovery::Environment, Failed> {
    match environments {
        [] => Err(Failed(
            "your account can reach no enabled Dynamics 365 environment in this cloud".into(),
        )),
        [only] => Ok(only),
        many => {
            eprintln!("Dynamics 365 environments your account can reach:");
            for (i, e) in many.iter().enumerate() {
                eprintln!("  {}) {}  {}", i + 1, e.friendly_name, e.url);
            }
            eprint!("Pick one [1-{}]: ", many.len());
            let _ = std::io::stderr().flush();
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let answer = line.trim();
            answer
                .parse::<usize>()
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| many.get(i))
                .or_else(|| discovery::find(many, answer))
                .ok_or_else(|| {
                    Failed(format!(
                        "no environment picked ({answer:?}); pass --environment URL (one of: {})",
                        many.iter().map(|e| e.url.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                })
        }
    }
}

pub async fn connect(ctx: &Ctx, args: ConnectArgs) -> Result<(), Failed> {
    let secret_name = args
        .secret
        .clone()
        .unwrap_or_else(|| format!("{}-credentials", args.name));
    let output = ctx.output;
    if args.dry_run && !matches!(output, Some(Output::Yaml | Output::Json)) {
        return Err(Failed(
            "--dry-run prints manifests: add -o yaml or -o json".into(),
        ));
    }
    // Refuse early what would be refused after the login (and the spec of a known environment).
    let known = connection_spec(&args, &secret_name, args.environment.as_deref())?;
    let connections: Api<Connection> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    if !args.dry_run {
        if connections.get_opt(&args.name).await?.is_some() {
            return Err(Failed(format!(
                "connection {} already exists in namespace {}; to sign in again use `kubectl crm reauthorize {}`",
                args.name, ctx.namespace, args.name
            )));
        }
        if secrets.get_metadata_opt(&secret_name).await?.is_some() {
            return Err(Failed(format!(
                "Secret {secret_name} already exists in namespace {}; pass --secret with another name, or delete it",
                ctx.namespace
            )));
        }
    }

    let http = http(ctx)?;
    let (environment_url, tokens) = match args.provider {
        Provider::Dynamics365 if args.environment.is_none() => {
            let base = entra_base(ctx, args.cloud.unwrap_or_default())?;
            let (url, tokens) = discover_and_pick(ctx, &http, &args, &base).await?;
            (Some(url), tokens)
        }
        _ => {
            let target = target_for(ctx, &known, &args.client_id, None)?;
            let tokens = login::login(&http, &target, method(&args.login), &mut std::io::stderr()).await?;
            (args.environment.clone(), tokens)
        }
    };
    let spec = connection_spec(&args, &secret_name, environment_url.as_deref())?;
    let session = identify(ctx, &spec, &tokens, None).await?;
    eprintln!(
        "Signed in: {} {} as {}",
        org_word(spec.provider),
        session.remote_id,
        rules::display_text(&session.user)
    );

    let mut spec = spec;
    if let Some(version) = &args.login.accept_agreement {
        // Scripts accept up front; if the cluster requires another version, the wait says so.
        spec.agreement = Some(crate::api::AgreementAcceptance {
            version: version.clone(),
            accepted_by: if args.dry_run {
                None
            } else {
                whoami(&ctx.client).await
            },
            accepted_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second())
                    .expect("now is a valid time"),
            )),
        });
    }
    let mut connection = Connection::new(&args.name, spec);
    connection.metadata.namespace = Some(ctx.namespace.clone());
    let secret = credentials_secret(
        &ctx.namespace,
        &secret_name,
        &args.client_id,
        &tokens.refresh_token,
    );
    if args.dry_run {
        return dry_run(&args, &secret_name, &connection, &secret, output);
    }
    secrets
        .create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &secret,
        )
        .await?;
    if let Err(e) = connections
        .create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &connection,
        )
        .await
    {
        // Leave nothing half-made: the Secret is useless without its connection.
        let _ = secrets.delete(&secret_name, &DeleteParams::default()).await;
        return Err(Failed(format!("creating connection {}: {e}", args.name)));
    }
    println!("secret/{secret_name} created");
    println!("connection.crmconnect.io/{} created", args.name);
    finish(
        &ctx.client,
        &connections,
        &args.name,
        Want::Settled,
        args.login.timeout,
        args.login.accept_agreement.as_deref(),
    )
    .await
}

/// Parameters of the plugin's patches.
pub(super) fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

fn org_word(provider: Provider) -> &'static str {
    match provider {
        Provider::Dynamics365 => "environment",
        _ => "org",
    }
}

fn dry_run(
    args: &ConnectArgs,
    secret_name: &str,
    connection: &Connection,
    secret: &Secret,
    output: Option<Output>,
) -> Result<(), Failed> {
    let path = args
        .secret_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{secret_name}.secret.yaml")));
    let output = output.unwrap_or(Output::Yaml);
    let text = render(&secret_manifest(secret), output)?;
    write_private(&path, &text)?;
    eprintln!(
        "The Secret (with the refresh token) was written to {} (mode 0600): seal or encrypt it before it goes to Git.",
        path.display()
    );
    let mut value = serde_json::to_value(connection)?;
    value.as_object_mut().map(|o| o.remove("status"));
    print!("{}", render(&value, output)?);
    Ok(())
}

/// The Secret as a manifest: `apiVersion` and `kind` first.
fn secret_manifest(secret: &Secret) -> serde_json::Value {
    let mut value = serde_json::json!({"apiVersion": "v1", "kind": "Secret"});
    if let (Some(out), Ok(serde_json::Value::Object(fields))) =
        (value.as_object_mut(), serde_json::to_value(secret))
    {
        out.extend(fields);
    }
    value
}

/// Writes `text` to a new file readable by its owner only (it holds a token).
fn write_private(path: &std::path::Path, text: &str) -> Result<(), Failed> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| {
        Failed(format!(
            "cannot create {}: {e} (it must not exist yet)",
            path.display()
        ))
    })?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

pub async fn reauthorize(ctx: &Ctx, args: ReauthorizeArgs) -> Result<(), Failed> {
    let connections: Api<Connection> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let connection = connections.get_opt(&args.name).await?.ok_or_else(|| {
        Failed(format!(
            "connection {} not found in namespace {}",
            args.name, ctx.namespace
        ))
    })?;
    let secret_name = connection.spec.credentials_secret_ref.name.clone();
    let secret = secrets
        .get_opt(&secret_name)
        .await?
        .ok_or_else(|| Failed(format!("the connection's Secret {secret_name} is missing")))?;
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| {
        data.get(key)
            .and_then(|v| crate::providers::secret_text(&v.0).ok().flatten())
            .map(str::to_string)
    };
    let client_id = text(Credentials::CLIENT_ID).ok_or_else(|| {
        Failed(format!(
            "Secret {secret_name} has no client_id: the login needs the connection's OAuth client"
        ))
    })?;
    let client_secret = text(Credentials::CLIENT_SECRET).map(SecretString::from);
    let previous = connection.status.as_ref().and_then(|s| s.remote_id.clone());

    let http = http(ctx)?;
    let target = target_for(ctx, &connection.spec, &client_id, client_secret)?;
    let tokens = login::login(&http, &target, method(&args.login), &mut std::io::stderr()).await?;
    let session = identify(ctx, &connection.spec, &tokens, previous.as_deref()).await?;
    eprintln!(
        "Signed in: {} {} as {}",
        org_word(connection.spec.provider),
        session.remote_id,
        rules::display_text(&session.user)
    );
    // Only the token keys change: the new refresh token, and no stale access token.
    let patch = serde_json::json!({
        "data": {
            Credentials::REFRESH_TOKEN: ByteString(tokens.refresh_token.expose_secret().as_bytes().to_vec()),
            Credentials::ACCESS_TOKEN: null,
        }
    });
    secrets
        .patch(&secret_name, &patch_params(), &Patch::Merge(&patch))
        .await?;
    println!("secret/{secret_name} updated");
    finish(
        &ctx.client,
        &connections,
        &args.name,
        Want::Active,
        args.login.timeout,
        args.login.accept_agreement.as_deref(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(line: &[&str]) -> ConnectArgs {
        let cli = super::super::Cli::try_parse_from(line).unwrap();
        match cli.command {
            super::super::Command::Connect(args) => *args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn salesforce_connect_builds_the_spec_with_the_login_url() {
        let a = args(&[
            "kubectl-crm",
            "connect",
            "acme",
            "--team",
            "sales",
            "--provider",
            "SalesforceSandbox",
            "--client-id",
            "c",
            "--login-url",
            "https://acme.my.salesforce.com/",
            "--display-name",
            "Acme UAT",
        ]);
        let spec = connection_spec(&a, "acme-credentials", None).unwrap();
        assert_eq!(spec.provider, Provider::SalesforceSandbox);
        assert_eq!(
            spec.salesforce.unwrap().login_url.as_deref(),
            Some("https://acme.my.salesforce.com")
        );
        assert_eq!(spec.credentials_secret_ref.name, "acme-credentials");
        assert_eq!(spec.display_name.as_deref(), Some("Acme UAT"));
        assert!(!spec.paused);
    }

    #[test]
    fn dynamics_connect_takes_cloud_tenant_and_the_picked_environment() {
        let a = args(&[
            "kubectl-crm",
            "connect",
            "ops",
            "--team",
            "ops",
            "--provider",
            "Dynamics365",
            "--client-id",
            "c",
            "--cloud",
            "GCCHigh",
            "--tenant",
            "contoso.onmicrosoft.com",
        ]);
        let spec = connection_spec(&a, "s", Some("https://ops.crm.microsoftdynamics.us")).unwrap();
        let d = spec.dynamics.unwrap();
        assert_eq!(d.cloud, Cloud::GccHigh);
        assert_eq!(d.tenant_id, "contoso.onmicrosoft.com");
        assert_eq!(d.environment_url, "https://ops.crm.microsoftdynamics.us");
    }

    #[test]
    fn flags_of_the_other_provider_are_refused() {
        let a = args(&[
            "kubectl-crm",
            "connect",
            "x",
            "--team",
            "t",
            "--provider",
            "Dynamics365",
            "--client-id",
            "c",
            "--login-url",
            "https://x",
        ]);
        assert!(
            connection_spec(&a, "s", None)
                .unwrap_err()
                .contains("--login-url is for Salesforce")
        );
        let a = args(&[
            "kubectl-crm",
            "connect",
            "x",
            "--team",
            "t",
            "--provider",
            "SalesforceProduction",
            "--client-id",
            "c",
            "--cloud",
            "GCC",
        ]);
        assert!(
            connection_spec(&a, "s", None)
                .unwrap_err()
                .contains("for Dynamics 365")
        );
        let bad = super::super::Cli::try_parse_from([
            "kubectl-crm",
            "connect",
            "x",
            "--team",
            "t",
            "--provider",
            "Salesforce",
            "--client-id",
            "c",
        ]);
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("use SalesforceProduction, SalesforceSandbox or Dynamics365")
        );
    }

    #[test]
    fn the_secret_is_labelled_for_the_operator_and_holds_the_token() {
        let secret = credentials_secret("ns", "acme-credentials", "client", &SecretString::from("rt"));
        assert_eq!(secret.metadata.labels.unwrap()[CREDENTIALS_LABEL], "true");
        let data = secret.data.unwrap();
        assert_eq!(data["refresh_token"].0, b"rt");
        assert_eq!(data["client_id"].0, b"client");
        let manifest = secret_manifest(&credentials_secret("ns", "n", "c", &SecretString::from("rt")));
        assert_eq!(manifest["kind"], "Secret");
        assert_eq!(manifest["apiVersion"], "v1");
    }
}
