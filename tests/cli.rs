//! The binary's own commands (no cluster needed).

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_connection-operator"))
}

#[test]
fn crd_command_prints_the_committed_crd() {
    let out = bin().arg("crd").output().unwrap();
    assert!(out.status.success());
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/connection.yaml")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed);
}

#[test]
fn retrieve_says_clearly_that_it_is_not_implemented_yet() {
    let out = bin().args(["retrieve", "--connection", "acme"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("not implemented yet") && err.contains("acme"),
        "{err}"
    );
}

#[test]
fn run_without_a_cluster_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\nusers: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )
    .unwrap();
    let out = bin()
        .arg("run")
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("error:"), "{err}");
}

#[test]
fn run_with_an_unusable_extra_ca_bundle_exits_1_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    for (path, expected) in [
        (Path::new("/nonexistent/ca.pem"), "No such file or directory"),
        (not_pem.as_path(), "holds no certificate"),
    ] {
        let out = bin()
            .args(["run", "--extra-ca-bundle"])
            .arg(path)
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&path.display().to_string()) && err.contains(expected),
            "{err}"
        );
    }
}

#[test]
fn bad_duration_flag_is_rejected_with_a_hint() {
    let out = bin()
        .args(["run", "--revalidate-interval", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("expected e.g. 30s, 15m, 1h")
    );
}
