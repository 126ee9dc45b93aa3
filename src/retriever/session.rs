//! The session a retriever pod holds: what the operator wrote into the connection's `<name>-session`
//! Secret, read from the files the kubelet mounts (one file per key). [`parse`] is pure; [`load`]
//! reads the files and parses them.

use crate::api::Provider;
use crate::controller::children::session_keys;
use k8s_openapi::jiff::Timestamp;
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A session read from the mounted Secret. `Debug` redacts the access token.
#[derive(Debug)]
pub struct Session {
    pub access_token: SecretString,
    /// Where the CRM's API lives (Salesforce instance URL, Dataverse environment URL).
    pub instance_url: url::Url,
    pub provider: Provider,
    /// When the access token expires, if the provider said.
    pub expires_at: Option<Timestamp>,
    /// The operator's extra CA bundle (PEM), when it passed one.
    pub ca_bundle: Option<Vec<u8>>,
    /// SHA-256 of every file's content (hex): tells a changed session from the same one re-read,
    /// without keeping or comparing the token itself.
    pub fingerprint: String,
}

/// Why the session could not be read. Messages name the file and never include the token.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot read the session file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the session file {path} is missing")]
    Missing { path: PathBuf },
    #[error("the session file {path} is empty")]
    Empty { path: PathBuf },
    #[error("the session file {path} is not UTF-8 text")]
    NotText { path: PathBuf },
    #[error("the session file {path} does not hold an http(s) URL: {detail}")]
    InvalidUrl { path: PathBuf, detail: String },
    #[error(
        "the session file {path} holds {value:?}, not a provider (SalesforceProduction, SalesforceSandbox or Dynamics365)"
    )]
    UnknownProvider { path: PathBuf, value: String },
    #[error("the session file {path} holds {value:?}, not an RFC 3339 time")]
    InvalidTime { path: PathBuf, value: String },
}

/// Keys the session Secret always has; a missing one is an error.
const REQUIRED: [&str; 3] = [
    session_keys::ACCESS_TOKEN,
    session_keys::INSTANCE_URL,
    session_keys::PROVIDER,
];
/// Keys it has only sometimes.
const OPTIONAL: [&str; 2] = [session_keys::EXPIRES_AT, session_keys::CA_BUNDLE];

