//! The CRM job queue: find the jobs queued for the cloud in an org, and claim one atomically *in the
//! CRM* (other processors, desktop or server editions, share the org).
//!
//! Request building ([`discover_url`], [`claim_request`]), answer parsing ([`parse_page`]) and
//! classification ([`classify`]) are pure and unit-tested; [`JobQueue`] only sends. Decisions go by
//! HTTP status and documented error codes, never by message text. Nothing here logs or returns a
//! token.

pub mod contract;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use url::Url;

use crate::api::Provider;
use crate::providers::classify::{parse_error_body, parse_retry_after};
use crate::providers::rules::is_allowed_transport;
pub use contract::JobStatus;
use contract::{dataverse as dv, salesforce as sf};

/// Which CRM API a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Salesforce,
    Dataverse,
}

impl Api {
    pub fn of(provider: Provider) -> Api {
        match provider {
            Provider::SalesforceProduction | Provider::SalesforceSandbox => Api::Salesforce,
            Provider::Dynamics365 => Api::Dataverse,
        }
    }
}

/// Where and as whom to talk to the CRM: the session's API base URL and access token.
pub struct Target<'a> {
    pub api: Api,
    pub base: &'a Url,
    pub token: &'a SecretString,
}

/// A job found in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedJob {
    pub id: String,
    pub job_type: String,
    pub status: JobStatus,
    /// How many times it was claimed before.
    pub attempt: i64,
    /// What a conditional write must name to win only against an unchanged record.
    pub version: Version,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    /// Salesforce: `LastModifiedDate` (whole seconds count: `If-Unmodified-Since` has one-second
    /// resolution).
    LastModified(Timestamp),
    /// Dataverse: the row's `@odata.etag`.
    ETag(String),
}

/// What to look for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discover {
    /// Claims that expired before this may be taken over.
    pub now: Timestamp,
    /// Only these types (empty: all).
    pub job_types: Vec<String>,
    /// At most this many jobs in all (Salesforce `LIMIT`; on Dataverse the caller stops reading
    /// pages once it has enough).
    pub limit: u32,
    /// Rows per page asked of Dataverse.
    pub page_size: u32,
}

/// One page of the queue.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Page {
    pub jobs: Vec<QueuedJob>,
    /// The next page, on the same origin as the base URL.
    pub next: Option<Url>,
    /// Rows that could not be read (one line each, no values beyond the row's ID).
    pub skipped: Vec<String>,
}

/// A claim to write into a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// `<namespace>/<connection>/<pod>`.
    pub by: String,
    pub expires: Timestamp,
    /// The job's attempt counter after this claim.
    pub attempt: i64,
}

/// How a claim went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Ours now.
    Claimed,
    /// Another processor changed the job first (412): skip it.
    Lost,
    /// The job no longer exists (404): skip it.
    Gone,
}

/// What the CRM said about the org's API budget (Salesforce `Sforce-Limit-Info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiUsage {
    pub used: u64,
    pub max: u64,
}

impl ApiUsage {
    pub fn ratio(self) -> f64 {
        if self.max == 0 {
            1.0
        } else {
            self.used as f64 / self.max as f64
        }
    }
}

/// An answer and what its headers said.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer<T> {
    pub value: T,
    /// The CRM's clock (`Date`).
    pub server_time: Option<Timestamp>,
    pub usage: Option<ApiUsage>,
    /// How long the request took, from sending it to the answer's headers.
    pub took: Duration,
}

impl<T> Answer<T> {
    /// The latest the CRM can have read the data this answer holds, by its own clock: its `Date`
    /// is stamped when the answer is sent, so the read happened at most the request's duration
    /// (rounded up to whole seconds) before it. `None` without a `Date`: the CRM's clock is
    /// unknown, and a local clock is no substitute for it.
    pub fn read_by(&self) -> Option<Timestamp> {
        let took = self.took.as_secs() + u64::from(self.took.subsec_nanos() > 0);
        let date = self.server_time?;
        date.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(took as i64))
            .ok()
    }
}

