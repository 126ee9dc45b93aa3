//! `kubectl crm status [NAME]`: the connections of a namespace as a table, or one connection's
//! details (the product's details view).

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};

use super::{Ctx, Failed, Output, render};
use crate::api::{Connection, JobRun, OrgSettings, Provider, labels};

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// One connection's details; without it, every connection of the namespace.
    pub name: Option<String>,
}

pub async fn status(ctx: &Ctx, args: StatusArgs) -> Result<(), Failed> {
    let connections: Api<Connection> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let Some(name) = args.name else {
        let list = connections.list(&ListParams::default()).await?;
        return match ctx.output {
            Some(output @ (Output::Yaml | Output::Json)) => {
                print!("{}", render(&list, output)?);
                Ok(())
            }
            _ => {
                print!("{}", table(&list.items, Timestamp::now()));
                Ok(())
            }
        };
    };
    let connection = connections.get_opt(&name).await?.ok_or_else(|| {
        Failed(format!(
            "connection {name} not found in namespace {}",
            ctx.namespace
        ))
    })?;
    if let Some(output @ (Output::Yaml | Output::Json)) = ctx.output {
        print!("{}", render(&connection, output)?);
        return Ok(());
    }
    let settings = match connection.status.as_ref().and_then(|s| s.org_settings.clone()) {
        Some(name) => {
            let api: Api<OrgSettings> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            // Readers without access to OrgSettings still get the rest.
            api.get_opt(&name).await.ok().flatten()
        }
        None => None,
    };
    let jobs: Api<JobRun> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut runs = jobs
        .list(&ListParams::default().labels(&format!("{}={name}", labels::CONNECTION)))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    runs.sort_by_key(|r| std::cmp::Reverse(r.metadata.creation_timestamp.clone().map(|t| t.0)));
    let events: Api<Event> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut events = events
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=Connection,involvedObject.name={name}"
        )))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    events.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
    print!(
        "{}",
        details(&connection, settings.as_ref(), &runs, &events, Timestamp::now())
    );
    Ok(())
}

