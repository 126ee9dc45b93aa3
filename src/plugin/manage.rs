//! `kubectl crm pause`, `activate` and `edit`, and waiting for a connection's new state.

use std::time::{Duration, Instant};

use kube::api::{Api, Patch};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::connect::patch_params;
use super::{Ctx, Failed, parse_duration};
use crate::api::{AgreementAcceptance, RequiredAgreement};
use crate::api::{Connection, State};
use crate::controller::state::reasons::AGREEMENT_NOT_ACCEPTED;

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// Name of the Connection.
    pub name: String,
    /// How long to wait for the new state (0: do not wait).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Accept this version of the data processing agreement the cluster requires, if it asks
    /// (for scripts; otherwise you are asked).
    #[arg(long, value_name = "VERSION")]
    pub accept_agreement: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Name of the Connection.
    pub name: String,
    /// How long to wait for the operator's check.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(clap::Args, Debug)]
pub struct EditArgs {
    /// Name of the Connection.
    pub name: String,
    /// The new display name ("" removes it).
    #[arg(long)]
    pub display_name: Option<String>,
    /// The new description ("" removes it).
    #[arg(long)]
    pub description: Option<String>,
}

/// The state a command waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Active after a re-authorization: an Inactive status is the verdict on the old tokens until
    /// the operator has checked the new ones (the Secret has no generation), so it is waited out;
    /// Conflict ends the wait; Paused is success (the tokens work, the pause stays).
    Active,
    /// The verdict on a new spec (a new connection, an activation): Active is success, Inactive and
    /// Conflict say why not.
    Settled,
    /// Paused.
    Paused,
}

/// What the wait concludes from a status (pure): `Some(Ok(line))` done, `Some(Err)` done and
/// failed, `None` keep waiting. `generation`: the spec the answer must describe.
pub fn conclude(connection: &Connection, want: Want) -> Option<Result<String, String>> {
    let status = connection.status.as_ref()?;
    if status.observed_generation != connection.metadata.generation {
        return None;
    }
    let state = status.state?;
    let name = connection.metadata.name.clone().unwrap_or_default();
    let why = || {
        let reason = status.reason.clone().unwrap_or_default();
        let message = status.message.clone().unwrap_or_default();
        format!("connection {name} is {state} ({reason}): {message}")
    };
    let org = status
        .remote_id
        .as_deref()
        .map(|id| format!(", org {id}"))
        .unwrap_or_default();
    match (want, state) {
        (Want::Paused, State::Paused) => Some(Ok(format!("connection {name} is Paused{org}"))),
        (Want::Paused, _) => None,
        (_, State::Active) => Some(Ok(format!("connection {name} is Active{org}"))),
        (Want::Active, State::Paused) => Some(Ok(format!(
            "connection {name} is Paused{org}: `kubectl crm activate {name}` resumes it"
        ))),
        (_, State::Pending) | (Want::Active, State::Inactive) | (Want::Settled, State::Paused) => None,
        (_, State::Conflict) | (Want::Settled, State::Inactive) => Some(Err(why())),
    }
}

/// How a wait ended without the wanted state.
#[derive(Debug)]
pub enum WaitEnd {
    /// The connection says why not (or the wait timed out).
    Failed(String),
    /// The connection waits for this agreement to be accepted.
    Agreement(RequiredAgreement),
}

/// The agreement a connection of the current generation waits for (pure).
pub fn awaited_agreement(connection: &Connection) -> Option<RequiredAgreement> {
    let status = connection.status.as_ref()?;
    (status.observed_generation == connection.metadata.generation
        && status.state == Some(State::Pending)
        && status.reason.as_deref() == Some(AGREEMENT_NOT_ACCEPTED))
    .then(|| status.required_agreement.clone())
    .flatten()
}