/// Why a request failed. None of these is a reason to change a Connection's state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CrmError {
    /// 401: the access token is stale or revoked.
    #[error("the CRM rejected the session (HTTP 401{})", code_suffix(.code))]
    SessionRejected { code: Option<String> },
    /// 429, or Salesforce's 403 `REQUEST_LIMIT_EXCEEDED`.
    #[error("the CRM is throttling this org's requests (HTTP {status}{})", code_suffix(.code))]
    Throttled {
        status: u16,
        code: Option<String>,
        retry_after: Option<Duration>,
    },
    /// Any other answer: not understood, so transient. The CRM's message text is left out: it
    /// may echo request headers, and decisions never depend on it.
    #[error("the CRM answered HTTP {status}{}", code_suffix(.code))]
    Unexpected {
        status: u16,
        code: Option<String>,
        retry_after: Option<Duration>,
    },
    /// A 2xx whose body could not be used.
    #[error("the CRM's answer could not be used: {0}")]
    Malformed(String),
    /// No answer: connection refused, timeout, TLS, oversized body.
    #[error("cannot reach the CRM: {0}")]
    Transport(String),
    /// The session's URL would send the token in clear text or to another origin.
    #[error("refusing to send the access token to {0}")]
    Refused(String),
    /// Not sent: the caller's budget for the CRM is spent for now (see `jobruns::budget`).
    #[error("not sent: {why} (again in {retry_after:?})")]
    OverBudget {
        why: &'static str,
        retry_after: Duration,
    },
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_ref().map(|c| format!(" {c}")).unwrap_or_default()
}

