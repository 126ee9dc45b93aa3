//! `kubectl crm` (the `kubectl-crm` binary) on the real control plane, against the fake providers'
//! real OAuth logins: device code and browser + PKCE, Global Discovery, re-authorization, pause,
//! activate, edit and status. The operator runs in-process, scoped to the test's namespace.
//!
//! The test plays the user: it approves or denies device codes and "browser" sign-ins through the
//! fake's admin API, and opens the sign-in URL the plugin prints with an HTTP client that follows
//! the redirects to the plugin's loopback callback, as a browser would.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use connection_operator::api::{Connection, RequiredAgreement, State};
use connection_operator::controller::{Config, schedule::Policy};
use connection_operator::providers::ValidatorConfig;
use fake_providers::{DynamicsEnvironment, FakeProviders, LoginDecision, SalesforceOrg};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ORG: &str = "00D000000000001AAA";
const OTHER_ORG: &str = "00D000000000002AAA";
const CLIENT_ID: &str = "crm-cli-client";
const ENV_A: &str = "11111111-1111-1111-1111-111111111111";
const ENV_B: &str = "99999999-9999-9999-9999-999999999999";
const USER: &str = "22222222-2222-2222-2222-222222222222";

fn policy() -> Policy {
    Policy {
        revalidate_every: Duration::from_secs(2),
        refresh_margin: Duration::from_secs(1),
        refresh_every: Duration::ZERO,
        retry_base: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
    }
}

struct World {
    client: Client,
    ns: TempNamespace,
    fake: FakeProviders,
    operator: Option<InProcessOperator>,
}

impl World {
    async fn new() -> World {
        World::with_agreement(None).await
    }

    async fn with_agreement(agreement: Option<RequiredAgreement>) -> World {
        ensure_operator_rbac();
        let client = client().await;
        let ns = TempNamespace::new(&client).await;
        let fake = FakeProviders::start().await;
        fake.add_salesforce_org(SalesforceOrg::new(
            ORG,
            "005000000000001AAA",
            "ops@acme.example",
            CLIENT_ID,
        ));
        fake.add_salesforce_org(SalesforceOrg::new(
            OTHER_ORG,
            "005000000000002AAA",
            "ops@other.example",
            CLIENT_ID,
        ));
        fake.add_dynamics_environment(
            DynamicsEnvironment::new(ENV_A, USER, CLIENT_ID).with_name("Contoso Sales"),
        );
        fake.add_dynamics_environment(
            DynamicsEnvironment::new(ENV_B, USER, CLIENT_ID)
                .with_url("https://contoso-uat.crm.dynamics.com")
                .with_name("Contoso UAT"),
        );
        let operator = InProcessOperator::start(Config {
            namespaces: vec![ns.name().to_string()],
            policy: policy(),
            validator: ValidatorConfig {
                entra_authority_override: Some(fake.entra_authority()),
                ..Default::default()
            },
            concurrency: 4,
            agreement,
            ..Default::default()
        })
        .await;
        World {
            client,
            ns,
            fake,
            operator: Some(operator),
        }
    }

    fn ns(&self) -> &str {
        self.ns.name()
    }

