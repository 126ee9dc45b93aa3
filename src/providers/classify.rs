//! Pure failure classification: an HTTP status, headers and (capped) body from a provider endpoint in,
//! a [`Failure`] out. Decisions use the OAuth `error` field, Entra's structured `suberror` and
//! `error_codes`, Salesforce's `errorCode` and the HTTP status — never free-text descriptions alone.
//! Anything unrecognised is transient: a connection is never deactivated on a guess.

use std::time::Duration;

use super::{Failure, FailureKind, reason};

/// The endpoint that answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Salesforce `POST /services/oauth2/token`.
    SalesforceToken,
    /// Salesforce identity URL (`GET /id/<org>/<user>`).
    SalesforceIdentity,
    /// Entra ID `POST /{tenant}/oauth2/v2.0/token`.
    EntraToken,
    /// Dataverse `GET /api/data/v9.2/WhoAmI`.
    DataverseWhoAmI,
}

impl Endpoint {
    /// Short human name for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Endpoint::SalesforceToken => "Salesforce token endpoint",
            Endpoint::SalesforceIdentity => "Salesforce identity URL",
            Endpoint::EntraToken => "Entra ID token endpoint",
            Endpoint::DataverseWhoAmI => "Dataverse WhoAmI",
        }
    }

    fn is_token(self) -> bool {
        matches!(self, Endpoint::SalesforceToken | Endpoint::EntraToken)
    }
}

/// The structured parts of a provider's error body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// OAuth `error` (RFC 6749 §5.2), e.g. `invalid_grant`.
    pub error: Option<String>,
    /// Entra `suberror`, e.g. `consent_required`, `basic_action`.
    pub suberror: Option<String>,
    /// Entra `error_codes` (the AADSTS numbers), e.g. `[70008]`.
    pub error_codes: Vec<i64>,
    /// Salesforce REST `errorCode` (`[{"errorCode": …}]`) or Dataverse `error.code`.
    pub error_code: Option<String>,
    /// The first line of the human description, shortened (for messages only, never for decisions).
    pub description: Option<String>,
}

/// Parses a JSON error body; `None` when the body is not JSON (an HTML page, garbage, empty).
pub fn parse_error_body(body: &[u8]) -> Option<ErrorBody> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut out = ErrorBody::default();
    // Salesforce REST errors come as an array of {message, errorCode}.
    let object = match &value {
        serde_json::Value::Array(items) => items.first()?.as_object()?,
        serde_json::Value::Object(map) => map,
        _ => return None,
    };
    match object.get("error") {
        Some(serde_json::Value::String(code)) => out.error = code_field(code),
        // Dataverse / OData: {"error": {"code": "0x80072560", "message": "…"}}.
        Some(serde_json::Value::Object(inner)) => {
            out.error_code = inner.get("code").and_then(|c| c.as_str()).and_then(code_field);
            out.description = inner
                .get("message")
                .and_then(|m| m.as_str())
                .and_then(short_description);
        }
        _ => {}
    }
    out.suberror = object
        .get("suberror")
        .and_then(|s| s.as_str())
        .and_then(code_field);
    out.error_codes = object
        .get("error_codes")
        .and_then(|c| c.as_array())
        .map(|codes| codes.iter().filter_map(|c| c.as_i64()).collect())
        .unwrap_or_default();
    if out.error_code.is_none() {
        out.error_code = object
            .get("errorCode")
            .and_then(|c| c.as_str())
            .and_then(code_field);
    }
    if out.description.is_none() {
        out.description = ["error_description", "message"]
            .iter()
            .find_map(|k| object.get(*k).and_then(|d| d.as_str()))
            .and_then(short_description);
    }
    Some(out)
}

/// A machine code is only kept (and shown) if it looks like one.
fn code_field(code: &str) -> Option<String> {
    let ok = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    ok.then(|| code.to_string())
}

