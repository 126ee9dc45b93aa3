//! The job tests' shared setup: a namespace, the fake CRMs, an in-process operator, Active
//! connections, and the retriever run as a process (`retrieve --once`) with its own
//! ServiceAccount's token and the session the operator wrote.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime};

use super::*;
use connection_operator::api::{Connection, JobRun, State};
use connection_operator::controller::Config;
use fake_providers::{DynamicsEnvironment, FakeProviders, NewJob, SalesforceOrg};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use serde_json::json;

pub const SF_ORG: &str = "00D000000000031AAA";
pub const SF_KEY: &str = "sf-00d000000000031aaa";
pub const D365_ENV: &str = "31313131-3131-3131-3131-313131313131";
pub const D365_KEY: &str = "d365-31313131-3131-3131-3131-313131313131";
pub const CLIENT: &str = "cid";

pub struct Env {
    pub client: kube::Client,
    pub ns: TempNamespace,
    pub fake: FakeProviders,
    pub op: InProcessOperator,
}

impl Env {
    pub async fn new() -> Env {
        Self::serving(FakeProviders::start().await, |_| {}).await
    }

    /// [`Env::new`] with the operator's configuration changed by `configure`.
    pub async fn configured(configure: impl FnOnce(&mut Config)) -> Env {
        Self::serving(FakeProviders::start().await, configure).await
    }

    /// The fake CRMs over https (a test CA) on the test node's bridge address, which pods reach,
    /// and an operator that trusts that CA and may send tokens there: for runs of real pods. It
    /// reads running jobs' CRM records every 2 s.
    pub async fn on_node(ip: std::net::IpAddr) -> Env {
        let pki = fake_providers::TestPki::generate(&[ip], &[]).unwrap();
        let fake = FakeProviders::start_https_on((ip, 0).into(), &pki.server_identity(), None)
            .await
            .expect("serve the fake providers on the node's bridge address");
        Self::serving(fake, move |config| {
            config.validator.extra_roots = Some(
                connection_operator::providers::ExtraRoots::from_pem("the test CA", pki.ca_pem.as_bytes())
                    .unwrap(),
            );
            config.validator.hosts.extra_domains = vec![ip.to_string()];
            // A job aborted in the CRM is seen within seconds (60 s by default).
            config.job_abort_check = Duration::from_secs(2);
        })
        .await
    }

    async fn serving(fake: FakeProviders, configure: impl FnOnce(&mut Config)) -> Env {
        ensure_operator_rbac();
        let client = client().await;
        let ns = TempNamespace::new(&client).await;
        fake.add_salesforce_org(SalesforceOrg::new(
            SF_ORG,
            "005000000000031AAA",
            "ops@acme.example",
            CLIENT,
        ));
        fake.add_dynamics_environment(DynamicsEnvironment::new(
            D365_ENV,
            "32323232-3232-3232-3232-323232323232",
            CLIENT,
        ));
        let mut config = Config {
            namespaces: vec![ns.name().to_string()],
            ..Default::default()
        };
        config.validator.entra_authority_override = Some(fake.entra_authority());
        configure(&mut config);
        let op = InProcessOperator::start(config).await;
        Env { client, ns, fake, op }
    }

    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// A Connection `name` for the Salesforce org (or the Dynamics environment), Active.
    pub async fn connect(&self, name: &str, dynamics: bool) -> Connection {
        let remote = if dynamics { D365_ENV } else { SF_ORG };
        let token = self.fake.issue_refresh_token(remote);
        let provider = if dynamics {
            json!({"provider": "Dynamics365", "dynamics": {"environmentUrl": self.fake.environment_url()}})
        } else {
            json!({"provider": "SalesforceProduction", "salesforce": {"loginUrl": self.fake.salesforce_login_url()}})
        };
        let mut spec = json!({"team": "sales", "credentialsSecretRef": {"name": format!("{name}-creds")}});
        spec.as_object_mut()
            .unwrap()
            .extend(provider.as_object().unwrap().clone());
        let manifest = json!({
            "apiVersion": "v1", "kind": "List", "items": [
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{name}-creds"), "namespace": self.ns()},
                 "stringData": {"client_id": CLIENT, "refresh_token": token}},
                {"apiVersion": "crmconnect.io/v1alpha1", "kind": "Connection",
                 "metadata": {"name": name, "namespace": self.ns()}, "spec": spec},
            ]
        });
        run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest.to_string()));
        self.wait_state(name, State::Active).await
    }

    pub async fn wait_state(&self, name: &str, state: State) -> Connection {
        let api: Api<Connection> = Api::namespaced(self.client.clone(), self.ns());
        eventually(&format!("{name} {state}"), Duration::from_secs(60), || async {
            let c = api.get(name).await.ok()?;
            (c.status.as_ref()?.state == Some(state)).then_some(c)
        })
        .await
    }

    /// A kubeconfig for `<name>-retriever` (a TokenRequest token), as a retriever pod gets.
    pub fn retriever_kubeconfig(&self, dir: &Path, service_account: &str) -> std::path::PathBuf {
        let token = run_ok(
            kubectl().args([
                "create",
                "token",
                service_account,
                "-n",
                self.ns(),
                "--duration",
                "1h",
            ]),
            None,
        );
        let admin: serde_json::Value = serde_json::from_str(&run_ok(
            kubectl().args(["config", "view", "--raw", "--minify", "--flatten", "-o", "json"]),
            None,
        ))
        .unwrap();
        let cluster = admin["clusters"][0]["cluster"].clone();
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "u", "user": {"token": token.trim()}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": self.ns()}}],
            "current-context": "x",
        });
        let path = dir.join(format!("{service_account}.kubeconfig"));
        std::fs::write(&path, config.to_string()).unwrap();
        path
    }

    /// The session the operator wrote for `name`, as files (what the kubelet mounts).
    pub async fn session_dir(&self, name: &str, dir: &Path) -> std::path::PathBuf {
        let secret = Api::<Secret>::namespaced(self.client.clone(), self.ns())
            .get(&format!("{name}-session"))
            .await
            .unwrap();
        let session = dir.join(format!("{name}-session"));
        std::fs::create_dir_all(&session).unwrap();
        for (key, value) in secret.data.unwrap() {
            std::fs::write(session.join(key), value.0).unwrap();
        }
        session
    }

    pub async fn jobruns(&self) -> Vec<JobRun> {
        Api::<JobRun>::namespaced(self.client.clone(), self.ns())
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
    }
}

