//! Token validation against Salesforce and Dynamics 365 (Entra ID + Dataverse).
//!
//! Given a Connection's provider settings and the credentials from its Secret, [`Validator::validate`]
//! refreshes the OAuth access token, asks the provider who the token belongs to, and returns either a
//! [`Session`] (org or environment ID, user, instance URL) or a classified [`Failure`]:
//!
//! - [`FailureKind::Permanent`]: the tokens are dead (revoked, expired, inactive user, consent or
//!   interaction needed), the org changed, or the response signature did not match. The connection
//!   becomes Inactive with the failure's reason.
//! - [`FailureKind::Configuration`]: something the user must fix (Secret or key missing, wrong client,
//!   environment URL outside the cloud's domain). Also Inactive, with a reason saying what to fix.
//! - [`FailureKind::Transient`]: the provider could not answer (network, timeout, 5xx, 429, rate
//!   limits, malformed answers). State stays as it is; retry later with [`retry_delay`].
//!
//! Classification looks at the OAuth `error` field (and Entra's structured `suberror` / `error_codes`)
//! and the HTTP status, never at free-text descriptions alone. An answer the validator does not
//! recognise is transient: a connection is never deactivated on a guess.
//!
//! # Rotated refresh tokens — read this
//!
//! A refresh may hand back a **new refresh token** ([`Session::rotated_refresh_token`], and also
//! [`Failure::rotated_refresh_token`] when a later step failed). For Salesforce with rotation enabled
//! the old token is **already dead** when the response arrives; Entra returns a new one on every
//! refresh and the newest must be kept. The caller must persist it (write it back to the Secret)
//! before using or reporting the session; if it cannot, the connection must not be reported Active.
//!
//! Secrets never appear in `Debug` output, messages, or logs: they are held in [`SecretString`].
//!
//! Layout: the pure parts — [`classify`] (error classification), [`backoff`] (retry and jitter
//! periods), [`rules`] (URLs, clouds and domains, signatures) — are apart from the I/O parts
//! (`http`, `limiter`, `salesforce`, `dynamics`).

pub mod backoff;
pub mod classify;
mod dynamics;
mod http;
mod limiter;
pub mod rules;
pub(crate) mod salesforce;
pub mod trust;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::api::{ConnectionSpec, Provider};

pub use backoff::{jittered, retry_delay};
pub use limiter::with_tenant;
pub use trust::ExtraRoots;

/// The reasons a [`Failure`] carries (CamelCase, written to `status.reason`).
pub mod reason {
    // Permanent: the tokens are dead or untrustworthy; the user must re-authorize.
    /// `invalid_grant`: the refresh token was revoked, or the user is locked out or restricted.
    pub const TOKEN_REVOKED: &str = "TokenRevoked";
    /// `invalid_grant` with Entra error code 70008 / 700082 / 700084: expired (e.g. inactivity).
    pub const TOKEN_EXPIRED: &str = "TokenExpired";
    /// `interaction_required` (or Entra `invalid_grant` with an interaction suberror): MFA, password change…
    pub const INTERACTION_REQUIRED: &str = "InteractionRequired";
    /// `consent_required` (or Entra `invalid_grant` with suberror `consent_required`).
    pub const CONSENT_REQUIRED: &str = "ConsentRequired";
    /// Salesforce `inactive_user`: the user is deactivated or frozen.
    pub const USER_INACTIVE: &str = "UserInactive";
    /// Salesforce `inactive_org`: the org is locked, closed or suspended.
    pub const ORG_INACTIVE: &str = "OrgInactive";
    /// The tokens now belong to another org/environment than recorded (e.g. a refreshed sandbox).
    pub const ORG_ID_CHANGED: &str = "OrgIdChanged";
    /// The Salesforce token response's `signature` does not match (HMAC-SHA256 with the client secret).
    pub const SIGNATURE_MISMATCH: &str = "SignatureMismatch";

