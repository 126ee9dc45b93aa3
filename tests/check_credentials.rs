//! `connection-operator check-credentials` end to end: the real binary against the fake providers,
//! with temp files (no cluster needed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use fake_providers::{DynamicsEnvironment, FakeProviders, Fault, FaultTarget, SalesforceOrg};

const ORG: &str = "00D000000000001AAA";
const USER: &str = "005000000000001AAA";
const USERNAME: &str = "ops@acme.example";
const CLIENT_ID: &str = "3MVG9-fake-consumer-key";
const CLIENT_SECRET: &str = "fake-consumer-secret-123";
const ENV_ID: &str = "11111111-1111-1111-1111-111111111111";
const ENV_USER: &str = "22222222-2222-2222-2222-222222222222";
const ENV_CLIENT: &str = "33333333-3333-3333-3333-333333333333";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn all(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

fn finish(output: Output) -> Run {
    Run {
        code: output.status.code().expect("exited"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs the binary off the async runtime (the fake server keeps serving on the workers).
async fn check(args: Vec<String>, envs: Vec<(&'static str, String)>, stdin: Option<String>) -> Run {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_connection-operator"));
        command
            .arg("check-credentials")
            .args(&args)
            .env("RUST_LOG", "trace");
        command.env_remove("ENTRA_AUTHORITY_OVERRIDE");
        for (k, v) in envs {
            command.env(k, v);
        }
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        match stdin {
            None => finish(command.stdin(Stdio::null()).output().unwrap()),
            Some(text) => {
                let mut child = command.stdin(Stdio::piped()).spawn().unwrap();
                child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
                finish(child.wait_with_output().unwrap())
            }
        }
    })
    .await
    .unwrap()
}

fn path_arg(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

async fn salesforce_fake() -> (FakeProviders, String) {
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(
        SalesforceOrg::new(ORG, USER, USERNAME, CLIENT_ID).with_client_secret(CLIENT_SECRET),
    );
    let token = fake.issue_salesforce_token(ORG);
    (fake, token)
}

fn salesforce_connection(login_url: &str) -> String {
    format!(
        "# The ACME org.\napiVersion: crmconnect.io/v1alpha1\nkind: Connection\nmetadata:\n  name: acme-prod\nspec:\n  team: sales-ops\n  provider: SalesforceProduction\n  salesforce:\n    loginUrl: {login_url}   # the fake\n  credentialsSecretRef:\n    name: acme-prod-credentials\n"
    )
}

/// Secret + Connection in one file, `stringData` form (like examples/).
fn combined_file(login_url: &str, refresh_token: &str) -> String {
    format!(
        "# A Salesforce Production org.\napiVersion: v1\nkind: Secret\nmetadata:\n  name: acme-prod-credentials\ntype: Opaque\nstringData:\n  client_id: \"{CLIENT_ID}\"\n  client_secret: \"{CLIENT_SECRET}\"   # consumer secret\n  refresh_token: \"{refresh_token}\"   # from the OAuth flow\n---\n{}",
        salesforce_connection(login_url)
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn assert_no_secrets(run: &Run, secrets: &[&str]) {
    let all = run.all();
    for secret in secrets {
        assert!(!all.contains(secret), "{secret:?} printed:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_salesforce_credentials_print_the_identity_and_exit_0() {
    let (fake, token) = salesforce_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let text = combined_file(&fake.url(), &token);
    let file = write(dir.path(), "acme.yaml", &text);
    let run = check(vec!["-f".into(), path_arg(&file)], vec![], None).await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout
            .contains("Credentials valid: Connection acme-prod (SalesforceProduction)"),
        "{}",
        run.all()
    );
    assert!(
        run.stdout.contains(ORG) && run.stdout.contains(USERNAME),
        "{}",
        run.all()
    );
    assert!(
        run.stdout.contains(&format!("instance URL    {}", fake.url())),
        "{}",
        run.all()
    );
    assert_no_secrets(&run, &[&token, CLIENT_SECRET]);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        text,
        "no rotation: file untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_is_written_back_into_the_string_data_of_the_combined_file() {
    let (fake, token) = salesforce_fake().await;
    fake.set_rotation(true);
    let dir = tempfile::tempdir().unwrap();
    let text = combined_file(&fake.url(), &token);
    let file = write(dir.path(), "acme.yaml", &text);
    let run = check(vec!["-f".into(), path_arg(&file)], vec![], None).await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(!fake.is_live(&token), "rotation killed the old token");
    let after = std::fs::read_to_string(&file).unwrap();
    let new_line = after
        .lines()
        .find(|l| l.trim_start().starts_with("refresh_token:"))
        .unwrap();
    let new = new_line.split('"').nth(1).unwrap().to_string();
    assert!(fake.is_live(&new), "the file holds the live token");
    assert_eq!(
        after,
        text.replace(
            &format!("  refresh_token: \"{token}\"   # from the OAuth flow\n"),
            &format!("  refresh_token: \"{new}\" # from the OAuth flow\n")
        ),
        "only the token's value changed"
    );
    assert!(
        run.stdout
            .contains("written to key refresh_token of Secret acme-prod-credentials"),
        "{}",
        run.all()
    );
    assert_no_secrets(&run, &[&token, &new, CLIENT_SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_is_written_back_base64_into_a_separate_secret_file() {
    let (fake, token) = salesforce_fake().await;
    fake.set_rotation(true);
    let dir = tempfile::tempdir().unwrap();
    let connection = write(dir.path(), "connection.yaml", &salesforce_connection(&fake.url()));
    let secret_text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: acme-prod-credentials\n  labels: {{team: sales-ops}}\ntype: Opaque\ndata:\n  # base64\n  client_id: {}\n  refresh_token: {}\n  client_secret: {}\n",
        b64(CLIENT_ID),
        b64(&token),
        b64(CLIENT_SECRET)
    );
    let secret = write(dir.path(), "secret.yaml", &secret_text);
    #[cfg(unix)]
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let run = check(
        vec!["-f".into(), path_arg(&connection), "-s".into(), path_arg(&secret)],
        vec![],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let after = std::fs::read_to_string(&secret).unwrap();
    let encoded = after
        .lines()
        .find_map(|l| l.strip_prefix("  refresh_token: "))
        .unwrap()
        .to_string();
    let new = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(&encoded)
            .unwrap(),
    )
    .unwrap();
    assert!(fake.is_live(&new));
    assert_eq!(after, secret_text.replace(&b64(&token), &encoded));
    #[cfg(unix)]
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&secret).unwrap().permissions()) & 0o777,
        0o640,
        "permissions kept"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temp files left: {leftovers:?}");
    assert_no_secrets(&run, &[&token, &new, CLIENT_SECRET]);
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_secret_file_saves_the_new_token_in_a_0600_file_and_says_the_old_one_is_dead() {
    let (fake, token) = salesforce_fake().await;
    fake.set_rotation(true);
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let connection = write(dir.path(), "connection.yaml", &salesforce_connection(&fake.url()));
    let secret_text = combined_file(&fake.url(), &token);
    // The Secret is read from a pipe: there is no file to replace.
    let run = check(
        vec![
            "-f".into(),
            path_arg(&connection),
            "-s".into(),
            "/proc/self/fd/0".into(),
        ],
        vec![("TMPDIR", path_arg(tmp.path()))],
        Some(secret_text),
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stdout.contains("Credentials valid"), "{}", run.all());
    assert!(
        run.stderr.contains("THE REFRESH TOKEN IN THE FILE IS NOW DEAD"),
        "{}",
        run.all()
    );
    let saved: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(
        run.stderr
            .contains(&format!("saved to {} (mode 0600)", saved[0].display())),
        "{}",
        run.all()
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&saved[0]).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let new = std::fs::read_to_string(&saved[0]).unwrap().trim().to_string();
    assert!(fake.is_live(&new), "the saved token is the live one");
    assert_no_secrets(&run, &[&token, &new, CLIENT_SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_exits_1_with_the_reason() {
    let (fake, token) = salesforce_fake().await;
    fake.revoke(&token);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "acme.yaml", &combined_file(&fake.url(), &token));
    let run = check(vec!["-f".into(), path_arg(&file)], vec![], None).await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stdout.contains("Credentials NOT valid"), "{}", run.all());
    assert!(
        run.stdout.contains("Permanent") && run.stdout.contains("TokenRevoked"),
        "{}",
        run.all()
    );
    assert_no_secrets(&run, &[&token, CLIENT_SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_exits_1_as_configuration() {
    let (fake, token) = salesforce_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let text = combined_file(&fake.url(), &token).replace(CLIENT_SECRET, "wrong-secret-0123");
    let file = write(dir.path(), "acme.yaml", &text);
    let run = check(vec!["-f".into(), path_arg(&file)], vec![], None).await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stdout.contains("Configuration") && run.stdout.contains("InvalidClient"),
        "{}",
        run.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_outage_exits_2() {
    let (fake, token) = salesforce_fake().await;
    fake.push_fault(Fault::status(FaultTarget::Token, 503, "").header("Retry-After", "42"));
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "acme.yaml", &combined_file(&fake.url(), &token));
    let run = check(vec!["-f".into(), path_arg(&file)], vec![], None).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(
        run.stdout.contains("Transient") && run.stdout.contains("ProviderUnavailable"),
        "{}",
        run.all()
    );
    assert!(run.stdout.contains("retry after     42s"), "{}", run.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_org_exits_1_with_org_id_changed() {
    let (fake, token) = salesforce_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "acme.yaml", &combined_file(&fake.url(), &token));
    let run = check(
        vec![
            "-f".into(),
            path_arg(&file),
            "--expected-remote-id".into(),
            "00D000000000009ZZZ".into(),
        ],
        vec![],
        None,
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stdout.contains("OrgIdChanged"), "{}", run.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_or_key_exits_1_without_calling_the_provider() {
    let (fake, token) = salesforce_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let connection_only = write(dir.path(), "connection.yaml", &salesforce_connection(&fake.url()));
    let run = check(vec!["-f".into(), path_arg(&connection_only)], vec![], None).await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stdout.contains("SecretMissing"), "{}", run.all());

    let no_client_id =
        combined_file(&fake.url(), &token).replace(&format!("  client_id: \"{CLIENT_ID}\"\n"), "");
    let file = write(dir.path(), "acme.yaml", &no_client_id);
    let run = check(vec!["-f".into(), path_arg(&file)], vec![], None).await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stdout.contains("SecretKeyMissing") && run.stdout.contains("client_id"),
        "{}",
        run.all()
    );
    assert_eq!(fake.token_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_or_invalid_files_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let run = check(
        vec!["-f".into(), path_arg(&dir.path().join("missing.yaml"))],
        vec![],
        None,
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("cannot read"), "{}", run.all());
    let file = write(dir.path(), "bad.yaml", "kind: Secret\nmetadata: [\n");
    let run = check(vec!["-f".into(), path_arg(&file)], vec![], None).await;
    assert_eq!(run.code, 1, "{}", run.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_input_is_refused_with_exit_1_instead_of_filling_memory() {
    let run = check(vec!["-f".into(), "/dev/zero".into()], vec![], None).await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.stderr.contains("/dev/zero is larger than 1024 KiB"),
        "{}",
        run.all()
    );
}

fn dynamics_file(environment_url: &str, cloud: &str, refresh_token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: contoso-credentials\ntype: Opaque\nstringData:\n  client_id: \"{ENV_CLIENT}\"\n  refresh_token: \"{refresh_token}\"\n---\napiVersion: crmconnect.io/v1alpha1\nkind: Connection\nmetadata:\n  name: contoso\nspec:\n  team: public-sector\n  provider: Dynamics365\n  dynamics:\n    environmentUrl: {environment_url}\n    cloud: {cloud}\n    tenantId: contoso.onmicrosoft.us\n  credentialsSecretRef:\n    name: contoso-credentials\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_dynamics_credentials_print_the_environment_and_keep_the_newest_token() {
    let fake = FakeProviders::start().await;
    fake.add_dynamics_environment(DynamicsEnvironment::new(ENV_ID, ENV_USER, ENV_CLIENT));
    let token = fake.issue_dynamics_token(ENV_ID);
    let dir = tempfile::tempdir().unwrap();
    let text = dynamics_file(&fake.url(), "GCCHigh", &token);
    let file = write(dir.path(), "contoso.yaml", &text);
    let run = check(
        vec![
            "-f".into(),
            path_arg(&file),
            "--entra-authority-override".into(),
            fake.url(),
        ],
        vec![],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(
        run.stdout.contains(&format!("environment ID  {ENV_ID}")),
        "{}",
        run.all()
    );
    assert!(run.stdout.contains(ENV_USER), "{}", run.all());
    assert!(run.stdout.contains("token expires"), "{}", run.all());
    let after = std::fs::read_to_string(&file).unwrap();
    assert_ne!(after, text, "Entra's new refresh token was kept");
    let new = after
        .lines()
        .find_map(|l| l.strip_prefix("  refresh_token: \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    assert!(fake.is_live(&new));
    assert_no_secrets(&run, &[&token, &new]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_url_outside_the_cloud_exits_1_before_any_call() {
    let fake = FakeProviders::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "contoso.yaml",
        &dynamics_file(
            "https://contoso.crm.dynamics.com",
            "GCCHigh",
            "0.some-refresh-token",
        ),
    );
    let run = check(
        vec!["-f".into(), path_arg(&file)],
        vec![("ENTRA_AUTHORITY_OVERRIDE", fake.url())],
        None,
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stdout.contains("EnvironmentUrlNotInCloud"), "{}", run.all());
    assert!(
        run.stdout.contains("cloud: Public"),
        "hint names the right cloud: {}",
        run.all()
    );
    assert_eq!(fake.token_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_provider_signed_by_a_test_ca_needs_the_extra_ca_bundle() {
    let pki = fake_providers::TestPki::generate(&["127.0.0.1".parse().unwrap()], &[]).unwrap();
    let fake = FakeProviders::start_https(&pki).await;
    fake.add_salesforce_org(
        SalesforceOrg::new(ORG, USER, USERNAME, CLIENT_ID).with_client_secret(CLIENT_SECRET),
    );
    let token = fake.issue_salesforce_token(ORG);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "acme.yaml", &combined_file(&fake.url(), &token));
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);

    let untrusted = check(vec!["-f".into(), path_arg(&file)], vec![], None).await;
    assert_eq!(untrusted.code, 2, "transient: {}", untrusted.all());
    assert!(untrusted.all().contains("certificate"), "{}", untrusted.all());

    let trusted = check(
        vec![
            "-f".into(),
            path_arg(&file),
            "--extra-ca-bundle".into(),
            path_arg(&ca),
        ],
        vec![],
        None,
    )
    .await;
    assert_eq!(trusted.code, 0, "{}", trusted.all());
    assert!(trusted.stdout.contains(ORG), "{}", trusted.all());

    let missing = check(
        vec!["-f".into(), path_arg(&file)],
        vec![("EXTRA_CA_BUNDLE", "/nonexistent/ca.pem".into())],
        None,
    )
    .await;
    assert_eq!(missing.code, 1, "{}", missing.all());
    assert!(
        missing.stderr.contains("/nonexistent/ca.pem") && missing.stderr.contains("No such file"),
        "{}",
        missing.all()
    );
    assert_eq!(
        fake.token_requests(),
        1,
        "only the trusted run reached the provider"
    );
}
