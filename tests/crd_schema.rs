//! The CRD and the examples, checked without a cluster: generated file drift, CEL rules
//! (evaluated with kube's CEL support), example manifests, serde round-trips.
//! The same rules are exercised against a real API server in `tests/cluster_api.rs`.

use connection_operator::api::{
    Connection, ConnectionSpec, ConnectionStatus, JobRun, OrgSettings, Provider, crd_yaml, crd_yaml_of, crds,
};
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

fn schema() -> Value {
    let crd = serde_json::to_value(Connection::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Evaluates every CEL rule of the CRD against `obj` (and `old` for transition rules);
/// returns the failure messages.
fn cel_errors(obj: &Value, old: Option<&Value>) -> Vec<String> {
    match kube::core::cel::Validator::new().validate(&schema(), obj, old) {
        Ok(()) => vec![],
        Err(errs) => errs.into_vec().into_iter().map(|e| e.message).collect(),
    }
}

fn salesforce() -> Value {
    json!({
        "apiVersion": "crmconnect.io/v1alpha1",
        "kind": "Connection",
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": {
            "team": "sales",
            "provider": "SalesforceProduction",
            "credentialsSecretRef": {"name": "creds"}
        }
    })
}

fn dynamics() -> Value {
    json!({
        "apiVersion": "crmconnect.io/v1alpha1",
        "kind": "Connection",
        "metadata": {"name": "d", "namespace": "ns"},
        "spec": {
            "team": "sales",
            "provider": "Dynamics365",
            "dynamics": {"environmentUrl": "https://contoso.crm.dynamics.com", "cloud": "Public"},
            "credentialsSecretRef": {"name": "creds"}
        }
    })
}

fn assert_rejected(obj: &Value, old: Option<&Value>, expected: &str) {
    let errors = cel_errors(obj, old);
    assert!(
        errors.iter().any(|m| m.contains(expected)),
        "expected a CEL error containing {expected:?}, got {errors:?}"
    );
}

fn assert_accepted(obj: &Value, old: Option<&Value>) {
    let errors = cel_errors(obj, old);
    assert!(errors.is_empty(), "expected no CEL errors, got {errors:?}");
}

#[test]
fn committed_crds_match_generated_crds() {
    assert_eq!(crd_yaml(), crd_yaml_of("connection").unwrap());
    for (stem, _) in crds() {
        let committed = repo_file(&format!("crds/{stem}.yaml"));
        assert!(
            committed == crd_yaml_of(stem).unwrap(),
            "crds/{stem}.yaml is out of date with the Rust types; regenerate it with:\n  make crds"
        );
    }
}

#[test]
fn chart_crds_match_generated_crds() {
    for (stem, _) in crds() {
        let in_chart = repo_file(&format!("charts/connection-operator/crds/{stem}.yaml"));
        assert!(
            in_chart == crd_yaml_of(stem).unwrap(),
            "charts/connection-operator/crds/{stem}.yaml is out of date; regenerate it with:\n  make crds"
        );
    }
}

#[test]
fn job_crds_have_their_short_names_printer_columns_and_scope() {
    let jobrun = serde_json::to_value(JobRun::crd()).unwrap();
    assert_eq!(jobrun["spec"]["names"]["shortNames"], json!(["jr"]));
    assert_eq!(jobrun["spec"]["scope"], json!("Namespaced"));
    let version = &jobrun["spec"]["versions"][0];
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Connection", "Type", "Phase", "CRM Job", "Age"]);

    let orgs = serde_json::to_value(OrgSettings::crd()).unwrap();
    assert_eq!(orgs["spec"]["names"]["shortNames"], json!(["orgs"]));
    assert_eq!(orgs["spec"]["names"]["plural"], json!("orgsettings"));
    assert_eq!(orgs["spec"]["scope"], json!("Namespaced"));
}

#[test]
fn crd_has_status_subresource_shortname_category_and_printer_columns() {
    let crd = serde_json::to_value(Connection::crd()).unwrap();
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["conn"]));
    assert_eq!(crd["spec"]["names"]["categories"], json!(["crm"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        vec![
            "Team",
            "Provider",
            "State",
            "Reason",
            "Org",
            "Age",
            "Display Name",
            "Message"
        ]
    );
}

#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    let conditions = &schema()["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn valid_salesforce_and_dynamics_connections_pass_cel() {
    assert_accepted(&salesforce(), None);
    assert_accepted(&dynamics(), None);
}

#[test]
fn credentials_naming_the_connections_own_session_or_token_secret_are_rejected() {
    let mut obj = salesforce();
    obj["spec"]["credentialsSecretRef"]["name"] = json!("c-session");
    assert_rejected(&obj, None, "own session or token Secret");
    obj["spec"]["credentialsSecretRef"]["name"] = json!("c-token");
    assert_rejected(&obj, None, "own session or token Secret");
    obj["spec"]["credentialsSecretRef"]["name"] = json!("other-session");
    assert_accepted(&obj, None);
}

#[test]
fn team_change_is_rejected() {
    let old = salesforce();
    let mut new = old.clone();
    new["spec"]["team"] = json!("marketing");
    assert_rejected(&new, Some(&old), "team is immutable");
}

#[test]
fn unchanged_team_and_provider_pass_transition_rules() {
    let old = salesforce();
    let mut new = old.clone();
    new["spec"]["paused"] = json!(true);
    new["spec"]["displayName"] = json!("renamed");
    assert_accepted(&new, Some(&old));
}

#[test]
fn provider_change_is_rejected() {
    let old = salesforce();
    let mut new = old.clone();
    new["spec"]["provider"] = json!("SalesforceSandbox");
    assert_rejected(&new, Some(&old), "provider is immutable");
}