    // Configuration: the user must fix something.
    /// The credentials Secret does not exist.
    pub const SECRET_MISSING: &str = "SecretMissing";
    /// A required Secret key (`refresh_token`, `client_id`) is missing or empty.
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    /// A Secret key is not valid UTF-8 text.
    pub const SECRET_KEY_INVALID: &str = "SecretKeyInvalid";
    /// `invalid_client` / `invalid_client_id`: wrong client ID or client secret.
    pub const INVALID_CLIENT: &str = "InvalidClient";
    /// `unauthorized_client`: the client (connected app / app registration) may not use this grant.
    pub const UNAUTHORIZED_CLIENT: &str = "UnauthorizedClient";
    /// `invalid_scope`: e.g. the app has no Dynamics CRM `user_impersonation` permission.
    pub const INVALID_SCOPE: &str = "InvalidScope";
    /// `unsupported_grant_type`: the refresh-token flow is not enabled for the client.
    pub const UNSUPPORTED_GRANT_TYPE: &str = "UnsupportedGrantType";
    /// `invalid_request`: e.g. an unknown Entra tenant.
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// The Dynamics environment URL's domain does not belong to `spec.dynamics.cloud`.
    pub const ENVIRONMENT_URL_NOT_IN_CLOUD: &str = "EnvironmentUrlNotInCloud";
    /// A URL in the spec (or the authority override) is not usable (not https, unparsable…).
    pub const INVALID_URL: &str = "InvalidUrl";
    /// A URL's host (in the spec, or in a provider's answer) is not one the operator sends
    /// credentials to: not a Salesforce, Entra ID or Dataverse host, nor one its administrator
    /// added (`--allow-provider-domain`).
    pub const PROVIDER_HOST_NOT_ALLOWED: &str = "ProviderHostNotAllowed";
    /// `spec.dynamics` is missing for a Dynamics365 connection.
    pub const DYNAMICS_SETTINGS_MISSING: &str = "DynamicsSettingsMissing";
    /// Dataverse answered 403 to WhoAmI: the user is not a member of the environment / has no role.
    pub const ENVIRONMENT_ACCESS_DENIED: &str = "EnvironmentAccessDenied";

    // Transient: nothing changes; retry with backoff.
    /// The provider could not answer (network, TLS, timeout, 5xx, 429, rate limits, malformed body).
    pub const PROVIDER_UNAVAILABLE: &str = "ProviderUnavailable";
    /// This operator's own per-host limit held the call back; retry after `retry_after`.
    pub const THROTTLED: &str = "Throttled";
}

/// How a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The tokens are dead or untrustworthy: the connection becomes Inactive until re-authorized.
    Permanent,
    /// The user must fix the configuration: Inactive, with a reason saying what to fix.
    Configuration,
    /// The provider could not answer: keep the state, retry with backoff.
    Transient,
}

