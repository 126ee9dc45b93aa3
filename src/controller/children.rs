//! The objects a Connection owns, built as values: the session Secret the retriever reads, the
//! retriever Deployment, and the retriever's ServiceAccount and RoleBinding. Pure: no client here.

use crate::api::{Connection, OrgSettingsSpec};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use std::collections::BTreeMap;
use std::time::Duration;

/// The operator's field manager for every server-side apply.
pub const FIELD_MANAGER: &str = "connection-operator";
/// Label on every object the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "connection-operator");
/// Label naming the Connection an object belongs to.
pub const CONNECTION_LABEL: &str = crate::api::labels::CONNECTION;
/// Label on the user's credentials Secrets, so the operator watches those and no other Secret.
pub const CREDENTIALS_LABEL: &str = "crmconnect.io/credentials";
/// Label on session Secrets.
pub const SESSION_LABEL: &str = "crmconnect.io/session";
/// Annotation on the Deployment: a digest of its desired spec, so an unchanged one is not re-applied.
pub const SPEC_DIGEST_ANNOTATION: &str = "crmconnect.io/spec-digest";
/// Where retriever pods find the session Secret.
pub const SESSION_MOUNT: &str = "/var/run/crmconnect/session";
/// The retriever container's probe port (`/healthz`, `/readyz`).
pub const RETRIEVER_PROBE_PORT: i32 = 8081;
/// The uid and gid retriever pods (and the operator) run as; the session volume is readable by this
/// group (`fsGroup`).
pub const RUN_AS: i64 = 65532;

/// The keys of the session Secret (each becomes a file in the retriever's volume).
pub mod session_keys {
    /// The current access token (the only secret in the session Secret).
    pub const ACCESS_TOKEN: &str = "access_token";
    /// The CRM's API base URL.
    pub const INSTANCE_URL: &str = "instance_url";
    /// The connection's provider (`SalesforceProduction`, `SalesforceSandbox`, `Dynamics365`).
    pub const PROVIDER: &str = "provider";
    /// When the access token expires (RFC 3339); only when the provider said.
    pub const EXPIRES_AT: &str = "expires_at";
    /// The operator's extra CA bundle (PEM; not a secret), so the retriever trusts the same CRM
    /// hosts the operator does (a TLS-inspecting proxy, a test CA); only when there is one.
    pub const CA_BUNDLE: &str = "ca.crt";
}

/// Settings of retriever workloads (operator flags / Helm values).
#[derive(Clone, Debug, PartialEq)]
pub struct RetrieverSettings {
    pub image: String,
    pub pull_policy: String,
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// The chart's ClusterRole each retriever's ServiceAccount is bound to (in its namespace):
    /// create/get/list/watch JobRuns and patch their status, nothing else.
    pub cluster_role: String,
    /// `/etc/hosts` entries of retriever pods (the chart passes the operator pod's own), so a
    /// retriever reaches the CRM hosts exactly as the operator does.
    pub host_aliases: Vec<k8s_openapi::api::core::v1::HostAlias>,
}

/// The default of [`RetrieverSettings::cluster_role`]: what the chart names it for a release
/// called `connection-operator`.
pub const DEFAULT_RETRIEVER_CLUSTER_ROLE: &str = "crmconnect:connection-operator:retriever";

/// The org a retriever works for: its key and its OrgSettings, and the names of the JobTemplates
/// that can run its jobs (those allowing the connection's provider).
#[derive(Clone, Debug, PartialEq)]
pub struct OrgJobs<'a> {
    pub key: &'a str,
    pub settings: &'a OrgSettingsSpec,
    pub templates: &'a [String],
}

/// The CRM job types the retriever claims: only those a JobTemplate can run. With the org's
/// `allowedJobTypes` set, those of them whose template (by [`crate::api::template_name`]) is in
/// `templates`; else, for each template, its name and the same with `_` or `.` for every `-` (the
/// spellings whose template it is; the CRMs compare types case-insensitively, so `Record_Count`
/// is found as `record_count`). Empty: no job can run, nothing is claimed.
pub fn claimable_types(allowed: &[String], templates: &[String]) -> Vec<String> {
    let mut types: Vec<String> = Vec::new();
    let mut add = |t: String| {
        if !types.contains(&t) {
            types.push(t);
        }
    };
    if allowed.is_empty() {
        for name in templates {
            add(name.clone());
            add(name.replace('-', "_"));
            add(name.replace('-', "."));
        }
    } else {
        for t in allowed {
            if templates.contains(&crate::api::template_name(t)) {
                add(t.clone());
            }
        }
    }
    types
}

