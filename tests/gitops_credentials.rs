//! GitOps-safe credentials, on the real control plane with the fake Salesforce rotating refresh
//! tokens: the user's Secret is a seed whose data the operator never writes, the live token lives
//! in the operator-owned `<name>-token`, and only a change of the seed's token keys is a
//! re-authorization. Each test plays a GitOps tool (Flux/Argo CD re-applying, External Secrets
//! rewriting, Sealed Secrets re-creating) with kubectl against the real API server.

mod common;

use common::*;
use connection_operator::api::{Connection, State};
use connection_operator::controller::{Config, schedule::Policy};
use connection_operator::providers::ValidatorConfig;
use fake_providers::{FakeProviders, SalesforceOrg};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::time::Duration;

const ORG: &str = "00D000000000014AAA";
const CLIENT_ID: &str = "gitops-client";
const WAIT: Duration = Duration::from_secs(30);

struct Env {
    client: Client,
    ns: TempNamespace,
    fake: FakeProviders,
}

impl Env {
    async fn new() -> Env {
        ensure_operator_rbac();
        let client = client().await;
        let ns = TempNamespace::new(&client).await;
        let fake = FakeProviders::start().await;
        fake.add_salesforce_org(SalesforceOrg::new(
            ORG,
            "005000000000014AAA",
            "ops@acme.example",
            CLIENT_ID,
        ));
        fake.set_rotation(true);
        Env { client, ns, fake }
    }

    fn ns(&self) -> &str {
        self.ns.name()
    }

    /// The operator, revalidating every `revalidate` (each revalidation rotates the token).
    async fn operator(&self, revalidate: Duration) -> InProcessOperator {
        InProcessOperator::start(Config {
            namespaces: vec![self.ns().to_string()],
            policy: Policy {
                revalidate_every: revalidate,
                refresh_margin: Duration::from_secs(1),
                refresh_every: Duration::ZERO,
                retry_base: Duration::from_millis(200),
                retry_max: Duration::from_secs(1),
            },
            validator: ValidatorConfig {
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            concurrency: 4,
            ..Default::default()
        })
        .await
    }

    /// The seed as a GitOps repo holds it (YAML with stringData), with extra metadata lines.
    fn seed_manifest(&self, token: &str, metadata: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: acme-creds\n  namespace: {}\n{metadata}stringData:\n  client_id: {CLIENT_ID}\n  refresh_token: \"{token}\"\n",
            self.ns()
        )
    }

    /// `kubectl apply` (client-side, as Argo CD does by default; Flux applies server-side).
    fn apply_seed(&self, token: &str) {
        run_ok(
            kubectl().args(["apply", "-f", "-"]),
            Some(&self.seed_manifest(token, "")),
        );
    }

    async fn create_connection(&self) {
        let conn: Connection = serde_json::from_value(json!({
            "apiVersion": "crmconnect.io/v1alpha1",
            "kind": "Connection",
            "metadata": {"name": "acme", "namespace": self.ns()},
            "spec": {
                "team": "sales",
                "provider": "SalesforceProduction",
                "salesforce": {"loginUrl": self.fake.salesforce_login_url()},
                "credentialsSecretRef": {"name": "acme-creds"},
            }
        }))
        .unwrap();
        Api::<Connection>::namespaced(self.client.clone(), self.ns())
            .create(&PostParams::default(), &conn)
            .await
            .expect("create Connection");
    }

    async fn connection(&self) -> Connection {
        Api::<Connection>::namespaced(self.client.clone(), self.ns())
            .get("acme")
            .await
            .unwrap()
    }

    async fn wait_state(&self, state: State) -> Connection {
        let api = Api::<Connection>::namespaced(self.client.clone(), self.ns());
        eventually(&format!("acme {state}"), WAIT, || async {
            api.get("acme")
                .await
                .ok()
                .filter(|c| c.status.as_ref().and_then(|s| s.state) == Some(state))
        })
        .await
    }

    async fn secret(&self, name: &str) -> Option<Secret> {
        Api::<Secret>::namespaced(self.client.clone(), self.ns())
            .get_opt(name)
            .await
            .unwrap()
    }

    async fn value(&self, secret: &str, key: &str) -> String {
        let s = self
            .secret(secret)
            .await
            .unwrap_or_else(|| panic!("Secret {secret}"));
        String::from_utf8(s.data.unwrap()[key].0.clone()).unwrap()
    }

    /// A seed, its Connection Active under an operator revalidating every `revalidate`; returns
    /// the operator and the seed's token.
    async fn active(&self, revalidate: Duration) -> (InProcessOperator, String) {
        let seed = self.fake.issue_refresh_token(ORG);
        self.apply_seed(&seed);
        let op = self.operator(revalidate).await;
        self.create_connection().await;
        self.wait_state(State::Active).await;
        (op, seed)
    }

