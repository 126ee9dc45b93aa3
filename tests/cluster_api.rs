//! The Connection API on a real control plane (tests/cluster/: kube-apiserver,
//! kube-controller-manager and etcd of Kubernetes 1.37): the CRD installs, the examples
//! apply, the CEL rules reject bad manifests through `kubectl apply`, printer columns
//! and `kubectl explain` show our text, the status subresource and garbage collection
//! behave, and the operator's identity has no rights until RBAC grants them.
//!
//! Needs the test cluster: run through `tests/cluster/with-cluster.sh` (`make test`).

mod common;

use std::time::Duration;

use common::{
    OPERATOR_USER, ensure_crds, eventually, kubectl, kubectl_ok, operator_kubeconfig_path, repo_root, run,
    run_ok, with_temp_ns,
};
use connection_operator::api::{Connection, HTTPS_URL_MESSAGE};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const GC_TIMEOUT: Duration = Duration::from_secs(60);

fn salesforce(name: &str) -> Value {
    json!({
        "apiVersion": "crmconnect.io/v1alpha1",
        "kind": "Connection",
        "metadata": {"name": name},
        "spec": {
            "team": "sales",
            "provider": "SalesforceProduction",
            "credentialsSecretRef": {"name": "creds"}
        }
    })
}

fn dynamics(name: &str) -> Value {
    json!({
        "apiVersion": "crmconnect.io/v1alpha1",
        "kind": "Connection",
        "metadata": {"name": name},
        "spec": {
            "team": "sales",
            "provider": "Dynamics365",
            "dynamics": {"environmentUrl": "https://contoso.crm.dynamics.com", "cloud": "Public"},
            "credentialsSecretRef": {"name": "creds"}
        }
    })
}

/// `kubectl apply -n NS -f -` of `obj` (JSON is YAML).
fn apply(ns: &str, obj: &Value) -> common::Run {
    run(
        kubectl().args(["apply", "-n", ns, "-f", "-"]),
        Some(&obj.to_string()),
    )
}

/// `kubectl apply` of `obj` must fail, with `expected` in its error.
fn assert_apply_rejected(ns: &str, obj: &Value, expected: &str) {
    let out = apply(ns, obj);
    assert!(!out.success, "kubectl apply of {obj} should have been rejected");
    assert!(
        out.stderr.contains(expected),
        "kubectl apply of {obj}: expected an error containing {expected:?}, got:\n{}",
        out.stderr
    );
}

fn assert_apply_ok(ns: &str, obj: &Value) {
    let out = apply(ns, obj);
    assert!(out.success, "kubectl apply of {obj} failed:\n{}", out.stderr);
}

fn example_files() -> Vec<std::path::PathBuf> {
    let dir = common::repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no example manifests in {}", dir.display());
    files
}

#[test]
fn crd_is_established_with_our_names() {
    ensure_crds();
    let out = kubectl_ok(&[
        "get",
        "crd",
        "connections.crmconnect.io",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Established\")].status} {.status.acceptedNames.shortNames[0]} {.spec.scope}",
    ]);
    assert_eq!(out.trim(), "True conn Namespaced");
}

#[tokio::test]
async fn every_example_applies_dry_run_and_for_real() {
    ensure_crds();
    with_temp_ns(|client, ns| async move {
        for file in example_files() {
            let path = file.to_str().expect("utf-8 path");
            kubectl_ok(&["apply", "--dry-run=server", "-n", &ns, "-f", path]);
            kubectl_ok(&["apply", "-n", &ns, "-f", path]);
        }
        let names: Vec<String> = Api::<Connection>::namespaced(client, &ns)
            .list(&Default::default())
            .await
            .expect("list connections")
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect();
        assert_eq!(
            names.len(),
            example_files().len(),
            "one Connection per example: {names:?}"
        );
    })
    .await;
}

#[test]
fn the_example_job_template_applies() {
    ensure_crds();
    let path = "examples/jobtemplates/record-count.yaml";
    // Server-side dry run: the CRD's schema (pod template, podFailurePolicy) accepts it; nothing
    // is left behind in the shared test cluster.
    let out = kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-f",
        path,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    assert!(out.contains("record-count"), "{out}");
}

