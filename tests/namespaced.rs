//! Namespaced mode with a list of namespaces: the operator runs as a ServiceAccount bound only by
//! the chart's Roles in two watched namespaces (plus its cluster-scoped read of JobTemplates and
//! write of OrgClaims), manages the Connections of both, touches nothing in a third, and keeps one
//! claim per org and namespace.

mod common;

use common::*;
use connection_operator::api::{Connection, OrgClaim, Provider, State, org_key};
use connection_operator::controller::{Config, schedule::Policy};
use fake_providers::{FakeProviders, SalesforceOrg};
use kube::Api;
use std::time::Duration;

const ORG: &str = "00D000000000021AAA";
const WAIT: Duration = Duration::from_secs(60);

/// Deletes the chart's cluster-scoped objects of this test's release when dropped (the namespaced
/// ones go with the namespaces).
struct ClusterScoped(String);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let _ = run(
            kubectl().args(["delete", "--ignore-not-found", "-f", "-"]),
            Some(&self.0),
        );
    }
}

async fn state(api: &Api<Connection>, name: &str) -> Option<State> {
    api.get(name).await.ok()?.status?.state
}

#[tokio::test]
async fn an_operator_with_the_roles_of_two_namespaces_manages_both_and_nothing_else() {
    ensure_crds();
    let admin = client().await;
    let (a, b, c) = (
        TempNamespace::new(&admin).await,
        TempNamespace::new(&admin).await,
        TempNamespace::new(&admin).await,
    );
    let (a, b, c) = (a.name().to_string(), b.name().to_string(), c.name().to_string());
    let release = format!("multi-{}", &a[2..]);
    let rendered = run_ok(
        helm().args([
            "template",
            &release,
            "charts/connection-operator",
            "--namespace",
            &a,
            "--set",
            &format!("watchNamespaces={{{a},{b}}}"),
            "--set",
            "serviceAccount.name=multi-operator",
            "--set",
            &ALLOW_ABSENT_RETRIEVER_IMAGE,
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
            "--show-only",
            "templates/retriever-rbac.yaml",
            "--show-only",
            "templates/admission-policy.yaml",
        ]),
        None,
    );
    let cluster_scoped: Vec<&str> = rendered
        .split("\n---")
        .filter(|doc| {
            doc.contains("kind: ClusterRole")
                || doc.contains("kind: ClusterRoleBinding")
                || doc.contains("kind: ValidatingAdmissionPolicy")
        })
        .collect();
    let _cleanup = ClusterScoped(cluster_scoped.join("\n---\n"));
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&rendered));
    let user = format!("system:serviceaccount:{a}:multi-operator");
    let identity = client_as(
        &user,
        &[
            "system:serviceaccounts",
            &format!("system:serviceaccounts:{a}"),
            "system:authenticated",
        ],
    )
    .await;
    // The identity has rights in the two namespaces only.
    let can = |args: &[&str]| {
        run(
            kubectl().args(["auth", "can-i"]).args(args).args(["--as", &user]),
            None,
        )
        .stdout
        .trim()
            == "yes"
    };
    assert!(can(&["patch", "secrets", "-n", &b]));
    assert!(!can(&["get", "secrets", "-n", &c]));
    assert!(!can(&["list", "connections.crmconnect.io", "-A"]));

    // The same org connected in each of the three namespaces.
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(ORG, "005000000000021AAA", "u@x", "cid"));
    for ns in [&a, &b, &c] {
        let token = fake.issue_refresh_token(ORG);
        run_ok(
            kubectl().args(["apply", "-f", "-"]),
            Some(&salesforce_manifest(
                ns,
                "acme",
                &format!("team-{}", &ns[2..]),
                &fake.salesforce_login_url(),
                &format!(r#"client_id: cid, refresh_token: "{token}""#),
            )),
        );
    }
    let operator = InProcessOperator::start_as(
        identity,
        Config {
            namespaces: vec![a.clone(), b.clone()],
            // The chart's retriever role of this release: the only one its Roles may bind.
            retriever: connection_operator::controller::children::RetrieverSettings {
                cluster_role: format!("crmconnect:{release}:retriever"),
                ..Default::default()
            },
            policy: Policy {
                revalidate_every: Duration::from_secs(3600),
                ..Policy::default()
            },
            ..Config::default()
        },
    );
    let api = |ns: &str| Api::<Connection>::namespaced(admin.clone(), ns);
    for ns in [&a, &b] {
        eventually(&format!("acme Active in {ns}"), WAIT, || async {
            (state(&api(ns), "acme").await == Some(State::Active)).then_some(())
        })
        .await;
    }
    // One claim per org and namespace: each namespace's connection holds its own.
    let key = org_key(Provider::SalesforceProduction, ORG).unwrap();
    let claims: Api<OrgClaim> = Api::all(admin.clone());
    for ns in [&a, &b] {
        let claim = claims.get(&format!("{ns}.{key}")).await.unwrap();
        assert_eq!(claim.spec.holder.namespace, *ns);
        assert!(claim.spec.held);
    }
    // The third namespace is not watched: its Connection gets no status and no children.
    assert_eq!(state(&api(&c), "acme").await, None);
    assert!(
        kubectl_ok(&["get", "secrets,deployments", "-n", &c, "-o", "name"])
            .lines()
            .all(|l| !l.contains("acme-session") && !l.contains("acme-retriever")),
        "nothing written in an unwatched namespace"
    );
    operator.stop().await;
}