    /// `<name>-token`'s token, once the Secret exists.
    async fn live(&self) -> String {
        eventually("acme-token", WAIT, || async {
            self.secret("acme-token").await.map(|_| ())
        })
        .await;
        self.value("acme-token", "refresh_token").await
    }

    /// Waits for `n` more token requests than now (revalidations that happened after a change).
    async fn refreshes(&self, n: u64) {
        let target = self.fake.token_requests() + n;
        eventually(&format!("{n} more token requests"), WAIT, || async {
            (self.fake.token_requests() >= target).then_some(())
        })
        .await;
    }
}

fn message(c: &Connection) -> String {
    c.status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default()
}

fn state(c: &Connection) -> Option<State> {
    c.status.as_ref().and_then(|s| s.state)
}

#[tokio::test]
async fn a_gitops_revert_of_the_seed_after_rotation_changes_nothing() {
    let env = Env::new().await;
    let (op, seed) = env.active(Duration::from_secs(1)).await;
    env.refreshes(2).await;
    assert!(!env.fake.is_live(&seed), "rotation killed the seed's token");

    // A sync puts the original content back, three ways: client-side apply, delete and re-create
    // (Sealed Secrets / ESO "Recreate"), server-side apply with another field manager (Flux).
    env.apply_seed(&seed);
    env.refreshes(2).await;
    run_ok(
        kubectl().args(["replace", "--force", "-f", "-"]),
        Some(&env.seed_manifest(&seed, "")),
    );
    env.refreshes(2).await;
    run_ok(
        kubectl().args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "kustomize-controller",
            "-f",
            "-",
        ]),
        Some(&env.seed_manifest(&seed, "")),
    );
    env.refreshes(2).await;

    let c = env.connection().await;
    assert_eq!(state(&c), Some(State::Active), "{:#?}", c.status);
    assert_eq!(
        env.fake.stats().dead_token_requests,
        0,
        "the dead seed token was never sent"
    );
    // The watch label the operator added is not drift for the GitOps tools: Flux's drift check
    // (a server-side apply dry run) and Argo CD's default three-way diff both see none.
    let labels = env
        .secret("acme-creds")
        .await
        .unwrap()
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels.get("crmconnect.io/credentials").map(String::as_str),
        Some("true")
    );
    for diff in [
        &[
            "diff",
            "--server-side",
            "--field-manager",
            "kustomize-controller",
            "-f",
            "-",
        ][..],
        &["diff", "-f", "-"][..],
    ] {
        let out = run(kubectl().args(diff), Some(&env.seed_manifest(&seed, "")));
        assert!(
            out.success,
            "kubectl {diff:?} reports drift:\n{}{}",
            out.stdout, out.stderr
        );
    }
    assert_eq!(
        env.value("acme-creds", "refresh_token").await,
        seed,
        "seed data untouched"
    );
    op.stop().await;
    let live = env.live().await;
    assert!(env.fake.is_live(&live), "acme-token holds the live token");
}

#[tokio::test]
async fn an_external_secrets_style_rewrite_with_new_metadata_is_no_reauthorization() {
    let env = Env::new().await;
    // No revalidation during the test: any token request after Active is caused by the rewrite.
    let (op, seed) = env.active(Duration::from_secs(3600)).await;
    let live = env.live().await;
    let requests = env.fake.token_requests();

    // ESO rewrites its target: same values, its own labels and annotations, ours dropped.
    let eso = "  labels:\n    reconcile.external-secrets.io/managed: \"true\"\n  annotations:\n    reconcile.external-secrets.io/data-hash: 9b1e\n";
    run_ok(
        kubectl().args(["replace", "--force", "-f", "-"]),
        Some(&env.seed_manifest(&seed, eso)),
    );
    // The operator saw it: it put the watch label back (metadata only).
    eventually("the watch label back on the seed", WAIT, || async {
        let s = env.secret("acme-creds").await?;
        let labels = s.metadata.labels?;
        (labels.get("crmconnect.io/credentials").map(String::as_str) == Some("true")
            && labels.contains_key("reconcile.external-secrets.io/managed"))
        .then_some(())
    })
    .await;
    // Another object change the operator must process after the rewrite: pause, then resume.
    let api = Api::<Connection>::namespaced(env.client.clone(), env.ns());
    let pause = |paused: bool| {
        let api = api.clone();
        async move {
            api.patch(
                "acme",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": paused}})),
            )
            .await
            .unwrap();
        }
    };
    pause(true).await;
    env.wait_state(State::Paused).await;
    pause(false).await;
    env.wait_state(State::Active).await;

    assert_eq!(env.fake.token_requests(), requests, "no re-authorization");
    assert_eq!(env.live().await, live);
    op.stop().await;
}

