//! The Helm chart: lint, render, and validate against the real API server; its RBAC is exactly what
//! the operator needs (the reconciler tests run with it; here: nothing more).

mod common;

use common::*;

fn render_with(extra: &[&str]) -> String {
    run_ok(
        helm()
            .args([
                "template",
                "connection-operator",
                "charts/connection-operator",
                "--namespace",
                "connection-operator",
            ])
            .args(extra),
        None,
    )
}

fn render() -> String {
    render_with(&[])
}

fn documents(rendered: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple::<serde_json::Value>(rendered)
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// A PEM file with a test CA certificate, and the directory holding it.
fn ca_bundle_file() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let pki = fake_providers::TestPki::generate(&["127.0.0.1".parse().unwrap()], &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &pki.ca_pem).unwrap();
    (dir, path, pki.ca_pem)
}

#[test]
fn chart_lints() {
    let out = run_ok(helm().args(["lint", "charts/connection-operator"]), None);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn rendered_chart_is_accepted_by_the_api_server() {
    ensure_crds();
    let _ = run(
        kubectl().args(["create", "namespace", "connection-operator"]),
        None,
    );
    // With the optional extra CA bundle, so its ConfigMap and volume are checked too.
    let (_dir, bundle, _) = ca_bundle_file();
    let set_file = format!("extraCABundle={}", bundle.display());
    let out = run_ok(
        kubectl().args(["apply", "--dry-run=server", "-f", "-"]),
        Some(&render_with(&["--set-file", &set_file])),
    );
    for kind in [
        "configmap/",
        "serviceaccount/",
        "clusterrole.rbac",
        "clusterrolebinding.rbac",
        "deployment.apps/",
    ] {
        assert!(out.contains(kind), "{kind} missing from:\n{out}");
    }
}

#[test]
fn operator_pod_runs_restricted_with_resources() {
    let rendered = render();
    let deployment = documents(&rendered)
        .into_iter()
        .find(|v| v["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert!(c["resources"]["requests"]["memory"].is_string() && c["resources"]["limits"]["cpu"].is_string());
    assert_eq!(c["args"][0], "run");
    // Long enough for an in-flight refresh: limiter wait 30s + token and identity calls
    // (providerTimeout 20s each) + the writes after them.
    assert_eq!(pod["terminationGracePeriodSeconds"], 90);
}

#[test]
fn only_the_http_port_is_reachable_and_only_from_the_operators_namespace_by_default() {
    let docs = documents(&render());
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy");
    assert_eq!(policy["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "connection-operator"
    );
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["ports"],
        serde_json::json!([{"port": "http", "protocol": "TCP"}])
    );
    // A bare podSelector: pods of the policy's (the operator's) namespace only.
    assert_eq!(rules[0]["from"], serde_json::json!([{"podSelector": {}}]));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let port = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0];
    assert_eq!(port["name"], "http", "the policy's named port exists");

    let open = documents(&render_with(&[
        "--set-json",
        r#"networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
    ]));
    let policy = open.iter().find(|d| d["kind"] == "NetworkPolicy").unwrap();
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    let off = documents(&render_with(&["--set", "networkPolicy.enabled=false"]));
    assert!(!off.iter().any(|d| d["kind"] == "NetworkPolicy"));
}

#[test]
fn token_journal_is_an_emptydir_and_its_key_is_in_memory_only() {
    let rendered = render();
    let deployment = documents(&rendered)
        .into_iter()
        .find(|v| v["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
            .clone()
    };
    assert!(volume("journal")["emptyDir"].is_object());
    assert_eq!(volume("journal-key")["emptyDir"]["medium"], "Memory");
    let c = &pod["containers"][0];
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("env {name}"))["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mount = |name: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("mount {name}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(env("JOURNAL_DIR"), mount("journal"));
    assert!(env("JOURNAL_KEY_FILE").starts_with(&format!("{}/", mount("journal-key"))));
}

#[test]
fn extra_ca_bundle_is_a_mounted_configmap_only_when_set() {
    let without = documents(&render());
    assert!(!without.iter().any(|d| d["kind"] == "ConfigMap"));
    let deployment = without.iter().find(|v| v["kind"] == "Deployment").unwrap();
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(!env.contains("EXTRA_CA_BUNDLE"), "{env}");

    let (_dir, bundle, pem) = ca_bundle_file();
    let set_file = format!("extraCABundle={}", bundle.display());
    let with = documents(&render_with(&["--set-file", &set_file]));
    let config_map = with
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the CA bundle ConfigMap");
    assert_eq!(config_map["metadata"]["name"], "connection-operator-ca-bundle");
    assert_eq!(config_map["data"]["ca.crt"].as_str().unwrap().trim(), pem.trim());
    let pod = &with.iter().find(|v| v["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "ca-bundle")
        .expect("the ca-bundle volume");
    assert_eq!(volume["configMap"]["name"], "connection-operator-ca-bundle");
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ca-bundle")
        .expect("the ca-bundle mount");
    assert_eq!(mount["readOnly"], true);
    let path = format!("{}/ca.crt", mount["mountPath"].as_str().unwrap());
    let env = c["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "EXTRA_CA_BUNDLE" && e["value"] == path.as_str()),
        "{env:?}"
    );
}

#[test]
fn rbac_grants_no_delete_and_no_access_beyond_what_the_operator_uses() {
    let rendered = render();
    let role = documents(&rendered)
        .into_iter()
        .find(|v| v["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let mut grants = vec![];
    for rule in role["rules"].as_array().unwrap() {
        for resource in rule["resources"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                grants.push(format!(
                    "{}/{}:{}",
                    rule["apiGroups"][0].as_str().unwrap(),
                    resource.as_str().unwrap(),
                    verb.as_str().unwrap()
                ));
            }
        }
    }
    // No delete but of JobRuns that ended without a Job of their own (once the job TTL old; the
    // org's history keeps their outcome): everything else goes by owner references and TTLs.
    assert!(
        grants.iter().all(
            |g| (!g.ends_with(":delete") || g == "crmconnect.io/jobruns:delete")
                && !g.ends_with(":deletecollection")
                && !g.contains('*')
        ),
        "{grants:?}"
    );
    assert!(
        !grants.iter().any(|g| g.starts_with("crmconnect.io/connections:")
            && !g.ends_with(":get")
            && !g.ends_with(":list")
            && !g.ends_with(":watch")),
        "connections are read-only: {grants:?}"
    );
    assert!(
        !grants
            .iter()
            .any(|g| (g.contains("/pods:") && !g.ends_with("/pods:list")) || g.contains("configmaps")),
        "pods may only be listed (a finished worker's termination message): {grants:?}"
    );
    // It may bind its retrievers to the retriever ClusterRole, and to no other role.
    let bind: Vec<_> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["verbs"].as_array().unwrap().iter().any(|v| v == "bind"))
        .collect();
    assert_eq!(bind.len(), 1, "{bind:?}");
    assert_eq!(bind[0]["resources"], serde_json::json!(["clusterroles"]));
    let names = bind[0]["resourceNames"]
        .as_array()
        .expect("bind is limited by resourceNames");
    assert_eq!(names.len(), 1);
    assert!(names[0].as_str().unwrap().ends_with(":retriever"), "{names:?}");
}

#[test]
fn operator_identity_gets_exactly_the_chart_permissions() {
    ensure_operator_rbac();
    let can = |verb: &str, resource: &str| {
        let (resource, sub) = resource
            .split_once('/')
            .map_or((resource, None), |(r, s)| (r, Some(s)));
        let mut cmd = kubectl();
        cmd.args(["auth", "can-i", verb, resource, "-A", "--as", OPERATOR_USER]);
        if let Some(sub) = sub {
            cmd.arg(format!("--subresource={sub}"));
        }
        run(&mut cmd, None).stdout.trim() == "yes"
    };
    assert!(can("watch", "connections.crmconnect.io"));
    assert!(can("patch", "connections.crmconnect.io/status"));
    assert!(can("patch", "secrets"));
    assert!(can("create", "events"));
    assert!(
        !can("update", "connections.crmconnect.io"),
        "the operator never writes a spec"
    );
    assert!(!can("delete", "secrets"));
    assert!(!can("delete", "deployments.apps"));
    assert!(!can("delete", "jobs.batch"), "a Job's TTL removes it");
    assert!(
        can("delete", "jobruns.crmconnect.io"),
        "runs that ended without a Job are collected"
    );
    assert!(!can("create", "pods"));
}

#[test]
fn cluster_rbac_names_never_clash_with_built_in_roles() {
    let rendered = run_ok(
        helm().args([
            "template",
            "admin",
            "charts/connection-operator",
            "--namespace",
            "ops",
        ]),
        None,
    );
    for doc in documents(&rendered) {
        if doc["kind"] == "ClusterRole" || doc["kind"] == "ClusterRoleBinding" {
            let name = doc["metadata"]["name"].as_str().unwrap();
            assert!(
                name == "crmconnect:admin"
                    || name == "crmconnect:admin:retriever"
                    || name == "crmconnect:admin:cluster-scoped",
                "{doc}"
            );
        }
        if doc["kind"] == "ClusterRoleBinding" {
            assert_eq!(doc["roleRef"]["name"], doc["metadata"]["name"]);
        }
    }
}

#[tokio::test]
async fn with_a_watch_namespace_the_operator_may_act_in_that_namespace_only() {
    ensure_crds();
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    let ns = ns.name().to_string();
    let rendered = run_ok(
        helm().args([
            "template",
            &format!("scoped-{}", &ns[2..]),
            "charts/connection-operator",
            "--namespace",
            &ns,
            "--set",
            &format!("watchNamespace={ns}"),
            "--set",
            "serviceAccount.name=scoped-operator",
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ]),
        None,
    );
    // Nothing cluster-wide but reading the cluster-scoped JobTemplates (the administrator's) and
    // writing the OrgClaims.
    for doc in documents(&rendered) {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if !kind.starts_with("Cluster") {
            continue;
        }
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            name.ends_with(":cluster-scoped"),
            "namespaced mode renders no other cluster-wide RBAC: {doc}"
        );
        if kind == "ClusterRole" {
            assert_eq!(
                doc["rules"],
                serde_json::json!([
                    {"apiGroups": ["crmconnect.io"], "resources": ["jobtemplates"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["crmconnect.io"], "resources": ["orgclaims"], "verbs": ["get", "create", "update"]},
                ]),
                "{doc}"
            );
        }
    }
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&rendered));
    let user = format!("system:serviceaccount:{ns}:scoped-operator");
    let can = |args: &[&str]| {
        let out = run(
            kubectl().args(["auth", "can-i"]).args(args).args(["--as", &user]),
            None,
        );
        out.stdout.trim() == "yes"
    };
    for allowed in [
        &["watch", "connections.crmconnect.io", "-n", &ns][..],
        &[
            "patch",
            "connections.crmconnect.io",
            "--subresource=status",
            "-n",
            &ns,
        ],
        &["patch", "secrets", "-n", &ns],
        &["create", "deployments.apps", "-n", &ns],
        &["create", "events", "-n", &ns],
        &["create", "leases.coordination.k8s.io", "-n", &ns],
    ] {
        assert!(can(allowed), "{allowed:?} should be allowed");
    }
    for denied in [
        &["list", "secrets", "-A"][..],
        &["get", "secrets", "-n", "kube-system"],
        &["patch", "secrets", "-n", "default"],
        &["list", "connections.crmconnect.io", "-A"],
        &["create", "deployments.apps", "-n", "kube-system"],
        &["delete", "secrets", "-n", &ns],
    ] {
        assert!(!can(denied), "{denied:?} should be denied");
    }
}

#[test]
fn a_required_agreement_reaches_the_operator_and_needs_its_url() {
    let env_of = |rendered: &str| {
        let docs = documents(rendered);
        let deployment = docs.iter().find(|v| v["kind"] == "Deployment").unwrap().clone();
        deployment["spec"]["template"]["spec"]["containers"][0]["env"].clone()
    };
    assert!(
        !env_of(&render()).to_string().contains("AGREEMENT_"),
        "off by default"
    );
    let env = env_of(&render_with(&[
        "--set",
        "agreement.version=2026-01",
        "--set",
        "agreement.url=https://example.com/dpa",
    ]));
    let value = |name: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    assert_eq!(value("AGREEMENT_VERSION").as_deref(), Some("2026-01"));
    assert_eq!(value("AGREEMENT_URL").as_deref(), Some("https://example.com/dpa"));
    assert_eq!(
        value("AGREEMENT_NAME").as_deref(),
        Some("Data Processing Agreement")
    );
    let refused = run(
        helm().args([
            "template",
            "x",
            "charts/connection-operator",
            "--set",
            "agreement.version=2026-01",
        ]),
        None,
    );
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("agreement.url is required"),
        "{}",
        refused.stderr
    );
}