impl FailureKind {
    /// `Permanent`, `Configuration` or `Transient`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Permanent => "Permanent",
            FailureKind::Configuration => "Configuration",
            FailureKind::Transient => "Transient",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified validation failure. Its `message` never contains a token, secret or signature.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    /// CamelCase reason, one of [`reason`].
    pub reason: &'static str,
    /// Human-readable explanation (no secrets).
    pub message: String,
    /// The provider's `Retry-After` (or the local limiter's wait), for transient failures.
    pub retry_after: Option<Duration>,
    /// **A new refresh token the provider issued before a later step failed.** The old refresh token
    /// may already be dead (Salesforce rotation): persist this one even though validation failed.
    /// Never set on [`reason::SIGNATURE_MISMATCH`] (an unverified response is not trusted).
    pub rotated_refresh_token: Option<SecretString>,
    /// An identity call refused the access token it was given (HTTP 401, or 403 without a limit
    /// code: Salesforce's identity URL answers a dead token with a plain `403 Bad_OAuth_Token`).
    /// That alone proves nothing about the refresh token (so it stays transient), but a recheck
    /// holding that access token refreshes at once instead of backing off: the refresh decides.
    pub access_token_refused: bool,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, reason: &'static str, message: impl Into<String>) -> Self {
        Failure {
            kind,
            reason,
            message: message.into(),
            retry_after: None,
            rotated_refresh_token: None,
            access_token_refused: false,
        }
    }

    pub(crate) fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(FailureKind::Permanent, reason, message)
    }

    pub(crate) fn configuration(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(FailureKind::Configuration, reason, message)
    }

    pub(crate) fn transient(message: impl Into<String>) -> Self {
        Self::new(FailureKind::Transient, reason::PROVIDER_UNAVAILABLE, message)
    }

    pub(crate) fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The credentials Secret does not exist.
    pub fn secret_missing(name: &str) -> Self {
        Self::configuration(
            reason::SECRET_MISSING,
            format!("Secret {name} (spec.credentialsSecretRef) not found in the connection's namespace"),
        )
    }

    /// Retry later, state unchanged.
    pub fn is_transient(&self) -> bool {
        self.kind == FailureKind::Transient
    }

    /// Replaces every occurrence of the given secret values in the message (a safety net: messages
    /// are built from structured fields, but a provider could echo anything).
    pub(crate) fn scrub(mut self, secrets: &[&str]) -> Self {
        self.message = scrub(&self.message, secrets);
        self
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.reason, self.kind, self.message)
    }
}

impl std::error::Error for Failure {}

pub(crate) fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets {
        // Short values (e.g. a test's "x") would shred the text; real tokens are long.
        if secret.len() >= 6 {
            out = out.replace(secret, "[redacted]");
        }
    }
    scrub_bearer(&out)
}

/// Whatever follows `Bearer ` (any case) is a credential, known to us or not: a provider echoing
/// an `Authorization` header must not put a token into a status, an event or a log.
fn scrub_bearer(text: &str) -> String {
    const WORD: &str = "bearer ";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    let mut from = 0;
    while let Some(i) = lower[from..].find(WORD) {
        let start = from + i + WORD.len();
        let end = text[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ';' | ')' | ']' | '}' | '<'))
            .map_or(text.len(), |n| start + n);
        if end > start {
            out.push_str(&text[rest..start]);
            out.push_str("[redacted]");
            rest = end;
        }
        from = end.max(start);
    }
    out.push_str(&text[rest..]);
    out
}

/// OAuth credentials from a connection's Secret. `Debug` redacts the secrets.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub refresh_token: SecretString,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub access_token: Option<SecretString>,
}

/// A Secret value as the operator reads it: UTF-8 text, trimmed (a trailing newline from `echo` or
/// `kubectl create secret --from-file` is common); `None` when that leaves nothing. Every reader of a
/// token uses this, so a stored token compares equal to the one the provider was sent.
pub fn secret_text(bytes: &[u8]) -> Result<Option<&str>, std::str::Utf8Error> {
    let text = std::str::from_utf8(bytes)?.trim();
    Ok((!text.is_empty()).then_some(text))
}

impl Credentials {
    /// Secret key of the refresh token (required).
    pub const REFRESH_TOKEN: &'static str = "refresh_token";
    /// Secret key of the OAuth client ID (required).
    pub const CLIENT_ID: &'static str = "client_id";
    /// Secret key of the OAuth client secret (optional).
    pub const CLIENT_SECRET: &'static str = "client_secret";
    /// Secret key of a current access token (optional).
    pub const ACCESS_TOKEN: &'static str = "access_token";