/// `5s`, `3m`, `2h`, `4d`: kubectl's age column.
pub fn age(from: Option<Timestamp>, now: Timestamp) -> String {
    let Some(from) = from else {
        return "<unknown>".into();
    };
    let secs = now.duration_since(from).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Text from the cluster or the CRM made safe for a terminal: control characters (escape
/// sequences, carriage returns, newlines) become spaces, so a job type or a message cannot rewrite
/// the screen or forge a line.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{:<w$}", printable(cell)))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// The connections as a table (pure).
pub fn table(connections: &[Connection], now: Timestamp) -> String {
    if connections.is_empty() {
        return "No connections found.\n".into();
    }
    let mut rows = vec![
        ["NAME", "TEAM", "PROVIDER", "STATE", "REASON", "ORG", "AGE"]
            .map(String::from)
            .to_vec(),
    ];
    for c in connections {
        let status = c.status.clone().unwrap_or_default();
        rows.push(vec![
            c.metadata.name.clone().unwrap_or_default(),
            c.spec.team.clone(),
            c.spec.provider.to_string(),
            status.state.map(|s| s.to_string()).unwrap_or_default(),
            status.reason.unwrap_or_default(),
            status.remote_id.unwrap_or_default(),
            age(c.metadata.creation_timestamp.clone().map(|t| t.0), now),
        ]);
    }
    columns(&rows)
}

fn provider_name(provider: Provider) -> &'static str {
    match provider {
        Provider::SalesforceProduction => "Salesforce Production",
        Provider::SalesforceSandbox => "Salesforce Sandbox",
        Provider::Dynamics365 => "Dynamics 365",
    }
}

/// One connection's details (pure).
pub fn details(
    c: &Connection,
    settings: Option<&OrgSettings>,
    runs: &[JobRun],
    events: &[Event],
    now: Timestamp,
) -> String {
    let status = c.status.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        if !v.is_empty() {
            out.push_str(&format!("{:<15}{}\n", format!("{k}:"), printable(&v)));
        }
    };
    line("Name", c.metadata.name.clone().unwrap_or_default());
    line("Namespace", c.metadata.namespace.clone().unwrap_or_default());
    line("Team", c.spec.team.clone());
    let kind = match &c.spec.dynamics {
        Some(d) => format!(
            "{} ({} cloud)",
            provider_name(c.spec.provider),
            crate::providers::rules::cloud_name(d.cloud)
        ),
        None => provider_name(c.spec.provider).to_string(),
    };
    line("Type", kind);
    line("Display name", c.spec.display_name.clone().unwrap_or_default());
    line("Description", c.spec.description.clone().unwrap_or_default());
    line(
        if c.spec.provider == Provider::Dynamics365 {
            "Environment ID"
        } else {
            "Org ID"
        },
        status
            .remote_id
            .clone()
            .unwrap_or_else(|| "(not validated yet)".into()),
    );
    line("Instance", status.instance_url.clone().unwrap_or_default());
    line("User", status.username.clone().unwrap_or_default());
    line(
        "State",
        status
            .state
            .map(|s| s.to_string())
            .unwrap_or_else(|| "(no status yet: is the operator running?)".into()),
    );
    line("Reason", status.reason.clone().unwrap_or_default());
    line("Message", status.message.clone().unwrap_or_default());
    line(
        "Credentials",
        format!("Secret {}", c.spec.credentials_secret_ref.name),
    );
    let retriever = status.conditions.iter().find(|k| k.type_ == "RetrieverReady");
    line(
        "Retriever",
        retriever
            .map(|k| {
                let ready = if k.status == "True" { "ready" } else { "not ready" };
                format!("{ready} ({}): {}", k.reason, k.message)
            })
            .unwrap_or_else(|| "none".into()),
    );
    if let Some(s) = settings {
        line(
            "Org settings",
            format!(
                "{} (auto-run {}, poll every {}, at most {} jobs at once{})",
                s.metadata.name.clone().unwrap_or_default(),
                if s.spec.auto_run_jobs { "on" } else { "off" },
                s.spec.poll_interval,
                s.spec.max_concurrent_jobs,
                if s.spec.allowed_job_types.is_empty() {
                    String::new()
                } else {
                    format!(", types {}", s.spec.allowed_job_types.join(", "))
                }
            ),
        );
    } else if let Some(name) = &status.org_settings {
        line("Org settings", name.clone());
    }
    out.push_str("Recent jobs:");
    if runs.is_empty() {
        out.push_str("    none\n");
    } else {
        out.push('\n');
        let mut rows = vec![
            ["  RUN", "TYPE", "CRM JOB", "PHASE", "AGE"]
                .map(String::from)
                .to_vec(),
        ];
        for r in runs.iter().take(5) {
            let phase = r
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .and_then(|p| serde_json::to_value(p).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            rows.push(vec![
                format!("  {}", r.metadata.name.clone().unwrap_or_default()),
                r.spec.job_type.clone(),
                r.spec.crm_job_id.clone(),
                phase,
                age(r.metadata.creation_timestamp.clone().map(|t| t.0), now),
            ]);
        }
        out.push_str(&columns(&rows));
    }
    out.push_str("Events:");
    if events.is_empty() {
        out.push_str("         none\n");
    } else {
        out.push('\n');
        let mut rows = vec![
            ["  LAST SEEN", "TYPE", "REASON", "MESSAGE"]
                .map(String::from)
                .to_vec(),
        ];
        for e in events.iter().rev().take(5).rev() {
            rows.push(vec![
                format!("  {}", age(e.last_timestamp.clone().map(|t| t.0), now)),
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&columns(&rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectionSpec, ConnectionStatus, State};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn conn() -> Connection {
        let mut c = Connection::new(
            "acme",
            ConnectionSpec::new("sales", Provider::SalesforceSandbox, "acme-credentials"),
        );
        c.metadata.namespace = Some("demo".into());
        c.metadata.creation_timestamp = Some(Time("2026-11-28T10:00:00Z".parse().unwrap()));
        c.status = Some(ConnectionStatus {
            state: Some(State::Inactive),
            reason: Some("TokenRevoked".into()),
            message: Some("the refresh token was revoked: run kubectl crm reauthorize acme".into()),
            remote_id: Some("00D000000000001AAA".into()),
            ..ConnectionStatus::default()
        });
        c
    }

    #[test]
    fn the_table_has_kubectl_columns_and_ages() {
        let now: Timestamp = "2026-11-28T10:05:00Z".parse().unwrap();
        let text = table(&[conn()], now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME   TEAM    PROVIDER"), "{text}");
        assert!(
            lines[1].contains("SalesforceSandbox")
                && lines[1].contains("Inactive")
                && lines[1].ends_with("5m"),
            "{text}"
        );
        assert_eq!(table(&[], now), "No connections found.\n");
    }

    #[test]
    fn details_say_what_is_wrong_and_what_to_do() {
        let now: Timestamp = "2026-11-28T10:05:00Z".parse().unwrap();
        let text = details(&conn(), None, &[], &[], now);
        assert!(text.contains("Type:          Salesforce Sandbox\n"), "{text}");
        assert!(text.contains("Org ID:        00D000000000001AAA\n"), "{text}");
        assert!(text.contains("State:         Inactive\n"), "{text}");
        assert!(text.contains("run kubectl crm reauthorize acme"), "{text}");
        assert!(text.contains("Retriever:     none\n"), "{text}");
        assert!(text.contains("Recent jobs:    none\n"), "{text}");
    }

    #[test]
    fn crm_text_cannot_reach_the_terminal_raw() {
        let now: Timestamp = "2026-11-28T10:05:00Z".parse().unwrap();
        let mut c = conn();
        c.status.as_mut().unwrap().message = Some("bad\u{1b}]0;pwned\u{7}\r\nState:  Active".into());
        let mut run = JobRun::new(
            "sf-org-a0b-1",
            crate::api::JobRunSpec {
                connection: "acme".into(),
                crm_job_id: "a0B000000000001AAA".into(),
                job_type: "ex\u{1b}[2Jport".into(),
                provider: Provider::SalesforceSandbox,
            },
        );
        run.metadata.creation_timestamp = Some(Time(now));
        let text = details(&c, None, &[run], &[], now);
        assert!(!text.chars().any(|ch| ch.is_control() && ch != '\n'), "{text:?}");
        assert!(
            text.contains("Message:       bad ]0;pwned   State:  Active\n"),
            "{text:?}"
        );
        assert!(text.contains("ex [2Jport"), "{text:?}");
        assert!(
            !text.lines().any(|l| l.starts_with("State:  Active")),
            "a forged line: {text}"
        );
    }

    #[test]
    fn ages_round_like_kubectl() {
        let now: Timestamp = "2026-11-28T10:00:00Z".parse().unwrap();
        let ago = |s: i64| {
            Some(
                now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s))
                    .unwrap(),
            )
        };
        assert_eq!(age(ago(59), now), "59s");
        assert_eq!(age(ago(600), now), "10m");
        assert_eq!(age(ago(3 * 3600), now), "3h");
        assert_eq!(age(ago(3 * 86400), now), "3d");
    }
}
