//! The built-in example worker (`connection-operator worker record-count`): what a JobTemplate's
//! container runs, end to end. It reads the session the operator mounts, counts the records of one
//! object in the CRM, prints the count and writes it as its termination message (the job's result
//! in the CRM). On a 401 it re-reads the session (the operator may have renewed it) and tries once
//! more, then exits 75 (EX_TEMPFAIL). An object the org does not have (Salesforce `INVALID_TYPE`,
//! Dataverse `0x8006088a`) can never be counted: it exits 42, which the example JobTemplate's
//! `podFailurePolicy` turns into a failed Job without a retry.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::api::Provider;
use crate::retriever::session;

/// Flags of `worker record-count`.
#[derive(clap::Args, Debug, Clone)]
pub struct RecordCountArgs {
    /// Where the session Secret is mounted.
    #[arg(long, default_value = "/var/run/crmconnect/session")]
    pub session_dir: PathBuf,
    /// The Salesforce object to count (SELECT COUNT() FROM <object>).
    #[arg(long, default_value = "Account", value_parser = parse_name)]
    pub object: String,
    /// The Dataverse entity set to count (GET <set>/$count).
    #[arg(long, default_value = "accounts", value_parser = parse_name)]
    pub entity_set: String,
    /// Where the result is written for Kubernetes to report (the container's terminationMessagePath).
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
    /// How long the count may take (a large object counts slowly).
    #[arg(long, default_value = "30s", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
}

fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 80 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| s.to_string())
        .ok_or_else(|| format!("{s:?} is not an object name (letters, digits, _)"))
}

/// Exit code when the CRM keeps refusing the session.
pub const EXIT_SESSION_REFUSED: i32 = 75;
/// Exit code when the job can never succeed (the object does not exist in the org): the example
/// JobTemplate fails the Job at once on it (`podFailurePolicy`), without a retry.
pub const EXIT_PERMANENT: i32 = 42;

/// True when the CRM's answer says the counted object does not exist: decided on the HTTP status
/// and the documented error code (Salesforce `INVALID_TYPE`; Dataverse `0x8006088a`, "Resource not
/// found for the segment"), never on the message text.
pub fn no_such_object(provider: Provider, status: u16, body: &str) -> bool {
    let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    match provider {
        Provider::Dynamics365 => status == 404 && value["error"]["code"].as_str() == Some("0x8006088a"),
        _ => {
            status == 400
                && value
                    .as_array()
                    .is_some_and(|errors| errors.iter().any(|e| e["errorCode"] == "INVALID_TYPE"))
        }
    }
}

/// The largest answer read from the CRM: a count is a few bytes, an error a few hundred.
pub const MAX_ANSWER: usize = 64 << 10;

/// Reads a body of at most `max` bytes as text; a longer one is refused without reading it all.
async fn read_body(mut response: reqwest::Response, max: usize) -> Result<String, String> {
    if response.content_length().is_some_and(|len| len > max as u64) {
        return Err(format!("the CRM's answer is larger than {max} bytes: refused"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("cannot read the answer: {e}"))?
    {
        if body.len() + chunk.len() > max {
            return Err(format!("the CRM's answer is larger than {max} bytes: refused"));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| "the CRM's answer is not UTF-8 text".to_string())
}

/// Counts, prints and records. `Err((message, exit code))`. Either way the message is the
/// container's termination message, which becomes the job's result in the CRM.
pub async fn record_count(args: &RecordCountArgs) -> Result<String, (String, i32)> {
    let outcome = count(args).await;
    let message = match &outcome {
        Ok(result) => result,
        Err((message, _)) => message,
    };
    // Best effort: outside a pod there is no termination log.
    let _ = std::fs::write(&args.termination_log, message);
    outcome
}

async fn count(args: &RecordCountArgs) -> Result<String, (String, i32)> {
    let fail = |m: String| (m, 1);
    let mut current = session::load(&args.session_dir)
        .await
        .map_err(|e| fail(e.to_string()))?;
    for attempt in 0..2 {
        let mut builder = reqwest::Client::builder()
            .timeout(args.timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &current.ca_bundle {
            let roots = crate::providers::ExtraRoots::from_pem("the session's ca.crt", pem)
                .map_err(|e| fail(e.to_string()))?;
            builder = roots.trust_in(builder);
        }
        let client = builder.build().map_err(|e| fail(e.to_string()))?;
        let (url, object) = match current.provider {
            Provider::Dynamics365 => {
                let url = current
                    .instance_url
                    .join(&format!("/api/data/v9.2/{}/$count", args.entity_set))
                    .map_err(|e| fail(e.to_string()))?;
                (url, args.entity_set.as_str())
            }
            _ => {
                let mut url = current
                    .instance_url
                    .join("/services/data/v62.0/query")
                    .map_err(|e| fail(e.to_string()))?;
                url.query_pairs_mut()
                    .append_pair("q", &format!("SELECT COUNT() FROM {}", args.object));
                (url, args.object.as_str())
            }
        };
        if !crate::providers::rules::is_allowed_transport(&url) {
            return Err(fail(format!(
                "refusing to send the token over plain http to {url}"
            )));
        }
        let response = client
            .get(url)
            .bearer_auth(current.access_token.expose_secret())
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(|e| fail(format!("cannot reach the CRM: {e}")))?;
        let status = response.status().as_u16();
        if status == 401 {
            if attempt == 0 {
                current = session::load(&args.session_dir)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                continue;
            }
            return Err((
                "the CRM refused the session twice (HTTP 401)".into(),
                EXIT_SESSION_REFUSED,
            ));
        }
        if !(200..300).contains(&status) {
            let body = read_body(response, MAX_ANSWER).await.unwrap_or_default();
            if no_such_object(current.provider, status, &body) {
                return Err((
                    format!(
                        "{object}: no such object in the CRM (HTTP {status}); this job can never succeed"
                    ),
                    EXIT_PERMANENT,
                ));
            }
            return Err(fail(format!("the CRM answered HTTP {status}")));
        }
        let body = read_body(response, MAX_ANSWER).await.map_err(fail)?;
        let count = match current.provider {
            Provider::Dynamics365 => body.trim().trim_start_matches('\u{feff}').parse::<u64>().ok(),
            _ => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("totalSize").and_then(|n| n.as_u64())),
        }
        .ok_or_else(|| fail("the CRM's answer holds no count".into()))?;
        return Ok(format!("{object}: {count} records"));
    }
    unreachable!("the loop returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documented_codes_mean_no_such_object() {
        let sf = r#"[{"message":"sObject type 'X' is not supported.","errorCode":"INVALID_TYPE"}]"#;
        assert!(no_such_object(Provider::SalesforceProduction, 400, sf));
        assert!(no_such_object(Provider::SalesforceSandbox, 400, sf));
        assert!(!no_such_object(Provider::SalesforceProduction, 500, sf));
        let other = r#"[{"message":"sObject type 'X' is not supported.","errorCode":"MALFORMED_QUERY"}]"#;
        assert!(!no_such_object(Provider::SalesforceProduction, 400, other));
        let dv = r#"{"error":{"code":"0x8006088a","message":"Resource not found for the segment 'x'."}}"#;
        assert!(no_such_object(Provider::Dynamics365, 404, dv));
        assert!(!no_such_object(Provider::Dynamics365, 400, dv));
        let dv_other = r#"{"error":{"code":"0x0","message":"Resource not found for the segment 'x'."}}"#;
        assert!(!no_such_object(Provider::Dynamics365, 404, dv_other));
        assert!(!no_such_object(
            Provider::Dynamics365,
            404,
            "<html>not found</html>"
        ));
    }
}
