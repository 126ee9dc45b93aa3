//! `connection-operator check-credentials -f connection.yaml [-s secret.yaml]`: validates one
//! connection's credentials from local files, without a cluster, and prints the identity or the
//! classified failure. Exit code 0 valid, 1 permanent or configuration failure, 2 transient.
//!
//! A refresh may rotate the refresh token (with Salesforce rotation the old one dies at once), so a
//! new refresh token is written back into the Secret file it came from: only that one key's value is
//! edited in place (comments, order and other documents are kept), then the file is replaced
//! atomically (temp file + rename). If that is impossible, the new token goes to a separate 0600
//! file and the command says so loudly. Tokens are never printed.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use secrecy::{ExposeSecret, SecretString};

use crate::api::{Connection, Provider};
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

/// YAML documents of a file (empty ones skipped).
fn documents(text: &str) -> Result<Vec<serde_json::Value>, String> {
    let docs =
        serde_saphyr::from_multiple::<serde_json::Value>(text).map_err(|e| format!("invalid YAML: {e}"))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn kind_of(doc: &serde_json::Value) -> Option<&str> {
    doc.get("kind").and_then(|k| k.as_str())
}

fn name_of(doc: &serde_json::Value) -> Option<&str> {
    doc.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
}

fn find_connection(text: &str, name: Option<&str>) -> Result<Connection, String> {
    let docs = documents(text)?;
    let connections: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| kind_of(d) == Some("Connection"))
        .filter(|d| name.is_none() || name_of(d) == name)
        .collect();
    let doc = match connections.as_slice() {
        [one] => *one,
        [] => {
            return Err(format!(
                "no Connection{} found",
                name.map(|n| format!(" named {n}")).unwrap_or_default()
            ));
        }
        many => {
            let names: Vec<&str> = many.iter().filter_map(|d| name_of(d)).collect();
            return Err(format!(
                "several Connections ({}); pick one with --name",
                names.join(", ")
            ));
        }
    };
    serde_json::from_value(doc.clone()).map_err(|e| format!("invalid Connection: {e}"))
}

/// The Secret named `name` (or, when `lenient`, the only Secret of the file), as decoded data
/// (`stringData` merged over `data`, as the API server does), and its name.
fn find_secret(
    text: &str,
    name: &str,
    lenient: bool,
) -> Result<(BTreeMap<String, ByteString>, String), String> {
    let docs = documents(text)?;
    let secrets: Vec<&serde_json::Value> = docs.iter().filter(|d| kind_of(d) == Some("Secret")).collect();
    let doc = secrets
        .iter()
        .find(|d| name_of(d) == Some(name))
        .or_else(|| {
            if lenient && secrets.len() == 1 {
                secrets.first()
            } else {
                None
            }
        })
        .ok_or_else(|| format!("no Secret named {name} found"))?;
    let secret: Secret =
        serde_json::from_value((*doc).clone()).map_err(|e| format!("invalid Secret: {e}"))?;
    let mut data = secret.data.unwrap_or_default();
    for (key, value) in secret.string_data.unwrap_or_default() {
        data.insert(key, ByteString(value.into_bytes()));
    }
    Ok((data, secret.metadata.name.unwrap_or_else(|| name.to_string())))
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

/// Saves the token to a new 0600 file next to the Secret file, or in the temp directory.
fn save_token_file(path: &Path, secret_name: &str, token: &SecretString) -> std::io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let file_name = format!("{secret_name}.refresh_token.{stamp}.new");
    let mut candidates = Vec::new();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        candidates.push(dir.join(&file_name));
    } else {
        candidates.push(PathBuf::from(&file_name));
    }
    candidates.push(std::env::temp_dir().join(&file_name));
    let mut last_error = None;
    for candidate in candidates {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(&candidate) {
            Ok(mut file) => {
                file.write_all(token.expose_secret().as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()?;
                return Ok(candidate);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("no place to save the token")))
}

/// Replaces `path` atomically: a temp file in the same directory (same permissions), fsync, rename.
fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    // Write through symlinks to the real file (falls back to the path itself).
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{nanos}", std::process::id()));
    let permissions = std::fs::metadata(&target).map(|m| m.permissions()).ok();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(contents.as_bytes())?;
        if let Some(permissions) = permissions {
            file.set_permissions(permissions)?;
        }
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &target)?;
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The result of editing a Secret file's text.
#[derive(Debug)]
struct Edit {
    text: String,
    /// True when only the key's value changed; false when the document had to be re-serialized.
    in_place: bool,
}

