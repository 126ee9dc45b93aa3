//! No token or client secret reaches the operator's logs, its events or the Connection's status:
//! run the operator (in process, cluster-wide-free: scoped to a temp namespace) with a global TRACE
//! subscriber capturing every crate's events, take a connection through rotation, activation and
//! revocation, then grep everything for the secret values. A test binary of its own, so the global
//! subscriber sees only this test.

mod common;

use base64::Engine as _;
use common::*;
use connection_operator::api::{Connection, State};
use connection_operator::controller::{Config, schedule::Policy};
use connection_operator::providers::ValidatorConfig;
use fake_providers::{FakeProviders, SalesforceOrg};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn state(api: &Api<Connection>) -> Option<State> {
    api.get("acme")
        .await
        .ok()
        .and_then(|c| c.status.and_then(|s| s.state))
}

#[tokio::test]
async fn no_token_or_client_secret_in_logs_events_or_status() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .expect("install the capturing subscriber");

    ensure_operator_rbac();
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    let fake = FakeProviders::start().await;
    let org = "00D000000000055AAA";
    let client_secret = "client-secret-7c1e9a4b2d";
    fake.add_salesforce_org(
        SalesforceOrg::new(org, "005000000000055AAA", "u@x", "cid").with_client_secret(client_secret),
    );
    fake.set_rotation(true);
    let original = fake.issue_refresh_token(org);
    let manifest = salesforce_manifest(
        ns.name(),
        "acme",
        "sales",
        &fake.salesforce_login_url(),
        &format!(r#"client_id: cid, client_secret: "{client_secret}", refresh_token: "{original}""#),
    );
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest));

    let operator = InProcessOperator::start(Config {
        namespaces: vec![ns.name().to_string()],
        policy: Policy {
            revalidate_every: Duration::from_secs(1),
            refresh_margin: Duration::from_secs(1),
            refresh_every: Duration::ZERO,
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(1),
        },
        validator: ValidatorConfig {
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;

    let api: Api<Connection> = Api::namespaced(client.clone(), ns.name());
    eventually("Active", Duration::from_secs(30), || async {
        (state(&api).await == Some(State::Active)).then_some(())
    })
    .await;
    // A few rotations (revalidation every second), then revocation of the live token.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    let read = |s: &Secret, key: &str| String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap();
    let live = read(&secrets.get("acme-token").await.unwrap(), "refresh_token");
    let access = read(&secrets.get("acme-session").await.unwrap(), "access_token");
    assert_ne!(live, original, "rotation happened");
    fake.revoke(&live);
    eventually("Inactive", Duration::from_secs(30), || async {
        (state(&api).await == Some(State::Inactive)).then_some(())
    })
    .await;
    operator.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("saved the refresh token"),
        "the capture works: {} bytes",
        logs.len()
    );
    let events = kubectl_ok(&["get", "events.events.k8s.io", "-n", ns.name(), "-o", "yaml"]);
    let status = kubectl_ok(&["get", "connection", "acme", "-n", ns.name(), "-o", "yaml"]);
    assert!(events.contains("Deactivated"), "{events}");
    for (what, text) in [("logs", &logs), ("events", &events), ("status", &status)] {
        for (name, value) in [
            ("original refresh token", &original),
            ("live refresh token", &live),
            ("access token", &access),
            ("client secret", &client_secret.to_string()),
        ] {
            assert!(!text.contains(value.as_str()), "the {name} appears in the {what}");
            // Secrets travel base64-encoded in Secret bodies: those must not be logged either.
            let encoded = base64::engine::general_purpose::STANDARD.encode(value.as_bytes());
            assert!(
                !text.contains(&encoded),
                "the {name} appears base64-encoded in the {what}"
            );
        }
    }
}
