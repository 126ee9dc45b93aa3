//! The CRM job queues: Salesforce custom object `CrmJob__c` (REST query + sobjects, API v62.0) and
//! the Dataverse table `crmc_crmjob` (Web API v9.2, entity set `crmc_crmjobs`). See the crate
//! documentation for the endpoints; this module holds the handlers, the per-org job rows and the
//! controls ([`FakeProviders::seed_jobs`] and friends).
//!
//! Time: the fake keeps whole seconds (Salesforce's `If-Unmodified-Since` resolution). Salesforce
//! datetimes are written `2026-11-28T09:55:03.000+0000`, Dataverse ones `2026-11-28T09:55:03Z`; both
//! APIs accept ISO 8601 with `Z`, `+0000` or `+00:00` (any offset) and an optional fraction.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::{Account, FakeProviders, FaultTarget, Shared, State, bearer, fault_response, json_response};

const SF_BASE: &str = "/services/data/v62.0";
const SF_OBJECT: &str = "CrmJob__c";
const DV_BASE: &str = "/api/data/v9.2";
const DV_SET: &str = "crmc_crmjobs";
const SF_DEFAULT_PAGE: usize = 2000;
const DV_DEFAULT_PAGE: usize = 5000;
const DEFAULT_DAILY_MAX: u64 = 15000;
const SFORCE_LIMIT_INFO: HeaderName = HeaderName::from_static("sforce-limit-info");

/// A CRM job's status: Salesforce `Status__c` picklist value (the variant name), Dataverse
/// `crmc_status` choice value ([`JobStatus::code`]: 1 Holding … 7 Aborted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum JobStatus {
    #[default]
    Holding,
    Waiting,
    Claimed,
    Running,
    Completed,
    Failed,
    Aborted,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Holding,
        JobStatus::Waiting,
        JobStatus::Claimed,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Aborted,
    ];

    /// The Salesforce picklist value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Holding => "Holding",
            JobStatus::Waiting => "Waiting",
            JobStatus::Claimed => "Claimed",
            JobStatus::Running => "Running",
            JobStatus::Completed => "Completed",
            JobStatus::Failed => "Failed",
            JobStatus::Aborted => "Aborted",
        }
    }

    /// From the Salesforce picklist value (exact).
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// The Dataverse choice value (1 Holding … 7 Aborted).
    pub fn code(self) -> i64 {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0) as i64 + 1
    }

    pub fn from_code(code: i64) -> Option<Self> {
        usize::try_from(code - 1)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
    }
}

/// Which API shape serves a job (follows the org / environment it was seeded for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CrmApi {
    /// `CrmJob__c` on `/services/data/v62.0`.
    Salesforce,
    /// `crmc_crmjobs` on `/api/data/v9.2`.
    Dataverse,
}

/// A job to seed ([`FakeProviders::seed_jobs`], `POST /_admin/jobs`, the seed file's `jobs:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewJob {
    /// `Type__c` / `crmc_type` (JSON `jobType`, or `type`).
    #[serde(alias = "type")]
    pub job_type: String,
    /// Default `Holding`.
    #[serde(default)]
    pub status: JobStatus,
    /// `Processor__c` / `crmc_processor`; default `Cloud` (the operator's); e.g. `Desktop` is not.
    #[serde(default = "cloud")]
    pub processor: String,
}

fn cloud() -> String {
    "Cloud".into()
}

impl NewJob {
    /// A `Holding` job for the `Cloud` processor.
    pub fn new(job_type: &str) -> Self {
        NewJob {
            job_type: job_type.into(),
            status: JobStatus::Holding,
            processor: cloud(),
        }
    }

    pub fn with_status(mut self, status: JobStatus) -> Self {
        self.status = status;
        self
    }

    pub fn with_processor(mut self, processor: &str) -> Self {
        self.processor = processor.into();
        self
    }
}

/// A `jobs:` entry of the seed file: `count` (default 1) jobs like `job` for `remoteId`.
///
/// ```yaml
/// jobs:
///   - remoteId: 00D000000000001AAA   # a Salesforce org ID or a Dataverse OrganizationId
///     type: export
///     count: 3                       # optional, default 1
///     status: Holding                # optional, default Holding
///     processor: Cloud               # optional, default Cloud
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedJob {
    pub remote_id: String,
    #[serde(default = "one_job")]
    pub count: u32,
    #[serde(flatten)]
    pub job: NewJob,
}

fn one_job() -> u32 {
    1
}

/// A job as the fake holds it ([`FakeProviders::jobs`], `GET /_admin/jobs/{remoteId}`). Times are
/// whole seconds; over JSON they are ISO 8601 (`2026-11-28T09:55:03Z`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FakeJob {
    /// Salesforce `Id` (18 characters, `a0B…`) or Dataverse `crmc_crmjobid` (a GUID).
    pub id: String,
    pub api: CrmApi,
    pub job_type: String,
    pub status: JobStatus,
    pub processor: String,
    #[serde(default)]
    pub claimed_by: Option<String>,
    #[serde(default, with = "iso_opt")]
    pub claim_expires: Option<SystemTime>,
    pub attempt: i64,
    #[serde(default, with = "iso_opt")]
    pub started: Option<SystemTime>,
    #[serde(default, with = "iso_opt")]
    pub ended: Option<SystemTime>,
    #[serde(default)]
    pub result: Option<String>,
    #[serde(with = "iso")]
    pub created: SystemTime,
    /// Salesforce `LastModifiedDate` / Dataverse `modifiedon`.
    #[serde(with = "iso")]
    pub last_modified: SystemTime,
    /// Row version (Dataverse `versionnumber`); every change raises it (Salesforce rows too).
    pub version: u64,
    /// The Dataverse `@odata.etag`: `W/"<version>"`.
    pub etag: String,
}

#[derive(Debug, Clone)]
struct Job {
    /// The account key (stable across [`FakeProviders::change_remote_id`]).
    account: String,
    /// Creation order.
    seq: u64,
    id: String,
    api: CrmApi,
    job_type: String,
    status: JobStatus,
    processor: String,
    claimed_by: Option<String>,
    claim_expires: Option<i64>,
    attempt: i64,
    started: Option<i64>,
    ended: Option<i64>,
    result: Option<String>,
    created: i64,
    modified: i64,
    version: u64,
}

impl Job {
    fn matches_id(&self, id: &str) -> bool {
        match self.api {
            // Salesforce takes the 15-character (case-sensitive) form too.
            CrmApi::Salesforce => self.id == id || (id.len() == 15 && self.id.starts_with(id)),
            CrmApi::Dataverse => self.id.eq_ignore_ascii_case(id),
        }
    }

    fn etag(&self) -> String {
        format!("W/\"{}\"", self.version)
    }

    fn to_fake(&self) -> FakeJob {
        FakeJob {
            id: self.id.clone(),
            api: self.api,
            job_type: self.job_type.clone(),
            status: self.status,
            processor: self.processor.clone(),
            claimed_by: self.claimed_by.clone(),
            claim_expires: self.claim_expires.map(to_system_time),
            attempt: self.attempt,
            started: self.started.map(to_system_time),
            ended: self.ended.map(to_system_time),
            result: self.result.clone(),
            created: to_system_time(self.created),
            last_modified: to_system_time(self.modified),
            version: self.version,
            etag: self.etag(),
        }
    }
}

/// A Salesforce query's result set, snapshotted at the first request.
struct Cursor {
    account: String,
    rows: Vec<Value>,
    page: usize,
}

#[derive(Debug, Clone, Copy)]
struct ApiUsage {
    used: u64,
    max: u64,
}

/// The job rows of every org / environment and the data API knobs (part of the fake's `State`).
#[derive(Default)]
pub(crate) struct JobQueues {
    jobs: Vec<Job>,
    next_seq: u64,
    next_version: u64,
    cursors: HashMap<String, Cursor>,
    page_size: Option<usize>,
    query_delay: Duration,
    /// How long a record count (the example worker's request) takes.
    count_delay: Duration,
    usage: HashMap<String, ApiUsage>,
    /// Requests left to throttle, Retry-After seconds.
    throttle: Option<(u32, u64)>,
    /// Salesforce job IDs (lowercase) that a rival processor claims right after the next read of
    /// their record is answered, and the rival's `ClaimedBy`.
    rival_after_read: HashMap<String, String>,
}

impl JobQueues {
    fn bump_version(&mut self) -> u64 {
        self.next_version += 1;
        4_200_000 + self.next_version
    }

    fn find(&self, key: &str, id: &str) -> Option<usize> {
        self.jobs
            .iter()
            .position(|j| j.account == key && j.matches_id(id))
    }
}

// ---------------------------------------------------------------------------------------------
// Time

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn to_secs(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    }
}

fn to_system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    days_from_civil(y + i64::from(m == 12), m % 12 + 1, 1) - days_from_civil(y, m, 1)
}

fn split_time(secs: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}

/// `2026-11-28T09:55:03.000+0000` (Salesforce).
pub(crate) fn format_salesforce(secs: i64) -> String {
    let (y, m, d, h, mi, s) = split_time(secs);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.000+0000")
}

