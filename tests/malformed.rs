//! A Connection stored under a looser schema (as after a CRD downgrade or a manual edit) must not
//! stop the operator from reconciling the others. This binary changes the cluster-wide CRD for a
//! moment, so it has one test and runs alone (cargo runs test binaries one after another).

mod common;

use common::*;
use connection_operator::api::{Connection, State};
use connection_operator::controller::{Config, schedule::Policy};
use fake_providers::{FakeProviders, SalesforceOrg};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use std::time::Duration;

/// Restores the generated CRD when dropped, also if the test panics.
struct RestoreCrd;

impl Drop for RestoreCrd {
    fn drop(&mut self) {
        let _ = run(
            kubectl().args(["apply", "--server-side", "--force-conflicts", "-f", "crds/"]),
            None,
        );
    }
}

#[tokio::test]
async fn a_malformed_connection_does_not_stop_the_others() {
    ensure_operator_rbac();

    let client = client().await;
    let ns = TempNamespace::new(&client).await;

    // Loosen the schema of spec.team, store a Connection whose team is a number, restore the schema.
    {
        let _restore = RestoreCrd;
        let loosen = json!([{
            "op": "replace",
            "path": "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/team",
            "value": {"x-kubernetes-int-or-string": true}
        }]);
        run_ok(
            kubectl().args([
                "patch",
                "crd",
                "connections.crmconnect.io",
                "--type",
                "json",
                "-p",
                &loosen.to_string(),
            ]),
            None,
        );
        let bad = json!({
            "apiVersion": "crmconnect.io/v1alpha1", "kind": "Connection",
            "metadata": {"name": "bad", "namespace": ns.name()},
            "spec": {"team": 42, "provider": "SalesforceProduction", "credentialsSecretRef": {"name": "x"}}
        });
        eventually(
            "the loosened schema to accept team: 42",
            Duration::from_secs(30),
            || async {
                run(kubectl().args(["apply", "-f", "-"]), Some(&bad.to_string()))
                    .success
                    .then_some(())
            },
        )
        .await;
    }
    kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "-f",
        "crds/",
    ]);
    let raw = kubectl_ok(&[
        "get",
        "connection",
        "bad",
        "-n",
        ns.name(),
        "-o",
        "jsonpath={.spec.team}",
    ]);
    assert_eq!(raw, "42", "the malformed object is stored");

    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(
        "00D000000000009AAA",
        "005000000000009AAA",
        "u@x",
        "cid",
    ));
    let token = fake.issue_refresh_token("00D000000000009AAA");
    let good = salesforce_manifest(
        ns.name(),
        "good",
        "sales",
        &fake.salesforce_login_url(),
        &format!(r#"client_id: cid, refresh_token: "{token}""#),
    );
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&good));

    let operator = InProcessOperator::start(Config {
        namespaces: vec![ns.name().to_string()],
        policy: Policy {
            revalidate_every: Duration::from_secs(3600),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;

    let api: Api<Connection> = Api::namespaced(client.clone(), ns.name());
    eventually(
        "the good connection to become Active",
        Duration::from_secs(30),
        || async {
            let c = api.get("good").await.ok()?;
            (c.status.as_ref().and_then(|s| s.state) == Some(State::Active)).then_some(())
        },
    )
    .await;
    // The bad one is left alone: the operator wrote nothing to it.
    let bad_status = kubectl_ok(&[
        "get",
        "connection",
        "bad",
        "-n",
        ns.name(),
        "-o",
        "jsonpath={.status}",
    ]);
    assert_eq!(
        bad_status, "",
        "no status is written to an object the operator cannot read"
    );
    // And the operator keeps reconciling: pausing the good one still works.
    api.patch(
        "good",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": true}})),
    )
    .await
    .unwrap();
    eventually(
        "the good connection to become Paused",
        Duration::from_secs(30),
        || async {
            let c = api.get("good").await.ok()?;
            (c.status.as_ref().and_then(|s| s.state) == Some(State::Paused)).then_some(c.name_any())
        },
    )
    .await;

    operator.stop().await;
}