/// Polls the connection until [`conclude`] says so, or it waits for an agreement, or `timeout`
/// passes (then the last status).
pub async fn wait_for(
    connections: &Api<Connection>,
    name: &str,
    want: Want,
    timeout: Duration,
) -> Result<String, WaitEnd> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let found = connections
            .get_opt(name)
            .await
            .map_err(|e| WaitEnd::Failed(e.to_string()))?;
        if let Some(connection) = found {
            if let Some(done) = conclude(&connection, want) {
                return done.map_err(WaitEnd::Failed);
            }
            if let Some(agreement) = awaited_agreement(&connection) {
                return Err(WaitEnd::Agreement(agreement));
            }
            last = connection.status;
        }
        if Instant::now() >= deadline {
            let now = last
                .map(|s| {
                    format!(
                        "{} ({}): {}",
                        s.state
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "without status".into()),
                        s.reason.unwrap_or_default(),
                        s.message.unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "without status (is the operator running?)".into());
            return Err(WaitEnd::Failed(format!(
                "connection {name} did not become {want:?} within {}s; it is {now}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The user the cluster knows this kubeconfig as (a SelfSubjectReview), for the agreement's
/// `acceptedBy`; `None` when the cluster does not say.
pub async fn whoami(client: &kube::Client) -> Option<String> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&kube::api::PostParams::default(), &SelfSubjectReview::default())
        .await
        .ok()?;
    review.status?.user_info?.username
}

/// Records the acceptance of `version` in the connection's spec.
pub async fn accept(
    connections: &Api<Connection>,
    name: &str,
    version: &str,
    user: Option<String>,
) -> Result<(), Failed> {
    let now = k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second())
        .expect("now is a valid time");
    let acceptance = AgreementAcceptance {
        version: version.to_string(),
        accepted_by: user,
        accepted_at: Some(Time(now)),
    };
    let patch = serde_json::json!({"spec": {"agreement": acceptance}});
    connections
        .patch(name, &patch_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Asks on stderr whether the user accepts `agreement`; the answer from stdin (none: no).
fn ask(agreement: &RequiredAgreement) -> bool {
    use std::io::{BufRead, Write};
    eprintln!(
        "This cluster requires the {} version {} before a connection is used:\n  {}",
        agreement.name, agreement.version, agreement.url
    );
    eprint!("Do you accept it? [y/N]: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// Waits for `want` (unless `timeout` is 0) and prints the outcome. When the connection waits for
/// the agreement, it is accepted with `--accept-agreement` (if that is the version required), or
/// the user is asked; refused or unanswered, the command fails saying how to accept later.
pub async fn finish(
    client: &kube::Client,
    connections: &Api<Connection>,
    name: &str,
    want: Want,
    timeout: Duration,
    accept_version: Option<&str>,
) -> Result<(), Failed> {
    if timeout.is_zero() {
        return Ok(());
    }
    let mut accepted = false;
    loop {
        match wait_for(connections, name, want, timeout).await {
            Ok(line) => {
                println!("{line}");
                return Ok(());
            }
            Err(WaitEnd::Failed(why)) => return Err(Failed(why)),
            Err(WaitEnd::Agreement(agreement)) => {
                if accepted {
                    return Err(Failed(format!(
                        "connection {name} still waits for the {} version {}",
                        agreement.name, agreement.version
                    )));
                }
                let yes = match accept_version {
                    Some(v) if v == agreement.version => true,
                    Some(v) => {
                        return Err(Failed(format!(
                            "this cluster requires the {} version {} ({}); --accept-agreement named {v}",
                            agreement.name, agreement.version, agreement.url
                        )));
                    }
                    None => ask(&agreement),
                };
                if !yes {
                    return Err(Failed(format!(
                        "connection {name} stays Pending until the {} version {} ({}) is accepted: `kubectl crm activate {name} --accept-agreement {}`",
                        agreement.name, agreement.version, agreement.url, agreement.version
                    )));
                }
                accept(connections, name, &agreement.version, whoami(client).await).await?;
                println!(
                    "connection.crmconnect.io/{name} agreement {} accepted",
                    agreement.version
                );
                accepted = true;
            }
        }
    }
}

pub async fn set_paused(ctx: &Ctx, args: WaitArgs, paused: bool) -> Result<(), Failed> {
    let connections: Api<Connection> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    if connections.get_opt(&args.name).await?.is_none() {
        return Err(Failed(format!(
            "connection {} not found in namespace {}",
            args.name, ctx.namespace
        )));
    }
    let patch = serde_json::json!({"spec": {"paused": paused}});
    connections
        .patch(&args.name, &patch_params(), &Patch::Merge(&patch))
        .await?;
    println!(
        "connection.crmconnect.io/{} {}",
        args.name,
        if paused { "paused" } else { "activated" }
    );
    let want = if paused { Want::Paused } else { Want::Settled };
    finish(
        &ctx.client,
        &connections,
        &args.name,
        want,
        args.timeout,
        args.accept_agreement.as_deref(),
    )
    .await
}

/// What a check concluded (pure): `Ok` when the provider accepted the tokens (the Authorized
/// condition is True), else why not.
pub fn verdict(connection: &Connection) -> Result<String, String> {
    let name = connection.metadata.name.clone().unwrap_or_default();
    let status = connection.status.clone().unwrap_or_default();
    let authorized = status
        .conditions
        .iter()
        .find(|c| c.type_ == crate::api::conditions::AUTHORIZED);
    let state = status.state.map(|s| s.to_string()).unwrap_or_default();
    match authorized {
        Some(c) if c.status == "True" => Ok(format!(
            "credentials valid: {} {} as {} (connection {name} is {state})",
            if connection.spec.provider == crate::api::Provider::Dynamics365 {
                "environment"
            } else {
                "org"
            },
            status.remote_id.unwrap_or_default(),
            status.username.unwrap_or_default()
        )),
        Some(c) if c.status == "Unknown" => Err(format!(
            "credentials not checked ({}): {} (connection {name} is {state}; nothing changed)",
            c.reason, c.message
        )),
        Some(c) => Err(format!(
            "credentials NOT valid ({}): {} (connection {name} is {state})",
            c.reason,
            status.message.unwrap_or_else(|| c.message.clone())
        )),
        None => Err(format!(
            "connection {name} has no verdict yet (is the operator running?)"
        )),
    }
}

pub async fn check(ctx: &Ctx, args: CheckArgs) -> Result<(), Failed> {
    let connections: Api<Connection> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    if connections.get_opt(&args.name).await?.is_none() {
        return Err(Failed(format!(
            "connection {} not found in namespace {}",
            args.name, ctx.namespace
        )));
    }
    // A new value of the annotation asks the operator for one validation now.
    let value = format!(
        "kubectl-crm-{}",
        k8s_openapi::jiff::Timestamp::now().as_nanosecond()
    );
    let patch = serde_json::json!({"metadata": {"annotations": {crate::controller::schedule::REVALIDATE_ANNOTATION: value}}});
    connections
        .patch(&args.name, &patch_params(), &Patch::Merge(&patch))
        .await?;
    let deadline = Instant::now() + args.timeout;
    let connection = loop {
        let connection = connections.get(&args.name).await?;
        if connection
            .status
            .as_ref()
            .and_then(|s| s.last_handled_revalidate.as_deref())
            == Some(value.as_str())
        {
            break connection;
        }
        if Instant::now() >= deadline {
            return Err(Failed(format!(
                "the operator did not check connection {} within {}s (is it running and watching namespace {}?)",
                args.name,
                args.timeout.as_secs(),
                ctx.namespace
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    if let Some(output @ (super::Output::Json | super::Output::Yaml)) = ctx.output {
        print!("{}", super::render(&connection.status, output)?);
    }
    match verdict(&connection) {
        Ok(line) => {
            if !matches!(ctx.output, Some(super::Output::Json | super::Output::Yaml)) {
                println!("{line}");
            }
            Ok(())
        }
        Err(why) => Err(Failed(why)),
    }
}

pub async fn edit(ctx: &Ctx, args: EditArgs) -> Result<(), Failed> {
    if args.display_name.is_none() && args.description.is_none() {
        return Err(Failed(
            "nothing to change: pass --display-name and/or --description".into(),
        ));
    }
    let field = |v: &Option<String>| match v.as_deref() {
        None => None,
        Some("") => Some(serde_json::Value::Null),
        Some(text) => Some(serde_json::Value::String(text.to_string())),
    };
    let mut spec = serde_json::Map::new();
    if let Some(v) = field(&args.display_name) {
        spec.insert("displayName".into(), v);
    }
    if let Some(v) = field(&args.description) {
        spec.insert("description".into(), v);
    }
    let connections: Api<Connection> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    if connections.get_opt(&args.name).await?.is_none() {
        return Err(Failed(format!(
            "connection {} not found in namespace {}",
            args.name, ctx.namespace
        )));
    }
    connections
        .patch(
            &args.name,
            &patch_params(),
            &Patch::Merge(&serde_json::json!({"spec": spec})),
        )
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) => Failed(format!("the change was refused: {}", status.message)),
            other => Failed(other.to_string()),
        })?;
    println!("connection.crmconnect.io/{} edited", args.name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectionSpec, ConnectionStatus, Provider};

    fn conn(state: Option<State>, generation: i64, observed: i64) -> Connection {
        let mut c = Connection::new(
            "acme",
            ConnectionSpec::new("t", Provider::SalesforceProduction, "s"),
        );
        c.metadata.generation = Some(generation);
        c.status = state.map(|state| ConnectionStatus {
            state: Some(state),
            reason: Some("TokenRevoked".into()),
            message: Some("sign in again".into()),
            remote_id: Some("00D1".into()),
            observed_generation: Some(observed),
            ..ConnectionStatus::default()
        });
        c
    }

    #[test]
    fn a_wait_ends_on_the_wanted_state_of_the_current_generation() {
        assert_eq!(conclude(&conn(None, 1, 1), Want::Settled), None);
        assert_eq!(conclude(&conn(Some(State::Pending), 1, 1), Want::Settled), None);
        assert_eq!(
            conclude(&conn(Some(State::Active), 1, 1), Want::Settled),
            Some(Ok("connection acme is Active, org 00D1".into()))
        );
        // A status for the previous spec (before the pause) is not the answer.
        assert_eq!(conclude(&conn(Some(State::Active), 2, 1), Want::Paused), None);
        assert_eq!(conclude(&conn(Some(State::Active), 2, 2), Want::Paused), None);
        assert!(
            conclude(&conn(Some(State::Paused), 2, 2), Want::Paused)
                .unwrap()
                .is_ok()
        );
    }

    #[test]
    fn inactive_or_conflict_end_the_wait_with_the_reason() {
        let failed = conclude(&conn(Some(State::Inactive), 1, 1), Want::Settled)
            .unwrap()
            .unwrap_err();
        assert!(
            failed.contains("Inactive (TokenRevoked): sign in again"),
            "{failed}"
        );
        assert!(
            conclude(&conn(Some(State::Conflict), 1, 1), Want::Active)
                .unwrap()
                .is_err()
        );
        // After a re-authorization, Inactive is the old tokens' verdict until the new ones are checked.
        assert_eq!(conclude(&conn(Some(State::Inactive), 1, 1), Want::Active), None);
        assert!(
            conclude(&conn(Some(State::Paused), 1, 1), Want::Active)
                .unwrap()
                .is_ok()
        );
    }
}