/// Sets `key` of Secret `secret_name` in a (multi-document) YAML text: in place in `stringData`
/// and/or `data` (base64) wherever the key is, keeping everything else byte for byte; if the layout
/// is too unusual for that (flow mappings, JSON), re-serializes that one document. The result is
/// verified by parsing it back.
fn update_secret_text(text: &str, secret_name: &str, key: &str, value: &str) -> Result<Edit, String> {
    let docs = split_documents(text);
    let secrets: Vec<usize> = docs
        .iter()
        .enumerate()
        .filter(|(_, d)| {
            documents(&d.body(text))
                .ok()
                .and_then(|v| v.into_iter().next())
                .is_some_and(|v| kind_of(&v) == Some("Secret"))
        })
        .map(|(i, _)| i)
        .collect();
    let index = secrets
        .iter()
        .copied()
        .find(|i| {
            documents(&docs[*i].body(text))
                .ok()
                .and_then(|v| v.into_iter().next())
                .is_some_and(|v| name_of(&v) == Some(secret_name))
        })
        .or_else(|| (secrets.len() == 1).then(|| secrets[0]))
        .ok_or_else(|| format!("no Secret named {secret_name} in the file"))?;
    let doc = &docs[index];
    let body = doc.body(text);
    let before = secret_values(&body)?;

    let (new_body, in_place) = match edit_in_place(&body, key, value) {
        Some(edited) if verify(&edited, &before, key, value) => (edited, true),
        _ => {
            let reserialized = reserialize(&body, key, value)?;
            if !verify(&reserialized, &before, key, value) {
                return Err("the edited Secret did not read back as expected".into());
            }
            (reserialized, false)
        }
    };
    let mut out = String::with_capacity(text.len() + 64);
    out.push_str(&text[..doc.body_start]);
    out.push_str(&new_body);
    out.push_str(&text[doc.end..]);
    Ok(Edit { text: out, in_place })
}

/// A document of a YAML stream: `start..end` in bytes, the body after its `---` line (if any).
struct Doc {
    body_start: usize,
    end: usize,
}

impl Doc {
    fn body(&self, text: &str) -> String {
        text[self.body_start..self.end].to_string()
    }
}

fn is_separator(line: &str) -> bool {
    let line = line.trim_end_matches(['\r', '\n']);
    line == "---" || line.starts_with("--- ") || line.starts_with("---\t") || line == "..."
}

