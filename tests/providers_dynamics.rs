//! Dynamics 365 validation against the fake Entra ID + Dataverse (no cluster needed).

use std::time::Duration;

use connection_operator::api::{Cloud, ConnectionSpec, DynamicsSpec, Provider, SecretRef};
use connection_operator::providers::{Credentials, Failure, FailureKind, Validator, ValidatorConfig, reason};
use fake_providers::{DynamicsEnvironment, FakeProviders, Fault, FaultTarget};
use secrecy::{ExposeSecret, SecretString};

const ORG: &str = "11111111-1111-1111-1111-111111111111";
const USER: &str = "22222222-2222-2222-2222-222222222222";
const CLIENT_ID: &str = "33333333-3333-3333-3333-333333333333";

fn config(authority: &str) -> ValidatorConfig {
    ValidatorConfig {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(700),
        max_body_bytes: 16 * 1024,
        per_host_rate: 1000,
        per_host_burst: 1000,
        entra_authority_override: Some(authority.into()),
        hosts: connection_operator::providers::rules::HostPolicy {
            allow_loopback: true,
            ..Default::default()
        },
        ..ValidatorConfig::default()
    }
}

fn validator(fake: &FakeProviders) -> Validator {
    Validator::new(config(&fake.entra_authority())).unwrap()
}

fn spec(environment_url: &str, cloud: Cloud, tenant: &str) -> ConnectionSpec {
    ConnectionSpec {
        team: "public-sector".into(),
        provider: Provider::Dynamics365,
        salesforce: None,
        dynamics: Some(DynamicsSpec {
            environment_url: environment_url.into(),
            cloud,
            tenant_id: tenant.into(),
        }),
        credentials_secret_ref: SecretRef {
            name: "contoso-creds".into(),
        },
        display_name: None,
        description: None,
        paused: false,
        agreement: None,
    }
}

fn creds(refresh_token: &str) -> Credentials {
    Credentials {
        refresh_token: SecretString::from(refresh_token),
        client_id: CLIENT_ID.into(),
        client_secret: None,
        access_token: None,
    }
}

async fn fake_with_environment() -> (FakeProviders, String) {
    let fake = FakeProviders::start().await;
    fake.add_dynamics_environment(DynamicsEnvironment::new(ORG, USER, CLIENT_ID));
    let token = fake.issue_dynamics_token(ORG);
    (fake, token)
}

async fn validate(
    fake: &FakeProviders,
    token: &str,
) -> Result<connection_operator::providers::Session, Failure> {
    validator(fake)
        .validate(
            &spec(&fake.environment_url(), Cloud::Public, "organizations"),
            &creds(token),
            None,
        )
        .await
}

async fn failure_for(fault: Fault) -> Failure {
    let (fake, token) = fake_with_environment().await;
    fake.push_fault(fault);
    validate(&fake, &token).await.unwrap_err()
}

#[tokio::test]
async fn valid_tokens_give_environment_and_user_and_a_new_refresh_token() {
    let (fake, token) = fake_with_environment().await;
    let before = k8s_openapi::jiff::Timestamp::now();
    let session = validate(&fake, &token).await.unwrap();
    assert_eq!(session.remote_id, ORG);
    assert_eq!(session.user, USER);
    assert_eq!(session.instance_url, fake.url());
    let expires = session.expires_at.expect("Entra sends expires_in");
    assert!(expires > before, "{expires}");
    let rotated = session
        .rotated_refresh_token
        .expect("Entra returns a new refresh token every time");
    assert_ne!(rotated.expose_secret(), token);
    assert!(fake.is_live(rotated.expose_secret()));

    let form = fake.last_token_form().unwrap();
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["refresh_token"], token);
    assert_eq!(form["client_id"], CLIENT_ID);
    assert_eq!(
        form["scope"],
        format!("{}/user_impersonation offline_access", fake.url())
    );
    assert!(!form.contains_key("client_secret"));
    let stats = fake.stats();
    assert_eq!((stats.entra_token_requests, stats.whoami_requests), (1, 1));
}

#[tokio::test]
async fn confidential_client_sends_its_secret_and_a_wrong_one_is_invalid_client() {
    let fake = FakeProviders::start().await;
    fake.add_dynamics_environment(
        DynamicsEnvironment::new(ORG, USER, CLIENT_ID).with_client_secret("app-secret-123"),
    );
    let token = fake.issue_dynamics_token(ORG);
    let spec = spec(&fake.url(), Cloud::Public, "organizations");
    let mut good = creds(&token);
    good.client_secret = Some("app-secret-123".into());
    validator(&fake).validate(&spec, &good, None).await.unwrap();
    assert_eq!(fake.last_token_form().unwrap()["client_secret"], "app-secret-123");

    let mut bad = creds(&token);
    bad.client_secret = Some("wrong-secret-456".into());
    let failure = validator(&fake).validate(&spec, &bad, None).await.unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Configuration, reason::INVALID_CLIENT)
    );
}

