//! What the Connection cache keeps of each object: a [`CachedConnection`].
//!
//! The controller's cache holds every Connection in the scope for as long as the operator runs,
//! so its size per object is most of the operator's memory at 10,000 connections. A cached object
//! keeps the metadata and spec whole (a reconcile reads them), but its status is a compact copy of
//! what decisions read ([`state::slim_status`]): a boxed struct of a few strings, and the operator's
//! own conditions as small values instead of `Condition`s of six strings each. It also carries
//! the digest of the whole status ([`state::digest`]), which tells the reconcile whether the
//! status it would write is already there. A reconcile works on the `Connection` that
//! [`CachedConnection::to_connection`] rebuilds: the same object, with the slim status.
//!
//! Objects are decoded as `Connection`s and converted at once, so a Connection that does not
//! match the schema is refused exactly as before (`DeserializeGuard` keeps its metadata).
//! Pure conversion, no I/O: unit-tested below and in `state`'s tests.

use super::state;
use crate::api::conditions::{self, Status};
use crate::api::{Connection, ConnectionSpec, ConnectionStatus, State};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::core::NamespaceResourceScope;
use serde::Deserialize;
use std::borrow::Cow;

/// A Connection as the cache keeps it (see the module's documentation).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "Connection")]
pub struct CachedConnection {
    pub metadata: ObjectMeta,
    pub spec: ConnectionSpec,
    /// Boxed: `None` until the operator first writes a status, and 8 bytes either way instead of
    /// the 336 an inline `ConnectionStatus` takes whether set or not.
    status: Option<Box<CachedStatus>>,
}

/// [`state::slim_status`] of a status, compacted, and the digest of the whole status.
#[derive(Clone, Debug, PartialEq)]
struct CachedStatus {
    digest: u64,
    state: Option<State>,
    reason: Option<Box<str>>,
    message: Option<Box<str>>,
    remote_id: Option<Box<str>>,
    instance_url: Option<Box<str>>,
    username: Option<Box<str>>,
    conditions: Box<[CachedCondition]>,
}

/// One condition of a slim status.
#[derive(Clone, Debug, PartialEq)]
enum CachedCondition {
    /// One of the operator's own, whose reason and message the slim status drops.
    Ours {
        type_: &'static str,
        status: Status,
        last_transition_time: Time,
        observed_generation: Option<i64>,
    },
    /// Any other (another writer's, or a status value the operator does not write): whole.
    Other(Box<Condition>),
}

/// The condition types the operator writes.
const OURS: [&str; 3] = [
    conditions::AUTHORIZED,
    conditions::READY,
    conditions::RETRIEVER_READY,
];

impl CachedCondition {
    fn of(c: Condition) -> Self {
        let type_ = OURS.iter().find(|t| **t == c.type_);
        let status = [Status::True, Status::False, Status::Unknown]
            .into_iter()
            .find(|s| s.as_str() == c.status);
        match (type_, status) {
            (Some(type_), Some(status)) if c.reason.is_empty() && c.message.is_empty() => {
                CachedCondition::Ours {
                    type_,
                    status,
                    last_transition_time: c.last_transition_time,
                    observed_generation: c.observed_generation,
                }
            }
            _ => CachedCondition::Other(Box::new(c)),
        }
    }

    fn to_condition(&self) -> Condition {
        match self {
            CachedCondition::Ours {
                type_,
                status,
                last_transition_time,
                observed_generation,
            } => Condition {
                type_: (*type_).to_string(),
                status: status.as_str().to_string(),
                reason: String::new(),
                message: String::new(),
                last_transition_time: last_transition_time.clone(),
                observed_generation: *observed_generation,
            },
            CachedCondition::Other(c) => (**c).clone(),
        }
    }
}

impl CachedStatus {
    fn of(status: ConnectionStatus) -> Self {
        let digest = state::digest(&status);
        let slim = state::slim_status(status);
        let boxed = |s: Option<String>| s.map(String::into_boxed_str);
        CachedStatus {
            digest,
            state: slim.state,
            reason: boxed(slim.reason),
            message: boxed(slim.message),
            remote_id: boxed(slim.remote_id),
            instance_url: boxed(slim.instance_url),
            username: boxed(slim.username),
            conditions: slim.conditions.into_iter().map(CachedCondition::of).collect(),
        }
    }

    /// Exactly the [`state::slim_status`] it was made from.
    fn to_status(&self) -> ConnectionStatus {
        let string = |s: &Option<Box<str>>| s.as_deref().map(str::to_string);
        ConnectionStatus {
            state: self.state,
            reason: string(&self.reason),
            message: string(&self.message),
            remote_id: string(&self.remote_id),
            instance_url: string(&self.instance_url),
            username: string(&self.username),
            conditions: self
                .conditions
                .iter()
                .map(CachedCondition::to_condition)
                .collect(),
            ..Default::default()
        }
    }
}

impl From<Connection> for CachedConnection {
    /// Keeps everything but `managedFields`, kubectl's `last-applied-configuration` copy (neither
    /// is read by a decision; together they are most of an object's size) and the parts of its
    /// status no decision reads.
    fn from(conn: Connection) -> Self {
        let Connection {
            mut metadata,
            spec,
            status,
        } = conn;
        trim_meta(&mut metadata);
        CachedConnection {
            metadata,
            spec,
            status: status.map(|s| Box::new(CachedStatus::of(s))),
        }
    }
}

