//! The `Connection` custom resource: a team's connection to one CRM org or environment.
//!
//! Every field carries a doc comment: it becomes the text of `kubectl explain`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Rule text shared by every URL field: https, or plain http on a loopback host (for local testing).
pub const HTTPS_URL_RULE: &str = "isURL(self) && (url(self).getScheme() == 'https' || (url(self).getScheme() == 'http' && url(self).getHostname() in ['127.0.0.1', '::1']))";
/// Message of [`HTTPS_URL_RULE`].
pub const HTTPS_URL_MESSAGE: &str =
    "must be an https:// URL (plain http is accepted only for 127.0.0.1 and [::1], for testing)";

/// Declares that a team's jobs are retrieved from one Salesforce org or Dynamics 365 environment.
///
/// The operator validates the OAuth tokens in `spec.credentialsSecretRef`, records which org or
/// environment they belong to, and runs a job retriever while the connection is active and not paused.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "crmconnect.io",
    version = "v1alpha1",
    kind = "Connection",
    plural = "connections",
    namespaced,
    shortname = "conn",
    category = "crm",
    status = "ConnectionStatus",
    derive = "PartialEq",
    // The operator writes `<name>-session` and `<name>-token`; reading the seed from either would
    // refresh in a loop.
    validation = Rule::new("!(self.spec.credentialsSecretRef.name in [self.metadata.name + '-session', self.metadata.name + '-token'])")
        .message("spec.credentialsSecretRef must not name the connection's own session or token Secret (<name>-session, <name>-token), which the operator writes")
        .reason(Reason::FieldValueInvalid),
    doc = "A team's connection to a Salesforce org or Dynamics 365 environment. The operator validates its OAuth tokens, marks it inactive when they are revoked or expired, and runs a job retriever while it is active and not paused.",
    printcolumn(
        name = "Team",
        type_ = "string",
        json_path = ".spec.team",
        description = "Team that owns the connection"
    ),
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".spec.provider",
        description = "CRM provider"
    ),
    printcolumn(
        name = "State",
        type_ = "string",
        json_path = ".status.state",
        description = "Pending, Active, Inactive, Paused or Conflict"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.reason",
        description = "Machine-readable reason for the state"
    ),
    printcolumn(
        name = "Org",
        type_ = "string",
        json_path = ".status.remoteId",
        description = "Salesforce org ID or Dynamics 365 environment ID"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Display Name",
        type_ = "string",
        json_path = ".spec.displayName",
        priority = 1,
        description = "Display name"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1,
        description = "What happened and what to do (kubectl get -o wide)"
    )
)]
#[x_kube(validation = Rule::new("self.provider == 'Dynamics365' ? has(self.dynamics) : !has(self.dynamics)")
    .message("spec.dynamics is required when provider is Dynamics365 and forbidden otherwise")
    .reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("self.provider != 'Dynamics365' || !has(self.salesforce)")
    .message("spec.salesforce is only allowed for SalesforceProduction and SalesforceSandbox")
    .reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSpec {
    /// The team that owns this connection (a DNS label, 1-63 characters). An org or environment
    /// can be connected to one team only. Immutable: create a new Connection to move it.
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("team is immutable; create a new Connection for another team"))]
    pub team: String,

    /// The CRM this connection talks to: SalesforceProduction, SalesforceSandbox or Dynamics365.
    /// Immutable: create a new Connection to change it.
    #[x_kube(validation = Rule::new("self == oldSelf").message("provider is immutable; create a new Connection for another provider"))]
    pub provider: Provider,

    /// Salesforce settings (only for SalesforceProduction and SalesforceSandbox; optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salesforce: Option<SalesforceSpec>,

    /// Dynamics 365 settings: required when provider is Dynamics365, forbidden otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamics: Option<DynamicsSpec>,

    /// The Secret in this namespace holding the OAuth tokens: keys `refresh_token` and `client_id`
    /// (required), `client_secret` and `access_token` (optional). Updating it re-authorizes the connection.
    pub credentials_secret_ref: SecretRef,

    /// A human-friendly name for the connection (up to 128 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub display_name: Option<String>,

    /// What this connection is for (up to 1024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Pause the connection: no jobs are retrieved while true, and queued jobs wait ("Holding").
    /// Set back to false to activate it again. Job history is kept either way.
    #[serde(default)]
    pub paused: bool,

    /// Acceptance of the data processing agreement the cluster administrator requires (operator
    /// flag `--agreement-version`, chart value `agreement`). While one is required and this does not
    /// name its version, the connection stays Pending (reason AgreementNotAccepted) and its tokens
    /// are not used. `kubectl crm connect` shows the agreement and fills this in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<AgreementAcceptance>,
}

/// Who accepted which version of the data processing agreement, and when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgreementAcceptance {
    /// The version accepted, e.g. 2026-01.
    #[schemars(length(min = 1, max = 64))]
    pub version: String,
    /// The Kubernetes user who accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub accepted_by: Option<String>,
    /// When it was accepted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// The data processing agreement a connection must accept, as the status shows it while it has not.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequiredAgreement {
    /// The agreement's name, e.g. "Data Processing Agreement".
    pub name: String,
    /// The version to accept (spec.agreement.version).
    pub version: String,
    /// Where to read it.
    pub url: String,
}

