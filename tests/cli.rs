//! The binary's own commands (no cluster needed).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_connection-operator"))
}

#[test]
fn crd_command_prints_the_committed_crds() {
    let committed = |stem: &str| {
        std::fs::read_to_string(format!("{}/crds/{stem}.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let stems = ["connection", "orgsettings", "jobrun", "jobtemplate", "orgclaim"];
    for stem in stems {
        let out = bin().args(["crd", stem]).output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            committed(stem),
            "crd {stem}"
        );
    }
    let all = bin().arg("crd").output().unwrap();
    assert!(all.status.success());
    let all = String::from_utf8(all.stdout).unwrap();
    assert_eq!(all, stems.map(committed).join("---\n"));
    let unknown = bin().args(["crd", "jobs"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2), "clap rejects an unknown CRD name");
}

/// `GET path` on 127.0.0.1:port: the status code, or None when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// `GET path` on 127.0.0.1:port: the body of a 200 answer.
fn http_body(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

fn wait_for_status(port: u16, path: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_status(port, path) != Some(want) {
        assert!(Instant::now() < deadline, "{path} never answered {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const TOKEN: &str = "00Dxx!AQ-first-access-token";
const ROTATED: &str = "00Dxx!AQ-second-access-token";

/// A session directory as the kubelet mounts the operator's session Secret.
fn session_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("access_token", TOKEN),
        ("instance_url", "https://acme.my.salesforce.com"),
        ("provider", "SalesforceProduction"),
        ("expires_at", "2030-01-01T00:00:00Z"),
    ] {
        std::fs::write(dir.path().join(key), value).unwrap();
    }
    dir
}

/// A kubeconfig naming an API server that is not there: the retriever starts (the client is only
/// configured), and its first poll is an hour away.
fn unreachable_kubeconfig(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        r#"{"apiVersion":"v1","kind":"Config","clusters":[{"name":"c","cluster":{"server":"https://127.0.0.1:1"}}],
            "users":[{"name":"u","user":{"token":"t"}}],"contexts":[{"name":"x","context":{"cluster":"c","user":"u"}}],
            "current-context":"x"}"#,
    )
    .unwrap();
    path
}

fn retrieve(dir: &Path, port: u16) -> Command {
    let mut cmd = bin();
    cmd.args([
        "retrieve",
        "--connection",
        "acme",
        "--org-key",
        "sf-00d000000000001eaa",
        "--session-dir",
    ])
    .arg(dir)
    .args(["--probe-addr", &format!("127.0.0.1:{port}")])
    .args(["--session-check-interval", "100ms", "--start-delay-max", "1h"])
    .env("KUBECONFIG", unreachable_kubeconfig(dir))
    .env("CONNECTION_NAMESPACE", "sales")
    .env("RUST_LOG", "debug")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

#[test]
fn retrieve_holds_the_session_follows_its_changes_and_exits_0_on_sigterm() {
    let dir = session_dir();
    let port = free_port();
    let child = retrieve(dir.path(), port).spawn().unwrap();
    wait_for_status(port, "/readyz", 200);
    assert_eq!(http_status(port, "/healthz"), Some(200));
    let metrics = http_body(port, "/metrics").unwrap_or_default();
    for family in [
        "crmconnect_retriever_polls",
        "crmconnect_retriever_claims",
        "crmconnect_retriever_holding_jobs",
        "crmconnect_retriever_api_usage_ratio",
        "crmconnect_retriever_throttled",
    ] {
        assert!(
            metrics.contains(family),
            "{family} missing from /metrics:\n{metrics}"
        );
    }

    // The operator rotates the access token; the re-read sees it. A session that cannot be read
    // makes the pod unready (but alive) until it can be read again.
    std::fs::write(dir.path().join("access_token"), ROTATED).unwrap();
    let url = dir.path().join("instance_url");
    std::fs::remove_file(&url).unwrap();
    wait_for_status(port, "/readyz", 503);
    assert_eq!(http_status(port, "/healthz"), Some(200));
    std::fs::write(&url, "https://acme.my.salesforce.com").unwrap();
    wait_for_status(port, "/readyz", 200);

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{logs}");
    for expected in [
        "retriever starting",
        "session loaded",
        "sales/acme",
        "https://acme.my.salesforce.com",
        "session changed",
        "instance_url",
    ] {
        assert!(logs.contains(expected), "{expected:?} missing from:\n{logs}");
    }
    assert!(
        !logs.contains(TOKEN) && !logs.contains(ROTATED),
        "a token was logged:\n{logs}"
    );
}

#[test]
fn retrieve_without_a_readable_session_exits_1_naming_the_file() {
    // Missing: the Secret volume is not there.
    let out = bin()
        .args([
            "retrieve",
            "--connection",
            "acme",
            "--org-key",
            "sf-00d000000000001eaa",
            "--session-dir",
            "/nonexistent/session",
        ])
        .args(["--probe-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/session/access_token") && err.contains("No such file or directory"),
        "{err}"
    );

    // Unreadable: reading the file fails with an OS error, which is shown. (Tests may run as root,
    // which reads any file regardless of mode; a directory in the file's place fails for everyone.)
    let dir = session_dir();
    let token = dir.path().join("access_token");
    std::fs::remove_file(&token).unwrap();
    std::fs::create_dir(&token).unwrap();
    let out = retrieve(dir.path(), free_port()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot read the session file {}", token.display()))
            && err.contains("os error"),
        "{err}"
    );

    // Permission denied (what a pod without fsGroup met): only observable when not root.
    let dir = session_dir();
    let token = dir.path().join("access_token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    if std::fs::read(&token).is_ok() {
        eprintln!("running as root: the Permission denied case cannot be observed here");
        return;
    }
    let out = retrieve(dir.path(), free_port()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&token.display().to_string()) && err.contains("Permission denied"),
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
