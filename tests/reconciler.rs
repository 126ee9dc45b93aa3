//! The reconciler on the real control plane, with the fake providers and short intervals.
//! Each test has its own namespace, its own fake providers and its own operator instance (scoped to
//! that namespace) running with the chart's least-privilege RBAC, so a missing rule fails a test.

mod common;

use common::*;
use connection_operator::api::{Connection, State, conditions};
use connection_operator::controller::{Config, schedule::Policy};
use connection_operator::providers::ValidatorConfig;
use fake_providers::{DynamicsEnvironment, FakeProviders, Fault, FaultTarget, SalesforceOrg};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const ORG: &str = "00D000000000001AAA";
const ORG_USER: &str = "005000000000001AAA";
const CLIENT_ID: &str = "test-client";
const WAIT: Duration = Duration::from_secs(30);

/// Revalidation every 2 s, quick retries: what "short intervals" means for these tests.
fn fast() -> Policy {
    Policy {
        revalidate_every: Duration::from_secs(2),
        refresh_margin: Duration::from_secs(1),
        refresh_every: Duration::ZERO,
        retry_base: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
    }
}

/// No revalidation during a test.
fn slow() -> Policy {
    Policy {
        revalidate_every: Duration::from_secs(3600),
        ..fast()
    }
}

/// An operator scoped to the test's namespace, with the fake providers and `policy`.
struct Operator;

