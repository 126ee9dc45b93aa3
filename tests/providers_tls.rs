//! Provider calls over https to a fake signed by a throwaway test CA: trusted with the extra CA
//! bundle (`--extra-ca-bundle`), refused without it (no cluster needed).

use std::time::Duration;

use connection_operator::api::{ConnectionSpec, Provider, SalesforceSpec, SecretRef};
use connection_operator::providers::{
    Credentials, ExtraRoots, FailureKind, Validator, ValidatorConfig, reason,
};
use fake_providers::{FakeProviders, SalesforceOrg, TestPki};
use secrecy::SecretString;

const ORG: &str = "00D000000000001AAA";
const CLIENT_ID: &str = "3MVG9-fake-consumer-key";

fn localhost_pki() -> TestPki {
    TestPki::generate(&["127.0.0.1".parse().unwrap()], &["localhost".into()]).unwrap()
}

fn validator(extra_roots: Option<ExtraRoots>) -> Validator {
    Validator::new(ValidatorConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(3),
        extra_roots,
        hosts: connection_operator::providers::rules::HostPolicy {
            allow_loopback: true,
            ..Default::default()
        },
        ..ValidatorConfig::default()
    })
    .unwrap()
}

fn spec(login_url: &str) -> ConnectionSpec {
    ConnectionSpec {
        salesforce: Some(SalesforceSpec {
            login_url: Some(login_url.into()),
        }),
        credentials_secret_ref: SecretRef {
            name: "acme-creds".into(),
        },
        ..ConnectionSpec::new("sales-ops", Provider::SalesforceProduction, "acme-creds")
    }
}

async fn https_fake(pki: &TestPki) -> (FakeProviders, Credentials) {
    let fake = FakeProviders::start_https(pki).await;
    fake.add_salesforce_org(SalesforceOrg::new(
        ORG,
        "005000000000001AAA",
        "ops@acme.example",
        CLIENT_ID,
    ));
    let creds = Credentials {
        refresh_token: SecretString::from(fake.issue_salesforce_token(ORG)),
        client_id: CLIENT_ID.into(),
        client_secret: None,
        access_token: None,
    };
    (fake, creds)
}

#[tokio::test]
async fn the_https_fake_is_trusted_with_the_extra_ca_bundle() {
    let pki = localhost_pki();
    let (fake, creds) = https_fake(&pki).await;
    assert!(fake.url().starts_with("https://127.0.0.1:"), "{}", fake.url());
    let roots = ExtraRoots::from_pem("test CA", pki.ca_pem.as_bytes()).unwrap();
    let session = validator(Some(roots))
        .validate(&spec(&fake.url()), &creds, None)
        .await
        .expect("validated over https");
    assert_eq!(session.remote_id, ORG);
    // Both the token grant and the identity call went over https to the fake.
    assert!(
        session.instance_url.starts_with("https://"),
        "{}",
        session.instance_url
    );
    assert_eq!(fake.token_requests(), 1);
}

/// Serves the fake with `server`'s certificate, validates trusting `roots`, and checks that the TLS
/// handshake was refused as a transient failure naming the certificate.
async fn refused(server: &TestPki, roots: Option<ExtraRoots>) -> connection_operator::providers::Failure {
    let (fake, creds) = https_fake(server).await;
    let failure = validator(roots)
        .validate(&spec(&fake.url()), &creds, None)
        .await
        .unwrap_err();
    assert_eq!(failure.kind, FailureKind::Transient);
    assert!(failure.message.contains("certificate"), "{}", failure.message);
    failure
}

#[tokio::test]
async fn without_the_extra_ca_the_call_fails_as_a_transient_tls_failure() {
    let failure = refused(&localhost_pki(), None).await;
    assert_eq!(failure.reason, reason::PROVIDER_UNAVAILABLE);
}

#[tokio::test]
async fn another_ca_does_not_make_the_fake_trusted() {
    let stranger = localhost_pki();
    let roots = ExtraRoots::from_pem("another CA", stranger.ca_pem.as_bytes()).unwrap();
    refused(&localhost_pki(), Some(roots)).await;
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused_even_with_the_ca() {
    // The server certificate names only 10.0.0.1: the CA is trusted, the name check still applies.
    let pki = TestPki::generate(&["10.0.0.1".parse().unwrap()], &[]).unwrap();
    let roots = ExtraRoots::from_pem("test CA", pki.ca_pem.as_bytes()).unwrap();
    refused(&pki, Some(roots)).await;
}
