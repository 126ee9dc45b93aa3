//! Shared helpers for the integration tests that run against the test cluster
//! (a real kube-apiserver, kube-controller-manager and etcd, started by
//! `tests/cluster/with-cluster.sh`; see tests/cluster/).
//!
//! Every helper that needs the cluster fails with a clear message when the tests
//! are not run through `tests/cluster/with-cluster.sh` (which `make test` does):
//! a test that needs a cluster never passes without one.
#![allow(dead_code)] // each test binary uses its own subset

pub mod jobs;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// How to run the tests that need a cluster.
pub const RUN_HINT: &str = "run through tests/cluster/with-cluster.sh (make test)";

/// Label put on every namespace made by [`TempNamespace`].
pub const TEMP_NS_LABEL: &str = "connection-operator.test/temp";

/// The user name of the operator's identity in `OPERATOR_KUBECONFIG`.
pub const OPERATOR_USER: &str = "system:serviceaccount:connection-operator:connection-operator";

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The admin kubeconfig of the test cluster (`$KUBECONFIG`). Panics when unset.
pub fn kubeconfig_path() -> PathBuf {
    env_path("KUBECONFIG")
        .unwrap_or_else(|| panic!("KUBECONFIG is not set: this test needs the test cluster; {RUN_HINT}"))
}

/// The operator's kubeconfig: the ServiceAccount connection-operator/connection-operator,
/// with only the permissions that RBAC grants it (none by default).
pub fn operator_kubeconfig_path() -> PathBuf {
    env_path("OPERATOR_KUBECONFIG").unwrap_or_else(|| {
        panic!("OPERATOR_KUBECONFIG is not set: this test needs the test cluster; {RUN_HINT}")
    })
}

/// The directory holding kubectl and helm (`$CLUSTER_BIN`, else target/cluster/bin).
pub fn cluster_bin() -> PathBuf {
    env_path("CLUSTER_BIN").unwrap_or_else(|| repo_root().join("target/cluster/bin"))
}

/// The client configuration of the kubeconfig at `path`.
pub async fn config_for(path: &Path) -> Config {
    let kubeconfig = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("reading kubeconfig {}: {e}; {RUN_HINT}", path.display()));
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.display()))
}

/// A kube client for the kubeconfig at `path`.
pub async fn client_for(path: &Path) -> Client {
    Client::try_from(config_for(path).await).expect("kube client")
}

/// A kube client with admin rights (`$KUBECONFIG`).
pub async fn client() -> Client {
    client_for(&kubeconfig_path()).await
}

/// A kube client with admin credentials impersonating `user` in `groups` (so it has exactly their
/// rights, e.g. a ServiceAccount bound only by a chart's Roles).
pub async fn client_as(user: &str, groups: &[&str]) -> Client {
    let mut config = config_for(&kubeconfig_path()).await;
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    Client::try_from(config).expect("kube client")
}

/// A kube client acting as the operator's ServiceAccount (`$OPERATOR_KUBECONFIG`), built as the
/// operator builds its own (`connection_operator::kube_client`: HTTP/2 when offered).
pub async fn operator_client() -> Client {
    let config = config_for(&operator_kubeconfig_path()).await;
    connection_operator::kube_client::from_config(config).expect("kube client")
}

fn tool(name: &str) -> Command {
    let path = cluster_bin().join(name);
    assert!(
        path.exists(),
        "{} not found: build it with tests/cluster/build.sh, or {RUN_HINT}",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.env("KUBECONFIG", kubeconfig_path()).current_dir(repo_root());
    cmd
}

/// `kubectl` of the test cluster, with the admin KUBECONFIG, run from the repo root.
pub fn kubectl() -> Command {
    tool("kubectl")
}

/// `helm` built for the tests, with the admin KUBECONFIG, run from the repo root.
pub fn helm() -> Command {
    tool("helm")
}

/// The result of a command, with its output as text.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `cmd` (with `stdin` as its input, if any) and returns its output.
pub fn run(cmd: &mut Command, stdin: Option<&str>) -> Run {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing stdin of {desc}: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {desc}: {e}"))
        .into()
}

/// Runs `cmd` and panics, with its stderr, unless it succeeds; returns its stdout.
pub fn run_ok(cmd: &mut Command, stdin: Option<&str>) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, stdin);
    assert!(out.success, "{desc} failed:\n{}{}", out.stdout, out.stderr);
    out.stdout
}