    /// From a Secret's (decoded) `data`. Values are trimmed (a trailing newline from `echo` is common).
    /// A missing or empty required key → [`reason::SECRET_KEY_MISSING`]; a value that is not UTF-8 →
    /// [`reason::SECRET_KEY_INVALID`]; both [`FailureKind::Configuration`]. Empty optional keys are absent.
    pub fn from_secret_data(
        secret_name: &str,
        data: &BTreeMap<String, k8s_openapi::ByteString>,
    ) -> Result<Self, Failure> {
        let get = |key: &str| -> Result<Option<String>, Failure> {
            match data.get(key) {
                None => Ok(None),
                Some(bytes) => match secret_text(&bytes.0) {
                    Ok(text) => Ok(text.map(str::to_string)),
                    Err(_) => Err(Failure::configuration(
                        reason::SECRET_KEY_INVALID,
                        format!("key {key} of Secret {secret_name} is not valid UTF-8 text"),
                    )),
                },
            }
        };
        let required = |key: &str| -> Result<String, Failure> {
            get(key)?.ok_or_else(|| {
                Failure::configuration(
                    reason::SECRET_KEY_MISSING,
                    format!("Secret {secret_name} has no (or an empty) key {key}"),
                )
            })
        };
        Ok(Credentials {
            refresh_token: required(Self::REFRESH_TOKEN)?.into(),
            client_id: required(Self::CLIENT_ID)?,
            client_secret: get(Self::CLIENT_SECRET)?.map(SecretString::from),
            access_token: get(Self::ACCESS_TOKEN)?.map(SecretString::from),
        })
    }

    fn secret_values(&self) -> Vec<&str> {
        let mut values = vec![self.refresh_token.expose_secret()];
        values.extend(self.client_secret.as_ref().map(|s| s.expose_secret()));
        values.extend(self.access_token.as_ref().map(|s| s.expose_secret()));
        values
    }
}

/// A validated session. `Debug` redacts the tokens.
#[derive(Debug, Clone)]
pub struct Session {
    /// Salesforce org ID (18 characters) or Dynamics 365 OrganizationId (the environment ID).
    pub remote_id: String,
    /// Salesforce username, or Dynamics UserId.
    pub user: String,
    /// Salesforce `instance_url`, or the Dynamics environment URL.
    pub instance_url: String,
    /// The fresh access token.
    pub access_token: SecretString,
    /// When the access token expires, if the provider said (Entra `expires_in`; Salesforce: `None`).
    pub expires_at: Option<k8s_openapi::jiff::Timestamp>,
    /// **Some when the provider returned a NEW refresh token: the old one may already be dead.**
    /// The caller must persist it (write it back to the Secret) before using or reporting the session.
    pub rotated_refresh_token: Option<SecretString>,
}

/// Settings of a [`Validator`].
#[derive(Debug, Clone)]
pub struct ValidatorConfig {
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Total timeout of one HTTP request (connect, send, and read the whole response).
    pub request_timeout: Duration,
    /// Responses larger than this are refused (transient failure).
    pub max_body_bytes: usize,
    /// Per provider host (e.g. login.salesforce.com): sustained calls per second.
    pub per_host_rate: u32,
    /// Per provider host: burst size.
    pub per_host_burst: u32,
    /// How long a call may wait for the per-host limiter before the validation gives up with a
    /// transient [`reason::THROTTLED`] failure (with `retry_after`). Zero: never wait.
    pub limiter_max_wait: Duration,
    /// Replaces the Entra ID authority of every cloud (e.g. `http://127.0.0.1:8089` for tests and the
    /// demo). https, or http on a loopback host only.
    pub entra_authority_override: Option<String>,
    /// CA certificates trusted in addition to the built-in web PKI roots (`--extra-ca-bundle`).
    pub extra_roots: Option<ExtraRoots>,
    /// Where credentials may be sent (built-in provider domains, plus these).
    pub hosts: rules::HostPolicy,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        ValidatorConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(20),
            max_body_bytes: 256 * 1024,
            per_host_rate: 10,
            per_host_burst: 20,
            limiter_max_wait: Duration::from_secs(30),
            entra_authority_override: None,
            extra_roots: None,
            hosts: rules::HostPolicy::default(),
        }
    }
}

/// Errors building a [`Validator`].
#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    #[error("invalid validator configuration: {0}")]
    Config(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("{0}")]
    CaBundle(String),
}

