//! Pure rules: which URLs may be called, login hosts, Entra authorities and Dataverse domains per
//! cloud, endpoint URLs, and the Salesforce response signature. No I/O.

use base64::Engine as _;
use url::{Host, Url};

use super::{Failure, reason};
use crate::api::{Cloud, ConnectionSpec, DynamicsSpec, Provider};

/// Salesforce Production login host.
pub const SALESFORCE_PRODUCTION_LOGIN: &str = "https://login.salesforce.com";
/// Salesforce Sandbox login host.
pub const SALESFORCE_SANDBOX_LOGIN: &str = "https://test.salesforce.com";

/// Text a provider returned (a user name, an ID) as it may be shown in a status, an event or a
/// terminal: control characters (ANSI escapes) and bidirectional-override characters removed, at most
/// 256 characters.
pub fn display_text(raw: &str) -> String {
    raw.chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        })
        .take(256)
        .collect()
}

/// True for 127.0.0.1 (any 127/8 address), [::1] and `localhost`.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// May a request (carrying a token) go to this URL? https, or plain http on a loopback host (tests).
pub fn is_allowed_transport(url: &Url) -> bool {
    match url.scheme() {
        "https" => url.host().is_some(),
        "http" => is_loopback(url),
        _ => false,
    }
}

/// `<name>.my.salesforce.com` and every My Domain below it (`…--uat.sandbox.my.salesforce.com`,
/// `….develop.my.salesforce.com`, `….scratch.my.salesforce.com`).
pub const SALESFORCE_MY_DOMAIN: &str = "my.salesforce.com";

/// Where the operator may send credentials (refresh tokens, client secrets, access tokens).
///
/// Built in: the Salesforce login hosts and My Domains, the Entra ID authorities and the Dataverse
/// domains of every cloud. Anything else only when the operator was told (`--allow-provider-domain`),
/// and loopback hosts only with `--allow-loopback-providers` (tests and local demos). Without this,
/// whoever may create a Connection could point it at a host they control (or at
/// `https://169.254.169.254`, `https://kubernetes.default.svc`) and have the operator send that
/// namespace's credentials there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostPolicy {
    /// Extra hosts or domains: the host itself and every host below it.
    pub extra_domains: Vec<String>,
    /// Loopback hosts (127.0.0.0/8, [::1], localhost), over http or https.
    pub allow_loopback: bool,
}

pub use super::reason::PROVIDER_HOST_NOT_ALLOWED;

impl HostPolicy {
    fn builtin(host: &str) -> bool {
        let entra = CLOUDS.iter().any(|c| {
            Url::parse(entra_authority(*c))
                .ok()
                .and_then(|u| u.host_str().map(|h| h.eq_ignore_ascii_case(host)))
                .unwrap_or(false)
        });
        [SALESFORCE_PRODUCTION_LOGIN, SALESFORCE_SANDBOX_LOGIN]
            .iter()
            .any(|u| {
                u.strip_prefix("https://")
                    .is_some_and(|h| h.eq_ignore_ascii_case(host))
            })
            || host_in_domain(host, SALESFORCE_MY_DOMAIN)
            || entra
            || CLOUDS.iter().any(|c| host_fits_cloud(host, *c))
    }

    fn extra(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.extra_domains.iter().any(|d| {
            let d = d
                .trim()
                .trim_start_matches("*.")
                .trim_end_matches('.')
                .to_ascii_lowercase();
            !d.is_empty() && (host == d || host_in_domain(&host, &d))
        })
    }

    /// May credentials be sent to `url`? https to a built-in or extra host; loopback (http or
    /// https) only when allowed. `Err` says why not.
    pub fn check(&self, url: &Url) -> Result<(), String> {
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if is_loopback(url) {
            return if self.allow_loopback && matches!(url.scheme(), "http" | "https") {
                Ok(())
            } else {
                Err(format!(
                    "{host} is a loopback host; the operator sends credentials there only with --allow-loopback-providers (tests)"
                ))
            };
        }
        if url.scheme() != "https" {
            return Err(format!("{url} is not https"));
        }
        if Self::builtin(host) || self.extra(host) {
            Ok(())
        } else {
            Err(format!(
                "{host} is not a Salesforce, Entra ID or Dataverse host (login.salesforce.com, test.salesforce.com, *.{SALESFORCE_MY_DOMAIN}, the clouds' login and Dataverse domains); the operator sends credentials nowhere else unless its administrator adds the domain (--allow-provider-domain, Helm value providerHosts.extraDomains)"
            ))
        }
    }