/// `kubectl ARGS...`, which must succeed; returns its stdout.
pub fn kubectl_ok(args: &[&str]) -> String {
    run_ok(kubectl().args(args), None)
}

/// Polls `f` every 250 ms until it returns `Some`, for at most `timeout`; panics with
/// `what` after that.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Installs the CRDs of `crds/` (idempotent, once per test binary) and waits until they are
/// established. Safe to call from tests running in parallel.
pub fn ensure_crds() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // Tests of other binaries may apply at the same moment: retry create races.
        let mut last = None;
        for _ in 0..5 {
            let out = run(
                kubectl().args(["apply", "--server-side", "--force-conflicts", "-f", "crds/"]),
                None,
            );
            if out.success {
                last = None;
                break;
            }
            last = Some(out.stderr);
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Some(err) = last {
            panic!("kubectl apply -f crds/ failed: {err}");
        }
        kubectl_ok(&[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "-f",
            "crds/",
        ]);
    });
}

/// A namespace made for one test (`t-<random>`), deleted when dropped, also when the test
/// panics. It is ready to use: its `default` ServiceAccount exists, so Pods can be created.
pub struct TempNamespace {
    name: String,
}

impl TempNamespace {
    /// Creates the namespace and waits for its `default` ServiceAccount.
    pub async fn new(client: &Client) -> Self {
        let name = format!("t-{:08x}", rand::random::<u32>());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEMP_NS_LABEL.to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}; {RUN_HINT}"));
        let guard = TempNamespace { name };
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &guard.name);
        eventually("the default ServiceAccount", Duration::from_secs(60), || async {
            sas.get_opt("default").await.ok().flatten()
        })
        .await;
        guard
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        // kubectl, not the async client: Drop can't await, and this also works while a
        // panicking test unwinds. Don't wait for the namespace controller to finish.
        let _ = kubectl()
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `f` with an admin client and a fresh namespace, deleted afterwards:
///
/// ```ignore
/// with_temp_ns(|client, ns| async move { ... }).await;
/// ```
pub async fn with_temp_ns<F, Fut, T>(f: F) -> T
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = T>,
{
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    f(client, ns.name().to_string()).await
}

/// Installs the chart's ServiceAccount and least-privilege RBAC for the operator identity of
/// `OPERATOR_KUBECONFIG` (idempotent, once per test binary), and the CRDs.
pub fn ensure_operator_rbac() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        ensure_crds();
        let ns = run(
            kubectl().args(["create", "namespace", "connection-operator"]),
            None,
        );
        assert!(ns.success || ns.stderr.contains("AlreadyExists"), "{}", ns.stderr);
        let rendered = run_ok(
            helm().args([
                "template",
                "connection-operator",
                "charts/connection-operator",
                "--namespace",
                "connection-operator",
                "--set",
                &ALLOW_ABSENT_RETRIEVER_IMAGE,
                "--show-only",
                "templates/serviceaccount.yaml",
                "--show-only",
                "templates/rbac.yaml",
                "--show-only",
                "templates/admission-policy.yaml",
                "--show-only",
                "templates/retriever-rbac.yaml",
            ]),
            None,
        );
        run_ok(
            kubectl().args(["apply", "--server-side", "--force-conflicts", "-f", "-"]),
            Some(&rendered),
        );
        // The API server compiles a new admission policy a moment after it is stored: until then
        // the operator identity may write what the policy denies (a probe that changed a user's
        // Secret while waiting for a denial made the next probe a no-op that the policy allows).
        // Wait for its first denial of a server dry-run, which changes nothing.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let probe = run(
                kubectl()
                    .env("KUBECONFIG", operator_kubeconfig_path())
                    .args([
                        "create",
                        "secret",
                        "generic",
                        "policy-probe",
                        "--from-literal=k=v",
                    ])
                    .args(["-n", "connection-operator", "--dry-run=server"]),
                None,
            );
            if probe.stderr.contains("ValidatingAdmissionPolicy") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the operator's admission policy denies nothing 60 s after it was applied: {}",
                probe.stderr
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