/// Validates credentials against the providers. Cheap to clone (shares the HTTP client and limiter);
/// create one per process so the per-host limiter covers every connection.
#[derive(Clone)]
pub struct Validator {
    http: http::Http,
    entra_authority_override: Option<Arc<url::Url>>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator").finish_non_exhaustive()
    }
}

impl Validator {
    pub fn new(config: ValidatorConfig) -> Result<Self, ValidatorError> {
        let entra_authority_override = match &config.entra_authority_override {
            None => None,
            Some(raw) => Some(Arc::new(
                rules::parse_base_url(raw, "the Entra authority override")
                    .map_err(|f| ValidatorError::Config(f.message))?,
            )),
        };
        Ok(Validator {
            http: http::Http::new(&config)?,
            entra_authority_override,
        })
    }

    /// Refreshes the access token and identifies the org or environment: [`Validator::refresh`]
    /// then [`Validator::identify`], for callers that have nowhere to save a rotated token in
    /// between (`check-credentials` writes it to a file afterwards).
    ///
    /// `previous_remote_id`: the org/environment ID recorded in status; a different one now is a
    /// permanent [`reason::ORG_ID_CHANGED`] failure.
    ///
    /// On success, check [`Session::rotated_refresh_token`] and persist it before anything else;
    /// on failure, [`Failure::rotated_refresh_token`].
    pub async fn validate(
        &self,
        spec: &ConnectionSpec,
        creds: &Credentials,
        previous_remote_id: Option<&str>,
    ) -> Result<Session, Failure> {
        let grant = self.refresh(spec, creds).await?;
        match self.identify(spec, &grant, previous_remote_id).await {
            Ok(mut session) => {
                session.rotated_refresh_token = grant.rotated_refresh_token;
                Ok(session)
            }
            Err(mut failure) => {
                failure.rotated_refresh_token = grant.rotated_refresh_token;
                Err(failure)
            }
        }
    }

    /// Step one: the refresh-token grant. **When it returns a [`Grant::rotated_refresh_token`],
    /// the token sent may already be dead**: save the new one before anything else, then call
    /// [`Validator::identify`].
    pub async fn refresh(&self, spec: &ConnectionSpec, creds: &Credentials) -> Result<Grant, Failure> {
        let result = match spec.provider {
            Provider::SalesforceProduction | Provider::SalesforceSandbox => {
                salesforce::refresh(&self.http, spec, creds).await
            }
            Provider::Dynamics365 => {
                dynamics::refresh(&self.http, self.entra_authority_override.as_deref(), spec, creds).await
            }
        };
        result.map_err(|failure| scrubbed(spec, failure, &creds.secret_values(), "refresh failed"))
    }

    /// The access token an earlier grant issued, as a grant for [`Validator::identify`]: a recheck
    /// of valid tokens that sends no token request, so nothing can rotate. `instance_url` and
    /// `identity_url` (Salesforce: the grant's `id`, from [`Grant::identity_url`]) are what was kept
    /// of that grant. A configuration failure when the spec's hosts are no longer allowed; the
    /// caller then refreshes, which reports it.
    pub fn current(
        &self,
        spec: &ConnectionSpec,
        access_token: SecretString,
        expires_at: Option<k8s_openapi::jiff::Timestamp>,
        instance_url: &str,
        identity_url: Option<&str>,
    ) -> Result<Grant, Failure> {
        let detail = match spec.provider {
            Provider::SalesforceProduction | Provider::SalesforceSandbox => {
                let Some(id) = identity_url else {
                    return Err(Failure::configuration(
                        reason::SECRET_KEY_MISSING,
                        "no identity URL kept from the last grant",
                    ));
                };
                GrantDetail::Salesforce(salesforce::SalesforceGrant::current(
                    &self.http,
                    spec,
                    instance_url,
                    id,
                )?)
            }
            Provider::Dynamics365 => {
                GrantDetail::Dynamics(dynamics::DynamicsGrant::current(&self.http, spec)?)
            }
        };
        Ok(Grant {
            access_token,
            expires_at,
            rotated_refresh_token: None,
            detail,
        })
    }