#[tokio::test]
async fn examples_kustomization_applies() {
    ensure_crds();
    with_temp_ns(|_client, ns| async move {
        kubectl_ok(&["apply", "--dry-run=server", "-n", &ns, "-k", "examples/"]);
        kubectl_ok(&["apply", "-n", &ns, "-k", "examples/"]);
        let out = kubectl_ok(&["get", "conn", "-n", &ns, "-o", "name"]);
        assert_eq!(out.lines().count(), example_files().len(), "{out}");
    })
    .await;
}

/// `make demo` tells the user to `source target/demo/env` (make runs the demo in a subshell, which
/// cannot export anything for them): that file, written by `scripts/demo.sh env` for the running
/// cluster, must work in a new shell with a clean environment, from any directory.
#[test]
fn the_demo_env_file_reaches_the_cluster_from_a_new_shell() {
    ensure_crds();
    let lines = run_ok(
        std::process::Command::new(repo_root().join("scripts/demo.sh")).arg("env"),
        None,
    );
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("env");
    std::fs::write(&file, lines).unwrap();
    let out = run(
        std::process::Command::new("bash")
            .args([
                "--noprofile",
                "--norc",
                "-c",
                "source \"$1\" && kubectl get conn -A && command -v connection-operator",
                "bash",
            ])
            .arg(&file)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", home.path())
            .current_dir(home.path()),
        None,
    );
    assert!(
        out.success,
        "source env && kubectl get conn -A:\n{}{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stdout
            .trim_end()
            .ends_with("target/debug/connection-operator"),
        "connection-operator on PATH: {}",
        out.stdout
    );
}

#[tokio::test]
async fn cel_rules_reject_bad_manifests_through_kubectl() {
    ensure_crds();
    with_temp_ns(|_client, ns| async move {
        let dynamics_rule = "spec.dynamics is required when provider is Dynamics365 and forbidden otherwise";

        // dynamics block missing
        let mut obj = dynamics("d1");
        obj["spec"].as_object_mut().unwrap().remove("dynamics");
        assert_apply_rejected(&ns, &obj, dynamics_rule);

        // dynamics block on a Salesforce connection
        let mut obj = salesforce("s1");
        obj["spec"]["dynamics"] = json!({"environmentUrl": "https://contoso.crm.dynamics.com"});
        assert_apply_rejected(&ns, &obj, dynamics_rule);

        // salesforce block on a Dynamics connection
        let mut obj = dynamics("d2");
        obj["spec"]["salesforce"] = json!({"loginUrl": "https://acme.my.salesforce.com"});
        assert_apply_rejected(
            &ns,
            &obj,
            "spec.salesforce is only allowed for SalesforceProduction and SalesforceSandbox",
        );

        // non-https URLs
        let mut obj = salesforce("s2");
        obj["spec"]["salesforce"] = json!({"loginUrl": "http://acme.my.salesforce.com"});
        assert_apply_rejected(&ns, &obj, HTTPS_URL_MESSAGE);
        let mut obj = dynamics("d3");
        obj["spec"]["dynamics"]["environmentUrl"] = json!("http://contoso.crm.dynamics.com");
        assert_apply_rejected(&ns, &obj, HTTPS_URL_MESSAGE);
        let mut obj = dynamics("d4");
        obj["spec"]["dynamics"]["environmentUrl"] = json!("not a url");
        assert_apply_rejected(&ns, &obj, HTTPS_URL_MESSAGE);

        // bad enums
        let mut obj = salesforce("s3");
        obj["spec"]["provider"] = json!("HubSpot");
        assert_apply_rejected(&ns, &obj, "Unsupported value: \"HubSpot\"");
        let mut obj = dynamics("d5");
        obj["spec"]["dynamics"]["cloud"] = json!("Azure");
        assert_apply_rejected(&ns, &obj, "Unsupported value: \"Azure\"");

        // bad team name (schema pattern)
        let mut obj = salesforce("s4");
        obj["spec"]["team"] = json!("Sales Ops");
        assert_apply_rejected(&ns, &obj, "spec.team");

        // credentials read from the connection's own session or token Secret (the operator writes them)
        for own in ["s6-session", "s6-token"] {
            let mut obj = salesforce("s6");
            obj["spec"]["credentialsSecretRef"]["name"] = json!(own);
            assert_apply_rejected(
                &ns,
                &obj,
                "spec.credentialsSecretRef must not name the connection's own session or token Secret",
            );
        }

        // none of them was created
        let out = kubectl_ok(&["get", "connections", "-n", &ns, "-o", "name"]);
        assert_eq!(out.trim(), "", "rejected manifests must not create objects");

        // http on loopback is allowed (for local testing)
        let mut obj = salesforce("s5");
        obj["spec"]["salesforce"] = json!({"loginUrl": "http://127.0.0.1:8080"});
        assert_apply_ok(&ns, &obj);
    })
    .await;
}

