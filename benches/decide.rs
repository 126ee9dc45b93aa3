//! Speed of the pure per-reconcile decisions: the waiting order of an org's claim against N waiting
//! connections and the status decision; and the same waiting order, and the lookup of a Secret's
//! connections, through the controller's index against the scan of N connections it replaced. `cargo bench --bench decide` (under `cargo test` it runs one quick round, unmeasured).

use connection_operator::api::{Connection, ConnectionSpec, Provider};
use connection_operator::controller::claims::{self, Claimant};
use connection_operator::controller::index::Index;
use connection_operator::controller::state::{self, Check, Identity};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use std::hint::black_box;
use std::time::Instant;

fn peers(n: usize) -> Vec<Claimant> {
    (0..n)
        .map(|i| Claimant {
            namespace: format!("ns{}", i % 100),
            name: format!("c{i}"),
            team: format!("t{}", i % 500),
            created: Timestamp::from_second(1_700_000_000 + i as i64).ok(),
            remote_id: format!("00D{:012}", i % 5000),
        })
        .collect()
}

fn conn() -> Connection {
    let mut c = Connection::new(
        "me",
        ConnectionSpec::new("sales", Provider::SalesforceProduction, "s"),
    );
    c.metadata.namespace = Some("ns".into());
    c.metadata.generation = Some(1);
    c
}

fn time<T>(label: &str, iterations: u32, mut f: impl FnMut() -> T) -> std::time::Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(f());
    }
    let per = start.elapsed() / iterations;
    println!("{label:<56} {per:>12.2?} per call ({iterations} calls)");
    per
}

/// N connections as the watch delivers them, one org each (every fiftieth waiting in Conflict).
fn guards(n: usize) -> Vec<kube::core::DeserializeGuard<Connection>> {
    (0..n)
        .map(|i| {
            let mut c = Connection::new(
                &format!("c{i}"),
                ConnectionSpec::new("sales", Provider::SalesforceProduction, format!("s{i}")),
            );
            c.metadata.namespace = Some(format!("ns{}", i % 100));
            c.metadata.uid = Some(format!("uid-{i}"));
            c.metadata.creation_timestamp =
                Some(Time(Timestamp::from_second(1_700_000_000 + i as i64).unwrap()));
            c.status = Some(connection_operator::api::ConnectionStatus {
                remote_id: Some(format!("00D{:012}AAA", i % 5000)),
                state: Some(if i % 50 == 0 {
                    connection_operator::api::State::Conflict
                } else {
                    connection_operator::api::State::Active
                }),
                ..Default::default()
            });
            kube::core::DeserializeGuard(Ok(c))
        })
        .collect()
}

/// What a reconcile and a Secret event cost through the index, against the scans of the cache it
/// replaced (the same N connections, in the same run): per call and as a ratio.
fn index_against_scan(n: usize, iterations: u32) {
    let all = guards(n);
    let index = Index::new(1);
    let mut writer = index.writer(None);
    for g in &all {
        let cached = kube::core::DeserializeGuard(g.0.clone().map(Into::into));
        writer.apply(&kube::runtime::watcher::Event::Apply(cached));
    }
    let cache: Vec<std::sync::Arc<_>> = all.into_iter().map(std::sync::Arc::new).collect();
    let me = Claimant {
        namespace: "ns7".into(),
        name: "me".into(),
        team: "sales".into(),
        created: Timestamp::from_second(1_800_000_000).ok(),
        remote_id: format!("00D{:012}AAA", 4321),
    };
    let scan = time(
        &format!("older waiting: scan of {n} cached connections"),
        iterations,
        || {
            let waiting: Vec<Claimant> = cache
                .iter()
                .filter_map(|g| g.0.as_ref().ok())
                .filter_map(claims::waiting_claimant)
                .collect();
            claims::older_waiting(&me, &waiting)
        },
    );
    let indexed = time(
        &format!("older waiting: index of {n} connections"),
        iterations,
        || index.older_waiting(&me, None),
    );
    println!(
        "  ratio index / scan: {:.4}",
        indexed.as_secs_f64() / scan.as_secs_f64()
    );
    let scan = time(
        &format!("a Secret's connections: scan of {n}"),
        iterations,
        || {
            cache
                .iter()
                .filter_map(|g| g.0.as_ref().ok())
                .filter(|c| {
                    c.metadata.namespace.as_deref() == Some("ns42")
                        && c.spec.credentials_secret_ref.name == "s42"
                })
                .count()
        },
    );
    let indexed = time(
        &format!("a Secret's connections: index of {n}"),
        iterations,
        || index.using_secret("ns42", "s42").len(),
    );
    println!(
        "  ratio index / scan: {:.4}",
        indexed.as_secs_f64() / scan.as_secs_f64()
    );
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let scale = if measuring { 1 } else { 1000 };
    let c = conn();
    let now = Time(Timestamp::from_second(1_800_000_000).unwrap());
    let id = Identity {
        remote_id: "00D000000000042".into(),
        instance_url: "https://x".into(),
        user: "u".into(),
    };
    for n in [100usize, 10_000] {
        let all = peers(n);
        let me = Claimant {
            namespace: "ns".into(),
            name: "me".into(),
            team: "sales".into(),
            created: Timestamp::from_second(1_700_000_500).ok(),
            remote_id: id.remote_id.clone(),
        };
        time(
            &format!("claims::older_waiting against {n} peers"),
            10_000 / scale as u32,
            || claims::older_waiting(&me, &all),
        );
        time(
            &format!("state::decide (waiting order against {n} peers)"),
            10_000 / scale as u32,
            || {
                state::decide(
                    &c,
                    &Check::valid(id.clone()),
                    |id| {
                        let me = Claimant {
                            remote_id: id.remote_id.clone(),
                            ..me.clone()
                        };
                        if claims::older_waiting(&me, &all) {
                            claims::Claim::Lost {
                                winner: all[0].clone(),
                            }
                        } else {
                            claims::Claim::Won
                        }
                    },
                    &connection_operator::controller::children::RetrieverObserved::Available,
                    &now,
                )
            },
        );
    }
    for n in [1_000usize, 10_000] {
        index_against_scan(n, 1000 / scale as u32);
    }
}
