//! `weir-agent run`: first the context (what the agent learns about its own
//! node before it can program anything), then the named tasks in
//! `tasks.rs`, each started from here. The dataplane is never torn down.

mod context;
mod tasks;

use std::time::Duration;

use tracing::info;

use crate::cli::RunArgs;
use context::Context;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (ctx, kernel) = Context::build(args).await?;
    let engine = tasks::start_engine(&ctx, kernel)?;
    tasks::publish_own_node(&ctx, &engine).await;
    tasks::write_cni_config(&ctx)?;
    tasks::start_firewall(&ctx, engine.peers_rx.clone());
    tasks::start_peer_source(&ctx, engine.peers_tx);
    tasks::report_network_available(&ctx, engine.status.clone());
    tasks::spawn_summary(engine.status);

    wait_for_signal().await;
    info!("signal received; leaving the dataplane exactly as it is");
    let _ = engine.shutdown.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), engine.task).await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