impl CrmError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CrmError::SessionRejected { .. } => "session_rejected",
            CrmError::Throttled { .. } => "throttled",
            CrmError::Unexpected { .. } => "unexpected",
            CrmError::Malformed(_) => "malformed",
            CrmError::Transport(_) => "transport",
            CrmError::Refused(_) => "refused",
            CrmError::OverBudget { .. } => "over_budget",
        }
    }

    /// The delay the CRM asked for, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CrmError::Throttled { retry_after, .. } | CrmError::Unexpected { retry_after, .. } => {
                *retry_after
            }
            CrmError::OverBudget { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// The SOQL datetime / Dataverse filter literal of `t`, in UTC, whole seconds.
pub fn datetime_literal(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Parses a CRM datetime: RFC 3339 (`2026-11-28T09:55:03Z`) or Salesforce's
/// `2026-11-28T09:55:03.000+0000`.
pub fn parse_datetime(raw: &str) -> Option<Timestamp> {
    if let Ok(t) = raw.parse::<Timestamp>() {
        return Some(t);
    }
    k8s_openapi::jiff::fmt::strtime::parse("%Y-%m-%dT%H:%M:%S%.f%z", raw)
        .ok()?
        .to_timestamp()
        .ok()
}

/// Quotes a value for a SOQL or OData string literal (`'` doubled for OData, escaped for SOQL).
fn quoted(api: Api, value: &str) -> String {
    match api {
        Api::Salesforce => format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'")),
        Api::Dataverse => format!("'{}'", value.replace('\'', "''")),
    }
}

/// The URL of the first page of the queue.
pub fn discover_url(api: Api, base: &Url, q: &Discover) -> Url {
    match api {
        Api::Salesforce => {
            let types = if q.job_types.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = q.job_types.iter().map(|t| quoted(api, t)).collect();
                format!(" AND {} IN ({})", sf::TYPE, list.join(","))
            };
            let soql = format!(
                "SELECT {id}, {ty}, {status}, {attempt}, {lm} FROM {obj} WHERE {processor} = '{cloud}' AND ({status} IN ('{holding}','{waiting}') OR ({status} = '{claimed}' AND {expires} < {now})){types} ORDER BY CreatedDate LIMIT {limit}",
                id = sf::ID,
                ty = sf::TYPE,
                status = sf::STATUS,
                attempt = sf::ATTEMPT,
                lm = sf::LAST_MODIFIED,
                obj = sf::OBJECT,
                processor = sf::PROCESSOR,
                cloud = contract::PROCESSOR_CLOUD,
                holding = JobStatus::Holding.salesforce(),
                waiting = JobStatus::Waiting.salesforce(),
                claimed = JobStatus::Claimed.salesforce(),
                expires = sf::CLAIM_EXPIRES,
                now = datetime_literal(q.now),
                limit = q.limit.max(1),
            );
            let mut url = base
                .join(&format!("{}/query", sf::API_PATH))
                .expect("static path");
            url.query_pairs_mut().append_pair("q", &soql);
            url
        }
        Api::Dataverse => {
            let types = if q.job_types.is_empty() {
                String::new()
            } else {
                let any: Vec<String> = q
                    .job_types
                    .iter()
                    .map(|t| format!("{} eq {}", dv::TYPE, quoted(api, t)))
                    .collect();
                format!(" and ({})", any.join(" or "))
            };
            let filter = format!(
                "{processor} eq '{cloud}' and ({status} eq {holding} or {status} eq {waiting} or ({status} eq {claimed} and {expires} lt {now})){types}",
                processor = dv::PROCESSOR,
                cloud = contract::PROCESSOR_CLOUD,
                status = dv::STATUS,
                holding = JobStatus::Holding.dataverse(),
                waiting = JobStatus::Waiting.dataverse(),
                claimed = JobStatus::Claimed.dataverse(),
                expires = dv::CLAIM_EXPIRES,
                now = datetime_literal(q.now),
            );
            let mut url = base
                .join(&format!("{}/{}", dv::API_PATH, dv::ENTITY_SET))
                .expect("static path");
            url.query_pairs_mut()
                .append_pair("$select", &[dv::ID, dv::TYPE, dv::STATUS, dv::ATTEMPT].join(","))
                .append_pair("$filter", &filter)
                // No $top: Dataverse does not page a $top query; the caller stops after `limit`.
                .append_pair("$orderby", &format!("{} asc", dv::CREATED_ON));
            url
        }
    }
}

/// Parses one page of the queue. A row that cannot be read is skipped (and named in
/// [`Page::skipped`]); a body that is not a page at all is an error.
pub fn parse_page(api: Api, base: &Url, body: &[u8]) -> Result<Page, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            "not JSON (line {}, column {}){}",
            e.line(),
            e.column(),
            if body.trim_ascii_start().starts_with(b"<") {
                ", an HTML page"
            } else {
                ""
            }
        )
    })?;
    let (rows, next) = match api {
        Api::Salesforce => {
            let rows = value
                .get("records")
                .and_then(Value::as_array)
                .ok_or("no \"records\" array")?;
            let done = value
                .get("done")
                .and_then(Value::as_bool)
                .ok_or("no \"done\" flag")?;
            let next = match (done, value.get("nextRecordsUrl").and_then(Value::as_str)) {
                (true, _) => None,
                (false, Some(path)) => Some(path),
                (false, None) => return Err("\"done\" is false but there is no \"nextRecordsUrl\"".into()),
            };
            (rows, next)
        }
        Api::Dataverse => {
            let rows = value
                .get("value")
                .and_then(Value::as_array)
                .ok_or("no \"value\" array")?;
            (rows, value.get(dv::NEXT_LINK).and_then(Value::as_str))
        }
    };
    let next = match next {
        None => None,
        Some(link) => {
            let url = base
                .join(link)
                .map_err(|_| "the next-page link is not a URL".to_string())?;
            if url.origin() != base.origin() {
                return Err("the next-page link points to another host".into());
            }
            Some(url)
        }
    };
    let mut page = Page {
        next,
        ..Default::default()
    };
    for (i, row) in rows.iter().enumerate() {
        match parse_row(api, row) {
            Ok(job) => page.jobs.push(job),
            Err(why) => {
                let id = row
                    .get(match api {
                        Api::Salesforce => sf::ID,
                        Api::Dataverse => dv::ID,
                    })
                    .and_then(Value::as_str)
                    .filter(|id| is_record_id(id))
                    .map(|id| format!("job {id}"))
                    .unwrap_or_else(|| format!("row {i}"));
                page.skipped.push(format!("{id}: {why}"));
            }
        }
    }
    Ok(page)
}