#[tokio::test]
async fn unknown_client_id_is_unauthorized_client() {
    let (fake, token) = fake_with_environment().await;
    let mut other = creds(&token);
    other.client_id = "44444444-4444-4444-4444-444444444444".into();
    let failure = validator(&fake)
        .validate(&spec(&fake.url(), Cloud::Public, "organizations"), &other, None)
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Configuration, reason::UNAUTHORIZED_CLIENT)
    );
}

#[tokio::test]
async fn tenant_goes_into_the_token_path() {
    let fake = FakeProviders::start().await;
    fake.add_dynamics_environment(
        DynamicsEnvironment::new(ORG, USER, CLIENT_ID).with_tenant("contoso.onmicrosoft.us"),
    );
    let token = fake.issue_dynamics_token(ORG);
    let ok = validator(&fake)
        .validate(
            &spec(&fake.url(), Cloud::GccHigh, "contoso.onmicrosoft.us"),
            &creds(&token),
            None,
        )
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    let failure = validator(&fake)
        .validate(
            &spec(&fake.url(), Cloud::GccHigh, "fabrikam.onmicrosoft.us"),
            &creds(&token),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Configuration, reason::INVALID_REQUEST)
    );
}

#[tokio::test]
async fn revoked_token_is_permanent() {
    let (fake, token) = fake_with_environment().await;
    fake.revoke(&token);
    let failure = validate(&fake, &token).await.unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Permanent, reason::TOKEN_REVOKED)
    );
    assert!(failure.message.contains("AADSTS50173"), "{}", failure.message);
    assert!(!failure.message.contains("Trace ID"), "{}", failure.message);
    assert_eq!(fake.stats().whoami_requests, 0);
}

#[tokio::test]
async fn entra_invalid_grant_codes_are_permanent() {
    let cases = [
        (
            Fault::entra_error(400, "invalid_grant", 70008, None),
            reason::TOKEN_EXPIRED,
        ),
        (
            Fault::entra_error(400, "invalid_grant", 700082, None),
            reason::TOKEN_EXPIRED,
        ),
        (
            Fault::entra_error(400, "invalid_grant", 50173, None),
            reason::TOKEN_REVOKED,
        ),
        (
            Fault::entra_error(400, "invalid_grant", 50057, None),
            reason::TOKEN_REVOKED,
        ),
        (
            Fault::entra_error(400, "interaction_required", 50076, None),
            reason::INTERACTION_REQUIRED,
        ),
        (
            Fault::entra_error(400, "invalid_grant", 50079, Some("basic_action")),
            reason::INTERACTION_REQUIRED,
        ),
        (
            Fault::entra_error(400, "invalid_grant", 65001, Some("consent_required")),
            reason::CONSENT_REQUIRED,
        ),
        (
            Fault::entra_error(400, "consent_required", 65001, None),
            reason::CONSENT_REQUIRED,
        ),
    ];
    for (fault, expected) in cases {
        let failure = failure_for(fault.clone()).await;
        assert_eq!(
            (failure.kind, failure.reason),
            (FailureKind::Permanent, expected),
            "{}",
            fault.body
        );
    }
}

#[tokio::test]
async fn entra_configuration_errors() {
    let cases = [
        (
            Fault::entra_error(401, "invalid_client", 7000215, None),
            reason::INVALID_CLIENT,
        ),
        (
            Fault::entra_error(400, "unauthorized_client", 700016, None),
            reason::UNAUTHORIZED_CLIENT,
        ),
        (
            Fault::entra_error(400, "invalid_scope", 70011, None),
            reason::INVALID_SCOPE,
        ),
        (
            Fault::entra_error(400, "invalid_request", 90002, None),
            reason::INVALID_REQUEST,
        ),
    ];
    for (fault, expected) in cases {
        let failure = failure_for(fault.clone()).await;
        assert_eq!(
            (failure.kind, failure.reason),
            (FailureKind::Configuration, expected),
            "{}",
            fault.body
        );
    }
}

#[tokio::test]
async fn entra_transient_errors() {
    let cases = [
        Fault::entra_error(400, "temporarily_unavailable", 50196, None),
        Fault::entra_error(400, "server_error", 90033, None),
        Fault::entra_error(500, "invalid_grant", 70008, None),
        Fault::status(FaultTarget::EntraToken, 500, ""),
        Fault::status(FaultTarget::EntraToken, 429, "").header("Retry-After", "12"),
        Fault::html(FaultTarget::EntraToken, 502),
        Fault::malformed_json(FaultTarget::EntraToken),
        Fault::oversized(FaultTarget::EntraToken, 64 * 1024),
        Fault::hang(FaultTarget::EntraToken),
    ];
    for fault in cases {
        let failure = failure_for(fault.clone()).await;
        assert_eq!(
            (failure.kind, failure.reason),
            (FailureKind::Transient, reason::PROVIDER_UNAVAILABLE),
            "{fault:?}: {}",
            failure.message
        );
    }
}