/// `connection-operator retrieve --once` for `connection`, as its retriever pod would run it. On a
/// blocking thread: the fake CRM serves from this test's runtime meanwhile.
/// A connection's retriever, ready to run once at a time (`retrieve --once`) with its own
/// ServiceAccount's token and the session the operator wrote.
pub struct Retriever {
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    session: std::path::PathBuf,
    ns: String,
    connection: String,
}

impl Env {
    /// The retriever of connection `name` (its ServiceAccount `<name>-retriever`).
    pub async fn retriever(&self, name: &str) -> Retriever {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = self.retriever_kubeconfig(dir.path(), &format!("{name}-retriever"));
        let session = self.session_dir(name, dir.path()).await;
        Retriever {
            _dir: dir,
            kubeconfig,
            session,
            ns: self.ns().to_string(),
            connection: name.to_string(),
        }
    }
}

impl Retriever {
    /// One poll for the org `org_key`, with `extra` flags; what it printed is asserted on success.
    pub async fn once(&self, org_key: &str, extra: &[&str]) -> Output {
        retrieve_once(
            &self.kubeconfig,
            &self.session,
            &self.ns,
            &self.connection,
            org_key,
            extra,
        )
        .await
    }

    /// One poll that must succeed and print `claimed N,`.
    pub async fn claims(&self, org_key: &str, extra: &[&str], n: usize) -> Output {
        let out = self.once(org_key, extra).await;
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&format!("claimed {n},")),
            "{}",
            text(&out)
        );
        out
    }
}

pub async fn retrieve_once(
    kubeconfig: &Path,
    session: &Path,
    ns: &str,
    connection: &str,
    org_key: &str,
    extra: &[&str],
) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_connection-operator"));
    cmd.args([
        "retrieve",
        "--once",
        "--connection",
        connection,
        "--namespace",
        ns,
        "--org-key",
        org_key,
    ])
    .arg("--session-dir")
    .arg(session)
    .args(["--metrics-addr", "127.0.0.1:0", "--pod-name", "test-pod"])
    .args(extra)
    .env("KUBECONFIG", kubeconfig)
    .env("RUST_LOG", "info");
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Seeds `n` Holding jobs and ages them past the 2-second rule.
pub fn seed_aged(fake: &FakeProviders, remote: &str, n: usize) -> Vec<String> {
    let ids = fake.seed_jobs(remote, &vec![NewJob::new("export"); n]);
    let past = SystemTime::now() - Duration::from_secs(60);
    for id in &ids {
        assert!(fake.set_job_modified(remote, id, past));
    }
    ids
}