/// A CRM record ID as we accept it (it becomes part of a JobRun name and a URL path).
pub fn is_record_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn parse_row(api: Api, row: &Value) -> Result<QueuedJob, String> {
    let field = |name: &str| row.get(name).filter(|v| !v.is_null());
    let text = |name: &str| -> Result<String, String> {
        field(name)
            .ok_or_else(|| format!("no {name}"))?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{name} is not text"))
    };
    let (id_field, type_field, attempt_field) = match api {
        Api::Salesforce => (sf::ID, sf::TYPE, sf::ATTEMPT),
        Api::Dataverse => (dv::ID, dv::TYPE, dv::ATTEMPT),
    };
    let id = text(id_field)?;
    if !is_record_id(&id) {
        return Err(format!("{id_field} is not a record ID"));
    }
    let job_type = text(type_field)?;
    if job_type.is_empty() || job_type.len() > 80 {
        return Err(format!("{type_field} is empty or longer than 80 characters"));
    }
    let attempt = match field(attempt_field) {
        None => 0,
        Some(v) => v
            .as_f64()
            .filter(|n| n.is_finite() && *n >= 0.0 && *n < 1e9)
            .ok_or_else(|| format!("{attempt_field} is not a count"))? as i64,
    };
    let (status, version) = match api {
        Api::Salesforce => {
            let status = text(sf::STATUS)?;
            let status =
                JobStatus::from_salesforce(&status).ok_or_else(|| format!("unknown {} value", sf::STATUS))?;
            let modified = text(sf::LAST_MODIFIED)?;
            let modified = parse_datetime(&modified)
                .ok_or_else(|| format!("{} is not a datetime", sf::LAST_MODIFIED))?;
            (status, Version::LastModified(modified))
        }
        Api::Dataverse => {
            let status = field(dv::STATUS)
                .and_then(Value::as_i64)
                .ok_or_else(|| format!("no numeric {}", dv::STATUS))?;
            let status =
                JobStatus::from_dataverse(status).ok_or_else(|| format!("unknown {} value", dv::STATUS))?;
            let etag = text(dv::ETAG)?;
            (status, Version::ETag(etag))
        }
    };
    Ok(QueuedJob {
        id,
        job_type,
        status,
        attempt,
        version,
    })
}

/// A request ready to send (the token is added by the sender).
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    pub method: reqwest::Method,
    pub url: Url,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Value>,
}

/// The conditional write that claims `job`: it succeeds only if nobody changed the job since we
/// read it.
pub fn claim_request(api: Api, base: &Url, job: &QueuedJob, claim: &Claim) -> Result<Prepared, String> {
    if !is_record_id(&job.id) {
        return Err("the job ID is not a record ID".into());
    }
    match (api, &job.version) {
        (Api::Salesforce, Version::LastModified(seen)) => {
            let url = base
                .join(&format!("{}/sobjects/{}/{}", sf::API_PATH, sf::OBJECT, job.id))
                .map_err(|e| e.to_string())?;
            let since = k8s_openapi::jiff::fmt::rfc2822::DateTimePrinter::new()
                .timestamp_to_rfc9110_string(seen)
                .map_err(|e| e.to_string())?;
            Ok(Prepared {
                method: reqwest::Method::PATCH,
                url,
                headers: vec![("If-Unmodified-Since", since)],
                body: Some(json!({
                    sf::STATUS: JobStatus::Claimed.salesforce(),
                    sf::CLAIMED_BY: claim.by,
                    sf::CLAIM_EXPIRES: datetime_literal(claim.expires),
                    sf::ATTEMPT: claim.attempt,
                })),
            })
        }
        (Api::Dataverse, Version::ETag(etag)) => {
            let url = base
                .join(&format!("{}/{}({})", dv::API_PATH, dv::ENTITY_SET, job.id))
                .map_err(|e| e.to_string())?;
            Ok(Prepared {
                method: reqwest::Method::PATCH,
                url,
                headers: vec![
                    ("If-Match", etag.clone()),
                    ("Prefer", "return=representation".into()),
                ],
                body: Some(json!({
                    dv::STATUS: JobStatus::Claimed.dataverse(),
                    dv::CLAIMED_BY: claim.by,
                    dv::CLAIM_EXPIRES: datetime_literal(claim.expires),
                    dv::ATTEMPT: claim.attempt,
                })),
            })
        }
        _ => Err("the job's version does not fit the CRM".into()),
    }
}

