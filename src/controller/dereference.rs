//! Step 1: read what a reconcile depends on. Reads only; no writes.

use super::cached::CachedConnection;
use super::index::Index;
use super::{Context, Error, children};
use crate::api::{Connection, OrgSettings};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

/// What exists in the cluster for one connection.
pub struct Observed {
    /// The user's credentials Secret (the seed), if it exists.
    pub credentials: Option<Secret>,
    /// `<name>-token`, the operator-owned Secret holding the live refresh token, if any.
    pub token: Option<Secret>,
    /// The session Secret the operator wrote last, if any.
    pub session: Option<Secret>,
    /// The retriever Deployment, if any.
    pub deployment: Option<Deployment>,
    /// The retriever's ServiceAccount and RoleBinding, if any.
    pub service_account: Option<ServiceAccount>,
    pub role_binding: Option<RoleBinding>,
}

impl Observed {
    /// Every child, named by kind, for the ownership check.
    pub fn children(&self) -> [(&'static str, Option<&kube::api::ObjectMeta>); 5] {
        [
            ("Secret", self.token.as_ref().map(|s| &s.metadata)),
            ("Secret", self.session.as_ref().map(|s| &s.metadata)),
            ("Deployment", self.deployment.as_ref().map(|d| &d.metadata)),
            (
                "ServiceAccount",
                self.service_account.as_ref().map(|s| &s.metadata),
            ),
            ("RoleBinding", self.role_binding.as_ref().map(|r| &r.metadata)),
        ]
    }
}

/// The OrgSettings `key` in `ns`, if it exists.
pub async fn org_settings(ctx: &Context, ns: &str, key: &str) -> Result<Option<OrgSettings>, Error> {
    Ok(Api::<OrgSettings>::namespaced(ctx.client.clone(), ns)
        .get_opt(key)
        .await?)
}

pub async fn observe(ctx: &Context, conn: &Connection, ns: &str) -> Result<Observed, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let (session_name, retriever_name) = (
        children::session_secret_name(conn),
        children::retriever_name(conn),
    );
    let token_name = super::tokens::token_secret_name(conn);
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), ns);
    // All six at once: over the operator's HTTP/2 connection (`crate::kube_client`) they are six
    // streams, not six connections.
    let (credentials, token, session, deployment, service_account, role_binding) = futures::try_join!(
        secrets.get_opt(&conn.spec.credentials_secret_ref.name),
        secrets.get_opt(&token_name),
        secrets.get_opt(&session_name),
        deployments.get_opt(&retriever_name),
        accounts.get_opt(&retriever_name),
        bindings.get_opt(&retriever_name),
    )?;
    Ok(Observed {
        credentials,
        token,
        session,
        deployment,
        service_account,
        role_binding,
    })
}

/// The connections (in the Secret's namespace) that reference `secret`.
pub fn connections_using_secret(
    index: &Index,
    secret: &impl ResourceExt,
) -> Vec<ObjectRef<DeserializeGuard<CachedConnection>>> {
    match secret.namespace() {
        Some(ns) => index.using_secret(&ns, &secret.name_any()),
        None => vec![],
    }
}

/// The connections (in its namespace) whose retriever runs with `settings`: those of its org.
pub fn connections_using_org_settings(
    index: &Index,
    settings: &impl ResourceExt,
) -> Vec<ObjectRef<DeserializeGuard<CachedConnection>>> {
    match settings.namespace() {
        Some(ns) => index.using_org(&ns, &settings.name_any()),
        None => vec![],
    }
}

/// The other connections claiming the same org as `changed` (so they re-decide who holds it):
/// in its namespace only when `namespaced` (claims are then per namespace).
pub fn rivals_of(
    index: &Index,
    changed: &DeserializeGuard<CachedConnection>,
    namespaced: bool,
) -> Vec<ObjectRef<DeserializeGuard<CachedConnection>>> {
    let Ok(changed) = &changed.0 else { return vec![] };
    let Some(remote) = changed.remote_id() else {
        return vec![];
    };
    index.rivals(
        remote,
        &changed.namespace().unwrap_or_default(),
        &changed.name_any(),
        namespaced,
    )
}
