//! Two replicas of the real `run` binary with `--leader-elect`, as the operator's least-privilege
//! identity, against the test cluster and the fake Salesforce with refresh-token rotation on: one
//! holds the Lease and reconciles, the other is a standby that serves `/healthz` and refreshes
//! nothing. Killing the leader (SIGKILL) hands the Lease over within its duration, and the Secret
//! keeps the live token throughout. (Without leader election, two replicas woke each other with
//! every write-back and refreshed the same token hundreds of times in seconds.)

mod common;

use common::*;
use fake_providers::{FakeProviders, SalesforceOrg};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ORG: &str = "00D000000000088AAA";
const LEASE_NAMESPACE: &str = "connection-operator";

struct Replica {
    name: String,
    port: u16,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_replica(name: &str, ns: &str, lease: &str, fake: &FakeProviders) -> Replica {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_connection-operator"))
        .args(["run", "--namespace", ns, "--leader-elect", "--lease-name", lease])
        .arg("--allow-loopback-providers")
        .args(["--lease-namespace", LEASE_NAMESPACE, "--lease-duration", "4s"])
        .args([
            "--revalidate-interval",
            "1s",
            // Every recheck refreshes (and so rotates): the storm this test guards against.
            "--refresh-interval",
            "0",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--entra-authority-override", &fake.entra_authority()])
        .env("KUBECONFIG", operator_kubeconfig_path())
        .env("POD_NAME", name)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a replica");
    Replica {
        name: name.to_string(),
        port,
        child,
    }
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok()??.spec?.holder_identity
}

async fn healthz(port: u16) -> bool {
    reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test]
async fn one_replica_reconciles_and_a_standby_takes_over_when_it_dies() {
    ensure_operator_rbac();
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    let lease = format!("le-{}", &ns.name()[2..]);
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());

    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(ORG, "005000000000088AAA", "u@x", "cid"));
    fake.set_rotation(true);
    let token = fake.issue_refresh_token(ORG);
    let manifest = salesforce_manifest(
        ns.name(),
        "acme",
        "sales",
        &fake.salesforce_login_url(),
        &format!(r#"client_id: cid, refresh_token: "{token}""#),
    );
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest));

    let mut replicas = vec![
        start_replica("replica-a", ns.name(), &lease, &fake),
        start_replica("replica-b", ns.name(), &lease, &fake),
    ];
    let first = eventually("a leader", Duration::from_secs(60), || async {
        holder(&leases, &lease).await
    })
    .await;
    let leader = replicas
        .iter()
        .position(|r| r.name == first)
        .expect("the holder is one of ours");
    let standby = 1 - leader;
    eventually(
        "the standby serving /healthz",
        Duration::from_secs(30),
        || async { healthz(replicas[standby].port).await.then_some(()) },
    )
    .await;

    // Steady state: revalidation every ~1 s by one replica, not a storm of two waking each other.
    eventually("the connection validated", Duration::from_secs(60), || async {
        (fake.token_requests() > 0).then_some(())
    })
    .await;
    fake.reset_stats();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let requests = fake.token_requests();
    assert!(
        (1..=12).contains(&requests),
        "one reconciler revalidating about once a second makes ~6 token requests in 6 s, not {requests}"
    );

    // Kill the leader without letting it release the Lease: the standby takes over once it expires.
    let killed = Instant::now();
    replicas[leader].child.kill().unwrap();
    replicas[leader].child.wait().unwrap();
    let next = eventually(
        "the standby to take the lease",
        Duration::from_secs(60),
        || async { holder(&leases, &lease).await.filter(|h| *h != first) },
    )
    .await;
    assert_eq!(next, replicas[standby].name);
    let failover = killed.elapsed();
    eprintln!(
        "leader election timing: failover after SIGKILL of the leader: {:.1} s",
        failover.as_secs_f64()
    );
    fake.reset_stats();
    eventually("the new leader revalidating", Duration::from_secs(30), || async {
        (fake.token_requests() >= 2).then_some(())
    })
    .await;

    // Stop the new leader cleanly: it releases the Lease; the Secret holds the live token.
    let survivor = replicas.remove(standby);
    let pid = survivor.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut survivor = survivor;
    assert!(
        survivor.child.wait().unwrap().success(),
        "a clean shutdown exits 0"
    );
    let stored = secrets.get("acme-token").await.unwrap().data.unwrap()["refresh_token"]
        .0
        .clone();
    let stored = String::from_utf8(stored).unwrap();
    assert!(fake.is_live(&stored), "acme-token holds the live refresh token");
    let released = leases.get(&lease).await.unwrap().spec.unwrap();
    assert!(
        released.holder_identity.as_deref().is_none_or(str::is_empty),
        "released on shutdown: {:?}",
        released.holder_identity
    );
    drop(replicas);
    let _ = leases.delete(&lease, &Default::default()).await;
}
