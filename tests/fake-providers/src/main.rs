//! `fake-providers --listen 127.0.0.1:8089 [--seed seed.yaml]`: serves fake Salesforce, Entra ID and
//! Dataverse endpoints (and the `/_admin/` control API) on one loopback port until SIGTERM / Ctrl-C.
//! See the library documentation for endpoints, the admin API and the seed format.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use fake_providers::{FakeProviders, Seed};

/// Fake Salesforce, Entra ID and Dataverse servers for tests and demos (loopback only).
#[derive(Parser, Debug)]
#[command(name = "fake-providers")]
struct Args {
    /// Address to listen on (a loopback address; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// YAML or JSON file with orgs, environments and refresh tokens to create at start.
    #[arg(long)]
    seed: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let seed = match &args.seed {
        None => Seed::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
                eprintln!("error: cannot read {}: {e}", path.display());
                std::process::exit(1);
            });
            serde_yaml::from_str(&text).unwrap_or_else(|e| {
                eprintln!("error: {} is not a valid seed file: {e}", path.display());
                std::process::exit(1);
            })
        }
    };
    let fake = FakeProviders::start_on(args.listen).await.unwrap_or_else(|e| {
        eprintln!("error: cannot listen on {}: {e}", args.listen);
        std::process::exit(1);
    });
    fake.apply_seed(&seed);
    let url = fake.url();
    println!("fake-providers listening on {url}");
    println!("  salesforce loginUrl:     {url}");
    println!("  entra authority:         {url}");
    println!("  dynamics environmentUrl: {url}");
    println!("  admin API:               {url}/_admin/  (GET /_admin/stats)");
    println!(
        "  seeded: {} Salesforce org(s), {} Dynamics environment(s), rotation {}",
        seed.salesforce.len(),
        seed.dynamics.len(),
        if seed.rotation { "on" } else { "off" }
    );
    shutdown_signal().await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