/// `2026-11-28T09:55:03Z` (Dataverse, the admin API).
pub(crate) fn format_iso(secs: i64) -> String {
    let (y, m, d, h, mi, s) = split_time(secs);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// ISO 8601 in UTC, whole seconds: `2026-11-28T09:55:03Z` (a SOQL / OData date-time literal).
pub fn iso_datetime(time: SystemTime) -> String {
    format_iso(to_secs(time))
}

const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// RFC 1123: `Sat, 28 Nov 2026 09:55:03 GMT`.
pub fn format_http_date(time: SystemTime) -> String {
    let secs = to_secs(time);
    let (y, m, d, h, mi, s) = split_time(secs);
    let weekday = WEEKDAYS[(secs.div_euclid(86400) + 4).rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    format!("{weekday}, {d:02} {month} {y:04} {h:02}:{mi:02}:{s:02} GMT")
}

/// Parses RFC 1123 (`Sat, 28 Nov 2026 09:55:03 GMT`); the weekday is not checked.
pub fn parse_http_date(value: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [weekday, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    if !weekday.ends_with(',') {
        return None;
    }
    let m = MONTHS.iter().position(|name| name == month)? as i64 + 1;
    let digits = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (y, d) = (digits(year)?, digits(day)?);
    let hms: Vec<&str> = time.split(':').collect();
    let [h, mi, s] = hms.as_slice() else {
        return None;
    };
    let (h, mi, s) = (digits(h)?, digits(mi)?, digits(s)?);
    if d < 1 || d > days_in_month(y, m) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(to_system_time(
        days_from_civil(y, m, d) * 86400 + h * 3600 + mi * 60 + s,
    ))
}

/// Parses ISO 8601 `YYYY-MM-DDTHH:MM:SS[.fff…](Z|±HH:MM|±HHMM)` to milliseconds since the epoch.
pub(crate) fn parse_iso_millis(value: &str) -> Option<i64> {
    let b = value.as_bytes();
    if b.len() < 20 || !value.is_ascii() {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let s = &value[from..to];
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())
            .flatten()
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, s) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let mut rest = &value[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let first3: String = fraction[..digits].chars().chain("00".chars()).take(3).collect();
        millis = first3.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let body = &rest[1..];
            let (oh, om) = match body.len() {
                5 if body.as_bytes()[2] == b':' => (&body[..2], &body[3..]),
                4 => (&body[..2], &body[2..]),
                _ => return None,
            };
            let all_digits = |s: &str| s.bytes().all(|c| c.is_ascii_digit());
            if !all_digits(oh) || !all_digits(om) {
                return None;
            }
            let (oh, om): (i64, i64) = (oh.parse().ok()?, om.parse().ok()?);
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let secs = days_from_civil(y, m, d) * 86400 + h * 3600 + mi * 60 + s - offset;
    Some(secs * 1000 + millis)
}

/// Serde: `SystemTime` as ISO 8601 (`2026-11-28T09:55:03Z`, whole seconds).
mod iso {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_iso(super::to_secs(*time)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_iso_millis(&text)
            .map(|ms| super::to_system_time(ms.div_euclid(1000)))
            .ok_or_else(|| serde::de::Error::custom(format!("not an ISO 8601 date-time: {text}")))
    }
}

/// Serde: `Option<SystemTime>` as ISO 8601 or null.
mod iso_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match time {
            Some(t) => super::iso::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => super::parse_iso_millis(&text)
                .map(|ms| Some(super::to_system_time(ms.div_euclid(1000))))
                .ok_or_else(|| serde::de::Error::custom(format!("not an ISO 8601 date-time: {text}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IDs

fn random_bits(shared: &Shared) -> u128 {
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let mut hasher = shared.random.build_hasher();
    hasher.write_u64(n);
    let a = hasher.finish();
    hasher.write_u64(a);
    (u128::from(a) << 64) | u128::from(hasher.finish())
}

/// `prefix` + 15 base-62 characters (a Salesforce-looking ID).
fn salesforce_id(shared: &Shared, prefix: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut bits = random_bits(shared);
    let mut id = prefix.to_string();
    for _ in 0..15 {
        id.push(ALPHABET[(bits % 62) as usize] as char);
        bits /= 62;
    }
    id
}

fn guid(shared: &Shared) -> String {
    let hex = format!("{:032x}", random_bits(shared));
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

// ---------------------------------------------------------------------------------------------
// Controls

fn seed(shared: &Shared, remote_id: &str, jobs: &[NewJob]) -> Option<Vec<String>> {
    let mut state = shared.lock();
    let key = state.key_of(remote_id)?;
    let api = match state.accounts.get(&key)? {
        Account::Salesforce(_) => CrmApi::Salesforce,
        Account::Dynamics(_) => CrmApi::Dataverse,
    };
    let now = now_secs();
    let mut ids = Vec::with_capacity(jobs.len());
    for new in jobs {
        let id = loop {
            let id = match api {
                CrmApi::Salesforce => salesforce_id(shared, "a0B"),
                CrmApi::Dataverse => guid(shared),
            };
            if !state.jobs.jobs.iter().any(|j| j.id == id) {
                break id;
            }
        };
        let version = state.jobs.bump_version();
        state.jobs.next_seq += 1;
        let seq = state.jobs.next_seq;
        state.jobs.jobs.push(Job {
            account: key.clone(),
            seq,
            id: id.clone(),
            api,
            job_type: new.job_type.clone(),
            status: new.status,
            processor: new.processor.clone(),
            claimed_by: None,
            claim_expires: None,
            attempt: 0,
            started: None,
            ended: None,
            result: None,
            created: now,
            modified: now,
            version,
        });
        ids.push(id);
    }
    Some(ids)
}

fn list(state: &State, remote_id: &str) -> Vec<FakeJob> {
    let Some(key) = state.key_of(remote_id) else {
        return Vec::new();
    };
    state
        .jobs
        .jobs
        .iter()
        .filter(|j| j.account == key)
        .map(Job::to_fake)
        .collect()
}

fn with_job<T>(
    state: &mut State,
    remote_id: &str,
    id: &str,
    f: impl FnOnce(&mut JobQueues, usize) -> T,
) -> Option<T> {
    let key = state.key_of(remote_id)?;
    let index = state.jobs.find(&key, id)?;
    Some(f(&mut state.jobs, index))
}

fn abort(state: &mut State, remote_id: &str, id: &str) -> bool {
    with_job(state, remote_id, id, |queues, i| {
        let version = queues.bump_version();
        let job = &mut queues.jobs[i];
        job.status = JobStatus::Aborted;
        job.modified = now_secs();
        job.version = version;
    })
    .is_some()
}

fn delete(state: &mut State, remote_id: &str, id: &str) -> bool {
    with_job(state, remote_id, id, |queues, i| {
        queues.jobs.remove(i);
    })
    .is_some()
}

fn set_modified(state: &mut State, remote_id: &str, id: &str, modified: SystemTime) -> bool {
    with_job(state, remote_id, id, |queues, i| {
        queues.jobs[i].modified = to_secs(modified);
    })
    .is_some()
}

fn set_usage(state: &mut State, remote_id: &str, used: u64, max: u64) -> bool {
    let Some(key) = state.key_of(remote_id) else {
        return false;
    };
    state.jobs.usage.insert(key, ApiUsage { used, max });
    true
}

impl FakeProviders {
    /// Adds jobs to an org's `CrmJob__c` or an environment's `crmc_crmjobs` (by the ID the account
    /// was added with, or its current ID), in creation order; returns their IDs (Salesforce `a0B…`,
    /// Dataverse GUIDs). New jobs: attempt 0, modified now. Panics for an unknown ID (test support).
    pub fn seed_jobs(&self, remote_id: &str, jobs: &[NewJob]) -> Vec<String> {
        self.try_seed_jobs(remote_id, jobs)
            .expect("unknown org or environment ID")
    }

    /// [`Self::seed_jobs`], `None` for an unknown ID.
    pub fn try_seed_jobs(&self, remote_id: &str, jobs: &[NewJob]) -> Option<Vec<String>> {
        seed(&self.shared, remote_id, jobs)
    }

    /// All jobs of an org / environment in creation order (empty for an unknown ID).
    pub fn jobs(&self, remote_id: &str) -> Vec<FakeJob> {
        list(&self.shared.lock(), remote_id)
    }

    /// One job (Salesforce also takes the 15-character ID; Dataverse GUIDs ignore case).
    pub fn job(&self, remote_id: &str, id: &str) -> Option<FakeJob> {
        let state = self.shared.lock();
        let key = state.key_of(remote_id)?;
        let index = state.jobs.find(&key, id)?;
        Some(state.jobs.jobs[index].to_fake())
    }

    /// Sets a job `Aborted` (as a user in the CRM would): modified now, new version. False if unknown.
    pub fn abort_job(&self, remote_id: &str, id: &str) -> bool {
        abort(&mut self.shared.lock(), remote_id, id)
    }

    /// The next read of Salesforce job `id`'s record is answered, then a rival processor claims the
    /// job as `by` (modified now, new version): the reader's conditional write after it must fail.
    pub fn rival_claims_after_next_read(&self, id: &str, by: &str) {
        self.shared
            .lock()
            .jobs
            .rival_after_read
            .insert(id.to_ascii_lowercase(), by.to_string());
    }

    /// Sets a job's result as a CRM user may (Salesforce's Long Text Area holds 131,072
    /// characters, Dataverse's multiline text 1,048,576). False if unknown.
    pub fn set_job_result(&self, remote_id: &str, id: &str, result: &str) -> bool {
        with_job(&mut self.shared.lock(), remote_id, id, |queues, i| {
            let version = queues.bump_version();
            let job = &mut queues.jobs[i];
            job.result = Some(result.to_string());
            job.modified = now_secs();
            job.version = version;
        })
        .is_some()
    }

    /// Queues a job again (as a CRM user would): Holding, no claim, modified `modified`, new
    /// version; the attempt counter stays. False if unknown.
    pub fn requeue_job(&self, remote_id: &str, id: &str, modified: SystemTime) -> bool {
        with_job(&mut self.shared.lock(), remote_id, id, |queues, i| {
            let version = queues.bump_version();
            let job = &mut queues.jobs[i];
            job.status = JobStatus::Holding;
            job.claimed_by = None;
            job.claim_expires = None;
            job.modified = to_secs(modified);
            job.version = version;
        })
        .is_some()
    }

    /// Deletes a job. False if unknown.
    pub fn delete_job(&self, remote_id: &str, id: &str) -> bool {
        delete(&mut self.shared.lock(), remote_id, id)
    }

    /// Sets a job's LastModifiedDate / modifiedon (whole seconds; the version stays), e.g. to age
    /// it without waiting. False if unknown.
    pub fn set_job_modified(&self, remote_id: &str, id: &str, modified: SystemTime) -> bool {
        set_modified(&mut self.shared.lock(), remote_id, id, modified)
    }

    /// Page size of job queries: Salesforce pages hold `n` records (default 2000); Dataverse pages
    /// hold at most `n` (and at most `Prefer: odata.maxpagesize`, default 5000). 0 restores the defaults.
    pub fn set_job_page_size(&self, n: usize) {
        self.shared.lock().jobs.page_size = (n > 0).then_some(n);
    }

    /// Every access token issued so far stops working (data APIs, Salesforce identity, WhoAmI);
    /// refresh tokens keep working. Returns how many there were.
    pub fn expire_access_tokens(&self) -> usize {
        let mut state = self.shared.lock();
        let n = state.access_tokens.len();
        state.access_tokens.clear();
        n
    }

    /// A pause between computing a job query's answer (first or next page) and sending it, so two
    /// racing clients see the same rows. Zero (the default) for none.
    pub fn set_query_delay(&self, delay: Duration) {
        self.shared.lock().jobs.query_delay = delay;
    }

    /// How long a record count (`SELECT COUNT() FROM X`, `GET {set}/$count`) takes to answer:
    /// a worker that is still running. Zero (the default) for none.
    pub fn set_count_delay(&self, delay: Duration) {
        self.shared.lock().jobs.count_delay = delay;
    }

    /// Salesforce API usage of an org: `used` data requests so far of a daily `max` (default 0 of
    /// 15000). Every data request counts one; at `used >= max` they get 403 REQUEST_LIMIT_EXCEEDED.
    /// False for an unknown ID.
    pub fn set_api_usage(&self, remote_id: &str, used: u64, max: u64) -> bool {
        set_usage(&mut self.shared.lock(), remote_id, used, max)
    }

    /// An org's Salesforce API usage `(used, max)`.
    pub fn api_usage(&self, remote_id: &str) -> Option<(u64, u64)> {
        let state = self.shared.lock();
        let key = state.key_of(remote_id)?;
        let usage = state.jobs.usage.get(&key).copied().unwrap_or(ApiUsage {
            used: 0,
            max: DEFAULT_DAILY_MAX,
        });
        Some((usage.used, usage.max))
    }

    /// The next `requests` data requests (either API, before authentication) get 429 with
    /// `Retry-After: retry_after_secs` (Dataverse's service protection answer; Salesforce body
    /// `[{"errorCode":"REQUEST_LIMIT_EXCEEDED",…}]`). 0 cancels.
    pub fn throttle_data(&self, requests: u32, retry_after_secs: u64) {
        self.shared.lock().jobs.throttle = (requests > 0).then_some((requests, retry_after_secs));
    }
}

// ---------------------------------------------------------------------------------------------
// Request gate: counters, faults, throttling, the bearer, Salesforce API usage

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Query,
    Read,
    Patch,
}

struct Ctx {
    key: String,
    limit_info: Option<HeaderValue>,
}

fn sf_error(status: u16, code: &str, message: &str) -> Response {
    json_response(status, json!([{"message": message, "errorCode": code}]))
}

fn dv_error(status: u16, code: &str, message: &str) -> Response {
    json_response(status, json!({"error": {"code": code, "message": message}}))
}

fn finish(mut response: Response, ctx: &Ctx) -> Response {
    if let Some(value) = &ctx.limit_info {
        response.headers_mut().insert(SFORCE_LIMIT_INFO, value.clone());
    }
    response
}

fn limit_info(usage: ApiUsage) -> HeaderValue {
    HeaderValue::from_str(&format!("api-usage={}/{}", usage.used, usage.max))
        .unwrap_or(HeaderValue::from_static("api-usage=0/0"))
}

async fn gate(shared: &Shared, api: CrmApi, kind: Kind, headers: &HeaderMap) -> Result<Ctx, Response> {
    let fault = {
        let mut state = shared.lock();
        match kind {
            Kind::Query => state.stats.job_queries += 1,
            Kind::Read => state.stats.job_reads += 1,
            Kind::Patch => state.stats.job_patches += 1,
        }
        let target = match api {
            CrmApi::Salesforce => FaultTarget::SalesforceData,
            CrmApi::Dataverse => FaultTarget::DataverseData,
        };
        let fault = state.take_fault(target);
        if let Some(f) = &fault
            && (f.status == 429 || (f.status == 403 && f.body.contains("REQUEST_LIMIT_EXCEEDED")))
        {
            state.stats.job_api_throttled += 1;
        }
        fault
    };
    if let Some(fault) = fault {
        return Err(fault_response(fault).await);
    }
    let mut state = shared.lock();
    if let Some((left, retry_after)) = state.jobs.throttle {
        state.jobs.throttle = (left > 1).then_some((left - 1, retry_after));
        state.stats.job_api_throttled += 1;
        let mut response = match api {
            CrmApi::Salesforce => sf_error(429, "REQUEST_LIMIT_EXCEEDED", "Too many requests, retry later."),
            CrmApi::Dataverse => dv_error(
                429,
                "0x80072322",
                "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
            ),
        };
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        return Err(response);
    }
    let account = bearer(headers)
        .and_then(|token| state.access_tokens.get(&token).cloned())
        .and_then(|key| state.accounts.get(&key).map(|a| (key, a.clone())));
    let key = match (api, account) {
        (CrmApi::Salesforce, Some((key, Account::Salesforce(_))))
        | (CrmApi::Dataverse, Some((key, Account::Dynamics(_)))) => key,
        (CrmApi::Salesforce, _) => {
            let mut response = sf_error(401, "INVALID_SESSION_ID", "Session expired or invalid");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Token"));
            return Err(response);
        }
        (CrmApi::Dataverse, _) => {
            return Err((
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
                "",
            )
                .into_response());
        }
    };
    if api == CrmApi::Dataverse {
        return Ok(Ctx {
            key,
            limit_info: None,
        });
    }
    let usage = state.jobs.usage.entry(key.clone()).or_insert(ApiUsage {
        used: 0,
        max: DEFAULT_DAILY_MAX,
    });
    if usage.used >= usage.max {
        let info = limit_info(*usage);
        state.stats.job_api_throttled += 1;
        let ctx = Ctx {
            key,
            limit_info: Some(info),
        };
        return Err(finish(
            sf_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
            &ctx,
        ));
    }
    usage.used += 1;
    let info = limit_info(*usage);
    Ok(Ctx {
        key,
        limit_info: Some(info),
    })
}

/// The discover filter both APIs express: ours, and Holding / Waiting or a lapsed claim, of the types.
struct Discover {
    bound_ms: i64,
    types: Option<Vec<String>>,
}

impl Discover {
    fn matches(&self, job: &Job) -> bool {
        job.processor.eq_ignore_ascii_case("Cloud")
            && match job.status {
                JobStatus::Holding | JobStatus::Waiting => true,
                JobStatus::Claimed => job.claim_expires.is_some_and(|e| e * 1000 < self.bound_ms),
                _ => false,
            }
            && self
                .types
                .as_ref()
                .is_none_or(|types| types.iter().any(|t| t.eq_ignore_ascii_case(&job.job_type)))
    }
}

/// Collapses whitespace, and drops it before `( ) , = <` and after `( , = <`.
fn normalize(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let chars: Vec<char> = collapsed.chars().collect();
    let mut out = String::with_capacity(chars.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == ' '
            && (out.ends_with(|p: char| "(,=<".contains(p))
                || chars.get(i + 1).is_some_and(|&n| "(),=<".contains(n)))
        {
            continue;
        }
        out.push(c);
    }
    out
}

/// The value of a `'quoted'` literal.
fn unquote(literal: &str) -> Option<&str> {
    let inner = literal.strip_prefix('\'')?.strip_suffix('\'')?;
    (!inner.contains('\'')).then_some(inner)
}

// ---------------------------------------------------------------------------------------------
// Salesforce

const SF_FIELDS: [&str; 12] = [
    "Id",
    "Type__c",
    "Status__c",
    "Processor__c",
    "ClaimedBy__c",
    "ClaimExpires__c",
    "Attempt__c",
    "Started__c",
    "Ended__c",
    "Result__c",
    "CreatedDate",
    "LastModifiedDate",
];

fn sf_field(name: &str) -> Option<&'static str> {
    SF_FIELDS.into_iter().find(|f| f.eq_ignore_ascii_case(name))
}

fn sf_value(job: &Job, field: &str) -> Value {
    let time = |t: Option<i64>| t.map_or(Value::Null, |s| json!(format_salesforce(s)));
    match field {
        "Id" => json!(job.id),
        "Type__c" => json!(job.job_type),
        "Status__c" => json!(job.status.as_str()),
        "Processor__c" => json!(job.processor),
        "ClaimedBy__c" => json!(job.claimed_by),
        "ClaimExpires__c" => time(job.claim_expires),
        "Attempt__c" => json!(job.attempt),
        "Started__c" => time(job.started),
        "Ended__c" => time(job.ended),
        "Result__c" => json!(job.result),
        "CreatedDate" => time(Some(job.created)),
        "LastModifiedDate" => time(Some(job.modified)),
        _ => Value::Null,
    }
}

fn sf_record(job: &Job, fields: &[&str]) -> Value {
    let mut record = Map::new();
    record.insert(
        "attributes".into(),
        json!({"type": SF_OBJECT, "url": format!("{SF_BASE}/sobjects/{SF_OBJECT}/{}", job.id)}),
    );
    for field in fields {
        record.insert((*field).to_string(), sf_value(job, field));
    }
    Value::Object(record)
}

struct Soql {
    fields: Vec<&'static str>,
    discover: Discover,
    limit: Option<usize>,
}

type SfError = (&'static str, String);

fn malformed(message: impl Into<String>) -> SfError {
    ("MALFORMED_QUERY", message.into())
}

/// Parses just enough of the discover SOQL (see the crate documentation).
fn parse_soql(query: &str) -> Result<Soql, SfError> {
    let norm = normalize(query);
    let lower = norm.to_ascii_lowercase();
    if !lower.starts_with("select ") {
        return Err(malformed("unexpected token: expected SELECT"));
    }
    let from = lower
        .find(" from ")
        .ok_or_else(|| malformed("unexpected token: expected FROM"))?;
    let mut fields = Vec::new();
    for name in norm[7..from].split(',') {
        let name = name.trim();
        let field = sf_field(name).ok_or_else(|| {
            (
                "INVALID_FIELD",
                format!("No such column '{name}' on entity '{SF_OBJECT}'. If you are attempting to use a custom field, be sure to append the '__c' after the custom field name."),
            )
        })?;
        fields.push(field);
    }
    let object = norm[from + 6..].split([' ', '(']).next().unwrap_or_default();
    if !object.eq_ignore_ascii_case(SF_OBJECT) {
        return Err((
            "INVALID_TYPE",
            format!("sObject type '{object}' is not supported."),
        ));
    }
    let where_at = lower
        .find(" where ")
        .ok_or_else(|| malformed("the fake needs a WHERE clause"))?
        + 7;
    let clause = &lower[where_at..];
    for required in [
        "processor__c='cloud'",
        "status__c in('holding','waiting')",
        "status__c='claimed'",
    ] {
        if !clause.contains(required) {
            return Err(malformed(format!(
                "the fake expects the discover query (missing {required})"
            )));
        }
    }
    let bound_at = clause
        .find("claimexpires__c<")
        .ok_or_else(|| malformed("the fake expects ClaimExpires__c < <datetime>"))?
        + where_at
        + "claimexpires__c<".len();
    let literal_len = norm[bound_at..].find([')', ' ']).unwrap_or(norm.len() - bound_at);
    let literal = &norm[bound_at..bound_at + literal_len];
    let bound_ms = parse_iso_millis(literal)
        .ok_or_else(|| malformed(format!("invalid date-time literal: {literal}")))?;
    let types = match clause.find("type__c in(") {
        None => None,
        Some(at) => {
            let start = where_at + at + "type__c in(".len();
            let end = norm[start..]
                .find(')')
                .ok_or_else(|| malformed("unterminated Type__c IN ("))?
                + start;
            let values = norm[start..end]
                .split(',')
                .map(|v| unquote(v.trim()).map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed(format!("bad Type__c list: ({})", &norm[start..end])))?;
            Some(values)
        }
    };
    let limit = match lower.rfind(" limit ") {
        None => None,
        Some(at) => {
            let text = norm[at + 7..].trim();
            Some(
                text.parse::<usize>()
                    .map_err(|_| malformed(format!("bad LIMIT: {text}")))?,
            )
        }
    };
    Ok(Soql {
        fields,
        discover: Discover { bound_ms, types },
        limit,
    })
}

type Shared_ = AxState<Arc<Shared>>;

async fn delay(shared: &Shared) {
    let delay = shared.lock().jobs.query_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

pub(crate) async fn sf_query(
    AxState(shared): Shared_,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let ctx = match gate(&shared, CrmApi::Salesforce, Kind::Query, &headers).await {
        Ok(ctx) => ctx,
        Err(response) => return response,
    };
    let Some(q) = params.get("q") else {
        return finish(sf_error(400, "MALFORMED_QUERY", "missing the q parameter"), &ctx);
    };
    // `SELECT COUNT() FROM <object>` (the example worker): every object holds RECORD_COUNT records.
    let words: Vec<String> = q.split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
    if words.len() == 4 && words[0] == "SELECT" && words[1] == "COUNT()" && words[2] == "FROM" {
        count_delay(&shared).await;
        if words[3].eq_ignore_ascii_case(HUGE_ANSWER_OBJECT) {
            return finish(json_response(200, huge_count_answer()), &ctx);
        }
        if words[3].eq_ignore_ascii_case(NO_SUCH_OBJECT) {
            // What Salesforce answers for an object the org does not have.
            let object = q.split_whitespace().nth(3).unwrap_or_default();
            return finish(
                sf_error(
                    400,
                    "INVALID_TYPE",
                    &format!("sObject type '{object}' is not supported."),
                ),
                &ctx,
            );
        }
        return finish(
            json_response(
                200,
                json!({"totalSize": RECORD_COUNT, "done": true, "records": []}),
            ),
            &ctx,
        );
    }
    let soql = match parse_soql(q) {
        Ok(soql) => soql,
        Err((code, message)) => return finish(sf_error(400, code, &message), &ctx),
    };
    let body = {
        let mut state = shared.lock();
        let rows: Vec<Value> = state
            .jobs
            .jobs
            .iter()
            .filter(|j| j.account == ctx.key && j.api == CrmApi::Salesforce && soql.discover.matches(j))
            .take(soql.limit.unwrap_or(usize::MAX))
            .map(|j| sf_record(j, &soql.fields))
            .collect();
        let page = state.jobs.page_size.unwrap_or(SF_DEFAULT_PAGE);
        let total = rows.len();
        let mut body = json!({
            "totalSize": total,
            "done": total <= page,
            "records": rows[..total.min(page)],
        });
        if total > page {
            let locator = salesforce_id(&shared, "01g");
            body["nextRecordsUrl"] = json!(format!("{SF_BASE}/query/{locator}-{page}"));
            state.jobs.cursors.insert(
                locator,
                Cursor {
                    account: ctx.key.clone(),
                    rows,
                    page,
                },
            );
        }
        body
    };
    delay(&shared).await;
    finish(json_response(200, body), &ctx)
}

pub(crate) async fn sf_query_more(
    AxState(shared): Shared_,
    Path(locator): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ctx = match gate(&shared, CrmApi::Salesforce, Kind::Query, &headers).await {
        Ok(ctx) => ctx,
        Err(response) => return response,
    };
    let body = {
        let state = shared.lock();
        let cursor = locator.rsplit_once('-').and_then(|(id, offset)| {
            let cursor = state.jobs.cursors.get(id)?;
            let offset: usize = offset.parse().ok()?;
            (cursor.account == ctx.key && offset > 0 && offset < cursor.rows.len())
                .then_some((id, cursor, offset))
        });
        let Some((id, cursor, offset)) = cursor else {
            drop(state);
            return finish(
                sf_error(400, "INVALID_QUERY_LOCATOR", "invalid query locator"),
                &ctx,
            );
        };
        let end = (offset + cursor.page).min(cursor.rows.len());
        let mut body = json!({
            "totalSize": cursor.rows.len(),
            "done": end == cursor.rows.len(),
            "records": cursor.rows[offset..end],
        });
        if end < cursor.rows.len() {
            body["nextRecordsUrl"] = json!(format!("{SF_BASE}/query/{id}-{end}"));
        }
        body
    };
    delay(&shared).await;
    finish(json_response(200, body), &ctx)
}

fn sf_not_found() -> Response {
    sf_error(404, "NOT_FOUND", "The requested resource does not exist")
}

pub(crate) async fn sf_read(
    AxState(shared): Shared_,
    Path((object, id)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let ctx = match gate(&shared, CrmApi::Salesforce, Kind::Read, &headers).await {
        Ok(ctx) => ctx,
        Err(response) => return response,
    };
    // `?fields=A,B`: only those (Salesforce answers 400 INVALID_FIELD for one it does not know).
    let fields: Vec<&'static str> = match params.get("fields") {
        None => SF_FIELDS.to_vec(),
        Some(list) => {
            let mut fields = Vec::new();
            for name in list.split(',').map(str::trim) {
                match sf_field(name) {
                    Some(field) => fields.push(field),
                    None => {
                        return finish(
                            sf_error(
                                400,
                                "INVALID_FIELD",
                                &format!("No such column '{name}' on sobject of type {SF_OBJECT}"),
                            ),
                            &ctx,
                        );
                    }
                }
            }
            fields
        }
    };
    let mut state = shared.lock();
    let index = (object == SF_OBJECT)
        .then(|| state.jobs.find(&ctx.key, &id))
        .flatten();
    let record = index.map(|i| sf_record(&state.jobs.jobs[i], &fields));
    if let Some(i) = index
        && let Some(by) = state.jobs.rival_after_read.remove(&id.to_ascii_lowercase())
    {
        // A rival processor claims the job between this read and the reader's next write.
        let version = state.jobs.bump_version();
        let job = &mut state.jobs.jobs[i];
        job.status = JobStatus::Claimed;
        job.claimed_by = Some(by);
        job.claim_expires = Some(now_secs() + 900);
        job.modified = now_secs();
        job.version = version;
    }
    drop(state);
    match record {
        Some(record) => finish(json_response(200, record), &ctx),
        None => finish(sf_not_found(), &ctx),
    }
}

/// A validated change to a job (either API).
#[derive(Default)]
struct JobPatch {
    status: Option<JobStatus>,
    claimed_by: Option<Option<String>>,
    claim_expires: Option<Option<i64>>,
    attempt: Option<i64>,
    started: Option<Option<i64>>,
    ended: Option<Option<i64>>,
    result: Option<Option<String>>,
}

impl JobPatch {
    fn apply(self, job: &mut Job) {
        if let Some(v) = self.status {
            job.status = v;
        }
        if let Some(v) = self.claimed_by {
            job.claimed_by = v;
        }
        if let Some(v) = self.claim_expires {
            job.claim_expires = v;
        }
        if let Some(v) = self.attempt {
            job.attempt = v;
        }
        if let Some(v) = self.started {
            job.started = v;
        }
        if let Some(v) = self.ended {
            job.ended = v;
        }
        if let Some(v) = self.result {
            job.result = v;
        }
    }
}

fn opt_string(value: &Value) -> Option<Option<String>> {
    match value {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s.clone())),
        _ => None,
    }
}

/// A date-time (whole seconds) or null.
fn opt_datetime(value: &Value) -> Option<Option<i64>> {
    match value {
        Value::Null => Some(None),
        Value::String(s) => parse_iso_millis(s).map(|ms| Some(ms.div_euclid(1000))),
        _ => None,
    }
}

fn integer(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && f.abs() < 1e15)
            .map(|f| f.round() as i64)
    })
}

fn parse_sf_patch(body: &[u8]) -> Result<JobPatch, SfError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ("JSON_PARSER_ERROR", e.to_string()))?;
    let Value::Object(map) = value else {
        return Err((
            "JSON_PARSER_ERROR",
            "Cannot deserialize instance of CrmJob__c: expected a JSON object".into(),
        ));
    };
    let mut patch = JobPatch::default();
    let bad = |name: &str, kind: &str, v: &Value| {
        (
            "JSON_PARSER_ERROR",
            format!("Cannot deserialize instance of {kind} from {v} value for field {name}"),
        )
    };
    for (name, v) in &map {
        if name == "attributes" {
            continue;
        }
        match sf_field(name) {
            Some("Status__c") => {
                patch.status = Some(v.as_str().and_then(JobStatus::parse).ok_or_else(|| {
                    (
                        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                        format!("Status: bad value for restricted picklist field: {v}"),
                    )
                })?)
            }
            Some("ClaimedBy__c") => {
                patch.claimed_by = Some(opt_string(v).ok_or_else(|| bad(name, "string", v))?)
            }
            Some("Result__c") => patch.result = Some(opt_string(v).ok_or_else(|| bad(name, "string", v))?),
            Some("ClaimExpires__c") => {
                patch.claim_expires = Some(opt_datetime(v).ok_or_else(|| bad(name, "datetime", v))?)
            }
            Some("Started__c") => {
                patch.started = Some(opt_datetime(v).ok_or_else(|| bad(name, "datetime", v))?)
            }
            Some("Ended__c") => patch.ended = Some(opt_datetime(v).ok_or_else(|| bad(name, "datetime", v))?),
            Some("Attempt__c") => patch.attempt = Some(integer(v).ok_or_else(|| bad(name, "double", v))?),
            Some(read_only) => {
                return Err((
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    format!(
                        "Unable to create/update fields: {read_only}. Please check the security settings of this field and verify that it is read/write for your profile or permission set."
                    ),
                ));
            }
            None => {
                return Err((
                    "INVALID_FIELD",
                    format!("No such column '{name}' on sobject of type {SF_OBJECT}"),
                ));
            }
        }
    }
    Ok(patch)
}

pub(crate) async fn sf_patch(
    AxState(shared): Shared_,
    Path((object, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ctx = match gate(&shared, CrmApi::Salesforce, Kind::Patch, &headers).await {
        Ok(ctx) => ctx,
        Err(response) => return response,
    };
    if object != SF_OBJECT {
        return finish(sf_not_found(), &ctx);
    }
    let patch = match parse_sf_patch(&body) {
        Ok(patch) => patch,
        Err((code, message)) => return finish(sf_error(400, code, &message), &ctx),
    };
    let unmodified_since = match headers.get(header::IF_UNMODIFIED_SINCE) {
        None => None,
        Some(value) => match value.to_str().ok().and_then(parse_http_date) {
            Some(time) => Some((to_secs(time), value.to_str().unwrap_or_default().to_string())),
            None => {
                return finish(
                    sf_error(
                        400,
                        "INVALID_HEADER_TYPE",
                        "If-Unmodified-Since is not an RFC 1123 date",
                    ),
                    &ctx,
                );
            }
        },
    };
    let mut state = shared.lock();
    let Some(index) = state.jobs.find(&ctx.key, &id) else {
        return finish(sf_not_found(), &ctx);
    };
    if let Some((since, text)) = unmodified_since
        && state.jobs.jobs[index].modified > since
    {
        state.stats.job_patch_conflicts += 1;
        return finish(
            sf_error(
                412,
                "PRECONDITION_FAILED",
                &format!(
                    "The requested resource has been modified since the time specified in If-Unmodified-Since: {text}"
                ),
            ),
            &ctx,
        );
    }
    let version = state.jobs.bump_version();
    let job = &mut state.jobs.jobs[index];
    patch.apply(job);
    job.modified = now_secs();
    job.version = version;
    drop(state);
    finish(StatusCode::NO_CONTENT.into_response(), &ctx)
}

// ---------------------------------------------------------------------------------------------
// Dataverse

const DV_COLUMNS: [&str; 13] = [
    "crmc_crmjobid",
    "crmc_type",
    "crmc_status",
    "crmc_processor",
    "crmc_claimedby",
    "crmc_claimexpires",
    "crmc_attempt",
    "crmc_started",
    "crmc_ended",
    "crmc_result",
    "createdon",
    "modifiedon",
    "versionnumber",
];

fn dv_value(job: &Job, column: &str) -> Value {
    let time = |t: Option<i64>| t.map_or(Value::Null, |s| json!(format_iso(s)));
    match column {
        "crmc_crmjobid" => json!(job.id),
        "crmc_type" => json!(job.job_type),
        "crmc_status" => json!(job.status.code()),
        "crmc_processor" => json!(job.processor),
        "crmc_claimedby" => json!(job.claimed_by),
        "crmc_claimexpires" => time(job.claim_expires),
        "crmc_attempt" => json!(job.attempt),
        "crmc_started" => time(job.started),
        "crmc_ended" => time(job.ended),
        "crmc_result" => json!(job.result),
        "createdon" => time(Some(job.created)),
        "modifiedon" => time(Some(job.modified)),
        "versionnumber" => json!(job.version),
        _ => Value::Null,
    }
}

fn dv_row(job: &Job, columns: &[&str]) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("@odata.etag".into(), json!(job.etag()));
    row.insert("crmc_crmjobid".into(), json!(job.id));
    for column in columns {
        row.insert((*column).to_string(), dv_value(job, column));
    }
    row
}

fn dv_entity(shared: &Shared, job: &Job, columns: &[&str]) -> Value {
    let mut row = dv_row(job, columns);
    row.insert(
        "@odata.context".into(),
        json!(format!("{}{DV_BASE}/$metadata#{DV_SET}/$entity", shared.url)),
    );
    Value::Object(row)
}

const DV_QUERY_ERROR: &str = "0x80060888";

/// The columns a `$select` names (all without one); an unknown one is Dataverse's 400 (its message).
fn dv_columns(select: Option<&str>) -> Result<Vec<&'static str>, String> {
    let Some(select) = select else {
        return Ok(DV_COLUMNS.to_vec());
    };
    select
        .split(',')
        .map(str::trim)
        .map(|name| {
            DV_COLUMNS.iter().find(|c| **c == name).copied().ok_or_else(|| {
                format!(
                    "Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.crmc_crmjob'."
                )
            })
        })
        .collect()
}

/// Parses just enough of the discover `$filter` (see the crate documentation).
fn parse_filter(filter: &str) -> Result<Discover, String> {
    let norm = normalize(filter);
    let lower = norm.to_ascii_lowercase();
    for required in [
        "crmc_processor eq 'cloud'",
        "crmc_status eq 1",
        "crmc_status eq 2",
        "crmc_status eq 3",
    ] {
        if !lower.contains(required) {
            return Err(format!(
                "Syntax error: the fake expects the discover $filter (missing {required})"
            ));
        }
    }
    let at = lower
        .find("crmc_claimexpires lt ")
        .ok_or("Syntax error: the fake expects crmc_claimexpires lt <datetime>")?
        + "crmc_claimexpires lt ".len();
    let len = norm[at..].find([')', ' ']).unwrap_or(norm.len() - at);
    let literal = &norm[at..at + len];
    let bound_ms = parse_iso_millis(literal)
        .ok_or_else(|| format!("Syntax error: '{literal}' is not a valid DateTimeOffset literal"))?;
    let mut types = Vec::new();
    let mut rest = 0;
    while let Some(found) = lower[rest..].find("crmc_type eq ") {
        let start = rest + found + "crmc_type eq ".len();
        let literal = norm[start..].split([')', ' ']).next().unwrap_or_default();
        let value =
            unquote(literal).ok_or_else(|| format!("Syntax error: bad crmc_type literal {literal}"))?;
        types.push(value.to_string());
        rest = start + literal.len();
    }
    Ok(Discover {
        bound_ms,
        types: (!types.is_empty()).then_some(types),
    })
}

fn prefer(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_ascii_lowercase())
        .collect()
}

