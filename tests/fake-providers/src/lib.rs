//! Fake Salesforce, Entra ID and Dataverse servers on loopback, for connection-operator's tests and
//! demo. **Test support only: never a dependency of the operator.**
//!
//! One server (one port) plays all three roles, implementing the documented request and response
//! shapes:
//!
//! | role | endpoint |
//! |---|---|
//! | Salesforce token grant | `POST /services/oauth2/token` (form: `grant_type=refresh_token`, `refresh_token`, `client_id`, `client_secret`) → `access_token`, `instance_url`, `id`, `issued_at`, `signature` (+ `refresh_token` when rotation is on) |
//! | Salesforce identity | `GET /id/{orgId}/{userId}` (bearer) → `organization_id`, `user_id`, `username`, … |
//! | Entra ID token grant | `POST /{tenant}/oauth2/v2.0/token` (form: `grant_type=refresh_token`, `refresh_token`, `client_id`, `scope={env}/user_impersonation offline_access`) → `access_token`, `refresh_token` (always new), `expires_in`, … |
//! | Dataverse WhoAmI | `GET /api/data/v9.2/WhoAmI` (bearer) → `OrganizationId`, `UserId`, `BusinessUnitId` |
//! | Salesforce job discover | `GET /services/data/v62.0/query?q=<SOQL>` (bearer) → `totalSize`, `done`, `records`, `nextRecordsUrl` |
//! | Salesforce next page | `GET /services/data/v62.0/query/{locator}-{offset}` (bearer) |
//! | Salesforce job read / write | `GET` / `PATCH /services/data/v62.0/sobjects/CrmJob__c/{Id}` (bearer; `If-Unmodified-Since`) |
//! | Dataverse job discover | `GET /api/data/v9.2/crmc_crmjobs?$select=…&$filter=…&$orderby=createdon asc` (bearer; `Prefer: odata.maxpagesize=N`) → `value`, `@odata.nextLink` |
//! | record counts (the example worker) | Salesforce `GET /services/data/v62.0/query?q=SELECT COUNT() FROM X` → `totalSize` 42; Dataverse `GET /api/data/v9.2/{set}/$count` → `42` |
//! | Dataverse job read / write | `GET` / `PATCH /api/data/v9.2/crmc_crmjobs({guid})` (bearer; `If-Match`, `Prefer: return=representation`) |
//!
//! So a Connection points at the fake with `spec.salesforce.loginUrl: <url>` or
//! `spec.dynamics.environmentUrl: <url>` and the validator's Entra authority override `<url>`.
//! Salesforce's `instance_url` and `id` host are the fake's own URL.
//!
//! Errors follow the providers: unknown or revoked refresh tokens → 400 `invalid_grant` (Entra adds
//! `error_codes` `[50173]`); wrong client ID → 400 `invalid_client_id` (Salesforce) / 400
//! `unauthorized_client` (Entra); wrong or missing client secret (when the org/environment has one) →
//! 400 `invalid_client` / 401 `invalid_client`; wrong scope → 400 `invalid_scope`; unknown bearer →
//! 403 `Bad_OAuth_Token` (Salesforce identity) / 401 (WhoAmI).
//!
//! # CRM job queues
//!
//! Each org / environment has a job queue ([`FakeProviders::seed_jobs`]); the access token of a
//! data request says whose. Salesforce custom object `CrmJob__c`: `Id` (18 characters, `a0B…`),
//! `Status__c` (`Holding`, `Waiting`, `Claimed`, `Running`, `Completed`, `Failed`, `Aborted`),
//! `Type__c`, `Processor__c` (`Cloud` is the operator's), `ClaimedBy__c`, `ClaimExpires__c`,
//! `Attempt__c` (a JSON number), `Started__c`, `Ended__c`, `Result__c`, `CreatedDate`,
//! `LastModifiedDate`; date-times `2026-11-28T09:55:03.000+0000` (whole seconds). Dataverse table
//! `crmc_crmjob` (entity set `crmc_crmjobs`, key `crmc_crmjobid`, a GUID): `crmc_status` (choice 1
//! Holding … 7 Aborted, [`JobStatus::code`]), `crmc_type`, `crmc_processor`, `crmc_claimedby`,
//! `crmc_claimexpires`, `crmc_attempt`, `crmc_started`, `crmc_ended`, `crmc_result`, `createdon`,
//! `modifiedon`, `versionnumber`; date-times `2026-11-28T09:55:03Z`; `@odata.etag` `W/"<version>"`.
//!
//! - **Discover** parses just enough of the query: Salesforce needs `SELECT <fields> FROM CrmJob__c
//!   WHERE Processor__c = 'Cloud' AND (Status__c IN ('Holding','Waiting') OR (Status__c = 'Claimed'
//!   AND ClaimExpires__c < <datetime>)) [AND Type__c IN ('a','b')] ORDER BY CreatedDate [LIMIT n]`
//!   (else 400 `MALFORMED_QUERY`; an unknown field `INVALID_FIELD`); Dataverse a `$filter` with
//!   `crmc_processor eq 'Cloud'`, `crmc_status eq 1` / `2` / `3`, `crmc_claimexpires lt <datetime>`
//!   and optionally `crmc_type eq '…'` terms (else 400 `0x80060888`), `$select` of known columns,
//!   `$orderby` `createdon [asc]`. Both answer the Cloud jobs that are Holding or Waiting, or Claimed
//!   with `claim_expires < bound`, of the types, in creation order. Salesforce pages (default 2000,
//!   [`FakeProviders::set_job_page_size`]) come from a snapshot taken at the first request (an
//!   unknown locator: 400 `INVALID_QUERY_LOCATOR`); Dataverse pages (the smaller of `Prefer:
//!   odata.maxpagesize` (default 5000) and the set page size; `Preference-Applied` echoes the
//!   header) re-run the filter after the `$skiptoken`'s last row, as a paging cookie does.
//! - **Write**: `PATCH` a subset of the writable fields (`Status__c`, `ClaimedBy__c`,
//!   `ClaimExpires__c`, `Attempt__c`, `Started__c`, `Ended__c`, `Result__c` / the `crmc_` columns
//!   of the same names); an unknown one → 400 `INVALID_FIELD` / `0x80060888`, a bad status → 400
//!   `INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST` / `0x8004431a`. Salesforce `If-Unmodified-Since`
//!   (RFC 1123): a record modified in a later second → 412 `PRECONDITION_FAILED`; else 204.
//!   Dataverse `If-Match` (`W/"v"` or `*`): a mismatch → 412 `0x80060882`; else 204 with
//!   `OData-EntityId`, or 200 with the row and `ETag` under `Prefer: return=representation`. A
//!   write sets the modified time to now and raises the version; check and write are atomic. A
//!   missing record → 404 `NOT_FOUND` / `0x80040217` (the fake never upserts).
//! - **Read**: `GET` one record → all fields (nulls where unset), 404 as above.
//! - Unknown or expired bearer ([`FakeProviders::expire_access_tokens`]) → 401 `INVALID_SESSION_ID`
//!   (Salesforce) / 401 with an empty body (Dataverse). Salesforce answers carry `Sforce-Limit-Info:
//!   api-usage=N/M` (N counts the org's data requests; [`FakeProviders::set_api_usage`]); at N ≥ M →
//!   403 `REQUEST_LIMIT_EXCEEDED`. [`FakeProviders::throttle_data`] makes the next requests 429 with
//!   `Retry-After`. Faults: [`FaultTarget::SalesforceData`], [`FaultTarget::DataverseData`],
//!   [`FaultTarget::JobApi`] (both), [`FaultTarget::Any`]. Every answer has a `Date` header (hyper's;
//!   the client's server clock).
//!
//! # Controls
//!
//! From Rust, through [`FakeProviders`] (state behind `Arc<Mutex<…>>`), or over HTTP on the same port
//! (JSON bodies, camelCase fields — the same types as the Rust API):
//!
//! | Rust | admin HTTP |
//! |---|---|
//! | [`FakeProviders::add_salesforce_org`] | `POST /_admin/salesforce/orgs` [`SalesforceOrg`] |
//! | [`FakeProviders::issue_refresh_token`] | `POST /_admin/tokens` `{"remoteId": "...", "refreshToken": "optional fixed value"}` → `{"refreshToken": "..."}` |
//! | [`FakeProviders::add_dynamics_environment`] | `POST /_admin/dynamics/environments` [`DynamicsEnvironment`] |
//! | [`FakeProviders::revoke`] | `POST /_admin/revoke` `{"refreshToken": "..."}` → `{"revoked": true}` |
//! | [`FakeProviders::set_rotation`] | `POST /_admin/rotation` `{"enabled": true}` (Salesforce refresh token rotation) |
//! | [`FakeProviders::set_bad_signature`] | `POST /_admin/bad-signature` `{"enabled": true}` |
//! | [`FakeProviders::push_fault`] | `POST /_admin/faults` [`Fault`] |
//! | [`FakeProviders::clear_faults`] | `DELETE /_admin/faults` |
//! | [`FakeProviders::change_remote_id`] | `POST /_admin/change-id` `{"from": "...", "to": "..."}` (sandbox refresh) → `{"changed": true}` |
//! | [`FakeProviders::stats`] | `GET /_admin/stats` → [`Stats`] |
//! | [`FakeProviders::reset_stats`] | `DELETE /_admin/stats` |
//! | [`FakeProviders::seed_jobs`] | `POST /_admin/jobs` `{"remoteId": "...", "jobs": [`[`NewJob`]`]}` → `{"ids": [...]}` |
//! | [`FakeProviders::jobs`] | `GET /_admin/jobs/{remoteId}` → [`FakeJob`]`[]` |
//! | [`FakeProviders::job`] | `GET /_admin/jobs/{remoteId}/{id}` → [`FakeJob`] (404 if unknown) |
//! | [`FakeProviders::abort_job`] | `POST /_admin/jobs/{remoteId}/{id}/abort` → `{"aborted": true}` |
//! | [`FakeProviders::delete_job`] | `DELETE /_admin/jobs/{remoteId}/{id}` → `{"deleted": true}` |
//! | [`FakeProviders::set_job_modified`] | `POST /_admin/jobs/{remoteId}/{id}/modified` `{"modified": "2026-11-28T09:55:03Z"}` → `{"changed": true}` |
//! | [`FakeProviders::set_job_page_size`] | `POST /_admin/job-page-size` `{"pageSize": 2}` (0: the defaults) |
//! | [`FakeProviders::expire_access_tokens`] | `POST /_admin/expire-access-tokens` → `{"expired": 3}` |
//! | [`FakeProviders::set_query_delay`] | `POST /_admin/query-delay` `{"millis": 500}` |
//! | [`FakeProviders::set_count_delay`] | in-process only (a worker still running) |
//! | [`FakeProviders::set_api_usage`] | `POST /_admin/api-usage` `{"remoteId": "...", "used": 14999, "max": 15000}` → `{"changed": true}` |
//! | [`FakeProviders::throttle_data`] | `POST /_admin/throttle` `{"requests": 2, "retryAfterSecs": 7}` (0 requests: off) |
//!
//! The `fake-providers` binary (`fake-providers --listen 127.0.0.1:8089 --seed seed.yaml`) serves the
//! same thing; see [`Seed`] for the seed file.
//!
//! # https
//!
//! [`FakeProviders::start_https`] / [`FakeProviders::start_https_on`] serve the same over TLS with a
//! certificate from a throwaway test CA ([`TestPki::generate`]; the binary: `fake-providers gen-certs
//! --dir D --ip 10.88.0.1 --dns localhost`, then `--tls-cert D/tls.crt --tls-key D/tls.key`). Plain
//! http stays on loopback only; https may listen on any address (e.g. where pods reach the host).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Form, Path, State as AxState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;

