//! The built-in example worker (`connection-operator worker record-count`) against the fake CRMs:
//! what a JobTemplate's container runs, with a session as the operator mounts it.

use std::path::Path;
use std::process::Output;

use fake_providers::{DynamicsEnvironment, FakeProviders, SalesforceOrg};

const ORG: &str = "00D000000000041AAA";
const ENV: &str = "41414141-4141-4141-4141-414141414141";

/// The fake CRMs with the org `ORG` and the environment `ENV`.
async fn fake_crms() -> FakeProviders {
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(ORG, "005000000000041AAA", "u@x", "cid"));
    fake.add_dynamics_environment(DynamicsEnvironment::new(
        ENV,
        "42424242-4242-4242-4242-424242424242",
        "cid",
    ));
    fake
}

/// An access token for `remote` from the fake's token endpoint (Salesforce or Entra).
async fn access_token(fake: &FakeProviders, remote: &str, dynamics: bool) -> String {
    let refresh = fake.issue_refresh_token(remote);
    let client = reqwest::Client::new();
    let (url, form) = if dynamics {
        (
            format!("{}/organizations/oauth2/v2.0/token", fake.url()),
            vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", refresh),
                ("client_id", "cid".to_string()),
                (
                    "scope",
                    format!("{}/user_impersonation offline_access", fake.environment_url()),
                ),
            ],
        )
    } else {
        (
            format!("{}/services/oauth2/token", fake.url()),
            vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", refresh),
                ("client_id", "cid".to_string()),
            ],
        )
    };
    let answer: serde_json::Value = client
        .post(url)
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"))
        .to_string()
}

fn session(dir: &Path, token: &str, url: &str, provider: &str) {
    for (key, value) in [
        ("access_token", token),
        ("instance_url", url),
        ("provider", provider),
    ] {
        std::fs::write(dir.join(key), value).unwrap();
    }
}

async fn worker(dir: &Path, log: &Path) -> Output {
    worker_with(dir, log, &[]).await
}

async fn worker_with(dir: &Path, log: &Path, extra: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_connection-operator"));
    cmd.args(["worker", "record-count", "--session-dir"])
        .arg(dir)
        .arg("--termination-log")
        .arg(log)
        .args(extra);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn record_count_counts_on_salesforce_and_dataverse_and_writes_the_result() {
    let fake = fake_crms().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");

    let token = access_token(&fake, ORG, false).await;
    session(dir.path(), &token, &fake.url(), "SalesforceProduction");
    let out = worker(dir.path(), &log).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Account: 42 records");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "Account: 42 records");

    let token = access_token(&fake, ENV, true).await;
    session(dir.path(), &token, &fake.environment_url(), "Dynamics365");
    let out = worker(dir.path(), &log).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "accounts: 42 records"
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(&token),
        "no token in its output"
    );
}

#[tokio::test]
async fn a_session_the_crm_keeps_refusing_exits_75() {
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(ORG, "005000000000041AAA", "u@x", "cid"));
    let dir = tempfile::tempdir().unwrap();
    let token = access_token(&fake, ORG, false).await;
    session(dir.path(), &token, &fake.url(), "SalesforceProduction");
    fake.expire_access_tokens();
    let out = worker(dir.path(), &dir.path().join("log")).await;
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused the session twice"));
}

#[tokio::test]
async fn an_object_the_org_does_not_have_exits_42_with_the_reason_as_its_result() {
    let fake = fake_crms().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");

    let token = access_token(&fake, ORG, false).await;
    session(dir.path(), &token, &fake.url(), "SalesforceProduction");
    let out = worker_with(dir.path(), &log, &["--object", fake_providers::NO_SUCH_OBJECT]).await;
    assert_eq!(
        out.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = std::fs::read_to_string(&log).unwrap();
    assert!(result.contains("no such object"), "{result}");

    let token = access_token(&fake, ENV, true).await;
    session(dir.path(), &token, &fake.environment_url(), "Dynamics365");
    let out = worker_with(
        dir.path(),
        &log,
        &["--entity-set", fake_providers::NO_SUCH_ENTITY_SET],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Any other failure is an ordinary one (exit 1: the template's backoffLimit may retry it).
    fake.push_fault(fake_providers::Fault::status(
        fake_providers::FaultTarget::DataverseData,
        503,
        "busy",
    ));
    let out = worker(dir.path(), &log).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
