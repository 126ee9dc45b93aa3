//! The operator's API client (`connection_operator::kube_client`) against the real API server: it
//! speaks HTTP/2, and many requests at once share one connection, where kube's default client
//! opens a connection per request in flight (what made a reconcile's parallel requests cost
//! memory; BENCHMARKS.md).
//!
//! A test binary of its own: it counts this process's connections to the API server.
//! Needs the test cluster: run through `tests/cluster/with-cluster.sh` (`make test`).

mod common;

use std::collections::HashSet;

use futures::future::try_join_all;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::client::Body;

const AT_ONCE: usize = 64;

/// The socket inodes of this process (from its file descriptors).
fn own_sockets() -> HashSet<u64> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// This process's established TCP connections to `port` (/proc/net/tcp and tcp6).
fn connections_to(port: u16) -> usize {
    let own = own_sockets();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote_port = cols
                .get(2)
                .and_then(|remote| remote.rsplit(':').next())
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            let established = cols.get(3) == Some(&"01");
            let inode = cols.get(9).and_then(|i| i.parse::<u64>().ok());
            established && remote_port == Some(port) && inode.is_some_and(|i| own.contains(&i))
        })
        .count()
}

async fn get_at_once(client: &kube::Client) {
    let api: Api<Namespace> = Api::all(client.clone());
    try_join_all((0..AT_ONCE).map(|_| api.get("default")))
        .await
        .expect("64 reads at once");
}

#[tokio::test]
async fn the_operator_client_speaks_http2_over_one_connection() {
    let config = common::config_for(&common::kubeconfig_path()).await;
    let port = config.cluster_url.port_u16().expect("the API server's port");
    assert_eq!(connections_to(port), 0, "no connection before the first client");

    let client = connection_operator::kube_client::from_config(config.clone()).expect("client");
    let version = client
        .send(
            http::Request::get("/version")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("GET /version");
    assert_eq!(
        version.version(),
        http::Version::HTTP_2,
        "negotiated through ALPN"
    );
    get_at_once(&client).await;
    assert_eq!(
        connections_to(port),
        1,
        "{AT_ONCE} requests at once, one connection"
    );

    // The measurement can tell: kube's default client (HTTP/1.1) needs more for the same reads.
    let default = kube::Client::try_from(config).expect("client");
    get_at_once(&default).await;
    let with_default = connections_to(port) - 1;
    assert!(
        with_default > 1,
        "kube's default client held {with_default} connections for {AT_ONCE} requests at once"
    );
}
