//! The real `connection-operator run` binary against the test cluster: it starts with the
//! least-privilege identity, reconciles, and exits cleanly on SIGTERM.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn run_reconciles_and_exits_cleanly_on_sigterm() {
    ensure_operator_rbac();
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    // A connection whose Secret is missing: reconciled without any provider.
    let manifest = format!(
        "apiVersion: crmconnect.io/v1alpha1\nkind: Connection\nmetadata: {{name: lonely, namespace: {}}}\nspec: {{team: t, provider: SalesforceSandbox, credentialsSecretRef: {{name: nowhere}}}}\n",
        ns.name()
    );
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_connection-operator"))
        .args(["run", "--namespace", ns.name(), "--log-format", "json"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", operator_kubeconfig_path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the operator");
    let reason = eventually(
        "the operator to mark the connection Inactive",
        Duration::from_secs(30),
        || async {
            let r = kubectl_ok(&[
                "get",
                "conn",
                "lonely",
                "-n",
                ns.name(),
                "-o",
                "jsonpath={.status.reason}",
            ]);
            (!r.is_empty()).then_some(r)
        },
    )
    .await;
    assert_eq!(reason, "SecretMissing");

    // Probes and metrics.
    let get = |path: &str| {
        let url = format!("{base}{path}");
        async move {
            let r = reqwest::get(&url).await.ok()?;
            Some((r.status().as_u16(), r.text().await.ok()?))
        }
    };
    assert_eq!(get("/healthz").await.map(|r| r.0), Some(200));
    eventually("/readyz to answer 200", Duration::from_secs(10), || async {
        (get("/readyz").await?.0 == 200).then_some(())
    })
    .await;
    let metrics = eventually(
        "metrics with the inactive connection",
        Duration::from_secs(10),
        || async {
            let (_, body) = get("/metrics").await?;
            body.contains(r#"connection_operator_connections{state="Inactive"} 1"#)
                .then_some(body)
        },
    )
    .await;
    assert!(
        metrics.contains(r#"connection_operator_reconciles_total{result="ok"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("connection_operator_reconcile_duration_seconds_bucket"),
        "{metrics}"
    );
    // Each step of that reconcile, timed.
    for step in ["dereference", "validate", "org_claim", "apply_children", "status"] {
        assert!(
            metrics.contains(&format!(
                "connection_operator_reconcile_step_duration_seconds_count{{step=\"{step}\"}}"
            )),
            "{step}: {metrics}"
        );
    }

    let started = Instant::now();
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "exit status {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "shutdown took {:?}",
        started.elapsed()
    );
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("controller stopped"), "{logs}");
    let first = logs.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "JSON logs: {first}"
    );
}

#[tokio::test]
async fn run_without_the_crd_exits_1_with_an_install_hint() {
    // The real API server behind a path where no API lives answers 404 to the Connection list,
    // exactly what it answers when the CRD is not installed.
    let mut kubeconfig: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(kubeconfig_path()).unwrap()).unwrap();
    let server = &mut kubeconfig["clusters"][0]["cluster"]["server"];
    *server = format!("{}/no-api-here", server.as_str().unwrap()).into();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, serde_saphyr::to_string(&kubeconfig).unwrap()).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_connection-operator"))
        .arg("run")
        .env("KUBECONFIG", &path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is not installed") && stderr.contains("kubectl apply -f crds/connection.yaml"),
        "{stderr}"
    );
}
