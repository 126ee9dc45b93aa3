//! The confused deputy: whoever may create a Connection, without reading Secrets, must not be
//! able to make the operator send a namespace's credentials to a host of their choosing. The
//! operator sends credentials only to provider hosts (and the ones its administrator added), at
//! run time; the chart's admission policy refuses Connections naming any other host.

mod common;

use common::*;
use connection_operator::api::{Connection, State};
use connection_operator::controller::Config;
use connection_operator::providers::rules::HostPolicy;
use fake_providers::{FakeProviders, SalesforceOrg};
use kube::Api;
use std::time::Duration;

const ORG: &str = "00D000000000017AAA";

#[tokio::test]
async fn the_operator_sends_no_credentials_to_a_host_outside_the_provider_domains() {
    ensure_operator_rbac();
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(ORG, "005000000000017AAA", "u@x", "cid"));
    let token = fake.issue_refresh_token(ORG);
    // One points at a host the attacker controls (here: the fake, on loopback, which this
    // operator does not allow), one at the cluster's own API server.
    for (name, login) in [
        ("lure", fake.salesforce_login_url()),
        ("inside", "https://kubernetes.default.svc".to_string()),
    ] {
        run_ok(
            kubectl().args(["apply", "-f", "-"]),
            Some(&salesforce_manifest(
                ns.name(),
                name,
                "sales",
                &login,
                &format!(r#"client_id: cid, refresh_token: "{token}""#),
            )),
        );
    }
    let op = InProcessOperator::start_with_host_policy(Config {
        namespaces: vec![ns.name().to_string()],
        ..Default::default()
    })
    .await;
    let connections: Api<Connection> = Api::namespaced(client.clone(), ns.name());
    for name in ["lure", "inside"] {
        let status = eventually(&format!("{name} Inactive"), Duration::from_secs(30), || async {
            let s = connections.get(name).await.ok()?.status?;
            (s.state == Some(State::Inactive)).then_some(s)
        })
        .await;
        assert_eq!(
            status.reason.as_deref(),
            Some("ProviderHostNotAllowed"),
            "{status:?}"
        );
        let message = status.message.unwrap_or_default();
        assert!(message.contains("spec.salesforce.loginUrl"), "{message}");
    }
    op.stop().await;
    assert_eq!(fake.token_requests(), 0, "no credentials were sent");
    assert!(fake.is_live(&token));

    // The same operator told to allow it (as the tests' operators are) uses it.
    let op = InProcessOperator::start_with_host_policy(Config {
        namespaces: vec![ns.name().to_string()],
        validator: connection_operator::providers::ValidatorConfig {
            hosts: HostPolicy {
                allow_loopback: true,
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    // (A new process revalidates what it has not validated itself.)
    eventually(
        "lure Active once loopback is allowed",
        Duration::from_secs(30),
        || async {
            let s = connections.get("lure").await.ok()?.status?;
            (s.state == Some(State::Active)).then_some(())
        },
    )
    .await;
    op.stop().await;
}

#[tokio::test]
async fn the_charts_admission_policy_refuses_connections_naming_other_hosts() {
    ensure_crds();
    let client = client().await;
    let ns = TempNamespace::new(&client).await;
    let release = format!("hosts-{}", &ns.name()[2..]);
    let policy = run_ok(
        helm().args([
            "template",
            &release,
            "charts/connection-operator",
            "--namespace",
            "connection-operator",
            "--set",
            &format!("watchNamespace={}", ns.name()),
            "--set",
            "providerHosts.extraDomains={sf-proxy.corp.example}",
            "--show-only",
            "templates/connection-policy.yaml",
        ]),
        None,
    );
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&policy));
    struct Delete(String);
    impl Drop for Delete {
        fn drop(&mut self) {
            let _ = run(
                kubectl().args([
                    "delete",
                    "validatingadmissionpolicy,validatingadmissionpolicybinding",
                    &self.0,
                    "--ignore-not-found",
                ]),
                None,
            );
        }
    }
    let _guard = Delete(format!("crmconnect-{release}-hosts"));

    let connection = |name: &str, login: &str| {
        format!(
            "apiVersion: crmconnect.io/v1alpha1\nkind: Connection\nmetadata: {{name: {name}, namespace: {}}}\nspec:\n  team: sales\n  provider: SalesforceProduction\n  salesforce: {{loginUrl: \"{login}\"}}\n  credentialsSecretRef: {{name: creds}}\n",
            ns.name()
        )
    };
    let apply = |name: &str, login: &str| {
        run(
            kubectl().args(["apply", "--dry-run=server", "-f", "-"]),
            Some(&connection(name, login)),
        )
    };
    // The policy takes effect within moments: wait for the first refusal.
    let refused = eventually(
        "the policy to refuse a metadata-service URL",
        Duration::from_secs(30),
        || async {
            let out = apply("metadata", "https://169.254.169.254");
            (!out.success).then_some(out.stderr)
        },
    )
    .await;
    assert!(
        refused.contains("169.254.169.254 is not a Salesforce login host"),
        "{refused}"
    );
    for bad in [
        "https://kubernetes.default.svc",
        "https://acme.my.salesforce.com.evil.example",
        "http://127.0.0.1:8089",
    ] {
        let out = apply("bad", bad);
        assert!(!out.success, "{bad} accepted");
        assert!(
            out.stderr.contains("is not a Salesforce login host"),
            "{bad}: {}",
            out.stderr
        );
    }
    for good in [
        "https://login.salesforce.com",
        "https://acme.my.salesforce.com",
        "https://acme--uat.sandbox.my.salesforce.com",
        "https://sf-proxy.corp.example",
    ] {
        let out = apply("good", good);
        assert!(out.success, "{good} refused: {}", out.stderr);
    }
}