mod jobs;
mod login;
mod tls;
pub use jobs::{
    CrmApi, FakeJob, HUGE_ANSWER_BYTES, HUGE_ANSWER_ENTITY_SET, HUGE_ANSWER_OBJECT, JobStatus,
    NO_SUCH_ENTITY_SET, NO_SUCH_OBJECT, NewJob, RECORD_COUNT, SeedJob, format_http_date, iso_datetime,
    parse_http_date,
};
pub use login::{DEVICE_INTERVAL_SECS, LoginDecision, LoginProvider, PendingDeviceCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
pub use tls::{ServerIdentity, TestPki};

/// A Salesforce org (and the one user whose tokens the fake issues for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SalesforceOrg {
    /// 15 or 18 alphanumeric characters, e.g. `00D000000000001AAA`.
    pub org_id: String,
    /// e.g. `005000000000001AAA`.
    pub user_id: String,
    pub username: String,
    /// The connected app's consumer key.
    pub client_id: String,
    /// The consumer secret. When set, token requests must carry it, and responses are signed with it.
    #[serde(default)]
    pub client_secret: Option<String>,
}

impl SalesforceOrg {
    pub fn new(org_id: &str, user_id: &str, username: &str, client_id: &str) -> Self {
        SalesforceOrg {
            org_id: org_id.into(),
            user_id: user_id.into(),
            username: username.into(),
            client_id: client_id.into(),
            client_secret: None,
        }
    }