#[tokio::test]
async fn team_and_provider_are_immutable() {
    ensure_crds();
    with_temp_ns(|_client, ns| async move {
        let obj = salesforce("c");
        assert_apply_ok(&ns, &obj);

        let mut changed = obj.clone();
        changed["spec"]["team"] = json!("marketing");
        assert_apply_rejected(
            &ns,
            &changed,
            "team is immutable; create a new Connection for another team",
        );

        let mut changed = obj.clone();
        changed["spec"]["provider"] = json!("SalesforceSandbox");
        assert_apply_rejected(
            &ns,
            &changed,
            "provider is immutable; create a new Connection for another provider",
        );

        // other fields stay editable
        let mut changed = obj.clone();
        changed["spec"]["displayName"] = json!("Renamed");
        changed["spec"]["paused"] = json!(true);
        assert_apply_ok(&ns, &changed);
    })
    .await;
}

#[tokio::test]
async fn kubectl_get_shows_printer_columns() {
    ensure_crds();
    with_temp_ns(|client, ns| async move {
        let mut obj = dynamics("shown");
        obj["spec"]["displayName"] = json!("Contoso prod");
        assert_apply_ok(&ns, &obj);
        let api: Api<Connection> = Api::namespaced(client, &ns);
        let status = json!({"status": {"state": "Active", "reason": "TokensValid", "remoteId": "env-123", "message": "connected to environment env-123"}});
        api.patch_status("shown", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("patch status");

        let out = kubectl_ok(&["get", "connections", "-n", &ns]);
        let mut lines = out.lines();
        let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "TEAM", "PROVIDER", "STATE", "REASON", "ORG", "AGE"],
            "{out}"
        );
        let row: Vec<&str> = lines.next().expect("row").split_whitespace().collect();
        assert_eq!(
            row[..6],
            [
                "shown",
                "sales",
                "Dynamics365",
                "Active",
                "TokensValid",
                "env-123"
            ],
            "{out}"
        );

        let wide = kubectl_ok(&["get", "conn", "-n", &ns, "-o", "wide"]);
        assert!(wide.lines().next().unwrap().contains("DISPLAY NAME"), "{wide}");
        assert!(wide.contains("Contoso prod"), "{wide}");
        assert!(wide.lines().next().unwrap().contains("MESSAGE"), "{wide}");
        assert!(wide.contains("connected to environment env-123"), "{wide}");

        // the "crm" category (JobTemplates, cluster-scoped, show in every namespace's list: other
        // tests may have some)
        let out = kubectl_ok(&["get", "crm", "-n", &ns, "-o", "name"]);
        let listed: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("jobtemplate.crmconnect.io/"))
            .collect();
        assert_eq!(listed, ["connection.crmconnect.io/shown"], "{out}");
    })
    .await;
}

#[tokio::test]
async fn kubectl_explain_shows_our_docs() {
    ensure_crds();
    // The OpenAPI of a new CRD is published a moment after it is established.
    let out = eventually(
        "kubectl explain connection.spec.team",
        Duration::from_secs(60),
        || async {
            let out = run(kubectl().args(["explain", "connection.spec.team"]), None);
            out.success.then_some(out.stdout)
        },
    )
    .await;
    assert!(out.contains("The team that owns this connection"), "{out}");
    assert!(out.contains("crmconnect.io"), "{out}");

    let out = kubectl_ok(&["explain", "connections.spec.provider"]);
    assert!(out.contains("SalesforceProduction"), "{out}");
    let out = kubectl_ok(&["explain", "conn"]);
    assert!(
        out.contains("A team's connection to a Salesforce org or Dynamics 365 environment"),
        "{out}"
    );
    for (path, text) in [
        ("jobruns.spec.crmJobId", "record ID in the CRM"),
        (
            "orgsettings.spec.pollInterval",
            "How often the retriever polls the CRM",
        ),
    ] {
        let out = eventually(
            &format!("kubectl explain {path}"),
            Duration::from_secs(60),
            || async {
                let out = run(kubectl().args(["explain", path]), None);
                out.success.then_some(out.stdout)
            },
        )
        .await;
        assert!(out.contains(text), "{path}: {out}");
    }
}

