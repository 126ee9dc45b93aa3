//! Salesforce logins.
//!
//! - Device flow (hand-written: the oauth2 crate's device flow sends the RFC 8628 grant name and
//!   requires `expires_in`, and Salesforce uses `grant_type=device` with `code` and sends no
//!   `expires_in`). <https://help.salesforce.com/s/articleView?id=xcloud.remoteaccess_oauth_device_flow.htm&type=5>:
//!   `POST /services/oauth2/token` with `response_type=device_code`, `client_id`, `scope` →
//!   `device_code`, `user_code`, `verification_uri`, `interval`; then polling the same endpoint
//!   with `grant_type=device`, `client_id`, `code`. While the user has not answered: 400
//!   `authorization_pending`; `slow_down` adds 5 s to the interval (RFC 8628 §3.5); `access_denied`
//!   when the user refuses; `invalid_grant` for a code that expired. Salesforce's own CLI gives the
//!   user 10 minutes (<https://github.com/forcedotcom/sfdx-core/blob/main/src/deviceOauthService.ts>).
//! - Web server flow with PKCE (the oauth2 crate):
//!   <https://help.salesforce.com/s/articleView?id=xcloud.remoteaccess_pkce.htm&type=5>,
//!   `GET /services/oauth2/authorize` with `response_type=code`, `client_id`, `redirect_uri`,
//!   `code_challenge`, `code_challenge_method=S256`, `state`, `scope`; then
//!   `grant_type=authorization_code` with `code`, `redirect_uri`, `code_verifier`.

use std::time::{Duration, Instant};

