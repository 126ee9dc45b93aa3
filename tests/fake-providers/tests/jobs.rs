//! The CRM job queues of the fake: Salesforce `CrmJob__c` and Dataverse `crmc_crmjobs`, over HTTP.

use std::time::{Duration, SystemTime};

use fake_providers::{
    DynamicsEnvironment, FakeJob, FakeProviders, Fault, FaultTarget, JobStatus, NewJob, SalesforceOrg, Seed,
    Stats, format_http_date, iso_datetime,
};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

const ORG: &str = "00D000000000001AAA";
const USER: &str = "005000000000001AAA";
const ENV: &str = "11111111-1111-1111-1111-111111111111";
const ENV_USER: &str = "22222222-2222-2222-2222-222222222222";
const ENV_CLIENT: &str = "33333333-3333-3333-3333-333333333333";

struct Fake {
    fake: FakeProviders,
    http: Client,
    token: String,
}

async fn salesforce_token(fake: &FakeProviders, http: &Client) -> String {
    let refresh = fake.issue_refresh_token(ORG);
    let body: Value = http
        .post(format!("{}/services/oauth2/token", fake.url()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("client_id", "demo-client"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

async fn dataverse_token(fake: &FakeProviders, http: &Client) -> String {
    let refresh = fake.issue_refresh_token(ENV);
    let scope = format!("{}/user_impersonation offline_access", fake.url());
    let body: Value = http
        .post(format!("{}/organizations/oauth2/v2.0/token", fake.url()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("client_id", ENV_CLIENT),
            ("scope", scope.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

async fn salesforce() -> Fake {
    let fake = FakeProviders::start().await;
    fake.add_salesforce_org(SalesforceOrg::new(ORG, USER, "ops@acme.example", "demo-client"));
    let http = Client::new();
    let token = salesforce_token(&fake, &http).await;
    Fake { fake, http, token }
}

async fn dataverse() -> Fake {
    let fake = FakeProviders::start().await;
    fake.add_dynamics_environment(DynamicsEnvironment::new(ENV, ENV_USER, ENV_CLIENT));
    let http = Client::new();
    let token = dataverse_token(&fake, &http).await;
    Fake { fake, http, token }
}

fn soql(bound: SystemTime, types: Option<&[&str]>, limit: usize) -> String {
    let types = types
        .map(|t| {
            let list: Vec<String> = t.iter().map(|t| format!("'{t}'")).collect();
            format!(" AND Type__c IN ({})", list.join(","))
        })
        .unwrap_or_default();
    format!(
        "SELECT Id, Type__c, Status__c, Attempt__c, LastModifiedDate FROM CrmJob__c WHERE Processor__c = 'Cloud' AND (Status__c IN ('Holding','Waiting') OR (Status__c = 'Claimed' AND ClaimExpires__c < {})){types} ORDER BY CreatedDate LIMIT {limit}",
        iso_datetime(bound)
    )
}

fn dv_filter(bound: SystemTime, types: Option<&[&str]>) -> String {
    let types = types
        .map(|t| {
            let terms: Vec<String> = t.iter().map(|t| format!("crmc_type eq '{t}'")).collect();
            format!(" and ({})", terms.join(" or "))
        })
        .unwrap_or_default();
    format!(
        "crmc_processor eq 'Cloud' and (crmc_status eq 1 or crmc_status eq 2 or (crmc_status eq 3 and crmc_claimexpires lt {})){types}",
        iso_datetime(bound)
    )
}

impl Fake {
    async fn sf_get(&self, path: &str) -> Response {
        self.http
            .get(format!("{}{path}", self.fake.url()))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    async fn sf_query(&self, q: &str) -> Response {
        self.http
            .get(format!("{}/services/data/v62.0/query", self.fake.url()))
            .query(&[("q", q)])
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    async fn sf_patch(&self, id: &str, body: Value, unmodified_since: Option<SystemTime>) -> Response {
        let mut request = self
            .http
            .patch(format!(
                "{}/services/data/v62.0/sobjects/CrmJob__c/{id}",
                self.fake.url()
            ))
            .bearer_auth(&self.token)
            .json(&body);
        if let Some(time) = unmodified_since {
            request = request.header("If-Unmodified-Since", format_http_date(time));
        }
        request.send().await.unwrap()
    }

    async fn dv_query(&self, filter: &str, page: Option<usize>) -> Response {
        let mut request = self
            .http
            .get(format!("{}/api/data/v9.2/crmc_crmjobs", self.fake.url()))
            .query(&[
                ("$select", "crmc_crmjobid,crmc_type,crmc_status,crmc_attempt"),
                ("$filter", filter),
                ("$orderby", "createdon asc"),
            ])
            .bearer_auth(&self.token);
        if let Some(n) = page {
            request = request.header("Prefer", format!("odata.maxpagesize={n}"));
        }
        request.send().await.unwrap()
    }

    async fn dv_get(&self, url: &str, page: Option<usize>) -> Response {
        let mut request = self.http.get(url).bearer_auth(&self.token);
        if let Some(n) = page {
            request = request.header("Prefer", format!("odata.maxpagesize={n}"));
        }
        request.send().await.unwrap()
    }

    async fn dv_patch(
        &self,
        id: &str,
        body: Value,
        if_match: Option<&str>,
        representation: bool,
    ) -> Response {
        let mut request = self
            .http
            .patch(format!("{}/api/data/v9.2/crmc_crmjobs({id})", self.fake.url()))
            .bearer_auth(&self.token)
            .json(&body);
        if let Some(tag) = if_match {
            request = request.header("If-Match", tag);
        }
        if representation {
            request = request.header("Prefer", "return=representation");
        }
        request.send().await.unwrap()
    }
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn ids(records: &Value, key: &str) -> Vec<String> {
    records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[key].as_str().unwrap().to_string())
        .collect()
}

fn soon() -> SystemTime {
    SystemTime::now() + Duration::from_secs(1)
}

#[tokio::test]
async fn salesforce_pages_of_two_over_seven_jobs() {
    let f = salesforce().await;
    let seeded = f.fake.seed_jobs(ORG, &vec![NewJob::new("export"); 7]);
    assert_eq!(seeded.len(), 7);
    assert!(seeded.iter().all(|id| id.len() == 18 && id.starts_with("a0B")));
    f.fake.set_job_page_size(2);

    let response = f.sf_query(&soql(soon(), None, 100)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "date").is_some(), "hyper sets Date");
    assert_eq!(
        header(&response, "sforce-limit-info").as_deref(),
        Some("api-usage=1/15000")
    );
    let mut page: Value = response.json().await.unwrap();
    assert_eq!(page["totalSize"], 7);
    assert_eq!(page["done"], false);
    let record = &page["records"][0];
    assert_eq!(record["attributes"]["type"], "CrmJob__c");
    assert_eq!(
        record["attributes"]["url"],
        format!("/services/data/v62.0/sobjects/CrmJob__c/{}", seeded[0])
    );
    assert_eq!(record["Status__c"], "Holding");
    assert_eq!(record["Type__c"], "export");
    assert_eq!(record["Attempt__c"], 0);
    assert!(
        record["LastModifiedDate"]
            .as_str()
            .unwrap()
            .ends_with(".000+0000")
    );
    assert!(record.get("Processor__c").is_none(), "only the selected fields");

    // The result set is a snapshot: aborting a later job does not change the next pages.
    assert!(f.fake.abort_job(ORG, &seeded[6]));
    let mut seen = ids(&page["records"], "Id");
    let mut sizes = vec![seen.len()];
    while page["done"] == false {
        let next = page["nextRecordsUrl"].as_str().unwrap().to_string();
        assert!(next.starts_with("/services/data/v62.0/query/01g"), "{next}");
        let response = f.sf_get(&next).await;
        assert_eq!(response.status(), StatusCode::OK);
        page = response.json().await.unwrap();
        assert_eq!(page["totalSize"], 7);
        sizes.push(page["records"].as_array().unwrap().len());
        seen.extend(ids(&page["records"], "Id"));
    }
    assert!(page.get("nextRecordsUrl").is_none());
    assert_eq!(sizes, [2, 2, 2, 1]);
    assert_eq!(seen, seeded);
    assert_eq!(f.fake.stats().job_queries, 4);
    assert_eq!(f.fake.api_usage(ORG), Some((4, 15000)));

    // LIMIT caps the total; a new query sees the aborted job gone.
    let page: Value = f.sf_query(&soql(soon(), None, 3)).await.json().await.unwrap();
    assert_eq!(
        (page["totalSize"].clone(), page["done"].clone()),
        (json!(3), json!(false))
    );
    let page: Value = f.sf_query(&soql(soon(), None, 100)).await.json().await.unwrap();
    assert_eq!(page["totalSize"], 6);

    let response = f.sf_get("/services/data/v62.0/query/01gNOPE-2").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body[0]["errorCode"], "INVALID_QUERY_LOCATOR");
}

#[tokio::test]
async fn dataverse_pages_of_two_over_seven_jobs() {
    let f = dataverse().await;
    let seeded = f.fake.seed_jobs(ENV, &vec![NewJob::new("import"); 7]);
    assert!(
        seeded
            .iter()
            .all(|id| id.len() == 36 && id.matches('-').count() == 4)
    );

    let response = f.dv_query(&dv_filter(soon(), None), Some(2)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "date").is_some());
    assert_eq!(
        header(&response, "preference-applied").as_deref(),
        Some("odata.maxpagesize=2")
    );
    let mut page: Value = response.json().await.unwrap();
    let row = &page["value"][0];
    assert_eq!(row["crmc_status"], 1);
    assert_eq!(row["crmc_type"], "import");
    assert_eq!(row["crmc_attempt"], 0);
    assert!(row["@odata.etag"].as_str().unwrap().starts_with("W/\""));
    assert!(row.get("crmc_processor").is_none(), "only the selected columns");
    let mut seen = ids(&page["value"], "crmc_crmjobid");
    let mut sizes = vec![seen.len()];
    while let Some(next) = page["@odata.nextLink"].as_str().map(str::to_string) {
        assert!(next.starts_with(&format!("{}/api/data/v9.2/crmc_crmjobs?", f.fake.url())));
        assert!(next.contains("$skiptoken="));
        let response = f.dv_get(&next, Some(2)).await;
        assert_eq!(response.status(), StatusCode::OK);
        page = response.json().await.unwrap();
        sizes.push(page["value"].as_array().unwrap().len());
        seen.extend(ids(&page["value"], "crmc_crmjobid"));
    }
    assert_eq!(sizes, [2, 2, 2, 1]);
    assert_eq!(seen, seeded);
    assert_eq!(f.fake.stats().job_queries, 4);

    // The fake's own page size caps the Prefer header; without Prefer, no Preference-Applied.
    f.fake.set_job_page_size(3);
    let response = f.dv_query(&dv_filter(soon(), None), None).await;
    assert_eq!(header(&response, "preference-applied"), None);
    let page: Value = response.json().await.unwrap();
    assert_eq!(page["value"].as_array().unwrap().len(), 3);
    assert!(page["@odata.nextLink"].is_string());
}

#[tokio::test]
async fn salesforce_discover_filter() {
    let f = salesforce().await;
    let holding = f.fake.seed_jobs(ORG, &[NewJob::new("export")])[0].clone();
    let waiting = f
        .fake
        .seed_jobs(ORG, &[NewJob::new("import").with_status(JobStatus::Waiting)])[0]
        .clone();
    f.fake.seed_jobs(
        ORG,
        &[
            NewJob::new("export").with_status(JobStatus::Completed),
            NewJob::new("export").with_processor("Desktop"),
            NewJob::new("export").with_status(JobStatus::Running),
            NewJob::new("other"),
        ],
    );
    let claims = f
        .fake
        .seed_jobs(ORG, &[NewJob::new("export"), NewJob::new("export")]);
    let now = SystemTime::now();
    let (expired, live) = (&claims[0], &claims[1]);
    for (id, expires) in [
        (expired, now - Duration::from_secs(60)),
        (live, now + Duration::from_secs(600)),
    ] {
        let response = f
            .sf_patch(
                id,
                json!({"Status__c": "Claimed", "ClaimedBy__c": "pod-a", "ClaimExpires__c": iso_datetime(expires), "Attempt__c": 1}),
                None,
            )
            .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(header(&response, "sforce-limit-info").is_some());
    }

    let page: Value = f
        .sf_query(&soql(now, Some(&["export", "import"]), 10))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        ids(&page["records"], "Id"),
        [holding.clone(), waiting.clone(), expired.clone()]
    );
    assert_eq!(page["records"][2]["Status__c"], "Claimed");
    assert_eq!(page["records"][2]["Attempt__c"], 1);
    // No type filter: 'other' too.
    let page: Value = f.sf_query(&soql(now, None, 10)).await.json().await.unwrap();
    assert_eq!(page["totalSize"], 4);

    // Reading a record: every field, nulls where unset.
    let record: Value = f
        .sf_get(&format!("/services/data/v62.0/sobjects/CrmJob__c/{expired}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["ClaimedBy__c"], "pod-a");
    assert_eq!(record["Processor__c"], "Cloud");
    assert_eq!(record["Started__c"], Value::Null);
    assert_eq!(record["Result__c"], Value::Null);
    assert!(record["ClaimExpires__c"].as_str().unwrap().ends_with(".000+0000"));
    // The 15-character form works too.
    let response = f
        .sf_get(&format!(
            "/services/data/v62.0/sobjects/CrmJob__c/{}",
            &expired[..15]
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let job: FakeJob = f.fake.job(ORG, expired).unwrap();
    assert_eq!(job.claimed_by.as_deref(), Some("pod-a"));
    assert_eq!(job.attempt, 1);
}

#[tokio::test]
async fn dataverse_discover_filter() {
    let f = dataverse().await;
    let holding = f.fake.seed_jobs(ENV, &[NewJob::new("export")])[0].clone();
    f.fake.seed_jobs(
        ENV,
        &[
            NewJob::new("export").with_status(JobStatus::Failed),
            NewJob::new("export").with_processor("Desktop"),
            NewJob::new("other").with_status(JobStatus::Waiting),
        ],
    );
    let claims = f
        .fake
        .seed_jobs(ENV, &[NewJob::new("import"), NewJob::new("import")]);
    let now = SystemTime::now();
    for (id, expires) in [
        (&claims[0], now - Duration::from_secs(60)),
        (&claims[1], now + Duration::from_secs(600)),
    ] {
        let response = f
            .dv_patch(
                id,
                json!({"crmc_status": 3, "crmc_claimedby": "pod-a", "crmc_claimexpires": iso_datetime(expires)}),
                Some("*"),
                false,
            )
            .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let page: Value = f
        .dv_query(&dv_filter(now, Some(&["export", "import"])), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&page["value"], "crmc_crmjobid"), [holding, claims[0].clone()]);
    let page: Value = f
        .dv_query(&dv_filter(now, None), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["value"].as_array().unwrap().len(), 3);

    let response = f.dv_query("crmc_status eq 1", None).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "0x80060888");
}

#[tokio::test]
async fn salesforce_if_unmodified_since() {
    let f = salesforce().await;
    let id = f.fake.seed_jobs(ORG, &[NewJob::new("export")])[0].clone();
    let read_at = SystemTime::now() - Duration::from_secs(100);
    // Modified in the second the client read it: the claim goes through.
    assert!(f.fake.set_job_modified(ORG, &id, read_at));
    let response = f
        .sf_patch(&id, json!({"Status__c": "Claimed"}), Some(read_at))
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.content_length(), Some(0));
    let job = f.fake.job(ORG, &id).unwrap();
    assert_eq!(job.status, JobStatus::Claimed);
    assert!(job.last_modified > read_at);

    // Changed in a later second: 412 and nothing written.
    assert!(
        f.fake
            .set_job_modified(ORG, &id, read_at + Duration::from_secs(1))
    );
    let response = f
        .sf_patch(
            &id,
            json!({"Status__c": "Running", "Attempt__c": 2}),
            Some(read_at),
        )
        .await;
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body[0]["errorCode"], "PRECONDITION_FAILED");
    let job = f.fake.job(ORG, &id).unwrap();
    assert_eq!((job.status, job.attempt), (JobStatus::Claimed, 0));

    let stats = f.fake.stats();
    assert_eq!((stats.job_patches, stats.job_patch_conflicts), (2, 1));

    // Errors.
    for (body, code) in [
        (json!({"Bogus__c": 1}), "INVALID_FIELD"),
        (
            json!({"Status__c": "Done"}),
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
        ),
        (json!({"ClaimExpires__c": "tomorrow"}), "JSON_PARSER_ERROR"),
        (json!({"Type__c": "import"}), "INVALID_FIELD_FOR_INSERT_UPDATE"),
    ] {
        let response = f.sf_patch(&id, body.clone(), None).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer[0]["errorCode"], code, "{body}");
    }
    let response = f
        .sf_patch("a0B000000000000AAA", json!({"Status__c": "Running"}), None)
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body[0]["errorCode"], "NOT_FOUND");
    let response = f
        .sf_get("/services/data/v62.0/sobjects/CrmJob__c/a0B000000000000AAA")
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = f.sf_query("SELECT Id FROM CrmJob__c").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body[0]["errorCode"], "MALFORMED_QUERY");
}

#[tokio::test]
async fn dataverse_if_match() {
    let f = dataverse().await;
    let id = f.fake.seed_jobs(ENV, &[NewJob::new("export")])[0].clone();
    let url = format!("{}/api/data/v9.2/crmc_crmjobs({id})", f.fake.url());
    let row: Value = f.dv_get(&url, None).await.json().await.unwrap();
    let etag = row["@odata.etag"].as_str().unwrap().to_string();
    assert_eq!(row["crmc_processor"], "Cloud");
    assert_eq!(row["crmc_claimexpires"], Value::Null);
    assert_eq!(etag, f.fake.job(ENV, &id).unwrap().etag);

    let response = f
        .dv_patch(
            &id,
            json!({"crmc_status": 3, "crmc_claimedby": "pod-a", "crmc_attempt": 1}),
            Some(&etag),
            true,
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let new_etag = header(&response, "etag").unwrap();
    let row: Value = response.json().await.unwrap();
    assert_eq!(row["@odata.etag"], new_etag.as_str());
    assert_ne!(new_etag, etag);
    assert_eq!(
        (row["crmc_status"].clone(), row["crmc_attempt"].clone()),
        (json!(3), json!(1))
    );

    // The old etag no longer matches: 412, nothing written.
    let response = f
        .dv_patch(&id, json!({"crmc_status": 4}), Some(&etag), false)
        .await;
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "0x80060882");
    let job = f.fake.job(ENV, &id).unwrap();
    assert_eq!(
        (job.status, job.etag.as_str()),
        (JobStatus::Claimed, new_etag.as_str())
    );

    // Without return=representation: 204 with OData-EntityId.
    let response = f
        .dv_patch(&id, json!({"crmc_status": 4}), Some(&new_etag), false)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&response, "odata-entityid"), Some(url.clone()));
    assert_eq!(f.fake.job(ENV, &id).unwrap().status, JobStatus::Running);

    // A missing row: 404, never created.
    let missing = "99999999-9999-4999-a999-999999999999";
    let response = f
        .dv_patch(missing, json!({"crmc_status": 4}), Some("*"), false)
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "0x80040217");
    assert_eq!(f.fake.jobs(ENV).len(), 1);

    let response = f.dv_patch(&id, json!({"crmc_bogus": 1}), Some("*"), false).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let stats = f.fake.stats();
    assert_eq!(
        (stats.job_reads, stats.job_patches, stats.job_patch_conflicts),
        (1, 5, 1)
    );
}

#[tokio::test]
async fn throttling_with_retry_after() {
    let f = dataverse().await;
    f.fake.seed_jobs(ENV, &[NewJob::new("export")]);
    f.fake.throttle_data(2, 7);
    for _ in 0..2 {
        let response = f.dv_query(&dv_filter(soon(), None), None).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&response, "retry-after").as_deref(), Some("7"));
    }
    let response = f.dv_query(&dv_filter(soon(), None), None).await;
    assert_eq!(response.status(), StatusCode::OK);

    f.fake.push_fault(Fault::throttled(FaultTarget::DataverseData, 3));
    let response = f.dv_query(&dv_filter(soon(), None), None).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&response, "retry-after").as_deref(), Some("3"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "0x80072322");
    assert_eq!(f.fake.stats().job_api_throttled, 3);
}

