//! The default install watches all namespaces. This binary runs one cluster-wide operator (cargo
//! runs test binaries one after another, so it does not compete with the per-namespace operators
//! of `tests/reconciler.rs`), with the chart's RBAC.

mod common;

use common::*;
use connection_operator::api::{Connection, State};
use connection_operator::controller::{Config, schedule::Policy};
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
    // Quick retries, as in the other operator tests. With the default policy (5 s, doubling) a
    // provider call that timed out on a busy machine (the fake runs in this process) was retried
    // after 5 s, then 10 s, 20 s: past this test's wait, although nothing was wrong. The request
    // timeout is generous for the same reason.
    let operator = InProcessOperator::start(Config {
        policy: Policy {
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(1),
            ..Policy::default()
        },
        validator: ValidatorConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        ..Config::default()
    })
    .await;
    let status = |ns: String, name: &'static str| {
        let api: Api<Connection> = Api::namespaced(client.clone(), &ns);
        async move { api.get(name).await.ok().and_then(|c| c.status) }
    };
    // Waits for `want`; on timeout the panic shows the last status seen (why it was not reached).
    let wait = |ns: String, name: &'static str, want: State| {
        let status = &status;
        async move {
            let mut last = None;
            let reached = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    last = status(ns.clone(), name).await;
                    if last.as_ref().and_then(|s| s.state) == Some(want) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
            .await;
            assert!(reached.is_ok(), "{name} never {want}; last status: {last:#?}");
        }
    };

    apply(a.name(), "first", "sales");
    wait(a.name().into(), "first", State::Active).await;
    // The same org from another namespace and team: a Conflict across namespaces.
    apply(b.name(), "second", "marketing");
    // The first connection whose tokens proved valid holds the org (its OrgClaim, cluster-wide).
    wait(b.name().into(), "second", State::Conflict).await;
    let held = status(a.name().into(), "first").await.and_then(|s| s.state);
    assert_eq!(held, Some(State::Active), "first holds the org");
    let holder = kubectl_ok(&[
        "get",
        "orgclaim",
        &format!("sf-{}", org.to_lowercase()),
        "-o",
        "jsonpath={.spec.holder.namespace}/{.spec.holder.name}",
    ]);
    assert_eq!(holder, format!("{}/first", a.name()));

    operator.stop().await;
}