    /// Step two: who the granted access token belongs to (Salesforce identity URL, Dataverse
    /// WhoAmI). `previous_remote_id` as in [`Validator::validate`].
    pub async fn identify(
        &self,
        spec: &ConnectionSpec,
        grant: &Grant,
        previous_remote_id: Option<&str>,
    ) -> Result<Session, Failure> {
        let result = match &grant.detail {
            GrantDetail::Salesforce(g) => {
                salesforce::identify(&self.http, g, &grant.access_token, previous_remote_id).await
            }
            GrantDetail::Dynamics(g) => {
                dynamics::identify(
                    &self.http,
                    g,
                    &grant.access_token,
                    grant.expires_at,
                    previous_remote_id,
                )
                .await
            }
        };
        match result {
            Ok(session) => {
                tracing::debug!(provider = %spec.provider, remote_id = %session.remote_id, "credentials valid");
                Ok(session)
            }
            Err(failure) => {
                // The access token just issued (and a rotated refresh token) are secrets too: a
                // provider may echo anything in an error body.
                let mut secrets = vec![grant.access_token.expose_secret()];
                secrets.extend(grant.rotated_refresh_token.as_ref().map(|r| r.expose_secret()));
                Err(scrubbed(spec, failure, &secrets, "identity check failed"))
            }
        }
    }
}

/// `failure` without the given secret values in its message, logged at debug level as `what`.
fn scrubbed(spec: &ConnectionSpec, failure: Failure, secrets: &[&str], what: &str) -> Failure {
    let failure = failure.scrub(secrets);
    tracing::debug!(
        provider = %spec.provider,
        kind = %failure.kind,
        reason = failure.reason,
        message = %failure.message,
        "{what}"
    );
    failure
}

/// A successful refresh-token grant: the access token, and a rotated refresh token to save before
/// the identity call. `Debug` redacts the tokens.
///
/// [`Grant::current`] stands for an earlier grant whose access token the operator still holds.
pub struct Grant {
    pub access_token: SecretString,
    /// When the access token expires, if the provider said.
    pub expires_at: Option<k8s_openapi::jiff::Timestamp>,
    /// **Some when the provider returned a NEW refresh token: the one sent may already be dead.**
    pub rotated_refresh_token: Option<SecretString>,
    detail: GrantDetail,
}

impl Grant {
    /// Salesforce's identity URL (`id`) of this grant: kept with the session (it is not a secret)
    /// for [`Grant::current`]. `None` for Dynamics, whose WhoAmI needs only the spec.
    pub fn identity_url(&self) -> Option<&str> {
        match &self.detail {
            GrantDetail::Salesforce(g) => Some(g.identity_url()),
            GrantDetail::Dynamics(_) => None,
        }
    }
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("expires_at", &self.expires_at)
            .field("rotated", &self.rotated_refresh_token.is_some())
            .finish_non_exhaustive()
    }
}

/// What the identity call needs from the grant, per provider.
pub(crate) enum GrantDetail {
    Salesforce(salesforce::SalesforceGrant),
    Dynamics(dynamics::DynamicsGrant),
}

/// `Some(new)` when the provider returned a refresh token different from the one sent.
pub(crate) fn rotated(old: &SecretString, new: Option<&oauth2::RefreshToken>) -> Option<SecretString> {
    let new = new?.secret();
    (!new.is_empty() && new != old.expose_secret()).then(|| SecretString::from(new.as_str()))
}