/// The URL of one job record (Salesforce sObject, Dataverse row).
pub fn record_url(api: Api, base: &Url, id: &str) -> Result<Url, String> {
    if !is_record_id(id) {
        return Err("the job ID is not a record ID".into());
    }
    let path = match api {
        Api::Salesforce => format!("{}/sobjects/{}/{id}", sf::API_PATH, sf::OBJECT),
        Api::Dataverse => format!("{}/{}({id})", dv::API_PATH, dv::ENTITY_SET),
    };
    base.join(&path).map_err(|e| e.to_string())
}

/// The URL that reads one job record: only the fields a report or a fence looks at (never the
/// result, which a CRM user may fill with up to 128 KiB), so an answer stays under
/// [`MAX_RECORD_BODY`]. Salesforce: `GET …/sobjects/CrmJob__c/{id}?fields=…` ("Get Field Values
/// from a Standard Object Record", REST API Developer Guide); Dataverse: `$select` (its
/// `@odata.etag` comes with every row).
pub fn read_url(api: Api, base: &Url, id: &str) -> Result<Url, String> {
    let mut url = record_url(api, base, id)?;
    match api {
        Api::Salesforce => url.query_pairs_mut().append_pair(
            "fields",
            &[
                sf::STATUS,
                sf::CLAIMED_BY,
                sf::CLAIM_EXPIRES,
                sf::ATTEMPT,
                sf::LAST_MODIFIED,
            ]
            .join(","),
        ),
        Api::Dataverse => url.query_pairs_mut().append_pair(
            "$select",
            &[dv::STATUS, dv::CLAIMED_BY, dv::CLAIM_EXPIRES, dv::ATTEMPT].join(","),
        ),
    };
    Ok(url)
}

/// The largest answer to a record read ([`read_url`]: five short fields) accepted.
pub const MAX_RECORD_BODY: usize = 64 << 10;
/// The largest page of the queue accepted ([`discover_url`]: at most 100 rows of five fields per
/// page as asked, with room for a CRM that pads).
pub const MAX_PAGE_BODY: usize = 1 << 20;

/// A job record as read before a report: its status and the version a conditional write names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub status: JobStatus,
    pub version: Version,
    /// Who holds the claim (`<namespace>/<connection>/<pod>` for us), if anyone.
    pub claimed_by: Option<String>,
    /// When the claim (or a running job's lease) lapses, if it is set.
    pub claim_expires: Option<Timestamp>,
    /// The attempt counter (raised by each claim), if it is set.
    pub attempt: Option<i64>,
}

/// Parses a job record (the answer to a GET of [`read_url`]).
pub fn parse_record(api: Api, body: &[u8]) -> Result<Record, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("not JSON (line {}, column {})", e.line(), e.column()))?;
    match api {
        Api::Salesforce => {
            let status = value
                .get(sf::STATUS)
                .and_then(Value::as_str)
                .and_then(JobStatus::from_salesforce);
            let modified = value
                .get(sf::LAST_MODIFIED)
                .and_then(Value::as_str)
                .and_then(parse_datetime);
            match (status, modified) {
                (Some(status), Some(modified)) => Ok(Record {
                    status,
                    version: Version::LastModified(modified),
                    claimed_by: value
                        .get(sf::CLAIMED_BY)
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    claim_expires: value
                        .get(sf::CLAIM_EXPIRES)
                        .and_then(Value::as_str)
                        .and_then(parse_datetime),
                    attempt: value.get(sf::ATTEMPT).and_then(Value::as_f64).map(|n| n as i64),
                }),
                _ => Err(format!("no usable {} or {}", sf::STATUS, sf::LAST_MODIFIED)),
            }
        }
        Api::Dataverse => {
            let status = value
                .get(dv::STATUS)
                .and_then(Value::as_i64)
                .and_then(JobStatus::from_dataverse);
            let etag = value.get(dv::ETAG).and_then(Value::as_str);
            match (status, etag) {
                (Some(status), Some(etag)) => Ok(Record {
                    status,
                    version: Version::ETag(etag.to_string()),
                    claimed_by: value
                        .get(dv::CLAIMED_BY)
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    claim_expires: value
                        .get(dv::CLAIM_EXPIRES)
                        .and_then(Value::as_str)
                        .and_then(parse_datetime),
                    attempt: value.get(dv::ATTEMPT).and_then(Value::as_f64).map(|n| n as i64),
                }),
                _ => Err(format!("no usable {} or {}", dv::STATUS, dv::ETAG)),
            }
        }
    }
}