use oauth2::basic::{BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge,
    RequestTokenError, Scope, StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{LoginError, Target, Tokens, browser};
use crate::providers::rules;
use crate::providers::salesforce::SalesforceTokenResponse;

/// How long a device code is polled for (Salesforce announces no lifetime).
const DEVICE_DEADLINE: Duration = Duration::from_secs(600);

#[derive(Deserialize)]
struct DeviceStart {
    device_code: SecretString,
    user_code: String,
    verification_uri: String,
    #[serde(default = "five")]
    interval: u64,
}

fn five() -> u64 {
    5
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct LoginAnswer {
    access_token: SecretString,
    refresh_token: Option<SecretString>,
    instance_url: String,
    id: String,
    issued_at: String,
    #[serde(default)]
    signature: Option<String>,
}

fn token_url(target: &Target) -> url::Url {
    rules::salesforce_token_url(&target.base)
}

pub(super) async fn device(
    http: &reqwest::Client,
    target: &Target,
    prompt: &mut (dyn std::io::Write + Send),
) -> Result<Tokens, LoginError> {
    let url = token_url(target);
    let scope = target.scopes.join(" ");
    let response = http
        .post(url.clone())
        .form(&[
            ("response_type", "device_code"),
            ("client_id", target.client_id.as_str()),
            ("scope", scope.as_str()),
        ])
        .send()
        .await
        .map_err(|e| LoginError::Failed(format!("cannot reach {}: {}", host(&url), e.without_url())))?;
    let start: DeviceStart = answer(response).await?;
    let _ = writeln!(
        prompt,
        "To sign in, open {} and enter the code {}\nWaiting for you to allow access...",
        rules::display_text(&start.verification_uri),
        rules::display_text(&start.user_code),
    );
    let mut interval = Duration::from_secs(start.interval.max(1));
    let deadline = Instant::now() + DEVICE_DEADLINE;
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            return Err(LoginError::Expired("10 minutes".into()));
        }
        let response = http
            .post(url.clone())
            .form(&[
                ("grant_type", "device"),
                ("client_id", target.client_id.as_str()),
                ("code", start.device_code.expose_secret()),
            ])
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            // RFC 8628 §3.5: back off on connection problems.
            Err(_) => {
                interval = (interval * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let status = response.status();
        if status.is_success() {
            return tokens(target, answer(response).await?);
        }
        if let Some(wait) = retry_after(&response) {
            tokio::time::sleep(wait).await;
            continue;
        }
        let body = response.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<OAuthError>(&body) {
            Ok(e) if e.error == "authorization_pending" => {}
            Ok(e) if e.error == "slow_down" => interval += Duration::from_secs(5),
            Ok(e) if e.error == "access_denied" => return Err(LoginError::Denied(String::new())),
            Ok(e) if e.error == "invalid_grant" => return Err(LoginError::Expired("10 minutes".into())),
            Ok(e) => return Err(LoginError::provider(&e.error, e.error_description.as_deref())),
            Err(_) if status.is_server_error() => interval = (interval * 2).min(Duration::from_secs(30)),
            Err(_) => {
                return Err(LoginError::Failed(format!(
                    "{} answered HTTP {status}",
                    host(&url)
                )));
            }
        }
    }
}

pub(super) async fn browser(
    http: &reqwest::Client,
    target: &Target,
    prompt: &mut (dyn std::io::Write + Send),
) -> Result<Tokens, LoginError> {
    let mut authorize = target.base.clone();
    authorize.set_path("/services/oauth2/authorize");
    let callback = browser::Callback::listen().await?;
    let mut client = Client::<
        BasicErrorResponse,
        SalesforceTokenResponse,
        BasicTokenIntrospectionResponse,
        StandardRevocableToken,
        BasicRevocationErrorResponse,
    >::new(ClientId::new(target.client_id.clone()))
    .set_auth_uri(AuthUrl::from_url(authorize))
    .set_token_uri(TokenUrl::from_url(token_url(target)))
    .set_redirect_uri(callback.redirect_url())
    .set_auth_type(AuthType::RequestBody);
    if let Some(secret) = &target.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
    }
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(target.scopes.iter().cloned().map(Scope::new))
        .set_pkce_challenge(challenge)
        .url();
    let code = callback.wait(&url, &state, prompt).await?;
    let token = client
        .exchange_code(AuthorizationCode::new(code.expose_secret().to_string()))
        .set_pkce_verifier(verifier)
        .request_async(http)
        .await
        .map_err(exchange_error)?;
    let fields = token.extra_fields();
    tokens(
        target,
        LoginAnswer {
            access_token: SecretString::from(token.access_token().secret().as_str()),
            refresh_token: token
                .refresh_token()
                .map(|r| SecretString::from(r.secret().as_str())),
            instance_url: fields.instance_url.clone(),
            id: fields.id.clone(),
            issued_at: fields.issued_at.clone(),
            signature: fields.signature.clone(),
        },
    )
}

/// The oauth2 crate's error of a code exchange, as a [`LoginError`].
pub(super) fn exchange_error<RE: std::error::Error + 'static, TE: oauth2::ErrorResponse + 'static>(
    error: RequestTokenError<RE, TE>,
) -> LoginError {
    match error {
        RequestTokenError::ServerResponse(e) => {
            let value = serde_json::to_value(&e).unwrap_or_default();
            LoginError::provider(
                value["error"].as_str().unwrap_or("error"),
                value["error_description"].as_str(),
            )
        }
        RequestTokenError::Request(e) => LoginError::Failed(format!("the token request failed: {e}")),
        RequestTokenError::Parse(e, _) => {
            LoginError::Failed(format!("the token answer is not valid JSON at `{}`", e.path()))
        }
        RequestTokenError::Other(e) => LoginError::Failed(e),
    }
}

fn tokens(target: &Target, answer: LoginAnswer) -> Result<Tokens, LoginError> {
    if let Some(secret) = &target.client_secret
        && !rules::salesforce_signature_valid(
            &answer.id,
            &answer.issued_at,
            answer.signature.as_deref(),
            secret.expose_secret(),
        )
    {
        return Err(LoginError::Failed(
            "the token answer's signature does not match the client secret: not trusting it".into(),
        ));
    }
    let Some(refresh_token) = answer.refresh_token else {
        return Err(LoginError::Failed(
            "Salesforce returned no refresh token: allow the refresh_token (offline access) scope in the connected app"
                .into(),
        ));
    };
    Ok(Tokens {
        refresh_token,
        access_token: answer.access_token,
        expires_at: None,
        instance_url: Some(answer.instance_url),
        identity_url: Some(answer.id),
    })
}

/// A JSON answer, or the provider's error.
async fn answer<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T, LoginError> {
    let status = response.status();
    let url = response.url().clone();
    let body = response.bytes().await.map_err(|e| {
        LoginError::Failed(format!(
            "reading the answer of {}: {}",
            host(&url),
            e.without_url()
        ))
    })?;
    if !status.is_success() {
        return Err(match serde_json::from_slice::<OAuthError>(&body) {
            Ok(e) => LoginError::provider(&e.error, e.error_description.as_deref()),
            Err(_) => LoginError::Failed(format!("{} answered HTTP {status}", host(&url))),
        });
    }
    serde_json::from_slice(&body).map_err(|e| {
        LoginError::Failed(format!(
            "the answer of {} is not the expected JSON (line {}, column {})",
            host(&url),
            e.line(),
            e.column()
        ))
    })
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    if !matches!(response.status().as_u16(), 429 | 503) {
        return None;
    }
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    crate::providers::classify::parse_retry_after(value, k8s_openapi::jiff::Timestamp::now())
        .map(|d| d.min(Duration::from_secs(60)))
}

fn host(url: &url::Url) -> String {
    url.host_str().unwrap_or("?").to_string()
}