    fn connections(&self) -> Api<Connection> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), self.ns())
    }

    /// `kubectl-crm ARGS -n NS` with the test cluster's kubeconfig and the fake providers.
    fn plugin(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-crm"));
        cmd.args(args)
            .args(["-n", self.ns()])
            .env("KUBECONFIG", kubeconfig_path())
            .env("KUBECTL_CRM_ALLOW_LOOPBACK_PROVIDERS", "true")
            .env("ENTRA_AUTHORITY_OVERRIDE", self.fake.entra_authority())
            .env("KUBECTL_CRM_DISCOVERY_URL", self.fake.url())
            .env("KUBECTL_CRM_CLIENT_ID", CLIENT_ID)
            // The test is the browser: nothing is opened.
            .env("BROWSER", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs the plugin while the user answers its device code (the first that shows up).
    async fn with_device_code(&self, args: &[&str], decisions: &[LoginDecision]) -> Run {
        self.with_device_code_and_input(args, decisions, "").await
    }

    /// As [`World::with_device_code`], then types `input` (the answers to its questions).
    async fn with_device_code_and_input(
        &self,
        args: &[&str],
        decisions: &[LoginDecision],
        input: &str,
    ) -> Run {
        let mut child = self.plugin(args).spawn().expect("kubectl-crm starts");
        let code = eventually("a device code", Duration::from_secs(30), || async {
            self.fake.device_codes().into_iter().next()
        })
        .await;
        for decision in decisions {
            self.fake
                .decide_device_code(&code.user_code, decision.clone())
                .expect("the device code is pending");
        }
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
        drop(stdin);
        let run = finished(child).await;
        assert!(
            run.stderr.contains(&code.user_code),
            "the user is shown the code to enter: {}",
            run.stderr
        );
        run
    }

    async fn state(&self, name: &str) -> Option<State> {
        self.connections()
            .get_opt(name)
            .await
            .unwrap()
            .and_then(|c| c.status)
            .and_then(|s| s.state)
    }

    async fn wait_state(&self, name: &str, state: State) {
        eventually(&format!("{name} {state}"), Duration::from_secs(60), || async {
            (self.state(name).await == Some(state)).then_some(())
        })
        .await;
    }

    async fn refresh_token(&self, secret: &str) -> String {
        let s = self.secrets().get(secret).await.unwrap();
        String::from_utf8(s.data.unwrap()["refresh_token"].0.clone()).unwrap()
    }

    async fn stop(mut self) {
        if let Some(op) = self.operator.take() {
            op.stop().await;
        }
    }
}

async fn finished(child: tokio::process::Child) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("kubectl-crm finishes")
        .expect("kubectl-crm runs");
    let run = Run::from(out);
    eprintln!(
        "--- kubectl-crm stdout:\n{}--- stderr:\n{}",
        run.stdout, run.stderr
    );
    run
}

/// `connect NAME` of team sales to Salesforce Production at the fake's login URL.
fn sf_connect<'a>(name: &'a str, login_url: &'a str) -> [&'a str; 8] {
    [
        "connect",
        name,
        "--team",
        "sales",
        "--provider",
        "SalesforceProduction",
        "--login-url",
        login_url,
    ]
}

/// Reads the plugin's prompts until the sign-in URL (a line with `marker`); returns it and what was shown.
async fn sign_in_url(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    marker: &str,
) -> (String, String) {
    let mut shown = String::new();
    loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the plugin prints the sign-in URL");
        shown.push_str(&line);
        shown.push('\n');
        if let Some(url) = line
            .split_whitespace()
            .find(|w| w.starts_with("http://") && w.contains(marker))
        {
            return (url.to_string(), shown);
        }
    }
}

fn approve(remote_id: &str) -> LoginDecision {
    LoginDecision::Approve {
        remote_id: remote_id.into(),
    }
}

fn no_token_in(run: &Run, token: &str) {
    assert!(
        !run.stdout.contains(token) && !run.stderr.contains(token),
        "a token reached the terminal"
    );
}

