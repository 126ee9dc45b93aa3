//! `kubectl crm pause`, `activate` and `edit`, and waiting for a connection's new state.

use std::time::{Duration, Instant};

use kube::api::{Api, Patch};

use super::connect::{finish, patch_params};
use super::{Ctx, Failed, parse_duration};
use crate::api::{Connection, State};

#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// Name of the Connection.
    pub name: String,
    /// How long to wait for the new state (0: do not wait).
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

/// Polls the connection until [`conclude`] says so, or `timeout` passes (then the last status).
pub async fn wait_for(
    connections: &Api<Connection>,
    name: &str,
    want: Want,
    timeout: Duration,
) -> Result<String, Failed> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(connection) = connections.get_opt(name).await? {
            if let Some(done) = conclude(&connection, want) {
                return done.map_err(Failed);
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
            return Err(Failed(format!(
                "connection {name} did not become {want:?} within {}s; it is {now}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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
    finish(&connections, &args.name, want, args.timeout).await
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
