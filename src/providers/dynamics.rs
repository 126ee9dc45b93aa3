//! Dynamics 365 / Dataverse: refresh-token grant at the cloud's Entra ID authority, then WhoAmI.

use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, ClientSecret, RefreshToken, Scope, TokenResponse, TokenUrl};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::classify::Endpoint;
use super::http::{Http, OAuthHttp, host_label};
use super::salesforce::grant_error;
use super::{Credentials, Failure, Session, reason, rotated, rules};
use crate::api::ConnectionSpec;

/// WhoAmI's answer (only what we use).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WhoAmI {
    organization_id: String,
    user_id: String,
}

pub(crate) async fn validate(
    http: &Http,
    authority_override: Option<&url::Url>,
    spec: &ConnectionSpec,
    creds: &Credentials,
    previous_remote_id: Option<&str>,
) -> Result<Session, Failure> {
    let Some(dynamics) = &spec.dynamics else {
        return Err(Failure::configuration(
            reason::DYNAMICS_SETTINGS_MISSING,
            "spec.dynamics (environmentUrl, cloud, tenantId) is required for a Dynamics365 connection",
        ));
    };
    // Configuration errors are reported before any network call.
    let environment = rules::dynamics_environment_base(dynamics)?;
    let authority = match authority_override {
        Some(url) => url.clone(),
        None => url::Url::parse(rules::entra_authority(dynamics.cloud)).expect("constant URL"),
    };
    let token_url = rules::entra_token_url(&authority, &dynamics.tenant_id);
    let entra_host = host_label(&token_url);

    let mut client = BasicClient::new(ClientId::new(creds.client_id.clone()))
        .set_token_uri(TokenUrl::from_url(token_url))
        .set_auth_type(AuthType::RequestBody);
    if let Some(secret) = &creds.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
    }
    let refresh_token = RefreshToken::new(creds.refresh_token.expose_secret().to_string());
    let send = OAuthHttp {
        http,
        endpoint: Endpoint::EntraToken,
    };
    let requested_at = k8s_openapi::jiff::Timestamp::now();
    let token = client
        .exchange_refresh_token(&refresh_token)
        .add_scope(Scope::new(rules::dynamics_scope(&environment)))
        .add_scope(Scope::new("offline_access".to_string()))
        .request_async(&send)
        .await
        .map_err(|e| grant_error(Endpoint::EntraToken, &entra_host, e))?;

    // Entra returns a new refresh token on every refresh: keep the newest.
    let rotated_refresh_token = rotated(&creds.refresh_token, token.refresh_token());
    let access_token = SecretString::from(token.access_token().secret().as_str());
    // The access token just issued is a secret too: a provider may echo it in an error body.
    let with_rotated = |failure: Failure| {
        let mut failure = failure.scrub(&[access_token.expose_secret()]);
        failure.rotated_refresh_token = rotated_refresh_token.clone();
        failure
    };
    let expires_at = token
        .expires_in()
        .and_then(|d| k8s_openapi::jiff::SignedDuration::try_from(d).ok())
        .and_then(|d| requested_at.checked_add(d).ok());

    let whoami_url = rules::whoami_url(&environment);
    let whoami: WhoAmI = http
        .get_json(
            Endpoint::DataverseWhoAmI,
            &whoami_url,
            &access_token,
            "the WhoAmI JSON",
        )
        .await
        .map_err(with_rotated)?;
    if let Some(previous) = previous_remote_id
        && !rules::same_guid(previous, &whoami.organization_id)
    {
        return Err(with_rotated(Failure::permanent(
            reason::ORG_ID_CHANGED,
            format!(
                "Connection inactive: {} now belongs to organization {} but this connection was validated for {previous} (the environment was reset, copied or replaced); re-authorize, or create a new Connection",
                rules::origin_string(&environment),
                whoami.organization_id
            ),
        )));
    }
    Ok(Session {
        remote_id: rules::display_text(&whoami.organization_id),
        user: rules::display_text(&whoami.user_id),
        instance_url: rules::origin_string(&environment),
        access_token,
        expires_at,
        rotated_refresh_token,
    })
}