/// First line of a description, without Entra's per-request trace/correlation IDs and timestamps
/// (which would change the status message on every attempt), at most 160 characters.
pub fn short_description(text: &str) -> Option<String> {
    let mut line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    for marker in [" Trace ID:", " Correlation ID:", " Timestamp:"] {
        if let Some(at) = line.find(marker) {
            line = line[..at].trim_end();
        }
    }
    let mut short: String = line.chars().filter(|c| !c.is_control()).take(160).collect();
    if line.chars().count() > 160 {
        short.push('…');
    }
    (!short.is_empty()).then_some(short)
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (relative to `now`). Capped at one hour.
pub fn parse_retry_after(value: &str, now: k8s_openapi::jiff::Timestamp) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(3600);
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(CAP));
    }
    let at = k8s_openapi::jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let delta = at.as_millisecond().saturating_sub(now.as_millisecond());
    Some(Duration::from_millis(delta.max(0) as u64).min(CAP))
}

/// OAuth `error` values and Salesforce `errorCode`s that mean "try again later".
const TRANSIENT_CODES: [&str; 7] = [
    "temporarily_unavailable",
    "server_error",
    "rate_limit_exceeded",
    "request_limit_exceeded",
    "login_rate_exceeded",
    "server_unavailable",
    "service_unavailable",
];

/// Entra `error_codes` of an expired (rather than revoked) refresh token: 70008 (expired / inactivity),
/// 700082 (expired due to inactivity), 700084 (SPA token lifetime).
const ENTRA_EXPIRED_CODES: [i64; 3] = [70008, 700082, 700084];

/// Entra `suberror`s that mean a user must sign in interactively again.
const ENTRA_INTERACTION_SUBERRORS: [&str; 5] = [
    "basic_action",
    "additional_action",
    "message_only",
    "user_password_expired",
    "bad_token",
];