impl Operator {
    async fn start(ns: &str, fake: &FakeProviders, policy: Policy) -> InProcessOperator {
        InProcessOperator::start(Config {
            namespaces: vec![ns.to_string()],
            policy,
            validator: ValidatorConfig {
                entra_authority_override: Some(fake.entra_authority()),
                connect_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(2),
                ..Default::default()
            },
            concurrency: 4,
            ..Default::default()
        })
        .await
    }
}

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
        fake.add_salesforce_org(SalesforceOrg::new(ORG, ORG_USER, "ops@acme.example", CLIENT_ID));
        Env { client, ns, fake }
    }

    fn ns(&self) -> &str {
        self.ns.name()
    }

    /// Asks for one validation of `name` now (the `crmconnect.io/revalidate` annotation).
    fn revalidate(&self, name: &str, value: &str) {
        run_ok(
            kubectl().args([
                "annotate",
                "conn",
                name,
                "-n",
                self.ns(),
                &format!("crmconnect.io/revalidate={value}"),
                "--overwrite",
            ]),
            None,
        );
    }

    fn connections(&self) -> Api<Connection> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    async fn put_secret(&self, name: &str, data: &[(&str, &[u8])]) {
        let data: BTreeMap<String, ByteString> = data
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
            .collect();
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data});
        self.secrets()
            .patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&secret))
            .await
            .expect("apply Secret");
    }

    /// Connection `acme` (Secret `creds`, a revoked token) turned Inactive, with its operator.
    async fn inactive_with_a_revoked_token() -> (Env, InProcessOperator) {
        let env = Env::new().await;
        let token = env.put_credentials("creds", ORG).await;
        env.fake.revoke(&token);
        let op = Operator::start(env.ns(), &env.fake, slow()).await;
        env.create_salesforce("acme", "sales", "creds").await;
        env.wait_state("acme", State::Inactive).await;
        (env, op)
    }

    /// The OrgClaim of `ORG` in this namespace, as "holder held" (e.g. "acme true").
    fn org_claim(&self) -> String {
        kubectl_ok(&[
            "get",
            "orgclaim",
            &format!("{}.sf-{}", self.ns(), ORG.to_lowercase()),
            "-o",
            "jsonpath={.spec.holder.name} {.spec.held}",
        ])
    }

    /// A Secret with a fresh refresh token for `org`; returns the token.
    async fn put_credentials(&self, name: &str, org: &str) -> String {
        let token = self.fake.issue_refresh_token(org);
        self.put_secret(
            name,
            &[
                ("client_id", CLIENT_ID.as_bytes()),
                ("refresh_token", token.as_bytes()),
            ],
        )
        .await;
        token
    }

    async fn create_salesforce(&self, name: &str, team: &str, secret: &str) {
        self.create(json!({
            "metadata": {"name": name},
            "spec": {
                "team": team,
                "provider": "SalesforceProduction",
                "salesforce": {"loginUrl": self.fake.salesforce_login_url()},
                "credentialsSecretRef": {"name": secret},
            }
        }))
        .await;
    }

    async fn create(&self, mut body: serde_json::Value) {
        body["apiVersion"] = json!("crmconnect.io/v1alpha1");
        body["kind"] = json!("Connection");
        let conn: Connection = serde_json::from_value(body).expect("valid Connection");
        self.connections()
            .create(&PostParams::default(), &conn)
            .await
            .expect("create Connection");
    }

    async fn get(&self, name: &str) -> Connection {
        self.connections().get(name).await.expect("get Connection")
    }

    async fn wait_for(&self, name: &str, what: &str, check: impl Fn(&Connection) -> bool) -> Connection {
        let api = self.connections();
        let mut last = None;
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(c) = api.get(name).await {
                    if check(&c) {
                        return c;
                    }
                    last = c.status.clone();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{name}: timed out waiting for {what}; last status: {last:#?}"))
    }

    async fn wait_state(&self, name: &str, state: State) -> Connection {
        self.wait_for(name, &format!("state {state}"), |c| state_of(c) == Some(state))
            .await
    }

    async fn replicas(&self, name: &str) -> Option<i32> {
        self.deployments()
            .get_opt(&format!("{name}-retriever"))
            .await
            .unwrap()
            .and_then(|d| d.spec.replicas)
    }

    async fn wait_replicas(&self, name: &str, n: i32) {
        eventually(&format!("{name}-retriever with {n} replicas"), WAIT, || async {
            (self.replicas(name).await == Some(n)).then_some(())
        })
        .await;
    }

    async fn secret_value(&self, secret: &str, key: &str) -> Option<String> {
        let s = self.secrets().get(secret).await.unwrap();
        s.data
            .and_then(|d| d.get(key).map(|b| String::from_utf8(b.0.clone()).unwrap()))
    }

    /// The reasons of the object's events, in the order `kubectl get events --sort-by=.lastTimestamp`
    /// gives (the sort people type: it needs the operator to set `lastTimestamp`).
    async fn event_reasons(&self, name: &str) -> Vec<String> {
        let out = kubectl_ok(&[
            "get",
            "events",
            "-n",
            self.ns(),
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "--sort-by=.lastTimestamp",
            "-o",
            "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
        ]);
        out.lines().map(str::to_string).collect()
    }
}

fn state_of(c: &Connection) -> Option<State> {
    c.status.as_ref().and_then(|s| s.state)
}

fn condition(c: &Connection, type_: &str) -> Option<(String, String)> {
    let s = c.status.as_ref()?;
    conditions::find(&s.conditions, type_).map(|c| (c.status.clone(), c.reason.clone()))
}

fn reason(c: &Connection) -> String {
    c.status
        .as_ref()
        .and_then(|s| s.reason.clone())
        .unwrap_or_default()
}

fn message(c: &Connection) -> String {
    c.status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn new_connection_becomes_active_with_org_id_session_secret_and_one_replica() {
    let env = Env::new().await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.put_credentials("creds", ORG).await;
    env.create_salesforce("acme", "sales", "creds").await;

    let c = env.wait_state("acme", State::Active).await;
    let status = c.status.clone().unwrap();
    assert_eq!(status.org_id.as_deref(), Some(ORG));
    assert_eq!(status.remote_id.as_deref(), Some(ORG));
    assert_eq!(status.username.as_deref(), Some("ops@acme.example"));
    assert_eq!(status.observed_generation, c.metadata.generation);
    for type_ in [conditions::READY, conditions::AUTHORIZED] {
        assert_eq!(condition(&c, type_).unwrap().0, "True", "{type_}");
    }
    // No pod of this Deployment becomes ready here (its image is absent from the node, see
    // ABSENT_RETRIEVER_IMAGE): the condition says the retriever is starting, never that it runs.
    assert_eq!(
        condition(&c, conditions::RETRIEVER_READY).unwrap(),
        ("False".into(), "RetrieverStarting".into())
    );
    env.wait_replicas("acme", 1).await;
    // The session Secret holds the access token, never the refresh token, and is owned by the connection.
    let session = env.secrets().get("acme-session").await.unwrap();
    let data = session.data.clone().unwrap();
    assert!(data.contains_key("access_token"));
    assert!(!data.contains_key("refresh_token"));
    assert_eq!(session.owner_references()[0].uid, c.uid().unwrap());
    assert!(env.event_reasons("acme").await.contains(&"Activated".to_string()));
    // `kubectl get connections` shows it.
    let table = kubectl_ok(&["get", "connections", "-n", env.ns()]);
    assert!(table.contains("Active") && table.contains(ORG), "{table}");
    op.stop().await;
}

#[tokio::test]
async fn dynamics_connection_becomes_active_with_environment_id_and_keeps_the_newest_refresh_token() {
    let env = Env::new().await;
    let org = "11111111-1111-1111-1111-111111111111";
    env.fake.add_dynamics_environment(DynamicsEnvironment::new(
        org,
        "22222222-2222-2222-2222-222222222222",
        CLIENT_ID,
    ));
    let token = env.fake.issue_refresh_token(org);
    env.put_secret(
        "dyn-creds",
        &[
            ("client_id", CLIENT_ID.as_bytes()),
            ("refresh_token", token.as_bytes()),
        ],
    )
    .await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create(json!({
        "metadata": {"name": "contoso"},
        "spec": {
            "team": "gov",
            "provider": "Dynamics365",
            "dynamics": {"environmentUrl": env.fake.environment_url(), "cloud": "GCCHigh"},
            "credentialsSecretRef": {"name": "dyn-creds"},
        }
    }))
    .await;
    let c = env.wait_state("contoso", State::Active).await;
    assert_eq!(c.status.as_ref().unwrap().environment_id.as_deref(), Some(org));
    assert_eq!(c.status.as_ref().unwrap().org_id, None);
    let stored = env.secret_value("contoso-token", "refresh_token").await.unwrap();
    assert_ne!(
        stored, token,
        "Entra returns a new refresh token on every grant: the newest is kept"
    );
    assert!(env.fake.is_live(&stored));
    assert_eq!(
        env.secret_value("dyn-creds", "refresh_token").await.unwrap(),
        token,
        "the user's Secret is never written"
    );
    op.stop().await;
}

#[tokio::test]
async fn revoked_token_turns_inactive_within_a_revalidation_period_with_zero_replicas() {
    let env = Env::new().await;
    let token = env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, fast()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    env.wait_replicas("acme", 1).await;

    assert!(env.fake.revoke(&token));
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "TokenRevoked");
    assert!(message(&c).starts_with("Connection inactive:"), "{}", message(&c));
    assert_eq!(condition(&c, conditions::AUTHORIZED).unwrap().0, "False");
    assert_eq!(
        c.status.as_ref().unwrap().org_id.as_deref(),
        Some(ORG),
        "the org stays visible"
    );
    env.wait_replicas("acme", 0).await;
    assert!(
        env.event_reasons("acme")
            .await
            .contains(&"Deactivated".to_string())
    );
    // A dead token is not retried: no provider calls until the Secret changes.
    let calls = env.fake.token_requests();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        env.fake.token_requests(),
        calls,
        "an inactive connection must not hammer the provider"
    );
    op.stop().await;
}

