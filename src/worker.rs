//! The built-in example worker (`connection-operator worker record-count`): what a JobTemplate's
//! container runs, end to end. It reads the session the operator mounts, counts the records of one
//! object in the CRM, prints the count and writes it as its termination message (the job's result
//! in the CRM). On a 401 it re-reads the session (the operator may have renewed it) and tries once
//! more, then exits 75 (EX_TEMPFAIL).

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
}

fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 80 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| s.to_string())
        .ok_or_else(|| format!("{s:?} is not an object name (letters, digits, _)"))
}

/// Exit code when the CRM keeps refusing the session.
pub const EXIT_SESSION_REFUSED: i32 = 75;

/// Counts, prints and records. `Err((message, exit code))`.
pub async fn record_count(args: &RecordCountArgs) -> Result<String, (String, i32)> {
    let fail = |m: String| (m, 1);
    let mut current = session::load(&args.session_dir)
        .await
        .map_err(|e| fail(e.to_string()))?;
    for attempt in 0..2 {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
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
            return Err(fail(format!("the CRM answered HTTP {status}")));
        }
        let body = response
            .text()
            .await
            .map_err(|e| fail(format!("cannot read the answer: {e}")))?;
        let count = match current.provider {
            Provider::Dynamics365 => body.trim().trim_start_matches('\u{feff}').parse::<u64>().ok(),
            _ => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("totalSize").and_then(|n| n.as_u64())),
        }
        .ok_or_else(|| fail("the CRM's answer holds no count".into()))?;
        let result = format!("{object}: {count} records");
        // Best effort: outside a pod there is no termination log.
        let _ = std::fs::write(&args.termination_log, &result);
        return Ok(result);
    }
    unreachable!("the loop returns")
}