/// Compile-time check: the validation futures are `Send` for any lifetime (the controller runs them
/// on a multi-threaded runtime; closures capturing references broke this once).
#[allow(dead_code)]
fn _assert_send(v: &Validator, spec: &ConnectionSpec, creds: &Credentials, prev: Option<&str>) {
    fn is_send<T: Send>(_: T) {}
    is_send(salesforce::refresh(&v.http, spec, creds));
    is_send(dynamics::refresh(&v.http, None, spec, creds));
    is_send(v.validate(spec, creds, prev));
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn data(pairs: &[(&str, &[u8])]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
            .collect()
    }

    #[test]
    fn credentials_from_complete_secret_trim_values() {
        let creds = Credentials::from_secret_data(
            "s",
            &data(&[
                ("refresh_token", b"rt-value\n"),
                ("client_id", b"cid"),
                ("client_secret", b"cs-value"),
                ("access_token", b""),
            ]),
        )
        .unwrap();
        assert_eq!(creds.refresh_token.expose_secret(), "rt-value");
        assert_eq!(creds.client_id, "cid");
        assert_eq!(creds.client_secret.unwrap().expose_secret(), "cs-value");
        assert!(creds.access_token.is_none(), "empty optional key is absent");
    }

    #[test]
    fn missing_or_empty_required_key_is_a_configuration_failure_naming_key_and_secret() {
        for (pairs, key) in [
            (data(&[("client_id", b"cid")]), "refresh_token"),
            (
                data(&[("refresh_token", b"  "), ("client_id", b"cid")]),
                "refresh_token",
            ),
            (data(&[("refresh_token", b"rt")]), "client_id"),
        ] {
            let failure = Credentials::from_secret_data("acme-creds", &pairs).unwrap_err();
            assert_eq!(failure.kind, FailureKind::Configuration);
            assert_eq!(failure.reason, reason::SECRET_KEY_MISSING);
            assert!(failure.message.contains(key), "{}", failure.message);
            assert!(failure.message.contains("acme-creds"), "{}", failure.message);
        }
    }

    #[test]
    fn non_utf8_key_is_invalid() {
        let failure = Credentials::from_secret_data(
            "s",
            &data(&[("refresh_token", &[0xff, 0xfe]), ("client_id", b"cid")]),
        )
        .unwrap_err();
        assert_eq!(failure.reason, reason::SECRET_KEY_INVALID);
        assert_eq!(failure.kind, FailureKind::Configuration);
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let creds = Credentials {
            refresh_token: "rt-very-secret".into(),
            client_id: "cid".into(),
            client_secret: Some("cs-very-secret".into()),
            access_token: Some("at-very-secret".into()),
        };
        let session = Session {
            remote_id: "00D".into(),
            user: "u".into(),
            instance_url: "https://x".into(),
            access_token: "at-very-secret".into(),
            expires_at: None,
            rotated_refresh_token: Some("rt2-very-secret".into()),
        };
        let mut failure = Failure::transient("m");
        failure.rotated_refresh_token = Some("rt3-very-secret".into());
        let text = format!("{creds:?} {session:?} {failure:?} {failure}");
        assert!(!text.contains("very-secret"), "{text}");
    }

    #[test]
    fn scrub_redacts_whatever_follows_bearer_in_any_case() {
        assert_eq!(
            scrub(
                r#"401: {"error":"bad header Bearer AT-00D5g.abc_123=","x":1} and bearer  zz"#,
                &[]
            ),
            r#"401: {"error":"bad header Bearer [redacted]","x":1} and bearer  zz"#
        );
        assert_eq!(
            scrub("Authorization: BEARER tok123 end", &[]),
            "Authorization: BEARER [redacted] end"
        );
        assert_eq!(scrub("no header here; bearer", &[]), "no header here; bearer");
        assert_eq!(scrub("ümlaut Bearer ü-tok", &[]), "ümlaut Bearer [redacted]");
    }

    #[test]
    fn scrub_replaces_secret_values() {
        let failure = Failure::transient("echoed rt-very-secret back").scrub(&["rt-very-secret"]);
        assert_eq!(failure.message, "echoed [redacted] back");
    }

    #[test]
    fn secret_missing_is_configuration() {
        let failure = Failure::secret_missing("creds");
        assert_eq!(failure.kind, FailureKind::Configuration);
        assert_eq!(failure.reason, reason::SECRET_MISSING);
        assert!(!failure.is_transient());
        assert!(failure.message.contains("creds"));
    }
}
