//! The fake CRMs with one Salesforce org and one Dynamics environment, and access tokens for them
//! from the fake's own token endpoints (for the tests that talk to the CRM APIs without a cluster).
#![allow(dead_code)] // each test binary uses its own subset

use fake_providers::{DynamicsEnvironment, FakeProviders, SalesforceOrg};

pub const ORG: &str = "00D000000000041AAA";
pub const ENV: &str = "41414141-4141-4141-4141-414141414141";

/// The fake CRMs with the org `ORG` and the environment `ENV`.
pub async fn fake_crms() -> FakeProviders {
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
pub async fn access_token(fake: &FakeProviders, remote: &str, dynamics: bool) -> String {
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