    pub fn with_client_secret(mut self, secret: &str) -> Self {
        self.client_secret = Some(secret.into());
        self
    }
}

/// A Dynamics 365 environment (and the one user whose tokens the fake issues for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DynamicsEnvironment {
    /// The environment's OrganizationId (a GUID).
    pub organization_id: String,
    /// The user's systemuserid (a GUID).
    pub user_id: String,
    /// The app registration's client ID.
    pub client_id: String,
    /// When set, token requests must carry it (confidential client).
    #[serde(default)]
    pub client_secret: Option<String>,
    /// When set, token requests must use this tenant (or `organizations` / `common`).
    #[serde(default)]
    pub tenant: Option<String>,
    /// The environment URL expected in the scope; default: the fake's own URL.
    #[serde(default)]
    pub environment_url: Option<String>,
    /// The name Global Discovery shows; default "Environment N".
    #[serde(default)]
    pub friendly_name: Option<String>,
}

impl DynamicsEnvironment {
    pub fn new(organization_id: &str, user_id: &str, client_id: &str) -> Self {
        DynamicsEnvironment {
            organization_id: organization_id.into(),
            user_id: user_id.into(),
            client_id: client_id.into(),
            client_secret: None,
            tenant: None,
            environment_url: None,
            friendly_name: None,
        }
    }

    pub fn with_client_secret(mut self, secret: &str) -> Self {
        self.client_secret = Some(secret.into());
        self
    }

    pub fn with_tenant(mut self, tenant: &str) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Served at another URL (listed by Global Discovery; tokens are issued for its scope).
    pub fn with_url(mut self, url: &str) -> Self {
        self.environment_url = Some(url.into());
        self
    }

    pub fn with_name(mut self, name: &str) -> Self {
        self.friendly_name = Some(name.into());
        self
    }
}

/// Which requests a [`Fault`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FaultTarget {
    /// Both token endpoints (Salesforce and Entra).
    #[default]
    Token,
    SalesforceToken,
    EntraToken,
    /// Both identity endpoints (Salesforce identity URL and Dataverse WhoAmI).
    Identity,
    SalesforceIdentity,
    WhoAmI,
    /// Salesforce data API: job queries (first and next pages) and `sobjects` reads and writes.
    SalesforceData,
    /// Dataverse data API: `crmc_crmjobs` queries, reads and writes.
    DataverseData,
    /// Both data APIs.
    JobApi,
    /// Every provider endpoint (data APIs included).
    Any,
}

impl FaultTarget {
    fn matches(self, endpoint: FaultTarget) -> bool {
        self == endpoint
            || self == FaultTarget::Any
            || (self == FaultTarget::Token
                && matches!(endpoint, FaultTarget::SalesforceToken | FaultTarget::EntraToken))
            || (self == FaultTarget::Identity
                && matches!(endpoint, FaultTarget::SalesforceIdentity | FaultTarget::WhoAmI))
            || (self == FaultTarget::JobApi
                && matches!(endpoint, FaultTarget::SalesforceData | FaultTarget::DataverseData))
    }
}

/// A scripted answer replacing the normal one. The request is still counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(default)]
    pub target: FaultTarget,
    /// How many matching requests get this answer (default 1); ignored when `always`.
    #[serde(default = "one")]
    pub times: u32,
    /// Answer every matching request until the faults are cleared.
    #[serde(default)]
    pub always: bool,
    /// HTTP status (default 500).
    #[serde(default = "five_hundred")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    /// Content-Type (default `application/json`).
    #[serde(default = "json_type")]
    pub content_type: String,
    /// Extra headers, e.g. `[["Retry-After", "7"]]`.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Never answer (the client must time out).
    #[serde(default)]
    pub hang: bool,
}

fn one() -> u32 {
    1
}
fn five_hundred() -> u16 {
    500
}
fn json_type() -> String {
    "application/json".into()
}

impl Fault {
    /// Answer the next matching request with `status` and a JSON `body`.
    pub fn status(target: FaultTarget, status: u16, body: &str) -> Self {
        Fault {
            target,
            times: 1,
            always: false,
            status,
            body: body.into(),
            content_type: json_type(),
            headers: Vec::new(),
            hang: false,
        }
    }

    /// An OAuth error body `{"error": …, "error_description": …}`.
    pub fn oauth_error(target: FaultTarget, status: u16, error: &str, description: &str) -> Self {
        Self::status(
            target,
            status,
            &json!({"error": error, "error_description": description}).to_string(),
        )
    }

    /// An Entra-style OAuth error with `error_codes` and an optional `suberror`.
    pub fn entra_error(status: u16, error: &str, code: i64, suberror: Option<&str>) -> Self {
        let mut body = json!({
            "error": error,
            "error_description": format!("AADSTS{code}: scripted error.\r\nTrace ID: 0000\r\nCorrelation ID: 1111\r\nTimestamp: 2026-01-01 00:00:00Z"),
            "error_codes": [code],
            "timestamp": "2026-01-01 00:00:00Z",
            "trace_id": "0000",
            "correlation_id": "1111",
        });
        if let Some(sub) = suberror {
            body["suberror"] = json!(sub);
        }
        Self::status(FaultTarget::EntraToken, status, &body.to_string())
    }

    /// An HTML error page.
    pub fn html(target: FaultTarget, status: u16) -> Self {
        let mut fault = Self::status(
            target,
            status,
            "<!DOCTYPE html><html><head><title>Error</title></head><body><h1>Service Unavailable</h1></body></html>",
        );
        fault.content_type = "text/html; charset=utf-8".into();
        fault
    }