/// The names of the JobTemplates that can run `provider`'s jobs (sorted: the retriever's flags,
/// and so its Deployment, do not change with the order templates are listed in).
pub fn runnable_templates<'t>(
    templates: impl IntoIterator<Item = &'t crate::api::JobTemplate>,
    provider: crate::api::Provider,
) -> Vec<String> {
    let mut names: Vec<String> = templates
        .into_iter()
        .filter(|t| t.spec.allows(provider))
        .filter_map(|t| t.metadata.name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

impl Default for RetrieverSettings {
    fn default() -> Self {
        Self {
            image: "ghcr.io/crmconnect/connection-operator:0.1.0".into(),
            pull_policy: "IfNotPresent".into(),
            cpu_request: "10m".into(),
            cpu_limit: "200m".into(),
            memory_request: "32Mi".into(),
            memory_limit: "128Mi".into(),
            cluster_role: DEFAULT_RETRIEVER_CLUSTER_ROLE.into(),
            host_aliases: Vec::new(),
        }
    }
}

pub fn session_secret_name(conn: &Connection) -> String {
    format!("{}-session", conn.metadata.name.as_deref().unwrap_or_default())
}

pub fn retriever_name(conn: &Connection) -> String {
    format!("{}-retriever", conn.metadata.name.as_deref().unwrap_or_default())
}

pub(crate) fn labels(conn: &Connection, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (
            "app.kubernetes.io/name".to_string(),
            "connection-retriever".to_string(),
        ),
        ("app.kubernetes.io/component".to_string(), role.to_string()),
        (
            CONNECTION_LABEL.to_string(),
            conn.metadata.name.clone().unwrap_or_default(),
        ),
    ])
}

pub(crate) fn owned_meta(conn: &Connection, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: conn.metadata.namespace.clone(),
        labels: Some(labels),
        owner_references: conn.controller_owner_ref(&()).map(|r| vec![r]),
        ..Default::default()
    }
}

/// What the session Secret holds. `access_token` is the only secret in it; never the refresh token.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionData {
    pub access_token: String,
    pub instance_url: String,
    /// Expiry hint (RFC 3339), when the provider gave one.
    pub expires_at: Option<String>,
    /// The operator's extra CA bundle (PEM), when it has one.
    pub ca_bundle: Option<Vec<u8>>,
    /// Bookkeeping annotations (what was validated and when the next check is due).
    pub annotations: BTreeMap<String, String>,
}

impl std::fmt::Debug for SessionData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionData")
            .field("access_token", &"<redacted>")
            .field("instance_url", &self.instance_url)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The session Secret `<name>-session`, owned by the connection.
pub fn session_secret(conn: &Connection, session: &SessionData) -> Secret {
    let mut meta = owned_meta(conn, session_secret_name(conn), {
        let mut l = labels(conn, "session");
        l.insert(SESSION_LABEL.to_string(), "true".to_string());
        l
    });
    meta.annotations = Some(session.annotations.clone());
    let mut data = BTreeMap::from([
        (
            session_keys::ACCESS_TOKEN.to_string(),
            ByteString(session.access_token.as_bytes().to_vec()),
        ),
        (
            session_keys::INSTANCE_URL.to_string(),
            ByteString(session.instance_url.as_bytes().to_vec()),
        ),
        (
            session_keys::PROVIDER.to_string(),
            ByteString(conn.spec.provider.as_str().as_bytes().to_vec()),
        ),
    ]);
    if let Some(exp) = &session.expires_at {
        data.insert(
            session_keys::EXPIRES_AT.to_string(),
            ByteString(exp.as_bytes().to_vec()),
        );
    }
    if let Some(pem) = &session.ca_bundle {
        data.insert(session_keys::CA_BUNDLE.to_string(), ByteString(pem.clone()));
    }
    Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The retriever's ServiceAccount `<name>-retriever`: its only rights come from
/// [`retriever_role_binding`].
pub fn retriever_service_account(conn: &Connection) -> ServiceAccount {
    ServiceAccount {
        metadata: owned_meta(conn, retriever_name(conn), labels(conn, "retriever")),
        ..Default::default()
    }
}

/// Binds the retriever's ServiceAccount, in the connection's namespace only, to the chart's
/// retriever ClusterRole.
pub fn retriever_role_binding(conn: &Connection, settings: &RetrieverSettings) -> RoleBinding {
    RoleBinding {
        metadata: owned_meta(conn, retriever_name(conn), labels(conn, "retriever")),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: settings.cluster_role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: retriever_name(conn),
            namespace: conn.metadata.namespace.clone(),
            ..Default::default()
        }]),
    }
}