#[tokio::test]
async fn connect_salesforce_by_device_code_then_pause_activate_edit_and_status() {
    let w = World::new().await;
    let login_url = w.fake.salesforce_login_url();
    let run = w
        .with_device_code(
            &[
                "connect",
                "acme",
                "--team",
                "sales",
                "--provider",
                "SalesforceProduction",
                "--login-url",
                &login_url,
                "--display-name",
                "Acme",
            ],
            &[approve(ORG)],
        )
        .await;
    assert!(run.success, "connect succeeds: {}", run.stderr);
    assert!(
        run.stdout.contains("connection.crmconnect.io/acme created"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("connection acme is Active, org {ORG}")),
        "{}",
        run.stdout
    );

    // The Secret is labelled for the operator and holds a live token; the token never reached the terminal.
    let secret = w.secrets().get("acme-credentials").await.unwrap();
    assert_eq!(
        secret.metadata.labels.unwrap()["crmconnect.io/credentials"],
        "true"
    );
    let token = w.refresh_token("acme-credentials").await;
    assert!(w.fake.is_live(&token));
    no_token_in(&run, &token);
    let conn = w.connections().get("acme").await.unwrap();
    assert_eq!(conn.status.unwrap().remote_id.as_deref(), Some(ORG));
    assert_eq!(conn.spec.display_name.as_deref(), Some("Acme"));

    // A second connect of the same name is refused before any login.
    let again = finished(w.plugin(&sf_connect("acme", &login_url)).spawn().unwrap()).await;
    assert!(!again.success);
    assert!(
        again.stderr.contains("already exists") && again.stderr.contains("kubectl crm reauthorize acme"),
        "{}",
        again.stderr
    );

    let paused = finished(w.plugin(&["pause", "acme"]).spawn().unwrap()).await;
    assert!(paused.success, "{}", paused.stderr);
    assert!(
        paused.stdout.contains("connection acme is Paused"),
        "{}",
        paused.stdout
    );
    assert_eq!(w.state("acme").await, Some(State::Paused));

    let details = finished(w.plugin(&["status", "acme"]).spawn().unwrap()).await;
    assert!(details.success, "{}", details.stderr);
    for expected in [
        "Type:          Salesforce Production",
        &format!("Org ID:        {ORG}"),
        "State:         Paused",
        "Paused",
    ] {
        assert!(
            details.stdout.contains(expected),
            "{expected:?} in\n{}",
            details.stdout
        );
    }

    let activated = finished(w.plugin(&["activate", "acme"]).spawn().unwrap()).await;
    assert!(activated.success, "{}", activated.stderr);
    assert!(
        activated.stdout.contains("connection acme is Active"),
        "{}",
        activated.stdout
    );

    let edited = finished(
        w.plugin(&[
            "edit",
            "acme",
            "--display-name",
            "Acme Production",
            "--description",
            "Nightly exports",
        ])
        .spawn()
        .unwrap(),
    )
    .await;
    assert!(edited.success, "{}", edited.stderr);
    let spec = w.connections().get("acme").await.unwrap().spec;
    assert_eq!(spec.display_name.as_deref(), Some("Acme Production"));
    assert_eq!(spec.description.as_deref(), Some("Nightly exports"));
    let too_long = "x".repeat(200);
    let refused = finished(
        w.plugin(&["edit", "acme", "--display-name", &too_long])
            .spawn()
            .unwrap(),
    )
    .await;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("the change was refused"),
        "{}",
        refused.stderr
    );

    let table = finished(w.plugin(&["status"]).spawn().unwrap()).await;
    assert!(table.success, "{}", table.stderr);
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with("acme "))
        .expect("a row for acme");
    assert!(
        row.contains("SalesforceProduction") && row.contains("Active") && row.contains(ORG),
        "{row}"
    );
    let json = finished(w.plugin(&["status", "acme", "-o", "json"]).spawn().unwrap()).await;
    let value: serde_json::Value = serde_json::from_str(&json.stdout).expect("-o json is JSON");
    assert_eq!(value["status"]["state"], "Active");
    w.stop().await;
}

#[tokio::test]
async fn connect_dynamics_in_the_browser_with_pkce_and_pick_the_environment() {
    let w = World::new().await;
    w.fake.queue_authorization(approve(ENV_A));
    let mut child = w
        .plugin(&[
            "connect",
            "ops",
            "--team",
            "ops",
            "--provider",
            "Dynamics365",
            "--browser",
        ])
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    // The sign-in URL, as the user would open it.
    let (url, mut shown) = sign_in_url(&mut stderr, "/authorize?").await;
    let query: std::collections::BTreeMap<String, String> = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(query["code_challenge_method"], "S256");
    assert!(
        query["redirect_uri"].starts_with("http://127.0.0.1:")
            && query["redirect_uri"].ends_with("/callback")
    );
    assert!(query["scope"].contains("offline_access"), "{}", query["scope"]);
    // The browser: the fake signs the user in and redirects to the plugin's loopback callback.
    let page = reqwest::get(&url)
        .await
        .expect("the sign-in redirects to the callback");
    assert!(page.status().is_success(), "callback answered {}", page.status());
    // Global Discovery lists both environments; the user picks the first.
    loop {
        let line = stderr.next_line().await.unwrap().expect("the environment list");
        shown.push_str(&line);
        shown.push('\n');
        if line.contains("Contoso UAT") {
            break;
        }
    }
    stdin.write_all(b"1\n").await.unwrap();
    drop(stdin);
    while let Some(line) = stderr.next_line().await.unwrap() {
        shown.push_str(&line);
        shown.push('\n');
    }
    let run = finished(child).await;
    assert!(run.success, "connect succeeds: {shown}");
    assert!(
        shown.contains("Contoso Sales") && shown.contains("https://contoso-uat.crm.dynamics.com"),
        "{shown}"
    );
    assert!(
        run.stdout
            .contains(&format!("connection ops is Active, org {ENV_A}")),
        "{}",
        run.stdout
    );
    let conn = w.connections().get("ops").await.unwrap();
    let dynamics = conn.spec.dynamics.unwrap();
    assert_eq!(dynamics.environment_url, w.fake.url());
    assert_eq!(dynamics.tenant_id, "organizations");
    let token = w.refresh_token("ops-credentials").await;
    assert!(w.fake.is_live(&token));
    assert!(!shown.contains(&token) && !run.stdout.contains(&token));
    w.stop().await;
}

