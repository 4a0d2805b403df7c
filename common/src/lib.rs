//! Code both binaries need: the peer rules, the health/metrics HTTP endpoint
//! and the metrics text, log set-up, the API client and the Node watch's
//! retry policy.

pub use api::{ApiArgs, kube_client, with_causes};

pub mod api;
pub mod http;
pub mod metrics;
pub mod nodes;
pub mod settings;
pub mod watch;

/// Text or JSON logs to stderr, filtered by RUST_LOG (default info).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    // `kubectl logs` and log files get plain text, not terminal colours.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json { builder.json().init() } else { builder.init() }
}
