//! `connection-operator check-credentials -f connection.yaml [-s secret.yaml]`: validates one
//! connection's credentials from local files, without a cluster, and prints the identity or the
//! classified failure. Exit code 0 valid, 1 permanent or configuration failure, 2 transient.
//!
//! A refresh may rotate the refresh token (with Salesforce rotation the old one dies at once), so a
//! new refresh token is written back into the Secret file it came from: only that one key's value is
//! edited in place (comments, order and other documents are kept), then the file is replaced
//! atomically (temp file + rename). If that is impossible, the new token goes to a separate 0600
//! file and the command says so loudly. Tokens are never printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

mod manifests;
mod secret_file;
mod yaml_edit;

use manifests::{find_connection, find_secret};
use secret_file::{save_token_file, write_atomic};
use yaml_edit::update_secret_text;

use crate::api::Provider;
use crate::cli::{CliError, LogFormat};
use crate::providers::{Credentials, Failure, FailureKind, Session, Validator, ValidatorConfig};

/// Flags of `check-credentials`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The Connection manifest. It may hold several YAML documents (e.g. the Secret too); the
    /// Connection is picked by kind.
    #[arg(short = 'f', long = "filename")]
    pub connection_file: PathBuf,
    /// The Secret manifest (default: the Secret named by spec.credentialsSecretRef in the -f file).
    /// A rotated refresh token is written back into this file.
    #[arg(short = 's', long = "secret")]
    pub secret_file: Option<PathBuf>,
    /// Which Connection, when the file holds several.
    #[arg(long)]
    pub name: Option<String>,
    /// The org or environment ID recorded before: a different one is reported as OrgIdChanged.
    #[arg(long)]
    pub expected_remote_id: Option<String>,
    /// Timeout of one provider request.
    #[arg(long, default_value = "20s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
    /// Override the Entra ID authority (testing only, e.g. http://127.0.0.1:8089).
    #[arg(long, env = "ENTRA_AUTHORITY_OVERRIDE", hide = true)]
    pub entra_authority_override: Option<String>,
    /// A host or domain credentials may be sent to besides the provider hosts, as for `run`
    /// (loopback hosts are always allowed here: the files are your own).
    #[arg(
        long = "allow-provider-domain",
        env = "ALLOW_PROVIDER_DOMAINS",
        value_delimiter = ','
    )]
    pub allow_provider_domains: Vec<String>,
    /// PEM file of CA certificates trusted in addition to the built-in roots (a corporate TLS proxy,
    /// or a test CA).
    #[arg(long, env = "EXTRA_CA_BUNDLE")]
    pub extra_ca_bundle: Option<PathBuf>,
}

fn input_error(message: String) -> CliError {
    CliError::CheckFailed {
        message,
        exit_code: 1,
    }
}

/// Runs the command.
pub async fn run(args: CheckArgs, log_format: LogFormat) -> Result<(), CliError> {
    crate::cli::init_logging(log_format);
    let connection_text = read(&args.connection_file)?;
    let connection = find_connection(&connection_text, args.name.as_deref())
        .map_err(|e| input_error(format!("{}: {e}", args.connection_file.display())))?;
    let name = connection.metadata.name.clone().unwrap_or_default();
    let spec = connection.spec;
    let secret_name = spec.credentials_secret_ref.name.clone();

    let secret_path = args
        .secret_file
        .clone()
        .unwrap_or_else(|| args.connection_file.clone());
    let secret_text = if args.secret_file.is_some() {
        read(&secret_path)?
    } else {
        connection_text
    };
    let title = format!("Connection {name} ({})", spec.provider);
    let (data, secret_name) = match find_secret(&secret_text, &secret_name, args.secret_file.is_some()) {
        Ok(found) => found,
        Err(e) => {
            let failure = Failure::secret_missing(&secret_name);
            print_failure(&title, &failure);
            return Err(input_error(format!("{}: {e}", secret_path.display())));
        }
    };
    let creds = match Credentials::from_secret_data(&secret_name, &data) {
        Ok(creds) => creds,
        Err(failure) => {
            print_failure(&title, &failure);
            return Err(check_failed(&failure));
        }
    };

    let validator = Validator::new(ValidatorConfig {
        request_timeout: args.timeout,
        connect_timeout: args.timeout.min(Duration::from_secs(10)),
        entra_authority_override: args.entra_authority_override.clone(),
        extra_roots: crate::cli::read_extra_roots(args.extra_ca_bundle.as_deref())
            .map_err(|e| input_error(e.to_string()))?,
        hosts: crate::providers::rules::HostPolicy {
            extra_domains: args.allow_provider_domains.clone(),
            allow_loopback: true,
        },
        ..ValidatorConfig::default()
    })
    .map_err(|e| input_error(e.to_string()))?;
    let result = validator
        .validate(&spec, &creds, args.expected_remote_id.as_deref())
        .await;

    // The new refresh token first: with Salesforce rotation the one in the file is already dead.
    let rotated = match &result {
        Ok(session) => session.rotated_refresh_token.clone(),
        Err(failure) => failure.rotated_refresh_token.clone(),
    };
    let persisted = match rotated {
        None => true,
        Some(token) => persist_rotated(&secret_path, &secret_text, &secret_name, spec.provider, &token),
    };

    let outcome = match &result {
        Ok(session) => {
            print_session(&title, spec.provider, session);
            Ok(())
        }
        Err(failure) => {
            print_failure(&title, failure);
            Err(check_failed(failure))
        }
    };
    if !persisted && spec.provider != Provider::Dynamics365 {
        return Err(CliError::CheckFailed {
            message: format!(
                "the rotated refresh token could not be written to {}; the token in that file is dead (see the warnings above)",
                secret_path.display()
            ),
            exit_code: 1,
        });
    }
    outcome
}

