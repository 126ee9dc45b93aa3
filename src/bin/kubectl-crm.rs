//! `kubectl crm`: connection-operator's kubectl plugin (see `connection_operator::plugin`).

use clap::Parser;
use connection_operator::plugin::{self, Cli};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(err) = plugin::run(cli).await {
        eprintln!("error: {}", err.0);
        std::process::exit(1);
    }
}
