use super::*;

fn base() -> Url {
    Url::parse("https://acme.my.salesforce.com").unwrap()
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn discover(types: &[&str]) -> Discover {
    Discover {
        now: t("2026-11-28T09:55:03.250Z"),
        job_types: types.iter().map(|s| s.to_string()).collect(),
        limit: 5,
        page_size: 2,
    }
}

#[test]
fn salesforce_discovery_is_the_contracts_soql() {
    let url = discover_url(Api::Salesforce, &base(), &discover(&["export", "imp'ort"]));
    assert_eq!(url.path(), "/services/data/v62.0/query");
    let q: String = url.query_pairs().find(|(k, _)| k == "q").unwrap().1.into_owned();
    assert_eq!(
        q,
        "SELECT Id, Type__c, Status__c, Attempt__c, LastModifiedDate FROM CrmJob__c WHERE Processor__c = 'Cloud' AND (Status__c IN ('Holding','Waiting') OR (Status__c = 'Claimed' AND ClaimExpires__c < 2026-11-28T09:55:03Z)) AND Type__c IN ('export','imp\\'ort') ORDER BY CreatedDate LIMIT 5"
    );
    let plain = discover_url(Api::Salesforce, &base(), &discover(&[]));
    assert!(!plain.query().unwrap().contains("Type__c+IN"));
}

#[test]
fn dataverse_discovery_is_the_contracts_filter() {
    let env = Url::parse("https://contoso.crm.dynamics.com").unwrap();
    let url = discover_url(Api::Dataverse, &env, &discover(&["export"]));
    assert_eq!(url.path(), "/api/data/v9.2/crmc_crmjobs");
    let pairs: std::collections::BTreeMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(
        pairs["$select"],
        "crmc_crmjobid,crmc_type,crmc_status,crmc_attempt"
    );
    assert_eq!(
        pairs["$filter"],
        "crmc_processor eq 'Cloud' and (crmc_status eq 1 or crmc_status eq 2 or (crmc_status eq 3 and crmc_claimexpires lt 2026-11-28T09:55:03Z)) and (crmc_type eq 'export')"
    );
    assert_eq!(pairs["$orderby"], "createdon asc");
}

#[test]
fn salesforce_pages_parse_with_their_datetimes_and_next_link() {
    let body = br#"{"totalSize":3,"done":false,"nextRecordsUrl":"/services/data/v62.0/query/01gX-2",
        "records":[
          {"attributes":{"type":"CrmJob__c"},"Id":"a0B000000000001AAA","Type__c":"export","Status__c":"Holding","Attempt__c":0.0,"LastModifiedDate":"2026-11-28T09:55:03.000+0000"},
          {"attributes":{"type":"CrmJob__c"},"Id":"a0B000000000002AAA","Type__c":"export","Status__c":"Claimed","Attempt__c":null,"LastModifiedDate":"2026-11-28T09:50:00.000+0000"}
        ]}"#;
    let page = parse_page(Api::Salesforce, &base(), body).unwrap();
    assert_eq!(page.jobs.len(), 2);
    assert_eq!(
        page.jobs[0].version,
        Version::LastModified(t("2026-11-28T09:55:03Z"))
    );
    assert_eq!(page.jobs[1].status, JobStatus::Claimed);
    assert_eq!(page.jobs[1].attempt, 0);
    assert_eq!(
        page.next.unwrap().as_str(),
        "https://acme.my.salesforce.com/services/data/v62.0/query/01gX-2"
    );
}

#[test]
fn dataverse_pages_carry_etags_and_refuse_a_next_link_to_another_host() {
    let env = Url::parse("https://contoso.crm.dynamics.com").unwrap();
    let body = br#"{"value":[{"@odata.etag":"W/\"1001\"","crmc_crmjobid":"3f2b1c4d-0000-0000-0000-000000000001","crmc_type":"export","crmc_status":2,"crmc_attempt":1}],
        "@odata.nextLink":"https://contoso.crm.dynamics.com/api/data/v9.2/crmc_crmjobs?$skiptoken=x"}"#;
    let page = parse_page(Api::Dataverse, &env, body).unwrap();
    assert_eq!(page.jobs[0].version, Version::ETag("W/\"1001\"".into()));
    assert_eq!(
        (page.jobs[0].status, page.jobs[0].attempt),
        (JobStatus::Waiting, 1)
    );
    assert!(page.next.is_some());

    let elsewhere = br#"{"value":[],"@odata.nextLink":"https://attacker.example/steal"}"#;
    assert!(
        parse_page(Api::Dataverse, &env, elsewhere)
            .unwrap_err()
            .contains("another host")
    );
}

