//! The test cluster's node itself (`tests/cluster`): it refuses to start without root, naming what is
//! missing, and a second node-enabled cluster on the same machine is refused without touching the
//! running one. (That stopping the cluster leaves the host as it was is checked by
//! `tests/cluster/with-cluster.sh` around every `make test`.)

mod common;

use std::process::Command;

use common::*;

fn kubecluster() -> Command {
    Command::new(cluster_bin().join("kubecluster"))
}

/// /proc/self belongs to the effective user.
fn is_root() -> bool {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0
}

#[test]
fn a_node_without_root_fails_at_once_naming_what_is_missing() {
    if !is_root() {
        eprintln!("skipped: needs root to start kubecluster as another user");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out: Run = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(cluster_bin().join("kubecluster"))
        .args(["up", "--node", "--timeout", "20s", "--dir"])
        .arg(state.path())
        .output()
        .expect("run kubecluster through setpriv")
        .into();
    assert!(!out.success, "up --node as nobody must fail: {out:?}");
    assert!(
        out.stderr.contains("cannot start a node; missing:") && out.stderr.contains("root:"),
        "the message names root as missing: {}",
        out.stderr
    );
    assert!(
        !state.path().join("ready").exists(),
        "no control plane was left running or ready"
    );
}

#[test]
fn a_second_node_enabled_cluster_is_refused_and_the_running_one_keeps_going() {
    if std::env::var("CLUSTER_NODE_IP").map_or(true, |v| v.is_empty()) {
        assert_eq!(
            std::env::var("CLUSTER_NODE").as_deref(),
            Ok("0"),
            "CLUSTER_NODE_IP is not set: this test needs the test cluster's node; {RUN_HINT} as root"
        );
        eprintln!("skipped: CLUSTER_NODE=0 (no node in the test cluster)");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let out: Run = kubecluster()
        .args(["up", "--node", "--timeout", "20s", "--dir"])
        .arg(state.path())
        .output()
        .unwrap()
        .into();
    assert!(!out.success, "a second up --node must fail: {out:?}");
    assert!(
        out.stderr.contains("another node-enabled kubecluster (pid"),
        "the message names the running cluster: {}",
        out.stderr
    );
    let ready = kubectl_ok(&[
        "get",
        "node",
        "kubecluster-node",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    assert_eq!(ready, "True", "the running node is untouched");
    assert!(
        std::path::Path::new("/run/kubecluster/containerd.sock").exists(),
        "the running node's containerd socket is still there"
    );
}