    /// [`HostPolicy::check`] as a configuration failure naming `what` (e.g. `spec.salesforce.loginUrl`).
    pub fn require(&self, url: &Url, what: &str) -> Result<(), Failure> {
        self.check(url)
            .map_err(|why| Failure::configuration(PROVIDER_HOST_NOT_ALLOWED, format!("{what}: {why}")))
    }
}

/// When the connection names a host of its own (a My Domain login URL, a Dataverse environment URL),
/// the field and host: when such a host stays unreachable, a typo is likelier than an outage.
/// `None` for the fixed login hosts (login.salesforce.com, test.salesforce.com).
pub fn own_host(spec: &ConnectionSpec) -> Option<(&'static str, String)> {
    let (field, raw) = match (&spec.salesforce, &spec.dynamics) {
        (_, Some(d)) => ("spec.dynamics.environmentUrl", d.environment_url.as_str()),
        (Some(sf), None) => ("spec.salesforce.loginUrl", sf.login_url.as_deref()?),
        (None, None) => return None,
    };
    let host = Url::parse(raw).ok()?.host_str()?.to_ascii_lowercase();
    let fixed = [SALESFORCE_PRODUCTION_LOGIN, SALESFORCE_SANDBOX_LOGIN]
        .iter()
        .any(|u| u.strip_prefix("https://") == Some(host.as_str()));
    (!fixed).then_some((field, host))
}

/// Parses a base URL from the spec (`what` names it in the message) and keeps only its origin
/// (scheme, host, port): `https://acme.my.salesforce.com/` → `https://acme.my.salesforce.com`.
pub fn parse_base_url(raw: &str, what: &str) -> Result<Url, Failure> {
    let url = Url::parse(raw.trim()).map_err(|e| {
        Failure::configuration(
            reason::INVALID_URL,
            format!("{what} {raw:?} is not a valid URL: {e}"),
        )
    })?;
    if !is_allowed_transport(&url) {
        return Err(Failure::configuration(
            reason::INVALID_URL,
            format!(
                "{what} {raw:?} must be an https:// URL (plain http is accepted only for 127.0.0.1, [::1] and localhost)"
            ),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Failure::configuration(
            reason::INVALID_URL,
            format!("{what} must not contain user information"),
        ));
    }
    let mut origin = url.clone();
    origin.set_path("");
    origin.set_query(None);
    origin.set_fragment(None);
    Ok(origin)
}

/// `https://host[:port]` without a trailing slash.
pub fn origin_string(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_string()
}

/// The Salesforce login base: `spec.salesforce.loginUrl`, or login.salesforce.com (Production) /
/// test.salesforce.com (Sandbox).
pub fn salesforce_login_base(spec: &ConnectionSpec, hosts: &HostPolicy) -> Result<Url, Failure> {
    if let Some(login) = spec.salesforce.as_ref().and_then(|s| s.login_url.as_deref()) {
        let url = parse_base_url(login, "spec.salesforce.loginUrl")?;
        hosts.require(&url, "spec.salesforce.loginUrl")?;
        return Ok(url);
    }
    let default = match spec.provider {
        Provider::SalesforceSandbox => SALESFORCE_SANDBOX_LOGIN,
        _ => SALESFORCE_PRODUCTION_LOGIN,
    };
    Ok(Url::parse(default).expect("constant URL"))
}

/// `{login}/services/oauth2/token`.
pub fn salesforce_token_url(login: &Url) -> Url {
    let mut url = login.clone();
    url.set_path("/services/oauth2/token");
    url
}

/// The Entra ID authority of a cloud.
pub fn entra_authority(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Public | Cloud::Gcc => "https://login.microsoftonline.com",
        Cloud::GccHigh | Cloud::Dod => "https://login.microsoftonline.us",
        Cloud::China => "https://login.chinacloudapi.cn",
    }
}