#[tokio::test]
async fn reauthorize_an_inactive_connection_and_refuse_another_org() {
    let w = World::new().await;
    let login_url = w.fake.salesforce_login_url();
    let first = w
        .with_device_code(&sf_connect("acme", &login_url), &[approve(ORG)])
        .await;
    assert!(first.success, "{}", first.stderr);
    let old = w.refresh_token("acme-credentials").await;
    assert!(w.fake.revoke(&old));
    w.wait_state("acme", State::Inactive).await;

    let run = w
        .with_device_code(&["reauthorize", "acme"], &[approve(ORG)])
        .await;
    assert!(run.success, "{}", run.stderr);
    assert!(
        run.stdout.contains("secret/acme-credentials updated"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("connection acme is Active"), "{}", run.stdout);
    let new = w.refresh_token("acme-credentials").await;
    assert_ne!(new, old);
    assert!(w.fake.is_live(&new));
    no_token_in(&run, &new);
    let data = w.secrets().get("acme-credentials").await.unwrap().data.unwrap();
    assert_eq!(
        data["client_id"].0,
        CLIENT_ID.as_bytes(),
        "only the token keys change"
    );

    // Signing in as a user of another org: refused, nothing written.
    let version = w
        .secrets()
        .get("acme-credentials")
        .await
        .unwrap()
        .metadata
        .resource_version;
    let refused = w
        .with_device_code(&["reauthorize", "acme"], &[approve(OTHER_ORG)])
        .await;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("another org or environment")
            && refused.stderr.contains("nothing was changed"),
        "{}",
        refused.stderr
    );
    let after = w.secrets().get("acme-credentials").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, version,
        "the Secret is untouched"
    );
    assert_eq!(w.state("acme").await, Some(State::Active));
    w.stop().await;
}

