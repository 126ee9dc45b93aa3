//! No token, secret or signature ever reaches the logs: capture every tracing event (TRACE, all
//! crates: ours, reqwest, hyper) during successful and failing validations of both providers, and
//! grep for the secret values. A test binary of its own: tracing's per-thread subscribers and
//! callsite caches are only reliable without other tests running alongside.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connection_operator::api::{Cloud, ConnectionSpec, DynamicsSpec, Provider, SalesforceSpec, SecretRef};
use connection_operator::providers::{Credentials, Validator, ValidatorConfig};
use fake_providers::{DynamicsEnvironment, FakeProviders, Fault, FaultTarget, SalesforceOrg};
use secrecy::{ExposeSecret, SecretString};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn spec(provider: Provider, url: &str) -> ConnectionSpec {
    ConnectionSpec {
        team: "t".into(),
        provider,
        salesforce: (provider != Provider::Dynamics365).then(|| SalesforceSpec {
            login_url: Some(url.into()),
        }),
        dynamics: (provider == Provider::Dynamics365).then(|| DynamicsSpec {
            environment_url: url.into(),
            cloud: Cloud::Public,
            tenant_id: "organizations".into(),
        }),
        credentials_secret_ref: SecretRef { name: "creds".into() },
        display_name: None,
        description: None,
        paused: false,
        agreement: None,
    }
}

fn creds(refresh_token: &str, client_id: &str, client_secret: &str) -> Credentials {
    Credentials {
        refresh_token: SecretString::from(refresh_token),
        client_id: client_id.into(),
        client_secret: Some(SecretString::from(client_secret)),
        access_token: Some(SecretString::from("old-access-token-0123456789")),
    }
}

#[tokio::test]
async fn logs_never_contain_tokens_or_secrets() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    const SF_SECRET: &str = "sf-consumer-secret-0123456789";
    const DYN_SECRET: &str = "dyn-client-secret-0123456789";
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(
        SalesforceOrg::new(
            "00D000000000001AAA",
            "005000000000001AAA",
            "ops@acme.example",
            "sf-client",
        )
        .with_client_secret(SF_SECRET),
    );
    fake.add_dynamics_environment(
        DynamicsEnvironment::new(
            "11111111-1111-1111-1111-111111111111",
            "22222222-2222-2222-2222-222222222222",
            "dyn-client",
        )
        .with_client_secret(DYN_SECRET),
    );
    fake.set_rotation(true);
    let sf_token = fake.issue_salesforce_token("00D000000000001AAA");
    let dyn_token = fake.issue_dynamics_token("11111111-1111-1111-1111-111111111111");
    let validator = Validator::new(ValidatorConfig {
        request_timeout: Duration::from_millis(500),
        entra_authority_override: Some(fake.url()),
        hosts: connection_operator::providers::rules::HostPolicy {
            allow_loopback: true,
            ..Default::default()
        },
        ..ValidatorConfig::default()
    })
    .unwrap();
    let sf = spec(Provider::SalesforceProduction, &fake.url());
    let dy = spec(Provider::Dynamics365, &fake.url());
    let mut secrets = vec![
        sf_token.clone(),
        dyn_token.clone(),
        SF_SECRET.to_string(),
        DYN_SECRET.to_string(),
        "old-access-token-0123456789".to_string(),
    ];

    // Successes (with rotation).
    let s1 = validator
        .validate(&sf, &creds(&sf_token, "sf-client", SF_SECRET), None)
        .await
        .unwrap();
    let s2 = validator
        .validate(&dy, &creds(&dyn_token, "dyn-client", DYN_SECRET), None)
        .await
        .unwrap();
    tracing::info!(?s1, ?s2, "sessions");
    let sf_new = s1
        .rotated_refresh_token
        .clone()
        .unwrap()
        .expose_secret()
        .to_string();
    let dyn_new = s2
        .rotated_refresh_token
        .clone()
        .unwrap()
        .expose_secret()
        .to_string();
    secrets.extend([
        sf_new.clone(),
        dyn_new.clone(),
        s1.access_token.expose_secret().to_string(),
        s2.access_token.expose_secret().to_string(),
    ]);

    // Failures: revoked (old Salesforce token), wrong secrets, bad signature, an echoing provider,
    // a timeout, a 503, a WhoAmI failure after Entra rotated.
    let failures = vec![
        validator
            .validate(&sf, &creds(&sf_token, "sf-client", SF_SECRET), None)
            .await,
        validator
            .validate(&sf, &creds(&sf_new, "sf-client", "wrong-secret-0123456789"), None)
            .await,
        validator
            .validate(
                &dy,
                &creds(&dyn_new, "dyn-client", "wrong-secret-0123456789"),
                None,
            )
            .await,
        {
            fake.set_bad_signature(true);
            let r = validator
                .validate(&sf, &creds(&sf_new, "sf-client", SF_SECRET), None)
                .await;
            fake.set_bad_signature(false);
            r
        },
        {
            let echo = format!("echo {sf_new} {SF_SECRET}");
            fake.push_fault(Fault::oauth_error(
                FaultTarget::Token,
                400,
                "invalid_grant",
                &echo,
            ));
            validator
                .validate(&sf, &creds(&sf_new, "sf-client", SF_SECRET), None)
                .await
        },
        {
            fake.push_fault(Fault::hang(FaultTarget::Token));
            validator
                .validate(&sf, &creds(&sf_new, "sf-client", SF_SECRET), None)
                .await
        },
        {
            fake.push_fault(Fault::status(FaultTarget::Token, 503, "").header("Retry-After", "3"));
            validator
                .validate(&dy, &creds(&dyn_new, "dyn-client", DYN_SECRET), None)
                .await
        },
        {
            fake.push_fault(Fault::status(FaultTarget::WhoAmI, 403, ""));
            validator
                .validate(&dy, &creds(&dyn_new, "dyn-client", DYN_SECRET), None)
                .await
        },
    ];
    for result in failures {
        let failure = result.expect_err("each case fails");
        tracing::warn!(?failure, %failure, "failure");
        if let Some(rotated) = &failure.rotated_refresh_token {
            secrets.push(rotated.expose_secret().to_string());
        }
        for secret in &secrets {
            assert!(!failure.message.contains(secret.as_str()), "{}", failure.message);
        }
    }

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("provider request"),
        "debug logs were captured:\n{logs}"
    );
    assert!(logs.contains("refresh failed"), "{logs}");
    assert!(logs.contains("identity check failed"), "{logs}");
    assert!(logs.contains("credentials valid"), "{logs}");
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "secret {secret:?} leaked into logs:\n{logs}"
        );
    }
}