#[tokio::test]
async fn updating_the_secret_reauthorizes_an_inactive_connection_within_seconds() {
    let (env, op) = Env::inactive_with_a_revoked_token().await;
    env.wait_replicas("acme", 0).await;

    env.put_credentials("creds", ORG).await;
    let started = std::time::Instant::now();
    env.wait_state("acme", State::Active).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "re-authorization took {took:?} (revalidation is 1 h here)"
    );
    env.wait_replicas("acme", 1).await;
    assert!(
        env.event_reasons("acme")
            .await
            .contains(&"Reauthorized".to_string())
    );
    // Its first valid tokens: the org is claimed (it never held it before).
    assert_eq!(env.org_claim(), "acme true");
    op.stop().await;
}

#[tokio::test]
async fn a_connection_that_released_its_org_holds_it_again_when_reauthorized() {
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    assert_eq!(env.org_claim(), "acme true");
    // Its tokens refused: Inactive, the org released.
    let live = env.secret_value("acme-token", "refresh_token").await.unwrap();
    env.fake.revoke(live.trim());
    env.revalidate("acme", "revoked");
    env.wait_state("acme", State::Inactive).await;
    assert_eq!(env.org_claim(), "acme false");
    // Re-authorized: held again (written on the version its release left, without a read).
    env.put_credentials("creds", ORG).await;
    env.wait_state("acme", State::Active).await;
    env.wait_replicas("acme", 1).await;
    assert_eq!(env.org_claim(), "acme true");
    op.stop().await;
}

#[tokio::test]
async fn a_failed_reauthorization_leaves_a_warning_event() {
    let (env, op) = Env::inactive_with_a_revoked_token().await;
    let requests = env.fake.token_requests();
    assert!(
        !env.event_reasons("acme")
            .await
            .contains(&"ReauthorizationFailed".to_string())
    );

    // Another dead token (one the provider never issued): the state and reason stay the same,
    // but the attempt is visible.
    env.put_secret(
        "creds",
        &[
            ("client_id", CLIENT_ID.as_bytes()),
            ("refresh_token", b"a-token-the-provider-never-issued"),
        ],
    )
    .await;
    eventually(
        "a ReauthorizationFailed event",
        Duration::from_secs(30),
        || async {
            env.event_reasons("acme")
                .await
                .contains(&"ReauthorizationFailed".to_string())
                .then_some(())
        },
    )
    .await;
    assert!(env.fake.token_requests() > requests, "the new token was tried");
    assert_eq!(state_of(&env.get("acme").await), Some(State::Inactive));
    op.stop().await;
}

#[tokio::test]
async fn pause_holds_retrieval_and_activate_resumes_it_without_provider_calls() {
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    let calls = env.fake.token_requests();
    // Event timestamps have 1 s resolution: a second apart, the order below is the sort's, not chance.
    let next_second = || tokio::time::sleep(Duration::from_millis(1100));

    let pause = |paused: bool| json!({"spec": {"paused": paused}});
    next_second().await;
    env.connections()
        .patch("acme", &PatchParams::default(), &Patch::Merge(&pause(true)))
        .await
        .unwrap();
    let c = env.wait_state("acme", State::Paused).await;
    assert_eq!(
        condition(&c, conditions::RETRIEVER_READY).unwrap(),
        ("False".into(), "Holding".into())
    );
    env.wait_replicas("acme", 0).await;

    next_second().await;
    env.connections()
        .patch("acme", &PatchParams::default(), &Patch::Merge(&pause(false)))
        .await
        .unwrap();
    env.wait_state("acme", State::Active).await;
    env.wait_replicas("acme", 1).await;
    assert_eq!(
        env.fake.token_requests(),
        calls,
        "pausing and activating need no provider call"
    );
    let events = env.event_reasons("acme").await;
    assert_eq!(
        events,
        ["Activated", "Paused", "Resumed"],
        "kubectl get events --sort-by=.lastTimestamp"
    );
    op.stop().await;
}

