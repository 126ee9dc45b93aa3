//! What the watches that only trigger reconciles decode of an object: the metadata their mappers
//! read (name, namespace, uid, resourceVersion, owner references), and nothing else.
//!
//! The requests are metadata-only (as for `PartialObjectMeta`), but a `PartialObjectMeta` still
//! decodes every `managedFields` entry into a `serde_json::Value` tree: at 3000 connections that
//! was 17 MiB of the restart's 37 MiB heap peak (heaptrack), for fields no decision reads. Here
//! serde skips them without allocating.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;
use kube::core::Resource;
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::marker::PhantomData;

/// The trigger-relevant metadata of a `K`, requested metadata-only.
pub struct Meta<K> {
    metadata: ObjectMeta,
    kind: PhantomData<fn() -> K>,
}

impl<K> Meta<K> {
    pub fn new(metadata: ObjectMeta) -> Self {
        Meta {
            metadata,
            kind: PhantomData,
        }
    }
}

impl<K> Clone for Meta<K> {
    fn clone(&self) -> Self {
        Meta::new(self.metadata.clone())
    }
}

impl<K> std::fmt::Debug for Meta<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta").field("metadata", &self.metadata).finish()
    }
}

impl<'de, K> Deserialize<'de> for Meta<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Object {
            metadata: Fields,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Fields {
            name: Option<String>,
            namespace: Option<String>,
            uid: Option<String>,
            resource_version: Option<String>,
            owner_references: Option<Vec<OwnerReference>>,
        }
        let Object { metadata: f } = Object::deserialize(deserializer)?;
        Ok(Meta::new(ObjectMeta {
            name: f.name,
            namespace: f.namespace,
            uid: f.uid,
            resource_version: f.resource_version,
            owner_references: f.owner_references,
            ..ObjectMeta::default()
        }))
    }
}

impl<K: Resource> Resource for Meta<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn metadata_api() -> bool {
        true
    }

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
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
    use k8s_openapi::api::core::v1::Secret;
    use kube::ResourceExt;

    #[test]
    fn keeps_what_triggers_read_and_drops_managed_fields() {
        let item = serde_json::json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {
                "name": "c1-session", "namespace": "team-a", "uid": "u-1", "resourceVersion": "42",
                "labels": {"app.kubernetes.io/managed-by": "connection-operator"},
                "ownerReferences": [{"apiVersion": "crmconnect.io/v1alpha1", "kind": "Connection",
                                     "name": "c1", "uid": "c-1", "controller": true}],
                "managedFields": [{"manager": "connection-operator", "operation": "Apply",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:token": {}}}}]
            }
        });
        let meta: Meta<Secret> = serde_json::from_value(item).unwrap();
        assert_eq!(
            (
                meta.name_any(),
                meta.namespace(),
                meta.uid(),
                meta.resource_version()
            ),
            (
                "c1-session".into(),
                Some("team-a".into()),
                Some("u-1".into()),
                Some("42".into())
            )
        );
        assert_eq!(meta.owner_references()[0].uid, "c-1");
        assert!(meta.meta().managed_fields.is_none() && meta.meta().labels.is_none());
    }

    #[test]
    fn requests_metadata_only_at_the_kinds_own_path() {
        assert!(Meta::<Secret>::metadata_api());
        assert_eq!(
            Meta::<Secret>::url_path(&(), Some("team-a")),
            "/api/v1/namespaces/team-a/secrets"
        );
        assert_eq!(Meta::<Secret>::kind(&()), "Secret");
    }
}
