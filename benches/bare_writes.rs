//! The baseline of `scripts/bench-scale.sh`: a bare client making exactly the writes the operator
//! makes for each new connection with valid tokens, with the operator's own object builders, the
//! same concurrency and the same API server. No provider call, no read, no decision: what is left
//! of the operator's cold start when everything but its writes costs nothing.
//!
//! `cargo bench --bench bare_writes -- NAMESPACE N CONCURRENCY` (the Connections `c0..c{N-1}` must
//! exist in NAMESPACE, with no operator watching it). Prints `bare writes: S seconds, W writes`.
//!
//! Per connection, in the operator's order (see `controller/apply.rs`, `org_claim.rs`):
//! - create `<name>-token` with a refresh intent, then withdraw the intent (merge patch);
//! - apply the retriever ServiceAccount and RoleBinding, `<name>-session`, the Deployment;
//! - create the OrgClaim and the OrgSettings;
//! - apply the status, create the event.

use std::time::Instant;

use connection_operator::api::{
    ClaimHolder, Connection, ConnectionStatus, OrgClaim, OrgClaimSpec, OrgSettings, OrgSettingsSpec, State,
    org_key,
};
use connection_operator::controller::children::{self, OrgJobs, RetrieverSettings, SessionData};
use connection_operator::controller::tokens;
use connection_operator::events::Recorder;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Client, Resource, ResourceExt};

const MANAGER: &str = "connection-operator";

fn typed<K: Resource<DynamicType = ()> + serde::Serialize>(obj: &K) -> serde_json::Value {
    let mut value = serde_json::to_value(obj).expect("serializes");
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    value
}

async fn one(client: Client, recorder: &Recorder, ns: &str, conn: Connection, i: usize) -> kube::Result<u32> {
    let apply = PatchParams::apply(MANAGER).force();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let org = format!("00D{i:012}AAA");
    let key = org_key(conn.spec.provider, &org).expect("an org key");
    let intent = tokens::Intent {
        holder: "bench/0".into(),
        token: tokens::token_hash("rt"),
        deadline: k8s_openapi::jiff::Timestamp::now(),
    };
    let token = secrets
        .create(
            &PostParams::default(),
            &tokens::new_token_secret(&conn, "rt", "seed", Some(&intent)),
        )
        .await?;
    let withdraw = tokens::withdraw_patch(token.metadata.resource_version.as_deref());
    secrets
        .patch(
            &token.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&withdraw),
        )
        .await?;
    let settings = RetrieverSettings::default();
    let account = children::retriever_service_account(&conn);
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .patch(&account.name_any(), &apply, &Patch::Apply(typed(&account)))
        .await?;
    let binding = children::retriever_role_binding(&conn, &settings);
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .patch(&binding.name_any(), &apply, &Patch::Apply(typed(&binding)))
        .await?;
    let session = children::session_secret(
        &conn,
        &SessionData {
            access_token: "at".into(),
            instance_url: "https://bench.my.salesforce.com".into(),
            expires_at: None,
            ca_bundle: None,
            annotations: Default::default(),
        },
    );
    secrets
        .patch(&session.name_any(), &apply, &Patch::Apply(typed(&session)))
        .await?;
    let org_settings = OrgSettingsSpec::default();
    let deployment = children::retriever_deployment(
        &conn,
        &settings,
        Some(&OrgJobs {
            key: &key,
            settings: &org_settings,
            templates: &[],
        }),
        1,
    );
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(&deployment.name_any(), &apply, &Patch::Apply(typed(&deployment)))
        .await?;
    let holder = ClaimHolder {
        namespace: ns.into(),
        name: conn.name_any(),
        uid: conn.uid().unwrap_or_default(),
        team: conn.spec.team.clone(),
    };
    Api::<OrgClaim>::all(client.clone())
        .create(
            &PostParams::default(),
            &OrgClaim::new(&format!("{ns}.{key}"), OrgClaimSpec { holder, held: true }),
        )
        .await?;
    Api::<OrgSettings>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &OrgSettings::new(&key, org_settings.clone()),
        )
        .await?;
    let status = ConnectionStatus {
        state: Some(State::Active),
        reason: Some("Connected".into()),
        message: Some(format!("connected to org {org} as u{i}@bench")),
        org_id: Some(org.clone()),
        remote_id: Some(org.clone()),
        instance_url: Some("https://bench.my.salesforce.com".into()),
        username: Some(format!("u{i}@bench")),
        org_settings: Some(key.clone()),
        observed_generation: conn.metadata.generation,
        ..ConnectionStatus::default()
    };
    let patch =
        serde_json::json!({"apiVersion": "crmconnect.io/v1alpha1", "kind": "Connection", "status": status});
    Api::<Connection>::namespaced(client.clone(), ns)
        .patch_status(&conn.name_any(), &apply, &Patch::Apply(&patch))
        .await?;
    let event = Event {
        type_: EventType::Normal,
        reason: "Activated".into(),
        note: Some(format!("connected to org {org} as u{i}@bench")),
        action: "Validate".into(),
        secondary: None,
    };
    recorder.publish(&event, &conn.object_ref(&())).await?;
    Ok(10)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [ns, n, concurrency] = args.as_slice() else {
        // `cargo test --all-targets` (make test) runs every bench once, without arguments: it
        // needs its Connections, which scripts/bench-scale.sh creates, so there is nothing to do.
        eprintln!(
            "bare_writes: nothing to do without NAMESPACE N CONCURRENCY (scripts/bench-scale.sh passes them)"
        );
        return;
    };
    let n: usize = n.parse().expect("N");
    let concurrency: usize = concurrency.parse().expect("CONCURRENCY");
    // The operator's own client (HTTP/2 when offered: one connection for the 32 chains).
    let client = connection_operator::kube_client::infer()
        .await
        .expect("a kubeconfig");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: None,
        },
    );
    let connections: Api<Connection> = Api::namespaced(client.clone(), ns);
    let all: Vec<Connection> = connections.list(&Default::default()).await.expect("list").items;
    let by_index = |c: &Connection| {
        c.name_any()
            .trim_start_matches('c')
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    };
    assert_eq!(all.len(), n, "{n} Connections in {ns}");
    let start = Instant::now();
    let writes: u32 = futures::stream::iter(all)
        .map(|c| {
            let i = by_index(&c);
            let (client, recorder) = (client.clone(), &recorder);
            async move { one(client, recorder, ns, c, i).await.expect("a write") }
        })
        .buffer_unordered(concurrency)
        .fold(0, |a, b| async move { a + b })
        .await;
    println!(
        "bare writes: {:.1} seconds, {writes} writes",
        start.elapsed().as_secs_f64()
    );
}