    /// A 200 whose JSON is cut off.
    pub fn malformed_json(target: FaultTarget) -> Self {
        Self::status(target, 200, r#"{"access_token": "00Dx!abc", "instance_url": "#)
    }

    /// A 200 JSON body of about `bytes` bytes.
    pub fn oversized(target: FaultTarget, bytes: usize) -> Self {
        Self::status(target, 200, &format!(r#"{{"padding":"{}"}}"#, "x".repeat(bytes)))
    }

    /// 429 with `Retry-After: retry_after_secs` and Dataverse's service protection error body.
    pub fn throttled(target: FaultTarget, retry_after_secs: u64) -> Self {
        Self::status(
            target,
            429,
            &json!({"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}).to_string(),
        )
        .header("Retry-After", &retry_after_secs.to_string())
    }

    /// Salesforce's 403 `REQUEST_LIMIT_EXCEEDED` (daily API limit) on the Salesforce data API.
    pub fn request_limit_exceeded() -> Self {
        Self::status(
            FaultTarget::SalesforceData,
            403,
            r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#,
        )
    }

    /// A 200 Salesforce query answer whose one record is malformed (a numeric `Id`, an unknown
    /// status, a text `Attempt__c`, a bad date).
    pub fn malformed_salesforce_row() -> Self {
        Self::status(
            FaultTarget::SalesforceData,
            200,
            &json!({"totalSize": 1, "done": true, "records": [{
                "attributes": {"type": "CrmJob__c", "url": "/services/data/v62.0/sobjects/CrmJob__c/12345"},
                "Id": 12345, "Type__c": null, "Status__c": "Bogus", "Attempt__c": "three",
                "LastModifiedDate": "yesterday"}]})
            .to_string(),
        )
    }

    /// A 200 Dataverse query answer whose one row is malformed (not a GUID, status 99, a text
    /// `crmc_attempt`, no etag).
    pub fn malformed_dataverse_row() -> Self {
        Self::status(
            FaultTarget::DataverseData,
            200,
            &json!({"@odata.context": "x", "value": [{
                "crmc_crmjobid": "not-a-guid", "crmc_type": 7, "crmc_status": 99, "crmc_attempt": "three"}]})
            .to_string(),
        )
    }

    /// Never answer.
    pub fn hang(target: FaultTarget) -> Self {
        let mut fault = Self::status(target, 200, "");
        fault.hang = true;
        fault
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    pub fn always(mut self) -> Self {
        self.always = true;
        self
    }
}

/// Request counters (admin calls are not counted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Stats {
    /// Salesforce + Entra token requests.
    pub token_requests: u64,
    pub salesforce_token_requests: u64,
    pub entra_token_requests: u64,
    /// Salesforce identity + Dataverse WhoAmI requests.
    pub identity_requests: u64,
    pub salesforce_identity_requests: u64,
    pub whoami_requests: u64,
    /// Salesforce token requests with a refresh token that rotation had already replaced (each
    /// one also revokes the live successor, as Salesforce does).
    pub dead_token_requests: u64,
    /// Job discover queries, both APIs: first pages and next pages.
    pub job_queries: u64,
    /// Single job reads, both APIs.
    pub job_reads: u64,
    /// Job PATCH requests, both APIs (412s included).
    pub job_patches: u64,
    /// Job PATCHes answered 412 (If-Unmodified-Since / If-Match).
    pub job_patch_conflicts: u64,
    /// Device-code polls answered `slow_down` (scripted, or faster than the interval).
    pub device_slow_downs: u64,
    /// Data API answers 429 or 403 REQUEST_LIMIT_EXCEEDED (throttling, the API limit, or a
    /// scripted fault with that status).
    pub job_api_throttled: u64,
}

/// The `--seed` file of the binary (YAML or JSON).
///
/// ```yaml
/// rotation: false
/// salesforce:
///   - orgId: 00D000000000001AAA
///     userId: 005000000000001AAA
///     username: ops@acme.example
///     clientId: demo-client
///     clientSecret: demo-secret        # optional
///     refreshTokens: [demo-sf-refresh-token]
/// dynamics:
///   - organizationId: 11111111-1111-1111-1111-111111111111
///     userId: 22222222-2222-2222-2222-222222222222
///     clientId: 33333333-3333-3333-3333-333333333333
///     refreshTokens: [demo-dyn-refresh-token]
/// jobs:                                  # CRM job queues (see SeedJob), in creation order
///   - remoteId: 00D000000000001AAA
///     type: export
///     count: 3                           # optional, default 1
///   - remoteId: 11111111-1111-1111-1111-111111111111
///     type: import
///     status: Waiting                    # optional, default Holding
///     processor: Desktop                 # optional, default Cloud
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seed {
    #[serde(default)]
    pub rotation: bool,
    #[serde(default)]
    pub salesforce: Vec<SeedSalesforceOrg>,
    #[serde(default)]
    pub dynamics: Vec<SeedDynamicsEnvironment>,
    #[serde(default)]
    pub jobs: Vec<SeedJob>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedSalesforceOrg {
    #[serde(flatten)]
    pub org: SalesforceOrg,
    #[serde(default)]
    pub refresh_tokens: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedDynamicsEnvironment {
    #[serde(flatten)]
    pub environment: DynamicsEnvironment,
    #[serde(default)]
    pub refresh_tokens: Vec<String>,
}

#[derive(Debug, Clone)]
enum Account {
    Salesforce(SalesforceOrg),
    Dynamics(DynamicsEnvironment),
}

impl Account {
    fn remote_id(&self) -> &str {
        match self {
            Account::Salesforce(org) => &org.org_id,
            Account::Dynamics(env) => &env.organization_id,
        }
    }
}

#[derive(Default)]
struct State {
    /// Accounts by a stable internal key (the ID they were registered with).
    accounts: HashMap<String, Account>,
    /// Live refresh tokens → account key.
    refresh_tokens: HashMap<String, String>,
    /// Refresh tokens rotation replaced → their successor.
    rotated_away: HashMap<String, String>,
    /// Live access tokens → account key.
    access_tokens: HashMap<String, String>,
    /// Salesforce access tokens → the refresh token they were issued with (the one the client
    /// holds after the grant): revoking it revokes them too, as Salesforce does
    /// (https://developer.salesforce.com/docs/platform/mobile-sdk/guide/oauth-revoking-tokens.html:
    /// "If a refresh token is included, Salesforce revokes it and any associated access tokens").
    /// Entra access tokens outlive a revoked refresh token until they expire.
    access_token_origin: HashMap<String, String>,
    rotation: bool,
    bad_signature: bool,
    faults: VecDeque<Fault>,
    stats: Stats,
    last_token_form: Option<BTreeMap<String, String>>,
    jobs: jobs::JobQueues,
    logins: login::Logins,
}

impl State {
    /// See [`FakeProviders::revoke`].
    fn revoke(&mut self, refresh_token: &str) -> bool {
        let live = self.refresh_tokens.remove(refresh_token).is_some();
        let dead: Vec<String> = self
            .access_token_origin
            .iter()
            .filter(|(_, origin)| origin.as_str() == refresh_token)
            .map(|(access, _)| access.clone())
            .collect();
        for access in dead {
            self.access_token_origin.remove(&access);
            self.access_tokens.remove(&access);
        }
        live
    }

    fn key_of(&self, remote_id: &str) -> Option<String> {
        if self.accounts.contains_key(remote_id) {
            return Some(remote_id.to_string());
        }
        self.accounts
            .iter()
            .find(|(_, account)| account.remote_id() == remote_id)
            .map(|(key, _)| key.clone())
    }

    fn take_fault(&mut self, endpoint: FaultTarget) -> Option<Fault> {
        let index = self.faults.iter().position(|f| f.target.matches(endpoint))?;
        let fault = self.faults[index].clone();
        if !fault.always {
            if fault.times <= 1 {
                self.faults.remove(index);
            } else {
                self.faults[index].times -= 1;
            }
        }
        Some(fault)
    }
}

struct Shared {
    url: String,
    state: Mutex<State>,
    counter: AtomicU64,
    random: std::collections::hash_map::RandomState,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn token(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut hasher = self.random.build_hasher();
        hasher.write_u64(n);
        let a = hasher.finish();
        hasher.write_u64(a);
        format!("{prefix}{n}x{a:016x}{:016x}", hasher.finish())
    }
}

/// A running fake. Dropping it stops the server.
pub struct FakeProviders {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeProviders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeProviders {
    /// Starts on 127.0.0.1 with a free port. Panics if it cannot bind (test support).
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind the fake providers on 127.0.0.1")
    }

    /// Starts on the given address (must be a loopback address), plain http.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the fake providers serve plain http on loopback addresses only (use https elsewhere)",
            ));
        }
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Self::shared(format!("http://{addr}"));
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeProviders { shared, addr, task })
    }

    /// Starts over https on 127.0.0.1 with a free port, with a server certificate from `pki` (which
    /// must name 127.0.0.1). Panics if it cannot (test support).
    pub async fn start_https(pki: &TestPki) -> Self {
        Self::start_https_on(
            "127.0.0.1:0".parse().expect("address"),
            &pki.server_identity(),
            None,
        )
        .await
        .expect("serve the fake providers over https on 127.0.0.1")
    }

    /// Starts over https on the given address (any address: e.g. a bridge gateway IP that pods
    /// reach). `public_url` is the base URL the fake announces (Salesforce `instance_url` and `id`);
    /// default `https://{bound address}`.
    pub async fn start_https_on(
        addr: SocketAddr,
        identity: &ServerIdentity,
        public_url: Option<&str>,
    ) -> std::io::Result<Self> {
        let acceptor = identity.acceptor()?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let url = public_url
            .map(|u| u.trim_end_matches('/').to_string())
            .unwrap_or_else(|| format!("https://{addr}"));
        let shared = Self::shared(url);
        let app = router(shared.clone());
        let listener = tls::TlsListener::new(listener, acceptor)?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeProviders { shared, addr, task })
    }

    fn shared(url: String) -> Arc<Shared> {
        Arc::new(Shared {
            url,
            state: Mutex::new(State::default()),
            counter: AtomicU64::new(1),
            random: std::collections::hash_map::RandomState::new(),
        })
    }

    /// The base URL: `http://127.0.0.1:PORT`, or `https://…` when served over https.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// For `spec.salesforce.loginUrl`.
    pub fn salesforce_login_url(&self) -> String {
        self.url()
    }

    /// For the validator's Entra authority override.
    pub fn entra_authority(&self) -> String {
        self.url()
    }

    /// For `spec.dynamics.environmentUrl` (unless the environment was registered with another).
    pub fn environment_url(&self) -> String {
        self.url()
    }

    /// Registers (or replaces) a Salesforce org.
    pub fn add_salesforce_org(&self, org: SalesforceOrg) {
        let mut state = self.shared.lock();
        state
            .accounts
            .insert(org.org_id.clone(), Account::Salesforce(org));
    }

    /// Registers (or replaces) a Dynamics environment.
    pub fn add_dynamics_environment(&self, environment: DynamicsEnvironment) {
        let mut state = self.shared.lock();
        state.accounts.insert(
            environment.organization_id.clone(),
            Account::Dynamics(environment),
        );
    }

    /// Issues a new refresh token for an org or environment (by its current or registered ID).
    /// Panics for an unknown ID (test support).
    pub fn issue_refresh_token(&self, remote_id: &str) -> String {
        self.add_refresh_token(remote_id, None)
            .expect("unknown org or environment ID")
    }

    /// Shorthand for [`Self::issue_refresh_token`] on a Salesforce org.
    pub fn issue_salesforce_token(&self, org_id: &str) -> String {
        self.issue_refresh_token(org_id)
    }

    /// Shorthand for [`Self::issue_refresh_token`] on a Dynamics environment.
    pub fn issue_dynamics_token(&self, organization_id: &str) -> String {
        self.issue_refresh_token(organization_id)
    }

    /// Adds a refresh token (a given value, or a new random one). `None` for an unknown ID.
    pub fn add_refresh_token(&self, remote_id: &str, value: Option<&str>) -> Option<String> {
        let token = value
            .map(str::to_string)
            .unwrap_or_else(|| self.shared.token("5Aep861.fake-rt-"));
        let mut state = self.shared.lock();
        let key = state.key_of(remote_id)?;
        state.refresh_tokens.insert(token.clone(), key);
        Some(token)
    }

    /// Revokes a refresh token, and on Salesforce the access tokens issued with it. True if it was
    /// live.
    pub fn revoke(&self, refresh_token: &str) -> bool {
        self.shared.lock().revoke(refresh_token)
    }

    /// Rotates a live refresh token as a refresh with rotation would (the old one dies; reusing it
    /// later revokes the successor): what an earlier operator version did before it saved the new
    /// one. Returns the successor, or `None` if `refresh_token` is not live.
    pub fn rotate(&self, refresh_token: &str) -> Option<String> {
        let new = self.shared.token("5Aep861.fake-rt-");
        let mut state = self.shared.lock();
        let key = state.refresh_tokens.remove(refresh_token)?;
        state.rotated_away.insert(refresh_token.to_string(), new.clone());
        state.refresh_tokens.insert(new.clone(), key);
        Some(new)
    }

    /// Is this refresh token currently accepted?
    pub fn is_live(&self, refresh_token: &str) -> bool {
        self.shared.lock().refresh_tokens.contains_key(refresh_token)
    }

    /// Salesforce refresh token rotation: each refresh returns a new refresh token and kills the old
    /// one at once. (Entra always returns a new one and keeps the old one valid.)
    pub fn set_rotation(&self, enabled: bool) {
        self.shared.lock().rotation = enabled;
    }

    /// Salesforce token responses carry a wrong `signature`.
    pub fn set_bad_signature(&self, enabled: bool) {
        self.shared.lock().bad_signature = enabled;
    }

    /// Queues a scripted answer (faults are matched in order).
    pub fn push_fault(&self, fault: Fault) {
        self.shared.lock().faults.push_back(fault);
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Changes an org's or environment's ID (a refreshed sandbox gets a new org ID); its tokens keep
    /// working and now report the new ID. True if found.
    pub fn change_remote_id(&self, from: &str, to: &str) -> bool {
        let mut state = self.shared.lock();
        let Some(key) = state.key_of(from) else {
            return false;
        };
        match state.accounts.get_mut(&key) {
            Some(Account::Salesforce(org)) => org.org_id = to.into(),
            Some(Account::Dynamics(env)) => env.organization_id = to.into(),
            None => return false,
        }
        true
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// Salesforce + Entra token requests so far.
    pub fn token_requests(&self) -> u64 {
        self.stats().token_requests
    }

    pub fn reset_stats(&self) {
        self.shared.lock().stats = Stats::default();
    }

    /// The form fields of the last token request (includes secrets: test support only).
    pub fn last_token_form(&self) -> Option<BTreeMap<String, String>> {
        self.shared.lock().last_token_form.clone()
    }

    /// The device codes waiting for the user, oldest user code first.
    pub fn device_codes(&self) -> Vec<PendingDeviceCode> {
        self.shared.lock().logins.pending()
    }

    /// What the user does with the device code `user_code` (see [`LoginDecision`]).
    pub fn decide_device_code(&self, user_code: &str, decision: LoginDecision) -> Result<(), String> {
        login::decide(&mut self.shared.lock(), user_code, decision)
    }

    /// What the user does at the next sign-in page (`…/authorize`).
    pub fn queue_authorization(&self, decision: LoginDecision) {
        self.shared.lock().logins.queue(decision);
    }

    /// Applies a seed file (jobs for an unknown remote ID are skipped).
    pub fn apply_seed(&self, seed: &Seed) {
        self.set_rotation(seed.rotation);
        for entry in &seed.salesforce {
            self.add_salesforce_org(entry.org.clone());
            for token in &entry.refresh_tokens {
                self.add_refresh_token(&entry.org.org_id, Some(token));
            }
        }
        for entry in &seed.dynamics {
            self.add_dynamics_environment(entry.environment.clone());
            for token in &entry.refresh_tokens {
                self.add_refresh_token(&entry.environment.organization_id, Some(token));
            }
        }
        for entry in &seed.jobs {
            let jobs = vec![entry.job.clone(); entry.count as usize];
            self.try_seed_jobs(&entry.remote_id, &jobs);
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/services/oauth2/token", post(salesforce_token))
        .route("/id/{org}/{user}", get(salesforce_identity))
        .route("/{tenant}/oauth2/v2.0/token", post(entra_token))
        .route(
            "/{tenant}/oauth2/v2.0/devicecode",
            post(login::entra_device_start),
        )
        .route("/{tenant}/oauth2/v2.0/authorize", get(login::authorize))
        .route("/services/oauth2/authorize", get(login::authorize))
        .route("/api/discovery/v2.0/Instances", get(login::discovery_instances))
        .route("/_admin/device-codes", get(login::admin_device_codes))
        .route(
            "/_admin/device-codes/{code}",
            post(login::admin_decide_device_code),
        )
        .route("/_admin/authorizations", post(login::admin_queue_authorization))
        .route("/api/data/v9.2/WhoAmI", get(whoami))
        .route("/services/data/v62.0/query", get(jobs::sf_query))
        .route("/services/data/v62.0/query/{locator}", get(jobs::sf_query_more))
        .route(
            "/services/data/v62.0/sobjects/{object}/{id}",
            get(jobs::sf_read).patch(jobs::sf_patch),
        )
        .route(
            "/api/data/v9.2/{segment}",
            get(jobs::dv_get).patch(jobs::dv_patch),
        )
        .route("/api/data/v9.2/{set}/$count", get(jobs::dv_count))
        .route("/_admin/stats", get(admin_stats).delete(admin_reset_stats))
        .route("/_admin/salesforce/orgs", post(admin_add_org))
        .route("/_admin/dynamics/environments", post(admin_add_environment))
        .route("/_admin/tokens", post(admin_issue_token))
        .route("/_admin/revoke", post(admin_revoke))
        .route("/_admin/rotation", post(admin_rotation))
        .route("/_admin/bad-signature", post(admin_bad_signature))
        .route(
            "/_admin/faults",
            post(admin_push_fault).delete(admin_clear_faults),
        )
        .route("/_admin/change-id", post(admin_change_id))
        .route("/_admin/jobs", post(jobs::admin_seed_jobs))
        .route("/_admin/jobs/{remote}", get(jobs::admin_jobs))
        .route(
            "/_admin/jobs/{remote}/{id}",
            get(jobs::admin_job).delete(jobs::admin_delete_job),
        )
        .route("/_admin/jobs/{remote}/{id}/abort", post(jobs::admin_abort_job))
        .route(
            "/_admin/jobs/{remote}/{id}/modified",
            post(jobs::admin_job_modified),
        )
        .route("/_admin/job-page-size", post(jobs::admin_job_page_size))
        .route(
            "/_admin/expire-access-tokens",
            post(jobs::admin_expire_access_tokens),
        )
        .route("/_admin/query-delay", post(jobs::admin_query_delay))
        .route("/_admin/api-usage", post(jobs::admin_api_usage))
        .route("/_admin/throttle", post(jobs::admin_throttle))
        .with_state(shared)
}

type Shared_ = AxState<Arc<Shared>>;

fn json_response(status: u16, body: serde_json::Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

async fn fault_response(fault: Fault) -> Response {
    if fault.hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&fault.content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    for (name, value) in &fault.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            headers.insert(name, value);
        }
    }
    (status, headers, fault.body).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_string())
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

/// Base64 HMAC-SHA256 of `id + issued_at` keyed with the client secret (what Salesforce sends).
pub fn salesforce_signature(id: &str, issued_at: &str, client_secret: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, client_secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{id}{issued_at}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

async fn salesforce_token(AxState(shared): Shared_, Form(form): Form<BTreeMap<String, String>>) -> Response {
    let fault = {
        let mut state = shared.lock();
        state.stats.token_requests += 1;
        state.stats.salesforce_token_requests += 1;
        state.last_token_form = Some(form.clone());
        state.take_fault(FaultTarget::SalesforceToken)
    };
    if let Some(fault) = fault {
        return fault_response(fault).await;
    }
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    if field("response_type") == "device_code" {
        return login::salesforce_device_start(&shared, &form);
    }
    match field("grant_type") {
        "refresh_token" => {}
        "device" => return login::salesforce_device_poll(&shared, &form),
        "authorization_code" => return login::salesforce_code_exchange(&shared, &form),
        _ => {
            return json_response(
                400,
                json!({"error": "unsupported_grant_type", "error_description": "grant type not supported"}),
            );
        }
    }
    let mut state = shared.lock();
    let account = state
        .refresh_tokens
        .get(field("refresh_token"))
        .and_then(|key| state.accounts.get(key).map(|a| (key.clone(), a.clone())));
    let Some((key, Account::Salesforce(org))) = account else {
        // Salesforce: reusing a refresh token that rotation replaced revokes its live successor.
        let mut next = state.rotated_away.get(field("refresh_token")).cloned();
        if next.is_some() {
            state.stats.dead_token_requests += 1;
        }
        while let Some(token) = next {
            state.revoke(&token);
            next = state.rotated_away.get(&token).cloned();
        }
        return json_response(
            400,
            json!({"error": "invalid_grant", "error_description": "expired access/refresh token"}),
        );
    };
    if field("client_id") != org.client_id {
        return json_response(
            400,
            json!({"error": "invalid_client_id", "error_description": "client identifier invalid"}),
        );
    }
    if let Some(secret) = &org.client_secret
        && form.get("client_secret") != Some(secret)
    {
        return json_response(
            400,
            json!({"error": "invalid_client", "error_description": "invalid client credentials"}),
        );
    }
    let mut body = salesforce_grant(&shared, &mut state, &key, &org);
    if state.rotation {
        let new = shared.token("5Aep861.fake-rt-");
        state.refresh_tokens.remove(field("refresh_token"));
        state
            .rotated_away
            .insert(field("refresh_token").to_string(), new.clone());
        state.refresh_tokens.insert(new.clone(), key);
        body["refresh_token"] = json!(new);
    }
    let held = body
        .get("refresh_token")
        .and_then(|t| t.as_str())
        .unwrap_or(field("refresh_token"))
        .to_string();
    let access_token = body["access_token"].as_str().unwrap_or_default().to_string();
    state.access_token_origin.insert(access_token, held);
    json_response(200, body)
}

/// A Salesforce token answer for `org` (a new access token, recorded as live), without a refresh
/// token: the caller adds one where the grant issues it.
fn salesforce_grant(shared: &Shared, state: &mut State, key: &str, org: &SalesforceOrg) -> serde_json::Value {
    let access_token = shared.token(&format!("{}!fake-at-", org.org_id));
    state.access_tokens.insert(access_token.clone(), key.to_string());
    let id = format!("{}/id/{}/{}", shared.url, org.org_id, org.user_id);
    let issued_at = now_millis().to_string();
    let signing_key = org.client_secret.clone().unwrap_or_default();
    let signature = if state.bad_signature {
        salesforce_signature(&id, &issued_at, "not-the-client-secret")
    } else {
        salesforce_signature(&id, &issued_at, &signing_key)
    };
    json!({
        "access_token": access_token,
        "signature": signature,
        "scope": "refresh_token api",
        "instance_url": shared.url,
        "id": id,
        "token_type": "Bearer",
        "issued_at": issued_at,
    })
}

async fn salesforce_identity(
    AxState(shared): Shared_,
    Path((org_id, user_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let fault = {
        let mut state = shared.lock();
        state.stats.identity_requests += 1;
        state.stats.salesforce_identity_requests += 1;
        state.take_fault(FaultTarget::SalesforceIdentity)
    };
    if let Some(fault) = fault {
        return fault_response(fault).await;
    }
    let state = shared.lock();
    let org = bearer(&headers)
        .and_then(|token| state.access_tokens.get(&token).cloned())
        .and_then(|key| state.accounts.get(&key).cloned());
    match org {
        Some(Account::Salesforce(org)) if org.org_id == org_id && org.user_id == user_id => json_response(
            200,
            json!({
                "id": format!("{}/id/{}/{}", shared.url, org.org_id, org.user_id),
                "asserted_user": true,
                "user_id": org.user_id,
                "organization_id": org.org_id,
                "username": org.username,
                "nick_name": "fake",
                "display_name": "Fake User",
                "email": org.username,
                "active": true,
                "user_type": "STANDARD",
                "language": "en_US",
                "locale": "en_US",
                "utcOffset": 0,
            }),
        ),
        _ => (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/plain")],
            "Bad_OAuth_Token",
        )
            .into_response(),
    }
}

fn entra_error(status: u16, error: &str, code: i64, description: &str) -> Response {
    json_response(
        status,
        json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description} Trace ID: 00000000-0000-0000-0000-000000000000 Correlation ID: 00000000-0000-0000-0000-000000000000 Timestamp: 2026-01-01 00:00:00Z"),
            "error_codes": [code],
            "timestamp": "2026-01-01 00:00:00Z",
            "trace_id": "00000000-0000-0000-0000-000000000000",
            "correlation_id": "00000000-0000-0000-0000-000000000000",
        }),
    )
}

async fn entra_token(
    AxState(shared): Shared_,
    Path(tenant): Path<String>,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let fault = {
        let mut state = shared.lock();
        state.stats.token_requests += 1;
        state.stats.entra_token_requests += 1;
        state.last_token_form = Some(form.clone());
        state.take_fault(FaultTarget::EntraToken)
    };
    if let Some(fault) = fault {
        return fault_response(fault).await;
    }
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    match field("grant_type") {
        "urn:ietf:params:oauth:grant-type:device_code" => return login::entra_device_poll(&shared, &form),
        "authorization_code" => return login::entra_code_exchange(&shared, &form),
        _ => {}
    }
    if field("grant_type") != "refresh_token" {
        return entra_error(
            400,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    let mut state = shared.lock();
    let account = state
        .refresh_tokens
        .get(field("refresh_token"))
        .and_then(|key| state.accounts.get(key).map(|a| (key.clone(), a.clone())));
    let Some((key, Account::Dynamics(env))) = account else {
        return entra_error(
            400,
            "invalid_grant",
            50173,
            "The provided grant has expired due to it being revoked.",
        );
    };
    if field("client_id") != env.client_id {
        return entra_error(
            400,
            "unauthorized_client",
            700016,
            "Application was not found in the directory.",
        );
    }
    if let Some(secret) = &env.client_secret
        && form.get("client_secret") != Some(secret)
    {
        return entra_error(401, "invalid_client", 7000215, "Invalid client secret provided.");
    }
    if let Some(expected) = &env.tenant
        && !["organizations", "common", expected.as_str()].contains(&tenant.as_str())
    {
        return entra_error(400, "invalid_request", 90002, "Tenant not found.");
    }
    // A refresh token is good for any environment of the same user (a multi-resource refresh token).
    let Some(target) = entra_target(&shared, &state, &key, field("scope")) else {
        return entra_error(
            400,
            "invalid_scope",
            70011,
            "The provided value for the input parameter 'scope' is not valid.",
        );
    };
    let resource_scope = field("scope")
        .split(' ')
        .find(|s| s.ends_with("/user_impersonation"))
        .unwrap_or_default()
        .to_string();
    json_response(200, entra_grant(&shared, &mut state, &target, &resource_scope))
}

/// The environment an Entra token for `scope` is issued for: `{url}/user_impersonation` of the
/// environment `key`, or of another environment of the same user and client; `offline_access` is
/// required. `None` for any other scope.
fn entra_target(shared: &Shared, state: &State, key: &str, scope: &str) -> Option<String> {
    let scopes: Vec<&str> = scope.split(' ').collect();
    if !scopes.contains(&"offline_access") {
        return None;
    }
    let Some(Account::Dynamics(me)) = state.accounts.get(key) else {
        return None;
    };
    let serves = |env: &DynamicsEnvironment| {
        let url = env.environment_url.clone().unwrap_or_else(|| shared.url.clone());
        scopes.contains(&format!("{}/user_impersonation", url.trim_end_matches('/')).as_str())
    };
    if serves(me) {
        return Some(key.to_string());
    }
    let mut others: Vec<(&String, &DynamicsEnvironment)> = state
        .accounts
        .iter()
        .filter_map(|(k, a)| match a {
            Account::Dynamics(env)
                if env.user_id == me.user_id && env.client_id == me.client_id && serves(env) =>
            {
                Some((k, env))
            }
            _ => None,
        })
        .collect();
    others.sort_by(|a, b| a.0.cmp(b.0));
    others.first().map(|(k, _)| (*k).clone())
}

/// An Entra token answer for the account `key`: a new access token (recorded as live) and a new
/// refresh token (Entra returns one every time; older ones stay valid).
fn entra_grant(shared: &Shared, state: &mut State, key: &str, scope: &str) -> serde_json::Value {
    let access_token = shared.token("eyJ0eXAiOiJKV1Qi.fake-at-");
    state.access_tokens.insert(access_token.clone(), key.to_string());
    let new_refresh = shared.token("0.fake-rt-");
    state.refresh_tokens.insert(new_refresh.clone(), key.to_string());
    json!({
        "token_type": "Bearer",
        "scope": scope,
        "expires_in": 3599,
        "ext_expires_in": 3599,
        "access_token": access_token,
        "refresh_token": new_refresh,
    })
}

async fn whoami(AxState(shared): Shared_, headers: HeaderMap) -> Response {
    let fault = {
        let mut state = shared.lock();
        state.stats.identity_requests += 1;
        state.stats.whoami_requests += 1;
        state.take_fault(FaultTarget::WhoAmI)
    };
    if let Some(fault) = fault {
        return fault_response(fault).await;
    }
    let state = shared.lock();
    let env = bearer(&headers)
        .and_then(|token| state.access_tokens.get(&token).cloned())
        .and_then(|key| state.accounts.get(&key).cloned());
    match env {
        Some(Account::Dynamics(env)) => json_response(
            200,
            json!({
                "@odata.context": format!("{}/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", shared.url),
                "BusinessUnitId": "00000000-0000-0000-0000-0000000000b0",
                "UserId": env.user_id,
                "OrganizationId": env.organization_id,
            }),
        ),
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
            "",
        )
            .into_response(),
    }
}

async fn admin_stats(AxState(shared): Shared_) -> Json<Stats> {
    Json(shared.lock().stats.clone())
}

async fn admin_reset_stats(AxState(shared): Shared_) -> StatusCode {
    shared.lock().stats = Stats::default();
    StatusCode::NO_CONTENT
}

async fn admin_add_org(AxState(shared): Shared_, Json(org): Json<SalesforceOrg>) -> StatusCode {
    shared
        .lock()
        .accounts
        .insert(org.org_id.clone(), Account::Salesforce(org));
    StatusCode::CREATED
}

async fn admin_add_environment(AxState(shared): Shared_, Json(env): Json<DynamicsEnvironment>) -> StatusCode {
    shared
        .lock()
        .accounts
        .insert(env.organization_id.clone(), Account::Dynamics(env));
    StatusCode::CREATED
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IssueToken {
    remote_id: String,
    #[serde(default)]
    refresh_token: Option<String>,
}

async fn admin_issue_token(AxState(shared): Shared_, Json(req): Json<IssueToken>) -> Response {
    let token = req
        .refresh_token
        .unwrap_or_else(|| shared.token("5Aep861.fake-rt-"));
    let mut state = shared.lock();
    match state.key_of(&req.remote_id) {
        Some(key) => {
            state.refresh_tokens.insert(token.clone(), key);
            json_response(200, json!({"refreshToken": token}))
        }
        None => json_response(404, json!({"error": "unknown org or environment ID"})),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Revoke {
    refresh_token: String,
}

async fn admin_revoke(AxState(shared): Shared_, Json(req): Json<Revoke>) -> Json<serde_json::Value> {
    let revoked = shared.lock().revoke(&req.refresh_token);
    Json(json!({"revoked": revoked}))
}

#[derive(Deserialize)]
struct Enabled {
    enabled: bool,
}

async fn admin_rotation(AxState(shared): Shared_, Json(req): Json<Enabled>) -> StatusCode {
    shared.lock().rotation = req.enabled;
    StatusCode::NO_CONTENT
}

async fn admin_bad_signature(AxState(shared): Shared_, Json(req): Json<Enabled>) -> StatusCode {
    shared.lock().bad_signature = req.enabled;
    StatusCode::NO_CONTENT
}

async fn admin_push_fault(AxState(shared): Shared_, Json(fault): Json<Fault>) -> StatusCode {
    shared.lock().faults.push_back(fault);
    StatusCode::NO_CONTENT
}

async fn admin_clear_faults(AxState(shared): Shared_) -> StatusCode {
    shared.lock().faults.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct ChangeId {
    from: String,
    to: String,
}

async fn admin_change_id(AxState(shared): Shared_, Json(req): Json<ChangeId>) -> Json<serde_json::Value> {
    let mut state = shared.lock();
    let changed = match state
        .key_of(&req.from)
        .and_then(|key| state.accounts.get_mut(&key))
    {
        Some(Account::Salesforce(org)) => {
            org.org_id = req.to;
            true
        }
        Some(Account::Dynamics(env)) => {
            env.organization_id = req.to;
            true
        }
        None => false,
    };
    Json(json!({"changed": changed}))
}