fn max_page_size(headers: &HeaderMap) -> Option<usize> {
    prefer(headers)
        .iter()
        .find_map(|p| p.strip_prefix("odata.maxpagesize=")?.trim().parse().ok())
}

fn encode_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~$'(),:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Which row the previous page ended at, from `$skiptoken` (`<cookie pagenumber="2" … lastseq="17" />`).
fn parse_skiptoken(token: &str) -> Option<(u64, u64)> {
    let attribute = |name: &str| -> Option<u64> {
        let start = token.find(&format!("{name}=\""))? + name.len() + 2;
        let end = token[start..].find('"')? + start;
        token[start..end].parse().ok()
    };
    Some((attribute("pagenumber")?, attribute("lastseq")?))
}

enum Segment {
    Collection,
    Row(String),
}

fn segment(text: &str) -> Option<Segment> {
    if text == DV_SET {
        return Some(Segment::Collection);
    }
    let id = text.strip_prefix("crmc_crmjobs(")?.strip_suffix(')')?;
    Some(Segment::Row(id.trim_matches(['{', '}']).to_string()))
}

fn dv_segment_not_found(text: &str) -> Response {
    dv_error(
        404,
        DV_QUERY_ERROR,
        &format!("Resource not found for the segment '{text}'."),
    )
}