#[tokio::test]
async fn provider_outage_keeps_the_connection_active_with_authorized_unknown() {
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, fast()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;

    env.fake.push_fault(
        Fault::status(FaultTarget::Any, 503, "Service Unavailable")
            .header("Retry-After", "1")
            .always(),
    );
    let c = env
        .wait_for("acme", "Authorized Unknown", |c| {
            condition(c, conditions::AUTHORIZED)
                .is_some_and(|(s, r)| s == "Unknown" && r == "ProviderUnavailable")
        })
        .await;
    assert_eq!(state_of(&c), Some(State::Active));
    let before = env.fake.token_requests();
    // Several revalidation periods of outage (and hanging requests): still Active, still retrieving.
    env.fake.clear_faults();
    env.fake.push_fault(Fault::hang(FaultTarget::Any).always());
    tokio::time::sleep(Duration::from_secs(8)).await;
    let c = env.get("acme").await;
    assert_eq!(state_of(&c), Some(State::Active), "{:#?}", c.status);
    assert_eq!(condition(&c, conditions::AUTHORIZED).unwrap().0, "Unknown");
    assert_eq!(env.replicas("acme").await, Some(1));
    assert!(env.fake.token_requests() > before, "the operator keeps retrying");
    env.fake.clear_faults();
    env.wait_for("acme", "Authorized True again", |c| {
        condition(c, conditions::AUTHORIZED).unwrap().0 == "True"
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn rotated_refresh_token_is_saved_to_the_token_secret_and_the_seed_is_never_written() {
    let env = Env::new().await;
    env.fake.set_rotation(true);
    let original = env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, fast()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    // Several rotations (one per 2 s revalidation): the Secret always holds the live token.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = env.get("acme").await;
    assert_eq!(state_of(&c), Some(State::Active), "{:#?}", c.status);
    let stored = env.secret_value("acme-token", "refresh_token").await.unwrap();
    assert_ne!(stored, original);
    assert!(!env.fake.is_live(&original), "rotation killed the original token");
    // The stored token may be one rotation behind a request in flight; wait for quiet.
    op.stop().await;
    let stored = env.secret_value("acme-token", "refresh_token").await.unwrap();
    assert!(
        env.fake.is_live(&stored),
        "<name>-token holds the live refresh token"
    );
    assert_eq!(
        env.secret_value("creds", "refresh_token").await.unwrap(),
        original,
        "the user's Secret is a seed: never written"
    );
    assert_eq!(env.fake.stats().dead_token_requests, 0);
    // Owned by the connection (deleted with it), and not mounted by the retriever.
    let token_secret = env.secrets().get("acme-token").await.unwrap();
    let owner = &token_secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Connection", "acme", Some(true))
    );
    let deployment = env.deployments().get("acme-retriever").await.unwrap();
    let volumes = serde_json::to_string(&deployment.spec.template.spec).unwrap();
    assert!(
        volumes.contains("acme-session") && !volumes.contains("acme-token"),
        "{volumes}"
    );
}

#[tokio::test]
async fn rotated_token_is_saved_when_the_stored_token_ends_with_a_newline() {
    // `kubectl create secret --from-file` keeps the file's trailing newline. The provider is sent
    // the trimmed token; the save must not mistake "token\n" for a re-authorization and drop the
    // rotated token (the old one is dead: that lost the connection).
    let env = Env::new().await;
    env.fake.set_rotation(true);
    let original = env.fake.issue_refresh_token(ORG);
    env.put_secret(
        "creds",
        &[
            ("client_id", CLIENT_ID.as_bytes()),
            ("refresh_token", format!("{original}\n").as_bytes()),
        ],
    )
    .await;
    let op = Operator::start(env.ns(), &env.fake, fast()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    tokio::time::sleep(Duration::from_secs(5)).await; // several rotations (2 s revalidation)
    op.stop().await;
    let c = env.get("acme").await;
    assert_eq!(state_of(&c), Some(State::Active), "{:#?}", c.status);
    let stored = env.secret_value("acme-token", "refresh_token").await.unwrap();
    assert_ne!(stored.trim(), original);
    assert!(
        env.fake.is_live(&stored),
        "<name>-token holds the live refresh token"
    );
    assert_eq!(env.fake.stats().dead_token_requests, 0);
}

#[tokio::test]
async fn two_teams_same_org_one_active_one_conflict_and_the_loser_takes_over() {
    let env = Env::new().await;
    env.put_credentials("first-creds", ORG).await;
    env.put_credentials("second-creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("first", "sales", "first-creds").await;
    env.wait_state("first", State::Active).await;
    env.create_salesforce("second", "marketing", "second-creds").await;

    let c = env.wait_state("second", State::Conflict).await;
    assert_eq!(reason(&c), "OrgClaimedByAnotherTeam");
    let msg = message(&c);
    assert!(msg.contains(&format!("{}/first (team sales)", env.ns())), "{msg}");
    assert_eq!(state_of(&env.get("first").await), Some(State::Active));
    env.wait_replicas("second", 0).await;
    assert!(
        env.event_reasons("second")
            .await
            .contains(&"Conflict".to_string())
    );

    env.connections()
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_state("second", State::Active).await;
    env.wait_replicas("second", 1).await;
    op.stop().await;
}

/// Every state each Connection of `ns` was seen in, from a watch started now.
fn record_states(client: &Client, ns: &str) -> std::sync::Arc<std::sync::Mutex<Vec<(String, State)>>> {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let api: Api<Connection> = Api::namespaced(client.clone(), ns);
    let log = seen.clone();
    tokio::spawn(async move {
        let mut events = kube::runtime::watcher(api, Default::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(c)) = events.next().await {
            if let Some(state) = c.status.as_ref().and_then(|s| s.state) {
                log.lock().unwrap().push((c.name_any(), state));
            }
        }
    });
    seen
}

#[tokio::test]
async fn two_connections_validated_at_once_never_both_hold_the_org_20_times_in_a_row() {
    let env = Env::new().await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    let seen = record_states(&env.client, env.ns());
    for i in 0..20 {
        let org = format!("00D0000000000{i:02}RAC");
        env.fake
            .add_salesforce_org(SalesforceOrg::new(&org, ORG_USER, "race@x", CLIENT_ID));
        let (a, b) = (format!("a{i}"), format!("b{i}"));
        env.put_credentials(&format!("{a}-creds"), &org).await;
        env.put_credentials(&format!("{b}-creds"), &org).await;
        // Both in one request: the operator validates them side by side.
        let items: Vec<serde_json::Value> = [(&a, "sales"), (&b, "marketing")]
            .iter()
            .map(|(name, team)| {
                json!({
                    "apiVersion": "crmconnect.io/v1alpha1", "kind": "Connection",
                    "metadata": {"name": name, "namespace": env.ns()},
                    "spec": {"team": team, "provider": "SalesforceProduction",
                             "salesforce": {"loginUrl": env.fake.salesforce_login_url()},
                             "credentialsSecretRef": {"name": format!("{name}-creds")}},
                })
            })
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        run_ok(kubectl().args(["apply", "-f", "-"]), Some(&list.to_string()));
        let (winner, loser) = eventually(&format!("round {i} settled"), WAIT, || async {
            let (ca, cb) = (env.get(&a).await, env.get(&b).await);
            match (state_of(&ca), state_of(&cb)) {
                (Some(State::Active), Some(State::Conflict)) => Some((a.clone(), b.clone())),
                (Some(State::Conflict), Some(State::Active)) => Some((b.clone(), a.clone())),
                _ => None,
            }
        })
        .await;
        env.wait_replicas(&winner, 1).await;
        // The loser's retriever was created with 0 replicas and never scaled (generation 1).
        let deployment = env
            .deployments()
            .get(&format!("{loser}-retriever"))
            .await
            .unwrap();
        assert_eq!(deployment.spec.replicas, Some(0), "round {i}");
        assert_eq!(
            deployment.metadata.generation,
            Some(1),
            "round {i}: never given a replica"
        );
        assert!(
            !env.event_reasons(&loser).await.contains(&"Activated".to_string()),
            "round {i}: no Activated event for the loser"
        );
        let claim: serde_json::Value = serde_json::from_str(&kubectl_ok(&[
            "get",
            "orgclaim",
            &format!("{}.sf-{}", env.ns(), org.to_lowercase()),
            "-o",
            "json",
        ]))
        .unwrap();
        assert_eq!(claim["spec"]["holder"]["name"], winner.as_str());
        assert_eq!(claim["spec"]["held"], true);
    }
    let seen = seen.lock().unwrap().clone();
    for i in 0..20 {
        let active: std::collections::BTreeSet<&str> = seen
            .iter()
            .filter(|(name, state)| *state == State::Active && name[1..] == i.to_string())
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(active.len(), 1, "round {i}: Active ever seen on {active:?}");
    }
    op.stop().await;
}

#[tokio::test]
async fn a_forged_status_does_not_move_the_org_and_the_holder_keeps_it_against_older_connections() {
    let env = Env::new().await;
    env.put_credentials("first-creds", ORG).await;
    env.put_credentials("second-creds", ORG).await;
    // The oldest connection has tokens that do not work.
    let revoked = env.put_credentials("old-creds", ORG).await;
    env.fake.revoke(&revoked);
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("old", "ops", "old-creds").await;
    env.wait_state("old", State::Inactive).await;
    env.create_salesforce("first", "sales", "first-creds").await;
    env.wait_state("first", State::Active).await;
    env.create_salesforce("second", "marketing", "second-creds").await;
    env.wait_state("second", State::Conflict).await;

    // Someone with connections/status rights makes the oldest look like an Active holder of the org
    // (under "oldest wins" it would have taken the org from first).
    let forged = json!({"status": {
        "state": "Active", "remoteId": ORG, "orgId": ORG, "reason": "Connected",
        "message": "forged", "observedGeneration": 1,
    }});
    run_ok(
        kubectl().args([
            "patch",
            "conn",
            "old",
            "-n",
            env.ns(),
            "--subresource=status",
            "--type=merge",
            "-p",
            &forged.to_string(),
        ]),
        None,
    );
    // A check of first's tokens now re-decides its claim too: it stays.
    env.revalidate("first", "after-forgery");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(state_of(&env.get("first").await), Some(State::Active));
    assert_eq!(state_of(&env.get("second").await), Some(State::Conflict));
    assert_ne!(
        state_of(&env.get("old").await),
        Some(State::Active),
        "the forged connection does not get the org"
    );
    let holder = kubectl_ok(&[
        "get",
        "orgclaim",
        &format!("{}.sf-{}", env.ns(), ORG.to_lowercase()),
        "-o",
        "jsonpath={.spec.holder.name}",
    ]);
    assert_eq!(holder, "first");

    // Its tokens refused, the holder releases the org; the waiting connection takes it.
    let live = env.secret_value("first-token", "refresh_token").await.unwrap();
    env.fake.revoke(live.trim());
    env.revalidate("first", "revoked");
    env.wait_state("first", State::Inactive).await;
    env.wait_state("second", State::Active).await;
    env.wait_replicas("second", 1).await;
    let reasons = env.event_reasons("second").await;
    assert!(reasons.contains(&"OrgClaimTakenOver".to_string()), "{reasons:?}");
    let reasons = env.event_reasons("first").await;
    assert!(reasons.contains(&"OrgClaimReleased".to_string()), "{reasons:?}");

    // Re-authorized, the first connection finds the claim changed since its release (the operator
    // remembers the claim it released and writes on that version): it waits, the holder keeps it.
    env.put_credentials("first-creds", ORG).await;
    let c = env.wait_state("first", State::Conflict).await;
    assert_eq!(reason(&c), "OrgClaimedByAnotherTeam");
    assert_eq!(state_of(&env.get("second").await), Some(State::Active));
    assert_eq!(env.org_claim(), "second true");
    op.stop().await;
}

#[tokio::test]
async fn missing_secret_is_inactive_and_creating_it_recovers() {
    let env = Env::new().await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "SecretMissing");
    assert!(message(&c).contains("creds"), "{}", message(&c));
    // The Secret does not exist yet, so no label could be set: creating it must still be noticed.
    env.put_credentials("creds", ORG).await;
    env.wait_state("acme", State::Active).await;
    op.stop().await;
}

#[tokio::test]
async fn a_secret_created_after_its_connection_is_found_within_seconds_even_with_a_long_retry_max() {
    let env = Env::new().await;
    // retry_max 5 min (the default): only the short first looks can find the Secret in time.
    let op = Operator::start(
        env.ns(),
        &env.fake,
        Policy {
            retry_max: Duration::from_secs(300),
            ..slow()
        },
    )
    .await;
    env.create_salesforce("acme", "sales", "creds").await;
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "SecretMissing");
    let msg = message(&c);
    assert!(
        msg.contains("looked for again after 1s") && msg.contains("crmconnect.io/credentials=true"),
        "{msg}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Created unlabelled, so the watch cannot see it.
    env.put_credentials("creds", ORG).await;
    env.wait_state("acme", State::Active).await;
    op.stop().await;
}

#[tokio::test]
async fn missing_key_is_inactive_and_adding_it_recovers() {
    let env = Env::new().await;
    let token = env.fake.issue_refresh_token(ORG);
    env.put_secret("creds", &[("refresh_token", token.as_bytes())])
        .await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "SecretKeyMissing");
    assert!(message(&c).contains("client_id"), "{}", message(&c));
    env.put_secret(
        "creds",
        &[
            ("client_id", CLIENT_ID.as_bytes()),
            ("refresh_token", token.as_bytes()),
        ],
    )
    .await;
    env.wait_state("acme", State::Active).await;
    op.stop().await;
}

#[tokio::test]
async fn garbage_in_the_secret_is_inactive_and_fixing_it_recovers() {
    let env = Env::new().await;
    env.put_secret(
        "creds",
        &[
            ("client_id", CLIENT_ID.as_bytes()),
            ("refresh_token", &[0xff, 0xfe, 0x00]),
        ],
    )
    .await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "SecretKeyInvalid");
    assert_eq!(
        env.fake.token_requests(),
        0,
        "garbage is caught before any provider call"
    );
    env.put_credentials("creds", ORG).await;
    env.wait_state("acme", State::Active).await;
    op.stop().await;
}

#[tokio::test]
async fn a_secret_without_a_refresh_token_is_not_labelled_and_its_fix_is_still_seen() {
    let env = Env::new().await;
    env.put_secret("unrelated", &[("tls.key", b"not credentials")])
        .await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "unrelated").await;
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "SecretKeyMissing");
    let labels = env.secrets().get("unrelated").await.unwrap().metadata.labels;
    assert!(
        !labels
            .unwrap_or_default()
            .contains_key("crmconnect.io/credentials"),
        "the operator labels only Secrets that hold credentials"
    );
    // The fix is seen although the watch does not cover this Secret (it is looked at again).
    env.put_credentials("unrelated", ORG).await;
    env.wait_state("acme", State::Active).await;
    op.stop().await;
}

