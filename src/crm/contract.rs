//! The CRM job queue contract: the names of the job object and its fields in each CRM. The only
//! place they are spelled, so an org with other names can later be supported by a mapping.

/// The job's status, as both CRMs hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Queued, waiting for a processor (the product's "Holding").
    Holding,
    /// Queued, waiting for a processor.
    Waiting,
    /// A processor claimed it and holds it until the claim expires.
    Claimed,
    Running,
    Completed,
    Failed,
    /// Aborted in the CRM by a user.
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

    /// Salesforce `Status__c` picklist value.
    pub fn salesforce(self) -> &'static str {
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

    /// Dataverse `crmc_status` choice value.
    pub fn dataverse(self) -> i64 {
        match self {
            JobStatus::Holding => 1,
            JobStatus::Waiting => 2,
            JobStatus::Claimed => 3,
            JobStatus::Running => 4,
            JobStatus::Completed => 5,
            JobStatus::Failed => 6,
            JobStatus::Aborted => 7,
        }
    }

    pub fn from_salesforce(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.salesforce() == value)
    }

    pub fn from_dataverse(value: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.dataverse() == value)
    }
}

/// The value of the processor field that means "for the cloud", i.e. for us.
pub const PROCESSOR_CLOUD: &str = "Cloud";

/// Salesforce: the custom object `CrmJob__c`, REST API v62.0.
pub mod salesforce {
    pub const API_PATH: &str = "/services/data/v62.0";
    pub const OBJECT: &str = "CrmJob__c";
    pub const ID: &str = "Id";
    pub const STATUS: &str = "Status__c";
    pub const TYPE: &str = "Type__c";
    pub const PROCESSOR: &str = "Processor__c";
    pub const CLAIMED_BY: &str = "ClaimedBy__c";
    pub const CLAIM_EXPIRES: &str = "ClaimExpires__c";
    pub const ATTEMPT: &str = "Attempt__c";
    pub const STARTED: &str = "Started__c";
    pub const ENDED: &str = "Ended__c";
    pub const RESULT: &str = "Result__c";
    /// Every custom field of the object (the shipped schema, `crm/salesforce`, holds exactly these).
    pub const FIELDS: [&str; 9] = [
        STATUS,
        TYPE,
        PROCESSOR,
        CLAIMED_BY,
        CLAIM_EXPIRES,
        ATTEMPT,
        STARTED,
        ENDED,
        RESULT,
    ];
    /// The fields the cloud processor writes (claims, leases, outcomes); it only reads the others.
    pub const WRITTEN: [&str; 7] = [STATUS, CLAIMED_BY, CLAIM_EXPIRES, ATTEMPT, STARTED, ENDED, RESULT];
    pub const LAST_MODIFIED: &str = "LastModifiedDate";
    /// Every answer carries the org's API usage: `api-usage=N/M`.
    pub const LIMIT_INFO_HEADER: &str = "Sforce-Limit-Info";
    /// `errorCode` of a 403: the org's daily API request limit is used up.
    pub const REQUEST_LIMIT_EXCEEDED: &str = "REQUEST_LIMIT_EXCEEDED";
    /// `errorCode` of a 401: the access token is no longer valid.
    pub const INVALID_SESSION_ID: &str = "INVALID_SESSION_ID";
}

/// Dataverse: the table `crmc_crmjob`, Web API v9.2.
pub mod dataverse {
    pub const API_PATH: &str = "/api/data/v9.2";
    pub const ENTITY_SET: &str = "crmc_crmjobs";
    pub const ID: &str = "crmc_crmjobid";
    pub const STATUS: &str = "crmc_status";
    pub const TYPE: &str = "crmc_type";
    pub const PROCESSOR: &str = "crmc_processor";
    pub const CLAIMED_BY: &str = "crmc_claimedby";
    pub const CLAIM_EXPIRES: &str = "crmc_claimexpires";
    pub const ATTEMPT: &str = "crmc_attempt";
    pub const STARTED: &str = "crmc_started";
    pub const ENDED: &str = "crmc_ended";
    pub const RESULT: &str = "crmc_result";
    /// Every custom column of the table but its primary name (the shipped definition,
    /// `crm/dataverse/table.json`, holds exactly these).
    pub const FIELDS: [&str; 9] = [
        STATUS,
        TYPE,
        PROCESSOR,
        CLAIMED_BY,
        CLAIM_EXPIRES,
        ATTEMPT,
        STARTED,
        ENDED,
        RESULT,
    ];
    /// The table's logical name (the entity set is its plural, the key its name and `id`).
    pub const TABLE: &str = "crmc_crmjob";
    pub const CREATED_ON: &str = "createdon";
    pub const ETAG: &str = "@odata.etag";
    pub const NEXT_LINK: &str = "@odata.nextLink";
}