/// The largest input file read (a Connection and its Secret are a few KiB; `-f /dev/zero` must not
/// grow until out of memory).
const MAX_INPUT_BYTES: u64 = 1024 * 1024;

fn read(path: &Path) -> Result<String, CliError> {
    use std::io::Read;
    let cannot = |e: std::io::Error| input_error(format!("cannot read {}: {e}", path.display()));
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(input_error(format!(
            "{} is larger than {} KiB: not a Connection/Secret manifest",
            path.display(),
            MAX_INPUT_BYTES / 1024
        )));
    }
    String::from_utf8(bytes).map_err(|_| input_error(format!("{} is not UTF-8 text", path.display())))
}

fn check_failed(failure: &Failure) -> CliError {
    CliError::CheckFailed {
        message: format!("credentials not valid: {} ({})", failure.reason, failure.kind),
        exit_code: match failure.kind {
            FailureKind::Transient => 2,
            FailureKind::Permanent | FailureKind::Configuration => 1,
        },
    }
}

fn print_session(title: &str, provider: Provider, session: &Session) {
    let id_label = match provider {
        Provider::Dynamics365 => "environment ID",
        _ => "org ID",
    };
    println!("Credentials valid: {title}");
    println!("  {id_label:<15} {}", session.remote_id);
    println!("  {:<15} {}", "user", session.user);
    println!("  {:<15} {}", "instance URL", session.instance_url);
    if let Some(expires) = session.expires_at {
        println!("  {:<15} {expires}", "token expires");
    }
}

fn print_failure(title: &str, failure: &Failure) {
    println!("Credentials NOT valid: {title}");
    println!("  {:<15} {}", "kind", failure.kind);
    println!("  {:<15} {}", "reason", failure.reason);
    println!("  {:<15} {}", "message", failure.message);
    if let Some(after) = failure.retry_after {
        println!("  {:<15} {}s", "retry after", after.as_secs());
    }
    if failure.kind == FailureKind::Transient {
        println!(
            "  (transient: the provider could not answer; the connection keeps its state — try again later)"
        );
    }
}

/// Writes the new refresh token into the Secret file; on failure, into a 0600 file. Returns whether
/// the Secret file now holds it. Never prints the token.
fn persist_rotated(
    path: &Path,
    text: &str,
    secret_name: &str,
    provider: Provider,
    token: &SecretString,
) -> bool {
    let why = match provider {
        Provider::Dynamics365 => "Entra ID issues a new refresh token on every refresh; keep the newest",
        _ => "Salesforce refresh token rotation is on: the old refresh token is no longer valid",
    };
    let result = update_secret_text(
        text,
        secret_name,
        Credentials::REFRESH_TOKEN,
        token.expose_secret(),
    )
    .and_then(|edit| {
        write_atomic(path, &edit.text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(edit)
    });
    match result {
        Ok(edit) => {
            let how = if edit.in_place {
                "edited in place"
            } else {
                "the Secret document was re-serialized: its comments were not kept"
            };
            println!(
                "Note: the provider issued a new refresh token ({why}). It was written to key refresh_token of Secret {secret_name} in {} ({how}). Apply that file to keep the cluster's copy current.",
                path.display()
            );
            true
        }
        Err(error) => {
            let dead = match provider {
                Provider::Dynamics365 => {
                    "The refresh token in the file still works for now, but keep the newest one"
                }
                _ => "THE REFRESH TOKEN IN THE FILE IS NOW DEAD",
            };
            eprintln!("WARNING: the provider issued a NEW refresh token ({why}).");
            eprintln!("WARNING: {dead}; the Secret file could not be updated: {error}.");
            match save_token_file(path, secret_name, token) {
                Ok(saved) => eprintln!(
                    "WARNING: the new refresh token was saved to {} (mode 0600). Put it into key refresh_token of Secret {secret_name}, then delete that file.",
                    saved.display()
                ),
                Err(e) => eprintln!(
                    "WARNING: the new refresh token could not be saved anywhere either ({e}); re-authorize the connection to get a new one."
                ),
            }
            false
        }
    }
}