/// How many records every other object (Salesforce `SELECT COUNT() FROM X`, Dataverse
/// `GET /api/data/v9.2/{set}/$count`) holds in the fake: what the example worker counts.
pub const RECORD_COUNT: u64 = 42;

/// The Salesforce object (and, [`NO_SUCH_ENTITY_SET`], the Dataverse entity set) the fake's orgs
/// do not have: counting it gets Salesforce's 400 `INVALID_TYPE` or Dataverse's 404 `0x8006088a`
/// ("Resource not found for the segment").
pub const NO_SUCH_OBJECT: &str = "NoSuchObject__c";
/// See [`NO_SUCH_OBJECT`].
pub const NO_SUCH_ENTITY_SET: &str = "nosuchobjects";
/// The Salesforce object (and, [`HUGE_ANSWER_ENTITY_SET`], the Dataverse entity set) whose count
/// answers with [`HUGE_ANSWER_BYTES`] bytes: a CRM (or a proxy) that sends far more than asked.
pub const HUGE_ANSWER_OBJECT: &str = "HugeAnswer__c";
/// See [`HUGE_ANSWER_OBJECT`].
pub const HUGE_ANSWER_ENTITY_SET: &str = "hugeanswers";
/// See [`HUGE_ANSWER_OBJECT`].
pub const HUGE_ANSWER_BYTES: usize = 8 << 20;

