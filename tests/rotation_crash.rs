//! Zero-loss rotation: the real `run` binary, as the operator's least-privilege identity, is
//! aborted (no cleanup, like a SIGKILL or an OOM kill) at each point of the rotation path after the
//! provider answered, then started again with the same journal directory (an emptyDir survives a
//! container restart). With Salesforce rotation on, the token sent is dead the moment the answer
//! arrives; every time, `<name>-token` ends with the live token and the connection recovers
//! without a dead token ever being sent again.

mod common;

use common::*;
use connection_operator::api::{Connection, State};
use fake_providers::{FakeProviders, SalesforceOrg};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ORG: &str = "00D000000000015AAA";
const WAIT: Duration = Duration::from_secs(60);

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(ns: &str, journal: &Path, abort_at: Option<&str>) -> Operator {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_connection-operator"));
    cmd.args(["run", "--namespace", ns, "--metrics-addr", "127.0.0.1:0"])
        .arg("--allow-loopback-providers")
        .args(["--revalidate-interval", "1h", "--provider-timeout", "5s"])
        .arg("--journal-dir")
        .arg(journal)
        .env("KUBECONFIG", operator_kubeconfig_path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(point) = abort_at {
        cmd.env("CRMCONNECT_TEST_ABORT_AT", point);
    }
    Operator(cmd.spawn().expect("start the operator"))
}

/// A namespace with Connection `acme` and its seed, against a fake Salesforce rotating tokens;
/// returns the admin client, the namespace, the fake and the seed's token.
async fn acme_with_rotation() -> (kube::Client, TempNamespace, FakeProviders, String) {
    ensure_operator_rbac();
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(ORG, "005000000000015AAA", "u@x", "cid"));
    fake.set_rotation(true);
    let seed = fake.issue_refresh_token(ORG);
    run_ok(
        kubectl().args(["apply", "-f", "-"]),
        Some(&salesforce_manifest(
            ns.name(),
            "acme",
            "sales",
            &fake.salesforce_login_url(),
            &format!(r#"client_id: cid, refresh_token: "{seed}""#),
        )),
    );
    (client, ns, fake, seed)
}

async fn crash_at_then_restart(point: &str) {
    let (client, ns, fake, seed) = acme_with_rotation().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");

    // The first run dies at `point`, after the provider rotated the token.
    let mut first = start(ns.name(), &journal, Some(point));
    let status = tokio::task::spawn_blocking(move || {
        let status = first.0.wait();
        drop(first);
        status
    })
    .await
    .unwrap()
    .unwrap();
    assert!(!status.success(), "{point}: the operator aborted ({status})");
    assert!(
        !fake.is_live(&seed),
        "{point}: the provider rotated the seed's token"
    );
    assert_eq!(fake.token_requests(), 1);

    // The restart (same journal) ends with the live token in acme-token, and Active.
    let _second = start(ns.name(), &journal, None);
    let connections: Api<Connection> = Api::namespaced(client.clone(), ns.name());
    eventually(&format!("{point}: Active after the restart"), WAIT, || async {
        let c = connections.get("acme").await.ok()?;
        (c.status?.state == Some(State::Active)).then_some(())
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    let token = secrets.get("acme-token").await.unwrap();
    let live = String::from_utf8(token.data.unwrap()["refresh_token"].0.clone()).unwrap();
    assert!(fake.is_live(&live), "{point}: acme-token holds the live token");
    assert!(
        !token
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("crmconnect.io/refresh-intent"),
        "{point}: no intent left"
    );
    assert_eq!(
        fake.stats().dead_token_requests,
        0,
        "{point}: the dead token was never sent again"
    );
    let left = std::fs::read_dir(&journal).unwrap().count();
    assert_eq!(left, 0, "{point}: the journal is empty once the token is saved");
}

#[tokio::test]
async fn a_crash_after_the_token_is_journalled_but_before_it_is_saved_loses_nothing() {
    crash_at_then_restart("after-journal").await;
}

#[tokio::test]
async fn a_crash_after_the_token_is_saved_but_before_the_identity_call_loses_nothing() {
    crash_at_then_restart("after-save").await;
}

#[tokio::test]
async fn a_refresh_that_never_finished_is_reported_and_not_retried_until_a_person_says_so() {
    use connection_operator::controller::{Config, schedule::Policy, tokens};
    let (client, ns, fake, _) = acme_with_rotation().await;
    let config = || Config {
        namespaces: vec![ns.name().to_string()],
        policy: Policy {
            revalidate_every: Duration::from_secs(2),
            refresh_margin: Duration::from_secs(1),
            refresh_every: Duration::ZERO,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(1),
        },
        ..Default::default()
    };
    let connections: Api<Connection> = Api::namespaced(client.clone(), ns.name());
    let state_is = |want: State| {
        let connections = connections.clone();
        move || {
            let connections = connections.clone();
            async move {
                let c = connections.get("acme").await.ok()?;
                (c.status.as_ref()?.state == Some(want)).then_some(c)
            }
        }
    };
    let op = InProcessOperator::start(config()).await;
    eventually("Active", WAIT, state_is(State::Active)).await;
    op.stop().await;

    // A process that stopped mid-refresh left its intent on the live token (its deadline passed).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    let token = secrets.get("acme-token").await.unwrap();
    let live = String::from_utf8(token.data.unwrap()["refresh_token"].0.clone()).unwrap();
    let intent = serde_json::json!({
        "holder": "connection-operator-7d9f/0badcafe",
        "token": tokens::token_hash(&live),
        "deadline": "2026-01-01T00:00:00Z",
    });
    kubectl_ok(&[
        "annotate",
        "secret",
        "acme-token",
        "-n",
        ns.name(),
        &format!("{}={intent}", tokens::INTENT_ANNOTATION),
    ]);
    let requests = fake.token_requests();
    let op = InProcessOperator::start(config()).await;
    let c = eventually("Inactive", WAIT, state_is(State::Inactive)).await;
    let status = c.status.unwrap();
    let message = status.message.unwrap_or_default();
    assert_eq!(
        status.reason.as_deref(),
        Some("RefreshOutcomeUnknown"),
        "{message}"
    );
    assert!(
        message.contains("connection-operator-7d9f/0badcafe")
            && message.contains("kubectl annotate secret acme-token crmconnect.io/refresh-intent-"),
        "{message}"
    );
    assert_eq!(fake.token_requests(), requests, "not retried blindly");

    // The person who knows the refresh never reached the provider removes the intent.
    kubectl_ok(&[
        "annotate",
        "secret",
        "acme-token",
        "-n",
        ns.name(),
        &format!("{}-", tokens::INTENT_ANNOTATION),
    ]);
    eventually("Active again", WAIT, state_is(State::Active)).await;
    op.stop().await;
    assert_eq!(fake.stats().dead_token_requests, 0);
}