#[tokio::test]
async fn deleting_a_connection_garbage_collects_its_children_but_not_the_credentials() {
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    env.wait_replicas("acme", 1).await;
    env.connections()
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    eventually("children garbage-collected", Duration::from_secs(60), || async {
        let d = env.deployments().get_opt("acme-retriever").await.unwrap();
        let s = env.secrets().get_opt("acme-session").await.unwrap();
        (d.is_none() && s.is_none()).then_some(())
    })
    .await;
    assert!(
        env.secrets().get_opt("creds").await.unwrap().is_some(),
        "the user's Secret is theirs"
    );
    op.stop().await;
}

#[tokio::test]
async fn an_existing_object_with_a_childs_name_is_never_taken_over_or_collected() {
    // A user's Secret that happens to be named `<connection>-session`: applying over it (force)
    // would make the Connection its controller and garbage-collect it with the Connection.
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    env.put_secret("acme-session", &[("tls.key", b"users-private-key")])
        .await;
    let before = env.secrets().get("acme-session").await.unwrap();
    let requests = env.fake.token_requests();
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;

    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "ChildConflict");
    assert!(message(&c).contains("Secret acme-session"), "{}", message(&c));
    assert_eq!(
        env.fake.token_requests(),
        requests,
        "no provider call for a conflicted connection"
    );
    let after = env.secrets().get("acme-session").await.unwrap();
    assert_eq!(
        after.resource_version(),
        before.resource_version(),
        "the user's Secret is untouched"
    );
    assert!(after.owner_references().is_empty());

    env.connections()
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    // Garbage collection of what the Connection did own (its Deployment) has run once it is gone.
    eventually(
        "the retriever Deployment collected",
        Duration::from_secs(60),
        || async {
            env.deployments()
                .get_opt("acme-retriever")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    let kept = env.secrets().get("acme-session").await.unwrap();
    assert_eq!(kept.data.unwrap()["tls.key"].0, b"users-private-key");
    op.stop().await;
}

#[tokio::test]
async fn operator_restart_on_an_unchanged_cluster_writes_nothing_and_calls_no_provider() {
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    env.wait_replicas("acme", 1).await;
    // The RetrieverReady condition follows the Deployment's status: wait until the deployment
    // controller has reported on the current spec and its pod, then let follow-up reconciles (own
    // writes echoing back) settle.
    eventually(
        "the deployment controller to report the retriever pod",
        Duration::from_secs(30),
        || async {
            let d = env.deployments().get("acme-retriever").await.ok()?;
            let status = d.status?;
            (status.observed_generation >= d.metadata.generation && status.replicas == Some(1)).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    op.stop().await;

    let versions = || async {
        let c = env.get("acme").await.resource_version();
        // The Deployment's status belongs to the deployment controller: compare what the operator
        // writes (the spec, counted by generation) and the metadata it applies.
        let d = env.deployments().get("acme-retriever").await.unwrap();
        let d = (d.metadata.generation, d.metadata.annotations, d.metadata.labels);
        let s = env
            .secrets()
            .get("acme-session")
            .await
            .unwrap()
            .resource_version();
        let k = env.secrets().get("creds").await.unwrap().resource_version();
        (c, d, s, k)
    };
    let before = versions().await;
    let calls = env.fake.token_requests();
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    op.stop().await;
    assert_eq!(
        versions().await,
        before,
        "a restart must not write (Connection, Deployment, Secrets)"
    );
    assert_eq!(
        env.fake.token_requests(),
        calls,
        "a still-valid session needs no provider call"
    );
}

#[tokio::test]
async fn refreshed_sandbox_with_a_new_org_id_is_inactive_and_the_rotated_token_is_still_saved() {
    let env = Env::new().await;
    env.fake.set_rotation(true);
    env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, fast()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;

    assert!(env.fake.change_remote_id(ORG, "00D000000000002AAA"));
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "OrgIdChanged");
    assert_eq!(
        message(&c).matches("Connection inactive:").count(),
        1,
        "{}",
        message(&c)
    );
    env.wait_replicas("acme", 0).await;
    op.stop().await;
    // The failed validation had already rotated the token: the live one is in acme-token.
    let stored = env.secret_value("acme-token", "refresh_token").await.unwrap();
    assert!(
        env.fake.is_live(&stored),
        "the rotated token was saved even though validation failed"
    );
}

#[tokio::test]
async fn rotated_token_that_cannot_be_saved_is_not_reported_active_and_is_saved_once_possible() {
    let env = Env::new().await;
    env.fake.set_rotation(true);
    let original = env.fake.issue_refresh_token(ORG);
    // Pre-labelled, so the operator never needs to write the seed.
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "creds", "labels": {"crmconnect.io/credentials": "true"}},
        "stringData": {"client_id": CLIENT_ID, "refresh_token": original},
    });
    env.secrets()
        .patch("creds", &PatchParams::apply("test"), &Patch::Apply(&secret))
        .await
        .unwrap();

    // A real admission policy that refuses the operator's writes to Secrets in this namespace.
    let policy_name = format!("deny-secret-writes-{}", env.ns());
    let policy = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {policy_name}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {{apiGroups: [""], apiVersions: ["v1"], operations: ["UPDATE"], resources: ["secrets"]}}
  validations:
    - expression: "request.userInfo.username != '{OPERATOR_USER}'"
      message: "test: Secret writes by the operator are refused"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {policy_name}}}