/// The annotation `kubectl apply` (client-side) keeps a full copy of the object in.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no decision reads from an object's metadata before it is cached: `managedFields` and
/// kubectl's `last-applied-configuration` copy (together most of an object's size).
pub(crate) fn trim_meta(metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    metadata.managed_fields = None;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

impl CachedConnection {
    /// The Connection a reconcile works on: metadata and spec as cached, the slim status.
    pub fn to_connection(&self) -> Connection {
        Connection {
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: self.status.as_ref().map(|s| s.to_status()),
        }
    }

    /// `status.state`.
    pub fn state(&self) -> Option<State> {
        self.status.as_ref().and_then(|s| s.state)
    }

    /// `status.remoteId`: the org or environment it recorded.
    pub fn remote_id(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.remote_id.as_deref())
    }

    /// The [`state::digest`] of its whole status, as the API server sent it.
    pub fn status_digest(&self) -> Option<u64> {
        self.status.as_ref().map(|s| s.digest)
    }
}

impl kube::Resource for CachedConnection {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Connection::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Connection::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Connection::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Connection::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::DeserializeGuard;

    fn object(status: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "crmconnect.io/v1alpha1",
            "kind": "Connection",
            "metadata": {
                "name": "c1", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7", "generation": 2,
                "annotations": {
                    LAST_APPLIED_ANNOTATION: "{\"spec\":{}}",
                    "crmconnect.io/revalidate": "1"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {"team": "sales", "provider": "SalesforceProduction",
                     "credentialsSecretRef": {"name": "sf-tokens"}, "displayName": "Sales org"},
            "status": status
        })
    }

    fn active() -> serde_json::Value {
        serde_json::json!({
            "state": "Active", "reason": "Authorized", "message": "Connected to org 00D000000000001",
            "orgId": "00D000000000001", "remoteId": "00D000000000001",
            "instanceUrl": "https://acme.my.salesforce.com", "username": "ops@acme.example",
            "observedGeneration": 2,
            "conditions": [
                {"type": "Authorized", "status": "True", "reason": "Valid", "message": "tokens are valid",
                 "lastTransitionTime": "2026-12-01T10:00:00Z", "observedGeneration": 2},
                {"type": "Ready", "status": "True", "reason": "Active", "message": "retrieving jobs",
                 "lastTransitionTime": "2026-12-01T10:00:01Z", "observedGeneration": 2},
                {"type": "RetrieverReady", "status": "Maybe", "reason": "X", "message": "odd",
                 "lastTransitionTime": "2026-12-01T10:00:02Z"},
                {"type": "Audited", "status": "True", "reason": "Checked", "message": "by the audit job",
                 "lastTransitionTime": "2026-12-01T10:00:03Z"}
            ]
        })
    }

    #[test]
    fn rebuilds_the_connection_with_the_slim_status() {
        let whole: Connection = serde_json::from_value(object(active())).unwrap();
        let cached: CachedConnection = serde_json::from_value(object(active())).unwrap();
        let rebuilt = cached.to_connection();
        // The status is what decisions read, and its digest is the whole status's.
        let status = whole.status.clone().unwrap();
        assert_eq!(rebuilt.status, Some(state::slim_status(status.clone())));
        assert_eq!(cached.status_digest(), Some(state::digest(&status)));
        assert_eq!(cached.state(), Some(State::Active));
        assert_eq!(cached.remote_id(), Some("00D000000000001"));
        // A condition value the operator does not write, and another writer's condition, stay.
        let kept: Vec<(&str, &str)> = rebuilt
            .status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            kept,
            [
                ("Authorized", "True"),
                ("Ready", "True"),
                ("RetrieverReady", "Maybe"),
                ("Audited", "True")
            ]
        );
        // Metadata and spec are whole, less managedFields and kubectl's copy of the object.
        assert_eq!(rebuilt.spec, whole.spec);
        let mut meta = whole.metadata.clone();
        meta.managed_fields = None;
        meta.annotations.as_mut().unwrap().remove(LAST_APPLIED_ANNOTATION);
        assert_eq!(rebuilt.metadata, meta);
        assert!(
            rebuilt
                .metadata
                .annotations
                .unwrap()
                .contains_key("crmconnect.io/revalidate")
        );
    }

    #[test]
    fn an_object_without_status_and_an_invalid_object() {
        let mut value = object(serde_json::Value::Null);
        value.as_object_mut().unwrap().remove("status");
        let cached: CachedConnection = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(cached.to_connection().status, None);
        assert_eq!((cached.state(), cached.status_digest()), (None, None));
        // Not the schema: refused as a Connection is, with its metadata kept.
        value["spec"]["provider"] = "Zoho".into();
        let guard: DeserializeGuard<CachedConnection> = serde_json::from_value(value).unwrap();
        let invalid = guard.0.unwrap_err();
        assert_eq!(invalid.metadata.name.as_deref(), Some("c1"));
        assert!(invalid.error.contains("Zoho"), "{}", invalid.error);
    }

    #[test]
    fn smaller_than_a_connection() {
        let whole: Connection = serde_json::from_value(object(active())).unwrap();
        assert!(std::mem::size_of::<CachedConnection>() + 300 < std::mem::size_of::<Connection>());
        assert!(std::mem::size_of::<CachedCondition>() < std::mem::size_of::<Condition>() / 2);
        let cached = CachedConnection::from(whole);
        assert!(cached.status.is_some());
    }
}
