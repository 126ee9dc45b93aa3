//! Dynamics 365 / Dataverse: refresh-token grant at the cloud's Entra ID authority, then WhoAmI.

use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, ClientSecret, RefreshToken, Scope, TokenResponse, TokenUrl};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::classify::Endpoint;
use super::http::{Http, OAuthHttp, host_label};
use super::salesforce::grant_error;
use super::{Credentials, Failure, Grant, GrantDetail, Session, reason, rotated, rules};
use crate::api::ConnectionSpec;

/// WhoAmI's answer (only what we use).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WhoAmI {
    organization_id: String,
    user_id: String,
}

/// What the token grant established, carried to the WhoAmI call.
pub(crate) struct DynamicsGrant {
    environment: url::Url,
}

impl DynamicsGrant {
    /// The grant an earlier token request established (only the environment, from the spec): the
    /// WhoAmI call then checks the access token still held, with no token request.
    pub(crate) fn current(http: &Http, spec: &ConnectionSpec) -> Result<Self, Failure> {
        let Some(dynamics) = &spec.dynamics else {
            return Err(Failure::configuration(
                reason::DYNAMICS_SETTINGS_MISSING,
                "spec.dynamics (environmentUrl, cloud, tenantId) is required for a Dynamics365 connection",
            ));
        };
        Ok(DynamicsGrant {
            environment: rules::dynamics_environment_base(dynamics, &http.hosts)?,
        })
    }
}

/// The refresh-token grant at the cloud's Entra ID authority. Entra returns a new refresh token on
/// every refresh: the caller keeps the newest before calling [`identify`].
pub(crate) async fn refresh(
    http: &Http,
    authority_override: Option<&url::Url>,
    spec: &ConnectionSpec,
    creds: &Credentials,
) -> Result<Grant, Failure> {
    let Some(dynamics) = &spec.dynamics else {
        return Err(Failure::configuration(
            reason::DYNAMICS_SETTINGS_MISSING,
            "spec.dynamics (environmentUrl, cloud, tenantId) is required for a Dynamics365 connection",
        ));
    };
    // Configuration errors are reported before any network call.
    let environment = rules::dynamics_environment_base(dynamics, &http.hosts)?;
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
    let expires_at = token
        .expires_in()
        .and_then(|d| k8s_openapi::jiff::SignedDuration::try_from(d).ok())
        .and_then(|d| requested_at.checked_add(d).ok());
    Ok(Grant {
        access_token: SecretString::from(token.access_token().secret().as_str()),
        expires_at,
        rotated_refresh_token: rotated(&creds.refresh_token, token.refresh_token()),
        detail: GrantDetail::Dynamics(DynamicsGrant { environment }),
    })
}

/// WhoAmI with the granted access token.
pub(crate) async fn identify(
    http: &Http,
    grant: &DynamicsGrant,
    access_token: &SecretString,
    expires_at: Option<k8s_openapi::jiff::Timestamp>,
    previous_remote_id: Option<&str>,
) -> Result<Session, Failure> {
    let environment = &grant.environment;
    let whoami_url = rules::whoami_url(environment);
    let whoami: WhoAmI = http
        .get_json(
            Endpoint::DataverseWhoAmI,
            &whoami_url,
            access_token,
            "the WhoAmI JSON",
        )
        .await?;
    if let Some(previous) = previous_remote_id
        && !rules::same_guid(previous, &whoami.organization_id)
    {
        return Err(Failure::permanent(
            reason::ORG_ID_CHANGED,
            format!(
                "Connection inactive: {} now belongs to organization {} but this connection was validated for {previous} (the environment was reset, copied or replaced); re-authorize, or create a new Connection",
                rules::origin_string(environment),
                whoami.organization_id
            ),
        ));
    }
    Ok(Session {
        remote_id: rules::display_text(&whoami.organization_id),
        user: rules::display_text(&whoami.user_id),
        instance_url: rules::origin_string(environment),
        access_token: access_token.clone(),
        expires_at,
        rotated_refresh_token: None,
    })
}
