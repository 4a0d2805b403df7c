//! Subcommand dispatch, `status` and `cleanup`.

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::{Cli, Command, OutputFormat, RunArgs, StatusArgs};
use crate::dataplane::DeviceSpec;
use crate::dataplane::Kernel;
use crate::dataplane::netlink::{NetlinkKernel, delete_link};
use crate::model::Backend;
use crate::peers::publish::PeersRecord;

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => crate::run::run(cli.run).await.map(|_| ExitCode::SUCCESS),
        Command::Status(s) => status(&cli.run, &s),
        Command::Cleanup => cleanup(&cli.run).await,
    }
}

fn status(args: &RunArgs, s: &StatusArgs) -> anyhow::Result<ExitCode> {
    let port = args.metrics_addr.port();
    let addr = format!("127.0.0.1:{port}");
    let (record, peers_from) = peers_record(args, &addr)?;
    let agent: Option<serde_json::Value> = weir_common::http::get(&addr, "/status")
        .ok()
        .filter(|(code, _)| *code == 200)
        .and_then(|(_, body)| serde_json::from_str(&body).ok());
    let device = match record.backend {
        Backend::Vxlan => DeviceSpec::vxlan_name(args.vni),
        Backend::Ipip => DeviceSpec::IPIP_NAME.to_string(),
    };
    let runtime = tokio::runtime::Handle::current();
    let (ifindex, kernel) = tokio::task::block_in_place(|| {
        runtime.block_on(async {
            let mut k = NetlinkKernel::connect()?;
            let ifindex = k.link_index(&device).await?.with_context(|| format!("device {device} does not exist"))?;
            anyhow::Ok((ifindex, k.dump(ifindex).await?))
        })
    })?;
    let mut report =
        crate::status::compare(record.backend, args.mode, record.direct.as_ref(), &record.peers, &kernel, ifindex);
    if let Some(misses) = agent.as_ref().and_then(|a| a["last_miss_seconds"].as_object()) {
        for row in &mut report.peers {
            row.last_miss_seconds = misses.get(&row.node).and_then(|v| v.as_u64());
        }
    }
    let agent_ok = agent.as_ref().is_some_and(|a| a["synced"] == true && a["last_error"].is_null());
    match s.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "agent": agent, "peers_from": peers_from, "device": device, "rejected": record.rejected, "report": report, "drift": report.drift() })
            )?
        ),
        OutputFormat::Table => {
            match &agent {
                Some(a) => println!(
                    "agent: synced={} device_ready={} vtep_mac={} last_error={}",
                    a["synced"], a["device_ready"], a["vtep_mac"], a["last_error"]
                ),
                None => println!("agent: not answering on 127.0.0.1:{port}"),
            }
            println!("peers: {peers_from}");
            for r in &record.rejected {
                println!("rejected: {r}");
            }
            print!("{}", crate::status::table(&report));
        }
    }
    Ok(if agent_ok && !report.drift() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The agent's peers: built by the agent when asked, which is always
/// current; or, when it does not answer (stopped, deadlocked), the record it
/// last wrote to the run dir, which can lag a busy cluster by up to 30 s.
/// Returns the record and where it came from.
fn peers_record(args: &RunArgs, addr: &str) -> anyhow::Result<(PeersRecord, String)> {
    let asked = weir_common::http::get(addr, "/peers");
    if let Ok((200, body)) = &asked {
        let record =
            serde_json::from_str(body).with_context(|| format!("parse the peers the agent at {addr}/peers sent"))?;
        return Ok((record, format!("from the agent ({addr}/peers)")));
    }
    let why = match asked {
        Ok((code, body)) => format!("{addr}/peers answered {code}: {}", body.trim()),
        Err(e) => format!("{addr}/peers: {e}"),
    };
    let path = args.run_dir.join(crate::peers::publish::PEERS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("the agent did not answer ({why}), and read {} (is the agent running on this node?)", path.display())
    })?;
    let record = serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let age = std::fs::metadata(&path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
    let age = age.map_or("unknown age".to_string(), |a| format!("{} s old", a.as_secs()));
    Ok((record, format!("as the agent recorded them in {} ({age}); it did not answer ({why})", path.display())))
}

/// Removes weir's devices; the kernel drops their fdb, neighbour and route
/// entries with them. The CNI config is removed so no new pod uses weir.
async fn cleanup(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let k = NetlinkKernel::connect()?;
    for name in [DeviceSpec::vxlan_name(args.vni), DeviceSpec::IPIP_NAME.to_string()] {
        if delete_link(&k.handle(), &name).await? {
            tracing::info!(device = %name, "removed");
        }
    }
    match crate::firewall::delete_table().await {
        Ok(()) => tracing::info!("removed nftables table inet weir"),
        Err(e) => tracing::warn!(error = %e, "could not remove nftables table inet weir"),
    }
    for path in [args.cni_conf_dir.join(crate::cni::CONFLIST_NAME), args.run_dir.join("subnet.env")] {
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}