/// The operator running in this test process (the library's `controller::run`) as the operator
/// ServiceAccount of `OPERATOR_KUBECONFIG`.
pub struct InProcessOperator {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// The retriever image of in-process operators: one the test node does not have and may not pull.
/// Those tests check the reconciler's objects and conditions; a retriever pod that became Ready
/// would race their assertions. Real retriever pods run in `tests/e2e_pods.rs`.
pub const ABSENT_RETRIEVER_IMAGE: &str = "connection-operator.test/absent-retriever:never";

/// The chart value that lets the admission policy admit retriever Deployments of
/// [`ABSENT_RETRIEVER_IMAGE`] (it admits only the chart's retriever image otherwise).
pub static ALLOW_ABSENT_RETRIEVER_IMAGE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("admissionPolicy.extraRetrieverImages={{{ABSENT_RETRIEVER_IMAGE}}}"));

impl InProcessOperator {
    pub async fn start(mut config: connection_operator::controller::Config) -> Self {
        // The fake providers listen on loopback (`--allow-loopback-providers` of the binary).
        config.validator.hosts.allow_loopback = true;
        Self::start_with_host_policy(config).await
    }

    /// As [`InProcessOperator::start`], keeping `config.validator.hosts` as given.
    pub async fn start_with_host_policy(config: connection_operator::controller::Config) -> Self {
        Self::start_with_client(operator_client().await, config)
    }

    /// As [`InProcessOperator::start`], as the identity of `client`.
    pub fn start_as(client: Client, mut config: connection_operator::controller::Config) -> Self {
        config.validator.hosts.allow_loopback = true;
        Self::start_with_client(client, config)
    }

    fn start_with_client(client: Client, mut config: connection_operator::controller::Config) -> Self {
        config.retriever.image = ABSENT_RETRIEVER_IMAGE.to_string();
        config.retriever.pull_policy = "Never".to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            connection_operator::controller::run(client, config, async move {
                let _ = stopped.await;
            })
            .await
            .expect("operator runs");
        });
        InProcessOperator { stop, task }
    }

    /// Shuts it down and waits until in-flight reconciles are done.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("operator stops within 30 s of shutdown")
            .expect("operator task did not panic");
    }
}

/// A Secret `<name>-creds` and a Salesforce Production Connection `<name>` using it, as YAML.
pub fn salesforce_manifest(ns: &str, name: &str, team: &str, login_url: &str, secret_data: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: {name}-creds, namespace: {ns}}}
stringData: {{{secret_data}}}
---
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {{name: {name}, namespace: {ns}}}
spec:
  team: {team}
  provider: SalesforceProduction
  salesforce: {{loginUrl: "{login_url}"}}
  credentialsSecretRef: {{name: {name}-creds}}
"#
    )
}

