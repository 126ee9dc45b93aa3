//! Speed of the pure per-reconcile decisions: the waiting order of an org's claim against N waiting
//! connections and the status decision. `cargo bench --bench decide` (under `cargo test` it runs one quick round, unmeasured).

use connection_operator::api::{Connection, ConnectionSpec, Provider};
use connection_operator::controller::claims::{self, Claimant};
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

fn time<T>(label: &str, iterations: u32, mut f: impl FnMut() -> T) {
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(f());
    }
    let per = start.elapsed() / iterations;
    println!("{label:<48} {per:>12.2?} per call ({iterations} calls)");
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
}