/// What a report writes into a job record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// The job started; its lease (the claim's expiry) runs until `lease`, so another processor
    /// can tell a job whose processor died from one still running.
    Started { at: Timestamp, lease: Timestamp },
    /// The claim (or a running job's lease) is renewed until `until`; the status stays `status`
    /// (Claimed or Running). Before a Job is created this is the fence: it lands only on the version
    /// just read, so a rival that claimed the job in between makes it fail.
    Renew { status: JobStatus, until: Timestamp },
    /// The job ended; `result` is the worker's termination message (at most 4 KiB kept).
    Ended {
        succeeded: bool,
        at: Timestamp,
        result: Option<String>,
    },
    /// The claim is given back: the job is Holding again, for any processor (a paused connection's
    /// job that had not started).
    Release,
}

/// The longest result written to the CRM.
pub const MAX_RESULT: usize = 4096;

/// The conditional write of a report: it lands only on the version just read, so a user's abort
/// in between is never overwritten.
pub fn report_request(
    api: Api,
    base: &Url,
    id: &str,
    version: &Version,
    report: &Report,
) -> Result<Prepared, String> {
    let url = record_url(api, base, id)?;
    let (status, fields) = match report {
        Report::Started { at, lease } => (
            JobStatus::Running,
            vec![
                (started_field(api), json!(datetime_literal(*at))),
                (claim_expires_field(api), json!(datetime_literal(*lease))),
            ],
        ),
        Report::Renew { status, until } => (
            *status,
            vec![(claim_expires_field(api), json!(datetime_literal(*until)))],
        ),
        Report::Ended {
            succeeded,
            at,
            result,
        } => {
            let mut fields = vec![(ended_field(api), json!(datetime_literal(*at)))];
            if let Some(result) = result {
                let mut cut = result.len().min(MAX_RESULT);
                while !result.is_char_boundary(cut) {
                    cut -= 1;
                }
                fields.push((result_field(api), json!(&result[..cut])));
            }
            (
                if *succeeded {
                    JobStatus::Completed
                } else {
                    JobStatus::Failed
                },
                fields,
            )
        }
        Report::Release => (
            JobStatus::Holding,
            vec![
                (claimed_by_field(api), Value::Null),
                (claim_expires_field(api), Value::Null),
            ],
        ),
    };
    let mut body = serde_json::Map::new();
    match api {
        Api::Salesforce => body.insert(sf::STATUS.into(), json!(status.salesforce())),
        Api::Dataverse => body.insert(dv::STATUS.into(), json!(status.dataverse())),
    };
    for (field, value) in fields {
        body.insert(field.into(), value);
    }
    let condition = match (api, version) {
        (Api::Salesforce, Version::LastModified(seen)) => (
            "If-Unmodified-Since",
            k8s_openapi::jiff::fmt::rfc2822::DateTimePrinter::new()
                .timestamp_to_rfc9110_string(seen)
                .map_err(|e| e.to_string())?,
        ),
        (Api::Dataverse, Version::ETag(etag)) => ("If-Match", etag.clone()),
        _ => return Err("the record's version does not fit the CRM".into()),
    };
    Ok(Prepared {
        method: reqwest::Method::PATCH,
        url,
        headers: vec![condition],
        body: Some(Value::Object(body)),
    })
}

fn started_field(api: Api) -> &'static str {
    match api {
        Api::Salesforce => sf::STARTED,
        Api::Dataverse => dv::STARTED,
    }
}

fn ended_field(api: Api) -> &'static str {
    match api {
        Api::Salesforce => sf::ENDED,
        Api::Dataverse => dv::ENDED,
    }
}

fn claimed_by_field(api: Api) -> &'static str {
    match api {
        Api::Salesforce => sf::CLAIMED_BY,
        Api::Dataverse => dv::CLAIMED_BY,
    }
}

fn claim_expires_field(api: Api) -> &'static str {
    match api {
        Api::Salesforce => sf::CLAIM_EXPIRES,
        Api::Dataverse => dv::CLAIM_EXPIRES,
    }
}

