//! The default install watches all namespaces. This binary runs one cluster-wide operator (cargo
//! runs test binaries one after another, so it does not compete with the per-namespace operators
//! of `tests/reconciler.rs`), with the chart's RBAC.

mod common;

use common::*;
use connection_operator::api::{Connection, State};
use connection_operator::controller::Config;
use connection_operator::providers::ValidatorConfig;
use fake_providers::{FakeProviders, SalesforceOrg};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::ListParams;
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

    // A cluster-wide operator also sees what earlier test binaries left in namespaces still being
    // deleted (pods now terminate on the node first): Connections whose fakes are gone, some with
    // the real default login hosts, where a connect "succeeds" here and then hangs until the
    // request timeout. Those held the operator's reconcile slots and made this test time out on a
    // busy machine. Start once only this test's namespaces are left, with the short provider
    // timeouts the other operator tests use.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ours = [a.name().to_string(), b.name().to_string()];
    eventually(
        "earlier test binaries' namespaces to be deleted",
        Duration::from_secs(300),
        || async {
            let left: Vec<String> = namespaces
                .list_metadata(&ListParams::default().labels(&format!("{TEMP_NS_LABEL}=true")))
                .await
                .ok()?
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .filter(|n| !ours.contains(n))
                .collect();
            left.is_empty().then_some(())
        },
    )
    .await;
    let operator = InProcessOperator::start(Config {
        validator: ValidatorConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        ..Config::default()
    })
    .await;
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