#[test]
fn dynamics_without_dynamics_block_is_rejected() {
    let mut obj = dynamics();
    obj["spec"].as_object_mut().unwrap().remove("dynamics");
    assert_rejected(
        &obj,
        None,
        "spec.dynamics is required when provider is Dynamics365",
    );
}

#[test]
fn salesforce_with_dynamics_block_is_rejected() {
    let mut obj = salesforce();
    obj["spec"]["dynamics"] = json!({"environmentUrl": "https://contoso.crm.dynamics.com"});
    assert_rejected(&obj, None, "forbidden otherwise");
}

#[test]
fn dynamics_with_salesforce_block_is_rejected() {
    let mut obj = dynamics();
    obj["spec"]["salesforce"] = json!({"loginUrl": "https://login.salesforce.com"});
    assert_rejected(&obj, None, "spec.salesforce is only allowed");
}

#[test]
fn http_login_url_is_rejected_and_https_accepted() {
    let mut obj = salesforce();
    obj["spec"]["salesforce"] = json!({"loginUrl": "http://acme.my.salesforce.com"});
    assert_rejected(&obj, None, "must be an https:// URL");
    obj["spec"]["salesforce"] = json!({"loginUrl": "https://acme.my.salesforce.com"});
    assert_accepted(&obj, None);
}

#[test]
fn http_loopback_urls_are_accepted_for_tests() {
    let mut obj = salesforce();
    obj["spec"]["salesforce"] = json!({"loginUrl": "http://127.0.0.1:8080"});
    assert_accepted(&obj, None);
    let mut obj = dynamics();
    obj["spec"]["dynamics"]["environmentUrl"] = json!("http://[::1]:9000");
    assert_accepted(&obj, None);
}

#[test]
fn non_url_and_http_environment_urls_are_rejected() {
    let mut obj = dynamics();
    obj["spec"]["dynamics"]["environmentUrl"] = json!("contoso.crm.dynamics.com");
    assert_rejected(&obj, None, "must be an https:// URL");
    obj["spec"]["dynamics"]["environmentUrl"] = json!("http://contoso.crm.dynamics.com");
    assert_rejected(&obj, None, "must be an https:// URL");
}

fn example_documents() -> Vec<(String, Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut docs = vec![];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name == "kustomization.yaml" || path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for value in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
            docs.push((name.clone(), value));
        }
    }
    docs
}

#[test]
fn every_example_connection_deserializes_and_passes_cel() {
    let docs = example_documents();
    let connections: Vec<_> = docs.iter().filter(|(_, v)| v["kind"] == "Connection").collect();
    assert_eq!(
        connections.len(),
        3,
        "one Salesforce Production, one Sandbox, one Dynamics example"
    );
    let mut providers = vec![];
    for (file, value) in connections {
        let conn: Connection =
            serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file}: not a Connection: {e}"));
        let errors = cel_errors(value, None);
        assert!(errors.is_empty(), "{file}: CEL errors {errors:?}");
        // Each connection's Secret is in the same file and has the required keys.
        let secret = docs
            .iter()
            .find(|(f, v)| {
                f == file
                    && v["kind"] == "Secret"
                    && v["metadata"]["name"] == conn.spec.credentials_secret_ref.name.as_str()
            })
            .unwrap_or_else(|| panic!("{file}: Secret {} missing", conn.spec.credentials_secret_ref.name));
        for key in ["refresh_token", "client_id"] {
            assert!(
                secret.1["stringData"][key].is_string(),
                "{file}: Secret lacks {key}"
            );
        }
        providers.push(conn.spec.provider);
    }
    providers.sort_by_key(|p| p.as_str());
    assert_eq!(
        providers,
        vec![
            Provider::Dynamics365,
            Provider::SalesforceProduction,
            Provider::SalesforceSandbox
        ]
    );
}

#[test]
fn kustomization_lists_every_example() {
    let kustomization: Value = serde_saphyr::from_str(&repo_file("examples/kustomization.yaml")).unwrap();
    let mut listed: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut files: Vec<String> = example_documents().into_iter().map(|(f, _)| f).collect();
    files.dedup();
    listed.sort();
    files.sort();
    files.dedup();
    assert_eq!(listed, files);
}

#[test]
fn spec_defaults_apply_when_fields_are_omitted() {
    let spec: ConnectionSpec = serde_json::from_value(json!({
        "team": "t", "provider": "Dynamics365",
        "dynamics": {"environmentUrl": "https://x.crm.dynamics.com"},
        "credentialsSecretRef": {"name": "s"}
    }))
    .unwrap();
    let d = spec.dynamics.as_ref().unwrap();
    assert_eq!(d.cloud, connection_operator::api::Cloud::Public);
    assert_eq!(d.tenant_id, "organizations");
    assert!(!spec.paused);
}

#[test]
fn spec_and_status_round_trip_through_json() {
    let value = json!({
        "team": "t", "provider": "Dynamics365",
        "dynamics": {"environmentUrl": "https://x.crm9.dynamics.com", "cloud": "GCC", "tenantId": "contoso.com"},
        "credentialsSecretRef": {"name": "s"},
        "displayName": "X", "description": "Y", "paused": true
    });
    let spec: ConnectionSpec = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(serde_json::to_value(&spec).unwrap(), value);

    let status = json!({
        "state": "Inactive", "reason": "TokenRevoked",
        "message": "Connection inactive: the refresh token was revoked",
        "orgId": "00D000000000001", "remoteId": "00D000000000001",
        "instanceUrl": "https://acme.my.salesforce.com", "username": "u@acme.com",
        "observedGeneration": 3,
        "conditions": [{
            "type": "Authorized", "status": "False", "reason": "TokenRevoked",
            "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3
        }]
    });
    let parsed: ConnectionStatus = serde_json::from_value(status.clone()).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), status);
}