fn result_field(api: Api) -> &'static str {
    match api {
        Api::Salesforce => sf::RESULT,
        Api::Dataverse => dv::RESULT,
    }
}

/// What the status of an answer to a claim means; `None`: it is an error to classify.
pub fn claim_outcome(status: u16) -> Option<ClaimOutcome> {
    match status {
        200 | 204 => Some(ClaimOutcome::Claimed),
        412 => Some(ClaimOutcome::Lost),
        404 => Some(ClaimOutcome::Gone),
        _ => None,
    }
}

/// Salesforce's `Sforce-Limit-Info: api-usage=N/M`.
pub fn parse_limit_info(value: &str) -> Option<ApiUsage> {
    value.split(',').find_map(|part| {
        let usage = part.trim().strip_prefix("api-usage=")?;
        let (used, max) = usage.split_once('/')?;
        Some(ApiUsage {
            used: used.trim().parse().ok()?,
            max: max.trim().parse().ok()?,
        })
    })
}

/// Classifies an answer that is neither a success nor a claim outcome.
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> CrmError {
    let parsed = parse_error_body(body).unwrap_or_default();
    let code = parsed.error_code.clone().or(parsed.error.clone());
    let limit_exceeded = parsed.error_code.as_deref() == Some(sf::REQUEST_LIMIT_EXCEEDED);
    match status {
        401 => CrmError::SessionRejected { code },
        429 => CrmError::Throttled {
            status,
            code,
            retry_after,
        },
        403 if limit_exceeded => CrmError::Throttled {
            status,
            code,
            retry_after,
        },
        _ => CrmError::Unexpected {
            status,
            code,
            retry_after,
        },
    }
}

/// Sends the queue's requests. Holds no token: each call is given the session's.
#[derive(Clone)]
pub struct JobQueue {
    client: reqwest::Client,
}

impl JobQueue {
    pub fn new(
        request_timeout: Duration,
        extra_roots: Option<&crate::providers::ExtraRoots>,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder();
        if let Some(roots) = extra_roots {
            builder = roots.trust_in(builder);
        }
        let client = builder
            .connect_timeout(Duration::from_secs(10).min(request_timeout))
            .timeout(request_timeout)
            // Never follow redirects: the token must not travel to a host we did not choose.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!(
                "connection-operator-retriever/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()?;
        Ok(JobQueue { client })
    }

    /// The first page of the queue.
    pub async fn first_page(&self, target: &Target<'_>, q: &Discover) -> Result<Answer<Page>, CrmError> {
        self.page(target, discover_url(target.api, target.base, q), q.page_size)
            .await
    }

    /// A page named by [`Page::next`].
    pub async fn next_page(
        &self,
        target: &Target<'_>,
        next: &Url,
        page_size: u32,
    ) -> Result<Answer<Page>, CrmError> {
        if next.origin() != target.base.origin() {
            return Err(CrmError::Refused(host_of(next)));
        }
        self.page(target, next.clone(), page_size).await
    }

    async fn page(&self, target: &Target<'_>, url: Url, page_size: u32) -> Result<Answer<Page>, CrmError> {
        let mut prepared = Prepared {
            method: reqwest::Method::GET,
            url,
            headers: vec![],
            body: None,
        };
        if target.api == Api::Dataverse {
            prepared
                .headers
                .push(("Prefer", format!("odata.maxpagesize={}", page_size.max(1))));
        }
        let (status, meta, body) = self.send(target, prepared, MAX_PAGE_BODY).await?;
        if !(200..300).contains(&status) {
            return Err(classify(status, meta.retry_after, &body));
        }
        let page = parse_page(target.api, target.base, &body).map_err(CrmError::Malformed)?;
        Ok(Answer {
            value: page,
            server_time: meta.server_time,
            usage: meta.usage,
            took: meta.took,
        })
    }