/// The retriever's flags for the org's job settings (durations in seconds).
pub fn job_args(org: &OrgJobs<'_>) -> Vec<String> {
    let seconds = |raw: &str, default: &str| {
        let d = crate::cli::parse_duration(raw)
            .or_else(|_| crate::cli::parse_duration(default))
            .unwrap_or(Duration::from_secs(300));
        format!("{}s", d.as_secs().max(60))
    };
    let s = org.settings;
    let defaults = OrgSettingsSpec::default();
    let mut args = vec![
        "--org-key".to_string(),
        org.key.to_string(),
        format!("--auto-run-jobs={}", s.auto_run_jobs),
        "--poll-interval".into(),
        seconds(&s.poll_interval, &defaults.poll_interval),
        "--max-concurrent-jobs".into(),
        s.max_concurrent_jobs.clamp(1, 100).to_string(),
        "--max-claims-per-poll".into(),
        s.max_claims_per_poll.clamp(1, 100).to_string(),
        "--claim-lease".into(),
        seconds(&s.claim_lease, &defaults.claim_lease),
    ];
    let types = claimable_types(&s.allowed_job_types, org.templates);
    if types.is_empty() {
        args.push("--no-job-templates".into());
    } else {
        args.push("--allowed-job-types".into());
        args.push(types.join(","));
    }
    args
}

/// The retriever Deployment `<name>-retriever`: `replicas` is 1 while the connection is Active, else 0.
/// `org` is the org it works for (known once the tokens were validated; a Deployment without it has
/// no replicas).
pub fn retriever_deployment(
    conn: &Connection,
    settings: &RetrieverSettings,
    org: Option<&OrgJobs<'_>>,
    replicas: i32,
) -> Deployment {
    let replicas = if org.is_some() { replicas } else { 0 };
    let name = conn.metadata.name.clone().unwrap_or_default();
    let selector = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "connection-retriever".to_string(),
        ),
        (CONNECTION_LABEL.to_string(), name.clone()),
    ]);
    let quantity = |s: &str| Quantity(s.to_string());
    let container = Container {
        name: "retriever".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.pull_policy.clone()),
        args: Some(
            [
                "retrieve".into(),
                "--connection".into(),
                name.clone(),
                "--session-dir".into(),
                SESSION_MOUNT.into(),
                "--metrics-addr".into(),
                format!("0.0.0.0:{RETRIEVER_PROBE_PORT}"),
            ]
            .into_iter()
            .chain(org.map(job_args).unwrap_or_default())
            .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("probes".into()),
            container_port: RETRIEVER_PROBE_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        // Ready once the session was read; alive while the process answers.
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        env: Some(vec![
            downward("CONNECTION_NAMESPACE", "metadata.namespace"),
            downward("POD_NAME", "metadata.name"),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), quantity(&settings.cpu_request)),
                ("memory".to_string(), quantity(&settings.memory_request)),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".to_string(), quantity(&settings.cpu_limit)),
                ("memory".to_string(), quantity(&settings.memory_limit)),
            ])),
            ..Default::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![VolumeMount {
            name: "session".into(),
            mount_path: SESSION_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let pod = PodSpec {
        // Its own ServiceAccount, allowed only to record JobRuns of this connection.
        service_account_name: Some(retriever_name(conn)),
        automount_service_account_token: Some(true),
        host_aliases: (!settings.host_aliases.is_empty()).then(|| settings.host_aliases.clone()),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            // The session volume is mode 0440 (owner root): the pod reads it through its group.
            fs_group: Some(RUN_AS),
            ..restricted_pod_security()
        }),
        // On SIGTERM the retriever finishes the CRM request in flight (30 s timeout) and exits.
        termination_grace_period_seconds: Some(45),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "session".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(session_secret_name(conn)),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mut pod_labels = labels(conn, "retriever");
    pod_labels.extend(selector.clone());
    let spec = DeploymentSpec {
        replicas: Some(replicas),
        selector: LabelSelector {
            match_labels: Some(selector),
            ..Default::default()
        },
        // One retriever per org: never two pods during a rollout.
        strategy: Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            ..Default::default()
        }),
        template: PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(pod_labels),
                ..Default::default()
            }),
            spec: Some(pod),
        },
        ..Default::default()
    };
    let mut meta = owned_meta(conn, retriever_name(conn), labels(conn, "retriever"));
    meta.annotations = Some(BTreeMap::from([(
        SPEC_DIGEST_ANNOTATION.to_string(),
        digest(&spec),
    )]));
    Deployment {
        metadata: meta,
        spec,
        ..Default::default()
    }
}

