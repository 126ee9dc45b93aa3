//! The default install watches all namespaces. This binary runs one cluster-wide operator (cargo
//! runs test binaries one after another, so it does not compete with the per-namespace operators
//! of `tests/reconciler.rs`), with the chart's RBAC.

mod common;

use common::*;
use connection_operator::api::{Connection, State};
use connection_operator::controller::Config;
use fake_providers::{FakeProviders, SalesforceOrg};
use kube::Api;
use std::time::Duration;

#[tokio::test]
async fn a_cluster_wide_operator_serves_connections_in_every_namespace_and_keeps_one_team_per_org() {
    ensure_operator_rbac();
    let client = client().await;
    let (a, b) = (
        TempNamespace::new(&client).await,
        TempNamespace::new(&client).await,
    );
    let fake = FakeProviders::start().await;
    let org = "00D000000000077AAA";
    fake.add_salesforce_org(SalesforceOrg::new(org, "005000000000077AAA", "u@x", "cid"));

    let apply = |ns: &str, name: &str, team: &str| {
        let token = fake.issue_refresh_token(org);
        let manifest = salesforce_manifest(
            ns,
            name,
            team,
            &fake.salesforce_login_url(),
            &format!(r#"client_id: cid, refresh_token: "{token}""#),
        );
        run_ok(kubectl().args(["apply", "-f", "-"]), Some(&manifest));
    };

    let operator = InProcessOperator::start(Config::default()).await;
    let state = |ns: String, name: &'static str| {
        let api: Api<Connection> = Api::namespaced(client.clone(), &ns);
        async move {
            api.get(name)
                .await
                .ok()
                .and_then(|c| c.status.and_then(|s| s.state))
        }
    };

    apply(a.name(), "first", "sales");
    eventually("first Active", Duration::from_secs(30), || async {
        (state(a.name().into(), "first").await == Some(State::Active)).then_some(())
    })
    .await;
    // The same org from another namespace and team: a Conflict across namespaces.
    apply(b.name(), "second", "marketing");
    eventually("second in Conflict", Duration::from_secs(30), || async {
        (state(b.name().into(), "second").await == Some(State::Conflict)).then_some(())
    })
    .await;
    assert_eq!(state(a.name().into(), "first").await, Some(State::Active));

    operator.stop().await;
}