#[tokio::test]
async fn salesforce_request_limit_exceeded() {
    let f = salesforce().await;
    f.fake.seed_jobs(ORG, &[NewJob::new("export")]);
    assert!(f.fake.set_api_usage(ORG, 14998, 15000));
    let response = f.sf_query(&soql(soon(), None, 5)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "sforce-limit-info").as_deref(),
        Some("api-usage=14999/15000")
    );
    let response = f.sf_query(&soql(soon(), None, 5)).await;
    assert_eq!(
        header(&response, "sforce-limit-info").as_deref(),
        Some("api-usage=15000/15000")
    );
    let response = f.sf_query(&soql(soon(), None, 5)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        header(&response, "sforce-limit-info").as_deref(),
        Some("api-usage=15000/15000")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}])
    );
    assert_eq!(f.fake.stats().job_api_throttled, 1);

    // The scripted version.
    f.fake.set_api_usage(ORG, 0, 15000);
    f.fake.push_fault(Fault::request_limit_exceeded());
    let response = f.sf_query(&soql(soon(), None, 5)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(f.fake.stats().job_api_throttled, 2);
}

#[tokio::test]
async fn invalid_session_after_expire_access_tokens() {
    let mut f = salesforce().await;
    f.fake.seed_jobs(ORG, &[NewJob::new("export")]);
    assert_eq!(f.sf_query(&soql(soon(), None, 5)).await.status(), StatusCode::OK);
    assert_eq!(f.fake.expire_access_tokens(), 1);
    let response = f.sf_query(&soql(soon(), None, 5)).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
    );
    // Identity too.
    let response = f.sf_get(&format!("/id/{ORG}/{USER}")).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // A refresh gets a working token.
    f.token = salesforce_token(&f.fake, &f.http).await;
    assert_eq!(f.sf_query(&soql(soon(), None, 5)).await.status(), StatusCode::OK);

    let mut d = dataverse().await;
    d.fake.expire_access_tokens();
    let response = d.dv_query(&dv_filter(soon(), None), None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    d.token = dataverse_token(&d.fake, &d.http).await;
    assert_eq!(
        d.dv_query(&dv_filter(soon(), None), None).await.status(),
        StatusCode::OK
    );
    // A Salesforce token is no Dataverse token.
    d.token = f.token.clone();
    assert_eq!(
        d.dv_query(&dv_filter(soon(), None), None).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn scripted_faults_on_the_data_apis() {
    let f = salesforce().await;
    f.fake.seed_jobs(ORG, &[NewJob::new("export")]);
    f.fake.push_fault(Fault::html(FaultTarget::JobApi, 503));
    let response = f.sf_query(&soql(soon(), None, 5)).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        header(&response, "content-type")
            .unwrap()
            .starts_with("text/html")
    );

    f.fake.push_fault(Fault::malformed_salesforce_row());
    let body: Value = f.sf_query(&soql(soon(), None, 5)).await.json().await.unwrap();
    assert_eq!(body["records"][0]["Id"], 12345);

    f.fake
        .push_fault(Fault::status(FaultTarget::Any, 200, "not json"));
    let response = f.sf_query(&soql(soon(), None, 5)).await;
    assert_eq!(response.text().await.unwrap(), "not json");

    f.fake
        .push_fault(Fault::oversized(FaultTarget::SalesforceData, 1 << 20));
    let response = f.sf_query(&soql(soon(), None, 5)).await;
    assert!(response.bytes().await.unwrap().len() > 1 << 20);

    // A Dataverse fault leaves Salesforce alone.
    f.fake.push_fault(Fault::malformed_dataverse_row());
    assert_eq!(f.sf_query(&soql(soon(), None, 5)).await.status(), StatusCode::OK);
    f.fake.clear_faults();
    assert_eq!(f.fake.stats().job_queries, 5);
}

#[tokio::test]
async fn query_delay_holds_the_computed_answer() {
    let f = salesforce().await;
    let id = f.fake.seed_jobs(ORG, &[NewJob::new("export")])[0].clone();
    f.fake.set_query_delay(Duration::from_millis(400));
    let started = std::time::Instant::now();
    let q = soql(soon(), None, 5);
    let query = f.sf_query(&q);
    let abort = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        f.fake.abort_job(ORG, &id)
    };
    let (response, aborted) = tokio::join!(query, abort);
    assert!(aborted);
    assert!(started.elapsed() >= Duration::from_millis(400));
    let page: Value = response.json().await.unwrap();
    assert_eq!(page["totalSize"], 1, "computed before the abort");
    assert_eq!(page["records"][0]["Status__c"], "Holding");
}

