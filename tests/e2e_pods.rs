//! End to end with real pods on the test cluster's node (kubelet + containerd + runc): the chart
//! installed with Helm and the image `make image` builds (`scripts/image.sh --load`), the operator
//! running as a pod with its in-cluster ServiceAccount, retriever pods that really start and read
//! their session, pause/activate, `helm upgrade` and `helm uninstall`. The simulated Salesforce is
//! served over https with a test CA on the node's bridge address, which pods reach; the operator
//! trusts that CA through the chart's `extraCABundle`.
//!
//! Needs the node (`make test` starts it; it needs root). With `CLUSTER_NODE=0` these tests say
//! they are skipped and pass.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fake_providers::{FakeProviders, SalesforceOrg, TestPki};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

const ORG: &str = "00D5g000004E2EAA1";
const ORG_USER: &str = "0055g00000E2EUSR1";
const CLIENT_ID: &str = "e2e-client";

struct Release {
    name: String,
    ns: String,
}

impl Release {
    fn helm(&self, verb: &str, extra: &[&str]) -> Duration {
        let start = Instant::now();
        let mut cmd = helm();
        cmd.args([verb, &self.name]);
        if verb != "uninstall" {
            cmd.arg("charts/connection-operator");
        }
        cmd.args(["--namespace", &self.ns]).args(extra);
        run_ok(&mut cmd, None);
        start.elapsed()
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        // The ClusterRole/Binding are cluster-scoped: remove them even when the test failed.
        let _ = helm()
            .args([
                "uninstall",
                &self.name,
                "--namespace",
                &self.ns,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

fn pods(client: &Client, ns: &str) -> Api<Pod> {
    Api::namespaced(client.clone(), ns)
}

/// The pods matching `selector` that are not being deleted.
async fn live_pods(client: &Client, ns: &str, selector: &str) -> Vec<Pod> {
    pods(client, ns)
        .list(&ListParams::default().labels(selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

async fn live_operator_pods(client: &Client, ns: &str) -> Vec<Pod> {
    live_pods(client, ns, "app.kubernetes.io/name=connection-operator").await
}

async fn lease_holder(client: &Client, ns: &str, name: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), ns);
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

fn pod_ready(p: &Pod) -> bool {
    let status = p.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The connection's retriever pods (its Jobs' worker pods carry the connection label too).
async fn retriever_pods(client: &Client, ns: &str, conn: &str) -> Vec<Pod> {
    live_pods(
        client,
        ns,
        &format!("crmconnect.io/connection={conn},app.kubernetes.io/name=connection-retriever"),
    )
    .await
}

async fn conn_status(client: &Client, ns: &str, name: &str) -> serde_json::Value {
    let api: Api<connection_operator::api::Connection> = Api::namespaced(client.clone(), ns);
    api.get_opt(name)
        .await
        .unwrap()
        .and_then(|c| c.status)
        .map(|s| serde_json::to_value(s).unwrap())
        .unwrap_or_default()
}

fn condition<'a>(status: &'a serde_json::Value, type_: &str) -> Option<&'a serde_json::Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Waits for one Running and Ready retriever pod of `conn`, and returns its name.
async fn one_ready_retriever(client: &Client, ns: &str, conn: &str) -> String {
    eventually(
        &format!("one Ready retriever pod of {conn}"),
        Duration::from_secs(120),
        || async {
            let ps = retriever_pods(client, ns, conn).await;
            (ps.len() == 1 && pod_ready(&ps[0])).then(|| ps[0].metadata.name.clone().unwrap())
        },
    )
    .await
}

#[tokio::test]
async fn chart_runs_the_operator_and_retriever_pods_on_a_real_node() {
    let Some(ip) = node_ip() else {
        eprintln!("skipped: CLUSTER_NODE=0 (no node in the test cluster)");
        return;
    };
    ensure_crds();
    let client = client().await;
    let ns_guard = TempNamespace::new(&client).await;
    let ns = ns_guard.name().to_string();

    // The simulated Salesforce on the bridge address, over https with a test CA.
    let pki = TestPki::generate(&[ip], &[]).unwrap();
    let fake = FakeProviders::start_https_on((ip, 0).into(), &pki.server_identity(), None)
        .await
        .expect("serve the fake providers on the node's bridge address");
    fake.add_salesforce_org(SalesforceOrg::new(ORG, ORG_USER, "ops@e2e.example", CLIENT_ID));
    fake.set_rotation(true); // every refresh returns a new refresh token and kills the old one
    let token = fake.issue_salesforce_token(ORG);
    // Two jobs queued for the cloud, old enough to claim: the retriever pod's first poll takes them.
    // Their types are this test's own: JobTemplates are cluster-scoped.
    let (ok_type, failing_type) = (format!("e2e-ok-{}", &ns[2..]), format!("e2e-fail-{}", &ns[2..]));
    let jobs = fake.seed_jobs(
        ORG,
        &[
            fake_providers::NewJob::new(&ok_type),
            fake_providers::NewJob::new(&failing_type),
        ],
    );
    for id in &jobs {
        fake.set_job_modified(ORG, id, std::time::SystemTime::now() - Duration::from_secs(60));
    }
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();

    // helm install: the operator as a pod, from the image scripts/image.sh loaded into the node.
    let (repo, tag) = chart_image();
    let release = Release {
        name: format!("e2e-{}", &ns[2..]),
        ns: ns.clone(),
    };
    let install = release.helm(
        "install",
        &[
            "--set",
            &format!("watchNamespace={ns}"),
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "retriever.pullPolicy=Never",
            "--set",
            "revalidateInterval=15s",
            // Every recheck refreshes (with rotation on): the upgrade below must keep rotated tokens.
            "--set",
            "refreshInterval=0",
            // The simulated Salesforce answers on the node's IP (a real one has its own names).
            "--set",
            &format!("providerHosts.extraDomains={{{ip}}}"),
            "--set-file",
            &format!("extraCABundle={}", ca_file.display()),
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    eprintln!("e2e timing: helm install --wait: {:.1} s", install.as_secs_f64());
    // helm --wait waits for replicas - maxUnavailable (here 1) Ready pods; both become Ready
    // through their probes.
    let operator_pods = eventually(
        "two Ready operator replicas (a leader and a standby)",
        Duration::from_secs(60),
        || async {
            let pods = live_operator_pods(&client, &ns).await;
            (pods.len() == 2 && pods.iter().all(pod_ready)).then_some(pods)
        },
    )
    .await;
    for pod in &operator_pods {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some(format!("{repo}:{tag}").as_str())
        );
        assert_eq!(spec.service_account_name.as_deref(), Some("connection-operator"));
    }
    let lease_name = format!("crmconnect-{}", release.name);
    let old_names: Vec<String> = operator_pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let leader = eventually("a leader among the replicas", Duration::from_secs(60), || async {
        lease_holder(&client, &ns, &lease_name)
            .await
            .filter(|h| old_names.contains(h))
    })
    .await;

    // /metrics through the API server and the kubelet (kubectl port-forward).
    let metrics = port_forward_get(&ns, &leader, 8080, "/metrics").await;
    for series in [
        "connection_operator_reconcile_duration_seconds",
        "connection_operator_jobruns{phase=\"Running\"} 0",
        "connection_operator_job_reports_pending 0",
    ] {
        assert!(
            metrics.contains(series),
            "{series} in the operator's metrics through port-forward:\n{metrics}"
        );
    }

    // The administrator's templates first: a retriever claims only the types a template can run.
    let _templates = JobTemplates::create(&[
        (ok_type.as_str(), format!("{repo}:{tag}"), vec!["--version"]),
        (
            failing_type.as_str(),
            format!("{repo}:{tag}"),
            vec!["no-such-command"],
        ),
    ]);

    // A Connection goes Active and its retriever pod runs, Ready, having read its session.
    let applied = Instant::now();
    kubectl_ok_stdin(
        &["apply", "-n", &ns, "-f", "-"],
        &salesforce_manifest(
            &ns,
            "acme",
            "sales-ops",
            &fake.salesforce_login_url(),
            &format!("client_id: {CLIENT_ID}, refresh_token: {token}"),
        ),
    );
    eventually("acme Active", Duration::from_secs(120), || async {
        (conn_status(&client, &ns, "acme").await["state"] == "Active").then_some(())
    })
    .await;
    // Its event, written by the operator pod under the chart's RBAC, carries the timestamp the
    // common sort uses.
    let activated = eventually("an Activated event", Duration::from_secs(30), || async {
        let out = kubectl_ok(&[
            "get",
            "events",
            "-n",
            &ns,
            "--field-selector",
            "involvedObject.name=acme,reason=Activated",
            "-o",
            "jsonpath={.items[*].lastTimestamp}",
        ]);
        (!out.trim().is_empty()).then_some(out)
    })
    .await;
    assert!(activated.contains('T'), "lastTimestamp set: {activated:?}");
    let retriever = one_ready_retriever(&client, &ns, "acme").await;
    eprintln!(
        "e2e timing: Connection applied -> retriever pod Ready: {:.1} s",
        applied.elapsed().as_secs_f64()
    );
    let logs = kubectl_ok(&["logs", "-n", &ns, &retriever]);
    assert!(
        logs.contains(fake.url().as_str()),
        "the retriever read its session (instance URL in its log):\n{logs}"
    );
    assert!(!logs.contains(&token), "no token in the retriever's log");
    let ready = eventually("RetrieverReady=True", Duration::from_secs(60), || async {
        let st = conn_status(&client, &ns, "acme").await;
        condition(&st, "RetrieverReady")
            .filter(|c| c["status"] == "True")
            .cloned()
    })
    .await;
    assert_eq!(ready["reason"], "RetrieverAvailable");

    // The real pod, as its own ServiceAccount (in-cluster), trusting the operator's CA (from its
    // session), claims the queued jobs in the CRM (the record keeps its claimant after the outcome:
    // the runs may already be done and collected when this looks).
    let jobruns: Api<connection_operator::api::JobRun> = Api::namespaced(client.clone(), &ns);
    let by = format!("{ns}/acme/{retriever}");
    eventually(
        "both CRM jobs claimed by the retriever pod",
        Duration::from_secs(90),
        || async {
            jobs.iter()
                .all(|id| fake.job(ORG, id).and_then(|j| j.claimed_by).as_deref() == Some(by.as_str()))
                .then_some(())
        },
    )
    .await;

    // The claimed jobs run as batch Jobs on the node from the administrator's templates, and their
    // outcomes go back to the CRM; 5 s after the report the Job (and with it the JobRun) is gone.
    let (ok_id, failing_id) = (jobs[0].clone(), jobs[1].clone());
    let done = eventually("both CRM jobs reported", Duration::from_secs(120), || async {
        let (ok, failed) = (fake.job(ORG, &ok_id)?, fake.job(ORG, &failing_id)?);
        (ok.status == fake_providers::JobStatus::Completed
            && failed.status == fake_providers::JobStatus::Failed)
            .then_some((ok, failed))
    })
    .await;
    assert!(done.0.ended.is_some(), "{:?}", done.0);
    let result = done.1.result.clone().unwrap_or_default();
    assert!(
        result.contains("no-such-command"),
        "the worker's output is the failed job's result: {result:?}"
    );
    // The org's history keeps both, also after the runs are gone.
    let orgs: Api<connection_operator::api::OrgSettings> = Api::namespaced(client.clone(), &ns);
    let org_key =
        connection_operator::api::org_key(connection_operator::api::Provider::SalesforceProduction, ORG)
            .unwrap();
    eventually(
        "finished Jobs and JobRuns collected after their TTL",
        Duration::from_secs(90),
        || async {
            let left = jobruns.list(&Default::default()).await.ok()?.items;
            left.is_empty().then_some(())
        },
    )
    .await;
    let history = orgs.get(&org_key).await.unwrap().status.unwrap_or_default();
    assert_eq!(
        (history.counts.succeeded, history.counts.failed),
        (1, 1),
        "{history:?}"
    );
    let recorded: Vec<&str> = history
        .recent_runs
        .iter()
        .map(|r| r.crm_job_id.as_str())
        .collect();
    assert!(
        recorded.contains(&ok_id.as_str()) && recorded.contains(&failing_id.as_str()),
        "{history:?}"
    );
    let failed_run = history
        .recent_runs
        .iter()
        .find(|r| r.crm_job_id == failing_id)
        .unwrap();
    assert!(
        failed_run
            .summary
            .as_deref()
            .unwrap_or_default()
            .contains("no-such-command"),
        "{failed_run:?}"
    );
    let connection: serde_json::Value = serde_json::from_str(&kubectl_ok(&[
        "get",
        "connection",
        "acme",
        "-n",
        &ns,
        "-o",
        "json",
    ]))
    .unwrap();
    let (health, message) = argocd_health(&connection);
    assert_eq!(
        health, "Healthy",
        "Argo CD health of an Active connection with a Ready retriever: {message}"
    );

    // Pause: the pod goes away; activate: it comes back.
    let conns: Api<connection_operator::api::Connection> = Api::namespaced(client.clone(), &ns);
    let pause = |paused: bool| {
        let conns = conns.clone();
        async move {
            conns
                .patch(
                    "acme",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"paused": paused}})),
                )
                .await
                .unwrap();
        }
    };
    pause(true).await;
    eventually(
        "no retriever pod while paused",
        Duration::from_secs(90),
        || async {
            retriever_pods(&client, &ns, "acme")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    // The operator scales the retriever down, then writes the status: the pod can be gone first.
    let st = eventually("acme Paused", Duration::from_secs(30), || async {
        let st = conn_status(&client, &ns, "acme").await;
        (st["state"] == "Paused").then_some(st)
    })
    .await;
    assert_eq!(condition(&st, "RetrieverReady").unwrap()["reason"], "Holding");
    // A job queued while paused waits (Holding); room for it in the org's settings. (Of a type a
    // template runs: no other is claimed.)
    let held = fake.seed_jobs(ORG, &[fake_providers::NewJob::new(&ok_type)]);
    fake.set_job_modified(
        ORG,
        &held[0],
        std::time::SystemTime::now() - Duration::from_secs(60),
    );
    orgs.patch(
        &org_key,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"maxConcurrentJobs": 3}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fake.job(ORG, &held[0]).unwrap().status,
        fake_providers::JobStatus::Holding
    );
    // Activate: the retriever comes back and its first poll (within 30 s of its start) claims it.
    pause(false).await;
    one_ready_retriever(&client, &ns, "acme").await;
    eventually(
        "the job held while paused is claimed",
        Duration::from_secs(90),
        // Claimed, and maybe run and reported already (the record keeps its claimant).
        || async {
            let job = fake.job(ORG, &held[0])?;
            (job.status != fake_providers::JobStatus::Holding && job.claimed_by.is_some()).then_some(())
        },
    )
    .await;

    // helm upgrade: a new operator pod; never two retrievers, and the rotated token is not lost.
    let requests_before = fake.token_requests();
    let watch_ns = ns.clone();
    let watch_client = client.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let max_retrievers = tokio::spawn(async move {
        let mut max = 0;
        loop {
            max = max.max(retriever_pods(&watch_client, &watch_ns, "acme").await.len());
            if stop_rx.try_recv().is_ok() {
                return max;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let upgrade = release.helm(
        "upgrade",
        &[
            "--reuse-values",
            "--set",
            "logFormat=text",
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    eprintln!("e2e timing: helm upgrade --wait: {:.1} s", upgrade.as_secs_f64());
    let new_leader = eventually(
        "two upgraded operator pods, one of them holding the lease",
        Duration::from_secs(120),
        || async {
            let live = live_operator_pods(&client, &ns).await;
            let names: Vec<String> = live.iter().filter_map(|p| p.metadata.name.clone()).collect();
            let fresh =
                live.len() == 2 && live.iter().all(pod_ready) && names.iter().all(|n| !old_names.contains(n));
            if !fresh {
                return None;
            }
            lease_holder(&client, &ns, &lease_name)
                .await
                .filter(|h| names.contains(h))
        },
    )
    .await;
    // The new operator revalidates (15 s here) with rotation on: it must use and save live tokens.
    eventually(
        "two token refreshes after the upgrade",
        Duration::from_secs(90),
        || async { (fake.token_requests() >= requests_before + 2).then_some(()) },
    )
    .await;
    stop_tx.send(()).unwrap();
    assert!(
        max_retrievers.await.unwrap() <= 1,
        "never two retriever pods for one org"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let stored = eventually(
        "the stored refresh token is the live one",
        Duration::from_secs(30),
        || async {
            let s = secrets.get("acme-token").await.unwrap();
            let t = String::from_utf8(s.data.unwrap()["refresh_token"].0.clone()).unwrap();
            fake.is_live(t.trim()).then_some(t)
        },
    )
    .await;
    assert_ne!(stored, token, "the token was rotated and saved");
    assert_eq!(conn_status(&client, &ns, "acme").await["state"], "Active");
    one_ready_retriever(&client, &ns, "acme").await;
    assert!(
        kubectl_ok(&["logs", "-n", &ns, &new_leader]).contains("acme"),
        "the upgraded leader reconciles (its log names the connection)"
    );

    // helm uninstall: the operator goes; the CRD, the Connection and the user's Secret stay.
    let uninstall = release.helm("uninstall", &["--wait", "--timeout", "120s"]);
    eprintln!(
        "e2e timing: helm uninstall --wait: {:.1} s",
        uninstall.as_secs_f64()
    );
    kubectl_ok(&["get", "crd", "connections.crmconnect.io"]);
    kubectl_ok(&["get", "secret", "-n", &ns, "acme-creds"]);
    kubectl_ok(&["get", "connection", "-n", &ns, "acme"]);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(
        deployments.get_opt(&release.name).await.unwrap().is_none(),
        "the operator Deployment is gone"
    );
    drop(ns_guard);
}

fn kubectl_ok_stdin(args: &[&str], stdin: &str) -> String {
    run_ok(kubectl().args(args), Some(stdin))
}

/// `kubectl port-forward pod/NAME :PORT` (API server -> kubelet -> containerd), then GET `path`
/// on the local end.
async fn port_forward_get(ns: &str, pod: &str, port: u16, path: &str) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = kubectl()
        .args([
            "port-forward",
            "--address=127.0.0.1",
            "-n",
            ns,
            &format!("pod/{pod}"),
            &format!(":{port}"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // "Forwarding from 127.0.0.1:43121 -> 8080"
    // Read the first line, then keep draining: kubectl writes a line per connection, and dies
    // (resetting it) if nobody reads them.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().and_then(Result::ok).unwrap_or_default());
        for _ in lines {}
    });
    let line = tokio::task::spawn_blocking(move || rx.recv().unwrap_or_default())
        .await
        .unwrap();
    let Some(local) = line.split_whitespace().nth(2).map(str::to_string) else {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "kubectl port-forward printed {line:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let body = reqwest::get(format!("http://{local}{path}"))
        .await
        .and_then(|r| r.error_for_status());
    let _ = child.kill();
    let _ = child.wait();
    body.unwrap().text().await.unwrap()
}
