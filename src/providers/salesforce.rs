//! Salesforce: refresh-token grant at the login host, signature check, identity URL.

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, Client, ClientId, ClientSecret, EndpointNotSet, EndpointSet, ExtraTokenFields, RefreshToken,
    RequestTokenError, StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::classify::{self, Endpoint};
use super::http::{Http, HttpFailure, OAuthHttp, host_label};
use super::{Credentials, Failure, Grant, GrantDetail, Session, reason, rotated, rules};
use crate::api::ConnectionSpec;

/// The Salesforce-specific fields of the token response (there is no `expires_in`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SalesforceTokenFields {
    pub(crate) instance_url: String,
    /// `https://<host>/id/<orgId>/<userId>`.
    pub(crate) id: String,
    /// Epoch milliseconds, as a string.
    pub(crate) issued_at: String,
    /// Base64 HMAC-SHA256 of `id` + `issued_at`, keyed with the client secret.
    #[serde(default)]
    pub(crate) signature: Option<String>,
}

impl ExtraTokenFields for SalesforceTokenFields {}

pub(crate) type SalesforceTokenResponse = StandardTokenResponse<SalesforceTokenFields, BasicTokenType>;

type SalesforceClient = Client<
    BasicErrorResponse,
    SalesforceTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// The identity URL's answer (only what we use).
#[derive(Debug, Deserialize)]
struct Identity {
    organization_id: String,
    username: String,
}

/// Maps the oauth2 crate's error to our classification (HTTP-level failures are already classified).
pub(crate) fn grant_error<TE: oauth2::ErrorResponse>(
    endpoint: Endpoint,
    host: &str,
    error: RequestTokenError<HttpFailure, TE>,
) -> Failure {
    match error {
        RequestTokenError::Request(HttpFailure(failure)) => failure,
        RequestTokenError::Parse(e, _) => classify::malformed_success(
            endpoint,
            host,
            &format!("missing or invalid JSON at `{}`", e.path()),
        ),
        RequestTokenError::Other(problem) => classify::malformed_success(endpoint, host, &problem),
        RequestTokenError::ServerResponse(_) => {
            classify::malformed_success(endpoint, host, "an error object")
        }
    }
}

/// What the token grant established, carried to the identity call.
pub(crate) struct SalesforceGrant {
    login_host: String,
    instance_url: String,
    id: String,
}

impl SalesforceGrant {
    /// The identity URL (`id`) the grant named: not a secret, kept with the session so a later
    /// check can ask who the same access token belongs to.
    pub(crate) fn identity_url(&self) -> &str {
        &self.id
    }

    /// The grant an earlier token request established, from what was kept of it (the session's
    /// `instance_url` and the identity URL): the identity call then checks the access token still
    /// held, with no token request. The hosts are checked as for a new grant.
    pub(crate) fn current(
        http: &Http,
        spec: &ConnectionSpec,
        instance_url: &str,
        identity_url: &str,
    ) -> Result<Self, Failure> {
        let login = rules::salesforce_login_base(spec, &http.hosts)?;
        Ok(SalesforceGrant {
            login_host: host_label(&rules::salesforce_token_url(&login)),
            instance_url: instance_url.to_string(),
            id: identity_url.to_string(),
        })
    }
}