/// The Dataverse domain suffix of a cloud (environment hosts must be strictly below it).
pub fn dataverse_domain(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Public => "dynamics.com",
        Cloud::Gcc => "crm9.dynamics.com",
        Cloud::GccHigh => "microsoftdynamics.us",
        Cloud::Dod => "appsplatform.us",
        Cloud::China => "dynamics.cn",
    }
}

/// The name of a cloud as written in manifests.
pub fn cloud_name(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Public => "Public",
        Cloud::Gcc => "GCC",
        Cloud::GccHigh => "GCCHigh",
        Cloud::Dod => "DoD",
        Cloud::China => "China",
    }
}

const CLOUDS: [Cloud; 5] = [
    Cloud::Gcc,
    Cloud::Public,
    Cloud::GccHigh,
    Cloud::Dod,
    Cloud::China,
];

fn host_in_domain(host: &str, domain: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host.strip_suffix(domain)
        .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
}

/// Does an environment host belong to the cloud? (`*.crm9.dynamics.com` also fits Public: same authority.)
pub fn host_fits_cloud(host: &str, cloud: Cloud) -> bool {
    host_in_domain(host, dataverse_domain(cloud))
}

/// The most specific cloud whose domain the host is in, if any (for the "did you mean" hint).
pub fn cloud_of_host(host: &str) -> Option<Cloud> {
    CLOUDS.into_iter().find(|cloud| host_fits_cloud(host, *cloud))
}

/// The environment URL's origin, checked against the cloud. Loopback URLs (when the host policy
/// allows them: test mode) and extra allowed domains skip the check. A mismatch is a
/// [`reason::ENVIRONMENT_URL_NOT_IN_CLOUD`] configuration failure.
pub fn dynamics_environment_base(dynamics: &DynamicsSpec, hosts: &HostPolicy) -> Result<Url, Failure> {
    let url = parse_base_url(&dynamics.environment_url, "spec.dynamics.environmentUrl")?;
    if is_loopback(&url) {
        hosts.require(&url, "spec.dynamics.environmentUrl")?;
        return Ok(url);
    }
    let host = url.host_str().unwrap_or_default();
    if host_fits_cloud(host, dynamics.cloud) || hosts.extra(host) {
        return Ok(url);
    }
    let cloud = cloud_name(dynamics.cloud);
    let hint = match cloud_of_host(host) {
        Some(other) => format!(
            "; it looks like a {} environment: set spec.dynamics.cloud: {}",
            cloud_name(other),
            cloud_name(other)
        ),
        None => String::new(),
    };
    Err(Failure::configuration(
        reason::ENVIRONMENT_URL_NOT_IN_CLOUD,
        format!(
            "environment URL host {host} is not in the {cloud} cloud's domain (*.{}){hint}",
            dataverse_domain(dynamics.cloud)
        ),
    ))
}

/// `{authority}/{tenant}/oauth2/v2.0/token` (the tenant as one escaped path segment).
pub fn entra_token_url(authority: &Url, tenant: &str) -> Url {
    let mut url = authority.clone();
    url.set_path("");
    url.path_segments_mut()
        .expect("http(s) URLs have a path")
        .clear()
        .extend([tenant, "oauth2", "v2.0", "token"]);
    url
}

/// The delegated scope for an environment: `{environmentUrl}/user_impersonation`.
pub fn dynamics_scope(environment: &Url) -> String {
    format!("{}/user_impersonation", origin_string(environment))
}

/// `{environmentUrl}/api/data/v9.2/WhoAmI`.
pub fn whoami_url(environment: &Url) -> Url {
    let mut url = environment.clone();
    url.set_path("/api/data/v9.2/WhoAmI");
    url
}

/// Parses a Salesforce identity URL `https://<host>/id/<orgId>/<userId>` into (URL, org ID, user ID).
pub fn parse_salesforce_identity_url(raw: &str) -> Option<(Url, String, String)> {
    let url = Url::parse(raw).ok()?;
    let segments: Vec<&str> = url.path_segments()?.filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["id", org, user] if is_salesforce_id(org) && is_salesforce_id(user) => {
            let (org, user) = (org.to_string(), user.to_string());
            Some((url, org, user))
        }
        _ => None,
    }
}

