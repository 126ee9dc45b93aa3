//! The interactive OAuth login of `kubectl crm connect` / `reauthorize`: the device authorization
//! grant (default; works over SSH) or the authorization code grant with PKCE on a loopback
//! redirect (`--browser`), for Salesforce and for Entra ID (Dynamics 365).
//!
//! Tokens stay in [`SecretString`]s: never printed, logged or passed as process arguments.

mod browser;
pub mod discovery;
mod entra;
mod salesforce;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use secrecy::SecretString;
use url::Url;

use crate::api::Provider;
use crate::providers::ExtraRoots;
use crate::providers::rules;

pub use browser::open_in_browser;

/// How the user signs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Device authorization grant: a code to enter at a URL, from any device.
    Device,
    /// Authorization code grant with PKCE (S256) on `http://127.0.0.1:<port>/callback`.
    Browser,
}

/// Where and as whom to sign in.
#[derive(Debug, Clone)]
pub struct Target {
    pub provider: Provider,
    /// Salesforce: the login base (login.salesforce.com, test.salesforce.com or My Domain).
    /// Dynamics: the Entra ID authority of the cloud.
    pub base: Url,
    /// Dynamics: the Entra tenant (ID, domain, or `organizations`).
    pub tenant: String,
    pub client_id: String,
    /// Only for confidential clients (a Salesforce connected app that requires its secret).
    pub client_secret: Option<SecretString>,
    /// Dynamics: the scopes (`{resource}/user_impersonation offline_access`); Salesforce: `api
    /// refresh_token`.
    pub scopes: Vec<String>,
}

impl Target {
    /// The scopes of a Salesforce login: the REST API, and a refresh token.
    pub fn salesforce_scopes() -> Vec<String> {
        vec!["api".into(), "refresh_token".into()]
    }

    /// The scopes of an Entra login for a resource (an environment, or the Global Discovery
    /// Service): delegated access as the user, and a refresh token.
    pub fn entra_scopes(resource: &Url) -> Vec<String> {
        vec![
            format!("{}/user_impersonation", rules::origin_string(resource)),
            "offline_access".into(),
        ]
    }
}

/// What a login returns. `Debug` redacts the tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub refresh_token: SecretString,
    pub access_token: SecretString,
    pub expires_at: Option<Timestamp>,
    /// Salesforce: `instance_url`.
    pub instance_url: Option<String>,
    /// Salesforce: the identity URL `id`.
    pub identity_url: Option<String>,
}

/// Why a login did not give tokens. The messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("the sign-in was denied: access was not allowed{0}")]
    Denied(String),
    #[error("the sign-in code expired before it was used: run the command again and sign in within {0}")]
    Expired(String),
    #[error("the provider refused the login: {error}{description}")]
    Provider { error: String, description: String },
    #[error("the login failed: {0}")]
    Failed(String),
}

impl LoginError {
    fn provider(error: &str, description: Option<&str>) -> Self {
        LoginError::Provider {
            error: error.to_string(),
            description: description
                .filter(|d| !d.is_empty())
                .map(|d| format!(" ({})", rules::display_text(d)))
                .unwrap_or_default(),
        }
    }
}

/// The HTTP client of logins: no redirects (a token must not travel to a host we did not
/// choose), timeouts, the extra CA bundle.
pub fn http_client(extra_roots: Option<&ExtraRoots>, timeout: Duration) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder();
    if let Some(roots) = extra_roots {
        builder = roots.trust_in(builder);
    }
    builder
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("kubectl-crm/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// Signs in. Prompts (the URL and code, or the browser URL) go to `prompt` (stderr).
pub async fn login(
    http: &reqwest::Client,
    target: &Target,
    method: Method,
    prompt: &mut (dyn std::io::Write + Send),
) -> Result<Tokens, LoginError> {
    if !rules::is_allowed_transport(&target.base) {
        return Err(LoginError::Failed(format!(
            "refusing to sign in over plain http to {} (https is required, except on loopback)",
            target.base
        )));
    }
    match (target.provider, method) {
        (Provider::Dynamics365, Method::Device) => entra::device(http, target, prompt).await,
        (Provider::Dynamics365, Method::Browser) => entra::browser(http, target, prompt).await,
        (_, Method::Device) => salesforce::device(http, target, prompt).await,
        (_, Method::Browser) => salesforce::browser(http, target, prompt).await,
    }
}

/// Exchanges an Entra refresh token for tokens of another resource (an environment after
/// discovery): Entra refresh tokens serve every resource the user consented to.
pub async fn entra_for_resource(
    http: &reqwest::Client,
    target: &Target,
    refresh_token: &SecretString,
) -> Result<Tokens, LoginError> {
    entra::refresh(http, target, refresh_token).await
}

/// `Some(timestamp)` `expires_in` after `requested_at`.
fn expiry(requested_at: Timestamp, expires_in: Option<Duration>) -> Option<Timestamp> {
    let d = k8s_openapi::jiff::SignedDuration::try_from(expires_in?).ok()?;
    requested_at.checked_add(d).ok()
}