#[tokio::test]
async fn a_denied_or_expired_login_writes_nothing_and_slow_down_is_honoured() {
    let w = World::new().await;
    let login_url = w.fake.salesforce_login_url();
    let args = sf_connect("acme", &login_url);

    let denied = w.with_device_code(&args, &[LoginDecision::Deny]).await;
    assert!(!denied.success);
    assert!(
        denied.stderr.contains("error: the sign-in was denied"),
        "{}",
        denied.stderr
    );

    let expired = w.with_device_code(&args, &[LoginDecision::Expire]).await;
    assert!(!expired.success);
    assert!(
        expired.stderr.contains("error: the sign-in code expired"),
        "{}",
        expired.stderr
    );

    let entra_denied = w
        .with_device_code(
            &[
                "connect",
                "ops",
                "--team",
                "ops",
                "--provider",
                "Dynamics365",
                "--environment",
                &w.fake.url(),
            ],
            &[LoginDecision::Deny],
        )
        .await;
    assert!(!entra_denied.success);
    assert!(
        entra_denied.stderr.contains("error: the sign-in was denied"),
        "{}",
        entra_denied.stderr
    );

    let fake_url = w.fake.url();
    let dynamics = [
        "connect",
        "ops",
        "--team",
        "ops",
        "--provider",
        "Dynamics365",
        "--environment",
        &fake_url,
    ];
    let entra_expired = w.with_device_code(&dynamics, &[LoginDecision::Expire]).await;
    assert!(!entra_expired.success);
    assert!(
        entra_expired.stderr.contains("error: the sign-in code expired"),
        "{}",
        entra_expired.stderr
    );

    // In the browser: the user refuses; the redirect carries access_denied and the state.
    w.fake.queue_authorization(LoginDecision::Deny);
    let mut browser = args.to_vec();
    browser.push("--browser");
    let mut child = w.plugin(&browser).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (url, _) = sign_in_url(&mut stderr, "/services/oauth2/authorize?").await;
    // A forged answer with another state is refused, and the login keeps waiting for its own.
    let query: std::collections::BTreeMap<String, String> = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let forged = format!("{}?code=stolen&state=not-the-state", query["redirect_uri"]);
    assert_eq!(reqwest::get(&forged).await.unwrap().status(), 400);
    reqwest::get(&url)
        .await
        .expect("the sign-in page redirects to the callback");
    let mut rest = String::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        rest.push_str(&line);
    }
    assert!(!child.wait().await.unwrap().success());
    assert!(rest.contains("error: the sign-in was denied"), "{rest}");

    assert!(
        w.connections().get_opt("acme").await.unwrap().is_none(),
        "no Connection was written"
    );
    assert!(
        w.connections().get_opt("ops").await.unwrap().is_none(),
        "no Connection was written"
    );
    assert!(
        w.secrets().get_opt("acme-credentials").await.unwrap().is_none(),
        "no Secret was written"
    );

    // slow_down: the plugin adds 5 s to its interval (a client that did not would be answered
    // slow_down again and again, and never get the tokens).
    w.fake.reset_stats();
    let run = w
        .with_device_code(&args, &[LoginDecision::SlowDown, approve(ORG)])
        .await;
    assert!(run.success, "{}", run.stderr);
    assert_eq!(
        w.fake.stats().device_slow_downs,
        1,
        "exactly the scripted slow_down: no poll came too early"
    );
    w.stop().await;
}

#[tokio::test]
async fn dry_run_manifests_apply_with_a_server_dry_run() {
    let w = World::new().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("acme.secret.yaml");
    let login_url = w.fake.salesforce_login_url();
    let run = w
        .with_device_code(
            &[
                "connect",
                "acme",
                "--team",
                "sales",
                "--provider",
                "SalesforceSandbox",
                "--login-url",
                &login_url,
                "--dry-run",
                "-o",
                "yaml",
                "--secret-file",
                secret_file.to_str().unwrap(),
            ],
            &[approve(ORG)],
        )
        .await;
    assert!(run.success, "{}", run.stderr);
    let connection_file = dir.path().join("acme.yaml");
    std::fs::write(&connection_file, &run.stdout).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the Secret file is private");
    }
    assert!(
        !run.stdout.contains("refresh_token"),
        "the Connection manifest carries no token"
    );
    for file in [&secret_file, &connection_file] {
        let applied = run_ok(
            kubectl().args([
                "apply",
                "--dry-run=server",
                "-n",
                w.ns(),
                "-f",
                file.to_str().unwrap(),
            ]),
            None,
        );
        assert!(applied.contains("(server dry run)"), "{applied}");
    }
    assert!(
        w.connections().get_opt("acme").await.unwrap().is_none(),
        "a dry run writes nothing"
    );
    w.stop().await;
}