/// Real IDs are 15 or 18 alphanumerics; accept any short alphanumeric (fakes, future formats).
fn is_salesforce_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Same Salesforce record ID? 15-character IDs are case-sensitive; 18-character ones add a
/// case-insensitive checksum, so compare on the first 15 characters when the lengths differ.
pub fn same_salesforce_id(a: &str, b: &str) -> bool {
    if a.len() == b.len() {
        return a == b;
    }
    a.len() >= 15 && b.len() >= 15 && a[..15] == b[..15]
}

/// Same Dynamics organization ID (a GUID; case-insensitive, braces ignored)?
pub fn same_guid(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim_matches(|c| c == '{' || c == '}').to_ascii_lowercase();
    norm(a) == norm(b)
}

/// Salesforce token response `signature`: Base64 HMAC-SHA256 of `id` + `issued_at`, keyed with the
/// client secret. Constant-time comparison; a missing or undecodable signature does not verify.
pub fn salesforce_signature_valid(
    id: &str,
    issued_at: &str,
    signature: Option<&str>,
    client_secret: &str,
) -> bool {
    let Some(signature) = signature else {
        return false;
    };
    let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, client_secret.as_bytes());
    let message = format!("{id}{issued_at}");
    ring::hmac::verify(&key, message.as_bytes(), &tag).is_ok()
}