impl ConnectionSpec {
    /// A spec with the given team, provider and credentials Secret, everything else defaulted
    /// (not paused, no provider-specific settings).
    pub fn new(team: impl Into<String>, provider: Provider, credentials_secret: impl Into<String>) -> Self {
        Self {
            team: team.into(),
            provider,
            salesforce: None,
            dynamics: None,
            credentials_secret_ref: SecretRef {
                name: credentials_secret.into(),
            },
            display_name: None,
            description: None,
            paused: false,
            agreement: None,
        }
    }
}

/// The CRM provider of a connection.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Provider {
    /// A Salesforce Production org (login.salesforce.com or My Domain).
    SalesforceProduction,
    /// A Salesforce Sandbox org (test.salesforce.com or My Domain).
    SalesforceSandbox,
    /// A Microsoft Dynamics 365 (Dataverse) environment.
    Dynamics365,
}

impl Provider {
    /// The name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::SalesforceProduction => "SalesforceProduction",
            Provider::SalesforceSandbox => "SalesforceSandbox",
            Provider::Dynamics365 => "Dynamics365",
        }
    }
}

impl std::str::FromStr for Provider {
    type Err = String;

    /// The name as written in manifests (exact).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Provider::SalesforceProduction,
            Provider::SalesforceSandbox,
            Provider::Dynamics365,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| format!("unknown provider {s:?}"))
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Salesforce-specific settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SalesforceSpec {
    /// Login host used for the OAuth token grant, e.g. a My Domain URL
    /// (https://acme.my.salesforce.com). Defaults to https://login.salesforce.com for
    /// SalesforceProduction and https://test.salesforce.com for SalesforceSandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new(HTTPS_URL_RULE).message(HTTPS_URL_MESSAGE))]
    pub login_url: Option<String>,
}

/// Dynamics 365 (Dataverse) settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DynamicsSpec {
    /// The environment URL, e.g. https://contoso.crm.dynamics.com. Its domain must belong to the cloud.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new(HTTPS_URL_RULE).message(HTTPS_URL_MESSAGE))]
    pub environment_url: String,

    /// The Microsoft cloud hosting the environment: Public (default), GCC, GCCHigh, DoD or China.
    /// If unsure, it is most likely Public.
    #[serde(default)]
    pub cloud: Cloud,

    /// The Entra ID tenant (ID or domain) used for the token grant. Defaults to `organizations`.
    #[serde(default = "default_tenant")]
    #[schemars(length(min = 1, max = 256), pattern(r"^[A-Za-z0-9.-]+$"))]
    pub tenant_id: String,
}

fn default_tenant() -> String {
    "organizations".to_string()
}

/// The Microsoft cloud a Dynamics 365 environment lives in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, schemars::JsonSchema)]
pub enum Cloud {
    /// Commercial public cloud (the default).
    #[default]
    Public,
    /// US Government Community Cloud.
    #[serde(rename = "GCC")]
    Gcc,
    /// US Government Community Cloud High.
    #[serde(rename = "GCCHigh")]
    GccHigh,
    /// US Department of Defense cloud.
    #[serde(rename = "DoD")]
    Dod,
    /// Microsoft Azure operated by 21Vianet (China).
    China,
}

/// A reference to a Secret in the Connection's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Observed state of a Connection. Written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// Pending (not validated yet), Active, Inactive (tokens revoked, expired or misconfigured),
    /// Paused, or Conflict (the org or environment belongs to another connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,

    /// Machine-readable CamelCase reason for the state, e.g. TokenRevoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// Human-readable explanation, e.g. "Connection inactive: the refresh token was revoked".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// The Salesforce org ID the tokens belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,

    /// The Dynamics 365 environment (organization) ID the tokens belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_id: Option<String>,

    /// The org ID or environment ID, whichever the provider has (the ORG column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,

    /// The API base URL of the org or environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_url: Option<String>,

    /// The CRM user the tokens act as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,

    /// The OrgSettings (in this namespace) whose job settings the retriever uses: named after the
    /// org, shared by every connection ever made for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_settings: Option<String>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Authorized and RetrieverReady conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The value of the `crmconnect.io/revalidate` annotation the operator last acted on (it
    /// validated the tokens with the provider for it); `kubectl crm check` waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_revalidate: Option<String>,

    /// The data processing agreement to accept (set while the state is Pending with reason
    /// AgreementNotAccepted): put its version in spec.agreement.version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_agreement: Option<RequiredAgreement>,
}

/// The state of a connection, as shown in `kubectl get connections`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum State {
    /// Not validated yet.
    Pending,
    /// Tokens valid, not paused, the org or environment is this connection's: jobs are retrieved.
    Active,
    /// "Connection inactive": the tokens were revoked or expired, or the configuration is wrong.
    Inactive,
    /// Paused by the user: no jobs are retrieved.
    Paused,
    /// The org or environment is claimed by another connection.
    Conflict,
}

impl State {
    /// The name as shown in status.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "Pending",
            State::Active => "Active",
            State::Inactive => "Inactive",
            State::Paused => "Paused",
            State::Conflict => "Conflict",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