fn huge_count_answer() -> Value {
    json!({"totalSize": RECORD_COUNT, "done": true, "records": [], "padding": "x".repeat(HUGE_ANSWER_BYTES)})
}

async fn count_delay(shared: &Shared) {
    let delay = shared.lock().jobs.count_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// `GET /api/data/v9.2/{set}/$count` → `42` (text).
pub(crate) async fn dv_count(
    AxState(shared): Shared_,
    Path(set): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ctx = match gate(&shared, CrmApi::Dataverse, Kind::Read, &headers).await {
        Ok(ctx) => ctx,
        Err(response) => return response,
    };
    count_delay(&shared).await;
    if set == HUGE_ANSWER_ENTITY_SET {
        return finish(
            (
                [(header::CONTENT_TYPE, "text/plain")],
                "4".repeat(HUGE_ANSWER_BYTES),
            )
                .into_response(),
            &ctx,
        );
    }
    if set == NO_SUCH_ENTITY_SET {
        return finish(
            dv_error(
                404,
                "0x8006088a",
                &format!("Resource not found for the segment '{set}'."),
            ),
            &ctx,
        );
    }
    finish(
        ([(header::CONTENT_TYPE, "text/plain")], RECORD_COUNT.to_string()).into_response(),
        &ctx,
    )
}

pub(crate) async fn dv_get(
    shared: Shared_,
    Path(text): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    match segment(&text) {
        Some(Segment::Collection) => dv_query(shared, params, headers).await,
        Some(Segment::Row(id)) => dv_read(shared, id, params, headers).await,
        None => dv_segment_not_found(&text),
    }
}

async fn dv_query(AxState(shared): Shared_, params: Vec<(String, String)>, headers: HeaderMap) -> Response {
    let key = match gate(&shared, CrmApi::Dataverse, Kind::Query, &headers).await {
        Ok(ctx) => ctx.key,
        Err(response) => return response,
    };
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let Some(filter) = param("$filter") else {
        return dv_error(400, DV_QUERY_ERROR, "the fake needs the discover $filter");
    };
    let discover = match parse_filter(filter) {
        Ok(discover) => discover,
        Err(message) => return dv_error(400, DV_QUERY_ERROR, &message),
    };
    let columns = match dv_columns(param("$select")) {
        Ok(columns) => columns,
        Err(message) => return dv_error(400, DV_QUERY_ERROR, &message),
    };
    if let Some(order) = param("$orderby")
        && !matches!(
            normalize(order).to_ascii_lowercase().as_str(),
            "createdon" | "createdon asc"
        )
    {
        return dv_error(
            400,
            DV_QUERY_ERROR,
            &format!("the fake orders by createdon asc only, not '{order}'"),
        );
    }
    let (page_number, after) = match param("$skiptoken") {
        None => (1, 0),
        Some(token) => match parse_skiptoken(token) {
            Some(parsed) => parsed,
            None => return dv_error(400, DV_QUERY_ERROR, "Invalid $skiptoken."),
        },
    };
    let requested = max_page_size(&headers);
    let body = {
        let state = shared.lock();
        let page = requested
            .unwrap_or(DV_DEFAULT_PAGE)
            .min(state.jobs.page_size.unwrap_or(DV_DEFAULT_PAGE))
            .max(1);
        let matching: Vec<&Job> = state
            .jobs
            .jobs
            .iter()
            .filter(|j| {
                j.account == key && j.api == CrmApi::Dataverse && j.seq > after && discover.matches(j)
            })
            .take(page + 1)
            .collect();
        let rows: Vec<Value> = matching
            .iter()
            .take(page)
            .map(|j| Value::Object(dv_row(j, &columns)))
            .collect();
        let context = match param("$select") {
            Some(_) => format!(
                "{}{DV_BASE}/$metadata#{DV_SET}({})",
                shared.url,
                columns.join(",")
            ),
            None => format!("{}{DV_BASE}/$metadata#{DV_SET}", shared.url),
        };
        let mut body = json!({"@odata.context": context, "value": rows});
        if matching.len() > page {
            let last = matching[page - 1].seq;
            let cookie = format!(
                "<cookie pagenumber=\"{}\" pagingcookie=\"\" istracking=\"False\" lastseq=\"{last}\" />",
                page_number + 1
            );
            let mut query: Vec<String> = params
                .iter()
                .filter(|(k, _)| k != "$skiptoken")
                .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
                .collect();
            query.push(format!("$skiptoken={}", encode_component(&cookie)));
            body["@odata.nextLink"] = json!(format!("{}{DV_BASE}/{DV_SET}?{}", shared.url, query.join("&")));
        }
        body
    };
    delay(&shared).await;
    let mut response = json_response(200, body);
    response
        .headers_mut()
        .insert("odata-version", HeaderValue::from_static("4.0"));
    if let Some(n) = requested
        && let Ok(value) = HeaderValue::from_str(&format!("odata.maxpagesize={n}"))
    {
        response.headers_mut().insert("preference-applied", value);
    }
    response
}

fn dv_missing(id: &str) -> Response {
    dv_error(
        404,
        "0x80040217",
        &format!("crmc_crmjob With Id = {id} Does Not Exist"),
    )
}

async fn dv_read(
    AxState(shared): Shared_,
    id: String,
    params: Vec<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let ctx = match gate(&shared, CrmApi::Dataverse, Kind::Read, &headers).await {
        Ok(ctx) => ctx,
        Err(response) => return response,
    };
    let select = params
        .iter()
        .find(|(k, _)| k == "$select")
        .map(|(_, v)| v.as_str());
    let columns = match dv_columns(select) {
        Ok(columns) => columns,
        Err(message) => return dv_error(400, DV_QUERY_ERROR, &message),
    };
    let state = shared.lock();
    let row = state
        .jobs
        .find(&ctx.key, &id)
        .map(|i| dv_entity(&shared, &state.jobs.jobs[i], &columns));
    drop(state);
    match row {
        Some(row) => json_response(200, row),
        None => dv_missing(&id),
    }
}

fn parse_dv_patch(body: &[u8]) -> Result<JobPatch, (&'static str, String)> {
    const PAYLOAD: &str = "0x80048d19";
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        (
            PAYLOAD,
            format!("Error identified in Payload provided by the user for Entity :'crmc_crmjobs': {e}"),
        )
    })?;
    let Value::Object(map) = value else {
        return Err((PAYLOAD, "the request body is not a JSON object".into()));
    };
    let mut patch = JobPatch::default();
    let bad = |name: &str, kind: &str, v: &Value| {
        (
            PAYLOAD,
            format!(
                "Error identified in Payload provided by the user for Entity :'crmc_crmjobs': cannot convert {v} to {kind} for property '{name}'"
            ),
        )
    };
    for (name, v) in &map {
        if name.starts_with('@') {
            continue;
        }
        match name.as_str() {
            "crmc_status" => {
                let code = integer(v).ok_or_else(|| bad(name, "Edm.Int32", v))?;
                patch.status = Some(JobStatus::from_code(code).ok_or_else(|| {
                    (
                        "0x8004431a",
                        format!("A validation error occurred. The value {code} of 'crmc_status' on record of type 'crmc_crmjob' is outside the valid range."),
                    )
                })?)
            }
            "crmc_claimedby" => {
                patch.claimed_by = Some(opt_string(v).ok_or_else(|| bad(name, "Edm.String", v))?)
            }
            "crmc_result" => patch.result = Some(opt_string(v).ok_or_else(|| bad(name, "Edm.String", v))?),
            "crmc_claimexpires" => {
                patch.claim_expires = Some(opt_datetime(v).ok_or_else(|| bad(name, "Edm.DateTimeOffset", v))?)
            }
            "crmc_started" => {
                patch.started = Some(opt_datetime(v).ok_or_else(|| bad(name, "Edm.DateTimeOffset", v))?)
            }
            "crmc_ended" => {
                patch.ended = Some(opt_datetime(v).ok_or_else(|| bad(name, "Edm.DateTimeOffset", v))?)
            }
            "crmc_attempt" => patch.attempt = Some(v.as_i64().ok_or_else(|| bad(name, "Edm.Int32", v))?),
            other if DV_COLUMNS.contains(&other) => {
                return Err((PAYLOAD, format!("the fake does not let clients write '{other}'")));
            }
            other => {
                return Err((
                    DV_QUERY_ERROR,
                    format!(
                        "The property '{other}' does not exist on type 'Microsoft.Dynamics.CRM.crmc_crmjob'. Make sure to only use property names that are defined by the type."
                    ),
                ));
            }
        }
    }
    Ok(patch)
}

