//! The built-in example worker (`connection-operator worker record-count`) against the fake CRMs:
//! what a JobTemplate's container runs, with a session as the operator mounts it.

use std::path::Path;
use std::process::Output;

mod fake_crm;

use fake_crm::{ENV, ORG, access_token, fake_crms};
use fake_providers::{FakeProviders, SalesforceOrg};

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

/// An answer far larger than a count is refused, not read into memory: a clear failure (exit 1).
#[tokio::test]
async fn a_huge_answer_is_refused() {
    let fake = fake_crms().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    for (remote, dynamics, url, provider, flag, name) in [
        (
            ORG,
            false,
            fake.url(),
            "SalesforceProduction",
            "--object",
            fake_providers::HUGE_ANSWER_OBJECT,
        ),
        (
            ENV,
            true,
            fake.environment_url(),
            "Dynamics365",
            "--entity-set",
            fake_providers::HUGE_ANSWER_ENTITY_SET,
        ),
    ] {
        let token = access_token(&fake, remote, dynamics).await;
        session(dir.path(), &token, &url, provider);
        let out = worker_with(dir.path(), &log, &[flag, name]).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result = std::fs::read_to_string(&log).unwrap();
        assert!(result.contains("larger than 65536 bytes"), "{provider}: {result}");
    }
}