fn split_documents(text: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    let mut offset = 0;
    let mut body_start = 0;
    for line in text.split_inclusive('\n') {
        if is_separator(line) {
            if offset > 0 || !docs.is_empty() {
                docs.push(Doc {
                    body_start,
                    end: offset,
                });
            }
            body_start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(Doc {
        body_start,
        end: text.len(),
    });
    docs
}

/// Effective string values of a Secret document (stringData over data).
fn secret_values(body: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let secret: Secret = serde_saphyr::from_str(body).map_err(|e| format!("invalid Secret: {e}"))?;
    let mut values: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in secret.string_data.unwrap_or_default() {
        values.insert(k, v.into_bytes());
    }
    Ok(values)
}

fn verify(body: &str, before: &BTreeMap<String, Vec<u8>>, key: &str, value: &str) -> bool {
    let Ok(after) = secret_values(body) else {
        return false;
    };
    let mut expected = before.clone();
    expected.insert(key.to_string(), value.as_bytes().to_vec());
    after == expected
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank_or_comment(line: &str) -> bool {
    let trimmed = line.trim();
    trimmed.is_empty() || trimmed.starts_with('#')
}

fn line_ending(line: &str) -> &str {
    if line.ends_with("\r\n") {
        "\r\n"
    } else if line.ends_with('\n') {
        "\n"
    } else {
        ""
    }
}

/// Splits `key: value` (key plain or quoted) into (key text as written, rest after the colon).
fn split_key(content: &str) -> Option<(&str, &str, String)> {
    let (key_text, key) = if let Some(rest) = content.strip_prefix('"') {
        let end = rest.find('"')?;
        (&content[..end + 2], rest[..end].to_string())
    } else if let Some(rest) = content.strip_prefix('\'') {
        let end = rest.find('\'')?;
        (&content[..end + 2], rest[..end].to_string())
    } else {
        let end = content.find(':')?;
        (&content[..end], content[..end].trim_end().to_string())
    };
    let after = content[key_text.len()..].trim_start_matches(' ');
    let value = after.strip_prefix(':')?;
    if !(value.is_empty() || value.starts_with([' ', '\t', '\r', '\n'])) {
        return None;
    }
    Some((key_text.trim_end(), value, key))
}

/// The ` # comment` after a single-line scalar value, if any (kept when the value is replaced).
fn trailing_comment(value: &str) -> &str {
    let v = value.trim_end_matches(['\r', '\n']);
    let trimmed = v.trim_start();
    let offset = v.len() - trimmed.len();
    let after_scalar = if let Some(rest) = trimmed.strip_prefix('"') {
        let mut escaped = false;
        let mut end = None;
        for (i, c) in rest.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        match end {
            Some(i) => offset + 1 + i + 1,
            None => return "",
        }
    } else if let Some(rest) = trimmed.strip_prefix('\'') {
        match rest.find('\'') {
            Some(i) => offset + 1 + i + 1,
            None => return "",
        }
    } else {
        match v.find(" #") {
            Some(i) => i,
            None => return "",
        }
    };
    let rest = &v[after_scalar..];
    if rest.trim_start().starts_with('#') {
        rest
    } else {
        ""
    }
}

/// Edits the key's value in `stringData` and/or `data` blocks; `None` if the layout is not a plain
/// block mapping or the key was not found.
fn edit_in_place(body: &str, key: &str, value: &str) -> Option<String> {
    let lines: Vec<&str> = body.split_inclusive('\n').collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut edited = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        out.push(line.to_string());
        i += 1;
        if indentation(line) != 0 || is_blank_or_comment(line) {
            continue;
        }
        let Some((_, rest, section)) = split_key(line) else {
            continue;
        };
        let encode: fn(&str) -> String = match section.as_str() {
            "stringData" => |v| serde_json::to_string(v).expect("a string serializes"),
            "data" => |v| base64::engine::general_purpose::STANDARD.encode(v.as_bytes()),
            _ => continue,
        };
        let rest = rest.trim();
        if !(rest.is_empty() || rest.starts_with('#')) {
            // Flow mapping (`data: {…}`) or something else: not edited in place.
            return None;
        }
        // The block: following lines that are blank, comments, or indented.
        let mut child_indent = None;
        while i < lines.len() {
            let line = lines[i];
            if !is_blank_or_comment(line) && indentation(line) == 0 {
                break;
            }
            if is_blank_or_comment(line) {
                out.push(line.to_string());
                i += 1;
                continue;
            }
            let indent = *child_indent.get_or_insert(indentation(line));
            if indentation(line) != indent {
                out.push(line.to_string());
                i += 1;
                continue;
            }
            let content = &line[indent..];
            match split_key(content) {
                Some((key_text, old_value, name)) if name == key => {
                    let comment = trailing_comment(old_value);
                    let comment = if comment.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", comment.trim_start())
                    };
                    out.push(format!(
                        "{}{key_text}: {}{comment}{}",
                        " ".repeat(indent),
                        encode(value),
                        line_ending(line)
                    ));
                    edited = true;
                    i += 1;
                    // Drop the old value's continuation lines (block scalars, multi-line strings).
                    while i < lines.len() && (indentation(lines[i]) > indent || lines[i].trim().is_empty()) {
                        if lines[i].trim().is_empty() {
                            // Keep blank lines that end the block rather than belong to the value.
                            let next_is_deeper = lines[i + 1..]
                                .iter()
                                .find(|l| !l.trim().is_empty())
                                .is_some_and(|l| indentation(l) > indent);
                            if !next_is_deeper {
                                break;
                            }
                        }
                        i += 1;
                    }
                }
                _ => {
                    out.push(line.to_string());
                    i += 1;
                }
            }
        }
    }
    edited.then(|| out.concat())
}

/// Fallback: parse the document, set the key where it is (stringData and/or data), serialize it.
fn reserialize(body: &str, key: &str, value: &str) -> Result<String, String> {
    let mut doc: serde_json::Value =
        serde_saphyr::from_str(body).map_err(|e| format!("invalid YAML: {e}"))?;
    let mut set = false;
    if let Some(map) = doc.get_mut("stringData").and_then(|m| m.as_object_mut())
        && map.contains_key(key)
    {
        map.insert(key.into(), value.into());
        set = true;
    }
    if let Some(map) = doc.get_mut("data").and_then(|m| m.as_object_mut())
        && map.contains_key(key)
    {
        map.insert(
            key.into(),
            base64::engine::general_purpose::STANDARD
                .encode(value.as_bytes())
                .into(),
        );
        set = true;
    }
    if !set {
        return Err(format!("the Secret has no key {key} to update"));
    }
    serde_saphyr::to_string(&doc).map_err(|e| format!("cannot serialize the Secret: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &str = "# A Salesforce org.\n# Replace the placeholders.\napiVersion: v1\nkind: Secret\nmetadata:\n  name: acme-creds   # the credentials\ntype: Opaque\nstringData:\n  client_id: \"3MVG9-key\"\n  refresh_token: \"old-token\"   # from the OAuth flow\n  client_secret: 'shh'\n---\napiVersion: crmconnect.io/v1alpha1\nkind: Connection\nmetadata:\n  name: acme\nspec:\n  team: sales\n  provider: SalesforceProduction\n  credentialsSecretRef:\n    name: acme-creds\n";

    #[test]
    fn string_data_value_is_edited_in_place_keeping_everything_else() {
        let edit = update_secret_text(MULTI, "acme-creds", "refresh_token", "new-token").unwrap();
        assert!(edit.in_place);
        let expected = MULTI.replace(
            "  refresh_token: \"old-token\"   # from the OAuth flow\n",
            "  refresh_token: \"new-token\" # from the OAuth flow\n",
        );
        assert_eq!(edit.text, expected);
    }

    #[test]
    fn data_value_is_base64_and_other_secrets_are_untouched() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let text = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: other\ndata:\n  refresh_token: {}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: mine\ndata:\n  client_id: {}\n  refresh_token: {}\n",
            b64("other-token"),
            b64("cid"),
            b64("old-token")
        );
        let edit = update_secret_text(&text, "mine", "refresh_token", "new+token/x").unwrap();
        assert!(edit.in_place);
        let expected = text.replacen(
            &format!("  refresh_token: {}\n", b64("old-token")),
            &format!("  refresh_token: {}\n", b64("new+token/x")),
            1,
        );
        assert_eq!(edit.text, expected);
        assert!(edit.text.contains(&b64("other-token")));
    }

    #[test]
    fn key_in_both_data_and_string_data_is_updated_in_both() {
        let text = "kind: Secret\napiVersion: v1\nmetadata:\n  name: s\ndata:\n  refresh_token: b2xk\nstringData:\n  refresh_token: old\n";
        let edit = update_secret_text(text, "s", "refresh_token", "new").unwrap();
        assert_eq!(
            edit.text,
            "kind: Secret\napiVersion: v1\nmetadata:\n  name: s\ndata:\n  refresh_token: bmV3\nstringData:\n  refresh_token: \"new\"\n"
        );
    }

    #[test]
    fn block_scalar_values_and_crlf_are_handled() {
        let text = "kind: Secret\r\napiVersion: v1\r\nmetadata:\r\n  name: s\r\nstringData:\r\n  refresh_token: |\r\n    old-token\r\n\r\n  client_id: cid\r\n";
        let edit = update_secret_text(text, "s", "refresh_token", "new-token").unwrap();
        assert!(edit.in_place);
        assert_eq!(
            edit.text,
            "kind: Secret\r\napiVersion: v1\r\nmetadata:\r\n  name: s\r\nstringData:\r\n  refresh_token: \"new-token\"\r\n\r\n  client_id: cid\r\n"
        );
    }

    #[test]
    fn tokens_needing_escapes_read_back_exactly() {
        let text = "kind: Secret\napiVersion: v1\nmetadata:\n  name: s\nstringData:\n  refresh_token: old\n";
        let value = "a\"b\\c: #d";
        let edit = update_secret_text(text, "s", "refresh_token", value).unwrap();
        assert!(edit.in_place);
        assert_eq!(
            secret_values(&edit.text).unwrap()["refresh_token"],
            value.as_bytes()
        );
    }

    #[test]
    fn flow_mappings_fall_back_to_reserializing_that_document_only() {
        let text = "# keep me\nkind: Connection\nmetadata: {name: c}\n---\nkind: Secret\napiVersion: v1\nmetadata: {name: s}\nstringData: {refresh_token: old, client_id: cid}\n";
        let edit = update_secret_text(text, "s", "refresh_token", "new").unwrap();
        assert!(!edit.in_place);
        assert!(
            edit.text
                .starts_with("# keep me\nkind: Connection\nmetadata: {name: c}\n---\n"),
            "{}",
            edit.text
        );
        let (_, second) = edit.text.split_once("---\n").unwrap();
        let values = secret_values(second).unwrap();
        assert_eq!(values["refresh_token"], b"new");
        assert_eq!(values["client_id"], b"cid");
    }

    #[test]
    fn missing_secret_is_an_error() {
        assert!(
            update_secret_text(MULTI, "nope", "refresh_token", "x").is_ok(),
            "the only Secret is used"
        );
        let two = format!(
            "{MULTI}---\nkind: Secret\napiVersion: v1\nmetadata:\n  name: b\nstringData:\n  refresh_token: y\n"
        );
        assert!(update_secret_text(&two, "nope", "refresh_token", "x").is_err());
    }

    #[test]
    fn finds_connection_and_secret_by_kind() {
        let connection = find_connection(MULTI, None).unwrap();
        assert_eq!(connection.spec.credentials_secret_ref.name, "acme-creds");
        let (data, name) = find_secret(MULTI, "acme-creds", false).unwrap();
        assert_eq!(name, "acme-creds");
        assert_eq!(data["refresh_token"].0, b"old-token");
        assert_eq!(data["client_secret"].0, b"shh");
        assert!(find_secret(MULTI, "other", false).is_err());
        assert!(find_secret(MULTI, "other", true).is_ok());
        assert!(find_connection(MULTI, Some("zzz")).is_err());
    }

    #[test]
    fn trailing_comments_are_found() {
        assert_eq!(trailing_comment(" \"a # b\"  # c\n"), "  # c");
        assert_eq!(trailing_comment(" 'a'# c"), "# c");
        assert_eq!(trailing_comment(" plain # c"), " # c");
        assert_eq!(trailing_comment(" plain#notacomment"), "");
        assert_eq!(trailing_comment(" \"unterminated"), "");
    }
}
