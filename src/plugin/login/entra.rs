//! Entra ID (Dynamics 365) logins, through the oauth2 crate.
//!
//! - Device code: <https://learn.microsoft.com/entra/identity-platform/v2-oauth2-device-code>:
//!   `POST /{tenant}/oauth2/v2.0/devicecode` with `client_id`, `scope` → `device_code`,
//!   `user_code`, `verification_uri`, `expires_in`, `interval`, `message`; polling `POST
//!   /{tenant}/oauth2/v2.0/token` with `grant_type=urn:ietf:params:oauth:grant-type:device_code`.
//!   Errors: `authorization_pending` (keep polling), `authorization_declined`,
//!   `bad_verification_code`, `expired_token`; `slow_down` (RFC 8628) adds 5 s.
//! - Authorization code with PKCE:
//!   <https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow>,
//!   `GET /{tenant}/oauth2/v2.0/authorize` (`response_type=code`, `response_mode=query`,
//!   `code_challenge_method=S256`), loopback redirects on 127.0.0.1 with any port
//!   (<https://learn.microsoft.com/entra/identity-platform/reply-url#localhost-exceptions>).
//! - Scopes: `{environment}/user_impersonation` for a public client, plus `offline_access` for a
//!   refresh token (<https://learn.microsoft.com/power-apps/developer/data-platform/authenticate-oauth>).
//!   A refresh token serves every resource the user consented to, so one sign-in lists the
//!   environments (Global Discovery) and then gets the chosen one's tokens.

use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, CsrfToken, DeviceAuthorizationUrl, PkceCodeChallenge,
    RefreshToken, RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use oauth2::{DeviceCodeErrorResponseType, StandardDeviceAuthorizationResponse};
use secrecy::{ExposeSecret, SecretString};

use super::salesforce::exchange_error;
use super::{LoginError, Target, Tokens, browser, expiry};
use crate::providers::rules;

fn endpoint(target: &Target, last: &str) -> url::Url {
    let mut url = rules::entra_token_url(&target.base, &target.tenant);
    url.path_segments_mut().expect("http(s) URL").pop().push(last);
    url
}

fn tokens(
    requested_at: k8s_openapi::jiff::Timestamp,
    token: &oauth2::basic::BasicTokenResponse,
) -> Result<Tokens, LoginError> {
    let Some(refresh) = token.refresh_token() else {
        return Err(LoginError::Failed(
            "Entra ID returned no refresh token (the offline_access scope was not granted)".into(),
        ));
    };
    Ok(Tokens {
        refresh_token: SecretString::from(refresh.secret().as_str()),
        access_token: SecretString::from(token.access_token().secret().as_str()),
        expires_at: expiry(requested_at, token.expires_in()),
        instance_url: None,
        identity_url: None,
    })
}

fn scopes(target: &Target) -> impl Iterator<Item = Scope> + '_ {
    target.scopes.iter().cloned().map(Scope::new)
}

pub(super) async fn device(
    http: &reqwest::Client,
    target: &Target,
    prompt: &mut (dyn std::io::Write + Send),
) -> Result<Tokens, LoginError> {
    let client = BasicClient::new(ClientId::new(target.client_id.clone()))
        .set_device_authorization_url(DeviceAuthorizationUrl::from_url(endpoint(target, "devicecode")))
        .set_token_uri(TokenUrl::from_url(endpoint(target, "token")))
        .set_auth_type(AuthType::RequestBody);
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(scopes(target))
        .request_async(http)
        .await
        .map_err(exchange_error)?;
    let _ = writeln!(
        prompt,
        "To sign in, open {} and enter the code {}\nWaiting for you to allow access...",
        rules::display_text(details.verification_uri().as_str()),
        rules::display_text(details.user_code().secret()),
    );
    let requested_at = k8s_openapi::jiff::Timestamp::now();
    let minutes = details.expires_in().as_secs().div_ceil(60);
    let token = client
        .exchange_device_access_token(&details)
        .request_async(http, tokio::time::sleep, None)
        .await
        .map_err(|e| match e {
            RequestTokenError::ServerResponse(e) => match e.error() {
                DeviceCodeErrorResponseType::AccessDenied => LoginError::Denied(String::new()),
                DeviceCodeErrorResponseType::ExpiredToken => {
                    LoginError::Expired(format!("{minutes} minutes"))
                }
                DeviceCodeErrorResponseType::Basic(basic) => match basic.as_ref() {
                    "authorization_declined" => LoginError::Denied(String::new()),
                    "bad_verification_code" => LoginError::Expired(format!("{minutes} minutes")),
                    other => LoginError::provider(other, e.error_description().map(String::as_str)),
                },
                other => LoginError::provider(other.as_ref(), e.error_description().map(String::as_str)),
            },
            other => exchange_error(other),
        })?;
    tokens(requested_at, &token)
}

pub(super) async fn browser(
    http: &reqwest::Client,
    target: &Target,
    prompt: &mut (dyn std::io::Write + Send),
) -> Result<Tokens, LoginError> {
    let callback = browser::Callback::listen().await?;
    let client = BasicClient::new(ClientId::new(target.client_id.clone()))
        .set_auth_uri(AuthUrl::from_url(endpoint(target, "authorize")))
        .set_token_uri(TokenUrl::from_url(endpoint(target, "token")))
        .set_redirect_uri(callback.redirect_url())
        .set_auth_type(AuthType::RequestBody);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes(target))
        .add_extra_param("response_mode", "query")
        .set_pkce_challenge(challenge)
        .url();
    let code = callback.wait(&url, &state, prompt).await?;
    let requested_at = k8s_openapi::jiff::Timestamp::now();
    let token = client
        .exchange_code(AuthorizationCode::new(code.expose_secret().to_string()))
        .set_pkce_verifier(verifier)
        .add_extra_param("scope", target.scopes.join(" "))
        .request_async(http)
        .await
        .map_err(exchange_error)?;
    tokens(requested_at, &token)
}

pub(super) async fn refresh(
    http: &reqwest::Client,
    target: &Target,
    refresh_token: &SecretString,
) -> Result<Tokens, LoginError> {
    let client = BasicClient::new(ClientId::new(target.client_id.clone()))
        .set_token_uri(TokenUrl::from_url(endpoint(target, "token")))
        .set_auth_type(AuthType::RequestBody);
    let requested_at = k8s_openapi::jiff::Timestamp::now();
    let token = client
        .exchange_refresh_token(&RefreshToken::new(refresh_token.expose_secret().to_string()))
        .add_scopes(scopes(target))
        .request_async(http)
        .await
        .map_err(exchange_error)?;
    tokens(requested_at, &token)
}