#[tokio::test]
async fn service_unavailable_honours_retry_after() {
    let failure =
        failure_for(Fault::status(FaultTarget::EntraToken, 503, "").header("Retry-After", "9")).await;
    assert!(failure.is_transient());
    assert_eq!(failure.retry_after, Some(Duration::from_secs(9)));
}

#[tokio::test]
async fn whoami_failures_are_classified_and_carry_the_new_refresh_token() {
    let failure = failure_for(Fault::status(
        FaultTarget::WhoAmI,
        403,
        r#"{"error":{"code":"0x80072560","message":"The user is not a member of the organization."}}"#,
    ))
    .await;
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Configuration, reason::ENVIRONMENT_ACCESS_DENIED)
    );
    assert!(
        failure.rotated_refresh_token.is_some(),
        "Entra already issued a new refresh token"
    );

    for fault in [
        Fault::status(FaultTarget::WhoAmI, 503, "").header("Retry-After", "5"),
        Fault::hang(FaultTarget::WhoAmI),
        Fault::malformed_json(FaultTarget::WhoAmI),
        Fault::html(FaultTarget::WhoAmI, 200),
    ] {
        let failure = failure_for(fault.clone()).await;
        assert_eq!(
            failure.kind,
            FailureKind::Transient,
            "{fault:?}: {}",
            failure.message
        );
        assert!(failure.rotated_refresh_token.is_some(), "{fault:?}");
    }
}

#[tokio::test]
async fn changed_environment_id_is_permanent() {
    let (fake, token) = fake_with_environment().await;
    let session = validate(&fake, &token).await.unwrap();
    assert!(fake.change_remote_id(ORG, "55555555-5555-5555-5555-555555555555"));
    let newest = session.rotated_refresh_token.unwrap();
    let failure = validator(&fake)
        .validate(
            &spec(&fake.url(), Cloud::Public, "organizations"),
            &creds(newest.expose_secret()),
            Some(&ORG.to_uppercase()),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Permanent, reason::ORG_ID_CHANGED)
    );
    assert!(failure.rotated_refresh_token.is_some());
}

#[tokio::test]
async fn same_environment_id_in_another_case_is_not_a_change() {
    let (fake, token) = fake_with_environment().await;
    let session = validator(&fake)
        .validate(
            &spec(&fake.url(), Cloud::Public, "organizations"),
            &creds(&token),
            Some(&ORG.to_uppercase()),
        )
        .await
        .unwrap();
    assert_eq!(session.remote_id, ORG);
}

#[tokio::test]
async fn environment_url_outside_the_cloud_fails_before_any_call() {
    let (fake, token) = fake_with_environment().await;
    for (url, cloud) in [
        ("https://contoso.crm.dynamics.com", Cloud::GccHigh),
        ("https://contoso.crm.microsoftdynamics.us", Cloud::Public),
        ("https://contoso.crm.appsplatform.us", Cloud::China),
        ("https://contoso.crm.dynamics.com", Cloud::Gcc),
    ] {
        let failure = validator(&fake)
            .validate(&spec(url, cloud, "organizations"), &creds(&token), None)
            .await
            .unwrap_err();
        assert_eq!(
            (failure.kind, failure.reason),
            (FailureKind::Configuration, reason::ENVIRONMENT_URL_NOT_IN_CLOUD),
            "{url} {cloud:?}"
        );
    }
    assert_eq!(fake.token_requests(), 0);
}

#[tokio::test]
async fn missing_dynamics_settings_is_configuration() {
    let (fake, token) = fake_with_environment().await;
    let mut spec = spec(&fake.url(), Cloud::Public, "organizations");
    spec.dynamics = None;
    let failure = validator(&fake)
        .validate(&spec, &creds(&token), None)
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Configuration, reason::DYNAMICS_SETTINGS_MISSING)
    );
}

#[tokio::test]
async fn plain_http_authority_override_off_loopback_is_refused() {
    let result = Validator::new(ValidatorConfig {
        entra_authority_override: Some("http://login.microsoftonline.com".into()),
        hosts: connection_operator::providers::rules::HostPolicy {
            allow_loopback: true,
            ..Default::default()
        },
        ..ValidatorConfig::default()
    });
    assert!(result.is_err());
    assert!(
        Validator::new(ValidatorConfig {
            entra_authority_override: Some("http://[::1]:8089".into()),
            hosts: connection_operator::providers::rules::HostPolicy {
                allow_loopback: true,
                ..Default::default()
            },
            ..ValidatorConfig::default()
        })
        .is_ok()
    );
}