#[tokio::test]
async fn status_subresource_does_not_bump_generation_but_spec_does() {
    ensure_crds();
    with_temp_ns(|client, ns| async move {
        let api: Api<Connection> = Api::namespaced(client, &ns);
        let obj: Connection = serde_json::from_value(salesforce("gen")).unwrap();
        let created = api.create(&PostParams::default(), &obj).await.expect("create");
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.status.is_none());

        let status = json!({"status": {"state": "Pending", "observedGeneration": 1}});
        let after_status = api
            .patch_status("gen", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("patch status");
        assert_eq!(
            after_status.metadata.generation,
            Some(1),
            "a status write must not bump generation"
        );
        let st = after_status.status.expect("status written");
        assert_eq!(st.state.map(|s| s.to_string()).as_deref(), Some("Pending"));
        assert_eq!(st.observed_generation, Some(1));

        // status sent to the main resource is ignored
        let sneaky = json!({"status": {"state": "Active"}});
        let after = api
            .patch("gen", &PatchParams::default(), &Patch::Merge(&sneaky))
            .await
            .expect("patch main resource");
        assert_eq!(
            after
                .status
                .and_then(|s| s.state)
                .map(|s| s.to_string())
                .as_deref(),
            Some("Pending")
        );
        assert_eq!(after.metadata.generation, Some(1));

        let spec = json!({"spec": {"displayName": "Renamed"}});
        let after_spec = api
            .patch("gen", &PatchParams::default(), &Patch::Merge(&spec))
            .await
            .expect("patch spec");
        assert_eq!(
            after_spec.metadata.generation,
            Some(2),
            "a spec write must bump generation"
        );

        // metadata-only writes don't either
        let labels = json!({"metadata": {"labels": {"x": "y"}}});
        let after_labels = api
            .patch("gen", &PatchParams::default(), &Patch::Merge(&labels))
            .await
            .expect("patch labels");
        assert_eq!(after_labels.metadata.generation, Some(2));
    })
    .await;
}