/// Computes a Salesforce-style signature (used by tests and the fake providers' documentation).
pub fn salesforce_signature(id: &str, issued_at: &str, client_secret: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, client_secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{id}{issued_at}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_hosts_are_the_ones_a_user_typed() {
        let mut spec = ConnectionSpec::new("t", crate::api::Provider::SalesforceProduction, "s");
        assert_eq!(own_host(&spec), None, "the default login host");
        spec.salesforce = Some(crate::api::SalesforceSpec {
            login_url: Some("https://login.salesforce.com".into()),
        });
        assert_eq!(own_host(&spec), None);
        spec.salesforce = Some(crate::api::SalesforceSpec {
            login_url: Some("https://acme.my.salesforec.com".into()),
        });
        assert_eq!(
            own_host(&spec),
            Some(("spec.salesforce.loginUrl", "acme.my.salesforec.com".into()))
        );
    }

    /// Loopback allowed, as the tests' fake providers need.
    const TEST_HOSTS: HostPolicy = HostPolicy {
        extra_domains: Vec::new(),
        allow_loopback: true,
    };

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn credentials_go_only_to_provider_hosts() {
        let strict = HostPolicy::default();
        for ok in [
            "https://login.salesforce.com",
            "https://TEST.salesforce.com",
            "https://acme.my.salesforce.com",
            "https://acme--uat.sandbox.my.salesforce.com",
            "https://login.microsoftonline.us",
            "https://login.chinacloudapi.cn",
            "https://contoso.crm.dynamics.com",
            "https://contoso.crm.microsoftdynamics.us",
        ] {
            assert!(strict.check(&url(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "https://169.254.169.254",
            "https://kubernetes.default.svc",
            "https://evil.example",
            "https://my.salesforce.com.evil.example",
            "https://evilmy.salesforce.com",
            "https://salesforce.com",
            "http://acme.my.salesforce.com",
            "https://127.0.0.1:8089",
            "http://localhost:9",
            "http://[::1]:9",
        ] {
            let why = strict.check(&url(bad)).unwrap_err();
            assert!(!why.is_empty(), "{bad}");
        }
        assert!(
            strict
                .check(&url("http://127.0.0.1:1"))
                .unwrap_err()
                .contains("--allow-loopback-providers")
        );
        let failure = strict
            .require(&url("https://evil.example"), "spec.salesforce.loginUrl")
            .unwrap_err();
        assert_eq!(failure.reason, PROVIDER_HOST_NOT_ALLOWED);
        assert_eq!(failure.kind, FailureKind::Configuration);
        assert!(
            failure
                .message
                .starts_with("spec.salesforce.loginUrl: evil.example is not"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn extra_domains_and_loopback_are_opt_in() {
        let hosts = HostPolicy {
            extra_domains: vec!["*.corp.example".into(), "10.244.0.1".into()],
            allow_loopback: true,
        };
        for ok in [
            "https://corp.example",
            "https://proxy.corp.example",
            "https://10.244.0.1:8443",
            "http://127.0.0.1:9",
            "https://[::1]:9",
        ] {
            assert!(hosts.check(&url(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "https://corp.example.evil",
            "https://10.244.0.10",
            "http://proxy.corp.example",
        ] {
            assert!(hosts.check(&url(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_login_url_outside_salesforce_is_refused_before_any_call() {
        for login in ["https://169.254.169.254", "https://kubernetes.default.svc"] {
            let failure = salesforce_login_base(
                &spec(Provider::SalesforceProduction, Some(login)),
                &HostPolicy::default(),
            )
            .unwrap_err();
            assert_eq!(failure.reason, PROVIDER_HOST_NOT_ALLOWED, "{login}");
        }
        let failure = dynamics_environment_base(
            &dynamics("http://127.0.0.1:9", Cloud::Public),
            &HostPolicy::default(),
        )
        .unwrap_err();
        assert_eq!(failure.reason, PROVIDER_HOST_NOT_ALLOWED);
    }
    use crate::api::{SalesforceSpec, SecretRef};
    use crate::providers::FailureKind;

    fn spec(provider: Provider, login: Option<&str>) -> ConnectionSpec {
        ConnectionSpec {
            team: "t".into(),
            provider,
            salesforce: login.map(|l| SalesforceSpec {
                login_url: Some(l.into()),
            }),
            dynamics: None,
            credentials_secret_ref: SecretRef { name: "s".into() },
            display_name: None,
            description: None,
            paused: false,
            agreement: None,
        }
    }

    fn dynamics(url: &str, cloud: Cloud) -> DynamicsSpec {
        DynamicsSpec {
            environment_url: url.into(),
            cloud,
            tenant_id: "organizations".into(),
        }
    }

    #[test]
    fn salesforce_login_hosts() {
        let cases = [
            (
                Provider::SalesforceProduction,
                None,
                "https://login.salesforce.com/services/oauth2/token",
            ),
            (
                Provider::SalesforceSandbox,
                None,
                "https://test.salesforce.com/services/oauth2/token",
            ),
            (
                Provider::SalesforceSandbox,
                Some("https://acme--uat.sandbox.my.salesforce.com/"),
                "https://acme--uat.sandbox.my.salesforce.com/services/oauth2/token",
            ),
            (
                Provider::SalesforceProduction,
                Some("https://acme.my.salesforce.com/some/path?q=1#f"),
                "https://acme.my.salesforce.com/services/oauth2/token",
            ),
            (
                Provider::SalesforceProduction,
                Some("http://127.0.0.1:8089"),
                "http://127.0.0.1:8089/services/oauth2/token",
            ),
            (
                Provider::SalesforceProduction,
                Some("http://[::1]:9/"),
                "http://[::1]:9/services/oauth2/token",
            ),
            (
                Provider::SalesforceProduction,
                Some("http://localhost:9"),
                "http://localhost:9/services/oauth2/token",
            ),
        ];
        for (provider, login, expected) in cases {
            let base = salesforce_login_base(&spec(provider, login), &TEST_HOSTS).unwrap();
            assert_eq!(salesforce_token_url(&base).as_str(), expected, "{login:?}");
        }
    }

    #[test]
    fn display_text_drops_escapes_and_bidi_overrides() {
        assert_eq!(display_text("ops@acme.example"), "ops@acme.example");
        assert_eq!(display_text("\u{1b}[31madmin\u{1b}[0m@x"), "[31madmin[0m@x");
        assert_eq!(display_text("evil\u{202E}gpj.exe\u{2066}"), "evilgpj.exe");
        assert_eq!(display_text("a\nb\tc"), "abc");
        assert_eq!(display_text(&"x".repeat(1000)).len(), 256);
    }

    #[test]
    fn plain_http_is_refused_except_on_loopback() {
        for login in [
            "http://login.salesforce.com",
            "http://10.0.0.1:8089",
            "http://127.0.0.1.nip.io",
            "ftp://login.salesforce.com",
            "not a url",
            "https://user:pw@acme.my.salesforce.com",
        ] {
            let failure =
                salesforce_login_base(&spec(Provider::SalesforceProduction, Some(login)), &TEST_HOSTS)
                    .unwrap_err();
            assert_eq!(failure.kind, FailureKind::Configuration, "{login}");
            assert_eq!(failure.reason, reason::INVALID_URL, "{login}");
        }
    }

    #[test]
    fn authorities_by_cloud() {
        assert_eq!(
            entra_authority(Cloud::Public),
            "https://login.microsoftonline.com"
        );
        assert_eq!(entra_authority(Cloud::Gcc), "https://login.microsoftonline.com");
        assert_eq!(
            entra_authority(Cloud::GccHigh),
            "https://login.microsoftonline.us"
        );
        assert_eq!(entra_authority(Cloud::Dod), "https://login.microsoftonline.us");
        assert_eq!(entra_authority(Cloud::China), "https://login.chinacloudapi.cn");
    }

    #[test]
    fn entra_token_url_and_scope() {
        let authority = Url::parse(entra_authority(Cloud::GccHigh)).unwrap();
        assert_eq!(
            entra_token_url(&authority, "contoso.onmicrosoft.us").as_str(),
            "https://login.microsoftonline.us/contoso.onmicrosoft.us/oauth2/v2.0/token"
        );
        let local = parse_base_url("http://127.0.0.1:8089/", "x").unwrap();
        assert_eq!(
            entra_token_url(&local, "organizations").as_str(),
            "http://127.0.0.1:8089/organizations/oauth2/v2.0/token"
        );
        let env = dynamics_environment_base(
            &dynamics("https://contoso.crm.dynamics.com/main.aspx", Cloud::Public),
            &TEST_HOSTS,
        )
        .unwrap();
        assert_eq!(
            dynamics_scope(&env),
            "https://contoso.crm.dynamics.com/user_impersonation"
        );
        assert_eq!(
            whoami_url(&env).as_str(),
            "https://contoso.crm.dynamics.com/api/data/v9.2/WhoAmI"
        );
    }

    #[test]
    fn environment_domains_by_cloud() {
        let fits = [
            ("https://contoso.crm.dynamics.com", Cloud::Public),
            ("https://contoso.crm4.dynamics.com", Cloud::Public),
            ("https://contoso.crm9.dynamics.com", Cloud::Gcc),
            ("https://contoso.crm9.dynamics.com", Cloud::Public),
            ("https://contoso.crm.microsoftdynamics.us", Cloud::GccHigh),
            ("https://contoso.crm.appsplatform.us", Cloud::Dod),
            ("https://contoso.crm.dynamics.cn", Cloud::China),
            ("https://CONTOSO.CRM.DYNAMICS.COM.", Cloud::Public),
        ];
        for (url, cloud) in fits {
            assert!(
                dynamics_environment_base(&dynamics(url, cloud), &TEST_HOSTS).is_ok(),
                "{url} in {cloud:?}"
            );
        }
        let mismatches = [
            ("https://contoso.crm.dynamics.com", Cloud::Gcc, Some("Public")),
            ("https://contoso.crm.dynamics.com", Cloud::GccHigh, Some("Public")),
            (
                "https://contoso.crm.microsoftdynamics.us",
                Cloud::Public,
                Some("GCCHigh"),
            ),
            (
                "https://contoso.crm.microsoftdynamics.us",
                Cloud::Dod,
                Some("GCCHigh"),
            ),
            ("https://contoso.crm.appsplatform.us", Cloud::GccHigh, Some("DoD")),
            ("https://contoso.crm9.dynamics.com", Cloud::China, Some("GCC")),
            ("https://contoso.crm.dynamics.cn", Cloud::Public, Some("China")),
            ("https://dynamics.com", Cloud::Public, None),
            ("https://evil-dynamics.com", Cloud::Public, None),
            ("https://contoso.dynamics.com.evil.io", Cloud::Public, None),
        ];
        for (url, cloud, hint) in mismatches {
            let failure = dynamics_environment_base(&dynamics(url, cloud), &TEST_HOSTS).unwrap_err();
            assert_eq!(failure.kind, FailureKind::Configuration, "{url}");
            assert_eq!(failure.reason, reason::ENVIRONMENT_URL_NOT_IN_CLOUD, "{url}");
            match hint {
                Some(h) => assert!(
                    failure.message.contains(&format!("cloud: {h}")),
                    "{}",
                    failure.message
                ),
                None => assert!(!failure.message.contains("looks like"), "{}", failure.message),
            }
        }
    }

    #[test]
    fn loopback_environment_skips_domain_check_but_plain_http_elsewhere_is_refused() {
        assert!(
            dynamics_environment_base(&dynamics("http://127.0.0.1:9", Cloud::GccHigh), &TEST_HOSTS).is_ok()
        );
        assert!(dynamics_environment_base(&dynamics("http://[::1]:9", Cloud::China), &TEST_HOSTS).is_ok());
        let failure = dynamics_environment_base(
            &dynamics("http://contoso.crm.dynamics.com", Cloud::Public),
            &TEST_HOSTS,
        )
        .unwrap_err();
        assert_eq!(failure.reason, reason::INVALID_URL);
    }

    #[test]
    fn identity_url_parsing() {
        let (url, org, user) = parse_salesforce_identity_url(
            "https://login.salesforce.com/id/00Dxx0000001gPLEAY/005xx000001SwiUAAS",
        )
        .unwrap();
        assert_eq!(url.host_str(), Some("login.salesforce.com"));
        assert_eq!(org, "00Dxx0000001gPLEAY");
        assert_eq!(user, "005xx000001SwiUAAS");
        for bad in [
            "https://login.salesforce.com/id/00Dxx0000001gPLEAY",
            "https://login.salesforce.com/id/00D!x/005xx000001SwiUAAS",
            "https://login.salesforce.com/services/00Dxx0000001gPLEAY/005xx000001SwiUAAS",
            "not a url",
        ] {
            assert!(parse_salesforce_identity_url(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn salesforce_ids_compare_on_fifteen_characters() {
        assert!(same_salesforce_id("00Dxx0000001gPLEAY", "00Dxx0000001gPL"));
        assert!(same_salesforce_id("00Dxx0000001gPL", "00Dxx0000001gPL"));
        assert!(!same_salesforce_id("00Dxx0000001gPLEAY", "00Dxx0000001gPM"));
        assert!(
            !same_salesforce_id("00Dxx0000001gpl", "00Dxx0000001gPL"),
            "15-char IDs are case-sensitive"
        );
        assert!(same_guid("{AAAA-bbbb}", "aaaa-BBBB"));
        assert!(!same_guid("aaaa", "aaab"));
    }

    #[test]
    fn signature_check() {
        // Test vector computed independently (Python: base64(hmac.new(key, msg, sha256).digest())).
        let id = "https://login.salesforce.com/id/00Dxx0000001gPLEAY/005xx000001SwiUAAS";
        let issued_at = "1278448832702";
        let expected = "rkdRxOS8DxYZjv4HuvPgHf9w9Q3POX474WgA8oIc/3A=";
        assert_eq!(salesforce_signature(id, issued_at, "s3cr3t"), expected);
        assert!(salesforce_signature_valid(
            id,
            issued_at,
            Some(expected),
            "s3cr3t"
        ));
        assert!(!salesforce_signature_valid(
            id,
            issued_at,
            Some(expected),
            "other"
        ));
        assert!(!salesforce_signature_valid(
            id,
            "1278448832703",
            Some(expected),
            "s3cr3t"
        ));
        assert!(!salesforce_signature_valid(id, issued_at, None, "s3cr3t"));
        assert!(!salesforce_signature_valid(
            id,
            issued_at,
            Some("not base64!"),
            "s3cr3t"
        ));
        assert!(!salesforce_signature_valid(id, issued_at, Some(""), "s3cr3t"));
    }
}