spec:
  policyName: {policy_name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {ns}}}
"#,
        ns = env.ns()
    );
    run_ok(kubectl().args(["apply", "-f", "-"]), Some(&policy));
    struct DeletePolicy(String);
    impl Drop for DeletePolicy {
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
    let guard = DeletePolicy(policy_name.clone());
    eventually("the admission policy to take effect", WAIT, || async {
        let out = run(
            kubectl().args([
                "label",
                "secret",
                "creds",
                "-n",
                env.ns(),
                // The one change the chart's own policy allows the operator on a user's Secret.
                "crmconnect.io/credentials=probe",
                "--overwrite",
                "--dry-run=server",
                "--as",
                OPERATOR_USER,
            ]),
            None,
        );
        out.stderr
            .contains("Secret writes by the operator are refused")
            .then_some(())
    })
    .await;

    let op = Operator::start(env.ns(), &env.fake, fast()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "RefreshTokenNotSaved");
    assert!(message(&c).contains("Secret acme-token"), "{}", message(&c));
    assert_eq!(env.replicas("acme").await, Some(0));
    assert!(
        !env.fake.is_live(&original),
        "the provider already killed the old token"
    );
    assert_eq!(
        env.secret_value("acme-token", "refresh_token").await.as_deref(),
        Some(original.as_str()),
        "acme-token was created (creates are allowed here) but the new token could not be saved"
    );

    // Once the Secret can be written, the token kept in memory is saved and the connection recovers.
    drop(guard);
    env.wait_state("acme", State::Active).await;
    op.stop().await;
    let stored = env.secret_value("acme-token", "refresh_token").await.unwrap();
    assert!(
        env.fake.is_live(&stored),
        "the live rotated token reached acme-token"
    );
    assert_eq!(env.fake.stats().dead_token_requests, 0);
}

