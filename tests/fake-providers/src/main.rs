//! `fake-providers --listen 127.0.0.1:8089 [--seed seed.yaml] [--tls-cert F --tls-key F]`: serves
//! fake Salesforce, Entra ID and Dataverse endpoints (and the `/_admin/` control API) on one port
//! until SIGTERM / Ctrl-C: plain http on loopback, or https (any address) with a certificate.
//! `fake-providers gen-certs --dir D --ip 10.88.0.1 --dns localhost` writes a throwaway test CA and a
//! server certificate. See the library documentation for endpoints, the admin API and the seed format.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fake_providers::{FakeProviders, Seed, ServerIdentity, TestPki};

/// Fake Salesforce, Entra ID and Dataverse servers for tests and demos.
#[derive(Parser, Debug)]
#[command(name = "fake-providers", args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (plain http: a loopback address only; port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// YAML or JSON file with orgs, environments, refresh tokens and CRM jobs to create at start.
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Serve https with this PEM certificate (chain); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Base URL the fake announces in its answers (Salesforce instance_url and id), e.g. when it
    /// listens on 0.0.0.0; default: the listen address.
    #[arg(long)]
    public_url: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a throwaway test CA (ca.crt) and a server certificate (tls.crt, tls.key) for the given
    /// IP addresses and DNS names.
    GenCerts {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// IP address the server certificate is valid for (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// DNS name the server certificate is valid for (repeatable).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
    },
}

fn fail(message: String) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(Command::GenCerts { dir, ips, dns_names }) = &args.command {
        if ips.is_empty() && dns_names.is_empty() {
            fail("give at least one --ip or --dns for the server certificate".into());
        }
        let pki = TestPki::generate(ips, dns_names)
            .unwrap_or_else(|e| fail(format!("cannot generate the certificates: {e}")));
        pki.write_to(dir)
            .unwrap_or_else(|e| fail(format!("cannot write into {}: {e}", dir.display())));
        println!(
            "wrote {0}/ca.crt, {0}/tls.crt and {0}/tls.key (server certificate for {1})",
            dir.display(),
            ips.iter()
                .map(ToString::to_string)
                .chain(dns_names.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return;
    }
    let seed = match &args.seed {
        None => Seed::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|e| fail(format!("cannot read {}: {e}", path.display())));
            serde_saphyr::from_str(&text)
                .unwrap_or_else(|e| fail(format!("{} is not a valid seed file: {e}", path.display())))
        }
    };
    for entry in &seed.jobs {
        let known = seed.salesforce.iter().any(|o| o.org.org_id == entry.remote_id)
            || seed
                .dynamics
                .iter()
                .any(|e| e.environment.organization_id == entry.remote_id);
        if !known {
            fail(format!(
                "the seed's jobs name {}, which is no org or environment of the seed",
                entry.remote_id
            ));
        }
    }
    let started = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let identity = ServerIdentity::read(cert, key).unwrap_or_else(|e| fail(e.to_string()));
            FakeProviders::start_https_on(args.listen, &identity, args.public_url.as_deref()).await
        }
        _ => {
            if args.public_url.is_some() {
                fail("--public-url is for https (--tls-cert, --tls-key) only".into());
            }
            FakeProviders::start_on(args.listen).await
        }
    };
    let fake = started.unwrap_or_else(|e| fail(format!("cannot serve on {}: {e}", args.listen)));
    fake.apply_seed(&seed);
    let url = fake.url();
    println!("fake-providers listening on {url}");
    println!("  salesforce loginUrl:     {url}");
    println!("  entra authority:         {url}");
    println!("  dynamics environmentUrl: {url}");
    println!("  admin API:               {url}/_admin/  (GET /_admin/stats)");
    println!(
        "  seeded: {} Salesforce org(s), {} Dynamics environment(s), {} job(s), rotation {}",
        seed.salesforce.len(),
        seed.dynamics.len(),
        seed.jobs.iter().map(|j| u64::from(j.count)).sum::<u64>(),
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
