//! Salesforce validation against the fake Salesforce (no cluster needed).

use std::time::Duration;

use connection_operator::api::{ConnectionSpec, Provider, SalesforceSpec, SecretRef};
use connection_operator::providers::{Credentials, FailureKind, Validator, ValidatorConfig, reason};
use fake_providers::{FakeProviders, Fault, FaultTarget, SalesforceOrg};
use secrecy::{ExposeSecret, SecretString};

const ORG: &str = "00D000000000001AAA";
const USER: &str = "005000000000001AAA";
const USERNAME: &str = "ops@acme.example";
const CLIENT_ID: &str = "3MVG9-fake-consumer-key";
const CLIENT_SECRET: &str = "fake-consumer-secret-123";

fn config() -> ValidatorConfig {
    ValidatorConfig {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(700),
        max_body_bytes: 16 * 1024,
        per_host_rate: 1000,
        per_host_burst: 1000,
        hosts: connection_operator::providers::rules::HostPolicy {
            allow_loopback: true,
            ..Default::default()
        },
        ..ValidatorConfig::default()
    }
}

fn validator() -> Validator {
    Validator::new(config()).unwrap()
}

fn spec(login_url: &str) -> ConnectionSpec {
    ConnectionSpec {
        team: "sales-ops".into(),
        provider: Provider::SalesforceProduction,
        salesforce: Some(SalesforceSpec {
            login_url: Some(login_url.into()),
        }),
        dynamics: None,
        credentials_secret_ref: SecretRef {
            name: "acme-creds".into(),
        },
        display_name: None,
        description: None,
        paused: false,
        agreement: None,
    }
}

fn creds(refresh_token: &str, client_secret: Option<&str>) -> Credentials {
    Credentials {
        refresh_token: SecretString::from(refresh_token),
        client_id: CLIENT_ID.into(),
        client_secret: client_secret.map(SecretString::from),
        access_token: None,
    }
}

/// A fake with one org (with a client secret) and a live refresh token.
async fn fake_with_org(secret: Option<&str>) -> (FakeProviders, String) {
    let fake = FakeProviders::start().await;
    let mut org = SalesforceOrg::new(ORG, USER, USERNAME, CLIENT_ID);
    if let Some(secret) = secret {
        org = org.with_client_secret(secret);
    }
    fake.add_salesforce_org(org);
    let token = fake.issue_salesforce_token(ORG);
    (fake, token)
}

async fn failure_for(fault: Fault) -> connection_operator::providers::Failure {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    fake.push_fault(fault);
    validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn valid_tokens_give_org_user_and_instance() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    let session = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap();
    assert_eq!(session.remote_id, ORG);
    assert_eq!(session.user, USERNAME);
    assert_eq!(session.instance_url, fake.url());
    assert!(session.expires_at.is_none(), "Salesforce sends no expires_in");
    assert!(session.rotated_refresh_token.is_none());
    assert!(!session.access_token.expose_secret().is_empty());
    let form = fake.last_token_form().unwrap();
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["refresh_token"], token);
    assert_eq!(form["client_id"], CLIENT_ID);
    assert_eq!(form["client_secret"], CLIENT_SECRET);
    let stats = fake.stats();
    assert_eq!(
        (
            stats.salesforce_token_requests,
            stats.salesforce_identity_requests
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn without_client_secret_no_secret_is_sent_and_no_signature_is_required() {
    let (fake, token) = fake_with_org(None).await;
    let session = validator()
        .validate(&spec(&fake.url()), &creds(&token, None), Some(ORG))
        .await
        .unwrap();
    assert_eq!(session.remote_id, ORG);
    assert!(!fake.last_token_form().unwrap().contains_key("client_secret"));
}

#[tokio::test]
async fn plain_http_login_url_is_refused_before_any_call() {
    let mut spec = spec("http://test.salesforce.com");
    spec.provider = Provider::SalesforceSandbox;
    let failure = validator()
        .validate(&spec, &creds("rt-abcdef", None), None)
        .await
        .unwrap_err();
    assert_eq!(failure.kind, FailureKind::Configuration);
    assert_eq!(failure.reason, reason::INVALID_URL);
}

#[tokio::test]
async fn rotated_refresh_token_is_returned_and_the_old_one_is_dead() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    fake.set_rotation(true);
    let session = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap();
    let new = session
        .rotated_refresh_token
        .expect("rotation returns a new refresh token");
    assert_ne!(new.expose_secret(), token);
    assert!(
        !fake.is_live(&token),
        "Salesforce rotation kills the old token at once"
    );
    assert!(fake.is_live(new.expose_secret()));
    // The new one works; the old one is now a permanent failure.
    let again = validator()
        .validate(
            &spec(&fake.url()),
            &creds(new.expose_secret(), Some(CLIENT_SECRET)),
            Some(ORG),
        )
        .await
        .unwrap();
    assert_eq!(again.remote_id, ORG);
    let failure = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), Some(ORG))
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Permanent, reason::TOKEN_REVOKED)
    );
}