fn downward(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
            field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                field_path: field_path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether an existing child object is this connection's: its controller owner reference names the
/// connection's UID. The operator never applies to, and so never takes over, an object it did not
/// create (a user's Secret named `<name>-session` would otherwise get the Connection as owner and be
/// garbage-collected with it).
pub fn is_ours(conn: &Connection, child: &ObjectMeta) -> bool {
    let Some(uid) = conn.metadata.uid.as_deref() else {
        return false;
    };
    child
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

/// The existing children that are not this connection's ("Secret acme-session", ...), in a stable
/// order; empty when every child is ours or absent.
pub fn foreign_children(conn: &Connection, children: &[(&str, Option<&ObjectMeta>)]) -> Vec<String> {
    children
        .iter()
        .filter_map(|(kind, meta)| meta.map(|m| (kind, m)))
        .filter(|(_, m)| !is_ours(conn, m))
        .map(|(kind, m)| format!("{kind} {}", m.name.as_deref().unwrap_or_default()))
        .collect()
}

/// Whether `existing` already is what `desired` asks for (same digest, same replica count).
pub fn deployment_up_to_date(existing: &Deployment, desired: &Deployment) -> bool {
    let annotation = |d: &Deployment| {
        d.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SPEC_DIGEST_ANNOTATION))
            .cloned()
    };
    let replicas = |d: &Deployment| d.spec.replicas;
    annotation(existing).is_some()
        && annotation(existing) == annotation(desired)
        && replicas(existing) == replicas(desired)
}

/// What the cluster shows of a connection's retriever Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetrieverObserved {
    /// A pod of the spec an active connection wants is available (Ready).
    Available,
    /// None is (yet): why, for the condition's message.
    NotAvailable(String),
}

/// Reads the retriever's availability from the observed Deployment. `wanted` is the Deployment an
/// active connection needs (one replica): an existing one that differs is about to be re-applied, so
/// what it shows is not the wanted retriever. Available means: the Deployment controller has seen the
/// current generation, and one updated replica is available (with the `Recreate` strategy there are
/// never old and new pods at once).
pub fn observe_retriever(existing: Option<&Deployment>, wanted: &Deployment) -> RetrieverObserved {
    // Absent, about to be written, or written and not yet seen by the Deployment controller: one
    // message, so the status written before this reconcile's own apply is the one the next
    // reconcile (which sees the written Deployment) would write; it wakes no one.
    let starting = || {
        RetrieverObserved::NotAvailable(
            "the Deployment controller has not yet rolled out the retriever's current spec".into(),
        )
    };
    let Some(existing) = existing.filter(|e| deployment_up_to_date(e, wanted)) else {
        return starting();
    };
    let Some(status) = &existing.status else {
        return starting();
    };
    let observed = status.observed_generation.unwrap_or(0);
    if existing.metadata.generation.is_none_or(|g| observed < g) {
        return starting();
    }
    let available = status.available_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    if available >= 1 && updated >= 1 {
        return RetrieverObserved::Available;
    }
    RetrieverObserved::NotAvailable(format!(
        "no retriever pod is ready yet ({} of {} pods ready)",
        status.ready_replicas.unwrap_or(0),
        status.replicas.unwrap_or(0).max(1)
    ))
}

/// Since when a retriever that had been running is down: its Deployment completed its rollout
/// (`Progressing` is `NewReplicaSetAvailable`: a pod was ready) and is now not `Available` (the pod
/// turned unready, e.g. because the CRM refused its session). `None` while it was never up (still
/// starting, an image that cannot be pulled) or is up.
pub fn retriever_down_since(existing: Option<&Deployment>) -> Option<k8s_openapi::jiff::Timestamp> {
    let conditions = existing?.status.as_ref()?.conditions.as_ref()?;
    let find = |type_: &str| conditions.iter().find(|c| c.type_.as_deref() == Some(type_));
    let rolled_out =
        find("Progressing").is_some_and(|c| c.reason.as_deref() == Some("NewReplicaSetAvailable"));
    let available = find("Available")?;
    (rolled_out && available.status.as_deref() == Some("False"))
        .then(|| available.last_transition_time.as_ref().map(|t| t.0))
        .flatten()
}

/// Whether the existing session Secret already holds the desired session: same data (token, URL,
/// expiry) and validated for the same inputs. Only the next-check bookkeeping may differ; a
/// revalidation that got the same session back then writes nothing.
pub fn session_up_to_date(existing: &Secret, desired: &Secret) -> bool {
    let fingerprint = |s: &Secret| {
        s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::schedule::FINGERPRINT_ANNOTATION))
            .cloned()
    };
    existing.data.is_some()
        && existing.data == desired.data
        && fingerprint(existing) == fingerprint(desired)
        && existing.metadata.owner_references == desired.metadata.owner_references
}

