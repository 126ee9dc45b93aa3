//! The `OrgClaim` custom resource: which connection holds an org or environment. Cluster-scoped,
//! named by the org key, written only by the operator (the chart grants no one else any verb on it):
//! created if absent (the first connection to prove its tokens valid for the org wins, atomically
//! in the API server), passed on with a write conditional on the version read.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Which connection holds an org or environment: one team per org. Named by the org key
/// (sf-<18-character org ID, lowercased> or d365-<environment ID>) for an operator watching all
/// namespaces; `<namespace>.<org key>` for one installed for one namespace. Written only by the
/// operator.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[kube(
    group = "crmconnect.io",
    version = "v1alpha1",
    kind = "OrgClaim",
    plural = "orgclaims",
    derive = "PartialEq",
    doc = "Which connection holds an org or environment (one team per org), named by the org key (by <namespace>.<org key> for an operator installed for one namespace). Written only by the operator: created by the first connection whose tokens prove valid for the org, kept while it is Active or Paused, passed on when it is deleted or its tokens are refused.",
    printcolumn(
        name = "Namespace",
        type_ = "string",
        json_path = ".spec.holder.namespace",
        description = "The holder's namespace"
    ),
    printcolumn(
        name = "Connection",
        type_ = "string",
        json_path = ".spec.holder.name",
        description = "The holder"
    ),
    printcolumn(
        name = "Team",
        type_ = "string",
        json_path = ".spec.holder.team",
        description = "The holder's team"
    ),
    printcolumn(
        name = "Held",
        type_ = "boolean",
        json_path = ".spec.held",
        description = "False once the holder's tokens were refused: the next valid connection takes the org"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct OrgClaimSpec {
    /// The connection holding the org.
    pub holder: ClaimHolder,
    /// True while the holder keeps the org (Active or Paused); false once its tokens were refused,
    /// when the next connection whose tokens are valid for the org takes it.
    pub held: bool,
}

/// A connection holding an org.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimHolder {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID: a Connection deleted and created again under the same name is another holder.
    pub uid: String,
    /// Its team.
    pub team: String,
}