#[tokio::test]
async fn a_new_token_in_the_seed_reauthorizes_and_the_old_live_token_is_not_used_again() {
    let env = Env::new().await;
    let (op, _) = env.active(Duration::from_secs(1)).await;
    env.refreshes(1).await;
    op.stop().await;
    let old_live = env.live().await;
    let old_hash = env
        .secret("acme-token")
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap()["crmconnect.io/seed-hash"]
        .clone();

    // `kubectl crm reauthorize` or a GitOps commit: a new token in the seed.
    let new_seed = env.fake.issue_refresh_token(ORG);
    env.apply_seed(&new_seed);
    let op = env.operator(Duration::from_secs(1)).await;
    eventually("acme-token from the new seed", WAIT, || async {
        let s = env.secret("acme-token").await?;
        (s.metadata.annotations?["crmconnect.io/seed-hash"] != old_hash).then_some(())
    })
    .await;
    // The old live token is no longer sent: revoking it changes nothing.
    env.fake.revoke(&old_live);
    env.refreshes(2).await;
    let c = env.connection().await;
    assert_eq!(state(&c), Some(State::Active), "{:#?}", c.status);
    assert_eq!(c.status.as_ref().unwrap().org_id.as_deref(), Some(ORG));
    op.stop().await;
    assert!(env.fake.is_live(&env.live().await));
    assert!(
        !env.fake.is_live(&new_seed),
        "the new seed token was used (and rotated)"
    );
}

#[tokio::test]
async fn a_revoked_token_in_the_seed_is_inactive_keeps_the_good_live_token_and_a_fix_recovers() {
    let env = Env::new().await;
    let (op, seed) = env.active(Duration::from_secs(3600)).await;
    let live = env.live().await;

    // A bad re-authorization: the seed now holds a revoked token.
    let bad = env.fake.issue_refresh_token(ORG);
    env.fake.revoke(&bad);
    env.apply_seed(&bad);
    let c = env.wait_state(State::Inactive).await;
    let msg = message(&c);
    assert_eq!(
        c.status.as_ref().unwrap().reason.as_deref(),
        Some("TokenRevoked"),
        "{msg}"
    );
    assert!(
        msg.contains("Secret acme-creds changed (a re-authorization)")
            && msg.contains("kept, unused, in Secret acme-token"),
        "{msg}"
    );
    assert_eq!(
        env.live().await,
        live,
        "a bad seed never destroys a good live token"
    );
    assert!(env.fake.is_live(&live));

    // Restoring the seed's previous content goes back to the kept live token.
    env.apply_seed(&seed);
    env.wait_state(State::Active).await;
    assert_eq!(env.fake.stats().dead_token_requests, 0);

    // And a real fix: a valid new token.
    env.apply_seed(&bad);
    env.wait_state(State::Inactive).await;
    let good = env.fake.issue_refresh_token(ORG);
    env.apply_seed(&good);
    env.wait_state(State::Active).await;
    op.stop().await;
    assert!(env.fake.is_live(&env.live().await));
}

#[tokio::test]
async fn a_seed_written_by_the_previous_version_keeps_working_after_the_upgrade() {
    let env = Env::new().await;
    // The previous version rotated the token and wrote the new one into the user's Secret.
    let original = env.fake.issue_refresh_token(ORG);
    let rotated = env.fake.rotate(&original).unwrap();
    env.apply_seed(&rotated);
    env.create_connection().await;
    // ...and recorded the connection Active for the org.
    Api::<Connection>::namespaced(env.client.clone(), env.ns())
        .patch_status(
            "acme",
            &PatchParams::apply("previous-version").force(),
            &Patch::Apply(json!({
                "apiVersion": "crmconnect.io/v1alpha1",
                "kind": "Connection",
                "status": {"state": "Active", "orgId": ORG, "reason": "Connected", "message": "connected"},
            })),
        )
        .await
        .unwrap();

    let op = env.operator(Duration::from_secs(1)).await;
    env.refreshes(2).await;
    let c = env.connection().await;
    assert_eq!(state(&c), Some(State::Active), "{:#?}", c.status);
    op.stop().await;
    assert!(
        env.fake.is_live(&env.live().await),
        "no token lost in the upgrade"
    );
    assert_eq!(env.fake.stats().dead_token_requests, 0);
    assert_eq!(env.value("acme-creds", "refresh_token").await, rotated);
}