/// Reads the session files in `dir` (the Secret volume) and parses them.
pub async fn load(dir: &Path) -> Result<Session, SessionError> {
    let mut files = BTreeMap::new();
    for key in REQUIRED.iter().chain(OPTIONAL.iter()) {
        let path = dir.join(key);
        match tokio::fs::read(&path).await {
            Ok(content) => {
                files.insert(key.to_string(), content);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && OPTIONAL.contains(key) => {}
            Err(source) => return Err(SessionError::Read { path, source }),
        }
    }
    parse(dir, &files)
}

/// Parses the contents of the session files (key → content). `dir` only names files in errors.
/// Values are trimmed.
pub fn parse(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<Session, SessionError> {
    let text = |key: &str| -> Result<Option<String>, SessionError> {
        let path = dir.join(key);
        let Some(bytes) = files.get(key) else {
            return Ok(None);
        };
        let text = std::str::from_utf8(bytes).map_err(|_| SessionError::NotText { path: path.clone() })?;
        match text.trim() {
            "" => Err(SessionError::Empty { path }),
            t => Ok(Some(t.to_string())),
        }
    };
    let required = |key: &str| -> Result<String, SessionError> {
        text(key)?.ok_or_else(|| SessionError::Missing { path: dir.join(key) })
    };

    let access_token = SecretString::from(required(session_keys::ACCESS_TOKEN)?);
    let url_path = dir.join(session_keys::INSTANCE_URL);
    let instance_url = url::Url::parse(&required(session_keys::INSTANCE_URL)?)
        .map_err(|e| SessionError::InvalidUrl {
            path: url_path.clone(),
            detail: e.to_string(),
        })
        .and_then(|url| match url.scheme() {
            "https" | "http" => Ok(url),
            other => Err(SessionError::InvalidUrl {
                path: url_path,
                detail: format!("scheme {other}"),
            }),
        })?;
    let provider_value = required(session_keys::PROVIDER)?;
    let provider = provider_value
        .parse()
        .map_err(|_| SessionError::UnknownProvider {
            path: dir.join(session_keys::PROVIDER),
            value: provider_value.clone(),
        })?;
    let expires_at = match text(session_keys::EXPIRES_AT)? {
        None => None,
        Some(value) => Some(
            value
                .parse::<Timestamp>()
                .map_err(|_| SessionError::InvalidTime {
                    path: dir.join(session_keys::EXPIRES_AT),
                    value,
                })?,
        ),
    };

    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for (key, content) in files {
        context.update(key.as_bytes());
        context.update(&[0]);
        context.update(&(content.len() as u64).to_be_bytes());
        context.update(content);
    }
    let fingerprint = context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let ca_bundle = files.get(session_keys::CA_BUNDLE).cloned();
    Ok(Session {
        access_token,
        instance_url,
        provider,
        expires_at,
        ca_bundle,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn complete() -> BTreeMap<String, Vec<u8>> {
        files(&[
            ("access_token", "00Dxx!AQ-secret-token\n"),
            ("instance_url", "https://acme.my.salesforce.com"),
            ("provider", "SalesforceProduction"),
            ("expires_at", "2030-01-02T03:04:05Z"),
        ])
    }

    fn dir() -> &'static Path {
        Path::new("/var/run/crmconnect/session")
    }

    #[test]
    fn a_complete_session_parses_with_trimmed_values() {
        let s = parse(dir(), &complete()).unwrap();
        assert_eq!(s.access_token.expose_secret(), "00Dxx!AQ-secret-token");
        assert_eq!(s.instance_url.as_str(), "https://acme.my.salesforce.com/");
        assert_eq!(s.provider, Provider::SalesforceProduction);
        assert_eq!(s.expires_at.unwrap().to_string(), "2030-01-02T03:04:05Z");
    }

    #[test]
    fn expiry_is_optional() {
        let mut f = complete();
        f.remove("expires_at");
        assert_eq!(parse(dir(), &f).unwrap().expires_at, None);
    }

    #[test]
    fn a_missing_required_file_is_named() {
        for key in ["access_token", "instance_url", "provider"] {
            let mut f = complete();
            f.remove(key);
            let err = parse(dir(), &f).unwrap_err().to_string();
            assert!(
                err.contains(&format!("/var/run/crmconnect/session/{key}")),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn bad_values_are_rejected_naming_the_file() {
        let cases = [
            ("access_token", "   \n", "is empty"),
            ("instance_url", "not a url", "does not hold an http(s) URL"),
            ("instance_url", "ftp://x", "scheme ftp"),
            ("provider", "Hubspot", "not a provider"),
            ("expires_at", "tomorrow", "not an RFC 3339 time"),
        ];
        for (key, value, expected) in cases {
            let mut f = complete();
            f.insert(key.to_string(), value.as_bytes().to_vec());
            let err = parse(dir(), &f).unwrap_err().to_string();
            assert!(
                err.contains(expected) && err.contains(key),
                "{key}={value:?}: {err}"
            );
        }
        let mut f = complete();
        f.insert("access_token".into(), vec![0xff, 0xfe]);
        assert!(parse(dir(), &f).unwrap_err().to_string().contains("not UTF-8"));
    }

    #[test]
    fn the_token_never_shows_in_debug_or_errors() {
        let s = parse(dir(), &complete()).unwrap();
        assert!(!format!("{s:?}").contains("secret-token"));
        let mut f = complete();
        f.insert("provider".into(), b"x".to_vec());
        assert!(!parse(dir(), &f).unwrap_err().to_string().contains("secret-token"));
    }

    #[test]
    fn the_fingerprint_changes_with_any_file_and_only_then() {
        let a = parse(dir(), &complete()).unwrap().fingerprint;
        assert_eq!(a, parse(dir(), &complete()).unwrap().fingerprint);
        let mut f = complete();
        f.insert("access_token".into(), b"another-token".to_vec());
        assert_ne!(a, parse(dir(), &f).unwrap().fingerprint);
        let mut f = complete();
        f.remove("expires_at");
        assert_ne!(a, parse(dir(), &f).unwrap().fingerprint);
    }

    #[tokio::test]
    async fn load_reads_the_mounted_files() {
        let tmp = tempfile::tempdir().unwrap();
        for (k, v) in complete() {
            std::fs::write(tmp.path().join(k), v).unwrap();
        }
        let s = load(tmp.path()).await.unwrap();
        assert_eq!(s.provider, Provider::SalesforceProduction);
        std::fs::remove_file(tmp.path().join("expires_at")).unwrap();
        assert_eq!(load(tmp.path()).await.unwrap().expires_at, None);
        std::fs::remove_file(tmp.path().join("instance_url")).unwrap();
        let err = load(tmp.path()).await.unwrap_err().to_string();
        assert!(
            err.contains("instance_url") && err.contains("No such file"),
            "{err}"
        );
    }
}
