//! Finding the Connection and its Secret among the YAML documents of manifest files.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use crate::api::Connection;

/// YAML documents of a file (empty ones skipped).
pub(super) fn documents(text: &str) -> Result<Vec<serde_json::Value>, String> {
    let docs =
        serde_saphyr::from_multiple::<serde_json::Value>(text).map_err(|e| format!("invalid YAML: {e}"))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

pub(super) fn kind_of(doc: &serde_json::Value) -> Option<&str> {
    doc.get("kind").and_then(|k| k.as_str())
}

pub(super) fn name_of(doc: &serde_json::Value) -> Option<&str> {
    doc.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
}

pub(super) fn find_connection(text: &str, name: Option<&str>) -> Result<Connection, String> {
    let docs = documents(text)?;
    let connections: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| kind_of(d) == Some("Connection"))
        .filter(|d| name.is_none() || name_of(d) == name)
        .collect();
    let doc = match connections.as_slice() {
        [one] => *one,
        [] => {
            return Err(format!(
                "no Connection{} found",
                name.map(|n| format!(" named {n}")).unwrap_or_default()
            ));
        }
        many => {
            let names: Vec<&str> = many.iter().filter_map(|d| name_of(d)).collect();
            return Err(format!(
                "several Connections ({}); pick one with --name",
                names.join(", ")
            ));
        }
    };
    serde_json::from_value(doc.clone()).map_err(|e| format!("invalid Connection: {e}"))
}

/// The Secret named `name` (or, when `lenient`, the only Secret of the file), as decoded data
/// (`stringData` merged over `data`, as the API server does), and its name.
pub(super) fn find_secret(
    text: &str,
    name: &str,
    lenient: bool,
) -> Result<(BTreeMap<String, ByteString>, String), String> {
    let docs = documents(text)?;
    let secrets: Vec<&serde_json::Value> = docs.iter().filter(|d| kind_of(d) == Some("Secret")).collect();
    let doc = secrets
        .iter()
        .find(|d| name_of(d) == Some(name))
        .or_else(|| {
            if lenient && secrets.len() == 1 {
                secrets.first()
            } else {
                None
            }
        })
        .ok_or_else(|| format!("no Secret named {name} found"))?;
    let secret: Secret =
        serde_json::from_value((*doc).clone()).map_err(|e| format!("invalid Secret: {e}"))?;
    let mut data = secret.data.unwrap_or_default();
    for (key, value) in secret.string_data.unwrap_or_default() {
        data.insert(key, ByteString(value.into_bytes()));
    }
    Ok((data, secret.metadata.name.unwrap_or_else(|| name.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &str = "# A Salesforce org.\n# Replace the placeholders.\napiVersion: v1\nkind: Secret\nmetadata:\n  name: acme-creds   # the credentials\ntype: Opaque\nstringData:\n  client_id: \"3MVG9-key\"\n  refresh_token: \"old-token\"   # from the OAuth flow\n  client_secret: 'shh'\n---\napiVersion: crmconnect.io/v1alpha1\nkind: Connection\nmetadata:\n  name: acme\nspec:\n  team: sales\n  provider: SalesforceProduction\n  credentialsSecretRef:\n    name: acme-creds\n";

    #[test]
    fn finds_connection_and_secret_by_kind() {
        let connection = find_connection(MULTI, None).unwrap();
        assert_eq!(connection.spec.credentials_secret_ref.name, "acme-creds");
        let (data, name) = find_secret(MULTI, "acme-creds", false).unwrap();
        assert_eq!(name, "acme-creds");
        assert_eq!(data["refresh_token"].0, b"old-token");
        assert_eq!(data["client_secret"].0, b"shh");
        assert!(find_secret(MULTI, "other", false).is_err());
        assert!(find_secret(MULTI, "other", true).is_ok());
        assert!(find_connection(MULTI, Some("zzz")).is_err());
    }
}