#[test]
fn a_bad_row_is_skipped_and_named_not_fatal() {
    let body = br#"{"done":true,"records":[
        {"Id":"a0B000000000001AAA","Type__c":"export","Status__c":"Holding","LastModifiedDate":"2026-11-28T09:55:03.000+0000"},
        {"Id":"a0B000000000002AAA","Type__c":"export","Status__c":"Sleeping","LastModifiedDate":"2026-11-28T09:55:03.000+0000"},
        {"Id":"../../etc","Type__c":"export","Status__c":"Holding","LastModifiedDate":"x"},
        {"Type__c":"export"},
        42
    ]}"#;
    let page = parse_page(Api::Salesforce, &base(), body).unwrap();
    assert_eq!(page.jobs.len(), 1);
    assert_eq!(page.skipped.len(), 4, "{:?}", page.skipped);
    assert!(page.skipped[0].starts_with("job a0B000000000002AAA: unknown Status__c"));
    assert!(
        page.skipped[1].starts_with("row 2: Id is not a record ID"),
        "{:?}",
        page.skipped
    );
}

#[test]
fn bodies_that_are_not_a_page_are_clear_errors() {
    let html = b"<!DOCTYPE html><html><body>Service Unavailable</body></html>";
    assert!(
        parse_page(Api::Salesforce, &base(), html)
            .unwrap_err()
            .contains("HTML")
    );
    assert!(
        parse_page(Api::Salesforce, &base(), b"{\"records\": [")
            .unwrap_err()
            .contains("not JSON")
    );
    assert!(
        parse_page(Api::Salesforce, &base(), b"{}")
            .unwrap_err()
            .contains("records")
    );
    assert!(
        parse_page(Api::Salesforce, &base(), br#"{"done":false,"records":[]}"#)
            .unwrap_err()
            .contains("nextRecordsUrl")
    );
    assert!(
        parse_page(Api::Dataverse, &base(), b"[]")
            .unwrap_err()
            .contains("value")
    );
}

#[test]
fn salesforce_claim_is_conditional_on_the_last_modified_second() {
    let job = QueuedJob {
        id: "a0B000000000001AAA".into(),
        job_type: "export".into(),
        status: JobStatus::Holding,
        attempt: 2,
        version: Version::LastModified(t("2026-11-28T09:55:03Z")),
    };
    let claim = Claim {
        by: "team-a/acme/acme-retriever-abc".into(),
        expires: t("2026-11-28T10:10:03Z"),
        attempt: 3,
    };
    let r = claim_request(Api::Salesforce, &base(), &job, &claim).unwrap();
    assert_eq!(r.method, reqwest::Method::PATCH);
    assert_eq!(
        r.url.path(),
        "/services/data/v62.0/sobjects/CrmJob__c/a0B000000000001AAA"
    );
    assert_eq!(
        r.headers,
        vec![("If-Unmodified-Since", "Sat, 28 Nov 2026 09:55:03 GMT".to_string())]
    );
    assert_eq!(
        r.body.unwrap(),
        json!({"Status__c": "Claimed", "ClaimedBy__c": "team-a/acme/acme-retriever-abc", "ClaimExpires__c": "2026-11-28T10:10:03Z", "Attempt__c": 3})
    );
}

#[test]
fn dataverse_claim_is_conditional_on_the_etag() {
    let env = Url::parse("https://contoso.crm.dynamics.com").unwrap();
    let job = QueuedJob {
        id: "3f2b1c4d-0000-0000-0000-000000000001".into(),
        job_type: "export".into(),
        status: JobStatus::Holding,
        attempt: 0,
        version: Version::ETag("W/\"1001\"".into()),
    };
    let claim = Claim {
        by: "ns/c/p".into(),
        expires: t("2026-11-28T10:10:03Z"),
        attempt: 1,
    };
    let r = claim_request(Api::Dataverse, &env, &job, &claim).unwrap();
    assert_eq!(
        r.url.path(),
        "/api/data/v9.2/crmc_crmjobs(3f2b1c4d-0000-0000-0000-000000000001)"
    );
    assert!(r.headers.contains(&("If-Match", "W/\"1001\"".to_string())));
    assert!(
        r.headers
            .contains(&("Prefer", "return=representation".to_string()))
    );
    assert_eq!(r.body.unwrap()["crmc_status"], json!(3));
    // A version of the other CRM is refused, not sent unconditionally.
    assert!(claim_request(Api::Salesforce, &base(), &job, &claim).is_err());
}

#[test]
fn claim_answers_map_by_status() {
    assert_eq!(claim_outcome(204), Some(ClaimOutcome::Claimed));
    assert_eq!(claim_outcome(200), Some(ClaimOutcome::Claimed));
    assert_eq!(claim_outcome(412), Some(ClaimOutcome::Lost));
    assert_eq!(claim_outcome(404), Some(ClaimOutcome::Gone));
    assert_eq!(claim_outcome(500), None);
}

#[test]
fn errors_are_classified_by_status_and_code_never_by_text() {
    let limit = br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
    assert!(matches!(
        classify(403, None, limit),
        CrmError::Throttled { status: 403, .. }
    ));
    // The same words in a message, without the code, are not a limit.
    let text_only = br#"[{"message":"REQUEST_LIMIT_EXCEEDED","errorCode":"INSUFFICIENT_ACCESS"}]"#;
    assert!(matches!(
        classify(403, None, text_only),
        CrmError::Unexpected { status: 403, .. }
    ));
    let wait = Some(Duration::from_secs(7));
    assert_eq!(classify(429, wait, b"").retry_after(), wait);
    let stale = br#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#;
    assert_eq!(
        classify(401, None, stale),
        CrmError::SessionRejected {
            code: Some("INVALID_SESSION_ID".into())
        }
    );
    assert!(matches!(
        classify(503, None, b"<html>"),
        CrmError::Unexpected { status: 503, .. }
    ));
}

#[test]
fn limit_info_and_datetimes_parse() {
    assert_eq!(
        parse_limit_info("api-usage=13500/15000"),
        Some(ApiUsage {
            used: 13500,
            max: 15000
        })
    );
    assert_eq!(
        parse_limit_info("per-app-api-usage=1/2, api-usage=9/10")
            .unwrap()
            .ratio(),
        0.9
    );
    assert_eq!(parse_limit_info("nonsense"), None);
    assert_eq!(
        parse_datetime("2026-11-28T09:55:03.000+0000"),
        Some(t("2026-11-28T09:55:03Z"))
    );
    assert_eq!(
        parse_datetime("2026-11-28T09:55:03Z"),
        Some(t("2026-11-28T09:55:03Z"))
    );
    assert_eq!(parse_datetime("yesterday"), None);
}

#[test]
fn error_text_never_carries_a_token_from_the_body() {
    let body = br#"[{"message":"Bearer 00Dxx!SECRET rejected","errorCode":"INVALID_SESSION_ID"}]"#;
    let e = classify(401, None, body);
    assert!(!e.to_string().contains("SECRET"), "{e}");
}

#[test]
fn reports_are_conditional_writes_of_the_contracts_fields() {
    let seen = Version::LastModified(t("2026-11-28T10:00:00Z"));
    let started = claim_request_like(
        Api::Salesforce,
        &seen,
        &Report::Started {
            at: t("2026-11-28T10:00:05Z"),
            lease: t("2026-11-28T10:15:05Z"),
        },
    );
    assert_eq!(
        started.headers.clone(),
        vec![("If-Unmodified-Since", "Sat, 28 Nov 2026 10:00:00 GMT".to_string())]
    );
    assert_eq!(
        started.body.unwrap(),
        json!({"Status__c": "Running", "Started__c": "2026-11-28T10:00:05Z", "ClaimExpires__c": "2026-11-28T10:15:05Z"})
    );
    let renewed = claim_request_like(
        Api::Salesforce,
        &seen,
        &Report::Renew {
            status: JobStatus::Claimed,
            until: t("2026-11-28T10:20:00Z"),
        },
    );
    assert_eq!(renewed.headers, started.headers, "a renewal is conditional too");
    assert_eq!(
        renewed.body.unwrap(),
        json!({"Status__c": "Claimed", "ClaimExpires__c": "2026-11-28T10:20:00Z"})
    );
    let long = "é".repeat(3000); // 6000 bytes: cut at 4 KiB on a character boundary
    let ended = claim_request_like(
        Api::Salesforce,
        &seen,
        &Report::Ended {
            succeeded: false,
            at: t("2026-11-28T10:01:00Z"),
            result: Some(long),
        },
    );
    let body = ended.body.unwrap();
    assert_eq!(body["Status__c"], json!("Failed"));
    assert_eq!(body["Result__c"].as_str().unwrap().len(), 4096);
    let env = Url::parse("https://contoso.crm.dynamics.com").unwrap();
    let done = report_request(
        Api::Dataverse,
        &env,
        "3f2b1c4d-0000-0000-0000-000000000001",
        &Version::ETag("W/\"7\"".into()),
        &Report::Ended {
            succeeded: true,
            at: t("2026-11-28T10:01:00Z"),
            result: None,
        },
    )
    .unwrap();
    assert_eq!(done.headers, vec![("If-Match", "W/\"7\"".to_string())]);
    assert_eq!(
        done.body.unwrap(),
        json!({"crmc_status": 5, "crmc_ended": "2026-11-28T10:01:00Z"})
    );
}

fn claim_request_like(api: Api, version: &Version, report: &Report) -> Prepared {
    report_request(api, &base(), "a0B000000000001AAA", version, report).unwrap()
}

#[test]
fn records_parse_for_both_crms() {
    let sf = br#"{"Id":"a0B000000000001AAA","Status__c":"Aborted","LastModifiedDate":"2026-11-28T10:00:00.000+0000"}"#;
    assert_eq!(
        parse_record(Api::Salesforce, sf).unwrap(),
        Record {
            status: JobStatus::Aborted,
            version: Version::LastModified(t("2026-11-28T10:00:00Z")),
            claimed_by: None,
            claim_expires: None,
            attempt: None,
        }
    );
    let dv = br#"{"@odata.etag":"W/\"9\"","crmc_status":4,"crmc_claimexpires":"2026-11-28T10:15:00Z","crmc_attempt":3}"#;
    let running = parse_record(Api::Dataverse, dv).unwrap();
    assert_eq!(
        (running.status, running.claim_expires, running.attempt),
        (JobStatus::Running, Some(t("2026-11-28T10:15:00Z")), Some(3))
    );
    assert!(parse_record(Api::Dataverse, b"{}").is_err());
}

#[test]
fn a_release_gives_the_job_back_to_the_queue() {
    let r = report_request(
        Api::Salesforce,
        &base(),
        "a0B000000000001AAA",
        &Version::LastModified(t("2026-11-28T10:00:00Z")),
        &Report::Release,
    )
    .unwrap();
    assert_eq!(
        r.body.unwrap(),
        json!({"Status__c": "Holding", "ClaimedBy__c": null, "ClaimExpires__c": null})
    );
}

#[test]
fn a_record_read_names_only_the_fields_a_report_looks_at() {
    let url = read_url(Api::Salesforce, &base(), "a0B000000000001AAA").unwrap();
    assert_eq!(
        url.path(),
        "/services/data/v62.0/sobjects/CrmJob__c/a0B000000000001AAA"
    );
    let fields: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert_eq!(
        fields,
        [(
            "fields".to_string(),
            "Status__c,ClaimedBy__c,ClaimExpires__c,Attempt__c,LastModifiedDate".to_string()
        )]
    );
    let url = read_url(Api::Dataverse, &base(), "0b0b0b0b-0000-0000-0000-000000000001").unwrap();
    let select: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert_eq!(
        select,
        [(
            "$select".to_string(),
            "crmc_status,crmc_claimedby,crmc_claimexpires,crmc_attempt".to_string()
        )]
    );
    // The result is never read back: a CRM user may fill it to the field's limit.
    assert!(!url.as_str().contains("result"));
    assert!(read_url(Api::Salesforce, &base(), "a0B/../x").is_err());
}