#[tokio::test]
async fn revoked_token_is_permanent() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    fake.revoke(&token);
    let failure = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), Some(ORG))
        .await
        .unwrap_err();
    assert_eq!(failure.kind, FailureKind::Permanent);
    assert_eq!(failure.reason, reason::TOKEN_REVOKED);
    assert!(failure.message.contains("invalid_grant"), "{}", failure.message);
    assert!(
        failure.message.starts_with("Connection inactive"),
        "{}",
        failure.message
    );
    assert_eq!(fake.stats().salesforce_identity_requests, 0);
}

#[tokio::test]
async fn inactive_user_and_org_are_permanent() {
    for (error, expected) in [
        ("inactive_user", reason::USER_INACTIVE),
        ("inactive_org", reason::ORG_INACTIVE),
    ] {
        let failure = failure_for(Fault::oauth_error(FaultTarget::Token, 400, error, "inactive")).await;
        assert_eq!((failure.kind, failure.reason), (FailureKind::Permanent, expected));
    }
}

#[tokio::test]
async fn wrong_client_secret_or_id_is_invalid_client_configuration() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    let failure = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some("wrong-secret-xyz")), None)
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Configuration, reason::INVALID_CLIENT)
    );
    let mut other_client = creds(&token, Some(CLIENT_SECRET));
    other_client.client_id = "another-app".into();
    let failure = validator()
        .validate(&spec(&fake.url()), &other_client, None)
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Configuration, reason::INVALID_CLIENT)
    );
    assert!(
        fake.is_live(&token),
        "a configuration error does not touch the token"
    );
}

#[tokio::test]
async fn bad_signature_is_permanent_and_its_rotated_token_is_not_trusted() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    fake.set_bad_signature(true);
    fake.set_rotation(true);
    let failure = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Permanent, reason::SIGNATURE_MISMATCH)
    );
    assert!(failure.rotated_refresh_token.is_none());
    assert_eq!(
        fake.stats().salesforce_identity_requests,
        0,
        "the token is not used after a mismatch"
    );
}

#[tokio::test]
async fn missing_signature_with_a_client_secret_is_a_mismatch() {
    let body = serde_json::json!({
        "access_token": "00Dx!abcdef", "instance_url": "http://127.0.0.1:1", "token_type": "Bearer",
        "id": format!("http://127.0.0.1:1/id/{ORG}/{USER}"), "issued_at": "1700000000000",
    });
    let failure = failure_for(Fault::status(FaultTarget::Token, 200, &body.to_string())).await;
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Permanent, reason::SIGNATURE_MISMATCH)
    );
    assert!(failure.message.contains("missing"), "{}", failure.message);
}

#[tokio::test]
async fn changed_org_id_is_permanent_and_carries_the_rotated_token() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    fake.set_rotation(true);
    assert!(fake.change_remote_id(ORG, "00D000000000002BBB"));
    let failure = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), Some(ORG))
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Permanent, reason::ORG_ID_CHANGED)
    );
    assert!(
        failure.message.contains("00D000000000002BBB") && failure.message.contains(ORG),
        "{}",
        failure.message
    );
    let rotated = failure
        .rotated_refresh_token
        .expect("the old token is dead: the new one must reach the caller");
    assert!(fake.is_live(rotated.expose_secret()));
}