/// A JSON value as a Lua literal (`null` → `nil`).
fn lua_literal(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "nil".into(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => {
            let mut out = String::from("\"");
            for b in s.bytes() {
                match b {
                    b'"' | b'\\' => {
                        out.push('\\');
                        out.push(b as char);
                    }
                    0x20..=0x7e => out.push(b as char),
                    other => out.push_str(&format!("\\{other:03}")),
                }
            }
            out.push('"');
            out
        }
        serde_json::Value::Array(items) => {
            format!(
                "{{{}}}",
                items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
            )
        }
        serde_json::Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!(
                    "[{}] = {}",
                    lua_literal(&serde_json::Value::String(k.clone())),
                    lua_literal(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs the Argo CD health check (`integrations/argocd/connection-health.lua`) with `lua5.4` on a
/// Connection as the API server returns it; returns (status, message).
pub fn argocd_health(connection: &serde_json::Value) -> (String, String) {
    let script = repo_root().join("integrations/argocd/connection-health.lua");
    let program = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\n\", hs.message or \"\")",
        lua_literal(connection),
        lua_literal(&serde_json::Value::String(script.display().to_string()))
    );
    let mut cmd = Command::new("lua5.4");
    cmd.args(["-e", &program]);
    let out = match cmd.output() {
        Ok(out) => Run::from(out),
        Err(e) => panic!(
            "lua5.4 not found ({e}): scripts/install-test-deps.sh installs it (apt-get install lua5.4)"
        ),
    };
    assert!(out.success, "lua5.4 failed: {}", out.stderr);
    let (status, message) = out.stdout.split_once('\n').unwrap_or((&out.stdout, ""));
    (status.to_string(), message.to_string())
}

/// The node's bridge address (`CLUSTER_NODE_IP`), or None when the cluster runs without a node.
pub fn node_ip() -> Option<std::net::IpAddr> {
    match std::env::var("CLUSTER_NODE_IP") {
        Ok(ip) if !ip.is_empty() => Some(ip.parse().expect("CLUSTER_NODE_IP is an IP address")),
        _ => {
            assert_eq!(
                std::env::var("CLUSTER_NODE").as_deref(),
                Ok("0"),
                "CLUSTER_NODE_IP is not set: these tests need the test cluster's node; {RUN_HINT} as root"
            );
            None
        }
    }
}

/// The image `scripts/image.sh` builds: the chart's default (repository + appVersion).
pub fn chart_image() -> (String, String) {
    let chart = std::fs::read_to_string(repo_root().join("charts/connection-operator/Chart.yaml")).unwrap();
    let app_version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("appVersion in Chart.yaml");
    ("ghcr.io/crmconnect/connection-operator".to_string(), app_version)
}

/// Cluster-scoped JobTemplates made by a test, deleted when dropped. A test names its job types
/// after its namespace: templates are shared by the whole cluster.
pub struct JobTemplates(Vec<String>);

impl JobTemplates {
    /// (job type, image, container args): the image's pull policy is Never (loaded into the node),
    /// and finished Jobs go 5 s after their outcome is reported.
    pub fn create(templates: &[(&str, String, Vec<&str>)]) -> Self {
        let specs: Vec<(&str, serde_json::Value)> = templates
            .iter()
            .map(|(job_type, image, args)| {
                let mut spec = Self::worker(image, args);
                spec["ttlSecondsAfterFinished"] = 5.into();
                (*job_type, spec)
            })
            .collect();
        Self::apply(&specs)
    }

    /// (job type, JobTemplate spec).
    pub fn apply(templates: &[(&str, serde_json::Value)]) -> Self {
        let mut names = vec![];
        for (job_type, spec) in templates {
            let manifest = serde_json::json!({
                "apiVersion": "crmconnect.io/v1alpha1",
                "kind": "JobTemplate",
                "metadata": {"name": job_type},
                "spec": spec,
            });
            run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest.to_string()));
            names.push(job_type.to_string());
        }
        JobTemplates(names)
    }

    /// These and more.
    pub fn and(mut self, templates: &[(&str, serde_json::Value)]) -> Self {
        let mut more = Self::apply(templates);
        self.0.append(&mut more.0);
        self
    }

    /// A JobTemplate spec whose one container runs `image` with `args` (pull policy Never).
    pub fn worker(image: &str, args: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "template": {"spec": {"containers": [{
                "name": "worker", "image": image, "imagePullPolicy": "Never", "args": args,
            }]}},
        })
    }
}

impl Drop for JobTemplates {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = kubectl()
                .args(["delete", "jobtemplate", name, "--ignore-not-found"])
                .output();
        }
    }
}
