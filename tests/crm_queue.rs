//! The CRM job queue client (`crm::JobQueue`) against the fake CRMs: what it reads and how much.

mod fake_crm;

use std::time::Duration;

use connection_operator::crm::{self, Api, JobQueue, JobStatus, MAX_RECORD_BODY, Target};
use fake_crm::{ENV, ORG, access_token, fake_crms};
use fake_providers::{Fault, FaultTarget, NewJob};
use secrecy::SecretString;

fn queue() -> JobQueue {
    JobQueue::new(Duration::from_secs(10), None).unwrap()
}

/// A session for `remote` (the org or the environment) of the fake CRMs: its base URL and token.
async fn session(fake: &fake_providers::FakeProviders, remote: &str, api: Api) -> (url::Url, SecretString) {
    let dynamics = api == Api::Dataverse;
    let base = if dynamics {
        fake.environment_url()
    } else {
        fake.url()
    };
    let token = access_token(fake, remote, dynamics).await;
    (url::Url::parse(&base).unwrap(), SecretString::from(token))
}

/// A record read asks only for the fields a fence or a report looks at: a result a CRM user filled
/// to the field's limit (Salesforce 131,072 characters, Dataverse 1,048,576) does not travel, and
/// the read stays under its 64 KiB cap.
#[tokio::test]
async fn a_record_read_fetches_only_the_fields_it_needs() {
    let fake = fake_crms().await;
    for (remote, api, result_len) in [(ORG, Api::Salesforce, 131_072), (ENV, Api::Dataverse, 1_048_576)] {
        let (base, token) = session(&fake, remote, api).await;
        let target = Target {
            api,
            base: &base,
            token: &token,
        };
        let id = fake.seed_jobs(remote, &[NewJob::new("export")]).remove(0);
        assert!(fake.set_job_result(remote, &id, &"r".repeat(result_len)));
        let read = queue().read(&target, &id).await.unwrap();
        let record = read.value.expect("the record exists");
        assert_eq!(record.status, JobStatus::Holding, "{api:?}");
        assert!(read.server_time.is_some(), "{api:?}: the answer's Date is kept");
    }
}

/// A record answer larger than 64 KiB is refused with a clear error (it would be a CRM or a proxy
/// sending what was not asked for), not read into memory.
#[tokio::test]
async fn an_oversized_record_answer_is_refused() {
    let fake = fake_crms().await;
    for (remote, api, base, target_kind) in [
        (ORG, Api::Salesforce, fake.url(), FaultTarget::SalesforceData),
        (
            ENV,
            Api::Dataverse,
            fake.environment_url(),
            FaultTarget::DataverseData,
        ),
    ] {
        let token = SecretString::from(access_token(&fake, remote, api == Api::Dataverse).await);
        let base = url::Url::parse(&base).unwrap();
        let target = Target {
            api,
            base: &base,
            token: &token,
        };
        let id = fake.seed_jobs(remote, &[NewJob::new("export")]).remove(0);
        fake.push_fault(Fault::oversized(target_kind, MAX_RECORD_BODY + 1));
        let err = queue().read(&target, &id).await.unwrap_err();
        assert!(
            matches!(&err, crm::CrmError::Transport(m) if m.contains(&format!("larger than {MAX_RECORD_BODY} bytes"))),
            "{api:?}: {err}"
        );
        // The next read (no fault) works: nothing was left half-read.
        assert!(queue().read(&target, &id).await.unwrap().value.is_some());
    }
}
