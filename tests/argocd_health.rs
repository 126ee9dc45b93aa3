//! The Argo CD health check (`integrations/argocd/connection-health.lua`), run with a real Lua
//! interpreter on Connections whose status the operator wrote on the real control plane. (Healthy,
//! which needs a Ready retriever pod, is checked in `tests/e2e_pods.rs`.)

mod common;

use common::*;
use connection_operator::api::{Connection, State};
use connection_operator::controller::{Config, schedule::Policy};
use fake_providers::{FakeProviders, SalesforceOrg};
use kube::Api;
use std::time::Duration;

const ORG: &str = "00D000000000016AAA";

fn get(ns: &str, name: &str) -> serde_json::Value {
    serde_json::from_str(&kubectl_ok(&["get", "connection", name, "-n", ns, "-o", "json"])).unwrap()
}

#[tokio::test]
async fn argo_cd_health_follows_the_connection_state() {
    ensure_operator_rbac();
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(ORG, "005000000000016AAA", "u@x", "cid"));
    let login = fake.salesforce_login_url();
    let apply = |name: &str, team: &str, token: &str, paused: bool| {
        let mut manifest = salesforce_manifest(
            ns.name(),
            name,
            team,
            &login,
            &format!(r#"client_id: cid, refresh_token: "{token}""#),
        );
        if paused {
            manifest.push_str("  paused: true\n");
        }
        run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest));
    };
    apply("active", "sales", &fake.issue_refresh_token(ORG), false);
    let (status, message) = argocd_health(&get(ns.name(), "active"));
    assert_eq!(status, "Progressing", "not validated yet: {message}");

    let revoked = fake.issue_refresh_token(ORG);
    fake.revoke(&revoked);
    apply("revoked", "sales", &revoked, false);
    apply("paused", "sales", &fake.issue_refresh_token(ORG), true);
    let op = InProcessOperator::start(Config {
        namespaces: vec![ns.name().to_string()],
        policy: Policy {
            revalidate_every: Duration::from_secs(3600),
            ..Policy::default()
        },
        ..Default::default()
    })
    .await;
    let connections: Api<Connection> = Api::namespaced(client.clone(), ns.name());
    let wait = |name: &'static str, want: State| {
        let connections = connections.clone();
        async move {
            eventually(&format!("{name} {want}"), Duration::from_secs(30), || async {
                let c = connections.get(name).await.ok()?;
                (c.status?.state == Some(want)).then_some(())
            })
            .await
        }
    };
    wait("active", State::Active).await;
    // A second team's connection to the same org: Conflict.
    apply("rival", "marketing", &fake.issue_refresh_token(ORG), false);
    wait("revoked", State::Inactive).await;
    wait("paused", State::Paused).await;
    wait("rival", State::Conflict).await;

    let (status, message) = argocd_health(&get(ns.name(), "active"));
    assert_eq!(
        status, "Progressing",
        "Active, retriever not Ready yet: {message}"
    );
    let (status, message) = argocd_health(&get(ns.name(), "revoked"));
    assert_eq!(status, "Degraded");
    assert!(message.starts_with("TokenRevoked: "), "{message}");
    let (status, _) = argocd_health(&get(ns.name(), "paused"));
    assert_eq!(status, "Suspended");
    let (status, message) = argocd_health(&get(ns.name(), "rival"));
    assert_eq!(status, "Degraded");
    assert!(message.starts_with("OrgClaimedByAnotherTeam: "), "{message}");

    // A spec change the operator has not observed yet (it is stopped): Progressing.
    op.stop().await;
    kubectl_ok(&[
        "patch",
        "connection",
        "revoked",
        "-n",
        ns.name(),
        "--type=merge",
        "-p",
        r#"{"spec":{"description":"new words"}}"#,
    ]);
    let (status, message) = argocd_health(&get(ns.name(), "revoked"));
    assert_eq!(status, "Progressing", "{message}");
    assert!(message.contains("latest spec"), "{message}");
}