/// The refresh-token grant, verified. The old refresh token may be dead when this returns `Ok`
/// with a rotated token: the caller saves it before calling [`identify`].
pub(crate) async fn refresh(
    http: &Http,
    spec: &ConnectionSpec,
    creds: &Credentials,
) -> Result<Grant, Failure> {
    let login = rules::salesforce_login_base(spec, &http.hosts)?;
    let token_url = rules::salesforce_token_url(&login);
    let login_host = host_label(&token_url);

    let mut client: SalesforceClient = Client::new(ClientId::new(creds.client_id.clone()))
        .set_token_uri(TokenUrl::from_url(token_url))
        .set_auth_type(AuthType::RequestBody);
    if let Some(secret) = &creds.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_string()));
    }
    let refresh_token = RefreshToken::new(creds.refresh_token.expose_secret().to_string());
    let send = OAuthHttp {
        http,
        endpoint: Endpoint::SalesforceToken,
    };
    let token = client
        .exchange_refresh_token(&refresh_token)
        .request_async(&send)
        .await
        .map_err(|e| grant_error(Endpoint::SalesforceToken, &login_host, e))?;
    let fields = token.extra_fields();

    // Verify before trusting anything in the answer, including a rotated refresh token.
    if let Some(secret) = &creds.client_secret
        && !rules::salesforce_signature_valid(
            &fields.id,
            &fields.issued_at,
            fields.signature.as_deref(),
            secret.expose_secret(),
        )
    {
        return Err(Failure::permanent(
            reason::SIGNATURE_MISMATCH,
            format!(
                "Connection inactive: the token response from {login_host} has a {} signature (HMAC-SHA256 of id + issued_at with the client secret); the answer is not trusted — check client_secret in the Secret and re-authorize",
                if fields.signature.is_some() {
                    "wrong"
                } else {
                    "missing"
                }
            ),
        ));
    }
    Ok(Grant {
        access_token: SecretString::from(token.access_token().secret().as_str()),
        expires_at: None,
        rotated_refresh_token: rotated(&creds.refresh_token, token.refresh_token()),
        detail: GrantDetail::Salesforce(SalesforceGrant {
            login_host,
            instance_url: fields.instance_url.clone(),
            id: fields.id.clone(),
        }),
    })
}

/// The identity call with the granted access token.
pub(crate) async fn identify(
    http: &Http,
    grant: &SalesforceGrant,
    access_token: &SecretString,
    previous_remote_id: Option<&str>,
) -> Result<Session, Failure> {
    let login_host = &grant.login_host;
    // The retriever will send the access token there: https to a Salesforce host only.
    let Ok(instance) = url::Url::parse(&grant.instance_url) else {
        return Err(classify::malformed_success(
            Endpoint::SalesforceToken,
            login_host,
            "`instance_url` is not a URL",
        ));
    };
    if !rules::is_allowed_transport(&instance) {
        return Err(classify::malformed_success(
            Endpoint::SalesforceToken,
            login_host,
            "`instance_url` is not an https URL",
        ));
    }
    http.hosts
        .require(&instance, &format!("the instance_url from {login_host}"))?;
    let Some((identity_url, url_org, _user)) = rules::parse_salesforce_identity_url(&grant.id) else {
        return Err(classify::malformed_success(
            Endpoint::SalesforceToken,
            login_host,
            "`id` is not an identity URL https://<host>/id/<orgId>/<userId>",
        ));
    };
    let identity_host = host_label(&identity_url);
    let identity: Identity = http
        .get_json(
            Endpoint::SalesforceIdentity,
            &identity_url,
            access_token,
            "the identity JSON",
        )
        .await?;
    if !rules::same_salesforce_id(&identity.organization_id, &url_org) {
        return Err(classify::malformed_success(
            Endpoint::SalesforceIdentity,
            &identity_host,
            "organization_id does not match the identity URL",
        ));
    }
    if let Some(previous) = previous_remote_id
        && !rules::same_salesforce_id(previous, &identity.organization_id)
    {
        return Err(Failure::permanent(
            reason::ORG_ID_CHANGED,
            format!(
                "Connection inactive: the tokens now belong to org {} but this connection was validated for org {previous} (a refreshed sandbox gets a new org ID); re-authorize, or create a new Connection for the new org",
                identity.organization_id
            ),
        ));
    }
    Ok(Session {
        remote_id: rules::display_text(&identity.organization_id),
        user: rules::display_text(&identity.username),
        instance_url: grant.instance_url.trim_end_matches('/').to_string(),
        access_token: access_token.clone(),
        expires_at: None,
        rotated_refresh_token: None,
    })
}