/// Creates a Connection and a Pod it owns (controller, blockOwnerDeletion); returns the Pod API.
async fn connection_with_owned_pod(client: &Client, ns: &str, name: &str) -> Api<Pod> {
    let conns: Api<Connection> = Api::namespaced(client.clone(), ns);
    let obj: Connection = serde_json::from_value(salesforce(name)).unwrap();
    let conn = conns
        .create(&PostParams::default(), &obj)
        .await
        .expect("create connection");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("{name}-owned"),
            "ownerReferences": [{
                "apiVersion": "crmconnect.io/v1alpha1",
                "kind": "Connection",
                "name": name,
                "uid": conn.metadata.uid.expect("uid"),
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none:1"}]}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create owned pod");
    pods
}

#[tokio::test]
async fn owned_pod_is_garbage_collected_after_connection_is_deleted() {
    ensure_crds();
    with_temp_ns(|client, ns| async move {
        let pods = connection_with_owned_pod(&client, &ns, "gc").await;
        let conns: Api<Connection> = Api::namespaced(client, &ns);
        conns
            .delete("gc", &DeleteParams::background())
            .await
            .expect("delete connection");
        eventually(
            "the garbage collector to delete the owned pod",
            GC_TIMEOUT,
            || async {
                pods.get_opt("gc-owned")
                    .await
                    .expect("get pod")
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn foreground_deletion_waits_for_owned_pod() {
    ensure_crds();
    with_temp_ns(|client, ns| async move {
        let pods = connection_with_owned_pod(&client, &ns, "fg").await;
        let conns: Api<Connection> = Api::namespaced(client, &ns);
        conns
            .delete("fg", &DeleteParams::foreground())
            .await
            .expect("delete connection");
        eventually("the connection and its pod to be gone", GC_TIMEOUT, || async {
            let conn = conns.get_opt("fg").await.expect("get connection");
            let pod = pods.get_opt("fg-owned").await.expect("get pod");
            if let Some(c) = &conn {
                // while it waits, the owner is still there, marked for foreground deletion
                assert!(c.metadata.deletion_timestamp.is_some());
            }
            (conn.is_none() && pod.is_none()).then_some(())
        })
        .await;
    })
    .await;
}

/// Whether a RoleBinding or ClusterRoleBinding grants anything to the operator's identity
/// (another test may have installed the chart's RBAC into a cluster kept running).
fn operator_has_bindings() -> bool {
    let out = kubectl_ok(&["get", "clusterrolebindings,rolebindings", "-A", "-o", "json"]);
    let list: Value = serde_json::from_str(&out).expect("binding list JSON");
    let names_operator = |s: &Value| match s["kind"].as_str() {
        Some("ServiceAccount") => {
            s["name"] == "connection-operator" && s["namespace"] == "connection-operator"
        }
        Some("User") => s["name"] == OPERATOR_USER,
        Some("Group") => {
            s["name"] == "system:serviceaccounts" || s["name"] == "system:serviceaccounts:connection-operator"
        }
        _ => false,
    };
    list["items"].as_array().expect("items").iter().any(|b| {
        // the bootstrap bindings ("system:...") grant every ServiceAccount discovery only
        let bootstrap = b["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("system:"));
        !bootstrap
            && b["subjects"]
                .as_array()
                .is_some_and(|subjects| subjects.iter().any(names_operator))
    })
}

/// `kubectl auth can-i VERB RESOURCE ARGS...` as the operator must answer "no".
fn assert_operator_cannot(kubeconfig: &str, verb: &str, resource: &str, args: &[&str]) {
    let can = run(
        kubectl()
            .args(["--kubeconfig", kubeconfig, "auth", "can-i", verb, resource])
            .args(args),
        None,
    );
    assert!(
        !can.success && can.stdout.trim() == "no",
        "the operator must not be allowed to {verb} {resource} {args:?}: {can:?}"
    );
}

#[tokio::test]
async fn operator_identity_is_the_service_account_and_denied_by_default() {
    ensure_crds();
    let kubeconfig = operator_kubeconfig_path();
    let kubeconfig = kubeconfig.to_str().expect("utf-8 path");

    let who = run_ok(
        kubectl().args([
            "--kubeconfig",
            kubeconfig,
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username} {.status.userInfo.groups}",
        ]),
        None,
    );
    assert!(who.starts_with(&format!("{OPERATOR_USER} ")), "{who}");
    assert!(
        who.contains("system:serviceaccounts:connection-operator"),
        "{who}"
    );

    // Never granted, whatever RBAC is installed.
    assert_operator_cannot(kubeconfig, "create", "clusterrolebindings", &[]);
    assert_operator_cannot(kubeconfig, "delete", "namespaces", &[]);

    if operator_has_bindings() {
        // The cluster was kept running and another test installed the operator's RBAC:
        // "nothing by default" can't be observed here.
        eprintln!("note: RBAC for the operator is installed; skipping the no-rights-by-default checks");
        return;
    }
    assert_operator_cannot(kubeconfig, "list", "connections.crmconnect.io", &["-A"]);
    assert_operator_cannot(kubeconfig, "get", "secrets", &["-n", "default"]);

    // the admin sees the same through impersonation (what RBAC tests can use)
    let can = run(
        kubectl().args([
            "auth",
            "can-i",
            "watch",
            "connections.crmconnect.io",
            "-A",
            "--as",
            OPERATOR_USER,
        ]),
        None,
    );
    assert_eq!(can.stdout.trim(), "no");

    let client = common::operator_client().await;
    let err = Api::<Connection>::all(client)
        .list(&Default::default())
        .await
        .expect_err("listing connections must be forbidden");
    match err {
        kube::Error::Api(status) => {
            assert!(status.is_forbidden(), "expected 403, got {status:?}");
            assert!(status.message.contains(OPERATOR_USER), "{}", status.message);
        }
        other => panic!("expected a 403 from the API server, got {other}"),
    }
}