#[test]
fn kubectl_plugin_list_finds_it() {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_kubectl-crm"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(kubectl().args(["plugin", "list"]).env("PATH", path), None);
    assert!(
        out.stdout.contains("kubectl-crm"),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
}

#[tokio::test]
async fn with_an_agreement_required_connections_stay_pending_until_it_is_accepted() {
    const THIRD_ORG: &str = "00D000000000003AAA";
    let dpa = RequiredAgreement {
        name: "Data Processing Agreement".into(),
        version: "2026-01".into(),
        url: "https://example.com/dpa/2026-01".into(),
    };
    let w = World::with_agreement(Some(dpa)).await;
    w.fake.add_salesforce_org(SalesforceOrg::new(
        THIRD_ORG,
        "005000000000003AAA",
        "ops@third.example",
        CLIENT_ID,
    ));
    let login_url = w.fake.salesforce_login_url();

    // Applied without the plugin: Pending, with the agreement to accept; the tokens are not used.
    let token = w.fake.issue_refresh_token(THIRD_ORG);
    run_ok(
        kubectl().args(["apply", "-f", "-"]),
        Some(&salesforce_manifest(
            w.ns(),
            "manual",
            "sales",
            &login_url,
            &format!("client_id: {CLIENT_ID}, refresh_token: {token}"),
        )),
    );
    w.wait_state("manual", State::Pending).await;
    let manual = eventually("the agreement in the status", Duration::from_secs(30), || async {
        let c = w.connections().get("manual").await.unwrap();
        c.status
            .clone()
            .filter(|s| s.required_agreement.is_some())
            .map(|_| c)
    })
    .await;
    let status = manual.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("AgreementNotAccepted"));
    assert!(
        status
            .message
            .unwrap()
            .contains("https://example.com/dpa/2026-01")
    );
    assert_eq!(status.required_agreement.unwrap().version, "2026-01");
    assert_eq!(
        w.fake.token_requests(),
        0,
        "no provider call before the agreement is accepted"
    );

    // `connect` shows the agreement and asks; "y" records the acceptance by the kubeconfig's user.
    let run = w
        .with_device_code_and_input(&sf_connect("acme", &login_url), &[approve(ORG)], "y\n")
        .await;
    assert!(run.success, "{}", run.stderr);
    assert!(
        run.stderr.contains("Data Processing Agreement version 2026-01")
            && run.stderr.contains("https://example.com/dpa/2026-01"),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout.contains("agreement 2026-01 accepted") && run.stdout.contains("connection acme is Active"),
        "{}",
        run.stdout
    );
    let accepted = w
        .connections()
        .get("acme")
        .await
        .unwrap()
        .spec
        .agreement
        .expect("recorded");
    assert_eq!(accepted.version, "2026-01");
    assert!(
        accepted.accepted_by.is_some_and(|u| !u.is_empty()),
        "the user is recorded"
    );
    assert!(accepted.accepted_at.is_some());

    // Declined: the connection stays Pending, and the error says how to accept later.
    let declined = w
        .with_device_code_and_input(&sf_connect("other", &login_url), &[approve(OTHER_ORG)], "n\n")
        .await;
    assert!(!declined.success);
    assert!(
        declined.stderr.contains("stays Pending") && declined.stderr.contains("--accept-agreement 2026-01"),
        "{}",
        declined.stderr
    );
    assert_eq!(w.state("other").await, Some(State::Pending));

    // Scripts accept with the flag, here on the connections already made.
    for name in ["other", "manual"] {
        let run = finished(
            w.plugin(&["activate", name, "--accept-agreement", "2026-01"])
                .spawn()
                .unwrap(),
        )
        .await;
        assert!(run.success, "{}", run.stderr);
        assert!(
            run.stdout.contains(&format!("connection {name} is Active")),
            "{}",
            run.stdout
        );
    }
    w.stop().await;
}

#[tokio::test]
async fn check_has_the_operator_validate_now_and_keeps_rotated_tokens() {
    let w = World::new().await;
    let login_url = w.fake.salesforce_login_url();
    let run = w
        .with_device_code(&sf_connect("acme", &login_url), &[approve(ORG)])
        .await;
    assert!(run.success, "{}", run.stderr);
    // Rotation on: each refresh kills the token sent. The operator keeps the new one in acme-token.
    w.fake.set_rotation(true);
    for _ in 0..2 {
        w.fake.reset_stats();
        let checked = finished(w.plugin(&["check", "acme"]).spawn().unwrap()).await;
        assert!(checked.success, "{}", checked.stderr);
        assert!(
            checked.stdout.contains(&format!("credentials valid: org {ORG}")),
            "{}",
            checked.stdout
        );
        assert!(
            w.fake.stats().salesforce_token_requests >= 1,
            "the check refreshed the tokens"
        );
        assert_eq!(
            w.fake.stats().dead_token_requests,
            0,
            "no rotated-away token was ever sent again"
        );
    }
    let live = String::from_utf8(
        w.secrets().get("acme-token").await.unwrap().data.unwrap()["refresh_token"]
            .0
            .clone(),
    )
    .unwrap();
    assert!(w.fake.revoke(&live));
    let refused = finished(w.plugin(&["check", "acme"]).spawn().unwrap()).await;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("credentials NOT valid"),
        "{}",
        refused.stderr
    );
    no_token_in(&refused, &live);
    w.stop().await;
}