#[tokio::test]
async fn the_revalidate_annotation_forces_exactly_one_validation() {
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    // Settled: nothing is due for an hour.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = env.fake.token_requests();
    let annotate = |value: &str| env.revalidate("acme", value);
    annotate("1");
    eventually("one validation", WAIT, || async {
        (env.fake.token_requests() == before + 1).then_some(())
    })
    .await;
    // The same value again (and other edits of the object) change nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    annotate("1");
    run_ok(
        kubectl().args(["label", "conn", "acme", "-n", env.ns(), "x=y"]),
        None,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.fake.token_requests(),
        before + 1,
        "exactly one provider call per new value"
    );
    annotate("2");
    eventually("a second validation", WAIT, || async {
        (env.fake.token_requests() == before + 2).then_some(())
    })
    .await;
    op.stop().await;
}

/// Rechecks of valid tokens use the access token held (an identity call) until a refresh is due:
/// no token request, so with rotation on nothing rotates. A refused access token is not a verdict:
/// the recheck refreshes, and only a refused refresh token makes the connection Inactive.
#[tokio::test]
async fn rechecks_use_the_access_token_held_and_refresh_only_when_it_is_refused() {
    let env = Env::new().await;
    env.fake.set_rotation(true);
    env.put_credentials("creds", ORG).await;
    let policy = Policy {
        refresh_every: Duration::from_secs(3600),
        ..fast() // a recheck every 2 s
    };
    let op = Operator::start(env.ns(), &env.fake, policy).await;
    env.create_salesforce("acme", "sales", "creds").await;
    env.wait_state("acme", State::Active).await;
    let identity_calls = || env.fake.stats().identity_requests;
    let (tokens, identities) = (env.fake.token_requests(), identity_calls());
    let live = env.secret_value("acme-token", "refresh_token").await;
    let access = env.secret_value("acme-session", "access_token").await;

    eventually("two rechecks", WAIT, || async {
        (identity_calls() >= identities + 2).then_some(())
    })
    .await;
    assert_eq!(
        env.fake.token_requests(),
        tokens,
        "no token request while the access token is good"
    );
    assert_eq!(
        env.secret_value("acme-token", "refresh_token").await,
        live,
        "nothing rotated"
    );
    assert_eq!(env.secret_value("acme-session", "access_token").await, access);

    // The access token expires (the CRM's session timeout): the next recheck refreshes.
    env.fake.expire_access_tokens();
    eventually("a refresh after the refused access token", WAIT, || async {
        (env.fake.token_requests() > tokens).then_some(())
    })
    .await;
    eventually("a new access token in the session", WAIT, || async {
        (env.secret_value("acme-session", "access_token").await != access).then_some(())
    })
    .await;
    let c = env.get("acme").await;
    assert_eq!(
        state_of(&c),
        Some(State::Active),
        "an expired access token is not a revocation"
    );
    let rotated = env.secret_value("acme-token", "refresh_token").await;
    assert_ne!(rotated, live, "the refresh rotated the token (and it was saved)");

    // A new revalidate value still forces a refresh (a user asking "are my tokens good?").
    let before = env.fake.token_requests();
    let access = env.secret_value("acme-session", "access_token").await;
    env.revalidate("acme", "now");
    eventually("a forced refresh", WAIT, || async {
        (env.fake.token_requests() > before).then_some(())
    })
    .await;
    // The session is written after the rotated token is saved.
    eventually("its access token in the session", WAIT, || async {
        (env.secret_value("acme-session", "access_token").await != access).then_some(())
    })
    .await;

    // Salesforce revokes the access tokens of a revoked refresh token: the recheck's identity
    // call is refused, the refresh too, and the connection turns Inactive.
    let live = env.secret_value("acme-token", "refresh_token").await.unwrap();
    assert!(env.fake.revoke(&live));
    let c = env.wait_state("acme", State::Inactive).await;
    assert_eq!(reason(&c), "TokenRevoked");
    op.stop().await;
}