/// An HTTP GET probe on the named probe port.
fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("probes".into()),
            ..Default::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn digest(spec: &DeploymentSpec) -> String {
    let json = serde_json::to_vec(spec).expect("DeploymentSpec serializes");
    let d = ring::digest::digest(&ring::digest::SHA256, &json);
    d.as_ref()[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// Pod security for the operator and retrievers: the "restricted" Pod Security Standard.
pub fn restricted_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectionSpec, Provider};

    #[test]
    fn children_without_our_controller_reference_are_foreign() {
        let c = conn();
        let session = session_secret(
            &c,
            &SessionData {
                access_token: "at".into(),
                instance_url: "https://x".into(),
                expires_at: None,
                ca_bundle: None,
                annotations: BTreeMap::new(),
            },
        );
        let deployment = retriever_deployment(&c, &RetrieverSettings::default(), Some(&org()), 1);
        assert!(
            foreign_children(
                &c,
                &[
                    ("Secret", Some(&session.metadata)),
                    ("Deployment", Some(&deployment.metadata))
                ]
            )
            .is_empty(),
            "what we build is ours"
        );
        assert!(
            foreign_children(&c, &[("Secret", None), ("Deployment", None)]).is_empty(),
            "absent children are not foreign"
        );

        let mut users = Secret::default();
        users.metadata.name = Some("acme-session".into());
        let mut other_owner = deployment.clone();
        for r in other_owner.metadata.owner_references.iter_mut().flatten() {
            r.uid = "someone-else".into();
        }
        let mut not_controller = session.clone();
        for r in not_controller.metadata.owner_references.iter_mut().flatten() {
            r.controller = None;
        }
        assert_eq!(
            foreign_children(
                &c,
                &[
                    ("Secret", Some(&users.metadata)),
                    ("Deployment", Some(&other_owner.metadata))
                ]
            ),
            vec![
                "Secret acme-session".to_string(),
                "Deployment acme-retriever".to_string()
            ]
        );
        assert_eq!(
            foreign_children(
                &c,
                &[("Secret", None), ("Secret", Some(&not_controller.metadata))]
            ),
            vec!["Secret acme-session".to_string()]
        );
        let mut no_uid = c.clone();
        no_uid.metadata.uid = None;
        assert_eq!(
            foreign_children(&no_uid, &[("Secret", Some(&session.metadata))]).len(),
            1,
            "no UID, no claim"
        );
    }

    fn conn() -> Connection {
        let mut c = Connection::new(
            "acme",
            ConnectionSpec::new("sales", Provider::SalesforceProduction, "creds"),
        );
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("uid-1".into());
        c
    }

    #[test]
    fn deployment_is_named_owned_and_scaled_as_asked() {
        let d = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        assert_eq!(d.metadata.name.as_deref(), Some("acme-retriever"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("ns"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Connection", "acme", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(d.spec.replicas, Some(1));
        assert_eq!(
            retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 0)
                .spec
                .replicas,
            Some(0)
        );
    }

    #[test]
    fn retriever_pod_is_restricted_and_reads_only_the_session_secret() {
        let d = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        let pod = d.spec.template.spec.unwrap();
        // Its token is its own ServiceAccount's, which may only record this connection's JobRuns.
        assert_eq!(pod.automount_service_account_token, Some(true));
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        let res = c.resources.as_ref().unwrap();
        assert!(res.requests.as_ref().unwrap().contains_key("memory"));
        assert!(res.limits.as_ref().unwrap().contains_key("cpu"));
        assert_eq!(c.args.as_ref().unwrap()[0], "retrieve");
        let volumes = pod.volumes.unwrap();
        assert_eq!(volumes.len(), 1);
        assert_eq!(
            volumes[0].secret.as_ref().unwrap().secret_name.as_deref(),
            Some("acme-session")
        );
        assert!(c.env.as_ref().unwrap().iter().all(|e| {
            e.value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .is_none()
        }));
    }

    #[test]
    fn retriever_pod_can_read_its_0440_session_volume_through_fs_group() {
        let pod = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1)
            .spec
            .template
            .spec
            .unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!((psc.run_as_user, psc.run_as_group), (Some(65532), Some(65532)));
        assert_eq!(psc.fs_group, Some(65532), "without it: Permission denied");
        let volume = pod.volumes.unwrap()[0].secret.clone().unwrap();
        assert_eq!(volume.default_mode, Some(0o440));
        // Time to finish the CRM request in flight (30 s timeout) after SIGTERM.
        assert_eq!(pod.termination_grace_period_seconds, Some(45));
    }

    #[test]
    fn retriever_is_probed_on_its_named_port() {
        let pod = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1)
            .spec
            .template
            .spec
            .unwrap();
        let c = &pod.containers[0];
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("probes"), 8081)
        );
        let args = c.args.as_ref().unwrap();
        let at = args
            .iter()
            .position(|a| a == "--metrics-addr")
            .expect("--metrics-addr");
        assert_eq!(args[at + 1], "0.0.0.0:8081");
        for (probe, path) in [(&c.readiness_probe, "/readyz"), (&c.liveness_probe, "/healthz")] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::String("probes".into()));
        }
    }

    /// The wanted Deployment as the API server would show it after the deployment controller
    /// reported `available` of one replica.
    fn observed(generation: i64, observed_generation: i64, available: i32) -> Deployment {
        let mut d = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        d.metadata.generation = Some(generation);
        d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
            observed_generation: Some(observed_generation),
            replicas: Some(1),
            updated_replicas: Some(1),
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..Default::default()
        });
        d
    }

    #[test]
    fn a_retriever_about_to_be_written_reads_as_the_one_just_written() {
        // The status a reconcile writes before its own apply equals the one the next reconcile,
        // seeing the written Deployment without a status yet, would write: no second write.
        let wanted = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        let mut written = wanted.clone();
        written.metadata.generation = Some(1);
        let mut stale = wanted.clone();
        stale.spec.replicas = Some(0);
        assert_eq!(
            observe_retriever(None, &wanted),
            observe_retriever(Some(&written), &wanted)
        );
        assert_eq!(
            observe_retriever(Some(&stale), &wanted),
            observe_retriever(Some(&written), &wanted)
        );
    }

    #[test]
    fn retriever_is_available_only_when_its_current_spec_has_an_available_pod() {
        let wanted = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        let available =
            |d: Option<&Deployment>| observe_retriever(d, &wanted) == RetrieverObserved::Available;
        assert!(available(Some(&observed(2, 2, 1))));
        assert!(available(Some(&observed(2, 3, 1))));
        assert!(!available(None), "not created yet");
        assert!(
            !available(Some(&observed(3, 2, 1))),
            "generation not observed yet"
        );
        assert!(!available(Some(&observed(2, 2, 0))), "pod not ready");
        let mut no_status = observed(2, 2, 1);
        no_status.status = None;
        assert!(!available(Some(&no_status)));
        let mut scaled_down = observed(2, 2, 1);
        scaled_down.spec.replicas = Some(0);
        assert!(!available(Some(&scaled_down)), "about to be scaled up");
        let other = RetrieverSettings {
            image: "x:2".into(),
            ..Default::default()
        };
        let mut old_image = retriever_deployment(&conn(), &other, Some(&org()), 1);
        old_image.metadata.generation = Some(1);
        old_image.status = observed(1, 1, 1).status;
        assert!(!available(Some(&old_image)), "about to be updated");
        let mut rolling = observed(2, 2, 1);
        rolling.status.as_mut().unwrap().updated_replicas = Some(0);
        assert!(!available(Some(&rolling)), "the available pod is an old one");
    }

    #[test]
    fn an_unavailable_retriever_says_why() {
        let wanted = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        let RetrieverObserved::NotAvailable(why) = observe_retriever(Some(&observed(2, 2, 0)), &wanted)
        else {
            panic!("not available")
        };
        assert_eq!(why, "no retriever pod is ready yet (0 of 1 pods ready)");
    }

    fn org() -> OrgJobs<'static> {
        OrgJobs {
            key: "sf-00d000000000001eaa",
            settings: Box::leak(Box::default()),
            templates: Box::leak(Box::new(["record-count".to_string()])),
        }
    }

    #[test]
    fn only_types_a_job_template_can_run_are_claimed() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // No allowedJobTypes: every spelling of each template's type.
        assert_eq!(
            claimable_types(&[], &names(&["export", "record-count"])),
            names(&["export", "record-count", "record_count", "record.count"])
        );
        // allowedJobTypes: only those with a template (matched by the template's name).
        assert_eq!(
            claimable_types(
                &names(&["Export", "Record_Count", "import"]),
                &names(&["export", "record-count"])
            ),
            names(&["Export", "Record_Count"])
        );
        // No template at all: nothing.
        assert!(claimable_types(&[], &[]).is_empty());
        assert!(claimable_types(&names(&["import"]), &names(&["export"])).is_empty());
        let flags = |templates: &[String]| {
            let org = OrgJobs {
                key: "sf-00d000000000001eaa",
                settings: Box::leak(Box::default()),
                templates,
            };
            job_args(&org).join(" ")
        };
        assert!(flags(&[]).ends_with("--no-job-templates"), "{}", flags(&[]));
        assert!(flags(&names(&["export"])).ends_with("--allowed-job-types export"));
        // Templates by provider, sorted.
        let template = |name: &str, providers: serde_json::Value| -> crate::api::JobTemplate {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "crmconnect.io/v1alpha1", "kind": "JobTemplate", "metadata": {"name": name},
                "spec": {"providers": providers, "template": {"spec": {"containers": []}}}
            }))
            .unwrap()
        };
        let all = [
            template("zeta", serde_json::json!([])),
            template("dv-only", serde_json::json!(["Dynamics365"])),
            template("alpha", serde_json::json!(["SalesforceProduction"])),
        ];
        assert_eq!(
            runnable_templates(&all, crate::api::Provider::SalesforceProduction),
            names(&["alpha", "zeta"])
        );
        assert_eq!(
            runnable_templates(&all, crate::api::Provider::Dynamics365),
            names(&["dv-only", "zeta"])
        );
    }

    #[test]
    fn org_settings_reach_the_retriever_as_flags() {
        let spec = OrgSettingsSpec {
            auto_run_jobs: false,
            poll_interval: "1h30m".into(),
            max_concurrent_jobs: 3,
            allowed_job_types: vec!["export".into(), "import".into()],
            ..Default::default()
        };
        let templates = ["export".to_string(), "import".to_string()];
        let custom = OrgJobs {
            key: "sf-00d000000000001eaa",
            settings: &spec,
            templates: &templates,
        };
        let d = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&custom), 1);
        let args = d.spec.template.spec.clone().unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        let joined = args.join(" ");
        for want in [
            "--org-key sf-00d000000000001eaa",
            "--auto-run-jobs=false",
            "--poll-interval 5400s",
            "--max-concurrent-jobs 3",
            "--max-claims-per-poll 5",
            "--claim-lease 900s",
            "--allowed-job-types export,import",
        ] {
            assert!(joined.contains(want), "{want:?} missing from {joined}");
        }
        // A change of the settings changes the digest: the retriever rolls.
        let defaults = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        let changed = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&custom), 1);
        assert!(!deployment_up_to_date(&defaults, &changed));
        // Without an org there is nothing to retrieve for: no replicas.
        let orgless = retriever_deployment(&conn(), &RetrieverSettings::default(), None, 1);
        assert_eq!(orgless.spec.replicas, Some(0));
    }

    #[test]
    fn the_retriever_runs_as_its_own_service_account_bound_to_the_retriever_role() {
        let c = conn();
        let d = retriever_deployment(&c, &RetrieverSettings::default(), Some(&org()), 1);
        let pod = d.spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("acme-retriever"));
        let sa = retriever_service_account(&c);
        assert_eq!(sa.metadata.name.as_deref(), Some("acme-retriever"));
        assert!(is_ours(&c, &sa.metadata));
        let rb = retriever_role_binding(&c, &RetrieverSettings::default());
        assert!(is_ours(&c, &rb.metadata));
        assert_eq!(rb.role_ref.kind, "ClusterRole");
        assert_eq!(rb.role_ref.name, DEFAULT_RETRIEVER_CLUSTER_ROLE);
        let subject = &rb.subjects.unwrap()[0];
        assert_eq!(
            (subject.kind.as_str(), subject.name.as_str()),
            ("ServiceAccount", "acme-retriever")
        );
    }

    #[test]
    fn a_retriever_is_down_only_after_it_was_up() {
        use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let at: k8s_openapi::jiff::Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
        let with = |progressing: &str, available: &str| {
            let mut d = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
            let condition = |type_: &str, status: &str, reason: &str| DeploymentCondition {
                type_: Some(type_.into()),
                status: Some(status.into()),
                reason: Some(reason.into()),
                last_transition_time: Some(Time(at)),
                ..Default::default()
            };
            d.status = Some(DeploymentStatus {
                conditions: Some(vec![
                    condition("Progressing", "True", progressing),
                    condition("Available", available, "MinimumReplicasUnavailable"),
                ]),
                ..Default::default()
            });
            d
        };
        assert_eq!(
            retriever_down_since(Some(&with("NewReplicaSetAvailable", "False"))),
            Some(at)
        );
        assert_eq!(
            retriever_down_since(Some(&with("NewReplicaSetAvailable", "True"))),
            None
        );
        // Never up (starting, or an image that cannot be pulled): not "down".
        assert_eq!(
            retriever_down_since(Some(&with("ReplicaSetUpdated", "False"))),
            None
        );
        assert_eq!(retriever_down_since(None), None);
    }

    #[test]
    fn host_aliases_and_the_ca_bundle_reach_the_retriever() {
        let settings = RetrieverSettings {
            host_aliases: vec![k8s_openapi::api::core::v1::HostAlias {
                ip: "10.88.0.1".into(),
                hostnames: Some(vec!["login.salesforce.com".into()]),
            }],
            ..Default::default()
        };
        let d = retriever_deployment(&conn(), &settings, Some(&org()), 1);
        assert_eq!(
            d.spec.template.spec.unwrap().host_aliases,
            Some(settings.host_aliases.clone())
        );
        let plain = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        assert_eq!(plain.spec.template.spec.unwrap().host_aliases, None);
        let session = SessionData {
            access_token: "at".into(),
            instance_url: "https://x".into(),
            expires_at: None,
            ca_bundle: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            annotations: BTreeMap::new(),
        };
        let secret = session_secret(&conn(), &session);
        assert!(secret.data.unwrap().contains_key(session_keys::CA_BUNDLE));
    }

    #[test]
    fn settings_flow_into_the_pod() {
        let settings = RetrieverSettings {
            image: "registry.local/op:1".into(),
            pull_policy: "Always".into(),
            ..Default::default()
        };
        let d = retriever_deployment(&conn(), &settings, Some(&org()), 1);
        let c = &d.spec.template.spec.unwrap().containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.local/op:1"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        assert!(c.args.as_ref().unwrap().contains(&"300s".to_string()));
    }

    #[test]
    fn digest_detects_changes_and_replica_drift() {
        let one = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1);
        let zero = retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 0);
        assert!(deployment_up_to_date(
            &one,
            &retriever_deployment(&conn(), &RetrieverSettings::default(), Some(&org()), 1)
        ));
        assert!(!deployment_up_to_date(&one, &zero));
        let mut scaled_by_hand = one.clone();
        scaled_by_hand.spec.replicas = Some(3);
        assert!(!deployment_up_to_date(&scaled_by_hand, &one));
        let other_image = RetrieverSettings {
            image: "x:2".into(),
            ..Default::default()
        };
        assert!(!deployment_up_to_date(
            &one,
            &retriever_deployment(&conn(), &other_image, Some(&org()), 1)
        ));
    }

    #[test]
    fn session_secret_holds_access_token_but_never_a_refresh_token() {
        let s = session_secret(
            &conn(),
            &SessionData {
                access_token: "AT".into(),
                instance_url: "https://acme.my.salesforce.com".into(),
                expires_at: None,
                ca_bundle: None,
                annotations: BTreeMap::new(),
            },
        );
        assert_eq!(s.metadata.name.as_deref(), Some("acme-session"));
        let data = s.data.unwrap();
        assert_eq!(data["access_token"].0, b"AT");
        assert!(!data.contains_key("refresh_token"));
        assert!(s.metadata.owner_references.is_some());
    }

    #[test]
    fn session_data_debug_redacts_the_token() {
        let s = SessionData {
            access_token: "super-secret-token".into(),
            instance_url: "u".into(),
            expires_at: None,
            ca_bundle: None,
            annotations: BTreeMap::new(),
        };
        assert!(!format!("{s:?}").contains("super-secret-token"));
    }

    #[test]
    fn session_with_same_token_and_inputs_is_not_rewritten_for_bookkeeping_alone() {
        let data = |token: &str, next: &str, fingerprint: &str| SessionData {
            access_token: token.into(),
            instance_url: "https://x".into(),
            expires_at: None,
            ca_bundle: None,
            annotations: BTreeMap::from([
                (
                    crate::controller::schedule::FINGERPRINT_ANNOTATION.to_string(),
                    fingerprint.to_string(),
                ),
                (
                    crate::controller::schedule::NEXT_CHECK_ANNOTATION.to_string(),
                    next.to_string(),
                ),
            ]),
        };
        let existing = session_secret(&conn(), &data("AT", "t1", "f"));
        assert!(session_up_to_date(
            &existing,
            &session_secret(&conn(), &data("AT", "t2", "f"))
        ));
        assert!(!session_up_to_date(
            &existing,
            &session_secret(&conn(), &data("AT2", "t2", "f"))
        ));
        assert!(!session_up_to_date(
            &existing,
            &session_secret(&conn(), &data("AT", "t2", "g"))
        ));
    }
}