fn etag_matches(if_match: &str, version: u64) -> bool {
    if_match.split(',').any(|tag| {
        let tag = tag.trim();
        tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).trim_matches('"') == version.to_string()
    })
}

pub(crate) async fn dv_patch(
    AxState(shared): Shared_,
    Path(text): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(Segment::Row(id)) = segment(&text) else {
        return dv_segment_not_found(&text);
    };
    let ctx = match gate(&shared, CrmApi::Dataverse, Kind::Patch, &headers).await {
        Ok(ctx) => ctx,
        Err(response) => return response,
    };
    let patch = match parse_dv_patch(&body) {
        Ok(patch) => patch,
        Err((code, message)) => return dv_error(400, code, &message),
    };
    let if_match = headers
        .get(header::IF_MATCH)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let representation = prefer(&headers).iter().any(|p| p == "return=representation");
    let mut state = shared.lock();
    // The fake never upserts: a missing row is 404 with or without If-Match.
    let Some(index) = state.jobs.find(&ctx.key, &id) else {
        return dv_missing(&id);
    };
    if let Some(tag) = &if_match
        && !etag_matches(tag, state.jobs.jobs[index].version)
    {
        state.stats.job_patch_conflicts += 1;
        return dv_error(
            412,
            "0x80060882",
            "The version of the existing record doesn't match the RowVersion property provided.",
        );
    }
    let version = state.jobs.bump_version();
    let job = &mut state.jobs.jobs[index];
    patch.apply(job);
    job.modified = now_secs();
    job.version = version;
    let job = job.clone();
    drop(state);
    let entity_id = format!("{}{DV_BASE}/{DV_SET}({})", shared.url, job.id);
    let mut response = if representation {
        let mut response = json_response(200, dv_entity(&shared, &job, &DV_COLUMNS));
        if let Ok(value) = HeaderValue::from_str(&job.etag()) {
            response.headers_mut().insert(header::ETAG, value);
        }
        response
    } else {
        StatusCode::NO_CONTENT.into_response()
    };
    let headers = response.headers_mut();
    headers.insert("odata-version", HeaderValue::from_static("4.0"));
    if let Ok(value) = HeaderValue::from_str(&entity_id) {
        headers.insert("odata-entityid", value);
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Admin API

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SeedJobsRequest {
    remote_id: String,
    jobs: Vec<NewJob>,
}

pub(crate) async fn admin_seed_jobs(AxState(shared): Shared_, Json(req): Json<SeedJobsRequest>) -> Response {
    match seed(&shared, &req.remote_id, &req.jobs) {
        Some(ids) => json_response(201, json!({"ids": ids})),
        None => json_response(404, json!({"error": "unknown org or environment ID"})),
    }
}

pub(crate) async fn admin_jobs(
    AxState(shared): Shared_,
    Path(remote_id): Path<String>,
) -> Json<Vec<FakeJob>> {
    Json(list(&shared.lock(), &remote_id))
}

pub(crate) async fn admin_job(
    AxState(shared): Shared_,
    Path((remote_id, id)): Path<(String, String)>,
) -> Response {
    let state = shared.lock();
    let job = state
        .key_of(&remote_id)
        .and_then(|key| state.jobs.find(&key, &id))
        .map(|i| state.jobs.jobs[i].to_fake());
    drop(state);
    match job {
        Some(job) => (StatusCode::OK, Json(job)).into_response(),
        None => json_response(404, json!({"error": "unknown job"})),
    }
}

pub(crate) async fn admin_delete_job(
    AxState(shared): Shared_,
    Path((remote_id, id)): Path<(String, String)>,
) -> Json<Value> {
    Json(json!({"deleted": delete(&mut shared.lock(), &remote_id, &id)}))
}

pub(crate) async fn admin_abort_job(
    AxState(shared): Shared_,
    Path((remote_id, id)): Path<(String, String)>,
) -> Json<Value> {
    Json(json!({"aborted": abort(&mut shared.lock(), &remote_id, &id)}))
}

#[derive(Deserialize)]
pub(crate) struct Modified {
    #[serde(with = "iso")]
    modified: SystemTime,
}

pub(crate) async fn admin_job_modified(
    AxState(shared): Shared_,
    Path((remote_id, id)): Path<(String, String)>,
    Json(req): Json<Modified>,
) -> Json<Value> {
    Json(json!({"changed": set_modified(&mut shared.lock(), &remote_id, &id, req.modified)}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PageSize {
    page_size: usize,
}

pub(crate) async fn admin_job_page_size(AxState(shared): Shared_, Json(req): Json<PageSize>) -> StatusCode {
    shared.lock().jobs.page_size = (req.page_size > 0).then_some(req.page_size);
    StatusCode::NO_CONTENT
}

pub(crate) async fn admin_expire_access_tokens(AxState(shared): Shared_) -> Json<Value> {
    let mut state = shared.lock();
    let expired = state.access_tokens.len();
    state.access_tokens.clear();
    Json(json!({"expired": expired}))
}

#[derive(Deserialize)]
pub(crate) struct QueryDelay {
    millis: u64,
}

pub(crate) async fn admin_query_delay(AxState(shared): Shared_, Json(req): Json<QueryDelay>) -> StatusCode {
    shared.lock().jobs.query_delay = Duration::from_millis(req.millis);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Usage {
    remote_id: String,
    used: u64,
    #[serde(default = "default_max")]
    max: u64,
}

fn default_max() -> u64 {
    DEFAULT_DAILY_MAX
}

pub(crate) async fn admin_api_usage(AxState(shared): Shared_, Json(req): Json<Usage>) -> Json<Value> {
    Json(json!({"changed": set_usage(&mut shared.lock(), &req.remote_id, req.used, req.max)}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Throttle {
    requests: u32,
    #[serde(default)]
    retry_after_secs: u64,
}

pub(crate) async fn admin_throttle(AxState(shared): Shared_, Json(req): Json<Throttle>) -> StatusCode {
    shared.lock().jobs.throttle = (req.requests > 0).then_some((req.requests, req.retry_after_secs));
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_795_859_703; // 2026-11-28T09:55:03Z, a Saturday

    #[test]
    fn formats_times() {
        assert_eq!(format_iso(T), "2026-11-28T09:55:03Z");
        assert_eq!(format_salesforce(T), "2026-11-28T09:55:03.000+0000");
        assert_eq!(
            format_http_date(to_system_time(T)),
            "Sat, 28 Nov 2026 09:55:03 GMT"
        );
        assert_eq!(format_iso(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn parses_times() {
        for text in [
            "2026-11-28T09:55:03Z",
            "2026-11-28T09:55:03.000Z",
            "2026-11-28T09:55:03+0000",
            "2026-11-28T09:55:03.000+0000",
            "2026-11-28T09:55:03+00:00",
            "2026-11-28T10:55:03+01:00",
            "2026-11-28T04:55:03.000-0500",
        ] {
            assert_eq!(parse_iso_millis(text), Some(T * 1000), "{text}");
        }
        assert_eq!(parse_iso_millis("2026-11-28T09:55:03.5Z"), Some(T * 1000 + 500));
        for bad in [
            "2026-11-28T09:55:03",
            "2026-11-28 09:55:03Z",
            "2026-02-30T09:55:03Z",
            "2026-11-28T09:55:03.Z",
            "2026-11-28T09:55:03+0",
            "x026-11-28T09:55:03Z",
        ] {
            assert_eq!(parse_iso_millis(bad), None, "{bad}");
        }
        assert_eq!(
            parse_http_date("Sat, 28 Nov 2026 09:55:03 GMT"),
            Some(to_system_time(T))
        );
        assert_eq!(parse_http_date("2026-11-28T09:55:03Z"), None);
        assert_eq!(parse_http_date("Sat, 31 Nov 2026 09:55:03 GMT"), None);
    }

    #[test]
    fn statuses() {
        assert_eq!(JobStatus::Holding.code(), 1);
        assert_eq!(JobStatus::Aborted.code(), 7);
        assert_eq!(JobStatus::from_code(3), Some(JobStatus::Claimed));
        assert_eq!(JobStatus::from_code(0), None);
        assert_eq!(JobStatus::from_code(8), None);
        assert_eq!(JobStatus::parse("Waiting"), Some(JobStatus::Waiting));
        assert_eq!(JobStatus::parse("waiting"), None);
    }

    #[test]
    fn parses_the_discover_soql() {
        let q = "SELECT Id, Type__c, Status__c, Attempt__c, LastModifiedDate FROM CrmJob__c WHERE Processor__c = 'Cloud' AND (Status__c IN ('Holding','Waiting') OR (Status__c = 'Claimed' AND ClaimExpires__c < 2026-11-28T09:55:03Z)) AND Type__c IN ('export','import') ORDER BY CreatedDate LIMIT 5";
        let soql = parse_soql(q).unwrap();
        assert_eq!(
            soql.fields,
            ["Id", "Type__c", "Status__c", "Attempt__c", "LastModifiedDate"]
        );
        assert_eq!(soql.discover.bound_ms, T * 1000);
        assert_eq!(
            soql.discover.types,
            Some(vec!["export".to_string(), "import".to_string()])
        );
        assert_eq!(soql.limit, Some(5));
        let q = "select Id from crmjob__c where Processor__c='Cloud' and (Status__c in ( 'Holding', 'Waiting' ) or (Status__c='Claimed' and ClaimExpires__c<2026-11-28T09:55:03.000+0000))\n order by CreatedDate";
        let soql = parse_soql(q).unwrap();
        assert_eq!(soql.discover.bound_ms, T * 1000);
        assert_eq!(soql.discover.types, None);
        assert_eq!(soql.limit, None);
        let q = "SELECT Id FROM CrmJob__c WHERE Processor__c = 'Cloud' AND (Status__c IN ('Holding','Waiting') OR (Status__c = 'Claimed' AND ClaimExpires__c < 2026-11-28T09:55:03Z)) LIMIT 7";
        assert_eq!(parse_soql(q).unwrap().limit, Some(7));
        for (bad, code) in [
            (
                "SELECT Id FROM Account WHERE Processor__c = 'Cloud'",
                "INVALID_TYPE",
            ),
            ("SELECT Nope__c FROM CrmJob__c", "INVALID_FIELD"),
            (
                "SELECT Id FROM CrmJob__c WHERE (Status__c IN ('Holding','Waiting') OR (Status__c = 'Claimed' AND ClaimExpires__c < 2026-11-28T09:55:03Z))",
                "MALFORMED_QUERY",
            ),
            (
                "SELECT Id FROM CrmJob__c WHERE Processor__c = 'Cloud' AND (Status__c IN ('Holding','Waiting') OR (Status__c = 'Claimed' AND ClaimExpires__c < '2026-11-28T09:55:03Z'))",
                "MALFORMED_QUERY",
            ),
            (
                "SELECT Id FROM CrmJob__c WHERE Processor__c = 'Cloud' AND (Status__c IN ('Holding','Waiting') OR (Status__c = 'Claimed' AND ClaimExpires__c < 2026-11-28T09:55:03Z)) LIMIT x",
                "MALFORMED_QUERY",
            ),
            ("DELETE", "MALFORMED_QUERY"),
        ] {
            assert_eq!(parse_soql(bad).err().map(|e| e.0), Some(code), "{bad}");
        }
    }

    #[test]
    fn parses_the_discover_filter() {
        let f = "crmc_processor eq 'Cloud' and (crmc_status eq 1 or crmc_status eq 2 or (crmc_status eq 3 and crmc_claimexpires lt 2026-11-28T09:55:03Z)) and (crmc_type eq 'export' or crmc_type eq 'import')";
        let d = parse_filter(f).unwrap();
        assert_eq!(d.bound_ms, T * 1000);
        assert_eq!(d.types, Some(vec!["export".to_string(), "import".to_string()]));
        let f = "crmc_processor eq 'Cloud' and (crmc_status eq 1 or crmc_status eq 2 or (crmc_status eq 3 and crmc_claimexpires lt 2026-11-28T09:55:03Z))";
        assert_eq!(parse_filter(f).unwrap().types, None);
        assert!(parse_filter("crmc_processor eq 'Cloud'").is_err());
        assert!(parse_filter(&f.replace("09:55:03Z", "soon")).is_err());
    }

    #[test]
    fn skiptokens_and_etags() {
        assert_eq!(
            parse_skiptoken(
                "<cookie pagenumber=\"2\" pagingcookie=\"\" istracking=\"False\" lastseq=\"17\" />"
            ),
            Some((2, 17))
        );
        assert_eq!(parse_skiptoken("junk"), None);
        assert!(etag_matches("W/\"42\"", 42));
        assert!(etag_matches("\"42\"", 42));
        assert!(etag_matches("*", 42));
        assert!(!etag_matches("W/\"41\"", 42));
    }
}