#[tokio::test]
async fn an_unreachable_own_host_is_worded_as_a_probable_typo_with_one_event() {
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    let op = Operator::start(env.ns(), &env.fake, fast()).await;
    // Nothing listens there: every attempt is refused at once, like a typo'd My Domain.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    env.create(json!({
        "metadata": {"name": "typo"},
        "spec": {
            "team": "sales",
            "provider": "SalesforceProduction",
            "salesforce": {"loginUrl": format!("http://{closed}")},
            "credentialsSecretRef": {"name": "creds"},
        }
    }))
    .await;
    let c = env
        .wait_for("typo", "the typo hint", |c| {
            c.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Authorized" && c.message.contains("check it for a typo"))
            })
        })
        .await;
    let authorized = c
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Authorized")
        .unwrap();
    assert_eq!(authorized.status, "Unknown", "still an unknown, not a verdict");
    assert!(
        authorized
            .message
            .contains("spec.salesforce.loginUrl names 127.0.0.1"),
        "{}",
        authorized.message
    );
    assert_eq!(state_of(&env.get("typo").await), Some(State::Pending));
    eventually("one ProviderUnreachable event", WAIT, || async {
        env.event_reasons("typo")
            .await
            .contains(&"ProviderUnreachable".to_string())
            .then_some(())
    })
    .await;
    // More failures, still one event.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = env.event_reasons("typo").await;
    assert_eq!(
        events.iter().filter(|r| *r == "ProviderUnreachable").count(),
        1,
        "{events:?}"
    );
    op.stop().await;
}

#[tokio::test]
async fn a_failing_api_call_is_an_event_naming_the_step_once_then_recovers() {
    let env = Env::new().await;
    env.put_credentials("creds", ORG).await;
    // The namespace may hold no Deployment: applying the retriever fails at admission.
    run_ok(
        kubectl().args([
            "create",
            "quota",
            "no-deployments",
            "-n",
            env.ns(),
            "--hard=count/deployments.apps=0",
        ]),
        None,
    );
    let op = Operator::start(env.ns(), &env.fake, slow()).await;
    env.create_salesforce("acme", "sales", "creds").await;
    let note = eventually("a ReconcileFailed event", WAIT, || async {
        let out = kubectl_ok(&[
            "get",
            "events.events.k8s.io",
            "-n",
            env.ns(),
            "--field-selector",
            "regarding.name=acme,reason=ReconcileFailed",
            "-o",
            "jsonpath={range .items[*]}{.note}{\"\\n\"}{end}",
        ]);
        (!out.trim().is_empty()).then_some(out)
    })
    .await;
    assert!(
        note.contains("applying the session Secret, the retriever Deployment"),
        "{note}"
    );
    assert!(note.contains("exceeded quota"), "{note}");
    // Retries (with backoff) do not repeat the event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let reasons = env.event_reasons("acme").await;
    assert_eq!(
        reasons.iter().filter(|r| *r == "ReconcileFailed").count(),
        1,
        "{reasons:?}"
    );
    run_ok(
        kubectl().args(["delete", "quota", "no-deployments", "-n", env.ns()]),
        None,
    );
    env.wait_state("acme", State::Active).await;
    env.wait_replicas("acme", 1).await;
    op.stop().await;
}