#[tokio::test]
async fn admin_api_and_seed_file() {
    let fake = FakeProviders::start().await;
    let seed: Seed = serde_saphyr::from_str(&format!(
        "salesforce:\n  - orgId: {ORG}\n    userId: {USER}\n    username: u@x\n    clientId: c\ndynamics:\n  - organizationId: {ENV}\n    userId: {ENV_USER}\n    clientId: {ENV_CLIENT}\njobs:\n  - remoteId: {ORG}\n    type: export\n    count: 3\n  - remoteId: {ENV}\n    jobType: import\n    status: Waiting\n    processor: Desktop\n"
    ))
    .unwrap();
    fake.apply_seed(&seed);
    assert_eq!(fake.jobs(ORG).len(), 3);
    let dv = fake.jobs(ENV);
    assert_eq!(dv.len(), 1);
    assert_eq!(
        (dv[0].status, dv[0].processor.as_str(), dv[0].job_type.as_str()),
        (JobStatus::Waiting, "Desktop", "import")
    );

    let http = Client::new();
    let admin = |path: &str| format!("{}/_admin/{path}", fake.url());
    let response = http
        .post(admin("jobs"))
        .json(&json!({"remoteId": ORG, "jobs": [{"jobType": "import"}, {"type": "export", "status": "Claimed"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let id = created["ids"][0].as_str().unwrap().to_string();
    let jobs: Vec<FakeJob> = http
        .get(admin(&format!("jobs/{ORG}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jobs, fake.jobs(ORG));
    assert_eq!(jobs.len(), 5);
    let job: Value = http
        .get(admin(&format!("jobs/{ORG}/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["jobType"], "import");
    assert_eq!(job["claimExpires"], Value::Null);
    assert_eq!(job["api"], "Salesforce");

    let post = |path: &str, body: Value| http.post(admin(path)).json(&body).send();
    let answer: Value = post(&format!("jobs/{ORG}/{id}/abort"), json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["aborted"], true);
    assert_eq!(fake.job(ORG, &id).unwrap().status, JobStatus::Aborted);
    let answer: Value = post(
        &format!("jobs/{ORG}/{id}/modified"),
        json!({"modified": "2026-11-28T09:55:03Z"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(answer["changed"], true);
    assert_eq!(
        format_http_date(fake.job(ORG, &id).unwrap().last_modified),
        "Sat, 28 Nov 2026 09:55:03 GMT"
    );
    for (path, body) in [
        ("job-page-size", json!({"pageSize": 2})),
        ("query-delay", json!({"millis": 0})),
        ("throttle", json!({"requests": 1, "retryAfterSecs": 5})),
    ] {
        let status = post(path, body).await.unwrap().status();
        assert_eq!(status, StatusCode::NO_CONTENT, "{path}");
    }
    let answer: Value = post("api-usage", json!({"remoteId": ORG, "used": 10, "max": 20}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["changed"], true);
    assert_eq!(fake.api_usage(ORG), Some((10, 20)));
    let answer: Value = post("expire-access-tokens", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["expired"], 0);
    let answer: Value = http
        .delete(admin(&format!("jobs/{ORG}/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["deleted"], true);
    assert_eq!(fake.jobs(ORG).len(), 4);
    let response = http.get(admin(&format!("jobs/{ORG}/{id}"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // The admin throttle reaches the data API; stats over HTTP match and reset.
    let response = http
        .get(format!("{}/services/data/v62.0/query?q=x", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let stats: Stats = http
        .get(admin("stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, fake.stats());
    assert_eq!((stats.job_queries, stats.job_api_throttled), (1, 1));
    fake.reset_stats();
    assert_eq!(fake.stats(), Stats::default());
}