/// Classifies a non-success HTTP answer from `endpoint` at `host`.
pub fn classify_response(
    endpoint: Endpoint,
    host: &str,
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Failure {
    let parsed = parse_error_body(body);
    let err = parsed.clone().unwrap_or_default();
    let codes: Vec<String> = [&err.error, &err.error_code]
        .into_iter()
        .flatten()
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let answered = answer_text(endpoint, host, status, &err, parsed.is_some());

    // 1. Rate limits and provider-declared outages, whatever the status.
    if codes.iter().any(|c| TRANSIENT_CODES.contains(&c.as_str())) || status == 429 || status >= 500 {
        return Failure::transient(format!("provider unavailable: {answered}")).with_retry_after(retry_after);
    }

    // 2. OAuth errors (token endpoints; the identity endpoints do not speak OAuth errors, but a
    //    provider could, so look at them everywhere).
    if let Some(error) = err.error.as_deref().map(str::to_ascii_lowercase) {
        let suberror = err.suberror.as_deref().unwrap_or_default();
        let (kind, why, reason) = match error.as_str() {
            "invalid_grant" if suberror == "consent_required" => (
                FailureKind::Permanent,
                "consent is required for the app",
                reason::CONSENT_REQUIRED,
            ),
            "invalid_grant" if ENTRA_INTERACTION_SUBERRORS.contains(&suberror) => (
                FailureKind::Permanent,
                "the user must sign in interactively again",
                reason::INTERACTION_REQUIRED,
            ),
            "invalid_grant" if err.error_codes.iter().any(|c| ENTRA_EXPIRED_CODES.contains(c)) => (
                FailureKind::Permanent,
                "the refresh token has expired",
                reason::TOKEN_EXPIRED,
            ),
            "invalid_grant" => (
                FailureKind::Permanent,
                "the refresh token was revoked or expired, or the user may no longer use it",
                reason::TOKEN_REVOKED,
            ),
            "interaction_required" | "login_required" => (
                FailureKind::Permanent,
                "the user must sign in interactively again",
                reason::INTERACTION_REQUIRED,
            ),
            "consent_required" => (
                FailureKind::Permanent,
                "consent is required for the app",
                reason::CONSENT_REQUIRED,
            ),
            "inactive_user" => (
                FailureKind::Permanent,
                "the user is inactive",
                reason::USER_INACTIVE,
            ),
            "inactive_org" => (
                FailureKind::Permanent,
                "the org is inactive",
                reason::ORG_INACTIVE,
            ),
            "invalid_client" | "invalid_client_id" | "invalid_client_credentials" => (
                FailureKind::Configuration,
                "the client_id or client_secret in the Secret is wrong",
                reason::INVALID_CLIENT,
            ),
            "unauthorized_client" | "invalid_app_access" => (
                FailureKind::Configuration,
                "the client (connected app / app registration) is not allowed to use this grant or user",
                reason::UNAUTHORIZED_CLIENT,
            ),
            "invalid_scope" => (
                FailureKind::Configuration,
                "the requested scope is not allowed for the client (check the app's API permissions)",
                reason::INVALID_SCOPE,
            ),
            "unsupported_grant_type" => (
                FailureKind::Configuration,
                "the refresh-token flow is not enabled for the client",
                reason::UNSUPPORTED_GRANT_TYPE,
            ),
            "invalid_request" => (
                FailureKind::Configuration,
                "the provider rejected the request (check the tenant, login URL and client settings)",
                reason::INVALID_REQUEST,
            ),
            _ => {
                return Failure::transient(format!("unrecognised error, will retry: {answered}"))
                    .with_retry_after(retry_after);
            }
        };
        let lead = match kind {
            FailureKind::Permanent => "Connection inactive: ",
            _ => "",
        };
        let fix = match kind {
            FailureKind::Permanent => "; re-authorize and update the Secret",
            _ => "",
        };
        return Failure::new(kind, reason, format!("{lead}{why} ({answered}){fix}"));
    }

    // 3. Dataverse 403 with a fresh token: the user is not a member of the environment or has no role.
    if endpoint == Endpoint::DataverseWhoAmI && status == 403 {
        return Failure::configuration(
            reason::ENVIRONMENT_ACCESS_DENIED,
            format!(
                "the user is not allowed into the environment (not a member, disabled, or no security role): {answered}"
            ),
        );
    }

    // 4. Anything else: not understood, so not a reason to deactivate. An identity call's 401/403
    //    (limits were handled in 1) says its access token was refused: a recheck refreshes now.
    let what = if endpoint.is_token() {
        "unexpected answer to the token grant"
    } else {
        "unexpected answer"
    };
    let mut failure =
        Failure::transient(format!("{what}, will retry: {answered}")).with_retry_after(retry_after);
    failure.access_token_refused = !endpoint.is_token() && matches!(status, 401 | 403);
    failure
}

/// A 200 answer whose body could not be used (malformed JSON, HTML, missing fields).
pub fn malformed_success(endpoint: Endpoint, host: &str, problem: &str) -> Failure {
    Failure::transient(format!(
        "provider unavailable: {} at {host} answered HTTP 200 with an unusable body ({problem})",
        endpoint.describe()
    ))
}

/// A request that got no HTTP answer: connection refused/reset, DNS, TLS, timeout, oversized body.
pub fn transport_failure(endpoint: Endpoint, host: &str, problem: &str) -> Failure {
    Failure::transient(format!(
        "provider unavailable: {} at {host}: {problem}",
        endpoint.describe()
    ))
}

fn answer_text(endpoint: Endpoint, host: &str, status: u16, err: &ErrorBody, json: bool) -> String {
    let mut text = format!("{} at {host} answered HTTP {status}", endpoint.describe());
    let codes: Vec<&str> = [
        err.error.as_deref(),
        err.suberror.as_deref(),
        err.error_code.as_deref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !codes.is_empty() {
        text.push(' ');
        text.push_str(&codes.join("/"));
    }
    if let Some(description) = &err.description {
        text.push_str(": ");
        text.push_str(description);
    } else if !json && status >= 400 {
        text.push_str(" (not a JSON error)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use Endpoint::*;

    #[test]
    fn an_identity_call_refusing_its_access_token_is_marked_for_a_refresh_now() {
        for (endpoint, status, body, refused) in [
            (Endpoint::SalesforceIdentity, 403, "Bad_OAuth_Token", true),
            (Endpoint::SalesforceIdentity, 401, "", true),
            (Endpoint::DataverseWhoAmI, 401, "", true),
            // A limit is not a refusal of the token.
            (
                Endpoint::SalesforceIdentity,
                403,
                r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
                false,
            ),
            (Endpoint::SalesforceIdentity, 503, "", false),
            (Endpoint::SalesforceToken, 401, "", false),
        ] {
            let failure = classify(endpoint, status, body);
            assert_eq!(
                failure.access_token_refused, refused,
                "{endpoint:?} {status} {body}"
            );
            if endpoint == Endpoint::SalesforceIdentity {
                assert_eq!(
                    failure.kind,
                    FailureKind::Transient,
                    "never a deactivation on its own"
                );
            }
        }
    }

    fn classify(endpoint: Endpoint, status: u16, body: &str) -> Failure {
        classify_response(endpoint, "login.example.com", status, None, body.as_bytes())
    }

    #[test]
    fn classification_table() {
        use FailureKind::*;
        let table: &[(Endpoint, u16, &str, FailureKind, &str)] = &[
            // Permanent
            (
                SalesforceToken,
                400,
                r#"{"error":"invalid_grant","error_description":"expired access/refresh token"}"#,
                Permanent,
                reason::TOKEN_REVOKED,
            ),
            (
                SalesforceToken,
                400,
                r#"{"error":"invalid_grant","error_description":"inactive user"}"#,
                Permanent,
                reason::TOKEN_REVOKED,
            ),
            (
                SalesforceToken,
                400,
                r#"{"error":"inactive_user","error_description":"user is inactive"}"#,
                Permanent,
                reason::USER_INACTIVE,
            ),
            (
                SalesforceToken,
                400,
                r#"{"error":"inactive_org"}"#,
                Permanent,
                reason::ORG_INACTIVE,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired due to inactivity. Trace ID: 1 Correlation ID: 2 Timestamp: 3","error_codes":[70008]}"#,
                Permanent,
                reason::TOKEN_EXPIRED,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"invalid_grant","error_codes":[700082]}"#,
                Permanent,
                reason::TOKEN_EXPIRED,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"invalid_grant","error_codes":[50173]}"#,
                Permanent,
                reason::TOKEN_REVOKED,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"invalid_grant","error_codes":[65001],"suberror":"consent_required"}"#,
                Permanent,
                reason::CONSENT_REQUIRED,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"invalid_grant","error_codes":[50076],"suberror":"basic_action"}"#,
                Permanent,
                reason::INTERACTION_REQUIRED,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"interaction_required","error_codes":[50079]}"#,
                Permanent,
                reason::INTERACTION_REQUIRED,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"consent_required"}"#,
                Permanent,
                reason::CONSENT_REQUIRED,
            ),
            // Configuration
            (
                SalesforceToken,
                400,
                r#"{"error":"invalid_client_id","error_description":"client identifier invalid"}"#,
                Configuration,
                reason::INVALID_CLIENT,
            ),
            (
                SalesforceToken,
                400,
                r#"{"error":"invalid_client","error_description":"invalid client credentials"}"#,
                Configuration,
                reason::INVALID_CLIENT,
            ),
            (
                EntraToken,
                401,
                r#"{"error":"invalid_client","error_codes":[7000215]}"#,
                Configuration,
                reason::INVALID_CLIENT,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"unauthorized_client","error_codes":[700016]}"#,
                Configuration,
                reason::UNAUTHORIZED_CLIENT,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"invalid_scope","error_codes":[70011]}"#,
                Configuration,
                reason::INVALID_SCOPE,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"invalid_request","error_codes":[90002]}"#,
                Configuration,
                reason::INVALID_REQUEST,
            ),
            (
                SalesforceToken,
                400,
                r#"{"error":"unsupported_grant_type"}"#,
                Configuration,
                reason::UNSUPPORTED_GRANT_TYPE,
            ),
            (
                DataverseWhoAmI,
                403,
                r#"{"error":{"code":"0x80072560","message":"The user is not a member of the organization."}}"#,
                Configuration,
                reason::ENVIRONMENT_ACCESS_DENIED,
            ),
            // Transient
            (SalesforceToken, 500, "", Transient, reason::PROVIDER_UNAVAILABLE),
            (
                SalesforceToken,
                503,
                "<html><body>Maintenance</body></html>",
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                EntraToken,
                502,
                "{not json",
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                EntraToken,
                429,
                r#"{"error":"invalid_grant"}"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                EntraToken,
                500,
                r#"{"error":"invalid_grant","error_codes":[70008]}"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"temporarily_unavailable"}"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                EntraToken,
                400,
                r#"{"error":"server_error"}"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                SalesforceToken,
                400,
                r#"{"error":"rate_limit_exceeded","error_description":"number of logins exceeded"}"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                SalesforceIdentity,
                403,
                r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                SalesforceToken,
                400,
                r#"{"error":"LOGIN_RATE_EXCEEDED"}"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                SalesforceToken,
                403,
                r#"[{"errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            // Not understood → transient, never a deactivation on a guess.
            (
                SalesforceToken,
                400,
                r#"{"error":"something_new"}"#,
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                SalesforceToken,
                404,
                "<html>Not Found</html>",
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (
                SalesforceIdentity,
                403,
                "Bad_OAuth_Token",
                Transient,
                reason::PROVIDER_UNAVAILABLE,
            ),
            (DataverseWhoAmI, 401, "", Transient, reason::PROVIDER_UNAVAILABLE),
        ];
        for (endpoint, status, body, kind, reason) in table {
            let failure = classify(*endpoint, *status, body);
            assert_eq!(
                (&failure.kind, failure.reason),
                (kind, *reason),
                "{endpoint:?} {status} {body}: {}",
                failure.message
            );
        }
    }

    #[test]
    fn free_text_alone_never_decides() {
        // A description saying "revoked" without an OAuth error code is not a revocation.
        let failure = classify(
            SalesforceToken,
            400,
            r#"{"error_description":"the token was revoked"}"#,
        );
        assert_eq!(failure.kind, FailureKind::Transient);
        let failure = classify(SalesforceToken, 400, "invalid_grant: token revoked");
        assert_eq!(failure.kind, FailureKind::Transient);
    }

    #[test]
    fn retry_after_is_carried_on_transient_failures() {
        let failure = classify_response(SalesforceToken, "h", 503, Some(Duration::from_secs(7)), b"");
        assert_eq!(failure.retry_after, Some(Duration::from_secs(7)));
        assert!(failure.is_transient());
    }

    #[test]
    fn messages_name_the_endpoint_status_and_code_but_not_trace_ids() {
        let failure = classify(
            EntraToken,
            400,
            r#"{"error":"invalid_grant","error_description":"AADSTS70008: expired.\r\nTrace ID: abc\r\nCorrelation ID: def","error_codes":[70008]}"#,
        );
        assert!(
            failure.message.starts_with("Connection inactive: "),
            "{}",
            failure.message
        );
        assert!(failure.message.contains("Entra ID token endpoint at login.example.com answered HTTP 400 invalid_grant: AADSTS70008: expired."), "{}", failure.message);
        assert!(!failure.message.contains("abc"), "{}", failure.message);
        let failure = classify(SalesforceToken, 503, "<html>down</html>");
        assert!(
            failure.message.contains("HTTP 503 (not a JSON error)"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn odd_codes_are_not_echoed() {
        let body = r#"{"error":"<script>alert(1)</script>","error_description":"x"}"#;
        let parsed = parse_error_body(body.as_bytes()).unwrap();
        assert_eq!(parsed.error, None);
    }

    #[test]
    fn short_description_trims_entra_noise_and_length() {
        assert_eq!(
            short_description(
                "AADSTS50173: The provided grant has expired. Trace ID: x Correlation ID: y Timestamp: z"
            )
            .as_deref(),
            Some("AADSTS50173: The provided grant has expired.")
        );
        let long = "a".repeat(500);
        assert_eq!(short_description(&long).unwrap().chars().count(), 161);
        assert_eq!(short_description("\n\n  "), None);
    }

    #[test]
    fn retry_after_forms() {
        let now: k8s_openapi::jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999", now), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }
}