#[tokio::test]
async fn fifteen_character_previous_org_id_matches() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    let session = validator()
        .validate(
            &spec(&fake.url()),
            &creds(&token, Some(CLIENT_SECRET)),
            Some(&ORG[..15]),
        )
        .await
        .unwrap();
    assert_eq!(session.remote_id, ORG);
}

#[tokio::test]
async fn server_errors_are_transient() {
    for status in [500, 502, 503, 504] {
        let failure = failure_for(Fault::status(FaultTarget::Token, status, "")).await;
        assert_eq!(
            (failure.kind, failure.reason),
            (FailureKind::Transient, reason::PROVIDER_UNAVAILABLE),
            "{status}"
        );
        assert!(
            failure.message.contains(&format!("HTTP {status}")),
            "{}",
            failure.message
        );
    }
}

#[tokio::test]
async fn service_unavailable_honours_retry_after() {
    let failure = failure_for(Fault::status(FaultTarget::Token, 503, "").header("Retry-After", "7")).await;
    assert!(failure.is_transient());
    assert_eq!(failure.retry_after, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn too_many_requests_is_transient_with_retry_after() {
    let failure = failure_for(
        Fault::status(FaultTarget::Token, 429, r#"{"error":"rate_limit_exceeded"}"#)
            .header("Retry-After", "30"),
    )
    .await;
    assert_eq!(failure.kind, FailureKind::Transient);
    assert_eq!(failure.retry_after, Some(Duration::from_secs(30)));
}

#[tokio::test]
async fn salesforce_rate_limit_codes_are_transient() {
    for fault in [
        Fault::oauth_error(
            FaultTarget::Token,
            400,
            "rate_limit_exceeded",
            "number of logins exceeded",
        ),
        Fault::status(FaultTarget::Token, 400, r#"{"error":"LOGIN_RATE_EXCEEDED"}"#),
        Fault::status(
            FaultTarget::SalesforceIdentity,
            403,
            r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
        ),
    ] {
        let failure = failure_for(fault.clone()).await;
        assert_eq!(
            failure.kind,
            FailureKind::Transient,
            "{fault:?}: {}",
            failure.message
        );
    }
}

#[tokio::test]
async fn hanging_provider_times_out_as_transient() {
    let failure = failure_for(Fault::hang(FaultTarget::Token)).await;
    assert_eq!(failure.kind, FailureKind::Transient);
    assert!(failure.message.contains("timed out"), "{}", failure.message);
}

#[tokio::test]
async fn a_bearer_token_echoed_by_the_identity_endpoint_never_reaches_the_message() {
    let failure = failure_for(Fault::status(
        FaultTarget::SalesforceIdentity,
        401,
        r#"[{"message":"Session expired or invalid: Authorization Bearer AT-echoed-0123456789","errorCode":"INVALID_SESSION_ID"}]"#,
    ))
    .await;
    assert!(
        !failure.message.contains("AT-echoed-0123456789"),
        "{}",
        failure.message
    );
    assert!(
        failure.message.contains("Bearer [redacted]"),
        "the provider's text is shown, scrubbed: {}",
        failure.message
    );
}

#[tokio::test]
async fn an_instance_url_that_is_not_https_is_refused() {
    let (fake, token) = fake_with_org(None).await;
    let body = serde_json::json!({
        "access_token": "00Dx!at",
        "instance_url": "javascript:alert(1)",
        "id": format!("{}/id/{ORG}/{USER}", fake.url()),
        "issued_at": "1700000000000",
        "token_type": "Bearer",
    });
    fake.push_fault(Fault::status(FaultTarget::Token, 200, &body.to_string()));
    let failure = validator()
        .validate(&spec(&fake.url()), &creds(&token, None), None)
        .await
        .unwrap_err();
    assert!(
        failure.message.contains("`instance_url` is not an https URL"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn control_and_bidi_characters_from_the_provider_never_reach_the_session() {
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(
        ORG,
        USER,
        "\u{1b}[2Jops\u{202E}@acme.example",
        CLIENT_ID,
    ));
    let token = fake.issue_salesforce_token(ORG);
    let session = validator()
        .validate(&spec(&fake.url()), &creds(&token, None), None)
        .await
        .unwrap();
    assert_eq!(session.user, "[2Jops@acme.example");
}

#[tokio::test]
async fn hanging_identity_url_times_out_as_transient() {
    let failure = failure_for(Fault::hang(FaultTarget::SalesforceIdentity)).await;
    assert_eq!(failure.kind, FailureKind::Transient);
    assert!(failure.message.contains("identity"), "{}", failure.message);
}

#[tokio::test]
async fn malformed_json_is_transient() {
    let failure = failure_for(Fault::malformed_json(FaultTarget::Token)).await;
    assert_eq!(failure.kind, FailureKind::Transient, "{}", failure.message);
    let failure = failure_for(Fault::status(FaultTarget::Token, 500, "{\"error\": ")).await;
    assert_eq!(failure.kind, FailureKind::Transient, "{}", failure.message);
}

#[tokio::test]
async fn html_error_pages_are_transient() {
    for status in [200, 500, 503] {
        let failure = failure_for(Fault::html(FaultTarget::Token, status)).await;
        assert_eq!(
            failure.kind,
            FailureKind::Transient,
            "{status}: {}",
            failure.message
        );
    }
}

#[tokio::test]
async fn oversized_body_is_refused_as_transient() {
    let failure = failure_for(Fault::oversized(FaultTarget::Token, 64 * 1024)).await;
    assert_eq!(failure.kind, FailureKind::Transient);
    assert!(failure.message.contains("larger than"), "{}", failure.message);
}

#[tokio::test]
async fn identity_failure_after_rotation_still_returns_the_new_token() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    fake.set_rotation(true);
    fake.push_fault(Fault::status(FaultTarget::SalesforceIdentity, 503, ""));
    let failure = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap_err();
    assert!(failure.is_transient());
    let rotated = failure
        .rotated_refresh_token
        .expect("new token carried on the failure");
    assert!(fake.is_live(rotated.expose_secret()));
    assert!(!fake.is_live(&token));
}

#[tokio::test]
async fn connection_refused_is_transient() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let failure = validator()
        .validate(
            &spec(&format!("http://127.0.0.1:{port}")),
            &creds("rt-abcdef", None),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Transient, reason::PROVIDER_UNAVAILABLE)
    );
    assert!(
        failure.message.contains("connection failed"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn an_hour_of_provider_outage_never_deactivates() {
    // The validator keeps no state that escalates: failure 100 is as transient as failure 1.
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    fake.push_fault(Fault::status(FaultTarget::Token, 503, "").always());
    let validator = validator();
    for _ in 0..100 {
        let failure = validator
            .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), Some(ORG))
            .await
            .unwrap_err();
        assert_eq!(failure.kind, FailureKind::Transient);
    }
    fake.clear_faults();
    assert!(
        validator
            .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), Some(ORG))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn per_host_limiter_holds_back_calls_beyond_the_burst() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    let validator = Validator::new(ValidatorConfig {
        per_host_rate: 1,
        per_host_burst: 2,
        limiter_max_wait: Duration::ZERO,
        ..config()
    })
    .unwrap();
    // One validation = token grant + identity call = the whole burst for this host.
    validator
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap();
    let failure = validator
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap_err();
    assert_eq!(
        (failure.kind, failure.reason),
        (FailureKind::Transient, reason::THROTTLED)
    );
    assert!(failure.retry_after.is_some());
    assert_eq!(
        fake.token_requests(),
        1,
        "the throttled validation never reached the provider"
    );
    // A clone shares the limiter.
    let failure = validator
        .clone()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap_err();
    assert_eq!(failure.reason, reason::THROTTLED);
}

#[tokio::test]
async fn provider_echoing_a_secret_in_an_error_is_scrubbed() {
    let (fake, token) = fake_with_org(Some(CLIENT_SECRET)).await;
    fake.push_fault(Fault::oauth_error(
        FaultTarget::Token,
        400,
        "invalid_grant",
        &format!("token {token} with secret {CLIENT_SECRET} is bad"),
    ));
    let failure = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap_err();
    assert!(!failure.message.contains(&token), "{}", failure.message);
    assert!(!failure.message.contains(CLIENT_SECRET), "{}", failure.message);
    assert!(failure.message.contains("[redacted]"), "{}", failure.message);
}

#[tokio::test]
async fn fake_is_drivable_over_its_admin_http_api_and_from_a_seed() {
    let fake = FakeProviders::start().await;
    let seed: fake_providers::Seed = serde_saphyr::from_str(&format!(
        "rotation: false\nsalesforce:\n  - orgId: {ORG}\n    userId: {USER}\n    username: {USERNAME}\n    clientId: {CLIENT_ID}\n    refreshTokens: [seeded-refresh-token]\n"
    ))
    .unwrap();
    fake.apply_seed(&seed);
    let http = reqwest::Client::new();
    let admin = |path: &str| format!("{}/_admin/{path}", fake.url());
    let post = |path: &str, body: serde_json::Value| http.post(admin(path)).json(&body).send();

    let session = validator()
        .validate(&spec(&fake.url()), &creds("seeded-refresh-token", None), None)
        .await
        .unwrap();
    assert_eq!(session.remote_id, ORG);

    // Another org with a secret, a token issued over HTTP, rotation on.
    let other = "00D000000000003CCC";
    let status = post(
        "salesforce/orgs",
        serde_json::json!({"orgId": other, "userId": USER, "username": "b@x", "clientId": CLIENT_ID, "clientSecret": CLIENT_SECRET}),
    )
    .await
    .unwrap()
    .status();
    assert!(status.is_success(), "{status}");
    let issued: serde_json::Value = post("tokens", serde_json::json!({"remoteId": other}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = issued["refreshToken"].as_str().unwrap().to_string();
    post("rotation", serde_json::json!({"enabled": true}))
        .await
        .unwrap();
    let session = validator()
        .validate(&spec(&fake.url()), &creds(&token, Some(CLIENT_SECRET)), None)
        .await
        .unwrap();
    assert_eq!(session.remote_id, other);
    assert!(session.rotated_refresh_token.is_some());
    post("rotation", serde_json::json!({"enabled": false}))
        .await
        .unwrap();

    // Scripted fault over HTTP.
    post(
        "faults",
        serde_json::json!({"target": "Token", "status": 503, "headers": [["Retry-After", "4"]]}),
    )
    .await
    .unwrap();
    let failure = validator()
        .validate(&spec(&fake.url()), &creds("seeded-refresh-token", None), None)
        .await
        .unwrap_err();
    assert_eq!(failure.retry_after, Some(Duration::from_secs(4)));

    // Sandbox refresh and revocation over HTTP.
    let changed: serde_json::Value = post(
        "change-id",
        serde_json::json!({"from": ORG, "to": "00D000000000004DDD"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(changed["changed"], true);
    let failure = validator()
        .validate(
            &spec(&fake.url()),
            &creds("seeded-refresh-token", None),
            Some(ORG),
        )
        .await
        .unwrap_err();
    assert_eq!(failure.reason, reason::ORG_ID_CHANGED);
    let revoked: serde_json::Value = post(
        "revoke",
        serde_json::json!({"refreshToken": "seeded-refresh-token"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(revoked["revoked"], true);
    let failure = validator()
        .validate(&spec(&fake.url()), &creds("seeded-refresh-token", None), None)
        .await
        .unwrap_err();
    assert_eq!(failure.reason, reason::TOKEN_REVOKED);

    let stats: fake_providers::Stats = http
        .get(admin("stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, fake.stats());
    assert_eq!(stats.salesforce_token_requests, 5);
    http.delete(admin("stats")).send().await.unwrap();
    assert_eq!(fake.token_requests(), 0);
}