    /// Claims `job` (a conditional write in the CRM).
    pub async fn claim(
        &self,
        target: &Target<'_>,
        job: &QueuedJob,
        claim: &Claim,
    ) -> Result<Answer<ClaimOutcome>, CrmError> {
        let prepared = claim_request(target.api, target.base, job, claim).map_err(CrmError::Malformed)?;
        let (status, meta, body) = self.send(target, prepared, MAX_RECORD_BODY).await?;
        match claim_outcome(status) {
            Some(outcome) => Ok(Answer {
                value: outcome,
                server_time: meta.server_time,
                usage: meta.usage,
                took: meta.took,
            }),
            None => Err(classify(status, meta.retry_after, &body)),
        }
    }

    /// Reads one job record; `None` when it is gone (404).
    pub async fn read(&self, target: &Target<'_>, id: &str) -> Result<Answer<Option<Record>>, CrmError> {
        let url = read_url(target.api, target.base, id).map_err(CrmError::Malformed)?;
        let prepared = Prepared {
            method: reqwest::Method::GET,
            url,
            headers: vec![],
            body: None,
        };
        let (status, meta, body) = self.send(target, prepared, MAX_RECORD_BODY).await?;
        let value = match status {
            200 => Some(parse_record(target.api, &body).map_err(CrmError::Malformed)?),
            404 => None,
            _ => return Err(classify(status, meta.retry_after, &body)),
        };
        Ok(Answer {
            value,
            server_time: meta.server_time,
            usage: meta.usage,
            took: meta.took,
        })
    }

    /// Writes a report into a job record read as `record` (a conditional write). `Lost`: the
    /// record changed since it was read (read it again); `Gone`: it was deleted.
    pub async fn report(
        &self,
        target: &Target<'_>,
        id: &str,
        record: &Record,
        report: &Report,
    ) -> Result<ClaimOutcome, CrmError> {
        let prepared = report_request(target.api, target.base, id, &record.version, report)
            .map_err(CrmError::Malformed)?;
        let (status, meta, body) = self.send(target, prepared, MAX_RECORD_BODY).await?;
        claim_outcome(status).ok_or_else(|| classify(status, meta.retry_after, &body))
    }

    async fn send(
        &self,
        target: &Target<'_>,
        prepared: Prepared,
        max_body: usize,
    ) -> Result<(u16, Meta, Vec<u8>), CrmError> {
        let host = host_of(&prepared.url);
        if !is_allowed_transport(&prepared.url) || prepared.url.origin() != target.base.origin() {
            return Err(CrmError::Refused(host));
        }
        let mut request = self
            .client
            .request(prepared.method, prepared.url)
            .bearer_auth(target.token.expose_secret())
            .header(reqwest::header::ACCEPT, "application/json");
        if target.api == Api::Dataverse {
            request = request
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0");
        }
        for (name, value) in prepared.headers {
            request = request.header(name, value);
        }
        if let Some(body) = prepared.body {
            request = request.json(&body);
        }
        let sent = std::time::Instant::now();
        let mut response = request
            .send()
            .await
            .map_err(|e| CrmError::Transport(describe(&host, &e)))?;
        let took = sent.elapsed();
        let status = response.status().as_u16();
        let headers = response.headers();
        let now = Timestamp::now();
        let meta = Meta {
            took,
            server_time: headers
                .get(reqwest::header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| k8s_openapi::jiff::fmt::rfc2822::parse(v).ok())
                .map(|z| z.timestamp()),
            usage: headers
                .get(sf::LIMIT_INFO_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_limit_info),
            retry_after: headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, now)),
        };
        if response.content_length().is_some_and(|len| len > max_body as u64) {
            return Err(CrmError::Transport(format!(
                "{host}: answer larger than {} bytes refused",
                max_body
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| CrmError::Transport(describe(&host, &e)))?
        {
            if body.len() + chunk.len() > max_body {
                return Err(CrmError::Transport(format!(
                    "{host}: answer larger than {} bytes refused",
                    max_body
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, meta, body))
    }
}

struct Meta {
    took: Duration,
    server_time: Option<Timestamp>,
    usage: Option<ApiUsage>,
    retry_after: Option<Duration>,
}

fn host_of(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => "an unnamed host".into(),
    }
}

/// A transport error without its URL (which holds the query, never a token, but is long).
fn describe(host: &str, e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "the answer was cut off"
    } else {
        "request failed"
    };
    format!("{host}: {what}")
}

#[cfg(test)]
mod tests;
